"""What a fine-tune returns: per-seed results of one (dataset, method), a grid of them, their tables and summaries."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lardo_ray.finetune.metrics import METRIC_LABELS, MeanStd, mean_std
from lardo_ray.finetune.splits import describe_split

if TYPE_CHECKING:
    import pandas as pd

    from lardo_ray.finetune.datasets import LabelledSet
    from lardo_ray.finetune.train import SeedResult

log = logging.getLogger("lardo_ray")



def last_line(err: str, limit: int = 300) -> str:
    """The line of an error text that says what went wrong (a traceback's last line)."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else str(err))[:limit]



def write_predictions(path: str, data: LabelledSet, test_index: np.ndarray, test_pred: np.ndarray) -> None:
    """One seed's test predictions as Parquet: row (index in the labelled set), smiles, then y_<task> and
    pred_<task> (probability / value in the original units) per task. Compare's bootstrap pairs methods by row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    idx = np.asarray(test_index, dtype=np.int64)
    cols: dict[str, Any] = {"row": idx, "smiles": [data.smiles[i] for i in idx]}
    for t, name in enumerate(data.task_names):
        cols[f"y_{name}"] = data.labels[idx, t].astype(np.float64)
        cols[f"pred_{name}"] = np.asarray(test_pred, dtype=np.float64)[:, t]
    pq.write_table(pa.table(cols), path)


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """One (dataset, method, split): per-seed results, mean ± std, where it was logged."""

    dataset: str
    method: str
    split: str
    split_sizes: list[float]
    task_type: str
    metric: str
    seeds: list[SeedResult] = field(default_factory=list)  # finished seeds, sorted by seed
    failed: dict[int, str] = field(default_factory=dict)  # seed -> error text
    encoder: str | None = None  # finetune.encoder as given (None = random init)
    baseline: str | None = None  # rf_dsm / rf_ecfp for a classical baseline (lardo_ray.finetune.baselines)
    encoder_run_id: str = ""
    encoder_sha256: str = ""
    architecture: str = ""
    n_molecules: int = 0
    n_tasks: int = 0
    n_dropped: int = 0  # rows of the file left out (unparsable SMILES, featuriser rejections)
    featurize_seconds: float = 0.0
    wall_seconds: float = 0.0
    parent_run_id: str | None = None
    child_run_ids: dict[int, str] = field(default_factory=dict)
    experiment: str | None = None
    tracking_uri: str | None = None
    csv_path: str | None = None  # where the per-seed table was written (local path or URI)
    csv_local: str | None = None  # the same file on this machine
    predictions_local: dict[int, str] = field(default_factory=dict)  # seed -> its test predictions (Parquet)
    not_logged: list[str] = field(default_factory=list)
    model_uri: str | None = None  # the seed ensemble as an MLflow model (runs:/<parent>/model)
    registered: str | None = None  # models:/<dataset>-<method>/<version>
    model_note: str | None = None  # why no model was saved, when it was not

    @property
    def ok(self) -> bool:
        return bool(self.seeds) and not self.failed

    @property
    def split_description(self) -> str:
        return describe_split(self.split, self.split_sizes)

    def failures(self) -> list[str]:
        """One line per failed seed: what failed and why (the CLI prints them and exits non-zero)."""
        return [f"finetune {self.dataset}/{self.method} seed {s}: {last_line(e)}" for s, e in sorted(self.failed.items())]

    def summary(self) -> dict[str, MeanStd]:
        """test_<m> / valid_<m> (and test_mae / valid_mae for regression) -> mean ± std over the seeds."""
        keys = [f"test_{self.metric}", f"valid_{self.metric}"]
        if self.task_type == "regression":
            keys += [k for k in ("test_rmse", "test_mae", "valid_rmse", "valid_mae") if k not in keys]
        out: dict[str, MeanStd] = {}
        for k in keys:
            part, m = k.split("_", 1)
            out[k] = mean_std([getattr(r, part).values.get(m) for r in self.seeds])
        return out

    @property
    def mean(self) -> float:
        return self.summary()[f"test_{self.metric}"].mean

    @property
    def std(self) -> float:
        return self.summary()[f"test_{self.metric}"].std

    @property
    def table(self) -> pd.DataFrame:
        """pandas DataFrame: one row per seed, then a 'mean' and a 'std' row."""
        import pandas as pd

        rows = []
        for r in self.seeds:
            row: dict[str, Any] = {"seed": str(r.seed)}
            for part in ("test", "valid"):
                for k, v in getattr(r, part).values.items():
                    row[f"{part}_{k}"] = v
            row.update({
                "best_epoch": r.best_epoch, "epochs_run": r.epochs_run, "selection": r.selection, "lr_scale": r.lr_scale,
                "train_seconds": r.timing.get("train_seconds"), "seconds_per_epoch": r.timing.get("seconds_per_epoch"),
                "n_train": r.n_train, "n_valid": r.n_valid, "n_test": r.n_test, "split_hash": r.split_hash,
                "run_id": self.child_run_ids.get(r.seed, ""),
            })  # fmt: skip
            rows.append(row)
        df = pd.DataFrame(rows)
        if len(df):
            num = [c for c in df.columns if c.startswith(("test_", "valid_"))]
            agg = {name: {c: getattr(mean_std(df[c].astype(float)), name) for c in num} for name in ("mean", "std")}
            df = pd.concat([df, pd.DataFrame([{"seed": k, **v} for k, v in agg.items()])], ignore_index=True)
            for c in ("best_epoch", "epochs_run", "n_train", "n_valid", "n_test"):
                df[c] = df[c].astype("Int64")
        return df

    def _fmt(self, ms: MeanStd, key: str) -> str:
        m = key.split("_", 1)[1]
        scale, digits, unit = (100.0, 1, " %") if m == "roc_auc" else (1.0, 3, "")
        if ms.n == 0:
            return "–"
        std = "" if math.isnan(ms.std) else f" ± {ms.std * scale:.{digits}f}"
        return f"{ms.mean * scale:.{digits}f}{std}{unit} (n={ms.n})"

    def lines(self) -> list[str]:
        label = METRIC_LABELS.get(self.metric, self.metric)
        out = [f"== finetune: {self.dataset} / {self.method} ==",
               f"  split          {self.split_description}"]
        if self.seeds:
            r0 = self.seeds[0]
            out.append(f"  data           {self.n_molecules:,} molecules, {self.n_tasks} task(s), {self.task_type}; "
                       f"train/valid/test {r0.n_train:,}/{r0.n_valid:,}/{r0.n_test:,} (seed {r0.seed})"
                       + (f"; {self.n_dropped} row(s) of the file left out" if self.n_dropped else ""))
        enc = f"{self.encoder} (MLflow run {self.encoder_run_id or 'unknown'}, sha256 {self.encoder_sha256[:12]})" \
            if self.encoder else "random init (no pre-training)"
        if self.baseline:
            out.append(f"  model          {self.architecture}")
        else:
            out.append(f"  encoder        {enc}; {self.architecture}")
        for r in self.seeds:
            pretty = f"{r.test.value * 100:.1f} %" if self.metric == "roc_auc" else f"{r.test.value:.3f}"
            vpretty = f"{r.valid.value * 100:.1f} %" if self.metric == "roc_auc" else f"{r.valid.value:.3f}"
            stop = " early stop" if r.stopped_early else ""
            how = "fixed hyper-parameters" if self.baseline else f"epoch {r.best_epoch}/{r.epochs_run}{stop}"
            out.append(f"  seed {r.seed:<9d} test {label} {pretty}  (valid {vpretty}, {how}, "
                       f"{r.timing.get('seed_seconds', 0):.1f} s)")
        for seed, err in sorted(self.failed.items()):
            out.append(f"  seed {seed:<9d} FAILED: {err.strip().splitlines()[-1][:200] if err.strip() else err}")
        for k, ms in self.summary().items():
            out.append(f"  {k:<14s} {self._fmt(ms, k)}   mean ± std (population std) over seeds")
        if self.parent_run_id:
            out.append(f"  MLflow         parent run {self.parent_run_id} in experiment {self.experiment!r} "
                       f"({self.tracking_uri})")
        if self.model_note:
            out.append(f"  model          {self.model_note}")
        if self.registered or self.model_uri:
            out.append(f"  model          {self.registered or self.model_uri}  (`lardo-ray predict --model "
                       f"{self.registered or self.model_uri} --input FILE`)")
        if self.csv_path:
            out.append(f"  table          {self.csv_path}")
        if self.not_logged:
            out.append(f"  not logged     {', '.join(self.not_logged[:5])}")
        out.append(f"  wall time      {self.wall_seconds:,.1f} s (featurize {self.featurize_seconds:.1f} s)")
        return out


@dataclass
class GridResult:
    """Every (dataset, method) of an ablation grid."""

    results: list[FinetuneResult]
    wall_seconds: float = 0.0
    same_splits: bool = True  # every method saw the same split per (dataset, seed)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def failures(self) -> list[str]:
        return [line for r in self.results for line in r.failures()]

    def get(self, dataset: str, method: str) -> FinetuneResult:
        for r in self.results:
            if r.dataset == dataset and r.method == method:
                return r
        raise KeyError((dataset, method))

    @property
    def table(self) -> pd.DataFrame:
        """pandas DataFrame: dataset, method, metric, mean, std, n, parent_run_id."""
        import pandas as pd

        return pd.DataFrame([{
            "dataset": r.dataset, "method": r.method, "split": r.split, "metric": r.metric,
            "mean": r.mean if r.seeds else float("nan"), "std": r.std if r.seeds else float("nan"),
            "n": len(r.seeds), "failed": len(r.failed), "parent_run_id": r.parent_run_id or "",
        } for r in self.results])  # fmt: skip

    def lines(self) -> list[str]:
        out: list[str] = []
        for r in self.results:
            out += r.lines()
        if self.results:
            r0 = self.results[0]
            out.append(f"== finetune grid: test score, mean ± std over seeds; {r0.split_description} ==")
            methods = list(dict.fromkeys(r.method for r in self.results))
            for ds in dict.fromkeys(r.dataset for r in self.results):
                cells = []
                for m in methods:
                    hit = [r for r in self.results if r.dataset == ds and r.method == m]
                    if hit and hit[0].seeds:
                        key = f"test_{hit[0].metric}"
                        cells.append(f"{m}: {hit[0]._fmt(hit[0].summary()[key], key)}")
                out.append(f"  {ds:<12s} " + "   ".join(cells))
            out.append(f"  same splits for every method: {'yes' if self.same_splits else 'NO'}; "
                       f"wall time {self.wall_seconds:,.1f} s")
        return out


