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
from typing import Any

from lardo_ray.config import PipelineConfig, dump_config

log = logging.getLogger("lardo_ray")


@dataclass
class PipelineResult:
    output_dir: str
    stages: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    compare_markdown: str | None = None
    compare_files: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def failures(self) -> list[str]:
        return [line for res in self.stages.values() if hasattr(res, "failures") for line in res.failures()]

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
        tracker.log_metrics({"seconds.total": sum(result.seconds.values())})
        if "compare" in result.stages:
            c = result.stages["compare"]
            result.compare_markdown = c.markdown
            result.compare_files = [p for p in (c.csv_path, c.markdown_path, c.png_path) if p]
            for p in c.local_files:
                tracker.log_artifact(p, "compare")
    return result


def _run_stage(stage: str, cfg: PipelineConfig, result: PipelineResult):
    if stage == "dsm":
        from lardo_ray.stages.ingest_dsm import run_dsm

        return run_dsm(cfg)
    if stage == "describe":
        from lardo_ray.stages.describe import run_describe

        return run_describe(cfg)
    if stage == "embed":
        from lardo_ray.stages.embed import run_embed

        return run_embed(cfg)
    if stage == "featurize":
        from lardo_ray.stages.featurize import run_featurize

        return run_featurize(cfg)
    if stage == "pretrain":
        from lardo_ray.stages.pretrain import run_pretrain

        return run_pretrain(cfg)
    if stage == "finetune":
        from lardo_ray.stages.finetune import baseline_method, run_finetune_grid

        from lardo_ray import fs
        from lardo_ray.finetune.model import EncoderResolveError

        try:
            encoder = pretrained_encoder(cfg, result)
        except EncoderResolveError as e:
            # The method then fails in the grid (named in the summary and in MLflow); scratch still runs.
            log.error("pipeline: %s", e)
            encoder = fs.join(cfg.stage_dir("pretrain"), "encoder")
        from lardo_ray.llm.settings import text_writer_label

        methods: list[tuple[str, Any]] = [(cfg.pipeline.method_name or text_writer_label(cfg.describe), encoder)]
        if cfg.pipeline.scratch_baseline:
            methods.append(("scratch", None))
        methods += [baseline_method(kind) for kind in cfg.finetune.baselines]
        return run_finetune_grid(cfg, methods)
    if stage == "compare":
        from lardo_ray.stages.compare import resolved_compare_config
        from lardo_ray.stages.compare import compare

        return compare(resolved_compare_config(cfg))
    raise ValueError(stage)


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
