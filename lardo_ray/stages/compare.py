"""Stage compare: read fine-tune runs back from MLflow and build the dataset x method results table.

``compare(cfg)`` runs ``mlflow.search_runs`` on one experiment (any tracking URI: a sqlite file, a local
directory, a remote ``mlflow server``), groups the fine-tune runs by (dataset, method), computes
mean ± std over seeds, and writes ``<name>.csv`` (long form, machine-readable), ``<name>.md`` (the table,
best per dataset in bold) and ``<name>.png`` (bars with std error bars) to ``cfg.output_dir``.

MLflow contract (what the fine-tune stage logs, what this stage reads)
----------------------------------------------------------------------
Parent run, one per (dataset, method, split) — ``mlflow.start_run(run_name=f"{dataset}/{method}")``:

  tags     lardo.kind = finetune              (required: how compare finds the runs)
           lardo.role = parent
           lardo.dataset = <card key, e.g. bbbp; or the file stem of a custom set>
           lardo.method = <method label: FinetuneConfig.method_label(), e.g. random-init, lardo-gine>
           lardo.split = scaffold | scaffold_balanced | random | column
           lardo.encoder_run_id = <MLflow run id of the pre-training run, "" for random init>
           lardo.task_type = classification | regression
           lardo.metric = roc_auc | rmse | mae      (headline; optional)
  metrics  (optional, after the last seed; ``metrics.parent_summary(per_seed)`` builds them)
           test_<m>_mean, test_<m>_std, valid_<m>_mean, valid_<m>_std  for m in roc_auc | rmse, mae
           n_seeds

Child run, one per seed — ``mlflow.start_run(run_name=f"seed{seed}", nested=True)`` inside the parent
(MLflow then sets ``mlflow.parentRunId``):

  tags     lardo.kind = finetune, lardo.role = seed, lardo.seed = <int>
           and the parent's lardo.* tags (recommended; compare copies any missing one from the parent)
  metrics  test_roc_auc | test_rmse + test_mae          (the test split, at the best validation epoch)
           valid_roc_auc | valid_rmse + valid_mae       (the best validation score)
           test_n_tasks_scored, test_n_tasks_skipped, per task test_roc_auc/<task> (TaskMetrics.to_mlflow)
           best_epoch (optional)

``finetune_tags(...)`` returns these tags. ROC-AUC is logged as a fraction (0-1); the Markdown table and
the chart show it in percent, like the literature; the CSV keeps the logged scale.

Selection: per (dataset, method) group, ``source=auto`` uses the FINISHED child runs that have the metric
(one per seed; a seed run twice counts once, the latest); a group without such children falls back to the
parent's ``<subset>_<m>_mean`` / ``_std`` / ``n_seeds``. Runs of different splits are never mixed in one
cell: filter with ``cfg.split`` or add ``split`` to ``cfg.group_by``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lardo_ray import fs
from lardo_ray.config_base import ConfigError
from lardo_ray.finetune.metrics import (
    METRIC_LABELS,
    MeanStd,
    default_metric,
    evaluate,
    higher_is_better,
    mean_std,
)
from lardo_ray.finetune.settings import CompareConfig
from lardo_ray.finetune.splits import describe_split
from lardo_ray.tracking import (  # noqa: F401 - the compare contract's tag names, re-exported
    KIND_FINETUNE,
    PARENT_TAG,
    TAG_DATASET,
    TAG_ENCODER,
    TAG_ENCODER_RUN,
    TAG_KIND,
    TAG_METHOD,
    TAG_METRIC,
    TAG_PREDICTIONS,
    TAG_ROLE,
    TAG_SEED,
    TAG_SPLIT,
    TAG_TASK_MODE,
    TAG_TASK_TYPE,
    finetune_tags,
)

if TYPE_CHECKING:
    from lardo_ray.config import PipelineConfig

log = logging.getLogger("lardo_ray")


def _published() -> dict[str, dict[str, Any]]:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "data" / "published.yaml").read_text())



# Published figures (not re-run here; shown only with compare.include_published, always marked as
# published): lardo_ray/data/published.yaml, one entry per method with its source.
PUBLISHED: dict[str, dict[str, Any]] = _published()


@dataclass
class CompareResult:
    table: Any  # pandas.DataFrame, long form: one row per (dataset, method) cell
    wide: Any  # pandas.DataFrame of display strings: datasets x (metric, methods)
    markdown: str
    title: str
    csv_path: str | None = None
    markdown_path: str | None = None
    png_path: str | None = None
    n_runs: int = 0  # MLflow runs the numbers come from
    splits: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    local_files: list[str] = field(default_factory=list)  # the same files on this machine (for MLflow)
    bootstrap: list = field(default_factory=list)  # PairedBootstrap per dataset (lardo_ray.finetune.bootstrap)


# ---------------------------------------------------------------- reading MLflow


@contextlib.contextmanager
def _tracking_uri(uri: str | None):
    import mlflow

    if uri is None:
        yield mlflow.get_tracking_uri()
        return
    try:  # restores the caller's URI exactly, also when it was never set
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - older/newer MLflow
        prev = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(prev)
        return
    with _use_tracking_uri(uri):
        yield uri


def search_finetune_runs(cfg: CompareConfig):
    """All runs of the experiment (pandas, as mlflow.search_runs returns them)."""
    import mlflow
    from mlflow.entities import ViewType

    with _tracking_uri(cfg.tracking_uri) as uri:
        try:
            exp = mlflow.MlflowClient(uri).get_experiment_by_name(cfg.experiment)
        except Exception as e:  # noqa: BLE001 - unreachable server / bad URI: many exception types
            raise ConfigError(
                f"MLflow tracking store {uri!r} (compare.tracking_uri) is not reachable: "
                f"{type(e).__name__}: {str(e)[:300]}"
            ) from None
        if exp is None:
            raise ConfigError(f"MLflow experiment {cfg.experiment!r} not found at {uri!r} (compare.experiment)")
        df = mlflow.search_runs(
            experiment_ids=[exp.experiment_id],
            filter_string=cfg.filter_string or "",
            run_view_type=ViewType.ACTIVE_ONLY,
            output_format="pandas",
        )
    return df, uri


def _col(df, name: str):
    import pandas as pd

    if name in df.columns:
        return df[name]
    return pd.Series([None] * len(df), index=df.index, dtype=object)


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v) != ""


def _key_column(key: str) -> str:
    if key.startswith(("tags.", "params.", "metrics.")):
        return key
    return f"tags.lardo.{key}"


def _select_runs(df, cfg: CompareConfig, notes: list[str]):
    """(children, parents) DataFrames of fine-tune runs, children carrying the parent's missing tags."""
    kind = _col(df, f"tags.{TAG_KIND}")
    seed = _col(df, f"tags.{TAG_SEED}")
    has_seed = seed.map(_present)
    parents = df[(kind == KIND_FINETUNE) & ~has_seed].copy()
    children = df[has_seed].copy()
    if len(children):
        by_id = parents.set_index("run_id") if len(parents) else None
        parent_ids = _col(children, f"tags.{PARENT_TAG}")
        tag_cols = [c for c in df.columns if c.startswith("tags.lardo.")]
        for col in tag_cols:
            # object dtype: pandas >= 3 types an all-string column as `str` and refuses None/NaN fills
            children[col] = children[col].astype(object) if col in children.columns else None
            if by_id is None or col not in by_id.columns:
                continue
            fill = parent_ids.map(lambda pid, c=col: by_id[c].get(pid) if pid in by_id.index else None)
            missing = ~children[col].map(_present)
            children.loc[missing, col] = fill[missing]
        children = children[_col(children, f"tags.{TAG_KIND}") == KIND_FINETUNE]
    if not cfg.include_unfinished:
        for name, part in (("child", children), ("parent", parents)):
            n_bad = int((_col(part, "status") != "FINISHED").sum())
            if n_bad:
                notes.append(f"{n_bad} {name} run(s) not FINISHED were left out (include_unfinished=false)")
        children = children[_col(children, "status") == "FINISHED"]
        parents = parents[_col(parents, "status") == "FINISHED"]
    return children, parents


