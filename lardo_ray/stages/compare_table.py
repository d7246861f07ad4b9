"""The compare table: dataset x method cells (mean ± std, protocol), published anchors, Markdown, the bar chart."""

from __future__ import annotations

import contextlib
import logging
import math
import textwrap
from typing import TYPE_CHECKING, Any

from lardo_ray.finetune.metrics import (
    METRIC_LABELS,
    MeanStd,
    default_metric,
    higher_is_better,
    mean_std,
)
from lardo_ray.finetune.settings import CompareConfig
from lardo_ray.tracking import (
    TAG_SEED,
    TAG_SPLIT,
    TAG_TASK_MODE,
    TAG_TASK_TYPE,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

log = logging.getLogger("lardo_ray")


# ---------------------------------------------------------------- helpers shared by compare and its stats


@contextlib.contextmanager
def _tracking_uri(uri: str | None) -> Iterator[str]:
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


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    import pandas as pd

    if name in df.columns:
        return df[name]
    return pd.Series([None] * len(df), index=df.index, dtype=object)


def _present(v: object) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v) != ""


def _key_column(key: str) -> str:
    if key.startswith(("tags.", "params.", "metrics.")):
        return key
    return f"tags.lardo.{key}"


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


def _group_metric(rows: pd.DataFrame, cfg: CompareConfig) -> str | None:
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


def build_table(children: pd.DataFrame, parents: pd.DataFrame, cfg: CompareConfig,
                notes: list[str]) -> list[dict[str, Any]]:
    """Long-form table: one row per (dataset, column label) with mean, std, n and provenance."""
    import pandas as pd

    keys = [_key_column(k) for k in cfg.group_by]
    row_key, col_keys = keys[0], keys[1:]
    records: list[dict[str, Any]] = []

    def label_of(r: pd.Series) -> tuple[str, str, str]:
        ds = str(r.get(row_key)) if _present(r.get(row_key)) else "?"
        col = " / ".join(str(r.get(k)) if _present(r.get(k)) else "?" for k in col_keys)
        mode = r.get(f"tags.{TAG_TASK_MODE}")
        return ds, col, str(mode) if _present(mode) else ""

    raw: dict[tuple[str, str, str], dict[str, list[pd.Series]]] = {}
    for part_name, part in (("children", children), ("parents", parents)):
        for _, r in part.iterrows():
            raw.setdefault(label_of(r), {"children": [], "parents": []})[part_name].append(r)
    # one method run both ways on a data set (multitask and per_target): two columns, never averaged together
    modes: dict[tuple[str, str], set[str]] = {}
    for ds, col, mode in raw:
        modes.setdefault((ds, col), set()).add(mode)
    groups: dict[tuple[str, str], dict[str, list[pd.Series]]] = {}
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


def _add_published(records: list[dict[str, Any]], anchors: dict[str, dict[str, Any]], subset: str,
                   notes: list[str]) -> list[dict[str, Any]]:
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


def _mark_best(table: pd.DataFrame) -> None:
    table["is_best"] = False
    for _ds, idx in table[~table["published"]].groupby("dataset").groups.items():
        sub = table.loc[idx]
        sub = sub[sub["mean"].notna()]
        if sub.empty:
            continue
        best = sub["mean"].max() if bool(sub["higher_is_better"].iloc[0]) else sub["mean"].min()
        table.loc[sub.index[(sub["mean"] - best).abs() <= 1e-12], "is_best"] = True


def _wide_and_markdown(table: pd.DataFrame, title: str, footnotes: list[str]) -> tuple[pd.DataFrame, str]:
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


def _plot(table: pd.DataFrame, title: str, path: str) -> None:
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


