"""Filesystems: the one place that turns a path or URI (s3://, gs://, hdfs://, file://) into files.

Every stage reads and writes through pyarrow filesystems (``filesystem_and_path``), so a local directory
and a bucket behave the same. The store is picked the way boto3 and pyarrow users expect: for S3 the
standard variables ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``
(and ``AWS_PROFILE``); for GCS Google's default credentials. ``check_uri`` runs at start: a missing
package or an unreachable bucket stops the job naming the package or the URI, before any work.

Files that a library only reads from a local path (safetensors, MLflow's ``log_artifact``, matplotlib)
go through ``local_copy`` / ``upload``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

from lardo_ray.config_base import ConfigError

# scheme -> (module, pip package) pairs that must be importable to use it. boto3 / google-cloud-storage are
# what MLflow's artifact stores use for the same buckets; all ship in the `cloud` extra.
_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "s3": (("pyarrow._s3fs", "pyarrow (a build with S3)"), ("boto3", "boto3")),
    "gs": (("pyarrow._gcsfs", "pyarrow (a build with GCS)"), ("google.cloud.storage", "google-cloud-storage")),
    "gcs": (("pyarrow._gcsfs", "pyarrow (a build with GCS)"), ("google.cloud.storage", "google-cloud-storage")),
    "hdfs": (("pyarrow._hdfs", "pyarrow (a build with HDFS)"),),
}


class StorageError(ConfigError):
    """A path or URI cannot be used: unknown scheme, missing package, unreachable bucket."""


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def is_remote(uri: str) -> bool:
    return scheme(uri) not in ("", "file")


def join(base: str, *names: str) -> str:
    out = base.rstrip("/")
    for n in names:
        out = f"{out}/{n.strip('/')}"
    return out


def require_packages(uri: str) -> None:
    """Raise naming the pip package when ``uri``'s scheme needs one that is not installed."""
    for module, package in _NEEDS.get(scheme(uri), ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise StorageError(
                f"{uri!r} needs the Python package {package}, which is not installed: "
                f"pip install 'lardo-ray[cloud]' (or pip install {package.split()[0]})"
            )


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """Any pyarrow filesystem URI or a local path -> (filesystem, path inside it)."""
    if not is_remote(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    require_packages(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa_errors() as e:
        raise StorageError(f"cannot open {uri!r}: {e}") from None


def pa_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError)


def exists(uri: str) -> bool:
    fs, path = filesystem_and_path(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    fs, path = filesystem_and_path(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem_and_path(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def temporary_name(path: str) -> str:
    """A sibling name for writing ``path`` before its rename.

    It starts with a dot because a writer killed mid-write leaves it behind, and dataset readers
    (pyarrow, Ray Data, pandas) skip dot-files when they read a directory: a half-written
    ``part-*.parquet.tmp`` beside the shards would otherwise be read as a corrupt shard.
    """
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.tmp-{uuid.uuid4().hex[:8]}" if head else f".{name}.tmp-{uuid.uuid4().hex[:8]}"


def write_bytes(uri: str, data: bytes) -> None:
    """Write through a temporary name and rename: readers never see half a file."""
    fs, path = filesystem_and_path(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = temporary_name(path)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def upload(local_path: str, uri: str) -> str:
    """Copy a local file or directory to ``uri`` (a local path too); returns ``uri``."""
    fs, path = filesystem_and_path(uri)
    if os.path.isdir(local_path):
        fs.create_dir(path, recursive=True)
        pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    else:
        write_bytes(uri, open(local_path, "rb").read())
    return uri


def download(uri: str, local_dir: str) -> str:
    """Copy the directory (or file) ``uri`` into ``local_dir``; returns the local path of what was copied."""
    fs, path = filesystem_and_path(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri!r} does not exist")
    os.makedirs(local_dir, exist_ok=True)
    if info.type == pafs.FileType.File:
        dst = os.path.join(local_dir, os.path.basename(path))
        pafs.copy_files(path, dst, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return dst
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path holding ``uri``'s files: the path itself when local, else a temporary download."""
    if not is_remote(uri):
        yield filesystem_and_path(uri)[1]
        return
    tmp = tempfile.mkdtemp(prefix="lardo-dl-")
    try:
        yield download(uri, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_dir_for(uri: str) -> Iterator[str]:
    """A local directory to write into; on exit its files are uploaded to ``uri`` when that is remote."""
    if not is_remote(uri):
        path = filesystem_and_path(uri)[1]
        os.makedirs(path, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="lardo-up-")
    try:
        yield tmp
        upload(tmp, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_uri(uri: str, what: str, *, write: bool = False) -> None:
    """At start: the package for ``uri``'s scheme is installed and the store answers (writable if ``write``).

    ``what`` names the config key, so the message says what to fix."""
    try:
        fs, path = filesystem_and_path(uri)
    except StorageError as e:
        raise StorageError(f"{what}: {e}") from None
    if write:
        probe = join(path, f".write-probe-{uuid.uuid4().hex[:8]}")
        try:
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
        except pa_errors() as e:
            raise StorageError(f"{what}: {uri!r} is not writable: {e}") from None
    else:
        try:
            fs.get_file_info(path)
        except pa_errors() as e:
            raise StorageError(f"{what}: {uri!r} is not reachable: {e}") from None
