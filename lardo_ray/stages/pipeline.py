"""The whole pipeline: dsm -> describe -> embed -> featurize -> pretrain -> finetune -> compare.

Each stage reads the previous stage's output and resumes on its own (finished chunks, checkpoints and
seeds are skipped), so re-running a killed pipeline picks up where it stopped. One MLflow parent run
holds a child run per stage. Fine-tuning compares the pre-trained encoder with a random-init one on the
same splits, and the compare table ends the run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lardo_ray.config import PipelineConfig, dump_config

if TYPE_CHECKING:
    from lardo_ray.stages.compare import CompareResult
    from lardo_ray.stages.finetune_results import GridResult
    from lardo_ray.stages.lifecycle import StageSummary

log = logging.getLogger("lardo_ray")


@dataclass
class PipelineResult:
    output_dir: str
    stages: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    compare_markdown: str | None = None
    compare_files: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    predictions: list[str] = field(default_factory=list)  # the predict step's table (pipeline.predict_input)
    errors: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        return [line for res in self.stages.values() if hasattr(res, "failures") for line in res.failures()] + \
            self.errors

    def lines(self) -> list[str]:
        out = ["== pipeline summary ==", f"  outputs     {self.output_dir}/<stage>/"]
        for name, secs in self.seconds.items():
            out.append(f"  {name:<11s} {secs:7.1f} s")
        out.append(f"  total       {sum(self.seconds.values()):7.1f} s")
        if self.compare_files:
            out.append("  compare     " + ", ".join(self.compare_files))
        return out


def _banner(i: int, n: int, stage: str, enabled: bool) -> None:
    if enabled:
        print(f"\n=== [{i}/{n}] {stage} ===", flush=True)


def _show(result: Any, enabled: bool) -> None:
    if enabled and hasattr(result, "lines"):
        print("\n".join(result.lines()), flush=True)


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    from lardo_ray.stages.compare import resolved_compare_config
    from lardo_ray.io import check_writable
    from lardo_ray.tracking import make_tracker

    stages = [s for s in cfg.pipeline.stages if not (s == "embed" and not cfg.model.freeze_text)]
    check_writable(cfg.run.output_dir)
    if "compare" in stages:
        resolved_compare_config(cfg)
    tracker = make_tracker(cfg)
    tracker.check_reachable()
    result = PipelineResult(output_dir=cfg.run.output_dir)
    show = cfg.run.progress
    with tracker.run(run_name=f"{cfg.run.name}/pipeline", tags={"stage": "pipeline"}):
        result.mlflow_run_id = tracker.run_id
        tracker.log_params(cfg.model_dump(mode="json"))
        tracker.log_text(dump_config(cfg), "config.yaml")
        for i, stage in enumerate(stages, 1):
            _banner(i, len(stages), stage, show)
            t0 = time.time()
            res = _run_stage(stage, cfg, result)
            result.seconds[stage] = time.time() - t0
            result.stages[stage] = res
            _show(res, show)
            tracker.log_metrics({f"seconds.{stage}": result.seconds[stage]})
        if cfg.pipeline.predict_input and "finetune" in result.stages:
            _banner(len(stages) + 1, len(stages) + 1, "predict", show)
            t0 = time.time()
            res = predict_with_registered(cfg, result)
            result.seconds["predict"] = time.time() - t0
            if res is not None:
                result.stages["predict"] = res
                _show(res, show)
                result.predictions = _prediction_lines(res)
                if show:
                    print("\n".join(result.predictions), flush=True)
        tracker.log_metrics({"seconds.total": sum(result.seconds.values())})
        if "compare" in result.stages:
            c = result.stages["compare"]
            result.compare_markdown = c.markdown
            result.compare_files = [p for p in (c.csv_path, c.markdown_path, c.png_path) if p]
            for p in c.local_files:
                tracker.log_artifact(p, "compare")
    return result


def _run_stage(stage: str, cfg: PipelineConfig, result: PipelineResult) -> Any:
    """A chunked stage's StageSummary, else whatever the stage's run hook returns (a result with .lines())."""
    from lardo_ray.stages.lifecycle import run_stage
    from lardo_ray.stages.registry import get, load_ref

    st = get(stage)
    if st.run is None:  # what Stage.chunked means
        return run_stage(st, cfg)
    return load_ref(st.run)(cfg, result)


def finetune_in_pipeline(cfg: PipelineConfig, result: PipelineResult) -> GridResult:
    """The pipeline's fine-tune: its own encoder (or finetune.encoder) against scratch and the baselines."""
    from lardo_ray import fs
    from lardo_ray.finetune.model import EncoderResolveError
    from lardo_ray.stages.finetune import baseline_method, run_finetune_grid

    try:
        encoder = pretrained_encoder(cfg, result)
    except EncoderResolveError as e:
        # The method then fails in the grid (named in the summary and in MLflow); scratch still runs.
        log.error("pipeline: %s", e)
        encoder = fs.join(cfg.stage_dir("pretrain"), "encoder")
    methods: list[tuple[str, Any]] = [(pretrained_method_label(cfg), encoder)]
    if cfg.pipeline.scratch_baseline:
        methods.append(("scratch" + head_suffix(cfg), None))
    methods += [baseline_method(kind) for kind in cfg.finetune.baselines]
    return run_finetune_grid(cfg, methods)


