"""Stage finetune: fine-tune (or probe) a graph encoder on a labelled set, one Ray task per seed, in MLflow.

``run_finetune(cfg)`` fine-tunes ``cfg.finetune.encoder`` (None = random init from ``cfg.model``) on
``cfg.finetune.dataset`` for every seed in ``cfg.finetune.seeds``; ``run_finetune_grid(cfg, methods,
datasets)`` does the same for every (dataset, method) pair of an ablation grid, all seeds of all pairs in
flight at once and the same splits for every method.

On the driver, once per dataset: read + featurise (``lardo_ray.finetune.train.prepare_task``; graphs cached in
``<output_dir>/finetune/graph_cache``), the split of every seed, and once per encoder: download / read it
(``lardo_ray.finetune.model.resolve_encoder``). Data and encoder go to the object store once; each seed is
a ``ray.remote`` task with ``cfg.finetune.ray`` resources (torch threads = its CPUs) running
``finetune_seed``. Results come back to the driver, which logs to MLflow following the contract in
``lardo_ray.stages.compare``: one parent run per (dataset, method, split), one nested child run per seed,
logged as soon as all seeds of the pair are in. The config is logged as params on both (so
``compare.filter_string`` such as ``params.epochs = '100'`` finds the children too), the per-epoch history
on the children (``train_loss``, ``valid_<metric>`` by step = epoch).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lardo_ray import fs
from lardo_ray.config import ConfigError, PipelineConfig
from lardo_ray.finetune.metrics import METRIC_LABELS, MeanStd, mean_std, parent_summary
from lardo_ray.finetune.baselines import MAX_SAVED_TARGETS
from lardo_ray.finetune.splits import describe_split
from lardo_ray.tracking import (TAG_ENCODER, TAG_ENCODER_SHA, TAG_FAILED_SEEDS, TAG_PREDICTIONS, TAG_SPLIT_HASH,
                                finetune_tags)

if TYPE_CHECKING:
    from lardo_ray.finetune.datasets import LabelledSet
    from lardo_ray.finetune.model import EncoderSource
    from lardo_ray.finetune.splits import Split
    from lardo_ray.finetune.train import PreparedTask, SeedResult
    from lardo_ray.tracking import Tracker

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
    def table(self):
        """pandas DataFrame: one row per seed, then a 'mean' and a 'std' row."""
        import pandas as pd

        rows = []
        for r in self.seeds:
            row: dict[str, Any] = {"seed": str(r.seed)}
            for part in ("test", "valid"):
                for k, v in getattr(r, part).values.items():
                    row[f"{part}_{k}"] = v
            row.update({
                "best_epoch": r.best_epoch, "epochs_run": r.epochs_run, "selection": r.selection,
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
    def table(self):
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


# ---------------------------------------------------------------------------------------------------------
# The Ray task
# ---------------------------------------------------------------------------------------------------------
def _seed_task(cfg: PipelineConfig, seed: int, prepared: PreparedTask, split: Split,
               encoder: EncoderSource | None, threads: int) -> SeedResult:
    from lardo_ray.finetune.train import finetune_seed

    return finetune_seed(cfg, seed, prepared=prepared, split=split, encoder=encoder, threads=threads)


def _baseline_task(cfg: PipelineConfig, seed: int, prepared: PreparedTask, split: Split, features: Any,
                   threads: int) -> SeedResult:
    from lardo_ray.finetune.baselines import baseline_seed

    return baseline_seed(cfg, seed, prepared=prepared, split=split, features=features, threads=threads)


_REMOTE = None
_BASELINE_REMOTE = None


def _baseline_remote():
    global _BASELINE_REMOTE
    if _BASELINE_REMOTE is None:
        import ray

        _BASELINE_REMOTE = ray.remote(_baseline_task)
    return _BASELINE_REMOTE


def _remote():
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(_seed_task)
    return _REMOTE


def _threads(num_cpus: float) -> int:
    return max(1, int(math.floor(num_cpus + 1e-9)))


# ---------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Group:
    cfg: PipelineConfig  # finetune.dataset / method / encoder set for this pair
    dataset_key: str
    method: str
    encoder_spec: str | None
    baseline: str | None = None  # rf_dsm / rf_ecfp: a classical model instead of the GNN
    splits: dict[int, Split] = field(default_factory=dict)
    results: dict[int, SeedResult] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)


def _with_finetune(cfg: PipelineConfig, **update: Any) -> PipelineConfig:
    from lardo_ray.finetune.settings import FinetuneConfig

    ft = FinetuneConfig.model_validate({**cfg.finetune.model_dump(), **update})
    return cfg.model_copy(update={"finetune": ft})


def _local_dir(path: str) -> str | None:
    return None if "://" in path else path


def _safe_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", text).strip("_") or "x"


def _architecture(cfg: PipelineConfig, enc: EncoderSource | None, baseline: str | None = None) -> str:
    if baseline:
        from lardo_ray.finetune.baselines import BASELINES

        return (f"{BASELINES[baseline]} ({cfg.finetune.baseline_trees} trees), one model per task on its labelled "
                "training rows")
    if enc is None:
        m = cfg.model
        c = {"num_layers": m.num_layers, "hidden": m.hidden, "pooling": m.pooling, "jk": m.jk}
    else:
        c = enc.config
    ft = cfg.finetune
    probe = "frozen encoder (probe)" if ft.freeze_encoder or ft.lr_encoder == 0 else \
        f"lr head {ft.lr_head:g} / encoder {ft.lr_encoder:g}"
    mode = "; one model per target" if ft.task_mode == "per_target" else ""
    if ft.dsm_features != "none":
        mode += "; RDKit descriptors (CDF on the training rows) into the head"
    return (f"GINE {c.get('num_layers')} x {c.get('hidden')} ({c.get('pooling')} pool, jk {c.get('jk')}) + "
            f"MLP head {ft.head_hidden}; {ft.epochs} epochs, batch {ft.batch_size}, {probe}{mode}")


_ARCH_KEYS = ("num_layers", "hidden", "dropout", "pooling", "jk", "batch_norm")


def _params(cfg: PipelineConfig, g: _Group, enc: EncoderSource | None, prepared: PreparedTask) -> dict[str, Any]:
    from lardo_ray.tracking import flatten

    ft = cfg.finetune.model_dump(mode="json")
    ft["method"] = g.method
    ft["encoder"] = g.encoder_spec or ""
    ft["dataset"] = g.dataset_key
    arch = enc.config if enc is not None else cfg.model.model_dump(mode="json")
    arch = {k: arch.get(k) for k in _ARCH_KEYS}
    if cfg.finetune.encoder_dropout is not None:
        arch["dropout"] = cfg.finetune.encoder_dropout
    params = flatten(ft)
    params.update(flatten(arch, "model."))
    params.update({"n_molecules": len(prepared), "n_tasks": prepared.data.n_tasks,
                   "data_source": prepared.data.source})
    return params


def _log_history(tracker: Tracker, run_id: str, history: list[dict[str, float]]) -> None:
    """Per-epoch curves in a few log_batch calls (one call per epoch and metric would take seconds on sqlite)."""
    if not tracker.enabled or not history:
        return
    try:
        import mlflow
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # "epoch/" names: a curve must not share the name of the final metric (MLflow's latest value of a
        # metric is the one with the highest step, which would be the last epoch, not the best one).
        metrics = [Metric(f"epoch/{k}", float(v), now, int(h["epoch"])) for h in history for k, v in h.items()
                   if k != "epoch" and v is not None and not math.isnan(float(v))]
        client = mlflow.MlflowClient(tracker.uri)
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i: i + 1000])
    except Exception as e:  # noqa: BLE001 - logging never kills the stage
        tracker.not_logged.append(f"history of run {run_id}")
        log.warning("MLflow: could not log the epoch history: %s", str(e)[:200])


def task_mode_of(g: _Group, prepared: PreparedTask) -> str:
    """The protocol a group's numbers come from (tag lardo.task_mode): forests are one model per target."""
    if prepared.data.n_tasks == 1:
        return "single_task"
    return "per_target" if g.baseline else g.cfg.finetune.task_mode


