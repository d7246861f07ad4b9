"""Stage finetune: fine-tune (or probe) a graph encoder on a labelled set, one Ray task per seed, in MLflow.

``run_finetune(cfg)`` fine-tunes ``cfg.finetune.encoder`` (None = random init from ``cfg.model``) on
``cfg.finetune.dataset`` for every seed in ``cfg.finetune.seeds``; ``run_finetune_grid(cfg, methods,
datasets)`` does the same for every (dataset, method) pair of an ablation grid, all seeds of all pairs in
flight at once and the same splits for every method.

On the driver, once per dataset: read + featurise (``lardo_ray.finetune.data.prepare_task``; graphs cached in
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
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lardo_ray import fs
from lardo_ray.config import ConfigError, PipelineConfig
from lardo_ray.finetune.metrics import METRIC_LABELS
from lardo_ray.stages.finetune_mlflow import (  # noqa: F401 - registered_name is public
    _architecture,
    _Group,
    _local_dir,
    _log_group,
    _safe_name,
    _with_finetune,
    registered_name,
)
from lardo_ray.stages.finetune_results import FinetuneResult, GridResult, last_line, write_predictions  # noqa: F401

if TYPE_CHECKING:
    from lardo_ray.finetune.model import EncoderSource
    from lardo_ray.finetune.splits import Split
    from lardo_ray.finetune.data import PreparedTask
    from lardo_ray.finetune.train import SeedResult
    from lardo_ray.tracking import Tracker

log = logging.getLogger("lardo_ray")


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

    result: SeedResult = baseline_seed(cfg, seed, prepared=prepared, split=split, features=features, threads=threads)
    return result


# ray.remote handles, made on first use; Any because ray types them with classes of its private modules
_REMOTE: Any = None
_BASELINE_REMOTE: Any = None


def _baseline_remote() -> Any:
    global _BASELINE_REMOTE
    if _BASELINE_REMOTE is None:
        import ray

        _BASELINE_REMOTE = ray.remote(_baseline_task)
    return _BASELINE_REMOTE


def _remote() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(_seed_task)
    return _REMOTE


def _threads(num_cpus: float) -> int:
    return max(1, int(math.floor(num_cpus + 1e-9)))


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------
def _progress(cfg: PipelineConfig, text: str) -> None:
    if cfg.run.progress:
        print(f"[finetune] {text}", file=sys.stderr, flush=True)


def _run_groups(cfg: PipelineConfig, groups: list[_Group], tracker: Tracker | None,
                use_ray: bool) -> list[FinetuneResult]:
    from lardo_ray.finetune.model import EncoderResolveError, resolve_encoder
    from lardo_ray.finetune.data import prepare_task, split_for
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
            from lardo_ray.finetune.data import dsm_descriptors

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
                    # finetune_seed and baseline_seed always return the test rows and predictions
                    assert r.test_index is not None and r.test_pred is not None
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
            how = ("fixed hyper-parameters" if g.baseline or g.cfg.finetune.head == "forest"
                   else f"best epoch {r.best_epoch}/{r.epochs_run}")
            if not g.baseline and len(g.cfg.finetune.lr_scales) > 1:
                how += f", lr x{r.lr_scale:g} chosen on validation"
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
