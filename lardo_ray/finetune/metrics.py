"""Scores of one split, and mean ± std over seeds.

Classification: ROC-AUC per task over the rows that have a label (NaN = missing, masked); a task whose
labelled rows in this split hold one class only cannot be scored and is *skipped and counted*
(``skipped_tasks``), never given a placeholder value. The headline is the mean over the scored tasks (as
MolCLR / chemprop / pretrain-gnns). Regression: RMSE and MAE per task over labelled rows, the headline is
the mean over tasks; pass predictions in the original units (``TargetScaler.inverse`` undoes the
standardisation a trainer applies).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

HIGHER_IS_BETTER = {"roc_auc": True, "prc_auc": True, "accuracy": True, "rmse": False, "mae": False}
METRIC_LABELS = {"roc_auc": "ROC-AUC", "prc_auc": "PRC-AUC", "rmse": "RMSE", "mae": "MAE"}


def higher_is_better(metric: str) -> bool:
    m = metric.removeprefix("test_").removeprefix("valid_")
    if m not in HIGHER_IS_BETTER:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[m]


def default_metric(task_type: str) -> str:
    """roc_auc for classification, rmse for regression."""
    if task_type == "classification":
        return "roc_auc"
    if task_type == "regression":
        return "rmse"
    raise ValueError(f"task_type must be classification or regression, got {task_type!r}")


_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_key(name: str) -> str:
    """An MLflow-safe metric-name part (MLflow allows alphanumerics, _ - . space /): SIDER task names hold
    commas and parentheses."""
    return _BAD_KEY_CHARS.sub("_", str(name)).strip() or "_"


def _as_2d(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (n, n_tasks), got shape {arr.shape}")
    return arr


def _check(y_true, y_pred, task_names) -> tuple[np.ndarray, np.ndarray, list[str]]:
    yt, yp = _as_2d(y_true, "y_true"), _as_2d(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} differ in shape")
    names = [str(t) for t in task_names] if task_names is not None else [f"task_{i}" for i in range(yt.shape[1])]
    if len(names) != yt.shape[1]:
        raise ValueError(f"{len(names)} task names for {yt.shape[1]} tasks")
    return yt, yp, names


@dataclass
class TaskMetrics:
    """Scores of one model on one split."""

    task_type: str
    metric: str  # headline name: roc_auc | rmse
    value: float  # headline: mean over scored tasks (NaN when none could be scored)
    values: dict[str, float]  # every summary metric, e.g. {"roc_auc": ...} or {"rmse": ..., "mae": ...}
    per_task: dict[str, dict[str, float]]  # task -> {metric: value}, scored tasks only
    skipped_tasks: list[str] = field(default_factory=list)  # tasks with one class only / no labels here
    n_tasks: int = 0

    @property
    def n_scored(self) -> int:
        return len(self.per_task)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped_tasks)

    def to_mlflow(self, prefix: str = "test_", per_task: bool = True) -> dict[str, float]:
        """Flat metrics for MLflow: ``<prefix><metric>`` (e.g. test_roc_auc, test_rmse, test_mae),
        ``<prefix>n_tasks_scored`` / ``<prefix>n_tasks_skipped`` and, with ``per_task``, one
        ``<prefix><metric>/<task>`` per scored task of a multi-task set. NaN summaries are left out."""
        out = {f"{prefix}{k}": float(v) for k, v in self.values.items() if not math.isnan(v)}
        out[f"{prefix}n_tasks_scored"] = float(self.n_scored)
        out[f"{prefix}n_tasks_skipped"] = float(self.n_skipped)
        if per_task and self.n_tasks > 1:
            for task, vals in self.per_task.items():
                for k, v in vals.items():
                    out[f"{prefix}{k}/{metric_key(task)}"] = float(v)
        return out


def classification_metrics(y_true, y_score, task_names: Sequence[str] | None = None) -> TaskMetrics:
    """ROC-AUC per task (NaN labels masked; one-class tasks skipped and counted) and their mean.

    ``y_score`` may be probabilities or logits (ROC-AUC only uses the ranking)."""
    from sklearn.metrics import roc_auc_score

    yt, ys, names = _check(y_true, y_score, task_names)
    per_task: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for t, name in enumerate(names):
        mask = ~np.isnan(yt[:, t])
        labels = yt[mask, t]
        if labels.size and not np.isin(labels, (0.0, 1.0)).all():
            raise ValueError(f"task {name!r}: classification labels must be 0/1, found {np.unique(labels)[:5]}")
        if labels.size == 0 or np.unique(labels).size < 2:
            skipped.append(name)
            continue
        scores = ys[mask, t]
        if not np.isfinite(scores).all():
            raise ValueError(f"task {name!r}: predictions hold NaN/inf where a label exists")
        per_task[name] = {"roc_auc": float(roc_auc_score(labels, scores))}
    value = float(np.mean([v["roc_auc"] for v in per_task.values()])) if per_task else float("nan")
    return TaskMetrics("classification", "roc_auc", value, {"roc_auc": value}, per_task, skipped, len(names))


def regression_metrics(y_true, y_pred, task_names: Sequence[str] | None = None) -> TaskMetrics:
    """RMSE and MAE per task over labelled rows (NaN masked) and their means over tasks (original units)."""
    yt, yp, names = _check(y_true, y_pred, task_names)
    per_task: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for t, name in enumerate(names):
        mask = ~np.isnan(yt[:, t])
        if not mask.any():
            skipped.append(name)
            continue
        err = yp[mask, t] - yt[mask, t]
        if not np.isfinite(err).all():
            raise ValueError(f"task {name!r}: predictions hold NaN/inf where a label exists")
        per_task[name] = {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}
    rmse = float(np.mean([v["rmse"] for v in per_task.values()])) if per_task else float("nan")
    mae = float(np.mean([v["mae"] for v in per_task.values()])) if per_task else float("nan")
    return TaskMetrics("regression", "rmse", rmse, {"rmse": rmse, "mae": mae}, per_task, skipped, len(names))


def evaluate(task_type: str, y_true, y_pred, task_names: Sequence[str] | None = None,
             metric: str | None = None) -> TaskMetrics:
    """Classification or regression scores; ``metric`` picks the headline (rmse or mae for regression)."""
    if task_type == "classification":
        out = classification_metrics(y_true, y_pred, task_names)
    elif task_type == "regression":
        out = regression_metrics(y_true, y_pred, task_names)
    else:
        raise ValueError(f"task_type must be classification or regression, got {task_type!r}")
    if metric is not None and metric != out.metric:
        if metric not in out.values:
            raise ValueError(f"metric {metric!r} is not computed for {task_type}")
        out.metric, out.value = metric, out.values[metric]
    return out


def resampled_values(task_type: str, metric: str, y_true, y_pred, counts) -> np.ndarray:
    """The headline ``metric`` of many resamples of the rows at once, equal to ``evaluate`` on each.

    ``counts`` (n_resamples, n_rows) says how often each row is drawn (a bootstrap resample with
    replacement): scoring ``y[idx]`` equals scoring every row weighted by its count. Same rules as
    ``evaluate``: NaN labels masked, a task with one class (or no labels) in a resample skipped, the
    headline the mean over the scored tasks, NaN when none is. Why not call ``evaluate`` per resample:
    ToxCast's 617 tasks x 1,000 resamples x two methods is 1.2 M ``roc_auc_score`` calls (40 min);
    this is ranks and cumulative sums over the resamples (seconds)."""
    yt, yp, _ = _check(y_true, y_pred, None)
    w = np.asarray(counts, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != yt.shape[0]:
        raise ValueError(f"counts must be (n_resamples, {yt.shape[0]}), got {w.shape}")
    if metric not in ({"roc_auc"} if task_type == "classification" else {"rmse", "mae"}):
        raise ValueError(f"metric {metric!r} is not computed for {task_type}")
    per_task = np.full((w.shape[0], yt.shape[1]), np.nan)
    for t in range(yt.shape[1]):
        mask = ~np.isnan(yt[:, t])
        if not mask.any():
            continue
        labels, scores, wt = yt[mask, t], yp[mask, t], w[:, mask]
        if not np.isfinite(scores).all():
            raise ValueError(f"task {t}: predictions hold NaN/inf where a label exists")
        with np.errstate(invalid="ignore", divide="ignore"):
            if task_type == "regression":
                err = scores - labels
                total = wt.sum(axis=1)
                vals = (np.sqrt(wt @ err**2 / total) if metric == "rmse" else wt @ np.abs(err) / total)
                per_task[:, t] = np.where(total > 0, vals, np.nan)
                continue
            order = np.argsort(scores, kind="stable")
            s, pos, ws = scores[order], labels[order] == 1.0, wt[:, order]
            # negatives' weight below each position (exclusive cumulative sum), and at each tie group's ends
            neg_cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(ws * ~pos, axis=1)], axis=1)
            starts = np.searchsorted(s, s, side="left")
            ends = np.searchsorted(s, s, side="right")
            below, tied = neg_cum[:, starts], neg_cum[:, ends] - neg_cum[:, starts]
            w_pos, w_neg = (ws * pos).sum(axis=1), (ws * ~pos).sum(axis=1)
            auc = ((ws * pos) * (below + 0.5 * tied)).sum(axis=1) / (w_pos * w_neg)
            per_task[:, t] = np.where((w_pos > 0) & (w_neg > 0), auc, np.nan)
    scored = ~np.isnan(per_task)
    n = scored.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(per_task, axis=1) / n, np.nan)


def is_better(new: float, best: float | None, metric: str) -> bool:
    """Model selection on validation: True when ``new`` beats ``best`` (None / NaN best = anything wins)."""
    if new is None or math.isnan(new):
        return False
    if best is None or math.isnan(best):
        return True
    return new > best if higher_is_better(metric) else new < best


class MeanStd(NamedTuple):
    mean: float
    std: float
    n: int

    def format(self, scale: float = 1.0, digits: int = 3) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        if self.n == 1 or math.isnan(self.std):
            return f"{self.mean * scale:.{digits}f} (n=1)" if self.n == 1 else f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f} (n={self.n})"


def mean_std(values: Iterable[float | None], ddof: int = 0) -> MeanStd:
    """Mean and standard deviation over seeds, NaN/None ignored. ddof=0 (population std) as MolCLR and
    chemprop report; pass ddof=1 for the sample std. std is NaN with fewer than ddof+1 values."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(float(x))], dtype=np.float64)
    if v.size == 0:
        return MeanStd(float("nan"), float("nan"), 0)
    std = float(np.std(v, ddof=ddof)) if v.size > ddof else float("nan")
    return MeanStd(float(np.mean(v)), std, int(v.size))