def _filter(part, cfg: CompareConfig):
    if cfg.split is not None:
        part = part[_col(part, f"tags.{TAG_SPLIT}") == cfg.split]
    if cfg.datasets:
        wanted = {_dataset_key(d) for d in cfg.datasets}
        part = part[_col(part, f"tags.{TAG_DATASET}").map(lambda v: _dataset_key(str(v)) in wanted)]
    if cfg.methods:
        part = part[_col(part, f"tags.{TAG_METHOD}").isin(cfg.methods)]
    return part


def _dataset_key(name: str) -> str:
    from lardo_ray.finetune.datasets import get_card

    try:
        return get_card(name).key
    except KeyError:
        return name


def _dataset_display(name: str) -> str:
    from lardo_ray.finetune.datasets import get_card

    try:
        return get_card(name).name
    except KeyError:
        return name


def _dataset_order(name: str) -> tuple[int, str]:
    from lardo_ray.finetune.datasets import CARDS

    keys = list(CARDS)
    k = _dataset_key(name)
    return (keys.index(k), k) if k in keys else (len(keys), k.lower())


def _group_metric(rows, cfg: CompareConfig) -> str | None:
    """The metric of a group: cfg.metric, else by task type (tag, or which metrics were logged)."""
    if cfg.metric:
        return cfg.metric
    for v in _col(rows, f"tags.{TAG_TASK_TYPE}"):
        if _present(v):
            return default_metric(str(v))
    for m in ("roc_auc", "rmse"):
        for name in (f"metrics.{cfg.subset}_{m}", f"metrics.{cfg.subset}_{m}_mean"):
            if name in rows.columns and rows[name].notna().any():
                return m
    return None