def _log_group(tracker: Tracker, g: _Group, res: FinetuneResult, enc: EncoderSource | None,
               prepared: PreparedTask) -> None:
    """Parent run + one nested child per seed (compare contract), then the parent's mean/std."""
    ft = g.cfg.finetune
    base = dict(task_type=res.task_type, metric=res.metric, encoder_run_id=res.encoder_run_id,
                task_mode=task_mode_of(g, prepared))
    params = _params(g.cfg, g, enc, prepared)
    extra = {TAG_ENCODER: g.encoder_spec or "", TAG_ENCODER_SHA: res.encoder_sha256}
    outer_run_id, n_not_logged = tracker.run_id, len(tracker.not_logged)
    try:
        with tracker.run(f"{g.dataset_key}/{g.method}",
                         tags={**finetune_tags(g.dataset_key, g.method, ft.split, **base), **extra}):
            parent_id = res.parent_run_id = tracker.run_id
            tracker.log_params(params)
            if res.failed:
                tracker.set_tags({TAG_FAILED_SEEDS: ",".join(str(s) for s in sorted(res.failed))})
            for r in res.seeds:
                tags = {**finetune_tags(g.dataset_key, g.method, ft.split, seed=r.seed, **base), **extra,
                        TAG_SPLIT_HASH: r.split_hash}
                with tracker.run(f"seed{r.seed}", tags=tags, nested=True):
                    if tracker.enabled and tracker.run_id:
                        res.child_run_ids[r.seed] = tracker.run_id
                        tracker.log_params({**params, "seed": r.seed})
                        tracker.log_metrics(r.metrics())
                        _log_history(tracker, tracker.run_id, r.history)
                        if r.seed in res.predictions_local:
                            tracker.log_artifact(res.predictions_local[r.seed])
                            tracker.set_tags({TAG_PREDICTIONS: os.path.basename(res.predictions_local[r.seed])})
                        if r.member is not None and not g.baseline:  # forests: only their ensemble (size)
                            _log_saved_model(tracker, g, res, prepared, [r])
                tracker.run_id = parent_id
            for seed, err in sorted(res.failed.items()):
                tags = {**finetune_tags(g.dataset_key, g.method, ft.split, seed=seed, **base), **extra}
                with tracker.run(f"seed{seed}", tags=tags, nested=True):
                    tracker.log_params({**params, "seed": seed})
                    tracker.log_text(err, "error.txt")
                    tracker.set_tags({"lardo.error": err.strip().splitlines()[-1][:500] if err.strip() else err})
                    tracker.fail_run()
                tracker.run_id = parent_id
            if not res.seeds:  # the method failed: its parent run says so too
                tracker.log_text("\n\n".join(f"seed {s}: {e}" for s, e in sorted(res.failed.items())), "error.txt")
                tracker.fail_run()
            if res.seeds:
                tracker.log_metrics({**parent_summary([r.metrics() for r in res.seeds]),
                                     "wall_seconds": res.wall_seconds,
                                     "n_failed_seeds": float(len(res.failed))})
            if res.csv_local:
                tracker.log_artifact(res.csv_local)
            members = [r for r in res.seeds if r.member is not None]
            if g.baseline and res.seeds and not members and ft.save_models:
                res.model_note = (f"not saved: {prepared.data.n_tasks} targets > {MAX_SAVED_TARGETS} (forests of "
                                  "that many targets run to gigabytes; their predictions are logged)")
            if members and not res.failed:  # an ensemble that lost a seed is not the method's model
                res.model_uri = _log_saved_model(tracker, g, res, prepared, members)
                if res.model_uri and ft.register_models:
                    res.registered = _register(tracker, g, res)
    finally:
        tracker.run_id = outer_run_id  # Tracker.run leaves the last run's id behind; the caller's run is back
    if tracker.enabled:
        res.experiment, res.tracking_uri = tracker.experiment, tracker.uri
    res.not_logged = list(tracker.not_logged[n_not_logged:])


