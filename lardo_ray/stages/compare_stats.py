"""What the compare table cannot say by itself: seed ensembles and the paired bootstrap of the best pre-trained
method against the best baseline, read back from the seeds' logged test predictions."""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any

from lardo_ray.finetune.metrics import (
    METRIC_LABELS,
    evaluate,
    higher_is_better,
)
from lardo_ray.finetune.settings import CompareConfig
from lardo_ray.stages.compare_table import _dataset_display, _dataset_order, _present, _scale, _tracking_uri
from lardo_ray.tracking import (
    TAG_ENCODER,
    TAG_PREDICTIONS,
)

if TYPE_CHECKING:
    import pandas as pd

    from lardo_ray.finetune.bootstrap import PairedBootstrap

log = logging.getLogger("lardo_ray")


class _Predictions:
    """Each seed run's logged test predictions (Parquet artifacts), downloaded once per run."""

    def __init__(self, uri: str):
        self.uri = uri
        self._cache: dict[str, Any] = {}
        # one progress bar per tiny Parquet file would bury the table in the terminal
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def tables(self, name: str, runs: pd.DataFrame) -> list[pd.DataFrame]:
        import mlflow
        import pandas as pd

        out = []
        for rid, run in runs.iterrows():
            if rid not in self._cache:
                art = run.get(f"tags.{TAG_PREDICTIONS}")
                if not _present(art):
                    raise ValueError(f"run {rid} of {name} logged no test predictions")
                with _tracking_uri(self.uri):
                    local = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=str(art),
                                                                tracking_uri=self.uri)
                self._cache[rid] = pd.read_parquet(local)
            out.append(self._cache[rid])
        return out


def seed_ensembles(children: pd.DataFrame, table: pd.DataFrame, predictions: _Predictions,
                   notes: list[str]) -> dict[int, float]:
    """Per measured cell (index of ``table``): the test score of its seeds' predictions averaged (a seed
    ensemble), with the same metric code. Cells whose runs logged no predictions are left out, and said."""
    from lardo_ray.finetune.bootstrap import seed_average

    out: dict[int, float] = {}
    by_id = children.set_index("run_id") if len(children) else None
    missing: list[str] = []
    for i, r in table.iterrows():
        if r["published"] or r["source"] != "runs" or by_id is None:
            continue
        ids = [x for x in str(r["run_ids"]).split(";") if x and x in by_id.index]
        if len(ids) < 2:
            continue
        try:
            rows, y, pred, tasks = seed_average(predictions.tables(str(r["method"]), by_id.loc[ids]))
        except Exception as e:  # noqa: BLE001 - no predictions: no ensemble cell, the rest stands
            missing.append(f"{r['dataset']}/{r['method']} ({type(e).__name__})")
            continue
        task_type = "classification" if r["metric"] == "roc_auc" else "regression"
        out[i] = evaluate(task_type, y, pred, tasks, str(r["metric"])).value
    if missing:
        notes.append("no seed ensemble (no logged test predictions): " + ", ".join(missing[:10]))
    return out