# ---------------------------------------------------------------- the table


def _scale(metric: str) -> tuple[float, int, str]:
    """(display scale, digits, unit suffix) for a metric."""
    return (100.0, 1, " (%)") if metric in ("roc_auc", "prc_auc") else (1.0, 3, "")


def _cell(ms: MeanStd, metric: str) -> str:
    scale, digits, _ = _scale(metric)
    if ms.n == 0 or math.isnan(ms.mean):
        return "–"
    if math.isnan(ms.std):
        return f"{ms.mean * scale:.{digits}f} (n={ms.n})"
    return f"{ms.mean * scale:.{digits}f} ± {ms.std * scale:.{digits}f} (n={ms.n})"


def build_table(children, parents, cfg: CompareConfig, notes: list[str]):
    """Long-form table: one row per (dataset, column label) with mean, std, n and provenance."""
    import pandas as pd

    keys = [_key_column(k) for k in cfg.group_by]
    row_key, col_keys = keys[0], keys[1:]
    records: list[dict[str, Any]] = []

    def label_of(r) -> tuple[str, str, str]:
        ds = str(r.get(row_key)) if _present(r.get(row_key)) else "?"
        col = " / ".join(str(r.get(k)) if _present(r.get(k)) else "?" for k in col_keys)
        mode = r.get(f"tags.{TAG_TASK_MODE}")
        return ds, col, str(mode) if _present(mode) else ""

    raw: dict[tuple[str, str, str], dict[str, list]] = {}
    for part_name, part in (("children", children), ("parents", parents)):
        for _, r in part.iterrows():
            raw.setdefault(label_of(r), {"children": [], "parents": []})[part_name].append(r)
    # one method run both ways on a data set (multitask and per_target): two columns, never averaged together
    modes: dict[tuple[str, str], set[str]] = {}
    for ds, col, mode in raw:
        modes.setdefault((ds, col), set()).add(mode)
    groups: dict[tuple[str, str], dict[str, list]] = {}
    group_mode: dict[tuple[str, str], str] = {}
    for (ds, col, mode), g in raw.items():
        key = (ds, f"{col} ({mode})" if len(modes[(ds, col)]) > 1 and mode else col)
        merged = groups.setdefault(key, {"children": [], "parents": []})
        merged["children"] += g["children"]
        merged["parents"] += g["parents"]
        group_mode[key] = mode if key not in group_mode or group_mode[key] == mode else ""

    for (ds, col), g in groups.items():
        ch = pd.DataFrame(g["children"]) if g["children"] else pd.DataFrame()
        pa = pd.DataFrame(g["parents"]) if g["parents"] else pd.DataFrame()
        metric = _group_metric(pd.concat([ch, pa]) if len(ch) or len(pa) else ch, cfg)
        if metric is None:
            notes.append(f"{ds} / {col}: no {cfg.subset}_roc_auc or {cfg.subset}_rmse metric logged; left out")
            continue
        mcol = f"metrics.{cfg.subset}_{metric}"
        ms, source, run_ids, split_vals = MeanStd(float("nan"), float("nan"), 0), "", [], set()
        use_children = cfg.source in ("auto", "children") and len(ch) and mcol in ch.columns
        if use_children:
            ch = ch[ch[mcol].notna()]
            use_children = len(ch) > 0
        if use_children:
            ch = ch.assign(_seed=ch[f"tags.{TAG_SEED}"].astype(str))
            if "start_time" in ch.columns:
                ch = ch.sort_values("start_time", ascending=False)
            dup = int(ch.duplicated("_seed").sum())
            if dup:
                notes.append(f"{ds} / {col}: {dup} repeated seed run(s); the latest run of each seed is used")
            ch = ch.drop_duplicates("_seed", keep="first")
            ms = mean_std(ch[mcol].astype(float).tolist())
            source, run_ids = "runs", ch["run_id"].tolist()
            split_vals = set(_col(ch, f"tags.{TAG_SPLIT}").dropna().astype(str))
        elif cfg.source in ("auto", "parents") and len(pa) and f"{mcol}_mean" in pa.columns:
            pa = pa[pa[f"{mcol}_mean"].notna()]
            if "start_time" in pa.columns:
                pa = pa.sort_values("start_time", ascending=False)
            if len(pa):
                if len(pa) > 1:
                    notes.append(f"{ds} / {col}: {len(pa)} parent runs; the latest is used")
                p = pa.iloc[0]
                std = p.get(f"{mcol}_std")
                n = p.get("metrics.n_seeds")
                ms = MeanStd(float(p[f"{mcol}_mean"]), float(std) if _present(std) else float("nan"),
                             int(n) if _present(n) else 1)
                source, run_ids = "parent", [p["run_id"]]
                split_vals = {str(p.get(f"tags.{TAG_SPLIT}"))} if _present(p.get(f"tags.{TAG_SPLIT}")) else set()
        if not source:
            notes.append(f"{ds} / {col}: no run with {mcol} (source={cfg.source}); left out")
            continue
        records.append({
            "dataset": ds, "dataset_name": _dataset_display(ds), "method": col, "metric": metric,
            "subset": cfg.subset, "split": ",".join(sorted(split_vals)), "mean": ms.mean, "std": ms.std,
            "n": ms.n, "source": source, "higher_is_better": higher_is_better(metric), "published": False,
            "run_ids": ";".join(run_ids), "task_mode": group_mode.get((ds, col), ""),
        })  # fmt: skip
    return records


