"""chemprop (D-MPNN trained from scratch) as the peer baseline, on our splits, logged as a compare method.

chemprop pins its own RDKit, so it usually lives in a separate environment (``make chemprop`` builds
``.venv-chemprop``); we drive its CLI (``chemprop train``) and never reimplement D-MPNN. Per seed: the data
set as the fine-tune stage reads it, with a ``split`` column holding exactly our train/val/test assignment of
that seed, so every method is scored on the same molecules; ``--pytorch-seed`` = the seed. chemprop picks
its best epoch on validation loss and writes the test predictions; ``chemprop predict`` with that best model
gives the validation predictions. Both are scored with the same metric code as our fine-tunes (mean ROC-AUC
over tasks with both classes, RMSE/MAE), and we log a parent run ``<dataset>/chemprop`` with a child per seed,
the tags ``compare`` reads, and the seed's test predictions (the Parquet compare's bootstrap reads): so
chemprop can be the "best baseline" chosen on validation like any other method.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lardo_ray.config import ConfigError, PipelineConfig

if TYPE_CHECKING:
    from lardo_ray.finetune.datasets import LabelledSet
    from lardo_ray.finetune.splits import Split
    from lardo_ray.tracking import FinetuneTagKwargs, Tracker

log = logging.getLogger("lardo_ray")
METHOD = "chemprop"


@dataclass
class ChempropResult:
    dataset: str
    metric: str
    per_seed: dict[int, dict[str, float]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        from lardo_ray.finetune.metrics import mean_std

        ms = mean_std(m.get(f"test_{self.metric}") for m in self.per_seed.values())
        out = [f"  {self.dataset:<12s} chemprop: {ms.format(100 if self.metric == 'roc_auc' else 1, 1)} "
               f"{self.metric} ({self.seconds:.0f} s)"]
        out += [f"    seed {s} failed: {e[:200]}" for s, e in sorted(self.failed.items())]
        return out


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def resolve_executable(command: str) -> str:
    path = shutil.which(os.path.expanduser(command))
    if path is None:
        raise ConfigError(f"ablation.chemprop: {command!r} is not an executable; build it with `make chemprop` "
                          "(a separate venv: chemprop pins its own RDKit) or give the path of `chemprop`")
    return path


def _write_split_csv(path: Path, smiles: list[str], labels: np.ndarray, tasks: list[str], split: Split) -> None:
    part = np.full(len(smiles), "", dtype=object)
    part[np.asarray(split.train)] = "train"
    part[np.asarray(split.valid)] = "val"
    part[np.asarray(split.test)] = "test"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles", *tasks, "split"])
        for i, s in enumerate(smiles):
            if not part[i]:
                continue
            w.writerow([s, *("" if np.isnan(v) else (int(v) if float(v).is_integer() else v) for v in labels[i]),
                        part[i]])


def _read_predictions(path: Path, tasks: list[str], test_smiles: list[str]) -> np.ndarray:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if [r["smiles"] for r in rows] != test_smiles:
        raise RuntimeError(f"{path}: the predicted molecules are not our test set in order")
    return np.asarray([[float(r[t]) for t in tasks] for r in rows], dtype=np.float64)


def _predict(exe: str, model: Path, smiles: list[str], out: Path, env: dict[str, str], timeout: float | None) -> Path:
    src = out.with_suffix(".input.csv")
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles"])
        w.writerows([s] for s in smiles)
    cmd = [exe, "predict", "-i", str(src), "-s", "smiles", "--model-paths", str(model), "-o", str(out),
           "--accelerator", "cpu", "-n", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"chemprop predict exited {r.returncode}: {(r.stdout + r.stderr)[-1500:]}")
    return out


def run_one_seed(exe: str, work: Path, data: LabelledSet, split: Split, seed: int, epochs: int, task_type: str,
                 metric: str, timeout: float | None = None, threads: int | None = None) -> dict[str, float]:
    from lardo_ray.finetune.metrics import evaluate

    work.mkdir(parents=True, exist_ok=True)
    data_csv = work / "data.csv"
    _write_split_csv(data_csv, data.smiles, data.labels, data.task_names, split)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [exe, "train", "--data-path", str(data_csv), "--smiles-columns", "smiles",
           "--target-columns", *data.task_names, "--splits-column", "split", "-t", task_type,
           "--epochs", str(epochs), "--warmup-epochs", str(min(2, max(epochs - 1, 0))),
           "--pytorch-seed", str(seed), "--data-seed", str(seed), "--accelerator", "cpu", "-n", "0", "-o", str(out)]
    t0 = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    (work / "chemprop.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"chemprop train exited {r.returncode}: {(r.stdout + r.stderr)[-1500:]}")
    preds = _read_predictions(out / "model_0" / "test_predictions.csv", data.task_names,
                              [data.smiles[i] for i in split.test])
    np.save(work / "test_pred.npy", preds)
    m = evaluate(task_type, data.labels[np.asarray(split.test)], preds, data.task_names, metric)
    metrics = m.to_mlflow("test_")
    if len(split.valid):
        valid_smiles = [data.smiles[i] for i in split.valid]
        vpath = _predict(exe, out / "model_0" / "best.pt", valid_smiles, work / "valid_predictions.csv", env,
                         timeout)
        vm = evaluate(task_type, data.labels[np.asarray(split.valid)],
                      _read_predictions(vpath, data.task_names, valid_smiles), data.task_names, metric)
        metrics.update(vm.to_mlflow("valid_", per_task=False))
    metrics.update({"n_train": float(len(split.train)), "n_valid": float(len(split.valid)),
                    "n_test": float(len(split.test)), "epochs_run": float(epochs),
                    "seconds_total": time.perf_counter() - t0})
    return metrics


def run_chemprop_baseline(cfg: PipelineConfig, command: str, tracker: Tracker | None = None,
                          epochs: int | None = None) -> ChempropResult:
    """chemprop on ``cfg.finetune``'s data set, split and seeds; a parent + per-seed MLflow runs."""
    from lardo_ray.finetune.metrics import parent_summary
    from lardo_ray.finetune.data import prepare_task, split_for, split_hash
    from lardo_ray.tracking import TAG_PREDICTIONS, finetune_tags
    from lardo_ray.tracking import TAG_SPLIT_HASH
    from lardo_ray.tracking import make_tracker

    exe = resolve_executable(command)
    ft = cfg.finetune
    prepared = prepare_task(ft, need_scaffolds=ft.split in ("scaffold", "scaffold_balanced"))
    data = prepared.data
    key = ft.dataset or os.path.basename(str(ft.data_path)).split(".")[0]  # as the fine-tune stage tags it
    n_epochs = epochs or ft.epochs
    tracker = tracker or make_tracker(cfg)
    tracker.check_reachable()
    res = ChempropResult(dataset=key, metric=data.metric)
    root = Path(tempfile.mkdtemp(prefix="lardo-chemprop-"))
    t0 = time.perf_counter()
    hashes: dict[int, str] = {}
    # seeds side by side, the cores shared out (chemprop trains in one process per seed)
    cores = os.cpu_count() or 1
    parallel = max(1, min(len(ft.seeds), cores))
    splits = {seed: split_for(prepared, ft, seed) for seed in ft.seeds}

    def one(seed: int) -> None:
        split = splits[seed]
        hashes[seed] = split_hash(split)
        if cfg.run.progress:
            print(f"[chemprop] {key} seed {seed}: {len(split.train)}/{len(split.valid)}/{len(split.test)} "
                  f"train/val/test, {n_epochs} epochs", file=sys.stderr, flush=True)
        try:
            res.per_seed[seed] = run_one_seed(exe, root / f"seed{seed}", data, split, seed, n_epochs,
                                              data.task_type, data.metric, threads=max(1, cores // parallel))
        except Exception as e:  # noqa: BLE001 - one seed failing is reported, the others still count
            res.failed[seed] = f"{type(e).__name__}: {e}"
            log.warning("chemprop seed %d failed: %s", seed, str(e)[:500])

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, ft.seeds))
    res.seconds = time.perf_counter() - t0

    task_mode = "multitask" if data.n_tasks > 1 else "single_task"  # one D-MPNN, every target
    base: FinetuneTagKwargs = {"task_type": data.task_type, "metric": data.metric, "task_mode": task_mode}
    params = {"method": METHOD, "chemprop": exe, "epochs": n_epochs, "split": ft.split,
              "split_sizes": str(list(ft.split_sizes)), "dataset": key, "n_molecules": len(data)}
    with tracker.run(f"{key}/{METHOD}", tags=finetune_tags(key, METHOD, ft.split, **base)):
        tracker.log_params(params)
        for seed, metrics in sorted(res.per_seed.items()):
            tags = {**finetune_tags(key, METHOD, ft.split, seed=seed, **base), TAG_SPLIT_HASH: hashes[seed]}
            with tracker.run(f"seed{seed}", tags=tags, nested=True):
                tracker.log_params({**params, "seed": seed})
                tracker.log_metrics(metrics)
                pred_file = root / f"seed{seed}" / "test_pred.npy"
                if pred_file.exists():  # what compare's paired bootstrap reads back
                    from lardo_ray.stages.finetune_results import write_predictions

                    path = str(root / f"seed{seed}" / f"{_safe(key)}__{METHOD}__{ft.split}__seed{seed}.parquet")
                    write_predictions(path, data, np.asarray(splits[seed].test),
                                      np.load(pred_file))
                    tracker.log_artifact(path)
                    tracker.set_tags({TAG_PREDICTIONS: os.path.basename(path)})
                log_file = root / f"seed{seed}" / "chemprop.log"
                if log_file.exists():
                    tracker.log_artifact(str(log_file))
        if res.per_seed:
            tracker.log_metrics({**parent_summary(list(res.per_seed.values())),
                                 "wall_seconds": res.seconds, "n_failed_seeds": float(len(res.failed))})
    shutil.rmtree(root, ignore_errors=True)
    return res
