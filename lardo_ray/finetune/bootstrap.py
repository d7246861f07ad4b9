"""Paired bootstrap of the test molecules: is the best pre-trained method really ahead of the best baseline?

Three seeds on one fixed split vary only the initialisation, and a MoleculeNet test set holds a few hundred
molecules: a mean ± std over seeds says nothing about how much the number would move on other molecules.
Here each method's test predictions are averaged over its seeds, then the same resample of the test
molecules (with replacement) is scored for both methods with the metric code of every other number
(``lardo_ray.finetune.metrics.evaluate``); the 2.5 / 97.5 percentiles of the difference are the 95 % interval.
The difference is oriented so that > 0 means the pre-trained method is better (higher ROC-AUC, lower RMSE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lardo_ray.finetune.metrics import evaluate, higher_is_better, resampled_values


@dataclass
class PairedBootstrap:
    dataset: str
    metric: str
    method_a: str  # the pre-trained method
    method_b: str  # the baseline
    value_a: float  # on the whole test set, seed-averaged predictions
    value_b: float
    diff: float  # a better than b by this much (sign: > 0 = a better)
    low: float
    high: float
    n_test: int
    n_resamples: int
    against: str = "baseline"  # classical (rf_*, chemprop) | scratch (the GNN without pre-training)

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return "win"
        if self.high < 0:
            return "loss"
        return "tie"

    def to_row(self) -> dict:
        return {"dataset": self.dataset, "metric": self.metric, "against": self.against, "pretrained": self.method_a,
                "baseline": self.method_b, "pretrained_value": self.value_a, "baseline_value": self.value_b,
                "diff": self.diff, "ci_low": self.low, "ci_high": self.high, "verdict": self.verdict,
                "n_test": self.n_test, "n_resamples": self.n_resamples}


def seed_average(tables: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(rows, y, mean prediction, task names) from per-seed prediction tables (pandas) of one method."""
    first = tables[0]
    tasks = [c[len("y_"):] for c in first.columns if c.startswith("y_")]
    rows = np.asarray(first["row"], dtype=np.int64)
    for t in tables[1:]:
        if not np.array_equal(np.sort(np.asarray(t["row"])), np.sort(rows)):
            raise ValueError("the seeds were tested on different molecules (a split that changes per seed): "
                             "a paired bootstrap needs one test set")
    order = np.argsort(rows)
    rows = rows[order]
    y = first[[f"y_{k}" for k in tasks]].to_numpy(np.float64)[order]
    preds = []
    for t in tables:
        o = np.argsort(np.asarray(t["row"]))
        preds.append(t[[f"pred_{k}" for k in tasks]].to_numpy(np.float64)[o])
    return rows, y, np.mean(preds, axis=0), tasks


def paired_bootstrap(dataset: str, task_type: str, metric: str, a: tuple, b: tuple, names: tuple[str, str],
                     n_resamples: int = 1000, seed: int = 0) -> PairedBootstrap:
    """``a``, ``b``: (rows, y, pred, tasks) of ``seed_average``; paired on the rows both were tested on."""
    rows_a, y, pa_, tasks = a
    rows_b, _, pb_, _ = b
    common, ia, ib = np.intersect1d(rows_a, rows_b, return_indices=True)
    if len(common) == 0:
        raise ValueError(f"{dataset}: {names[0]} and {names[1]} share no test molecule")
    y, pa_, pb_ = y[ia], pa_[ia], pb_[ib]
    sign = 1.0 if higher_is_better(metric) else -1.0

    va = evaluate(task_type, y, pa_, tasks, metric).value
    vb = evaluate(task_type, y, pb_, tasks, metric).value
    rng = np.random.default_rng(seed)
    n = len(common)
    diffs: list[float] = []
    # in blocks: a (resamples x molecules) count matrix of ToxCast's test set at once is fine, of a
    # 100k-molecule test set it is not
    block = max(1, min(n_resamples, 2_000_000 // max(n, 1)))
    for start in range(0, n_resamples, block):
        m = min(block, n_resamples - start)
        idx = rng.integers(0, n, (m, n))
        counts = np.bincount((np.arange(m)[:, None] * n + idx).ravel(), minlength=m * n).reshape(m, n)
        da = resampled_values(task_type, metric, y, pa_, counts)
        db = resampled_values(task_type, metric, y, pb_, counts)
        ok = np.isfinite(da) & np.isfinite(db)  # a resample may leave every task with one class: not scorable
        diffs.extend((sign * (da[ok] - db[ok])).tolist())
    lo, hi = (np.percentile(diffs, [2.5, 97.5]) if diffs else (np.nan, np.nan))
    return PairedBootstrap(dataset=dataset, metric=metric, method_a=names[0], method_b=names[1], value_a=va,
                           value_b=vb, diff=sign * (va - vb), low=float(lo), high=float(hi), n_test=len(common),
                           n_resamples=len(diffs))