def ensemble_markdown(table: pd.DataFrame) -> str:
    """Datasets x methods: single models (mean over seeds) next to the seed ensemble."""
    sub = table[table["ensemble"].notna()]
    if sub.empty:
        return ""
    methods = sorted(dict.fromkeys(sub["method"]), key=str.lower)
    lines = ["**Seed ensembles** (each method's test predictions averaged over its seeds, then scored; the "
             "single-model mean over seeds in brackets; best ensemble per dataset in bold)", "",
             "| Dataset | Metric | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for ds in sorted(dict.fromkeys(sub["dataset"]), key=_dataset_order):
        rows = sub[sub["dataset"] == ds]
        metric = str(rows["metric"].iloc[0])
        scale, d, _ = _scale(metric)
        best = rows["ensemble"].max() if higher_is_better(metric) else rows["ensemble"].min()
        cells = []
        for m in methods:
            hit = rows[rows["method"] == m]
            if hit.empty:
                cells.append("–")
                continue
            e, single = float(hit["ensemble"].iloc[0]), float(hit["mean"].iloc[0])
            text = f"{e * scale:.{d}f} ({single * scale:.{d}f})"
            cells.append(f"**{text}**" if abs(e - best) <= 1e-12 else text)
        lines.append(f"| {_dataset_display(ds)} | {METRIC_LABELS.get(metric, metric)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bootstrap_comparisons(children: pd.DataFrame, table: pd.DataFrame, cfg: CompareConfig, uri: str, notes: list[str],
                          predictions: _Predictions | None = None) -> list[PairedBootstrap]:
    """Per dataset: the best pre-trained method and the best baseline, each chosen on its mean validation
    score (never on test), compared by a paired bootstrap of their seed-averaged test predictions."""
    import pandas as pd

    from lardo_ray.finetune.bootstrap import paired_bootstrap, seed_average

    predictions = predictions or _Predictions(uri)

    out: list[PairedBootstrap] = []
    by_id = children.set_index("run_id") if len(children) else None
    measured = table[~table["published"] & (table["source"] == "runs")] if len(table) else table
    for ds, rows in measured.groupby("dataset", sort=False):
        metric = str(rows["metric"].iloc[0])
        vcol = f"metrics.valid_{metric}"

        def side(want: str) -> tuple[float, str, pd.DataFrame] | None:
            if by_id is None:  # no child runs: no side to pick
                return None
            best: tuple[float, str, pd.DataFrame] | None = None
            for _, r in rows.iterrows():
                ids = [i for i in str(r["run_ids"]).split(";") if i and i in by_id.index]
                if not ids:
                    continue
                runs = by_id.loc[ids]
                enc = runs.get(f"tags.{TAG_ENCODER}", pd.Series([""] * len(runs))).fillna("").astype(str)
                classical = str(r["method"]) in cfg.baseline_methods
                kind = "classical" if classical else ("pretrained" if bool((enc != "").any()) else "scratch")
                if kind != want or vcol not in runs.columns:
                    continue
                v = runs[vcol].astype(float).mean()
                if math.isnan(v):
                    continue
                if best is None or (v > best[0] if higher_is_better(metric) else v < best[0]):
                    best = (v, str(r["method"]), runs)
            return best

        a = side("pretrained")
        if a is None:
            continue
        # against what a user would fit instead, then against the same GNN without pre-training
        for against in ("classical", "scratch"):
            b = side(against)
            if b is None:
                notes.append(f"{ds}: no {against} method to bootstrap against")
                continue
            try:
                sides = [seed_average(predictions.tables(name, runs)) for _, name, runs in (a, b)]
                task_type = "classification" if metric == "roc_auc" else "regression"
                res = paired_bootstrap(ds, task_type, metric, sides[0], sides[1], (a[1], b[1]), cfg.bootstrap)
                res.against = against
                out.append(res)
            except Exception as e:  # noqa: BLE001 - a missing artifact costs the interval, not the table
                notes.append(f"{ds}: no bootstrap interval vs {against} ({type(e).__name__}: {str(e)[:200]})")
    return out


def bootstrap_markdown(boot: list[PairedBootstrap], n: int) -> str:
    lines = [f"**Best pre-trained method vs the best classical baseline, and vs the best GNN from scratch** "
             f"(each side chosen on validation; paired bootstrap, {n:,} resamples of the test molecules, predictions "
             "averaged over seeds; Δ > 0: pre-trained better; a win or loss only when the 95 % interval excludes 0)",
             "", "| Dataset | Metric | Against | Pre-trained | Other | Δ | 95 % interval | Verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for b in boot:
        scale, d = (100.0, 1) if b.metric == "roc_auc" else (1.0, 3)
        against = {"classical": "classical baseline", "scratch": "GNN from scratch"}.get(b.against, b.against)
        lines.append(f"| {_dataset_display(b.dataset)} | {METRIC_LABELS.get(b.metric, b.metric)} | {against} | "
                     f"{b.method_a} ({b.value_a * scale:.{d}f}) | {b.method_b} ({b.value_b * scale:.{d}f}) | "
                     f"{b.diff * scale:+.{d}f} | [{b.low * scale:+.{d}f}, {b.high * scale:+.{d}f}] | "
                     f"**{b.verdict}** |")
    return "\n".join(lines)


