"""What every chunked stage shares: output checks, resume, the Ray run, reconciliation, the summary.

A stage is a *core* (``__call__(table) -> (rows, rejected)``, no Ray) plus this scaffolding. The first
stage's units are input chunks (lardo_ray.io.plan_chunks); every later stage's units are the previous
stage's shards, one to one, so the chain stays linear and a molecule never needs a join to meet its
other columns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lardo_ray import schema
from lardo_ray.chem.standardise import DUPLICATE
from lardo_ray.config import ConfigError, PipelineConfig, dump_config
from lardo_ray.config_base import RayResources
from lardo_ray.io import StageOutput, check_writable

log = logging.getLogger("lardo_ray")


def rejected_table(columns: dict[str, list], stage: str) -> pa.Table:
    n = len(columns[schema.INPUT_SMILES])
    cols = dict(columns)
    cols[schema.STAGE] = [stage] * n
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})


@dataclass
class StageSummary:
    stage: str
    output: str
    n_read: int = 0
    n_written: int = 0
    n_rejected: int = 0
    n_duplicates: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    chunks_total: int = 0
    chunks_skipped: int = 0
    wall_seconds: float = 0.0
    mol_per_s: float = 0.0
    reconciled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    not_logged: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def lines(self) -> list[str]:
        by_reason = ", ".join(f"{k}={v:,}" for k, v in sorted(self.rejected_by_reason.items())) or "none"
        status = "OK" if self.reconciled else "MISMATCH"
        out = [
            f"== {self.stage} summary ==",
            f"  output      {self.output}",
            f"  read        {self.n_read:,}",
            f"  written     {self.n_written:,}",
            f"  rejected    {self.n_rejected:,}  ({by_reason})",
            f"  duplicates  {self.n_duplicates:,}",
            f"  reconcile   read = written + rejected + duplicates: {status}",
            f"  chunks      {self.chunks_total} ({self.chunks_skipped} already done, skipped)",
            f"  wall time   {self.wall_seconds:,.1f} s   ({self.mol_per_s:,.1f} molecules/s this run)",
        ]
        out += [f"  {k:<11s} {v}" for k, v in self.extra.items()]
        return out

    def metrics(self) -> dict[str, float]:
        m = {
            "n_read": self.n_read, "n_written": self.n_written, "n_rejected": self.n_rejected,
            "n_duplicates": self.n_duplicates, "wall_seconds": self.wall_seconds, "mol_per_s": self.mol_per_s,
            "reconciled": float(self.reconciled),
        }
        m.update({f"rejected.{k}": v for k, v in self.rejected_by_reason.items()})
        m.update({k: float(v) for k, v in self.extra.items() if isinstance(v, (int, float))})
        return m


def open_output(cfg: PipelineConfig, stage: str, config_hash: str, fingerprint: str, n_units: int,
                **manifest_extra: Any) -> StageOutput:
    """Check the output is writable and holds nothing of other settings; prepare it for (re)use."""
    stage_dir = cfg.stage_dir(stage)
    check_writable(stage_dir)
    out = StageOutput(stage_dir)
    manifest = out.read_manifest()
    if cfg.run.overwrite:
        out.clear()
    elif manifest and (manifest.get("config_hash") != config_hash or manifest.get("input_fingerprint") != fingerprint):
        raise ConfigError(
            f"{stage_dir} holds output of a different input or config (manifest config_hash "
            f"{manifest.get('config_hash')} vs {config_hash}); use another run.output_dir or set run.overwrite=true"
        )
    out.prepare()
    out.write_manifest({"stage": stage, "status": "running", "config_hash": config_hash,
                        "input_fingerprint": fingerprint, "n_chunks": n_units, **manifest_extra})
    return out


def pending(out: StageOutput, chunk_ids: list[str], config_hash: str) -> list[str]:
    done = {k for k, v in out.read_markers().items() if v.get("config_hash") == config_hash}
    return [c for c in chunk_ids if c not in done]


def run_pending(cfg: PipelineConfig, stage: str, units: list[dict[str, Any]], worker_cls: type,
                worker_kwargs: dict[str, Any], res: RayResources, rows_per_unit: list[int]) -> None:
    from lardo_ray.execution import Progress, init_ray, run_chunks

    if not units:
        return
    init_ray(cfg.run.ray_address, cfg.run.ray_num_cpus, cfg.run.ray_dashboard)
    progress = Progress(stage, len(units), sum(rows_per_unit), cfg.run.progress)
    for _ in run_chunks(stage, units, worker_cls, worker_kwargs, res, progress):
        pass


def count_rejections(out: StageOutput, chunk_ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in chunk_ids:
        reasons = pq.read_table(out.rejected_path(c), columns=[schema.REJECT_REASON], filesystem=out.fs).column(0)
        for r in reasons.to_pylist():
            counts[r] = counts.get(r, 0) + 1
    return counts


def num_rows(out: StageOutput, path: str) -> int:
    return pq.ParquetFile(out.fs.open_input_file(path)).metadata.num_rows


def reconcile(out: StageOutput, stage: str, chunk_ids: list[str], n_read: int) -> StageSummary:
    """Counts from what is on disk (Parquet footers), not from what workers said."""
    s = StageSummary(stage=stage, output=out.uri, chunks_total=len(chunk_ids), n_read=n_read)
    s.n_written = sum(num_rows(out, out.data_path(c)) for c in chunk_ids)
    by_reason = count_rejections(out, chunk_ids)
    s.n_duplicates = by_reason.pop(DUPLICATE, 0)
    s.rejected_by_reason = by_reason
    s.n_rejected = sum(by_reason.values())
    s.reconciled = s.n_read == s.n_written + s.n_rejected + s.n_duplicates
    return s


def finish(out: StageOutput, summary: StageSummary, config_hash: str, fingerprint: str,
           chunk_ids: list[str], **manifest_extra: Any) -> None:
    """Write the final manifest; a count mismatch is a bug and says so loudly."""
    out.write_manifest({
        "stage": summary.stage, "status": "complete" if summary.reconciled else "mismatch",
        "config_hash": config_hash, "input_fingerprint": fingerprint,
        "n_chunks": len(chunk_ids), "chunks": chunk_ids,
        "counts": {"read": summary.n_read, "written": summary.n_written, "rejected": summary.n_rejected,
                   "duplicates": summary.n_duplicates, "rejected_by_reason": summary.rejected_by_reason},
        "schema": [f"{f.name}: {f.type}" for f in pq.read_schema(out.data_path(chunk_ids[0]), filesystem=out.fs)]
        if chunk_ids else [],
        "mlflow_run_id": summary.mlflow_run_id,
        **manifest_extra,
    })
    if not summary.reconciled:
        raise RuntimeError("\n".join(summary.lines()) + "\ncounts do not reconcile: this is a bug, please report it")


def upstream_chunks(cfg: PipelineConfig, upstream: str) -> tuple[StageOutput, list[str], str]:
    """The previous stage's complete output: its shards become this stage's units."""
    up = StageOutput(cfg.stage_dir(upstream))
    manifest = up.read_manifest()
    if not manifest or manifest.get("status") != "complete":
        raise ConfigError(
            f"stage '{upstream}' has no complete output in {up.uri}: run `lardo-ray {upstream}` first "
            f"(or point run.output_dir at a run that has it)"
        )
    return up, list(manifest["chunks"]), f"{upstream}:{manifest['config_hash']}:{manifest['input_fingerprint']}"


class ShardWorker:
    """Base of a derived stage's worker: upstream shard -> core -> this stage's shard + marker."""

    stage = "?"

    def __init__(self, config: dict[str, Any], stage_dir: str, upstream_dir: str, config_hash: str):
        self.cfg = PipelineConfig.model_validate(config)
        self.out = StageOutput(stage_dir)
        self.up = StageOutput(upstream_dir)
        self.config_hash = config_hash
        self.core = self.build_core(self.cfg)

    def build_core(self, cfg: PipelineConfig):  # pragma: no cover - abstract
        raise NotImplementedError

    def columns(self) -> list[str] | None:
        """Upstream columns this stage needs (missing ones are skipped); None = all."""
        return None

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        t0 = time.time()
        chunk_id = unit["chunk_id"]
        path = self.up.data_path(chunk_id)
        wanted = self.columns()
        if wanted is not None:  # optional columns (e.g. text_embedding) are read when the shard has them
            names = set(pq.read_schema(path, filesystem=self.up.fs).names)
            wanted = [c for c in wanted if c in names]
        table = pq.read_table(path, columns=wanted, filesystem=self.up.fs)
        data, rejected = self.core(table)
        if table.num_rows != data.num_rows + rejected.num_rows:
            raise RuntimeError(f"{self.stage} chunk {chunk_id}: {table.num_rows} read != written + rejected")
        self.out.write_table_atomic(self.out.rejected_path(chunk_id), rejected)
        self.out.write_table_atomic(self.out.data_path(chunk_id), data)
        stats = {"chunk_id": chunk_id, "n_read": table.num_rows, "n_written": data.num_rows,
                 "n_rejected": rejected.num_rows, "seconds": round(time.time() - t0, 3),
                 "config_hash": self.config_hash}
        self.out.write_marker(chunk_id, stats)
        return stats


def run_derived_stage(cfg: PipelineConfig, stage: str, upstream: str, worker_cls: type, res: RayResources,
                      sections: tuple[str, ...], tracker=None, extra_summary=None) -> StageSummary:
    """Plan from the upstream manifest, skip finished shards, run the rest, reconcile, log."""
    from lardo_ray.tracking import make_tracker

    t0 = time.time()
    up, chunk_ids, fingerprint = upstream_chunks(cfg, upstream)
    config_hash = cfg.fingerprint(*sections)
    tracker = tracker or make_tracker(cfg)
    tracker.check_reachable()
    out = open_output(cfg, stage, config_hash, fingerprint, len(chunk_ids))
    todo = pending(out, chunk_ids, config_hash)
    rows = [num_rows(up, up.data_path(c)) for c in chunk_ids]
    rows_by_chunk = dict(zip(chunk_ids, rows))
    with tracker.run(run_name=f"{cfg.run.name}/{stage}", tags={"stage": stage}):
        tracker.log_params(cfg.model_dump(mode="json"))
        tracker.log_text(dump_config(cfg), "config.yaml")
        kwargs = {"config": cfg.model_dump(mode="json"), "stage_dir": out.uri, "upstream_dir": up.uri,
                  "config_hash": config_hash}
        run_pending(cfg, stage, [{"chunk_id": c} for c in todo], worker_cls, kwargs, res,
                    [rows_by_chunk[c] for c in todo])
        summary = reconcile(out, stage, chunk_ids, sum(rows))
        summary.chunks_skipped = len(chunk_ids) - len(todo)
        summary.wall_seconds = time.time() - t0
        summary.mol_per_s = sum(rows_by_chunk[c] for c in todo) / max(summary.wall_seconds, 1e-9)
        if extra_summary:
            summary.extra.update(extra_summary(out, chunk_ids))
        tracker.log_metrics(summary.metrics())
        summary.not_logged = list(tracker.not_logged)
        summary.mlflow_run_id = tracker.run_id
    finish(out, summary, config_hash, fingerprint, chunk_ids)
    return summary
