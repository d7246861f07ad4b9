"""The describe stage with the vllm backend: waves of DSM shards through Ray Data LLM actor pools.

``ray.data.llm`` starts its engines once per dataset execution and returns rows in any order, so the
stage cannot be one actor call per shard like the other backends. Instead a *wave* of shards (up to
``describe.vllm.wave_chunks``) is one Ray Data job: read the shards (tagging each row with its chunk),
run lardo_ray.stages.vllm.processor.describe_dataset_vllm, write the wave's rows to a scratch directory, then
regroup them into one shard per chunk (atomic, with markers, like every stage). A killed wave is simply
redone: its scratch directory is cleared first and its chunks have no markers yet.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from lardo_ray import schema
from lardo_ray.config import PipelineConfig
from lardo_ray.io import StageOutput

if TYPE_CHECKING:
    import ray.data

    from lardo_ray.llm.stage1 import Template

log = logging.getLogger("lardo_ray")
CHUNK = "__chunk_id"
USE_LLM = "use_llm"
ERROR = "error"


class _ReadShard:
    """One unit row -> its DSM shard, tagged with the chunk id (and the LLM slice flags, or only the
    failed rows of an earlier run when retrying)."""

    def __init__(self, up_dir: str, out_dir: str, llm_slice: int | None):
        self.up, self.out, self.llm_slice = StageOutput(up_dir), StageOutput(out_dir), llm_slice

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = []
        for unit in batch.to_pylist():
            t = pq.read_table(self.up.data_path(unit["chunk_id"]), filesystem=self.up.fs)
            if self.llm_slice is not None:
                start = int(unit["row_offset"])
                t = t.append_column(USE_LLM, pa.array([start + i < self.llm_slice for i in range(t.num_rows)]))
            if unit["retry_failed"]:
                old = pq.read_table(self.out.data_path(unit["chunk_id"]), filesystem=self.out.fs)
                failed = set(old.filter(pc.invert(pc.is_null(old.column(ERROR)))).column(schema.MOL_ID).to_pylist())
                t = t.filter(pa.array([m in failed for m in t.column(schema.MOL_ID).to_pylist()]))
            tables.append(t.append_column(CHUNK, pa.array([unit["chunk_id"]] * t.num_rows, pa.string())))
        return pa.concat_tables(tables, promote_options="default")


def _regroup(unit: dict[str, Any], wave_dir: str, up_dir: str, out_dir: str, config_hash: str) -> dict[str, Any]:
    """The wave's rows of one chunk -> the chunk's shard and marker (merged with the earlier rows on retry)."""
    up, out = StageOutput(up_dir), StageOutput(out_dir)
    cid = unit["chunk_id"]
    wave = pads.dataset(wave_dir, format="parquet", filesystem=out.fs)
    rows = wave.to_table(filter=pc.field(CHUNK) == cid).drop_columns([CHUNK])
    if USE_LLM in rows.column_names:
        rows = rows.drop_columns([USE_LLM])
    n_in = pq.ParquetFile(up.fs.open_input_file(up.data_path(cid))).metadata.num_rows
    if unit["retry_failed"]:
        old = pq.read_table(out.data_path(cid), filesystem=out.fs)
        by_id = {r[schema.MOL_ID]: r for r in rows.to_pylist()}
        rows = pa.Table.from_pylist([by_id.get(r[schema.MOL_ID], r) for r in old.to_pylist()], schema=old.schema)
    else:
        # Input order, so a shard reads the same as the other backends' (the engine returns any order).
        order = {m: i for i, m in enumerate(pq.read_table(up.data_path(cid), columns=[schema.MOL_ID],
                                                          filesystem=up.fs).column(0).to_pylist())}
        idx = sorted(range(rows.num_rows), key=lambda i: order.get(rows.column(schema.MOL_ID)[i].as_py(), i))
        rows = rows.take(pa.array(idx, pa.int64()))
    if rows.num_rows != n_in:
        raise RuntimeError(f"describe (vllm) chunk {cid}: {n_in} rows in, {rows.num_rows} out")
    empty = pa.table({c: pa.array([], pa.string()) for c in (schema.MOL_ID, schema.INPUT_SMILES,
                                                            schema.REJECT_REASON, schema.REJECT_DETAIL, schema.STAGE)})
    out.write_table_atomic(out.rejected_path(cid), empty)
    out.write_table_atomic(out.data_path(cid), rows)
    n_failed = rows.num_rows - int(pc.sum(pc.is_null(rows.column(ERROR))).as_py() or 0)
    stats = {"chunk_id": cid, "n_read": n_in, "n_written": rows.num_rows, "n_rejected": 0, "n_failed": n_failed,
             "config_hash": config_hash}
    out.write_marker(cid, stats)
    return stats


class StalledWave(RuntimeError):
    """A wave wrote nothing for describe.vllm.stall_timeout_s: the engine stopped without dying."""


def _write_watched(described: ray.data.Dataset, uri: str, out: StageOutput, wave_dir: str, stall_s: float, wave: int) -> None:
    """Write the wave's rows, failing when no new output file appears for ``stall_s`` seconds: an engine
    whose input thread died (seen with vLLM's CPU build) stops without an error and would be waited on
    forever. Ray Data writes a file per finished block, so files appearing is progress."""
    import threading

    from pyarrow import fs as pafs

    errors: list[BaseException] = []

    def write() -> None:
        try:
            described.write_parquet(uri)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(e)

    t = threading.Thread(target=write, name="describe-vllm-wave", daemon=True)
    t.start()
    seen, last = -1, time.monotonic()
    while t.is_alive():
        t.join(timeout=min(5.0, stall_s))
        try:
            n = len(out.fs.get_file_info(pafs.FileSelector(wave_dir, allow_not_found=True)))
        except OSError:
            n = seen
        if n != seen:
            seen, last = n, time.monotonic()
        elif t.is_alive() and time.monotonic() - last > stall_s:
            raise StalledWave(
                f"describe (vllm): wave {wave} wrote nothing for {stall_s:g} s (describe.vllm.stall_timeout_s): "
                "the engine stopped without an error (see the replica's log above). The wave's chunks are not "
                "written; a re-run retries them.")
    if errors:
        raise errors[0]


def run_vllm_waves(cfg: PipelineConfig, up: StageOutput, out: StageOutput, units: list[dict[str, Any]],
                   template: Template | None, config_hash: str) -> None:
    import ray

    from lardo_ray.stages.vllm.processor import describe_dataset_vllm

    size = cfg.describe.vllm.wave_chunks
    for w in range(0, len(units), size):
        wave = units[w: w + size]
        t0 = time.time()
        wave_dir = f"{out.path}/_waves/{wave[0]['chunk_id']}-{uuid.uuid4().hex[:6]}"
        ds = ray.data.from_items(wave, override_num_blocks=len(wave)).map_batches(
            _ReadShard, fn_constructor_args=(up.uri, out.uri, cfg.describe.llm_slice), batch_size=1,
            batch_format="pyarrow", num_cpus=0.25, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))
        described = describe_dataset_vllm(ds, cfg.describe, template, carry=[CHUNK])
        try:
            _write_watched(described, f"{out.uri.rstrip('/')}/_waves/{wave_dir.rsplit('/', 1)[1]}", out, wave_dir,
                           cfg.describe.vllm.stall_timeout_s, w // size + 1)
        except StalledWave:
            raise
        except Exception as e:  # noqa: BLE001 - Ray wraps the engine's death in several error types
            raise RuntimeError(
                f"describe (vllm): the engine failed on wave {w // size + 1} and was restarted "
                f"{cfg.describe.vllm.max_engine_restarts} time(s) (describe.vllm.max_engine_restarts) without "
                f"recovering; the wave's chunks are not written and a re-run retries them. The engine's error is in "
                f"the replica's log above; Ray says: {type(e).__name__}: {str(e)[-1500:]}") from e
        regroup = ray.remote(_regroup).options(num_cpus=0.25)
        stats = ray.get([regroup.remote(u, wave_dir, up.uri, out.uri, config_hash) for u in wave])
        out.fs.delete_dir(wave_dir)
        n = sum(s["n_read"] for s in stats)
        if cfg.run.progress:
            print(f"[describe/vllm] wave {w // size + 1}: {len(wave)} chunks, {n:,} rows in {time.time() - t0:,.0f}s",
                  flush=True)