def _add_published(records: list[dict], anchors: dict[str, dict[str, Any]], subset: str,
                   notes: list[str]) -> list[dict]:
    if subset != "test":
        notes.append("published numbers are test scores: not added to a valid-subset table")
        return records
    datasets = {r["dataset"]: r["metric"] for r in records}
    out = list(records)
    for method, info in anchors.items():
        metric = info.get("metric", "roc_auc")
        scale = _scale(metric)[0]
        for ds, metric_here in datasets.items():
            key = _dataset_key(ds)
            if metric_here != metric or key not in info["values"]:
                continue
            v = info["values"][key]
            mean, std = (v if not isinstance(v, (tuple, list)) else v[0]), (
                v[1] if isinstance(v, (tuple, list)) else float("nan"))
            out.append({
                "dataset": ds, "dataset_name": _dataset_display(ds), "method": f"{method} (published)",
                "metric": metric, "subset": subset, "split": "scaffold", "mean": mean / scale,
                "std": std / scale, "n": info.get("n", 3), "source": f"published: {info.get('source', '')}",
                "higher_is_better": higher_is_better(metric), "published": True, "run_ids": "",
                "task_mode": "",
            })  # fmt: skip
    return out


def _mark_best(table) -> None:
    table["is_best"] = False
    for _ds, idx in table[~table["published"]].groupby("dataset").groups.items():
        sub = table.loc[idx]
        sub = sub[sub["mean"].notna()]
        if sub.empty:
            continue
        best = sub["mean"].max() if bool(sub["higher_is_better"].iloc[0]) else sub["mean"].min()
        table.loc[sub.index[(sub["mean"] - best).abs() <= 1e-12], "is_best"] = True


