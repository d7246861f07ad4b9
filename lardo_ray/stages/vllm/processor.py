"""The ``vllm`` backend on a cluster: stage 2 as a Ray Data pipeline around ``ray.data.llm`` vLLM actor pools.

    out = describe_dataset_vllm(ds, cfg, template, carry=["chunk_id"])

Three steps, all streaming:

1. ``_Prepare`` (small actor pool, ``map_batches``): ``DescribeStage2.prepare`` on each batch (descriptors the
   batch lacks are computed, prompts built). Rows that do not go to the LLM are settled here: rules rows
   (``llm_slice`` / ``use_llm``) get their rules description, failed rows (bad SMILES) their error, prompts
   longer than ``max_model_len`` a "prompt too long" error. LLM rows get ``tokenized_prompt``: the model's
   chat template (or ``render_plain``) tokenised without extra special tokens, exactly as the in-process
   ``VLLMBackend`` does. Everything ``finish`` needs later travels in one pickled payload column.
2. The ``ray.data.llm`` processor (``vLLMEngineProcessorConfig`` + ``build_processor``): only its vLLM engine
   stage (chat-template, tokenize and detokenize stages are off: the prompt is already tokenised, the engine
   detokenises). Rows settled in step 1 carry ``__inference_error__ = SKIP``, which makes the processor pass
   them through without touching the engine; ``should_continue_on_error`` turns an engine error on one row into
   an error on that row. CPU vLLM (``cfg.vllm.gpu = False``) is selected by
   ``placement_group_config={"bundles": [{"CPU": 1}]}`` (without it the engine waits for a GPU forever).
3. ``_Finish`` (small actor pool): ``DescribeStage2.finish`` (post-check, correction) -> ``OUTPUT_SCHEMA`` rows
   plus the carried input columns.

``timing=True`` adds each engine request's submit/done wall-clock times (from vLLM's request metrics) to the
output, for ``bench/describe.py``.

Rows come back in a different order than they went in: every row carries its own identity (``mol_id`` and
the payload), nothing is joined by position. ``postcheck = "regenerate"`` is run as ``"correct"`` here (a
second engine pass per batch would need a second engine pool); the output's cache keys say ``correct``.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from lardo_ray.llm.backends.base import DescribeRecord, Generation, LLMBackend, Messages
from lardo_ray.llm.backends.vllm import (
    PromptRenderer,
    engine_kwargs,
    engine_prompt,
    resolve_vllm_model,
    vllm_sampling_dict,
)
from lardo_ray.llm.describe import DescribeStage2, Prepared
from lardo_ray.llm.settings import DescribeConfig, SamplingParams
from lardo_ray.llm.stage1 import Template
from lardo_ray.schema import CANONICAL_SMILES

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

SKIP = "lardo:settled-before-the-engine"  # __inference_error__ value that makes ray.data.llm bypass a row
INFERENCE_ERROR = "__inference_error__"
PAYLOAD = "__lardo_payload"
TEXT, PTOK, CTOK, LATENCY = "__lardo_text", "__lardo_prompt_tokens", "__lardo_completion_tokens", "__lardo_latency"
TO_ENGINE = "__lardo_to_engine"
SUBMITTED_AT, DONE_AT = "__lardo_submitted_at", "__lardo_done_at"
TIMING_COLUMNS = ("engine_submitted_at", "engine_done_at")  # optional output columns (``timing=True``)

# Env vars handed to the engine actors when set on the driver (CPU KV cache size, offline hub, ...).
PASS_ENV_PREFIXES = ("VLLM_", "HF_", "TRANSFORMERS_", "HUGGING_FACE_", "OMP_NUM_THREADS", "TOKENIZERS_")


class RayDataVLLMEngine(LLMBackend):
    """Stand-in backend of the pipeline's prepare/finish actors: names the rows (backend ``vllm``, the model)
    while the engine runs elsewhere (the Ray Data LLM processor)."""

    name = "vllm"

    @classmethod
    def from_config(cls, cfg: DescribeConfig) -> "RayDataVLLMEngine":
        return cls(cfg.model_name)

    def generate(self, prompts: list[Messages], sampling: SamplingParams) -> list[Generation]:
        return [Generation.failed("the Ray Data vLLM pipeline generates in its engine stage") for _ in prompts]


def _pipeline_cfg(cfg: DescribeConfig) -> DescribeConfig:
    if cfg.postcheck == "regenerate":
        log.warning("describe.postcheck 'regenerate' runs as 'correct' on the Ray Data vLLM pipeline")
        return cfg.model_copy(update={"postcheck": "correct"})
    return cfg


def _carried_names(batch: pa.Table, cfg: DescribeConfig, carry: Sequence[str]) -> list[str]:
    from lardo_ray.chem.descriptors import registry
    from lardo_ray.llm.describe import OUTPUT_COLUMNS, USE_LLM

    if cfg.carry_input_columns:
        reg, skip = registry(), set(OUTPUT_COLUMNS) | {USE_LLM}
        names = [n for n in batch.column_names if n not in skip and n not in reg]
    else:
        names = []
    return names + [c for c in carry if c in batch.column_names and c not in names]


class _Prepare:
    """Step 1: prompts and token ids for the LLM rows; every other row settled (see module doc)."""

    def __init__(self, cfg: DescribeConfig, template: Template, carry: Sequence[str]):
        self.cfg = cfg
        self.carry = list(carry)
        self.stage = DescribeStage2(cfg, template, RayDataVLLMEngine(cfg.model_name))
        self.renderer = PromptRenderer(cfg.model_name)
        self.max_len = cfg.vllm.max_model_len

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        if n == 0:
            return pa.table({PAYLOAD: pa.array([], pa.binary()), TO_ENGINE: pa.array([], pa.bool_()),
                             "tokenized_prompt": pa.array([], pa.list_(pa.int64()))})
        stage = self.stage
        prepared = stage.prepare(batch)
        gens: dict[int, Generation] = {}
        prompts: list[list[int]] = [[] for _ in range(n)]
        to_engine = [False] * n
        rule_rows: list[int] = []
        rule_records: list[DescribeRecord] = []
        for i, rec in enumerate(prepared.records):
            if rec is None:
                continue
            if not prepared.use_llm[i]:
                rule_rows.append(i)
                rule_records.append(rec)
                continue
            ids = engine_prompt(self.renderer, rec.messages, self.max_len)
            if isinstance(ids, Generation):
                gens[i] = ids
                continue
            prompts[i], to_engine[i] = ids, True
        if rule_rows:
            out = stage._safe_describe(stage.rules, rule_records)
            gens.update(zip(rule_rows, out))

        names = _carried_names(batch, self.cfg, self.carry)
        cols = {name: batch.column(name).to_pylist() for name in names}
        schema = pa.schema([batch.schema.field(name) for name in names])
        payloads = []
        for i in range(n):
            g = gens.get(i)
            payloads.append(pickle.dumps({
                "cols": {name: cols[name][i] for name in names},
                "schema": schema,  # in every row: rows are re-batched downstream
                "values": prepared.values[i],
                "error": prepared.errors[i],
                "has_record": prepared.records[i] is not None,
                "use_llm": prepared.use_llm[i],
                "id": prepared.extra["ids"][i],
                "smiles": prepared.extra["smiles"][i],
                "gen": None if g is None else (g.text, g.prompt_tokens, g.completion_tokens, g.latency_s, g.error),
            }, protocol=pickle.HIGHEST_PROTOCOL))
        return pa.table({
            PAYLOAD: pa.array(payloads, pa.binary()),
            TO_ENGINE: pa.array(to_engine, pa.bool_()),
            "tokenized_prompt": pa.array(prompts, pa.list_(pa.int64())),
        })


class _Finish:
    """Step 3: engine outputs + payloads -> ``DescribeStage2.finish`` -> OUTPUT_SCHEMA rows (+ carried columns)."""

    def __init__(self, cfg: DescribeConfig, template: Template, carry: Sequence[str], timing: bool = False):
        self.cfg = cfg
        self.carry = list(carry)
        self.timing = timing
        self.stage = DescribeStage2(cfg, template, RayDataVLLMEngine(cfg.model_name))

    @staticmethod
    def _col(batch: pa.Table, name: str) -> list[Any]:
        return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        from lardo_ray.llm.describe import OUTPUT_SCHEMA

        n = batch.num_rows
        if n == 0:
            return OUTPUT_SCHEMA.empty_table()
        payloads = [pickle.loads(p) for p in self._col(batch, PAYLOAD)]
        errs, texts = self._col(batch, INFERENCE_ERROR), self._col(batch, TEXT)
        ptoks, ctoks, lats = self._col(batch, PTOK), self._col(batch, CTOK), self._col(batch, LATENCY)
        tpl = self.stage.template
        gens: dict[int, Generation] = {}
        records: list[DescribeRecord | None] = []
        for i, p in enumerate(payloads):
            records.append(DescribeRecord(smiles=p["smiles"], messages=[], values=p["values"], template=tpl,
                                          mol_id=p["id"]) if p["has_record"] else None)
            err = errs[i] or ""
            if err == SKIP:
                if p["gen"] is not None:
                    gens[i] = Generation(*p["gen"])
            elif err:
                gens[i] = Generation.failed(f"vllm engine error: {err[:300]}")
            else:
                text = (texts[i] or "").strip()
                lat = lats[i] if lats[i] is not None and lats[i] >= 0 else 0.0
                gens[i] = Generation(text or None, int(ptoks[i] or 0), int(ctoks[i] or 0), float(lat),
                                     error=None if text else "empty completion")
        prepared = Prepared(
            records=records, values=[p["values"] for p in payloads], errors=[p["error"] for p in payloads],
            use_llm=[p["use_llm"] for p in payloads],
            extra={"ids": [p["id"] for p in payloads], "smiles": [p["smiles"] for p in payloads]},
        )
        inputs = _input_table(payloads)
        out = self.stage.finish(inputs, prepared, gens)
        if not self.cfg.carry_input_columns:  # finish carried nothing: add the ``carry`` columns
            for name in self.carry:
                if name in inputs.column_names and name not in out.column_names:
                    out = out.append_column(inputs.schema.field(name), inputs.column(name))
        if self.timing:  # wall-clock window of each engine request (None for rows that skipped the engine)
            sub, done = self._col(batch, SUBMITTED_AT), self._col(batch, DONE_AT)
            engine = [(errs[i] or "") == "" and done[i] is not None for i in range(n)]
            out = out.append_column(TIMING_COLUMNS[0], pa.array(
                [sub[i] if engine[i] else None for i in range(n)], pa.float64()))
            out = out.append_column(TIMING_COLUMNS[1], pa.array(
                [done[i] if engine[i] else None for i in range(n)], pa.float64()))
        return out


def _input_table(payloads: list[dict[str, Any]]) -> pa.Table:
    """The carried input columns of a batch, rebuilt from the payloads with their original Arrow types."""
    schema = next((p["schema"] for p in payloads if p["schema"] is not None), None)
    names: list[str] = []
    for p in payloads:
        names.extend(k for k in p["cols"] if k not in names)
    arrays, fields = [], []
    for name in names:
        values = [p["cols"].get(name) for p in payloads]
        field = schema.field(name) if schema is not None and name in schema.names else None
        try:
            arr = pa.array(values, type=field.type if field is not None else None)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = pa.array(values)  # payloads from input batches with different schemas
            field = None
        arrays.append(arr)
        fields.append(field if field is not None else pa.field(name, arr.type))
    if CANONICAL_SMILES not in names:  # a column the output never carries: keeps num_rows right
        arrays.append(pa.array([p["smiles"] for p in payloads], pa.string()))
        fields.append(pa.field(CANONICAL_SMILES, pa.string()))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _engine_window(row: dict[str, Any], latency: float) -> tuple[float, float]:
    """(submitted, done) epoch seconds of one request: vLLM's request metrics when present, else now - latency."""
    m = row.get("metrics") or {}
    try:
        arrival, queued, last = (float(m[k]) for k in ("arrival_time", "queued_ts", "last_token_ts"))
        return arrival, arrival + max(last - queued, 0.0)
    except (KeyError, TypeError, ValueError):
        now = time.time()
        return now - latency, now