def head_parts(ft: Any) -> dict[str, str]:
    """What each fine-tuning field adds to a method's name: '+dsm' when the head also reads the molecule's
    descriptors, '+rf' when the head is a forest on the frozen embedding, '+ecfp' when that forest also reads
    fingerprints, '+lr' when the learning rates are
    chosen on validation ('' when at its default)."""
    return {"dsm_features": "+dsm" if ft.dsm_features != "none" else "",
            "head": "+rf" if ft.head == "forest" else "",
            "ecfp_features": "+ecfp" if ft.ecfp_features else "",
            "lr_scales": "+lr" if len(ft.lr_scales) > 1 else ""}


def head_suffix(cfg: PipelineConfig) -> str:
    """The fine-tuning's part of a method label (the grid's naming), e.g. '+dsm+rf'."""
    return "".join(head_parts(cfg.finetune).values())


def pretrained_method_label(cfg: PipelineConfig) -> str:
    """The pre-trained method's name in compare and the registry, saying what it is: what wrote its text
    (``rules``, ``llm:smollm2x64+rules``), ``_dsmreg`` when pre-training also regressed the descriptors, and
    ``+dsm`` when the head reads them; ``pipeline.method_name`` replaces it whole."""
    from lardo_ray.llm.settings import text_writer_label

    if cfg.pipeline.method_name:
        return cfg.pipeline.method_name
    reg = "_dsmreg" if cfg.pretrain.descriptor_weight > 0 else ""
    return text_writer_label(cfg.describe) + reg + head_suffix(cfg)


def compare_in_pipeline(cfg: PipelineConfig, result: PipelineResult) -> CompareResult:
    from lardo_ray.stages.compare import compare, resolved_compare_config

    return compare(resolved_compare_config(cfg))


def predict_with_registered(cfg: PipelineConfig, result: PipelineResult) -> StageSummary | None:
    """Score ``pipeline.predict_input`` with the pre-trained method's registered seed ensemble."""
    from lardo_ray.stages.lifecycle import run_stage

    method = pretrained_method_label(cfg)
    try:
        ft = result.stages["finetune"].get(cfg.finetune.dataset, method)
    except KeyError:
        result.errors.append(f"predict: no fine-tune result of {cfg.finetune.dataset}/{method} to predict with")
        return None
    model = ft.registered or ft.model_uri
    if not model:
        result.errors.append(f"predict: {cfg.finetune.dataset}/{method} saved no model (failed seeds, "
                             "finetune.save_models=false or MLflow unreachable): nothing to predict with")
        return None
    pcfg = cfg.model_copy(update={
        "input": cfg.input.model_copy(update={"path": cfg.pipeline.predict_input, "smiles_column": "smiles",
                                              "keep_columns": ["name"], "id_column": None, "limit": None}),
        "predict": cfg.predict.model_copy(update={"model": model}),
    })
    return run_stage("predict", pcfg)


def _prediction_lines(summary: StageSummary) -> list[str]:
    import pyarrow.parquet as pq

    from lardo_ray.io import StageOutput

    out = StageOutput(summary.output)
    manifest = out.read_manifest()
    if manifest is None:  # run_stage has just written it: gone means the output was removed meanwhile
        raise RuntimeError(f"predict: no manifest.json in {out.uri} after the stage finished")
    rows: list[dict[str, Any]] = []
    for c in manifest.get("chunks", []):
        rows += pq.read_table(out.data_path(c), filesystem=out.fs).to_pylist()
    lines = [f"== predictions ({summary.extra.get('model', '')}) =="]
    for r in rows:
        preds = ", ".join(f"{k[5:]} {v:.3f} ± {r[k + '_std']:.3f}" for k, v in r.items()
                          if k.startswith("pred_") and not k.endswith("_std"))
        lines.append(f"  {str(r.get('name', r['input_smiles']))[:24]:<24s} {preds}")
    if summary.n_rejected:
        lines.append(f"  ({summary.n_rejected} refused: see {out.uri}/rejected/)")
    lines.append(f"  written to {out.uri}/data/")
    return lines


def pretrained_encoder(cfg: PipelineConfig, result: PipelineResult) -> str:
    """The encoder this pipeline pre-trained (this run or an earlier, resumed one), or the configured one.

    Raises EncoderResolveError when there is none: the pipeline exists to compare a pre-trained encoder with
    scratch, so fine-tuning scratch alone would be a silent downgrade."""
    from lardo_ray import fs
    from lardo_ray.finetune.model import EncoderResolveError
    from lardo_ray.models.gine import ENCODER_CONFIG

    if cfg.finetune.encoder:
        return cfg.finetune.encoder
    pre = result.stages.get("pretrain")
    path = getattr(pre, "export_dir", None) or fs.join(cfg.stage_dir("pretrain"), "encoder")
    if not fs.exists(fs.join(path, ENCODER_CONFIG)):
        raise EncoderResolveError(
            f"no pre-trained encoder at {path} (the pretrain stage's export): run the pretrain stage "
            "(pipeline.stages) or set finetune.encoder")
    return path
