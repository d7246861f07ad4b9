"""Input planning and reading, shard writing, completion markers and manifests.

The unit of work everywhere is a *chunk*: a fixed row range of one input file. Chunks are planned on the
driver from file metadata (Parquet) or one streaming count (text), never by loading rows. A chunk's
output shard is written to a temporary name and renamed, then a marker records its counts: a marker is
the only proof a chunk is done, so a killed job never takes a half-written shard as complete, and a
re-run (or a retried Ray task) rewrites a chunk under the same name instead of duplicating it.

One module (~480 lines) on purpose: the chunk plan and the shard/marker layout are one contract (a
chunk id names its input range, its shard and its marker), read by every stage and every resume.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lardo_ray import fs as _fs
from lardo_ray import schema
from lardo_ray.config_base import ConfigError

TEXT_FORMATS = ("csv", "tsv", "smi")
_SMI_COLUMN = "__smi_line__"
_NO_DELIMITER = "\x1f"  # never in a SMILES line: makes pyarrow hand us whole lines for .smi files


class InputError(ConfigError):
    """The input cannot be read as configured (missing file or column): raised before any work."""


# ---------------------------------------------------------------- filesystems
# One filesystem helper for the whole package (lardo_ray.fs); these names are kept for the stages.
filesystem_and_path = _fs.filesystem_and_path
_join = _fs.join


def ensure_dir(fs: pafs.FileSystem, path: str) -> None:
    fs.create_dir(path, recursive=True)


def check_writable(uri: str) -> None:
    """Fail at start, not after an hour of work, when the output cannot be written."""
    _fs.check_uri(uri, "output path (run.output_dir)", write=True)


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class ChunkSpec:
    """One unit of work: rows [row_start, row_end) of one file (or of a saved HF dataset)."""

    chunk_id: str
    uri: str
    format: str
    row_start: int
    row_end: int
    smiles_column: str
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    hf_split: str | None = None

    @property
    def n_rows(self) -> int:
        return self.row_end - self.row_start

    def to_row(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_columns"] = list(self.keep_columns)
        return d

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ChunkSpec:
        d = dict(row)
        d["keep_columns"] = tuple(d.get("keep_columns") or ())
        return cls(**d)


def detect_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".lz4"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith((".smi", ".smiles", ".txt")):
        return "smi"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".arrow") or "dataset_info.json" in name:
        return "hf"
    raise InputError(f"cannot tell the format of {path!r}; set input.format (csv, tsv, smi, parquet, hf)")


_DATA_EXTENSIONS = ("*.csv", "*.tsv", "*.smi", "*.smiles", "*.parquet", "*.pq", "*.csv.gz", "*.tsv.gz", "*.smi.gz")


def list_input_files(uri: str) -> list[str]:
    """A file, a directory (recursively, data files only) or a glob. Sorted: chunk ids must be stable."""
    try:
        return _list_input_files(uri)
    except (OSError, ValueError) as e:  # an unreachable store / bucket: say which input, before any work
        if isinstance(e, ConfigError):
            raise
        raise InputError(f"input (input.path) {uri!r} cannot be read: {e}") from None


def _list_input_files(uri: str) -> list[str]:
    fs, path = filesystem_and_path(uri)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""

    def _uri(p: str) -> str:
        return scheme + p if scheme else p

    if any(ch in path for ch in "*?["):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input not found: {uri}")
        if info.type == pafs.FileType.File:
            return [uri]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = [
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and not os.path.basename(i.path).startswith((".", "_"))
            and any(fnmatch.fnmatch(os.path.basename(i.path).lower(), e) for e in _DATA_EXTENSIONS)
        ]
    if not files:
        raise InputError(f"no input files match {uri}")
    return [_uri(p) for p in sorted(files)]


def _is_hf_dataset_dir(uri: str) -> bool:
    if "://" in uri:
        return False
    return os.path.isdir(uri) and (
        os.path.exists(os.path.join(uri, "dataset_info.json"))
        or os.path.exists(os.path.join(uri, "dataset_dict.json"))
        or os.path.exists(os.path.join(uri, "state.json"))
    )


def _open_text(uri: str):
    fs, path = filesystem_and_path(uri)
    return fs.open_input_stream(path, compression="detect")


def _text_options(fmt: str, skip_rows_after_names: int = 0) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    if fmt == "smi":
        ro = pacsv.ReadOptions(column_names=[_SMI_COLUMN], block_size=1 << 22, skip_rows_after_names=skip_rows_after_names)
        # A blank line in a .smi file is a record (an empty molecule, rejected as such), not noise.
        po = pacsv.ParseOptions(delimiter=_NO_DELIMITER, quote_char=False, escape_char=False, ignore_empty_lines=False)
        co = pacsv.ConvertOptions(column_types={_SMI_COLUMN: pa.binary()})
        return ro, po, co
    else:
        ro = pacsv.ReadOptions(block_size=1 << 22, skip_rows_after_names=skip_rows_after_names)
        po = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=False)
    # Every column as text: a SMILES like "1" or "NaN" must not become a number or a null.
    co = pacsv.ConvertOptions(strings_can_be_null=False, quoted_strings_can_be_null=False, auto_dict_encode=False)
    return ro, po, co


def _text_column_names(uri: str, fmt: str) -> list[str]:
    if fmt == "smi":
        return ["smiles"]
    ro, po, co = _text_options(fmt)
    try:
        with _open_text(uri) as stream:
            reader = pacsv.open_csv(stream, read_options=ro, parse_options=po, convert_options=co)
            return list(reader.schema.names)
    except pa.ArrowInvalid as e:
        raise InputError(f"{uri} is not valid {fmt.upper()}: {e}") from None


def _count_text_rows(uri: str, fmt: str, columns: list[str]) -> int:
    ro, po, co = _text_options(fmt)
    if fmt != "smi":
        # Only the first column is converted: counting 1.6 M rows takes well under a second.
        co = pacsv.ConvertOptions(include_columns=columns[:1], column_types={c: pa.binary() for c in columns[:1]})
    n = 0
    try:
        with _open_text(uri) as stream:
            for batch in pacsv.open_csv(stream, read_options=ro, parse_options=po, convert_options=co):
                n += batch.num_rows
    except pa.ArrowInvalid as e:
        # Found while planning, so before any work: a malformed line stops the job with its text.
        raise InputError(f"{uri} is not valid {fmt.upper()}: {e}") from None
    return n


def _check_columns(uri: str, available: list[str], needed: list[str]) -> None:
    missing = [c for c in needed if c not in available]
    if missing:
        raise InputError(
            f"column(s) {missing} not found in {uri}; its columns are {available[:20]} "
            f"(set input.smiles_column / --smiles-column)"
        )


MIN_CHUNK_ROWS = 2_000  # below this a chunk's fixed costs (task, file open, Parquet write) start to show
CHUNKS_PER_ACTOR = 4  # enough that no actor idles long while another finishes the last chunk


def auto_chunk_rows(total_rows: int, actors: int, upper: int) -> int:
    """Rows per chunk that keep every actor busy: about ``CHUNKS_PER_ACTOR`` chunks per actor, each at least
    ``MIN_CHUNK_ROWS`` (unless that would leave an actor without a chunk) and at most ``upper``
    (``input.chunk_rows``, the resume unit). 30,000 rows on 2 actors -> 8 chunks of 3,750, not 20,000 + 10,000."""
    actors = max(1, int(actors))
    if total_rows <= 0:
        return max(1, upper)
    floor = min(MIN_CHUNK_ROWS, -(-total_rows // actors))
    want = -(-total_rows // (actors * CHUNKS_PER_ACTOR))
    return max(1, min(upper, max(floor, want)))


def plan_chunks(
    uri: str,
    *,
    fmt: str = "auto",
    smiles_column: str = "smiles",
    id_column: str | None = None,
    keep_columns: list[str] | tuple[str, ...] = (),
    chunk_rows: int | Callable[[int], int] = 20_000,
    limit: int | None = None,
    hf_split: str = "train",
) -> list[ChunkSpec]:
    """Split the input into chunks of at most ``chunk_rows`` rows, checking its columns first.

    ``chunk_rows`` may be a function of the input's row count (after ``limit``): the rows are counted first."""
    needed = [smiles_column] + ([id_column] if id_column else []) + list(keep_columns)
    if fmt == "hf" or uri.startswith("hf:") or (fmt == "auto" and _is_hf_dataset_dir(uri)):
        sources: list[tuple[str, str, int]] = [(uri, "hf", _hf_num_rows(uri, hf_split, needed))]
    else:
        sources = []
        for f in list_input_files(uri):
            ffmt = detect_format(f, fmt)
            if ffmt == "parquet":
                pf = _parquet_file(f)
                _check_columns(f, pf.schema_arrow.names, needed)
                sources.append((f, ffmt, pf.metadata.num_rows))
            else:
                if ffmt == "smi":
                    needed_here = [c for c in needed if c != smiles_column]
                    if needed_here:
                        raise InputError(f".smi input {f} has no named columns; remove input.id_column/keep_columns")
                else:
                    _check_columns(f, _text_column_names(f, ffmt), needed)
                sources.append((f, ffmt, _count_text_rows(f, ffmt, needed)))
    if callable(chunk_rows):
        total = sum(n for _, _, n in sources)
        chunk_rows = max(1, int(chunk_rows(min(total, limit) if limit is not None else total)))
    chunks: list[ChunkSpec] = []
    remaining = limit
    for file_index, (f, ffmt, n_rows) in enumerate(sources):
        if remaining is not None:
            n_rows = min(n_rows, remaining)
            remaining -= n_rows
        for k, start in enumerate(range(0, n_rows, chunk_rows)):
            chunks.append(
                ChunkSpec(
                    chunk_id=f"{file_index:05d}-{k:06d}",
                    uri=f,
                    format=ffmt,
                    row_start=start,
                    row_end=min(start + chunk_rows, n_rows),
                    smiles_column=smiles_column,
                    id_column=id_column,
                    keep_columns=tuple(keep_columns),
                    hf_split=hf_split if ffmt == "hf" else None,
                )
            )
        if remaining == 0:
            break
    return chunks


