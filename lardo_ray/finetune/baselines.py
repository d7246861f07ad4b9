"""Classical baselines as fine-tune methods: the models a drug-discovery engineer would fit instead.

* ``rf_dsm``: a scikit-learn random forest on the dsm stage's RDKit descriptors (all of them, the same
  registry and the same ``Standardiser`` as the dsm stage) of each molecule;
* ``rf_ecfp``: a random forest on RDKit Morgan fingerprints, radius 2, 2,048 bits (ECFP4,
  ``rdFingerprintGenerator``), of the same standardised molecules.

One forest per task, trained on that task's labelled training rows (as MolCLR and chemprop's RF baselines).
Hyper-parameters are fixed, not tuned (nothing is chosen on the test split): 500 trees
(``finetune.baseline_trees``), scikit-learn's
defaults otherwise (classification: ``max_features="sqrt"``, ``class_weight="balanced"``; regression:
``max_features=1.0``), ``random_state`` = the seed. Descriptor values that are NaN or infinite (a
calculator that failed, a division by zero) are replaced by the training rows' median of that descriptor
(0 where every training value is missing); how many were replaced is reported (``n_imputed``).

A baseline's seed result is a ``SeedResult`` like a fine-tuned model's: same split, same metric code, same
per-seed CSV and MLflow parent/child runs, so compare tabulates every method the same way.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from lardo_ray.finetune.metrics import TaskMetrics, evaluate
from lardo_ray.finetune.splits import Split

log = logging.getLogger("lardo_ray")

BASELINES = {
    "rf_dsm": "random forest on the dsm stage's RDKit descriptors",
    "rf_ecfp": "random forest on Morgan radius-2 2048-bit fingerprints (ECFP4)",
}
N_TREES = 500
# Forests are saved as models (finetune.save_models; the seed ensemble only) up to this many targets: a
# BBBP forest of 500 trees pickles to ~7 MB, so 617 ToxCast targets x 3 seeds would be gigabytes.
MAX_SAVED_TARGETS = 16
ECFP_RADIUS, ECFP_BITS = 2, 2048


@dataclass
class BaselineFeatures:
    """One matrix per (dataset, baseline kind), computed once on the driver and shared by every seed."""

    kind: str
    X: np.ndarray  # float32 (n_molecules, n_features); NaN where a descriptor could not be computed
    names: list[str]
    n_not_standardised: int  # molecules the Standardiser refused: featurised from the parsed input instead
    seconds: float


def descriptor_matrix(mols: list) -> np.ndarray:
    """All DSM descriptors of RDKit molecules as float32, NaN where not computable (rf_dsm's features and
    finetune.dsm_features' input; saved models compute new molecules' the same way)."""
    from lardo_ray.chem.descriptors import DescriptorCalculator

    values, _ = DescriptorCalculator("all").compute(mols)
    with np.errstate(over="ignore", invalid="ignore"):
        values[~np.isfinite(values)] = np.nan
        # float32 would overflow on a few descriptors (Ipc): keep their order of magnitude instead
        big = np.abs(values) > 1e30
        values[big] = np.sign(values[big]) * 1e30
    return values.astype(np.float32)


def ecfp_matrix(mols: list) -> np.ndarray:
    """Morgan radius-2, 2,048-bit fingerprints (ECFP4) as float32 rows: rf_ecfp's features."""
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=ECFP_RADIUS, fpSize=ECFP_BITS)
    return np.stack([gen.GetFingerprintAsNumPy(m).astype(np.float32) for m in mols]) if mols else \
        np.zeros((0, ECFP_BITS), np.float32)


def featurize(kind: str, smiles: list[str], max_atoms: int = 200) -> BaselineFeatures:
    """The baseline's input features for ``smiles`` (the labelled set's rows, in order)."""
    from rdkit import Chem

    from lardo_ray.chem.standardise import Standardiser

    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")
    t0 = time.perf_counter()
    std = Standardiser(max_atoms=max(max_atoms, 10_000))
    mols, fallback = [], 0
    for s in smiles:
        st = std(s)
        if st.mol is None:  # the labelled set parsed it, so RDKit can; say how often, in the result
            fallback += 1
            mols.append(Chem.MolFromSmiles(s))
        else:
            mols.append(st.mol)
    if kind == "rf_dsm":
        from lardo_ray.chem.descriptors import DescriptorCalculator

        X, names = descriptor_matrix(mols), list(DescriptorCalculator("all").names)
    else:
        X = ecfp_matrix(mols)
        names = [f"ecfp4_{i}" for i in range(ECFP_BITS)]
    return BaselineFeatures(kind=kind, X=X, names=names, n_not_standardised=fallback,
                            seconds=time.perf_counter() - t0)


