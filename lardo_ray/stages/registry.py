"""The stage registry: the one list of what the pipeline can run, and in which order.

A ``Stage`` names its core (a table in, rows + rejected rows out; no Ray), the stage whose shards are its
units (None: the input file's chunks), the config sections that make up its fingerprint and its Ray
resources; optional hooks cover what one stage does beyond that (describe's stage 1, dsm's duplicates,
an extra summary). ``lardo_ray.stages.lifecycle.run_stage`` runs any of them. The CLI's subcommands, the
config's stage names, the pipeline's order and jobs/ are all read from here, so a new stage is a core
plus one ``register`` call.

Hooks and cores are "module:attribute" strings, imported when the stage runs: `lardo-ray --help` and the
config model import this module, and neither should pay for RDKit, torch or Ray.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lardo_ray import schema


def load_ref(ref: str) -> Any:
    module, _, attrs = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for attr in attrs.split("."):  # "module:Class.factory"
        obj = getattr(obj, attr)
    return obj


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    # "module:attr" of the core factory: factory(cfg, **context) -> core; core(table) -> (rows, rejected)
    core: str | None = None
    # the stage whose shards are this stage's units, or "module:fn" (cfg -> name) when config decides;
    # None: the input's chunks (input.path)
    upstream: str | None = None
    sections: tuple[str, ...] = ()
    resources: str = ""  # dotted config path of the stage's RayResources, e.g. "dsm.ray"
    columns: tuple[str, ...] | None = None  # upstream columns the core reads (missing optional ones skipped)
    # Hooks, all optional ("module:fn"):
    check: str | None = None  # (cfg) -> None, before any work: raise ConfigError naming the key
    prepare: str | None = None  # (cfg, out, tracker) -> context dict, inside the MLflow run (stage 1, a model)
    todo: str | None = None  # (out, plan, config_hash, cfg) -> units; default: chunks without a marker
    # (cfg, plan, out, units, context, config_hash) -> bool: True when it ran the units itself (describe's
    # vLLM waves), False for the default actor pool
    execute: str | None = None
    after: str | None = None  # (cfg, out, chunk_ids) -> None, before reconciling (dsm: duplicates)
    # (cfg, table, unit) -> table, on each upstream shard as read, before the core (featurize: dsm's descriptors)
    enrich: str | None = None
    summary: str | None = None  # (cfg, out, chunk_ids, context) -> dict of extra summary lines
    manifest: str | None = None  # (cfg, context, summary) -> dict of extra manifest keys
    worker: str = "lardo_ray.stages.lifecycle:ChunkWorker"
    # Stages that are not chunked (Ray Train, the fine-tune grid, the compare table) run this instead:
    run: str | None = None  # (cfg, pipeline_result) -> result with .lines()
    in_pipeline: bool = True  # part of `lardo-ray pipeline`'s default order

    @property
    def chunked(self) -> bool:
        return self.run is None

    def upstream_of(self, cfg: Any) -> str | None:
        if self.upstream and ":" in self.upstream:
            return str(load_ref(self.upstream)(cfg))
        return self.upstream

    def resources_of(self, cfg: Any) -> Any:
        node = cfg
        for part in self.resources.split("."):
            node = getattr(node, part)
        return node

    def hook(self, name: str) -> Callable[..., Any] | None:
        ref = getattr(self, name)
        return load_ref(ref) if ref else None


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.name in STAGES:
        raise ValueError(f"stage '{stage.name}' is registered twice")
    STAGES[stage.name] = stage
    return stage


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"no stage '{name}' (stages: {', '.join(STAGES)})") from None


def pipeline_order() -> tuple[str, ...]:
    return tuple(n for n, s in STAGES.items() if s.in_pipeline)


# ------------------------------------------------------------------ the registrations, in data-flow order

register(Stage(
    name="dsm",
    help="ingest + DSM: standardise molecules, assign mol_id, compute RDKit descriptors (Ray Data actor pool)",
    core="lardo_ray.stages.ingest_dsm:IngestDsm.from_config",
    sections=("input", "ingest", "dsm"), resources="dsm.ray",
    after="lardo_ray.stages.ingest_dsm:after_chunks",
    manifest="lardo_ray.stages.ingest_dsm:manifest_extra",
))
register(Stage(
    name="describe",
    help=("LarDo descriptions: stage 1 (LLM template, DSM-calibrated) + stage 2 (one per molecule); reads dsm/; "
          "backends rules, hf, vllm, openai"),
    core="lardo_ray.stages.describe:DescribeCore",
    upstream="dsm", sections=("describe",), resources="describe.ray",
    worker="lardo_ray.stages.describe:DescribeWorker",
    check="lardo_ray.stages.describe:check",
    prepare="lardo_ray.stages.describe:prepare",
    todo="lardo_ray.stages.describe:todo",
    execute="lardo_ray.stages.describe:execute",
    summary="lardo_ray.stages.describe:summary",
    manifest="lardo_ray.stages.describe:manifest_extra",
))
register(Stage(
    name="embed",
    help="frozen text encoder: one embedding per description (reads describe/, writes embed/)",
    core="lardo_ray.stages.embed:EmbedCore",
    upstream="describe", sections=("embed", "model"), resources="embed.ray",
    columns=(schema.MOL_ID, schema.CANONICAL_SMILES, schema.DESCRIPTION, schema.TEMPLATE_ID),
    summary="lardo_ray.stages.embed:summary",
))
register(Stage(
    name="featurize",
    help="SMILES -> OGB molecular graphs, the pre-training table (reads embed/ or describe/, writes featurize/)",
    core="lardo_ray.stages.featurize:FeaturizeCore",
    upstream="lardo_ray.stages.featurize:featurize_upstream", sections=("featurize",), resources="featurize.ray",
    enrich="lardo_ray.stages.featurize:with_dsm_targets", check="lardo_ray.stages.featurize:check",
    columns=(schema.MOL_ID, schema.CANONICAL_SMILES, schema.DESCRIPTION, schema.TEXT_EMBEDDING, schema.TEMPLATE_ID),
))
register(Stage(
    name="pretrain",
    help="graph-text contrastive pre-training on Ray Train (+ DeepSpeed); resumes from its checkpoints",
    upstream="featurize", run="lardo_ray.stages.pretrain:run_in_pipeline",
))
register(Stage(
    name="finetune",
    help="fine-tune and evaluate on a MoleculeNet task (scaffold split, seeds as Ray tasks, MLflow runs)",
    run="lardo_ray.stages.pipeline:finetune_in_pipeline",
))
register(Stage(
    name="compare",
    help="read fine-tune runs from MLflow: dataset x method table (mean ± std), CSV, Markdown, PNG bar chart",
    run="lardo_ray.stages.pipeline:compare_in_pipeline",
))
def _apply_model_stage(name: str, help: str) -> Stage:
    """predict and encode: one input-chunked stage over a saved model, told apart by their config section."""
    mod = "lardo_ray.stages.predict"
    return Stage(name=name, help=help, core=f"{mod}:{name}_core", sections=("input", name), resources=f"{name}.ray",
                 check=f"{mod}:check_{name}", prepare=f"{mod}:prepare_{name}", summary=f"{mod}:summary",
                 manifest=f"{mod}:manifest_extra", in_pipeline=False)


register(_apply_model_stage(
    "predict", "apply a fine-tuned model (models:/NAME/VERSION, runs:/..., a directory) to any molecules: one "
    "pred_<target> (+ _std over the seed ensemble) per target; resumable"))
register(_apply_model_stage(
    "encode", "a model's graph embeddings (fixed-size float32) for any molecules, for your own models and "
    "similarity search; resumable"))