def registered_name(dataset: str, method: str) -> str:
    return _safe_name(f"{dataset}-{method}")


def _log_saved_model(tracker: Tracker, g: _Group, res: FinetuneResult, prepared: PreparedTask,
                     seeds: list[SeedResult]) -> str | None:
    """The seeds' tested weights as one lardo_ray model (an ensemble when several) in the active run."""
    from lardo_ray.models.saved import ModelCard, save_property_model

    ft = g.cfg.finetune
    card = ModelCard(kind="forest" if g.baseline else "property", features=g.baseline or "",
                     name=registered_name(g.dataset_key, g.method), targets=list(prepared.data.task_names),
                     task_type=res.task_type, encoder_config=seeds[0].member.encoder_config,
                     n_descriptors=seeds[0].member.n_descriptors, head_hidden=ft.head_hidden,
                     metrics=parent_summary([r.metrics() for r in seeds]) if len(seeds) > 1 else seeds[0].metrics(),
                     config=g.cfg.model_dump(mode="json"))
    uri: list[str] = []

    def log() -> None:
        from lardo_ray.models.mlflow_model import log_model

        with tempfile.TemporaryDirectory(prefix="lardo-model-") as tmp:
            d = save_property_model(os.path.join(tmp, "lardo_model"), card, [r.member for r in seeds])
            uri.append(log_model(str(d)))

    tracker._safe(f"model ({'seed ' + str(seeds[0].seed) if len(seeds) == 1 else 'seed ensemble'})", log)
    return uri[0] if uri else None


