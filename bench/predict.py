"""Benchmark of the predict stage: a registered seed ensemble applied to MOSES molecules.

    python bench/predict.py [--n 100000] [--n-large 1000000] [--json bench/results/predict.json]

1. Speed, start-up included, on the same --n molecules: `lardo-ray predict`'s stage (Ray start, model
   download per actor, chunked shards, markers, reconciliation) vs the plain in-process loop a user would
   write (load the model once, predict 4,096 SMILES at a time). Prints molecules/s of both and the ratio.
2. Memory: peak RSS of the Ray worker processes (where the stage's work runs) for --n and --n-large molecules (the stage
   streams chunks, so the peak should not grow with the input; the ratio is printed).

The model is the demo's shape (3 x 128 GINE, 3 seeds), fine-tuned for one epoch on the bundled BBBP and
registered in a temporary sqlite MLflow store: the weights do not change the cost.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dsm import WorkerMemory, load_smiles  # noqa: E402  (bench/dsm.py)


def _model(work: Path) -> tuple[str, str]:
    from lardo_ray.config import load_config
    from lardo_ray.stages.finetune import run_finetune

    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(None, ["model.num_layers=3", "model.hidden=128", "finetune.head_hidden=128",
                             "finetune.epochs=1", "finetune.seeds=[0, 1, 2]", "run.progress=false",
                             "finetune.method=bench", f"tracking.tracking_uri={uri}", f"run.output_dir={work / 'ft'}"])
    res = run_finetune(cfg, use_ray=False)
    if not res.registered:
        raise SystemExit(f"bench/predict.py: the model was not registered: {res.not_logged}")
    return uri, res.registered


def _write(smiles: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles"])
        w.writerows([s] for s in smiles)


def in_process(model_uri: str, tracking_uri: str, smiles: list[str]) -> float:
    from lardo_ray.models.mlflow_model import download
    from lardo_ray.models.saved import SavedModel

    t0 = time.perf_counter()
    model = SavedModel(download(model_uri, tracking_uri))
    n_ok = 0
    for start in range(0, len(smiles), 4096):
        prep, mean, _ = model.predict(smiles[start : start + 4096])
        n_ok += len(mean)
    return len(smiles) / (time.perf_counter() - t0)


def stage(model_uri: str, tracking_uri: str, csv_path: Path, out: Path) -> tuple[float, int, object]:
    from lardo_ray.config import load_config
    from lardo_ray.stages.lifecycle import run_stage

    cfg = load_config(None, [f"input.path={csv_path}", f"run.output_dir={out}", f"predict.model={model_uri}",
                             f"tracking.tracking_uri={tracking_uri}", "run.progress=false"])
    mem = WorkerMemory(descendants_of=os.getpid())
    mem.start()
    t0 = time.perf_counter()
    summary = run_stage("predict", cfg)
    seconds = time.perf_counter() - t0
    mem.stop.set()
    mem.join()
    if not summary.reconciled:
        raise SystemExit("bench/predict.py: counts do not reconcile")
    return summary.n_read / seconds, mem.peak_total, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="molecules for the speed comparison")
    ap.add_argument("--n-large", type=int, default=1_000_000, help="molecules for the memory comparison (0: skip)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    tracking_uri, model_uri = _model(work)
    smiles = load_smiles(max(args.n, args.n_large))
    small = work / "small.csv"
    _write(smiles[: args.n], small)
    print(f"bench/predict.py: model {model_uri}; {args.n:,} MOSES molecules; cores={os.cpu_count()}", flush=True)

    base = in_process(model_uri, tracking_uri, smiles[: args.n])
    print(f"  in-process loop      {base:8.1f} molecules/s (one process, model load included)", flush=True)
    ours, peak_small, summary = stage(model_uri, tracking_uri, small, work / "out_small")
    print(f"  predict stage (Ray)  {ours:8.1f} molecules/s (Ray start, actors, shards included; "
          f"{summary.chunks_total} chunks)", flush=True)
    print(f"  ratio                {ours / base:8.2f} x the in-process loop", flush=True)
    result = {"n": args.n, "in_process_mol_s": base, "stage_mol_s": ours, "ratio": ours / base,
              "peak_rss_bytes": {str(args.n): peak_small}, "cores": os.cpu_count()}
    if args.n_large:
        ray.shutdown()
        large = work / "large.csv"
        _write(smiles[: args.n_large], large)
        rate_large, peak_large, _ = stage(model_uri, tracking_uri, large, work / "out_large")
        result["peak_rss_bytes"][str(args.n_large)] = peak_large
        result["stage_mol_s_large"] = rate_large
        result["memory_ratio"] = peak_large / peak_small
        print(f"  peak RSS             {peak_small / 2**30:6.2f} GiB at {args.n:,} -> {peak_large / 2**30:6.2f} GiB "
              f"at {args.n_large:,} molecules ({peak_large / peak_small:.2f} x); {rate_large:.1f} molecules/s",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