def _wide_and_markdown(table, title: str, footnotes: list[str]):
    import pandas as pd

    measured = [m for m in dict.fromkeys(table.loc[~table["published"], "method"])]
    measured = sorted(measured, key=str.lower)
    published = sorted(dict.fromkeys(table.loc[table["published"], "method"]), key=str.lower)
    columns = measured + published
    datasets = sorted(dict.fromkeys(table["dataset"]), key=_dataset_order)
    rows_md, rows_wide = [], []
    for ds in datasets:
        sub = table[table["dataset"] == ds]
        metric = sub["metric"].iloc[0]
        arrow = "↑" if higher_is_better(metric) else "↓"
        mlabel = f"{METRIC_LABELS.get(metric, metric)}{_scale(metric)[2]} {arrow}"
        cells_md, cells_wide = [], []
        for m in columns:
            hit = sub[sub["method"] == m]
            if hit.empty:
                cells_md.append("–")
                cells_wide.append("")
                continue
            r = hit.iloc[0]
            ms = MeanStd(float(r["mean"]), float(r["std"]), int(r["n"]))
            if r["published"]:
                scale, digits, _ = _scale(metric)
                text = f"{ms.mean * scale:.{digits}f}" + (
                    f" ± {ms.std * scale:.{digits}f}" if not math.isnan(ms.std) else "")
                cells_md.append(f"*{text}* †")
                cells_wide.append(text + " (published)")
            else:
                text = _cell(ms, metric)
                mode = str(r.get("task_mode") or "")
                if mode in ("multitask", "per_target"):  # several targets: say which protocol made the number
                    text = text[:-1] + f", {mode})" if text.endswith(")") else f"{text} ({mode})"
                cells_md.append(f"**{text}**" if r["is_best"] else text)
                cells_wide.append(text)
        name = sub["dataset_name"].iloc[0]
        rows_md.append(f"| {name} | {mlabel} | " + " | ".join(cells_md) + " |")
        rows_wide.append([name, mlabel, *cells_wide])
    header = "| Dataset | Metric | " + " | ".join(columns) + " |"
    sep = "|---|---|" + "---|" * len(columns)
    md = "\n".join([f"### {title}", "", header, sep, *rows_md, "", *[f"{f}  " for f in footnotes]]).rstrip() + "\n"
    wide = pd.DataFrame(rows_wide, columns=["dataset", "metric", *columns])
    return wide, md


def _plot(table, title: str, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys(table["metric"]))
    methods = sorted(dict.fromkeys(table.loc[~table["published"], "method"]), key=str.lower) + sorted(
        dict.fromkeys(table.loc[table["published"], "method"]), key=str.lower)
    n_ds = max(len(set(table.loc[table["metric"] == m, "dataset"])) for m in metrics)
    width = max(7.0, 3.5 + n_ds * (0.5 + 0.25 * len(methods)))
    fig = Figure(figsize=(width, 3.6 * len(metrics)), constrained_layout=True)
    FigureCanvasAgg(fig)
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics):
        sub = table[table["metric"] == metric]
        scale, _, unit = _scale(metric)
        datasets = sorted(dict.fromkeys(sub["dataset"]), key=_dataset_order)
        present = [m for m in methods if m in set(sub["method"])]
        bar_w = min(0.8 / max(len(present), 1), 0.3)
        span = bar_w * len(present)
        for j, m in enumerate(present):
            xs, ys, es = [], [], []
            for i, ds in enumerate(datasets):
                hit = sub[(sub["dataset"] == ds) & (sub["method"] == m)]
                if hit.empty or math.isnan(float(hit["mean"].iloc[0])):
                    continue
                xs.append(i - span / 2 + bar_w * (j + 0.5))
                ys.append(float(hit["mean"].iloc[0]) * scale)
                e = float(hit["std"].iloc[0])
                es.append(0.0 if math.isnan(e) else e * scale)
            pub = bool(sub.loc[sub["method"] == m, "published"].iloc[0])
            ax.bar(xs, ys, bar_w, yerr=None if pub else es, capsize=3, label=m, color=colors[m],
                   hatch="//" if pub else None, alpha=0.55 if pub else 0.9, edgecolor="black", linewidth=0.4)
        ax.set_xticks(range(len(datasets)), [_dataset_display(d) for d in datasets])
        ax.set_xlim(-0.6, len(datasets) - 0.4)
        arrow = "higher is better" if higher_is_better(metric) else "lower is better"
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)}{unit}")
        ax.set_title(f"{METRIC_LABELS.get(metric, metric)} ({arrow})", fontsize=10)
        if metric in ("roc_auc", "prc_auc"):
            lo = min(50.0, float((sub["mean"] * scale).min()) - 5)
            ax.set_ylim(max(0.0, lo), 100.0)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(textwrap.fill(title, width=int(width * 11)), fontsize=9)
    fig.savefig(path, dpi=120)