def _postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """Engine rows -> the few fields step 3 reads (rows settled in step 1 bypass this)."""
    latency = float(row.get("time_taken_llm") or 0.0)
    submitted, done = _engine_window(row, latency)
    return {
        PAYLOAD: row[PAYLOAD],
        TEXT: row.get("generated_text") or "",
        PTOK: int(row.get("num_input_tokens") or 0),
        CTOK: int(row.get("num_generated_tokens") or 0),
        LATENCY: latency,
        SUBMITTED_AT: submitted,
        DONE_AT: done,
    }


def runtime_env(cfg: DescribeConfig, env: dict[str, str] | None = None) -> dict[str, Any]:
    """env_vars for the engine actors: VLLM_*/HF_* vars of the driver, CPU defaults, then ``env``."""
    from lardo_ray.llm.backends.vllm import cpu_env

    env_vars = {k: v for k, v in os.environ.items() if k.startswith(PASS_ENV_PREFIXES)}
    for k, v in cpu_env(cfg).items():  # engine in the actor (starts in seconds), a KV cache that fits
        env_vars.setdefault(k, v)
    if "LARDO_MODEL_CACHE" in os.environ:
        env_vars.setdefault("LARDO_MODEL_CACHE", os.environ["LARDO_MODEL_CACHE"])
    env_vars.update(env or {})
    return {"env_vars": env_vars}


