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

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lardo_ray import fs
from lardo_ray.config_base import ConfigError
from lardo_ray.finetune.settings import CompareConfig
from lardo_ray.finetune.splits import describe_split
from lardo_ray.stages.compare_stats import (_Predictions, bootstrap_comparisons, bootstrap_markdown, ensemble_markdown,
                                            seed_ensembles)
from lardo_ray.stages.compare_table import (  # noqa: F401 - _select_runs' helpers; tests import some
    _add_published, _col, _dataset_display, _dataset_key, _dataset_order, _group_metric, _key_column, _mark_best,
    _plot, _present, _tracking_uri, _wide_and_markdown, build_table)
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
    import pandas as pd

    from lardo_ray.config import PipelineConfig
    from lardo_ray.finetune.bootstrap import PairedBootstrap

log = logging.getLogger("lardo_ray")


def _published() -> dict[str, dict[str, Any]]:
    import yaml

    anchors: dict[str, dict[str, Any]] = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "data" / "published.yaml").read_text())
    return anchors



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
    bootstrap: list[PairedBootstrap] = field(default_factory=list)  # one per dataset


# ---------------------------------------------------------------- reading MLflow


def search_finetune_runs(cfg: CompareConfig) -> tuple[pd.DataFrame, str]:
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


def _select_runs(df: pd.DataFrame, cfg: CompareConfig, notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
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


def _filter(part: pd.DataFrame, cfg: CompareConfig) -> pd.DataFrame:
    if cfg.split is not None:
        part = part[_col(part, f"tags.{TAG_SPLIT}") == cfg.split]
    if cfg.datasets:
        wanted = {_dataset_key(d) for d in cfg.datasets}
        part = part[_col(part, f"tags.{TAG_DATASET}").map(lambda v: _dataset_key(str(v)) in wanted)]
    if cfg.methods:
        part = part[_col(part, f"tags.{TAG_METHOD}").isin(cfg.methods)]
    return part


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