def input_fingerprint(chunks: list[ChunkSpec]) -> str:
    """Identity of the input: paths, sizes, modification times and the chunk plan."""
    h = hashlib.sha256()
    seen: set[str] = set()
    for c in chunks:
        h.update(json.dumps(c.to_row(), sort_keys=True).encode())
        if c.uri in seen or c.format == "hf":
            continue
        seen.add(c.uri)
        fs, path = filesystem_and_path(c.uri)
        info = fs.get_file_info(path)
        h.update(f"{c.uri}|{info.size}|{info.mtime_ns}".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- reading a chunk


def _parquet_file(uri: str) -> pq.ParquetFile:
    fs, path = filesystem_and_path(uri)
    return pq.ParquetFile(fs.open_input_file(path))


def _load_hf(uri: str, split: str):
    import datasets  # lazy: only for HF inputs

    if uri.startswith("hf:"):
        # A hub name, for users who have the hub; cached by `datasets` on first use.
        return datasets.load_dataset(uri[3:], split=split)
    ds = datasets.load_from_disk(uri)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"split {split!r} not in HF dataset {uri}; splits: {list(ds)} (set input.hf_split)")
        ds = ds[split]
    return ds


def _hf_num_rows(uri: str, split: str, needed: list[str]) -> int:
    ds = _load_hf(uri, split)
    _check_columns(uri, list(ds.column_names), needed)
    return len(ds)


