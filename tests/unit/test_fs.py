"""lardo_ray.fs: one way to reach local paths and object storage, and clear errors at start."""

from __future__ import annotations

import os

import pytest

from lardo_ray import fs
from lardo_ray.config_base import ConfigError


def test_local_paths_and_file_uris_are_the_same_files(tmp_path):
    uri = f"file://{tmp_path}/a/b.txt"
    fs.write_bytes(uri, b"hello")
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"hello"
    assert fs.exists(str(tmp_path / "a" / "b.txt")) and fs.is_file(uri)
    assert not fs.is_remote(uri) and fs.is_remote("s3://bucket/x") and fs.is_remote("gs://b/x")
    assert fs.join("s3://b/run/", "pretrain", "/encoder") == "s3://b/run/pretrain/encoder"


def test_upload_download_and_local_copy_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.bin").write_bytes(b"\x00\x01")
    (src / "sub" / "y.txt").write_text("y")
    fs.upload(str(src), str(tmp_path / "dst"))
    with fs.local_copy(str(tmp_path / "dst")) as local:
        assert sorted(os.listdir(local)) == ["sub", "x.bin"]
        assert open(os.path.join(local, "sub", "y.txt")).read() == "y"
    with fs.local_dir_for(str(tmp_path / "out")) as d:
        open(os.path.join(d, "f.md"), "w").write("t")
    assert (tmp_path / "out" / "f.md").read_text() == "t"
    with pytest.raises(fs.StorageError, match="does not exist"):
        fs.download(str(tmp_path / "missing"), str(tmp_path / "dl"))


def test_a_missing_filesystem_package_is_named_at_start(monkeypatch):
    monkeypatch.setitem(fs._NEEDS, "s3", (("lardo_no_such_module", "s3-support-pkg"),))
    with pytest.raises(ConfigError, match=r"s3-support-pkg.*lardo-ray\[cloud\]"):
        fs.check_uri("s3://bucket/run", "output path (run.output_dir)", write=True)
    with pytest.raises(ConfigError, match="run.output_dir"):
        fs.check_uri("s3://bucket/run", "output path (run.output_dir)", write=True)


def test_an_unwritable_local_output_names_the_key(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(ConfigError, match=r"run.output_dir.*not writable"):
            fs.check_uri(str(ro / "x"), "output path (run.output_dir)", write=True)
    finally:
        ro.chmod(0o700)
