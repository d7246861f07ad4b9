"""How a fine-tune is logged: one MLflow parent run per (dataset, method), a child per seed, the saved models
and their registration (lardo_ray.models), following the compare contract (lardo_ray.tracking's tags)."""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any


from lardo_ray.config import PipelineConfig
from lardo_ray.finetune.metrics import parent_summary
from lardo_ray.finetune.baselines import MAX_SAVED_TARGETS
from lardo_ray.stages.finetune_results import FinetuneResult
from lardo_ray.tracking import (TAG_ENCODER, TAG_ENCODER_SHA, TAG_FAILED_SEEDS, TAG_PREDICTIONS, TAG_SPLIT_HASH,
                                finetune_tags)

if TYPE_CHECKING:
    from lardo_ray.finetune.model import EncoderSource
    from lardo_ray.finetune.splits import Split
    from lardo_ray.finetune.data import PreparedTask
    from lardo_ray.finetune.train import SeedResult
    from lardo_ray.tracking import FinetuneTagKwargs, Tracker

log = logging.getLogger("lardo_ray")



# ---------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Group:
    cfg: PipelineConfig  # finetune.dataset / method / encoder set for this pair
    dataset_key: str
    method: str
    encoder_spec: str | None
    baseline: str | None = None  # rf_dsm / rf_ecfp: a classical model instead of the GNN
    splits: dict[int, Split] = field(default_factory=dict)
    results: dict[int, SeedResult] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)


def _with_finetune(cfg: PipelineConfig, **update: Any) -> PipelineConfig:
    from lardo_ray.finetune.settings import FinetuneConfig

    ft = FinetuneConfig.model_validate({**cfg.finetune.model_dump(), **update})
    return cfg.model_copy(update={"finetune": ft})


def _local_dir(path: str) -> str | None:
    return None if "://" in path else path


def _safe_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", text).strip("_") or "x"


def _architecture(cfg: PipelineConfig, enc: EncoderSource | None, baseline: str | None = None) -> str:
    if baseline:
        from lardo_ray.finetune.baselines import BASELINES

        return (f"{BASELINES[baseline]} ({cfg.finetune.baseline_trees} trees), one model per task on its labelled "
                "training rows")
    if enc is None:
        m = cfg.model
        c = {"num_layers": m.num_layers, "hidden": m.hidden, "pooling": m.pooling, "jk": m.jk}
    else:
        c = enc.config
    ft = cfg.finetune
    if ft.head == "forest":
        feats = "its embedding" + (" + the raw RDKit descriptors" if ft.dsm_features != "none" else "") + (
            " + ECFP4 bits" if ft.ecfp_features else "")
        return (f"GINE {c.get('num_layers')} x {c.get('hidden')} ({c.get('pooling')} pool, jk {c.get('jk')}), frozen; "
                f"random forest ({ft.baseline_trees} trees) on {feats}, one per task on its labelled training rows")
    probe = "frozen encoder (probe)" if ft.freeze_encoder or ft.lr_encoder == 0 else \
        f"lr head {ft.lr_head:g} / encoder {ft.lr_encoder:g}"
    mode = "; one model per target" if ft.task_mode == "per_target" else ""
    if ft.dsm_features != "none":
        mode += "; RDKit descriptors (CDF on the training rows) into the head"
    return (f"GINE {c.get('num_layers')} x {c.get('hidden')} ({c.get('pooling')} pool, jk {c.get('jk')}) + "
            f"MLP head {ft.head_hidden}; {ft.epochs} epochs, batch {ft.batch_size}, {probe}{mode}")


_ARCH_KEYS = ("num_layers", "hidden", "dropout", "pooling", "jk", "batch_norm")