def training_medians(X: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Each column's median over the training rows (0 for a column with no training value): what a missing
    value becomes, here and in the saved model for new molecules."""
    import warnings

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(X[train], axis=0) if len(train) else np.zeros(X.shape[1])
    return np.where(np.isnan(med), 0.0, med).astype(np.float32)


def fill_missing(X: np.ndarray, med: np.ndarray) -> tuple[np.ndarray, int]:
    X = np.array(X, dtype=np.float32, copy=True)
    missing = np.isnan(X)
    n = int(missing.sum())
    if n:
        X[missing] = np.take(med, np.nonzero(missing)[1])
    return X, n


def impute(X: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, int]:
    """NaN -> the training rows' median per column (0 for a column with no training value); the count."""
    return fill_missing(X, training_medians(X, train))


def _fit_predict(task_type: str, X: np.ndarray, y: np.ndarray, train: np.ndarray, parts: list[np.ndarray],
                 seed: int, threads: int, n_trees: int = N_TREES) -> list[np.ndarray]:
    """One forest per task on its labelled training rows; predictions (probabilities / values) for ``parts``."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    preds = [np.full((len(p), y.shape[1]), np.nan) for p in parts]
    models: list[Any] = []
    for t in range(y.shape[1]):
        rows = train[~np.isnan(y[train, t])]
        yt = y[rows, t]
        if len(rows) == 0 or (task_type == "classification" and len(np.unique(yt)) < 2):
            # no labels: the prior; one class in training: predict it (the scorer skips such tasks)
            const = (0.5 if task_type == "classification" else 0.0) if len(rows) == 0 else float(yt[0])
            models.append(const)
            for out in preds:
                out[:, t] = const
            continue
        if task_type == "classification":
            model = RandomForestClassifier(n_estimators=n_trees, class_weight="balanced", n_jobs=threads,
                                           random_state=seed)
            model.fit(X[rows], yt.astype(int))
        else:
            model = RandomForestRegressor(n_estimators=n_trees, n_jobs=threads, random_state=seed)
            model.fit(X[rows], yt)
        models.append(model)
        for p, out in zip(parts, preds):
            if len(p):
                out[:, t] = forest_predict(model, X[p])
    return preds, models


def forest_predict(model: Any, X: np.ndarray) -> np.ndarray:
    """A fitted forest's probability of class 1 (classification) or value; a float is a constant model."""
    if isinstance(model, float):
        return np.full(len(X), model)
    if hasattr(model, "predict_proba"):
        return model.predict_proba(X)[:, list(model.classes_).index(1)]
    return model.predict(X)


def baseline_seed(cfg, seed: int, *, prepared, split: Split, features: BaselineFeatures, threads: int = 1):
    """Train and score one seed of a baseline on ``split``: a ``SeedResult`` like ``finetune_seed``'s."""
    from lardo_ray.finetune.data import split_hash
    from lardo_ray.finetune.train import SeedResult

    t0 = time.perf_counter()
    ft = cfg.finetune
    data = prepared.data
    task_type, metric = data.task_type, ft.resolved_metric()
    med = training_medians(features.X, np.asarray(split.train))
    X, n_imputed = fill_missing(features.X, med)
    y = data.labels.astype(np.float64)
    (valid_pred, test_pred), models = _fit_predict(task_type, X, y, np.asarray(split.train),
                                                   [np.asarray(split.valid), np.asarray(split.test)], seed, threads,
                                                   ft.baseline_trees)
    train_seconds = time.perf_counter() - t0
    member = None
    if ft.save_models and data.n_tasks <= MAX_SAVED_TARGETS:
        from lardo_ray.models.saved import Member, pickle_bytes

        member = Member(seed=int(seed), state=b"", forest=pickle_bytes({"features": features.kind, "median": med,
                                                                         "tasks": models}))

    def score(idx: np.ndarray, pred: np.ndarray) -> TaskMetrics:
        return evaluate(task_type, y[idx], pred, data.task_names, metric)

    valid_m = score(np.asarray(split.valid), valid_pred) if len(split.valid) else evaluate(
        task_type, np.zeros((0, data.n_tasks)), np.zeros((0, data.n_tasks)), data.task_names, metric)
    test_m = score(np.asarray(split.test), test_pred)
    return SeedResult(
        seed=int(seed), dataset=data.name, method=features.kind, split=ft.split, task_type=task_type,
        metric=metric, test=test_m, valid=valid_m, best_epoch=0, epochs_run=0, stopped_early=False,
        selection="fixed", n_train=len(split.train), n_valid=len(split.valid), n_test=len(split.test),
        split_hash=split_hash(split), encoder_run_id="", encoder_sha256="", final_encoder_sha256="",
        pretrained=False, n_params=0, n_trainable=0, history=[],
        timing={"train_seconds": train_seconds, "eval_seconds": 0.0, "seconds_per_epoch": 0.0,
                "seed_seconds": time.perf_counter() - t0, "featurize_seconds": features.seconds,
                "n_imputed": float(n_imputed), "n_not_standardised": float(features.n_not_standardised)},
        test_index=np.asarray(split.test), test_pred=test_pred.astype(np.float32),
        valid_pred=valid_pred.astype(np.float32), task_mode="per_target" if data.n_tasks > 1 else "single_task",
        device="cpu",
        threads=int(threads), worker=f"{socket.gethostname()}:{os.getpid()}", member=member,
    )