def _register(tracker: Tracker, g: _Group, res: FinetuneResult) -> str | None:
    from lardo_ray.models.mlflow_model import register

    tags = {"lardo.dataset": g.dataset_key, "lardo.method": g.method, "lardo.split": g.cfg.finetune.split,
            "lardo.seeds": ",".join(str(r.seed) for r in res.seeds), "lardo.run_id": res.parent_run_id or ""}
    for k, ms in res.summary().items():
        tags[f"{k}_mean"], tags[f"{k}_std"] = f"{ms.mean:.6g}", f"{ms.std:.6g}"
    out: list[str] = []
    tracker._safe("model registry", lambda: out.append(register(res.model_uri, registered_name(g.dataset_key, g.method),
                                                                tags, tracker.uri)))
    return out[0] if out else None


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------
def _progress(cfg: PipelineConfig, text: str) -> None:
    if cfg.run.progress:
        print(f"[finetune] {text}", file=sys.stderr, flush=True)


def _run_groups(cfg: PipelineConfig, groups: list[_Group], tracker: Tracker | None,
                use_ray: bool) -> list[FinetuneResult]:
    from lardo_ray.finetune.model import EncoderResolveError, resolve_encoder
    from lardo_ray.finetune.train import prepare_task, split_for
    from lardo_ray.tracking import make_tracker

    t0 = time.perf_counter()
    tracker = tracker or make_tracker(cfg)
    tracker.check_reachable()  # before any work; also points mlflow at the store for runs:/ and models:/ URIs

    # once per encoder spec: download / read (bytes travel to the tasks)
    # An encoder that cannot be read fails its method's seeds (named in the summary and MLflow); the other
    # methods still run, and the command exits non-zero at the end.
    encoders: dict[str | None, EncoderSource | None] = {None: None}
    encoder_errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lardo_ft_enc_") as tmp:
        for i, spec in enumerate(dict.fromkeys(g.encoder_spec for g in groups)):
            if spec is not None:
                try:
                    encoders[spec] = resolve_encoder(spec, download_dir=os.path.join(tmp, str(i)))
                except EncoderResolveError as e:
                    encoders[spec], encoder_errors[spec] = None, f"EncoderResolveError: {e}"
                    _progress(cfg, f"encoder {spec}: cannot be loaded: {e}")
                    continue
                _progress(cfg, f"encoder {encoders[spec].describe()}")  # type: ignore[union-attr]

    # once per dataset: read, featurise, split every seed
    stage_uri = cfg.stage_dir("finetune")
    stage_dir = _local_dir(stage_uri)  # the graph cache is local only
    cache_dir = os.path.join(stage_dir, "graph_cache") if stage_dir else None
    prepared: dict[str, PreparedTask] = {}
    for g in groups:
        if g.dataset_key not in prepared:
            p = prepare_task(g.cfg.finetune, cache_dir=cache_dir)
            prepared[g.dataset_key] = p
            _progress(cfg, f"{g.dataset_key}: {len(p):,} molecules, {p.data.n_tasks} task(s) "
                           f"({'graph cache' if p.graphs_from_cache else 'featurised'} in {p.featurize_seconds:.1f} s)")
        p = prepared[g.dataset_key]
        for s in g.cfg.finetune.seeds:
            g.splits[s] = split_for(p, g.cfg.finetune, s)

    # classical baselines: their features once per (dataset, kind), shared by every seed
    features: dict[tuple[str, str], Any] = {}
    for g in groups:
        if g.baseline and (g.dataset_key, g.baseline) not in features:
            from lardo_ray.finetune.baselines import featurize

            f = featurize(g.baseline, prepared[g.dataset_key].data.smiles, cfg.ingest.max_atoms)
            features[(g.dataset_key, g.baseline)] = f
            nan = int(np.isnan(f.X).sum())
            _progress(cfg, f"{g.dataset_key}: {g.baseline} features {f.X.shape[1]:,} per molecule in {f.seconds:.1f} s"
                           + (f"; {nan:,} NaN/inf values (replaced by the training median per seed)" if nan else "")
                           + (f"; {f.n_not_standardised} molecule(s) not standardisable, featurised as parsed"
                              if f.n_not_standardised else ""))

    # the DSM descriptors a +dsm head reads: once per dataset, shipped with the graphs (rf_dsm's when it ran)
    for g in groups:
        p = prepared[g.dataset_key]
        if g.cfg.finetune.dsm_features != "none" and p.descriptors is None:
            from lardo_ray.finetune.train import dsm_descriptors

            if (g.dataset_key, "rf_dsm") in features:
                p.descriptors = features[(g.dataset_key, "rf_dsm")].X
                continue
            t_d = time.perf_counter()
            X = dsm_descriptors(p, cfg.ingest.max_atoms)
            _progress(cfg, f"{g.dataset_key}: {X.shape[1]} DSM descriptors per molecule for the head "
                           f"in {time.perf_counter() - t_d:.1f} s")

    results: list[FinetuneResult] = []

    def make_result(g: _Group) -> FinetuneResult:
        p = prepared[g.dataset_key]
        ft = g.cfg.finetune
        enc = encoders[g.encoder_spec]
        ok = [g.results[s] for s in sorted(g.results)]
        res = FinetuneResult(
            dataset=g.dataset_key, method=g.method, split=ft.split, split_sizes=list(ft.split_sizes),
            task_type=p.data.task_type, metric=ft.resolved_metric(), seeds=ok, failed=dict(g.failed),
            encoder=g.encoder_spec, baseline=g.baseline, encoder_run_id=enc.run_id if enc else "",
            encoder_sha256=enc.sha256 if enc else (ok[0].encoder_sha256 if ok else ""),
            architecture=_architecture(g.cfg, enc, g.baseline), n_molecules=len(p), n_tasks=p.data.n_tasks,
            n_dropped=p.data.n_dropped + p.n_featurize_rejected, featurize_seconds=p.featurize_seconds,
            wall_seconds=time.perf_counter() - t0,
        )
        if ok:
            # A local file first (MLflow logs local files), then uploaded when the stage dir is object storage.
            name = f"{_safe_name(g.dataset_key)}__{_safe_name(g.method)}__{ft.split}.csv"
            try:
                local = stage_dir or tempfile.mkdtemp(prefix="lardo-ft-")
                os.makedirs(local, exist_ok=True)
                res.csv_local = os.path.join(local, name)
                res.table.to_csv(res.csv_local, index=False)
                res.csv_path = res.csv_local if stage_dir else fs.upload(res.csv_local, fs.join(stage_uri, name))
            except (OSError, fs.StorageError) as e:
                log.warning("finetune: could not write the results table: %s", e)
            for r in ok:  # each seed's test predictions: what compare's paired bootstrap reads back
                pname = f"{_safe_name(g.dataset_key)}__{_safe_name(g.method)}__{ft.split}__seed{r.seed}.parquet"
                try:
                    local = os.path.join(stage_dir or tempfile.mkdtemp(prefix="lardo-ft-"), "predictions")
                    os.makedirs(local, exist_ok=True)
                    path = os.path.join(local, pname)
                    write_predictions(path, p.data, r.test_index, r.test_pred)
                    res.predictions_local[r.seed] = path
                    if not stage_dir:
                        fs.upload(path, fs.join(stage_uri, "predictions", pname))
                except (OSError, fs.StorageError) as e:
                    log.warning("finetune: could not write the test predictions of seed %d: %s", r.seed, e)
        try:
            _log_group(tracker, g, res, enc, p)
        except Exception as e:  # noqa: BLE001 - a tracking server gone mid-run must not lose the other seeds
            res.not_logged.append(f"runs of {g.dataset_key}/{g.method}: {type(e).__name__}: {str(e)[:200]}")
            log.warning("finetune: MLflow logging of %s/%s failed: %s", g.dataset_key, g.method, e)
        return res

    def done(g: _Group, seed: int, r: SeedResult | None, err: str | None) -> None:
        g.pending.discard(seed)
        if r is not None:
            g.results[seed] = r
            label = METRIC_LABELS.get(r.metric, r.metric)
            how = "fixed hyper-parameters" if g.baseline else f"best epoch {r.best_epoch}/{r.epochs_run}"
            _progress(cfg, f"{g.dataset_key}/{g.method} seed {seed}: test {label} {r.test.value:.4f} "
                           f"({how}, {r.timing.get('seed_seconds', 0):.1f} s)")
        else:
            g.failed[seed] = err or "failed"
            _progress(cfg, f"{g.dataset_key}/{g.method} seed {seed}: FAILED {str(err).strip()[-300:]}")
        if not g.pending:
            results.append(make_result(g))

    for g in groups:
        g.pending = set(g.cfg.finetune.seeds)
    runnable = [g for g in groups if g.encoder_spec not in encoder_errors]
    for g in groups:
        if g.encoder_spec in encoder_errors:
            for s in g.cfg.finetune.seeds:
                done(g, s, None, encoder_errors[g.encoder_spec])

    if use_ray and runnable:
        import ray

        from lardo_ray.execution import init_ray

        init_ray(cfg.run.ray_address, cfg.run.ray_num_cpus, cfg.run.ray_dashboard)
        data_refs = {k: ray.put(p) for k, p in prepared.items()}
        enc_refs = {k: (ray.put(v) if v is not None else None) for k, v in encoders.items()}
        feat_refs = {k: ray.put(v) for k, v in features.items()}
        refs: dict[Any, tuple[_Group, int]] = {}
        for g in runnable:
            res = g.cfg.finetune.ray
            opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
            if res.resources:
                opts["resources"] = dict(res.resources)
            if res.accelerator_type:
                opts["accelerator_type"] = res.accelerator_type
            task = (_baseline_remote() if g.baseline else _remote()).options(**opts)
            for s in g.cfg.finetune.seeds:
                extra = feat_refs[(g.dataset_key, g.baseline)] if g.baseline else enc_refs[g.encoder_spec]
                ref = task.remote(g.cfg, s, data_refs[g.dataset_key], g.splits[s], extra, _threads(res.num_cpus))
                refs[ref] = (g, s)
        r0 = groups[0].cfg.finetune.ray
        _progress(cfg, f"{len(refs)} seed run(s) submitted as Ray tasks ({r0.num_cpus:g} CPU, {r0.num_gpus:g} GPU each)")
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            for ref in ready:
                g, s = refs[ref]
                try:
                    done(g, s, ray.get(ref), None)
                except Exception as e:  # noqa: BLE001 - RayTaskError wraps the seed's exception
                    done(g, s, None, f"{type(e).__name__}: {e}")
    elif runnable:
        import torch

        prev = torch.get_num_threads()
        try:
            for g in runnable:
                for s in g.cfg.finetune.seeds:
                    from lardo_ray.finetune.train import finetune_seed

                    try:
                        if g.baseline:
                            r = _baseline_task(g.cfg, s, prepared[g.dataset_key], g.splits[s],
                                               features[(g.dataset_key, g.baseline)],
                                               _threads(g.cfg.finetune.ray.num_cpus))
                        else:
                            r = finetune_seed(g.cfg, s, prepared=prepared[g.dataset_key], split=g.splits[s],
                                              encoder=encoders[g.encoder_spec],
                                              threads=_threads(g.cfg.finetune.ray.num_cpus))
                    except Exception as e:  # noqa: BLE001 - same bookkeeping as a failed Ray task
                        done(g, s, None, f"{type(e).__name__}: {e}")
                    else:
                        done(g, s, r, None)
        finally:
            torch.set_num_threads(prev)

    order = {(g.dataset_key, g.method): i for i, g in enumerate(groups)}
    results.sort(key=lambda r: order[(r.dataset, r.method)])
    if not any(r.seeds for r in results):
        first = next((e for r in results for e in r.failed.values()), "unknown error")
        raise RuntimeError(f"finetune: every seed run failed; first error: {first}")
    return results