def _params(cfg: PipelineConfig, g: _Group, enc: EncoderSource | None, prepared: PreparedTask) -> dict[str, Any]:
    from lardo_ray.tracking import flatten

    ft = cfg.finetune.model_dump(mode="json")
    ft["method"] = g.method
    ft["encoder"] = g.encoder_spec or ""
    ft["dataset"] = g.dataset_key
    arch = enc.config if enc is not None else cfg.model.model_dump(mode="json")
    arch = {k: arch.get(k) for k in _ARCH_KEYS}
    if cfg.finetune.encoder_dropout is not None:
        arch["dropout"] = cfg.finetune.encoder_dropout
    params: dict[str, Any] = flatten(ft)  # counts join the strings below; log_params makes each a string
    params.update(flatten(arch, "model."))
    params.update({"n_molecules": len(prepared), "n_tasks": prepared.data.n_tasks,
                   "data_source": prepared.data.source})
    return params


def _log_history(tracker: Tracker, run_id: str, history: list[dict[str, float]]) -> None:
    """Per-epoch curves in a few log_batch calls (one call per epoch and metric would take seconds on sqlite)."""
    if not tracker.enabled or not history:
        return
    try:
        import mlflow
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # "epoch/" names: a curve must not share the name of the final metric (MLflow's latest value of a
        # metric is the one with the highest step, which would be the last epoch, not the best one).
        metrics = [Metric(f"epoch/{k}", float(v), now, int(h["epoch"])) for h in history for k, v in h.items()
                   if k != "epoch" and v is not None and not math.isnan(float(v))]
        client = mlflow.MlflowClient(tracker.uri)
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i: i + 1000])
    except Exception as e:  # noqa: BLE001 - logging never kills the stage
        tracker.not_logged.append(f"history of run {run_id}")
        log.warning("MLflow: could not log the epoch history: %s", str(e)[:200])


def task_mode_of(g: _Group, prepared: PreparedTask) -> str:
    """The protocol a group's numbers come from (tag lardo.task_mode): forests are one model per target."""
    if prepared.data.n_tasks == 1:
        return "single_task"
    return "per_target" if g.baseline else g.cfg.finetune.task_mode


def _log_group(tracker: Tracker, g: _Group, res: FinetuneResult, enc: EncoderSource | None,
               prepared: PreparedTask) -> None:
    """Parent run + one nested child per seed (compare contract), then the parent's mean/std."""
    ft = g.cfg.finetune
    base: FinetuneTagKwargs = {"task_type": res.task_type, "metric": res.metric,
                               "encoder_run_id": res.encoder_run_id, "task_mode": task_mode_of(g, prepared)}
    params = _params(g.cfg, g, enc, prepared)
    extra = {TAG_ENCODER: g.encoder_spec or "", TAG_ENCODER_SHA: res.encoder_sha256}
    n_not_logged = len(tracker.not_logged)
    with tracker.run(f"{g.dataset_key}/{g.method}",
                     tags={**finetune_tags(g.dataset_key, g.method, ft.split, **base), **extra}):
        res.parent_run_id = tracker.run_id
        tracker.log_params(params)
        if res.failed:
            tracker.set_tags({TAG_FAILED_SEEDS: ",".join(str(s) for s in sorted(res.failed))})
        for r in res.seeds:
            tags = {**finetune_tags(g.dataset_key, g.method, ft.split, seed=r.seed, **base), **extra,
                    TAG_SPLIT_HASH: r.split_hash}
            with tracker.run(f"seed{r.seed}", tags=tags, nested=True):
                if tracker.enabled and tracker.run_id:
                    res.child_run_ids[r.seed] = tracker.run_id
                    tracker.log_params({**params, "seed": r.seed})
                    tracker.log_metrics(r.metrics())
                    _log_history(tracker, tracker.run_id, r.history)
                    if r.seed in res.predictions_local:
                        tracker.log_artifact(res.predictions_local[r.seed])
                        tracker.set_tags({TAG_PREDICTIONS: os.path.basename(res.predictions_local[r.seed])})
                    if r.member is not None and not g.baseline:  # forests: only their ensemble (size)
                        _log_saved_model(tracker, g, res, prepared, [r])
        for seed, err in sorted(res.failed.items()):
            tags = {**finetune_tags(g.dataset_key, g.method, ft.split, seed=seed, **base), **extra}
            with tracker.run(f"seed{seed}", tags=tags, nested=True):
                tracker.log_params({**params, "seed": seed})
                tracker.log_text(err, "error.txt")
                tracker.set_tags({"lardo.error": err.strip().splitlines()[-1][:500] if err.strip() else err})
                tracker.fail_run()
        if not res.seeds:  # the method failed: its parent run says so too
            tracker.log_text("\n\n".join(f"seed {s}: {e}" for s, e in sorted(res.failed.items())), "error.txt")
            tracker.fail_run()
        if res.seeds:
            tracker.log_metrics({**parent_summary([r.metrics() for r in res.seeds]),
                                 "wall_seconds": res.wall_seconds,
                                 "n_failed_seeds": float(len(res.failed))})
        if res.csv_local:
            tracker.log_artifact(res.csv_local)
        members = [r for r in res.seeds if r.member is not None]
        if res.seeds and not members and ft.save_models and (g.baseline or ft.task_mode == "per_target"):
            res.model_note = (f"not saved: {prepared.data.n_tasks} targets > {MAX_SAVED_TARGETS} (one model per "
                              "target for that many targets runs to gigabytes; their predictions are logged)")
        if members and not res.failed:  # an ensemble that lost a seed is not the method's model
            res.model_uri = _log_saved_model(tracker, g, res, prepared, members)
            if res.model_uri and ft.register_models:
                res.registered = _register(tracker, g, res, res.model_uri)
    if tracker.enabled:
        res.experiment, res.tracking_uri = tracker.experiment, tracker.uri
    res.not_logged = list(tracker.not_logged[n_not_logged:])