def _ray_serve_importable() -> bool:
    try:
        from ray import serve  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a missing dependency of ray.serve
        return False
    return True


def processor_config(cfg: DescribeConfig, env: dict[str, str] | None = None) -> Any:
    """The ``vLLMEngineProcessorConfig`` of the describe config (engine stage only; see module doc)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    v = cfg.vllm
    kw: dict[str, Any] = dict(
        model_source=resolve_vllm_model(cfg.model_name),
        engine_kwargs=engine_kwargs(cfg),
        batch_size=v.batch_size,
        concurrency=v.concurrency,
        runtime_env=runtime_env(cfg, env),
        should_continue_on_error=True,
        chat_template_stage=False,  # prompts arrive tokenised (step 1)
        tokenize_stage=False,
        detokenize_stage=False,  # the engine returns the text
        # vLLM's Ray metrics logger imports ray.serve (the ray[serve] extra): export metrics only where it loads
        log_engine_metrics=_ray_serve_importable(),
    )
    if not v.gpu:  # leave accelerator_type unset on CPU
        kw["placement_group_config"] = {"bundles": [{"CPU": 1}] * v.tensor_parallel_size}
    elif cfg.ray.accelerator_type:
        kw["accelerator_type"] = cfg.ray.accelerator_type
    return vLLMEngineProcessorConfig(**kw)


class _Preprocess:
    """Row preprocess of the processor: engine rows get their sampling parameters, settled rows the SKIP mark
    (``ray.data.llm`` then passes them through every stage and the postprocess untouched)."""

    def __init__(self, sampling: dict[str, Any]):
        self.sampling = sampling

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        # Settled rows carry the same sampling parameters (unused): a column that is null in most rows comes
        # back from Ray Data's blocks with its integers as floats, and vLLM's engine core then rejects
        # max_tokens=64.0 in its input thread, which dies and leaves the engine waiting forever.
        return {"sampling_params": dict(self.sampling), INFERENCE_ERROR: "" if row[TO_ENGINE] else SKIP}


def engine_processor(cfg: DescribeConfig, env: dict[str, str] | None = None, num_cpus: float = 0.25) -> Any:
    """Step 2: the ``ray.data.llm`` processor (vLLM engine stage) over the prepare step's rows."""
    from ray.data.llm import build_processor

    per_request = cfg.vllm.gpu if cfg.vllm.per_request_seed is None else cfg.vllm.per_request_seed
    processor = build_processor(
        processor_config(cfg, env),
        preprocess=_Preprocess(vllm_sampling_dict(cfg.sampling.for_stage(2), per_request_seed=per_request)),
        postprocess=_postprocess, preprocess_map_kwargs={"num_cpus": num_cpus},
        postprocess_map_kwargs={"num_cpus": num_cpus},
    )
    bound_engine_restarts(processor, cfg.vllm.max_engine_restarts)
    return processor