BASELINE_PREFIX = "baseline:"  # a method whose "encoder" is baseline:<kind> is that classical baseline


def baseline_method(kind: str) -> tuple[str, str]:
    """The (label, spec) pair of a classical baseline for ``run_finetune_grid``'s methods."""
    from lardo_ray.finetune.baselines import BASELINES

    if kind not in BASELINES:
        raise ConfigError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)} (finetune.baselines / --baseline)")
    return kind, BASELINE_PREFIX + kind


_SPLIT_KEYS = ("dataset", "data_path", "split", "split_column", "split_sizes", "seeds", "limit", "label_columns",
               "smiles_column", "drop_unlabelled")


def _group(cfg: PipelineConfig, method: str | None = None, encoder: Any = "__cfg__",
           dataset: Any = "__cfg__", finetune: dict[str, Any] | None = None) -> _Group:
    baseline = None
    if isinstance(encoder, str) and encoder.startswith(BASELINE_PREFIX):
        baseline, encoder = encoder[len(BASELINE_PREFIX):], None
    update: dict[str, Any] = {}
    if finetune:
        changed = [k for k in _SPLIT_KEYS if k in finetune and finetune[k] != getattr(cfg.finetune, k)]
        if changed:  # every method of a grid is scored on the same molecules
            raise ValueError(f"method {method!r}: finetune.{', finetune.'.join(changed)} must be the grid's")
        update.update({k: v for k, v in finetune.items() if k not in _SPLIT_KEYS})
    if dataset != "__cfg__":
        update["dataset"] = dataset
    if encoder != "__cfg__":
        update["encoder"] = encoder
    if method is not None:
        update["method"] = method
    c = _with_finetune(cfg, **update) if update else cfg
    ft = c.finetune
    key = ft.dataset or os.path.basename(str(ft.data_path)).split(".")[0]
    return _Group(cfg=c, dataset_key=key, method=ft.method_label(), encoder_spec=ft.encoder, baseline=baseline)


