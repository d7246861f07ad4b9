"""Stage describe: stage 1 once per task (the template), stage 2 once per molecule, on Ray.

Stage 1 runs in one Ray task with the stage's resources (so an LLM that needs a GPU gets one), is cached
by (card, model, prompt set) under ``<out>/describe/templates`` and logged to MLflow. Stage 2 reads the
DSM shards one to one: the rules, hf and openai backends run in an actor pool (one backend per actor);
the vllm backend runs on Ray Data LLM actor pools in waves of shards (lardo_ray.stages.vllm), each
wave written and marked as a whole. Failed generations stay in the output with their error; a re-run
retries only those rows and skips everything else.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lardo_ray import schema
from lardo_ray.config import PipelineConfig
from lardo_ray.io import StageOutput
from lardo_ray.stages.lifecycle import ChunkWorker, Plan, StageSummary, run_stage

if TYPE_CHECKING:
    from lardo_ray.llm.stage1 import Template
    from lardo_ray.tracking import Tracker

log = logging.getLogger("lardo_ray")
STAGE = "describe"
ERROR = "error"
USE_LLM = "use_llm"
# Rows per call of the stage-2 core: its per-row Python objects (prompt, values, records) cost ~25 KB a
# row, so a whole 20k-row shard at once held ~0.5 GiB per actor; slices keep that flat at no speed cost.
SLICE_ROWS = 2048


def _empty_rejected() -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in
                     (schema.MOL_ID, schema.INPUT_SMILES, schema.REJECT_REASON, schema.REJECT_DETAIL, schema.STAGE)})


def _template_task(describe_cfg: dict[str, Any]) -> str:
    """Stage 1 (runs as a Ray task, or in-process): the template as JSON."""
    from lardo_ray.llm.backends.base import create_backend
    from lardo_ray.llm.describe import resolve_template
    from lardo_ray.llm.settings import DescribeConfig

    cfg = DescribeConfig.model_validate(describe_cfg)
    backend = None if cfg.backend == "rules" or cfg.variant == "no_stage1" or cfg.template_path else create_backend(cfg)
    try:
        return resolve_template(cfg, backend=backend).model_dump_json()
    finally:
        if backend is not None:
            backend.close()


def describe_stage1(cfg: PipelineConfig) -> Template:
    """The run's template (stage 1), computed once per task and cached."""
    import ray

    from lardo_ray.llm.stage1 import Template

    dcfg = cfg.describe.model_copy()
    if dcfg.template_cache_dir is None:
        dcfg.template_cache_dir = f"{cfg.stage_dir(STAGE)}/templates"
    needs_llm = not (dcfg.backend == "rules" or dcfg.variant == "no_stage1" or dcfg.template_path)
    payload = dcfg.model_dump(mode="json")
    if needs_llm:
        res = cfg.describe.ray
        task = ray.remote(_template_task).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                                  resources=dict(res.resources) or None)
        text = ray.get(task.remote(payload))
    else:
        text = _template_task(payload)
    return Template.model_validate_json(text)


class DescribeCore:
    """Stage 2 that loads the LLM only when a batch has rows routed to it: with a small
    ``describe.llm_slice`` most actors never need the model and never pay for loading it."""

    def __init__(self, cfg: PipelineConfig, template_json: str):
        from lardo_ray.llm.backends.rules import RulesBackend
        from lardo_ray.llm.describe import DescribeStage2
        from lardo_ray.llm.stage1 import Template

        self.cfg = cfg.describe
        self.template = Template.model_validate_json(template_json)
        self.rules_only = DescribeStage2(self.cfg, self.template, backend=RulesBackend.from_config(self.cfg))
        self.with_llm: DescribeStage2 | None = None

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows <= SLICE_ROWS:
            return self._describe(table)
        return pa.concat_tables([self._describe(table.slice(i, SLICE_ROWS))
                                 for i in range(0, table.num_rows, SLICE_ROWS)])

    def _describe(self, table: pa.Table) -> pa.Table:
        from lardo_ray.llm.describe import DescribeStage2

        no_llm_rows = USE_LLM in table.column_names and not any(table.column(USE_LLM).to_pylist())
        if self.cfg.backend == "rules" or no_llm_rows:
            return self.rules_only(table)
        if self.with_llm is None:
            self.with_llm = DescribeStage2(self.cfg, self.template)
        return self.with_llm(table)