def read_chunk(spec: ChunkSpec) -> pa.Table:
    """The chunk's rows as a table: input_smiles, source_row, optional input_id, kept columns (as read)."""
    if spec.format == "parquet":
        table = _read_parquet_range(spec)
        raw_smiles = table.column(spec.smiles_column)
    elif spec.format == "hf":
        ds = _load_hf(spec.uri, spec.hf_split or "train")
        cols = [spec.smiles_column] + ([spec.id_column] if spec.id_column else []) + list(spec.keep_columns)
        table = ds.select_columns(list(dict.fromkeys(cols))).select(range(spec.row_start, spec.row_end)).data.table
        table = pa.table(table)
        raw_smiles = table.column(spec.smiles_column)
    else:
        table = _read_text_range(spec)
        if spec.format == "smi":
            # "SMILES<whitespace>name": the first token is the molecule, the rest its optional name.
            lines = [_decode(b) for b in table.column(_SMI_COLUMN).to_pylist()]
            raw_smiles = pa.array([ln.strip().split(None, 1)[0] if ln.strip() else "" for ln in lines], pa.string())
        else:
            raw_smiles = pa.array([_decode(b) for b in table.column(spec.smiles_column).to_pylist()], pa.string())
    n = table.num_rows
    out = {
        schema.INPUT_SMILES: raw_smiles.cast(pa.string()) if raw_smiles.type != pa.string() else raw_smiles,
        schema.SOURCE_ROW: pa.array([f"{spec.chunk_id}:{i}" for i in range(n)], pa.string()),
    }
    if spec.id_column:
        out[schema.USER_ID] = table.column(spec.id_column).cast(pa.string())
    for c in spec.keep_columns:
        out[c] = table.column(c)
    return pa.table(out)