def run_finetune(cfg: PipelineConfig, tracker: Tracker | None = None, *, use_ray: bool = True) -> FinetuneResult:
    """Fine-tune ``cfg.finetune.encoder`` on ``cfg.finetune.dataset``, one Ray task per seed, logged to MLflow
    (parent run ``<dataset>/<method>`` + child run ``seed<N>`` per seed). ``tracker`` defaults to
    ``make_tracker(cfg)``; ``use_ray=False`` runs the seeds one after another in this process.

    Raises ConfigError for a bad config / unreachable tracking store, EncoderResolveError for an encoder that
    cannot be read, RuntimeError when every seed failed (a partial failure is in ``result.failed``)."""
    return _run_groups(cfg, [_group(cfg)], tracker, use_ray)[0]


def run_finetune_grid(
    cfg: PipelineConfig,
    methods: Sequence[tuple[str, str | None] | tuple[str, str | None, dict[str, Any]]],
    datasets: Sequence[str] | None = None,
    tracker: Tracker | None = None,
    *,
    use_ray: bool = True,
) -> GridResult:
    """The ablation grid: every (dataset, method) with ``cfg.finetune``'s protocol and the same splits.

    ``methods``: (label, encoder) pairs, encoder = a local export dir, ``runs:/...``, ``models:/...`` or None
    (random init from ``cfg.model``), e.g. ``[("lardo", "runs:/abc/encoder"), ("random-init", None)]``.
    A third element, a dict of ``finetune`` fields, gives that method its own fine-tuning settings (e.g.
    ``{"dsm_features": "all"}``); the split settings must stay those of ``cfg``.
    ``datasets``: card names (``finetune.data_path`` may be a directory holding their files); None = only
    ``cfg.finetune.dataset``. All seed runs of all pairs are submitted at once."""
    t0 = time.perf_counter()
    if not methods:
        raise ConfigError("run_finetune_grid: no methods")
    labels = [m[0] for m in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"run_finetune_grid: method labels must be distinct, got {labels}")
    ds_list: list[Any] = list(datasets) if datasets else [cfg.finetune.dataset]
    if len(ds_list) > 1 and cfg.finetune.data_path and os.path.isfile(cfg.finetune.data_path):
        raise ConfigError("run_finetune_grid: several datasets but finetune.data_path is one file; give a "
                          "directory holding the datasets' files (or None for the bundled BBBP)")
    if len(ds_list) > 1 and (cfg.finetune.label_columns or cfg.finetune.smiles_column):
        raise ConfigError("run_finetune_grid: finetune.label_columns / smiles_column apply to one dataset only")
    try:
        groups = [_group(cfg, method=m[0], encoder=m[1], dataset=ds, finetune=m[2] if len(m) > 2 else None)
                  for ds in ds_list for m in methods]
    except ValueError as e:
        raise ConfigError(f"run_finetune_grid: {e}") from None
    results = _run_groups(cfg, groups, tracker, use_ray)
    same = True
    for ds in dict.fromkeys(r.dataset for r in results):
        hashes = {(r.seed, r.split_hash) for res in results if res.dataset == ds for r in res.seeds}
        same &= len(hashes) == len({s for s, _ in hashes})
    return GridResult(results=results, wall_seconds=time.perf_counter() - t0, same_splits=same)


__all__ = ["FinetuneResult", "GridResult", "run_finetune", "run_finetune_grid"]