class DescribeWorker(ChunkWorker):
    """One backend per actor. Failed generations are rows with their error, not rejections; a chunk already
    written is re-run only for its failed rows."""

    def process(self, unit: dict[str, Any]) -> dict[str, Any]:
        t0 = time.time()
        chunk_id = unit["chunk_id"]
        table = self.read(unit)
        if self.cfg.describe.llm_slice is not None:
            start = int(unit["row_offset"])
            flags = [start + i < self.cfg.describe.llm_slice for i in range(table.num_rows)]
            table = table.append_column(USE_LLM, pa.array(flags, pa.bool_()))
        if unit.get("retry_failed"):
            data = self._retry_failed(chunk_id, table)
        else:
            data = self.core(table)
        if USE_LLM in data.column_names:
            data = data.drop_columns([USE_LLM])
        if table.num_rows != data.num_rows:
            raise RuntimeError(f"describe chunk {chunk_id}: {table.num_rows} read != {data.num_rows} written")
        self.out.write_table_atomic(self.out.rejected_path(chunk_id), _empty_rejected())
        self.out.write_table_atomic(self.out.data_path(chunk_id), data)
        n_failed = data.num_rows - int(pc.sum(pc.is_null(data.column(ERROR))).as_py() or 0)
        stats = {"chunk_id": chunk_id, "n_read": table.num_rows, "n_written": data.num_rows, "n_rejected": 0,
                 "n_failed": n_failed, "seconds": round(time.time() - t0, 3), "config_hash": self.config_hash}
        self.out.write_marker(chunk_id, stats)
        return stats

    def _retry_failed(self, chunk_id: str, table: pa.Table) -> pa.Table:
        old = pq.read_table(self.out.data_path(chunk_id), filesystem=self.out.fs)
        failed = pc.invert(pc.is_null(old.column(ERROR)))
        failed_ids = set(old.filter(failed).column(schema.MOL_ID).to_pylist())
        todo = table.filter(pa.array([m in failed_ids for m in table.column(schema.MOL_ID).to_pylist()]))
        redone = self.core(todo)
        by_id = {r[schema.MOL_ID]: r for r in redone.to_pylist()}
        rows = [by_id.get(r[schema.MOL_ID], r) if r[schema.MOL_ID] in failed_ids else r for r in old.to_pylist()]
        return pa.Table.from_pylist(rows, schema=old.schema)


def _quality(out: StageOutput, chunk_ids: list[str]) -> dict[str, Any]:
    """The hallucination rate of the LLM-written rows, measured BEFORE any correction (the headline: what the
    LLM wrote), overall and per claim type; what the correction rewrote, apart; undecidable claims apart. The
    rules writer cannot hallucinate: counting its claims would only dilute the rate."""
    import json

    base = ["n_claims", "n_wrong", "n_claims_before", "n_wrong_before", ERROR, "backend", "completion_tokens"]
    newer = ["n_corrected", "n_undecidable_before", "claims_by_kind"]  # absent in shards written before them
    keys = ("n_claims", "n_wrong", "n_claims_before", "n_wrong_before", "completion_tokens", "n_corrected",
            "n_undecidable_before")
    tot = dict.fromkeys(keys, 0)
    kinds: dict[str, list[int]] = {}
    n_failed = n_llm = 0
    for c in chunk_ids:
        path = out.data_path(c)
        names = set(pq.read_schema(path, filesystem=out.fs).names)
        cols = base + [k for k in newer if k in names]
        t = pq.read_table(path, columns=cols, filesystem=out.fs)
        n_failed += t.num_rows - int(pc.sum(pc.is_null(t.column(ERROR))).as_py() or 0)
        llm = t.filter(pc.not_equal(t.column("backend"), "rules"))
        n_llm += llm.num_rows
        for k in keys:
            if k in llm.column_names:
                tot[k] += int(pc.sum(llm.column(k)).as_py() or 0)
        if "claims_by_kind" in llm.column_names:
            for js in llm.column("claims_by_kind").to_pylist():
                for kind, (n, w, u) in (json.loads(js) if js else {}).items():
                    row = kinds.setdefault(kind, [0, 0, 0])
                    row[0] += n
                    row[1] += w
                    row[2] += u
    before = tot["n_wrong_before"] / tot["n_claims_before"] if tot["n_claims_before"] else 0.0
    by_kind = ", ".join(f"{k} {w}/{n}" + (f" (+{u} undecidable)" if u else "")
                        for k, (n, w, u) in sorted(kinds.items(), key=lambda kv: -kv[1][0]))
    out_ = {
        "failed": n_failed,
        "llm_rows": n_llm,
        "hallucination": (f"{before:.1%} of {tot['n_claims_before']:,} checked claims wrong as the LLM wrote them"
                          + (f" ({tot['n_undecidable_before']:,} more undecidable)" if tot["n_undecidable_before"]
                             else "") + " (LLM-written rows)"),
        "halluc_before": round(before, 4),
        "corrected": (f"{tot['n_corrected']:,} claims rewritten by the post-check; {tot['n_wrong']:,} wrong claims "
                      "left that no rewrite can fix (groups, classes)"),
        "gen_tokens": tot["completion_tokens"],
    }
    if by_kind:
        out_["by_type"] = by_kind + " wrong/checked"
    for k, (n, w, _u) in kinds.items():
        out_[f"halluc_{k}"] = round(w / n, 4) if n else 0.0
    return out_


