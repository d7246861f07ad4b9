"""The ablation grid of one dataset: a pre-training per variant, then one fine-tune grid and the compare table.

Each variant (``ablation.variants``: label -> --set overrides) is this config plus its overrides, run through
the pipeline's stages up to ``pretrain`` into ``<output_dir>/<label>/`` with MLflow runs named after it. The
DSM stage is computed once into ``<output_dir>/dsm`` when every variant leaves ``dsm``/``input`` alone, since
descriptors do not depend on the text. All encoders, plus a random init (``scratch``), are then fine-tuned by
one ``run_finetune_grid`` call (the same splits and seeds for every method), and ``compare`` ends the run.
Re-running resumes: finished stages, checkpoints and seeds are skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from lardo_ray import fs
from lardo_ray.config import ConfigError, PipelineConfig, _format_validation_error, apply_overrides

log = logging.getLogger("lardo_ray")

PRETRAIN_STAGES = ("dsm", "describe", "embed", "featurize", "pretrain")


@dataclass
class AblationResult:
    output_dir: str
    encoders: dict[str, str | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    grid: Any = None
    chemprop: Any = None
    compare: Any = None

    variant_errors: dict[str, str] = field(default_factory=dict)  # variant -> why its pre-training failed

    def failures(self) -> list[str]:
        out = [f"ablate variant {label}: pre-training failed: {err}" for label, err in self.variant_errors.items()]
        if self.grid is not None:
            out += self.grid.failures()
        if self.chemprop is not None:
            out += [f"chemprop seed {s}: {e.strip().splitlines()[-1][:300] if e.strip() else e}"
                    for s, e in sorted(self.chemprop.failed.items())]
        return out

    def lines(self) -> list[str]:
        out = ["== ablation summary ==", f"  outputs     {self.output_dir}/<variant>/"]
        for label, enc in self.encoders.items():
            took = f"{self.seconds[label]:7.1f} s" if label in self.seconds else "        "
            what = enc or {"chemprop": "D-MPNN from scratch (chemprop CLI)", "rf_dsm": "random forest, RDKit descriptors",
                           "rf_ecfp": "random forest, ECFP4"}.get(label, "random init")
            if label in self.variant_errors:
                what = f"FAILED: {self.variant_errors[label][:200]}"
            out.append(f"  {label:<16s} {took}  {what}")
        if "finetune" in self.seconds:
            out.append(f"  {'finetune grid':<16s} {self.seconds['finetune']:7.1f} s")
        return out


def variant_config(cfg: PipelineConfig, label: str) -> PipelineConfig:
    """This config with the variant's overrides, writing into <output_dir>/<label>/."""
    overrides = list(cfg.ablation.variants[label])
    touches_dsm = any(o.split("=", 1)[0].strip().startswith(("dsm.", "input.", "ingest.")) for o in overrides)
    data = cfg.model_dump(mode="json")
    data["ablation"] = {}
    data = apply_overrides(data, overrides)
    root = cfg.run.output_dir.rstrip("/")
    data["run"]["output_dir"] = f"{root}/{label}"
    data["run"]["name"] = f"{cfg.run.name}-{label}"
    if cfg.ablation.share_dsm and not touches_dsm:
        data["run"]["stage_dirs"] = {**data["run"].get("stage_dirs", {}), "dsm": f"{root}/dsm"}
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:  # name the variant whose override is wrong, and the key
        raise ConfigError(f"ablation.variants.{label}: {_format_validation_error(e)}") from None


def finetune_variant(cfg: PipelineConfig, suffix: str) -> dict[str, Any]:
    """The finetune section with ``ablation.finetune_variants[suffix]`` applied, validated (the key named)."""
    from lardo_ray.finetune.settings import FinetuneConfig

    data = apply_overrides({"finetune": cfg.finetune.model_dump(mode="json")}, cfg.ablation.finetune_variants[suffix])
    try:
        return FinetuneConfig.model_validate(data["finetune"]).model_dump()
    except ValidationError as e:
        raise ConfigError(f"ablation.finetune_variants.{suffix}: {_format_validation_error(e)}") from None


GridMethod = tuple[str, str | None] | tuple[str, str | None, dict[str, Any]]


