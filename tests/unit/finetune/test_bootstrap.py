"""The paired bootstrap of compare: a tie is a tie, a real gap is a win, and the sign follows the metric."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lardo_ray.finetune.bootstrap import paired_bootstrap, seed_average


def _side(rows, y, preds_per_seed):
    tables = [pd.DataFrame({"row": rows, "y_t": y, "pred_t": p}) for p in preds_per_seed]
    return seed_average(tables)


def test_identical_predictions_tie_and_a_better_model_wins():
    rng = np.random.default_rng(0)
    rows = np.arange(300)
    y = rng.integers(0, 2, 300).astype(float)
    good = y * 0.6 + rng.random(300) * 0.5  # informative
    noise = rng.random(300)
    a = _side(rows, y, [good, good + 0.01])
    same = paired_bootstrap("toy", "classification", "roc_auc", a, a, ("x", "x"), 300)
    assert same.diff == 0 and same.low == same.high == 0 and same.verdict == "tie"
    b = _side(rows[::-1], y[::-1], [noise[::-1]])  # another row order: paired by row, not by position
    win = paired_bootstrap("toy", "classification", "roc_auc", a, b, ("pre", "base"), 300)
    assert win.verdict == "win" and win.low > 0 and win.value_a > 0.9 > 0.6 > win.value_b
    loss = paired_bootstrap("toy", "classification", "roc_auc", b, a, ("base", "pre"), 300)
    assert loss.verdict == "loss" and loss.high < 0


def test_lower_rmse_is_a_positive_difference():
    rng = np.random.default_rng(1)
    rows = np.arange(200)
    y = rng.normal(size=200)
    close, far = y + rng.normal(scale=0.1, size=200), y + rng.normal(scale=1.0, size=200)
    r = paired_bootstrap("toy", "regression", "rmse", _side(rows, y, [close]), _side(rows, y, [far]),
                         ("pre", "base"), 300)
    assert r.diff > 0 and r.verdict == "win" and r.value_a < r.value_b


def test_seeds_on_different_test_sets_are_refused():
    t1 = pd.DataFrame({"row": [0, 1, 2], "y_t": [0.0, 1, 0], "pred_t": [0.1, 0.9, 0.2]})
    t2 = pd.DataFrame({"row": [0, 1, 3], "y_t": [0.0, 1, 0], "pred_t": [0.1, 0.9, 0.2]})
    with pytest.raises(ValueError, match="different molecules"):
        seed_average([t1, t2])


@pytest.mark.parametrize("task_type, metric", [("classification", "roc_auc"), ("regression", "rmse"),
                                               ("regression", "mae")])
def test_resampled_scores_equal_the_metric_code_on_each_resample(task_type, metric):
    """The bootstrap scores all resamples at once by weighting rows with their draw counts; each value must
    be what ``evaluate`` gives on that resample's rows: ties in the scores, NaN labels, a task that a resample
    leaves with one class (skipped there) and a task with no labels at all."""
    from lardo_ray.finetune.metrics import evaluate, resampled_values

    rng = np.random.default_rng(3)
    n, k = 40, 4
    if task_type == "classification":
        y = rng.integers(0, 2, (n, k)).astype(float)
        y[:, 2] = 0.0
        y[:3, 2] = 1.0  # rare positives: many resamples hold none
        pred = np.round(rng.random((n, k)), 1)  # ties
    else:
        y = rng.normal(size=(n, k))
        pred = y + rng.normal(size=(n, k))
    y[rng.random((n, k)) < 0.3] = np.nan
    y[:, 3] = np.nan
    idx = rng.integers(0, n, (200, n))
    counts = np.stack([np.bincount(i, minlength=n) for i in idx])
    got = resampled_values(task_type, metric, y, pred, counts)
    want = np.array([evaluate(task_type, y[i], pred[i], None, metric).value for i in idx])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    if task_type == "classification":
        assert any(np.unique(y[i, 2][~np.isnan(y[i, 2])]).size < 2 for i in idx)  # the skip was exercised


def test_a_resample_where_no_task_can_be_scored_is_nan():
    from lardo_ray.finetune.metrics import resampled_values

    y = np.array([[0.0], [1.0]])
    got = resampled_values("classification", "roc_auc", y, np.array([[0.2], [0.7]]), np.array([[2, 0], [1, 1]]))
    assert np.isnan(got[0]) and got[1] == 1.0
