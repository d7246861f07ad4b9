"""The encoder as a featurizer: a random forest on the frozen graph embedding (``finetune.head: forest``).

The question it answers: does the pre-trained embedding carry anything a forest cannot already get from the
DSM descriptors? ``rf_dsm`` fits a forest on the 223 descriptors; this head fits the very same forest (same
trees, same seed, same per-target training rows, ``lardo_ray.finetune.baselines``) on the encoder's eval-mode
embedding of each molecule, concatenated with those descriptors when ``finetune.dsm_features: all``. The
random-init encoder of the same seed is its control (``scratch+dsm+rf``): a forest on random GNN features
plus the descriptors, so a gain over rf_dsm that the control shares is the extra features, not pre-training.

Nothing is trained on the encoder (there is no gradient in a forest) and nothing is chosen on test: the
hyper-parameters are rf_dsm's, fixed. The share of the forests' impurity importance that falls on the
embedding's columns is logged (``embedding_importance_share``): 0 means the forest ignored the encoder.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from lardo_ray.finetune.baselines import MAX_SAVED_TARGETS, _fit_predict, fill_missing, training_medians
from lardo_ray.finetune.data import PreparedTask, dsm_descriptors, split_hash
from lardo_ray.finetune.metrics import evaluate
from lardo_ray.finetune.splits import Split

if TYPE_CHECKING:
    from lardo_ray.config import PipelineConfig
    from lardo_ray.finetune.model import EncoderSource
    from lardo_ray.finetune.train import SeedResult


def embed_all(encoder: Any, prepared: PreparedTask, batch_size: int, device: str = "cpu") -> np.ndarray:
    """Eval-mode graph embeddings of every molecule of ``prepared``, in row order, float32."""
    import torch

    from lardo_ray.finetune.train import _pyg, make_batches

    encoder.eval()
    with torch.no_grad():
        parts = [encoder(_pyg(prepared.graphs, b, device)).float().cpu().numpy()
                 for b in make_batches(np.arange(len(prepared)), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, int(encoder.out_dim)), np.float32)


def forest_features(embedding: np.ndarray, descriptors: np.ndarray | None,
                    fingerprints: np.ndarray | None = None) -> np.ndarray:
    """The forest's input: the embedding, then the raw descriptors (a forest needs no normalisation), then
    the ECFP4 bits."""
    return np.concatenate([a for a in (embedding, descriptors, fingerprints) if a is not None], axis=1)


def embedding_importance_share(models: list[Any], n_embedding: int) -> float:
    """Mean over the fitted forests of the impurity importance on the first ``n_embedding`` columns."""
    shares = [float(np.sum(m.feature_importances_[:n_embedding])) for m in models
              if hasattr(m, "feature_importances_") and np.sum(m.feature_importances_) > 0]
    return float(np.mean(shares)) if shares else float("nan")


def forest_head_seed(cfg: PipelineConfig, seed: int, *, prepared: PreparedTask, split: Split,
                     encoder: EncoderSource | None, threads: int | None = None) -> SeedResult:
    """One seed: embed with the (pre-trained, or seed-initialised) encoder, fit rf_dsm's forests, score."""
    import torch

    from lardo_ray.finetune.model import build_property_model
    from lardo_ray.finetune.train import SeedResult, resolve_device

    t0 = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    threads = torch.get_num_threads()  # the forests' n_jobs too
    ft = cfg.finetune
    data = prepared.data
    task_type, metric = data.task_type, ft.resolved_metric()
    device = resolve_device(ft.device)
    built = build_property_model(cfg, data.n_tasks, seed, encoder=encoder, device=device)
    emb = embed_all(built.model.encoder, prepared, ft.eval_batch_size, device)
    embed_seconds = time.perf_counter() - t0
    desc = dsm_descriptors(prepared, cfg.ingest.max_atoms) if ft.dsm_features != "none" else None
    fps = None
    if ft.ecfp_features:  # rf_ecfp's features of the same standardised molecules
        from lardo_ray.finetune.baselines import featurize

        fps = featurize("rf_ecfp", data.smiles, cfg.ingest.max_atoms).X
    X_raw = forest_features(emb, desc, fps)
    train = np.asarray(split.train)
    med = training_medians(X_raw, train)
    X, n_imputed = fill_missing(X_raw, med)
    y = data.labels.astype(np.float64)
    (valid_pred, test_pred), models = _fit_predict(task_type, X, y, train, [np.asarray(split.valid),
                                                                            np.asarray(split.test)],
                                                   seed, threads, ft.baseline_trees)
    train_seconds = time.perf_counter() - t0 - embed_seconds
    member = None
    if ft.save_models and data.n_tasks <= MAX_SAVED_TARGETS:
        from lardo_ray.models.saved import Member, pickle_bytes, state_bytes

        enc = built.model.encoder
        member = Member(seed=int(seed), state=state_bytes(enc.state_dict()),
                        encoder_config=dataclasses.asdict(enc.config), n_descriptors=0 if desc is None else
                        int(desc.shape[1]),
                        forest=pickle_bytes({"features": forest_kind(ft.dsm_features, ft.ecfp_features), "median": med,
                                             "tasks": models}))

    def score(idx: np.ndarray, pred: np.ndarray):
        return evaluate(task_type, y[idx], pred, data.task_names, metric)

    valid_m = score(np.asarray(split.valid), valid_pred) if len(split.valid) else evaluate(
        task_type, np.zeros((0, data.n_tasks)), np.zeros((0, data.n_tasks)), data.task_names, metric)
    return SeedResult(
        seed=int(seed), dataset=data.name, method=ft.method_label(), split=ft.split, task_type=task_type,
        metric=metric, test=score(np.asarray(split.test), test_pred), valid=valid_m, best_epoch=0, epochs_run=0,
        stopped_early=False, selection="fixed", n_train=len(split.train), n_valid=len(split.valid),
        n_test=len(split.test), split_hash=split_hash(split), encoder_run_id=built.encoder_run_id,
        encoder_sha256=built.encoder_sha256, final_encoder_sha256=built.encoder_sha256,
        pretrained=built.pretrained, n_params=0, n_trainable=0, history=[],
        timing={"train_seconds": train_seconds, "eval_seconds": 0.0, "seconds_per_epoch": 0.0,
                "embed_seconds": embed_seconds, "seed_seconds": time.perf_counter() - t0,
                "n_imputed": float(n_imputed), "n_forest_features": float(X.shape[1]),
                "embedding_importance_share": embedding_importance_share(models, emb.shape[1])},
        test_index=np.asarray(split.test), test_pred=test_pred.astype(np.float32),
        valid_pred=valid_pred.astype(np.float32), task_mode="per_target" if data.n_tasks > 1 else "single_task",
        device=str(device), threads=int(threads), worker=f"{socket.gethostname()}:{os.getpid()}", member=member,
    )


FOREST_KINDS = ("gnn", "gnn+dsm", "gnn+ecfp", "gnn+dsm+ecfp")


def forest_kind(dsm_features: str, ecfp_features: bool = False) -> str:
    """The saved model's ``features``: what its forests read, in column order (``lardo_ray.models.saved``)."""
    return "gnn" + ("+dsm" if dsm_features != "none" else "") + ("+ecfp" if ecfp_features else "")