def grid_methods(cfg: PipelineConfig, encoded: list[tuple[str, str | None]],
                 heads: dict[str, dict[str, Any]]) -> list[GridMethod]:
    """Every encoder as the base config fine-tunes it, then once per fine-tune variant (label + suffix).
    A base config whose head already reads the descriptors names its methods so (``+dsm``, as the pipeline
    does), and the variants that keep that head too; a repeated label is refused by the grid, naming it."""
    from lardo_ray.stages.pipeline import head_parts

    parts = head_parts(cfg.finetune)
    methods: list[GridMethod] = [(label + "".join(parts.values()), enc) for label, enc in encoded]
    for label, enc in encoded:
        for suffix, ft_update in heads.items():
            # what the variant keeps of the base head is named as the base names it; what it changes, its suffix
            kept = "".join(p for k, p in parts.items() if ft_update.get(k, getattr(cfg.finetune, k))
                           == getattr(cfg.finetune, k))
            methods.append((label + kept + suffix, enc, ft_update))
    return methods


def run_ablation(cfg: PipelineConfig) -> AblationResult:
    from lardo_ray.stages.compare import compare
    from lardo_ray.stages.finetune import baseline_method, run_finetune_grid
    from lardo_ray.stages.pipeline import _run_stage, PipelineResult

    if not cfg.ablation.variants and not cfg.ablation.scratch:
        raise ConfigError("ablation.variants: nothing to run (no variants and ablation.scratch=false)")
    if cfg.ablation.chemprop:
        from lardo_ray.stages.chemprop_baseline import resolve_executable

        resolve_executable(cfg.ablation.chemprop)  # fail before hours of pre-training, not after
    variants = {label: variant_config(cfg, label) for label in cfg.ablation.variants}  # all validated up front
    heads = {suffix: finetune_variant(cfg, suffix) for suffix in cfg.ablation.finetune_variants}
    result = AblationResult(output_dir=cfg.run.output_dir)
    show = cfg.run.progress
    for label, vcfg in variants.items():
        stages = [s for s in PRETRAIN_STAGES if not (s == "embed" and not vcfg.model.freeze_text)]
        if show:
            print(f"\n##### variant {label}: {', '.join(stages)} #####", flush=True)
        t0 = time.time()
        state = PipelineResult(output_dir=vcfg.run.output_dir)
        export = fs.join(vcfg.stage_dir("pretrain"), "encoder")
        try:
            for stage in stages:
                if show:
                    print(f"\n=== [{label}] {stage} ===", flush=True)
                res = _run_stage(stage, vcfg, state)
                state.stages[stage] = res
                if show and hasattr(res, "lines"):
                    print("\n".join(res.lines()), flush=True)
            export = getattr(state.stages.get("pretrain"), "export_dir", None) or export
            if not fs.exists(fs.join(export, "encoder.json")):
                raise RuntimeError(f"no encoder export at {export}")
        except ConfigError:
            raise  # a wrong setting: the same for every variant, stop now
        except Exception as e:  # noqa: BLE001 - one variant's failure must not cost the others
            # The grid still fine-tunes it, so its seeds fail as FAILED runs in MLflow, named in the summary.
            result.variant_errors[label] = f"{type(e).__name__}: {str(e).strip()[:1000]}"
            log.error("ablate: variant %s failed: %s", label, result.variant_errors[label])
        result.encoders[label] = export
        result.seconds[label] = time.time() - t0
    encoded: list[tuple[str, str | None]] = list(result.encoders.items())
    if cfg.ablation.scratch:
        result.encoders["scratch"] = None
        encoded.append(("scratch", None))
    methods = grid_methods(cfg, encoded, heads)
    for m in methods:  # the grid's labels in the summary too (seconds stay keyed by the variant)
        result.encoders.setdefault(m[0], m[1])
    for kind in dict.fromkeys(cfg.ablation.baselines + cfg.finetune.baselines):
        methods.append(baseline_method(kind))
        result.encoders[kind] = None
    if show:
        print(f"\n=== fine-tune grid: {', '.join(m[0] for m in methods)} on {cfg.finetune.dataset} ===", flush=True)
    t0 = time.time()
    result.grid = run_finetune_grid(cfg, methods)
    result.seconds["finetune"] = time.time() - t0
    if show and hasattr(result.grid, "lines"):
        print("\n".join(result.grid.lines()), flush=True)
    if cfg.ablation.chemprop:
        from lardo_ray.stages.chemprop_baseline import run_chemprop_baseline

        t0 = time.time()
        result.chemprop = run_chemprop_baseline(cfg, cfg.ablation.chemprop, epochs=cfg.ablation.chemprop_epochs)
        result.seconds["chemprop"] = time.time() - t0
        result.encoders["chemprop"] = None
        if show:
            print("\n".join(result.chemprop.lines()), flush=True)
    from lardo_ray.stages.compare import resolved_compare_config

    result.compare = compare(resolved_compare_config(cfg))
    return result
