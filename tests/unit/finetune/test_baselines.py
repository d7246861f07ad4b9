"""Classical baselines (lardo_ray.finetune.baselines): they learn, they survive missing descriptor values, and
they are scored by the same split and metric code as the GNN."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from lardo_ray.config import load_config
from lardo_ray.finetune.baselines import BaselineFeatures, baseline_seed, featurize, impute
from lardo_ray.finetune.datasets import LabelledSet
from lardo_ray.finetune.splits import random_split
from lardo_ray.finetune.data import PreparedTask, split_hash
from tests.conftest import SAMPLE


def _zinc(n: int = 320) -> list[str]:
    with open(SAMPLE / "zinc_sample.csv", newline="") as f:
        return [r["smiles"] for r in csv.DictReader(f)][:n]


def _task(smiles: list[str], labels: np.ndarray, task_type: str) -> PreparedTask:
    metric = "roc_auc" if task_type == "classification" else "rmse"
    data = LabelledSet(name="toy", smiles=smiles, labels=labels.reshape(len(smiles), -1).astype(np.float64),
                       task_names=[f"t{i}" for i in range(labels.reshape(len(smiles), -1).shape[1])],
                       task_type=task_type, metric=metric)
    return PreparedTask(data=data, graphs=None)


def _cfg(task_type: str):
    # the card only sets the task type and metric; the rows come from the toy set
    return load_config(None, ["finetune.split=random",
                              f"finetune.dataset={'bbbp' if task_type == 'classification' else 'esol'}"])


@pytest.mark.parametrize("kind", ["rf_ecfp", "rf_dsm"])
def test_a_forest_learns_a_structural_label_far_above_chance(kind):
    smiles = _zinc()
    # label: the molecule has a carbonyl -- visible to fingerprints and to the fr_ group counts
    from rdkit import Chem

    patt = Chem.MolFromSmarts("[CX3]=[OX1]")
    y = np.array([float(Chem.MolFromSmiles(s).HasSubstructMatch(patt)) for s in smiles])
    assert 0.2 < y.mean() < 0.8
    prepared = _task(smiles, y, "classification")
    split = random_split(len(smiles), (0.7, 0.1, 0.2), seed=0)
    feats = featurize(kind, smiles)
    assert feats.X.shape[0] == len(smiles) and feats.X.dtype == np.float32
    r = baseline_seed(_cfg("classification"), 0, prepared=prepared, split=split, features=feats)
    assert r.test.value > 0.85, r.test.value  # chance is 0.5
    assert r.method == kind and r.split_hash == split_hash(split) and r.test_pred.shape == (len(split.test), 1)
    # a forest on shuffled labels is near chance: the score comes from the structure, not from a leak
    rng = np.random.default_rng(0)
    shuffled = _task(smiles, rng.permutation(y), "classification")
    r0 = baseline_seed(_cfg("classification"), 0, prepared=shuffled, split=split, features=feats)
    assert r0.test.value < 0.7


def test_missing_descriptor_values_are_imputed_from_training_rows_and_counted():
    X = np.array([[1.0, np.nan, np.nan], [3.0, 2.0, np.nan], [np.nan, 4.0, np.nan], [100.0, 6.0, np.nan]],
                 np.float32)
    out, n = impute(X, train=np.array([0, 1, 2]))
    assert n == 6 and not np.isnan(out).any()
    assert out[2, 0] == 2.0  # median of the training rows 1 and 3, not of the test row's 100
    assert out[0, 1] == 3.0 and (out[:, 2] == 0.0).all()  # an all-missing column becomes 0
    assert np.isnan(X).sum() == 6  # the input is not modified

    smiles = _zinc(120)
    y = np.array([len(s) for s in smiles], float)
    prepared = _task(smiles, y, "regression")
    feats = featurize("rf_dsm", smiles)
    feats.X[:, 0] = np.nan  # a descriptor no molecule has
    feats.X[::7, 5] = np.nan  # missing in some rows
    split = random_split(len(smiles), (0.8, 0.1, 0.1), seed=1)
    r = baseline_seed(_cfg("regression"), 1, prepared=prepared, split=split, features=feats)
    assert np.isfinite(r.test.value) and r.timing["n_imputed"] >= len(smiles)


def test_multi_task_labels_one_forest_per_task_on_its_labelled_rows():
    smiles = _zinc(200)
    rng = np.random.default_rng(3)
    y = np.stack([np.array([float("N" in s) for s in smiles]), rng.integers(0, 2, len(smiles)).astype(float)], 1)
    y[rng.random(y.shape) < 0.3] = np.nan  # missing labels are left out per task, never read as 0
    prepared = _task(smiles, y, "classification")
    split = random_split(len(smiles), (0.7, 0.1, 0.2), seed=0)
    r = baseline_seed(_cfg("classification"), 0, prepared=prepared, split=split,
                      features=featurize("rf_ecfp", smiles))
    assert r.test_pred.shape == (len(split.test), 2) and np.isfinite(r.test_pred).all()
    assert r.test.per_task["t0"]["roc_auc"] > r.test.per_task["t1"]["roc_auc"]


def test_unknown_baseline_is_refused():
    with pytest.raises(ValueError, match="unknown baseline"):
        featurize("svm_dsm", ["CCO"])
    assert isinstance(featurize("rf_ecfp", ["CCO"]), BaselineFeatures)