def aggregate_seeds(per_seed: Sequence[Mapping[str, float]], ddof: int = 0) -> dict[str, MeanStd]:
    """{metric: MeanStd} over the per-seed metric dicts (a metric missing in a seed is not counted there)."""
    keys = list(dict.fromkeys(k for d in per_seed for k in d))
    return {k: mean_std((d.get(k) for d in per_seed), ddof) for k in keys}


def parent_summary(per_seed: Sequence[Mapping[str, float]], keys: Iterable[str] | None = None,
                   ddof: int = 0) -> dict[str, float]:
    """What the parent run logs after its seeds: ``<key>_mean``, ``<key>_std`` per key and ``n_seeds``.

    ``keys`` defaults to the test_/valid_ summary metrics (roc_auc, rmse, mae) found in the seeds."""
    agg = aggregate_seeds(per_seed, ddof)
    wanted = list(keys) if keys is not None else [
        k for k in agg
        if re.fullmatch(r"(test|valid)_(roc_auc|prc_auc|rmse|mae)", k)
    ]
    out: dict[str, float] = {"n_seeds": float(len(per_seed))}
    for k in wanted:
        if k in agg and agg[k].n:
            out[f"{k}_mean"] = agg[k].mean
            if not math.isnan(agg[k].std):
                out[f"{k}_std"] = agg[k].std
    return out


@dataclass
class TargetScaler:
    """Per-task standardisation of regression targets, fitted on the training rows (NaN ignored)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, y) -> TargetScaler:
        y = _as_2d(y, "y")
        mean, std = _nanmean0(y), _nanstd0(y)  # a task without labels: mean 0, std 1
        std = np.where((std == 0) | np.isnan(std), 1.0, std)
        return cls(mean=mean, std=std)

    def transform(self, y) -> np.ndarray:
        return (_as_2d(y, "y") - self.mean) / self.std

    def inverse(self, y) -> np.ndarray:
        return _as_2d(y, "y") * self.std + self.mean


def _nanmean0(y: np.ndarray) -> np.ndarray:
    cnt = (~np.isnan(y)).sum(axis=0)
    s = np.nansum(y, axis=0)
    return np.where(cnt > 0, s / np.maximum(cnt, 1), 0.0)


def _nanstd0(y: np.ndarray) -> np.ndarray:
    m = _nanmean0(y)
    cnt = (~np.isnan(y)).sum(axis=0)
    sq = np.nansum((y - m) ** 2, axis=0)
    return np.where(cnt > 0, np.sqrt(sq / np.maximum(cnt, 1)), 1.0)