def compare(cfg: CompareConfig, *, published: dict[str, dict[str, Any]] | None = None,
            echo: bool = False) -> CompareResult:
    """Search, aggregate, write CSV / Markdown / PNG to ``cfg.output_dir``; return (and with echo, print)
    the Markdown. ``published`` replaces the built-in anchors (same shape as ``PUBLISHED``)."""
    import pandas as pd

    notes: list[str] = []
    df, uri = search_finetune_runs(cfg)
    if df.empty:
        raise ConfigError(f"no runs in MLflow experiment {cfg.experiment!r} at {uri!r}")
    children, parents = _select_runs(df, cfg, notes)
    children, parents = _filter(children, cfg), _filter(parents, cfg)
    if children.empty and parents.empty:
        raise ConfigError(
            f"no fine-tune runs (tag {TAG_KIND}={KIND_FINETUNE}) in experiment {cfg.experiment!r} at {uri!r} "
            f"matching split={cfg.split!r}, datasets={cfg.datasets}, methods={cfg.methods} "
            f"({len(df)} runs in the experiment)"
        )
    splits = sorted((set(_col(children, f"tags.{TAG_SPLIT}").dropna().astype(str))
                     | set(_col(parents, f"tags.{TAG_SPLIT}").dropna().astype(str))) - {""})
    split_in_keys = any(_key_column(k) == f"tags.{TAG_SPLIT}" for k in cfg.group_by)
    if len(splits) > 1 and not split_in_keys:
        raise ConfigError(
            f"the runs use different splits ({', '.join(splits)}): numbers from different splits must not be "
            f"averaged together. Set compare.split to one of them or add 'split' to compare.group_by"
        )

    records = build_table(children, parents, cfg, notes)
    if not records:
        raise ConfigError("no fine-tune run has the metric to tabulate: " + "; ".join(notes))
    anchors = published if published is not None else PUBLISHED
    if cfg.include_published:
        records = _add_published(records, anchors, cfg.subset, notes)
        if splits and splits != ["scaffold"]:
            notes.append("published numbers are on the deterministic scaffold split; these runs use "
                         + ", ".join(splits))
    table = pd.DataFrame.from_records(records)
    _mark_best(table)
    order = {d: i for i, d in enumerate(sorted(set(table["dataset"]), key=_dataset_order))}
    table = (table.assign(_order=table["dataset"].map(order), _m=table["method"].str.lower())
             .sort_values(["_order", "published", "_m"]).drop(columns=["_order", "_m"]).reset_index(drop=True))

    split_words = describe_split(splits[0]) if len(splits) == 1 else (
        "splits: " + ", ".join(splits) if splits else "split not tagged")
    title = f"Fine-tuning, {cfg.subset} set — {split_words} — mean ± std over seeds"
    footnotes = [
        f"Experiment `{cfg.experiment}`; cell = mean ± std (population std, ddof=0) over n seeds; "
        "ROC-AUC in %; best measured value per dataset in **bold** (ROC-AUC: higher, RMSE/MAE: lower).",
    ]
    if table["task_mode"].isin(["multitask", "per_target"]).any():
        footnotes.append("Data sets with several targets: *multitask* = one model, masked loss over every target; "
                         "*per_target* = one model per target on its labelled training rows (the forests always); "
                         "both scored as the mean over targets (`finetune.task_mode`).")
    if table["published"].any():
        srcs = sorted({f"{m.removesuffix(' (published)')}: {anchors[m.removesuffix(' (published)')]['source']}"
                       for m in table.loc[table["published"], "method"]})
        footnotes.append("† published, not re-run here (deterministic scaffold split): " + "; ".join(srcs) + ".")
    footnotes += [f"Note: {n}" for n in notes]
    wide, md = _wide_and_markdown(table, title, footnotes)

    predictions = _Predictions(uri)
    table["ensemble"] = float("nan")
    if cfg.ensemble and cfg.subset == "test":
        for i, v in seed_ensembles(children, table, predictions, notes).items():
            table.loc[i, "ensemble"] = v
        if table["ensemble"].notna().any():
            md += "\n" + ensemble_markdown(table) + "\n"
    boot = bootstrap_comparisons(children, table, cfg, uri, notes, predictions) \
        if cfg.bootstrap and cfg.subset == "test" else []
    if boot:
        md += "\n\n" + bootstrap_markdown(boot, cfg.bootstrap)
    # Written in a local directory (matplotlib and MLflow need local files), then uploaded when
    # compare.output_dir is object storage; the local copies stay for the caller to log as artifacts.
    local = cfg.output_dir if not fs.is_remote(cfg.output_dir) else tempfile.mkdtemp(prefix="lardo-compare-")
    os.makedirs(local, exist_ok=True)
    names = [f"{cfg.name}.csv", f"{cfg.name}.md", f"{cfg.name}.png"] + ([f"{cfg.name}_bootstrap.csv"] if boot else [])
    local_files = [os.path.join(local, n) for n in names]
    table.to_csv(local_files[0], index=False)
    if boot:
        pd.DataFrame([b.to_row() for b in boot]).to_csv(local_files[3], index=False)
    with open(local_files[1], "w", encoding="utf-8") as f:
        f.write(md)
    _plot(table, title, local_files[2])
    if fs.is_remote(cfg.output_dir):
        for path, name in zip(local_files, names):
            fs.upload(path, fs.join(cfg.output_dir, name))
        csv_path, md_path, png_path = (fs.join(cfg.output_dir, n) for n in names[:3])
    else:
        csv_path, md_path, png_path = local_files[:3]
    n_runs = sum(len(r.split(";")) for r in table.loc[~table["published"], "run_ids"] if r)
    for n in notes:
        log.info("compare: %s", n)
    if echo:
        print(md)
    return CompareResult(table=table, wide=wide, markdown=md, title=title, csv_path=csv_path,
                         markdown_path=md_path, png_path=png_path, n_runs=n_runs, splits=splits, notes=notes,
                         local_files=local_files, bootstrap=boot)