# ---------------------------------------------------------------- the stage's hooks (registry: "describe")


def check(cfg: PipelineConfig) -> None:
    if cfg.describe.backend == "openai":
        from lardo_ray.llm.backends.base import create_backend

        # building it asks the endpoint (OpenAIBackend.check): an unreachable one fails here, before any work
        create_backend(cfg.describe).close()


def prepare(cfg: PipelineConfig, out: StageOutput, tracker: Tracker) -> dict[str, Any]:
    """Stage 1, once per task: the template every worker gets, saved beside the output and in MLflow."""
    from lardo_ray.execution import init_ray

    init_ray(cfg.run.ray_address, cfg.run.ray_num_cpus, cfg.run.ray_dashboard)
    template = describe_stage1(cfg)
    template_json = template.model_dump_json(indent=2)
    with out.fs.open_output_stream(f"{out.path}/template.json") as f:
        f.write(template_json.encode())
    tracker.log_text(template_json, f"templates/{template.template_id}.json")
    tracker.set_tags({"lardo.template_id": template.template_id})
    return {"template_json": template_json}


def todo(out: StageOutput, plan: Plan, config_hash: str, cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Chunks without a marker, plus (describe.retry_failed) finished ones that hold failed generations."""
    markers = out.read_markers()
    done = {k for k, v in markers.items() if v.get("config_hash") == config_hash}
    retry = {k for k in done if markers[k].get("n_failed", 0) > 0} if cfg.describe.retry_failed else set()
    return [{**plan.units[c], "retry_failed": c in retry} for c in plan.chunk_ids if c not in done or c in retry]


def execute(cfg: PipelineConfig, plan: Plan, out: StageOutput, units: list[dict[str, Any]], context: dict[str, Any],
            config_hash: str) -> bool:
    """The vllm backend runs on Ray Data LLM actor pools in waves of shards; the others on the actor pool."""
    if cfg.describe.backend != "vllm":
        return False
    from lardo_ray.llm.stage1 import Template
    from lardo_ray.stages.vllm import run_vllm_waves

    assert plan.upstream is not None  # describe is registered with upstream "dsm"
    run_vllm_waves(cfg, plan.upstream, out, units, Template.model_validate_json(context["template_json"]),
                   config_hash)
    return True


def summary(cfg: PipelineConfig, out: StageOutput, chunk_ids: list[str], context: dict[str, Any]) -> dict[str, Any]:
    from lardo_ray.llm.stage1 import Template

    template = Template.model_validate_json(context["template_json"])
    kept = ", ".join(p.property for p in template.properties)
    extra: dict[str, Any] = {"template": f"{template.template_id} ({template.source}; {kept})"[:300]}
    if template.fallback_reason and cfg.describe.backend != "rules":
        # the LLM's stage-1 answer was unusable: the card's own properties stand in, and the user is told why
        extra["stage1"] = ("the LLM's answer was not used, the card's default properties were: "
                           f"{template.fallback_reason}")[:300]
    if template.dropped:
        extra["dropped"] = ", ".join(f"{d.property} ({d.reason})" for d in template.dropped)[:300]
    extra.update(_quality(out, chunk_ids))
    return extra


def manifest_extra(cfg: PipelineConfig, context: dict[str, Any], summary: StageSummary) -> dict[str, Any]:
    from lardo_ray.llm.stage1 import Template

    return {"template_id": Template.model_validate_json(context["template_json"]).template_id,
            "quality": dict(summary.extra)}


def run_describe(cfg: PipelineConfig, tracker: Tracker | None = None) -> StageSummary:
    return run_stage("describe", cfg, tracker)
