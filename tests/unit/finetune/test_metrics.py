"""Metrics equal scikit-learn on fixed predictions; one-class tasks skipped and counted; NaN masked."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score

from lardo_ray.finetune.metrics import (
    TargetScaler,
    aggregate_seeds,
    classification_metrics,
    evaluate,
    higher_is_better,
    is_better,
    mean_std,
    metric_key,
    parent_summary,
    regression_metrics,
)

RNG = np.random.default_rng(0)
Y1 = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 0], dtype=float)
S1 = np.array([0.1, 0.8, 0.35, 0.4, 0.9, 0.2, 0.6, 0.7, 0.55, 0.3])


def test_single_task_roc_auc_equals_sklearn():
    m = classification_metrics(Y1, S1)
    assert m.value == pytest.approx(roc_auc_score(Y1, S1))
    assert m.n_scored == 1 and m.skipped_tasks == []
    # logits give the same ranking, hence the same AUC
    logits = np.log(S1 / (1 - S1))
    assert classification_metrics(Y1, logits).value == pytest.approx(m.value)


def test_multitask_nan_masking_and_mean():
    y = np.column_stack([Y1, 1 - Y1, Y1])
    s = np.column_stack([S1, RNG.random(10), RNG.random(10)])
    y[[0, 3], 1] = np.nan
    y[[2, 5, 9], 2] = np.nan
    m = classification_metrics(y, s, ["a", "b", "c"])
    expected = []
    for t in range(3):
        mask = ~np.isnan(y[:, t])
        expected.append(roc_auc_score(y[mask, t], s[mask, t]))
    assert [m.per_task[k]["roc_auc"] for k in "abc"] == pytest.approx(expected)
    assert m.value == pytest.approx(np.mean(expected))


def test_one_class_task_is_skipped_and_counted():
    y = np.column_stack([Y1, np.ones(10), np.full(10, np.nan), Y1])
    y[0, 1] = np.nan
    s = np.column_stack([S1, S1, S1, S1[::-1]])
    m = classification_metrics(y, s, ["ok", "all_pos", "no_labels", "ok2"])
    assert m.skipped_tasks == ["all_pos", "no_labels"] and m.n_skipped == 2 and m.n_scored == 2
    assert "all_pos" not in m.per_task  # never scored, not 0.5, not 0
    assert m.value == pytest.approx(np.mean([roc_auc_score(Y1, S1), roc_auc_score(Y1, S1[::-1])]))
    flat = m.to_mlflow("test_")
    assert flat["test_roc_auc"] == pytest.approx(m.value)
    assert flat["test_n_tasks_skipped"] == 2 and flat["test_n_tasks_scored"] == 2
    assert "test_roc_auc/ok" in flat and not any("all_pos" in k for k in flat)


def test_all_tasks_one_class_gives_nan_and_no_headline_metric():
    m = classification_metrics(np.zeros((5, 2)), RNG.random((5, 2)))
    assert math.isnan(m.value) and m.n_skipped == 2
    assert "valid_roc_auc" not in m.to_mlflow("valid_")


def test_regression_equals_sklearn_with_nan_mask():
    y = RNG.normal(size=(30, 2))
    p = y + RNG.normal(scale=0.3, size=(30, 2))
    y[[1, 4, 7], 0] = np.nan
    m = regression_metrics(y, p, ["logS", "logD"])
    rm, ma = [], []
    for t in range(2):
        mask = ~np.isnan(y[:, t])
        rm.append(np.sqrt(mean_squared_error(y[mask, t], p[mask, t])))
        ma.append(mean_absolute_error(y[mask, t], p[mask, t]))
    assert m.per_task["logS"]["rmse"] == pytest.approx(rm[0]) and m.per_task["logD"]["mae"] == pytest.approx(ma[1])
    assert m.values["rmse"] == pytest.approx(np.mean(rm)) and m.values["mae"] == pytest.approx(np.mean(ma))
    assert m.metric == "rmse" and m.value == m.values["rmse"]
    assert evaluate("regression", y, p, metric="mae").value == pytest.approx(np.mean(ma))
    flat = m.to_mlflow("valid_")
    assert set(flat) >= {"valid_rmse", "valid_mae", "valid_rmse/logS", "valid_mae/logD"}


def test_regression_in_original_units_via_scaler():
    y = np.array([[-3.0], [-1.0], [0.5], [np.nan], [2.0]])
    sc = TargetScaler.fit(y)
    z = sc.transform(y)
    assert np.nanmean(z) == pytest.approx(0.0) and np.nanstd(z) == pytest.approx(1.0)
    np.testing.assert_allclose(sc.inverse(z), y)
    pred_std_units = z + 0.1
    m = regression_metrics(y, sc.inverse(pred_std_units))
    assert m.value == pytest.approx(0.1 * sc.std[0])


def test_shapes_and_bad_labels():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="0/1"):
        classification_metrics(np.array([0, 1, 2.0]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(Y1, np.where(np.arange(10) == 3, np.nan, S1))


def test_mean_std_and_seed_aggregation():
    ms = mean_std([0.70, 0.72, float("nan"), None, 0.74])
    assert ms.n == 3 and ms.mean == pytest.approx(0.72) and ms.std == pytest.approx(np.std([0.70, 0.72, 0.74]))
    assert mean_std([0.7, 0.72, 0.74], ddof=1).std == pytest.approx(np.std([0.70, 0.72, 0.74], ddof=1))
    assert mean_std([]).n == 0 and math.isnan(mean_std([]).mean)
    assert mean_std([0.5]).n == 1 and mean_std([0.5]).std == 0.0
    agg = aggregate_seeds([{"test_rmse": 1.0, "test_mae": 0.8}, {"test_rmse": 1.2}])
    assert agg["test_rmse"].mean == pytest.approx(1.1) and agg["test_mae"].n == 1
    summary = parent_summary([{"test_roc_auc": 0.7, "valid_roc_auc": 0.8, "test_roc_auc/x": 0.6},
                              {"test_roc_auc": 0.8, "valid_roc_auc": 0.9}])
    assert summary["n_seeds"] == 2 and summary["test_roc_auc_mean"] == pytest.approx(0.75)
    assert summary["test_roc_auc_std"] == pytest.approx(0.05) and "test_roc_auc/x_mean" not in summary


def test_direction_and_keys():
    assert higher_is_better("roc_auc") and higher_is_better("test_roc_auc")
    assert not higher_is_better("rmse") and not higher_is_better("valid_mae")
    assert is_better(0.8, 0.7, "roc_auc") and is_better(0.5, 0.7, "rmse") and is_better(0.5, None, "rmse")
    assert not is_better(float("nan"), 0.7, "roc_auc")
    assert metric_key("Injury, poisoning and procedural complications") == \
        "Injury_ poisoning and procedural complications"
    assert metric_key("Neoplasms benign, malignant (incl cysts)") == "Neoplasms benign_ malignant _incl cysts_"