class _Predictions:
    """Each seed run's logged test predictions (Parquet artifacts), downloaded once per run."""

    def __init__(self, uri: str):
        self.uri = uri
        self._cache: dict[str, Any] = {}
        # one progress bar per tiny Parquet file would bury the table in the terminal
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def tables(self, name: str, runs) -> list:
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


def seed_ensembles(children, table, predictions: _Predictions, notes: list[str]) -> dict[int, float]:
    """Per measured cell (index of ``table``): the test score of its seeds' predictions averaged (a seed
    ensemble), with the same metric code. Cells whose runs logged no predictions are left out, and said."""
    from lardo_ray.finetune.bootstrap import seed_average

    out: dict[int, float] = {}
    by_id = children.set_index("run_id") if len(children) else None
    missing = []
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


def ensemble_markdown(table) -> str:
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


def bootstrap_comparisons(children, table, cfg: CompareConfig, uri: str, notes: list[str],
                          predictions: _Predictions | None = None) -> list:
    """Per dataset: the best pre-trained method and the best baseline, each chosen on its mean validation
    score (never on test), compared by a paired bootstrap of their seed-averaged test predictions."""
    import pandas as pd

    from lardo_ray.finetune.bootstrap import paired_bootstrap, seed_average

    predictions = predictions or _Predictions(uri)

    out = []
    by_id = children.set_index("run_id") if len(children) else None
    measured = table[~table["published"] & (table["source"] == "runs")] if len(table) else table
    for ds, rows in measured.groupby("dataset", sort=False):
        metric = str(rows["metric"].iloc[0])
        vcol = f"metrics.valid_{metric}"

        def side(want: str):
            best = None
            for _, r in rows.iterrows():
                ids = [i for i in str(r["run_ids"]).split(";") if i and by_id is not None and i in by_id.index]
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


def bootstrap_markdown(boot: list, n: int) -> str:
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


def resolved_compare_config(cfg: PipelineConfig) -> CompareConfig:
    """compare reads the same MLflow store and experiment the stages log to, unless told otherwise."""
    from lardo_ray.tracking import resolve_tracking_uri

    c = cfg.compare.model_copy()
    if c.tracking_uri is None:
        c.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.run.output_dir)
    if "experiment" not in cfg.compare.model_fields_set:
        c.experiment = cfg.tracking.experiment
    if "output_dir" not in cfg.compare.model_fields_set:
        c.output_dir = f"{cfg.run.output_dir.rstrip('/')}/compare"
    return c
