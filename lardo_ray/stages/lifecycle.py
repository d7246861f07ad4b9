"""The one lifecycle of a chunked stage: plan -> check the output -> skip finished units -> run the rest on
Ray -> reconcile counts from disk -> log to MLflow -> write the manifest.

A stage is a *core* (``__call__(table) -> (rows, rejected)``, no Ray) plus its registration
(lardo_ray.stages.registry); ``run_stage`` runs any registered one. An input stage's units are input
chunks (lardo_ray.io.plan_chunks); every other stage's units are its upstream stage's shards, one to
one, so the chain stays linear and a molecule never needs a join to meet its other columns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from lardo_ray import schema
from lardo_ray.chem.standardise import DUPLICATE
from lardo_ray.config import ConfigError, PipelineConfig, dump_config
from lardo_ray.config_base import RayResources
from lardo_ray.io import StageOutput, check_writable
from lardo_ray.stages.registry import Stage

if TYPE_CHECKING:
    from lardo_ray.tracking import Tracker

log = logging.getLogger("lardo_ray")


class Core(Protocol):
    """What a stage does to one batch, without Ray: input rows -> (output rows, rejected rows with reasons)."""

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]: ...



def rejected_table(columns: dict[str, list[Any]], stage: str) -> pa.Table:
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
    return int(pq.ParquetFile(out.fs.open_input_file(path)).metadata.num_rows)


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


@dataclass
class Plan:
    """What a stage will read: its units (one per chunk, in order), their rows, the input's fingerprint."""

    chunk_ids: list[str]
    units: dict[str, dict[str, Any]]  # chunk_id -> the row a worker gets
    rows: dict[str, int]
    fingerprint: str
    upstream: StageOutput | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return sum(self.rows.values())


def _input_chunk_rows(cfg: PipelineConfig, stage: Stage) -> int | Callable[[int], int]:
    """Rows per chunk: the plan an earlier run of this output used (a resumed run must find the same chunks,
    whatever the cluster's size now), else sized from the input's row count and the actor pool
    (``auto_chunk_rows``), ``input.chunk_rows`` being the upper bound."""
    from lardo_ray.execution import init_ray, pool_size
    from lardo_ray.io import MIN_CHUNK_ROWS, auto_chunk_rows

    manifest = None if cfg.run.overwrite else StageOutput(cfg.stage_dir(stage.name)).read_manifest()
    if manifest and manifest.get("chunk_rows"):
        return int(manifest["chunk_rows"])

    def size(total: int) -> int:
        if total <= MIN_CHUNK_ROWS:
            return cfg.input.chunk_rows  # one small chunk: no need to start Ray to plan it
        init_ray(cfg.run.ray_address, cfg.run.ray_num_cpus, cfg.run.ray_dashboard)
        return auto_chunk_rows(total, pool_size(stage.resources_of(cfg), 1 << 30), cfg.input.chunk_rows)

    return size


def plan_input(cfg: PipelineConfig, stage: Stage) -> Plan:
    from lardo_ray.io import input_fingerprint, plan_chunks

    if not cfg.input.path:
        raise ConfigError("config key 'input.path' is empty: give --input FILE or set input.path")
    chunks = plan_chunks(cfg.input.path, fmt=cfg.input.format, smiles_column=cfg.input.smiles_column,
                         id_column=cfg.input.id_column, keep_columns=cfg.input.keep_columns,
                         chunk_rows=_input_chunk_rows(cfg, stage), limit=cfg.input.limit, hf_split=cfg.input.hf_split)
    return Plan(chunk_ids=[c.chunk_id for c in chunks], units={c.chunk_id: c.to_row() for c in chunks},
                rows={c.chunk_id: c.n_rows for c in chunks}, fingerprint=input_fingerprint(chunks),
                manifest={"chunk_rows": max((c.n_rows for c in chunks), default=0)})


def plan_upstream(cfg: PipelineConfig, upstream: str) -> Plan:
    up, chunk_ids, fingerprint = upstream_chunks(cfg, upstream)
    rows = {c: num_rows(up, up.data_path(c)) for c in chunk_ids}
    offsets, total = {}, 0
    for c in chunk_ids:  # a unit knows where its rows start: describe's llm_slice counts from the first row
        offsets[c], total = total, total + rows[c]
    return Plan(chunk_ids=chunk_ids, units={c: {"chunk_id": c, "row_offset": offsets[c]} for c in chunk_ids},
                rows=rows, fingerprint=fingerprint, upstream=up)


class SlicedCore:
    """A core applied to slices of ``rows`` rows (per-row Python objects stay bounded on large shards)."""

    def __init__(self, core: Core, rows: int):
        self.core, self.rows = core, rows

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if table.num_rows <= self.rows:  # an empty chunk still gets (empty) shards, so its marker is honest
            rows, rejected = self.core(table)
            return rows, rejected
        parts = [self.core(table.slice(i, self.rows)) for i in range(0, table.num_rows, self.rows)]
        return pa.concat_tables([p[0] for p in parts]), pa.concat_tables([p[1] for p in parts])