def registered_name(dataset: str, method: str) -> str:
    return _safe_name(f"{dataset}-{method}")


def _log_saved_model(tracker: Tracker, g: _Group, res: FinetuneResult, prepared: PreparedTask,
                     seeds: list[SeedResult]) -> str | None:
    """The seeds' tested weights as one lardo_ray model (an ensemble when several) in the active run."""
    from lardo_ray.models.saved import ModelCard, save_property_model

    ft = g.cfg.finetune
    forest_head = not g.baseline and ft.head == "forest"  # the encoder as a featurizer: forests on its embedding
    if forest_head:
        from lardo_ray.finetune.forest_head import forest_kind
    card = ModelCard(kind="forest" if g.baseline or forest_head else "property",
                     features=g.baseline or (forest_kind(ft.dsm_features, ft.ecfp_features) if forest_head else ""),
                     name=registered_name(g.dataset_key, g.method), targets=list(prepared.data.task_names),
                     task_type=res.task_type, encoder_config=seeds[0].member.encoder_config,
                     n_descriptors=seeds[0].member.n_descriptors, head_hidden=ft.head_hidden,
                     task_mode="per_target" if seeds[0].member.per_target is not None else "multitask",
                     metrics=parent_summary([r.metrics() for r in seeds]) if len(seeds) > 1 else seeds[0].metrics(),
                     config=g.cfg.model_dump(mode="json"))
    uri: list[str] = []

    def log() -> None:
        from lardo_ray.models.mlflow_model import log_model

        with tempfile.TemporaryDirectory(prefix="lardo-model-") as tmp:
            d = save_property_model(os.path.join(tmp, "lardo_model"), card, [r.member for r in seeds])
            uri.append(log_model(str(d)))

    tracker._safe(f"model ({'seed ' + str(seeds[0].seed) if len(seeds) == 1 else 'seed ensemble'})", log)
    return uri[0] if uri else None


def _register(tracker: Tracker, g: _Group, res: FinetuneResult, model_uri: str) -> str | None:
    from lardo_ray.models.mlflow_model import register

    tags = {"lardo.dataset": g.dataset_key, "lardo.method": g.method, "lardo.split": g.cfg.finetune.split,
            "lardo.seeds": ",".join(str(r.seed) for r in res.seeds), "lardo.run_id": res.parent_run_id or ""}
    for k, ms in res.summary().items():
        tags[f"{k}_mean"], tags[f"{k}_std"] = f"{ms.mean:.6g}", f"{ms.std:.6g}"
    out: list[str] = []
    tracker._safe("model registry", lambda: out.append(register(model_uri, registered_name(g.dataset_key, g.method),
                                                                tags, tracker.uri)))
    return out[0] if out else None