def bound_engine_restarts(processor: Any, max_restarts: int) -> None:
    """ray.data.llm leaves the engine stage's actors at Ray Data's default ``max_restarts=-1`` and exits a
    replica whose engine died (``os._exit``) so that it restarts: an engine that dies the same way each time
    would restart forever and the job never end. Bound it; the stage then fails with the engine's error."""
    for stage in processor.stages.values():
        if type(stage).__name__ == "vLLMEngineStage":
            stage.map_batches_kwargs["max_restarts"] = int(max_restarts)


def describe_dataset_vllm(
    ds: ray.data.Dataset,
    cfg: DescribeConfig,
    template: Template | None,
    carry: Sequence[str] = (),
    num_cpus: float = 0.25,
    concurrency: int | None = None,
    env: dict[str, str] | None = None,
    batch_rows: int | None = None,
    timing: bool = False,
) -> ray.data.Dataset:
    """Stage 2 with the vllm backend on Ray Data LLM: DSM rows in, ``OUTPUT_SCHEMA`` rows (+ carried input
    columns, ``carry`` always) out, in no particular order. Lazy: nothing runs until the dataset is consumed.

    ``num_cpus``/``concurrency``: resources of the light prepare/finish actor pools and of the processor's
    row maps (default: up to one actor per engine replica; one when ``llm_slice`` is set, so the slice is
    counted once). ``env``: extra env vars for the engine actors. The engine actors take what
    ``cfg.vllm`` says (a GPU each, or on CPU one CPU bundle per tensor-parallel rank). ``batch_rows``: rows per
    prepare/finish batch (default ``max(cfg.vllm.batch_size, 64)``). ``timing``: add ``engine_submitted_at`` /
    ``engine_done_at`` (epoch seconds; None for rows that skipped the engine) for benchmarks.
    """
    import ray

    from lardo_ray.llm.stage1 import generic_template

    cfg = _pipeline_cfg(cfg)
    if template is None:
        if cfg.variant != "no_stage1":
            raise ValueError("describe_dataset_vllm needs a template (stage 1) unless variant == 'no_stage1'")
        template = generic_template(cfg.prompt_set)
    if concurrency is None:
        concurrency = 1 if cfg.llm_slice is not None else max(1, cfg.vllm.concurrency)
    args = (cfg, template, list(carry))
    batch_size = batch_rows or max(cfg.vllm.batch_size, 64)  # whole engine batches per prepare batch
    prepared = ds.map_batches(
        _Prepare, fn_constructor_args=args, batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=concurrency),
    )
    generated = engine_processor(cfg, env, num_cpus)(prepared)
    described: ray.data.Dataset = generated.map_batches(
        _Finish, fn_constructor_args=(*args, timing), batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=concurrency),
    )
    return described


__all__ = ["describe_dataset_vllm", "engine_processor", "processor_config", "runtime_env", "RayDataVLLMEngine",
           "SKIP"]
