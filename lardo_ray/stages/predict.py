"""Stages predict and encode: a saved model (MLflow URI or directory) applied to any molecules, on the
same chunked machinery as every other stage (input chunks -> actor pool -> atomic shards + markers ->
resume -> counts reconciled from disk).

predict writes ``mol_id``, ``smiles`` (standardised), ``input_smiles``, ``source_row``, the kept input
columns, ``pred_<target>`` (probabilities / original units) and ``pred_<target>_std`` (the seed
ensemble's spread); encode writes the same identity columns and ``embedding`` (fixed-size float32).
A molecule the model's standardiser or featurizer refuses goes to rejected/ with its reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from lardo_ray.config_base import ConfigError, RayResources, Section

if TYPE_CHECKING:
    import pyarrow as pa

    from lardo_ray.config import PipelineConfig
    from lardo_ray.io import StageOutput
    from lardo_ray.models.saved import SavedModel
    from lardo_ray.stages.lifecycle import SlicedCore, StageSummary
    from lardo_ray.tracking import Tracker


class ApplyModelConfig(Section):
    """`lardo-ray predict` / `lardo-ray encode`: which model, how wide."""

    model: str | None = Field(
        default=None, description="models:/NAME/VERSION, models:/NAME@alias, runs:/ID/model, an MLflow model "
        "directory or a lardo_ray model directory (--model)")
    batch_size: int = Field(default=256, ge=1, description="molecules per forward pass")
    batch_rows: int = Field(default=4096, ge=1, description="rows per call of the core (bounds per-row objects)")
    device: str = Field(default="cpu", description="torch device of each actor (cuda with ray.num_gpus > 0)")
    ray: RayResources = Field(default_factory=RayResources)


# ---------------------------------------------------------------- the core (no Ray)


class ApplyModelCore:
    """A table of input rows -> (rows with predictions or embeddings, rejected rows)."""

    def __init__(self, saved: SavedModel, mode: str, batch_size: int = 256):
        self.model, self.mode, self.batch_size = saved, mode, batch_size

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        import numpy as np
        import pyarrow as pa

        from lardo_ray import schema
        from lardo_ray.stages.lifecycle import rejected_table

        raw = table.column(schema.INPUT_SMILES).to_pylist()
        prep = self.model.prepare(raw)
        take = pa.array(prep.index, pa.int64())
        cols: dict[str, Any] = {schema.MOL_ID: pa.array(prep.mol_ids, pa.string()),
                                schema.CANONICAL_SMILES: pa.array(prep.canonical, pa.string())}
        for c in table.column_names:
            cols[c] = table.column(c).take(take)
        if self.mode == "predict":
            mean, std = self.model.predict_prepared(prep, self.batch_size)
            for t, name in enumerate(self.model.targets):
                cols[f"pred_{name}"] = pa.array(mean[:, t], pa.float64())
                cols[f"pred_{name}_std"] = pa.array(std[:, t], pa.float64())
        else:
            emb = self.model.encode_prepared(prep, self.batch_size).astype(np.float32)
            flat = pa.array(emb.reshape(-1), pa.float32())
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])
        idx = [r.index for r in prep.refused]
        rejected = rejected_table({
            schema.INPUT_SMILES: [raw[i] if isinstance(raw[i], str) else None for i in idx],
            schema.SOURCE_ROW: table.column(schema.SOURCE_ROW).take(pa.array(idx, pa.int64())).to_pylist(),
            schema.REJECT_REASON: [r.reason for r in prep.refused],
            schema.REJECT_DETAIL: [r.detail for r in prep.refused],
        }, self.mode)
        return pa.table(cols), rejected


def _core(cfg: PipelineConfig, mode: str, model_uri: str, tracking_uri: str | None, **_: Any) -> SlicedCore:
    from lardo_ray.models.mlflow_model import download
    from lardo_ray.models.saved import SavedModel
    from lardo_ray.stages.lifecycle import SlicedCore

    section: ApplyModelConfig = getattr(cfg, mode)
    saved = SavedModel(download(model_uri, tracking_uri), device=section.device)
    return SlicedCore(ApplyModelCore(saved, mode, section.batch_size), section.batch_rows)


def predict_core(cfg: PipelineConfig, **context: Any) -> SlicedCore:
    return _core(cfg, **{**context, "mode": "predict"})


def encode_core(cfg: PipelineConfig, **context: Any) -> SlicedCore:
    return _core(cfg, **{**context, "mode": "encode"})


# ---------------------------------------------------------------- the stages' hooks (registry)


def _check(cfg: PipelineConfig, mode: str) -> None:
    if not getattr(cfg, mode).model:
        raise ConfigError(f"config key '{mode}.model' is empty: give --model models:/NAME/VERSION (or runs:/..., "
                          "or a model directory)")


def check_predict(cfg: PipelineConfig) -> None:
    _check(cfg, "predict")


def check_encode(cfg: PipelineConfig) -> None:
    _check(cfg, "encode")


def _prepare(cfg: PipelineConfig, mode: str, tracker: Tracker) -> dict[str, Any]:
    """Resolve the model once on the driver (an alias to its version number; the model is loaded and its
    versions checked here, so a wrong model fails before any work) and tell every actor where it is."""
    from lardo_ray.models.mlflow_model import download, resolve_version
    from lardo_ray.models.saved import SavedModel
    from lardo_ray.tracking import resolve_tracking_uri

    uri = getattr(cfg, mode).model
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.run.output_dir)
    try:
        resolved = resolve_version(uri, tracking_uri)
        saved = SavedModel(download(resolved, tracking_uri))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many types for a missing model
        raise ConfigError(f"{mode}.model {uri!r}: {type(e).__name__}: {str(e)[:400]}") from None
    if mode == "predict" and saved.kind != "property":
        raise ConfigError(f"{mode}.model {uri!r} is an encoder: it gives embeddings (`lardo-ray encode`), not "
                          "predictions")
    tracker.set_tags({"lardo.model": resolved, "lardo.model_name": saved.card.name})
    return {"mode": mode, "model_uri": resolved, "tracking_uri": tracking_uri, "model_name": saved.card.name,
            "targets": saved.targets}


def prepare_predict(cfg: PipelineConfig, out: StageOutput, tracker: Tracker) -> dict[str, Any]:
    return _prepare(cfg, "predict", tracker)


def prepare_encode(cfg: PipelineConfig, out: StageOutput, tracker: Tracker) -> dict[str, Any]:
    return _prepare(cfg, "encode", tracker)


def summary(cfg: PipelineConfig, out: StageOutput, chunk_ids: list[str], context: dict[str, Any]) -> dict[str, Any]:
    what = f"{len(context['targets'])} target(s): {', '.join(context['targets'])[:200]}" \
        if context["mode"] == "predict" else "embeddings"
    return {"model": f"{context['model_uri']} ({context['model_name']}; {what})"}


def manifest_extra(cfg: PipelineConfig, context: dict[str, Any], summary: StageSummary) -> dict[str, Any]:
    return {"model": context["model_uri"], "model_name": context["model_name"], "targets": context["targets"]}