class ChunkWorker:
    """One actor: the stage's core, built once; ``process`` does one unit end to end: read (an input chunk
    or the upstream shard) -> core -> write rejected rows, then rows, then the marker."""

    def __init__(self, stage: str, config: dict[str, Any], stage_dir: str, upstream_dir: str | None,
                 config_hash: str, context: dict[str, Any] | None = None):
        from lardo_ray.stages.registry import get, load_ref

        self.stage = get(stage)
        self.cfg = PipelineConfig.model_validate(config)
        self.out = StageOutput(stage_dir)
        self.up = StageOutput(upstream_dir) if upstream_dir else None
        self.config_hash = config_hash
        self.context = dict(context or {})
        if self.stage.core is None:
            raise ValueError(f"stage {self.stage.name!r} has no core: it is not a chunked stage")
        self.core = load_ref(self.stage.core)(self.cfg, **self.context)
        self.enrich = self.stage.hook("enrich")

    def read(self, unit: dict[str, Any]) -> pa.Table:
        if self.up is None:
            from lardo_ray.io import ChunkSpec, read_chunk

            return read_chunk(ChunkSpec.from_row(unit))
        path = self.up.data_path(unit["chunk_id"])
        wanted = list(self.stage.columns) if self.stage.columns is not None else None
        if wanted is not None:  # optional columns (e.g. text_embedding) are read when the shard has them
            names = set(pq.read_schema(path, filesystem=self.up.fs).names)
            wanted = [c for c in wanted if c in names]
        table = pq.read_table(path, columns=wanted, filesystem=self.up.fs)
        return self.enrich(self.cfg, table, unit) if self.enrich is not None else table

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        t0 = time.time()
        chunk_id = unit["chunk_id"]
        table = self.read(unit)
        data, rejected = self.core(table)
        if table.num_rows != data.num_rows + rejected.num_rows:
            raise RuntimeError(f"{self.stage.name} chunk {chunk_id}: {table.num_rows} read != written + rejected")
        self.out.write_table_atomic(self.out.rejected_path(chunk_id), rejected)
        self.out.write_table_atomic(self.out.data_path(chunk_id), data)
        stats = {"chunk_id": chunk_id, "n_read": table.num_rows, "n_written": data.num_rows,
                 "n_rejected": rejected.num_rows, "seconds": round(time.time() - t0, 3),
                 "config_hash": self.config_hash, **self.marker_extra(data)}
        self.out.write_marker(chunk_id, stats)
        return stats

    def marker_extra(self, data: pa.Table) -> dict[str, Any]:
        return {}


def run_stage(stage: str | Stage, cfg: PipelineConfig, tracker: Tracker | None = None) -> StageSummary:
    """Run (or resume, or find finished) any registered chunked stage. Raises ConfigError before any work
    when the setup is wrong; RuntimeError when counts do not reconcile."""
    from lardo_ray.stages.registry import get
    from lardo_ray.tracking import make_tracker

    st = get(stage) if isinstance(stage, str) else stage
    t0 = time.time()
    if (check := st.hook("check")) is not None:
        check(cfg)
    check_writable(cfg.stage_dir(st.name))
    upstream = st.upstream_of(cfg)
    plan = plan_input(cfg, st) if upstream is None else plan_upstream(cfg, upstream)
    config_hash = cfg.fingerprint(*st.sections)
    tracker = tracker or make_tracker(cfg)
    tracker.check_reachable()
    out = open_output(cfg, st.name, config_hash, plan.fingerprint, len(plan.chunk_ids), **plan.manifest)
    todo_hook = st.hook("todo")
    units = (todo_hook(out, plan, config_hash, cfg) if todo_hook else
             [plan.units[c] for c in pending(out, plan.chunk_ids, config_hash)])
    todo_rows = sum(plan.rows[u["chunk_id"]] for u in units)
    log.info("%s: %d chunks planned, %d already done", st.name, len(plan.chunk_ids), len(plan.chunk_ids) - len(units))
    with tracker.run(run_name=f"{cfg.run.name}/{st.name}", tags={"stage": st.name}):
        tracker.log_params(cfg.model_dump(mode="json"))
        tracker.log_text(dump_config(cfg), "config.yaml")
        prepare = st.hook("prepare")
        context = prepare(cfg, out, tracker) if prepare else {}
        execute = st.hook("execute")
        if execute is None or not execute(cfg, plan, out, units, context, config_hash):
            kwargs = {"stage": st.name, "config": cfg.model_dump(mode="json"), "stage_dir": out.uri,
                      "upstream_dir": plan.upstream.uri if plan.upstream else None, "config_hash": config_hash,
                      "context": context}
            from lardo_ray.stages.registry import load_ref

            run_pending(cfg, st.name, units, load_ref(st.worker), kwargs, st.resources_of(cfg),
                        [plan.rows[u["chunk_id"]] for u in units])
        if (after := st.hook("after")) is not None:
            after(cfg, out, plan.chunk_ids)
        summary = reconcile(out, st.name, plan.chunk_ids, plan.n_rows)
        summary.chunks_skipped = len(plan.chunk_ids) - len(units)
        summary.wall_seconds = time.time() - t0
        summary.mol_per_s = todo_rows / max(summary.wall_seconds, 1e-9)
        if (extra := st.hook("summary")) is not None:
            summary.extra.update(extra(cfg, out, plan.chunk_ids, context))
        tracker.log_metrics(summary.metrics())
        summary.not_logged = list(tracker.not_logged)
        summary.mlflow_run_id = tracker.run_id
    manifest = st.hook("manifest")
    finish(out, summary, config_hash, plan.fingerprint, plan.chunk_ids, **plan.manifest,
           **(manifest(cfg, context, summary) if manifest else {}))
    return summary