def _read_parquet_range(spec: ChunkSpec) -> pa.Table:
    pf = _parquet_file(spec.uri)
    cols = list(dict.fromkeys([spec.smiles_column] + ([spec.id_column] if spec.id_column else []) + list(spec.keep_columns)))
    pieces, offset = [], 0
    for rg in range(pf.num_row_groups):
        rg_rows = pf.metadata.row_group(rg).num_rows
        lo, hi = offset, offset + rg_rows
        offset = hi
        if hi <= spec.row_start or lo >= spec.row_end:
            continue
        t = pf.read_row_group(rg, columns=cols)
        pieces.append(t.slice(max(spec.row_start - lo, 0), min(spec.row_end, hi) - max(spec.row_start, lo)))
    return pa.concat_tables(pieces) if pieces else pf.schema_arrow.empty_table().select(cols)


def _decode(b: bytes | None) -> str:
    # Undecodable bytes become U+FFFD: the row is then rejected with its text, not a crashed worker.
    return b.decode("utf-8", errors="replace") if b is not None else ""


def _read_text_range(spec: ChunkSpec) -> pa.Table:
    ro, po, co = _text_options(spec.format, skip_rows_after_names=spec.row_start)
    if spec.format != "smi":
        cols = list(dict.fromkeys([spec.smiles_column] + ([spec.id_column] if spec.id_column else []) + list(spec.keep_columns)))
        types = {spec.smiles_column: pa.binary()}
        if spec.id_column:
            types[spec.id_column] = pa.string()
        co = pacsv.ConvertOptions(
            include_columns=cols,
            column_types=types,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
    batches, need = [], spec.n_rows
    with _open_text(spec.uri) as stream:
        reader = pacsv.open_csv(stream, read_options=ro, parse_options=po, convert_options=co)
        for b in reader:
            if need <= 0:
                break
            b = b.slice(0, need)
            batches.append(b)
            need -= b.num_rows
        table = pa.Table.from_batches(batches, schema=reader.schema)
    return table


# ---------------------------------------------------------------- writing shards, markers, manifests


class StageOutput:
    """The on-disk layout of one stage: data/, rejected/, _done/ markers and manifest.json."""

    def __init__(self, stage_dir: str):
        self.uri = stage_dir
        self.fs, self.path = filesystem_and_path(stage_dir)
        self.data_dir = _join(self.path, "data")
        self.rejected_dir = _join(self.path, "rejected")
        self.done_dir = _join(self.path, "_done")

    # paths are built, not listed: resuming never lists millions of files except the markers
    def data_path(self, chunk_id: str) -> str:
        return _join(self.data_dir, f"part-{chunk_id}.parquet")

    def rejected_path(self, chunk_id: str) -> str:
        return _join(self.rejected_dir, f"part-{chunk_id}.parquet")

    def marker_path(self, chunk_id: str) -> str:
        return _join(self.done_dir, f"{chunk_id}.json")

    def prepare(self) -> None:
        for d in (self.data_dir, self.rejected_dir, self.done_dir):
            ensure_dir(self.fs, d)

    def write_table_atomic(self, path: str, table: pa.Table) -> None:
        tmp = _fs.temporary_name(path)
        pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
        self.fs.move(tmp, path)

    def write_marker(self, chunk_id: str, stats: dict[str, Any]) -> None:
        path = self.marker_path(chunk_id)
        tmp = _fs.temporary_name(path)
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(stats, sort_keys=True).encode())
        self.fs.move(tmp, path)

    def read_markers(self) -> dict[str, dict[str, Any]]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.done_dir, allow_not_found=True))
        except OSError:
            return {}
        out = {}
        for info in infos:
            name = os.path.basename(info.path)
            if info.type != pafs.FileType.File or not name.endswith(".json"):
                continue
            with self.fs.open_input_stream(info.path) as f:
                out[name[: -len(".json")]] = json.loads(f.read())
        return out

    def read_manifest(self) -> dict[str, Any] | None:
        p = _join(self.path, "manifest.json")
        if self.fs.get_file_info(p).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(p) as f:
            return json.loads(f.read())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        p = _join(self.path, "manifest.json")
        tmp = _fs.temporary_name(p)
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
        self.fs.move(tmp, p)

    def clear(self) -> None:
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            self.fs.delete_dir_contents(self.path, missing_dir_ok=True)

    def data_files(self, chunk_ids: list[str]) -> list[str]:
        return [self.data_path(c) for c in chunk_ids]
