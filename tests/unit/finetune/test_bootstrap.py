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
