"""Benchmark of the pretrain stage: the plain single-process loop against the Ray Train + DeepSpeed job.

    python bench/pretrain.py [--n 4000] [--epochs 3] [--batch 64] [--layers 5 --hidden 300] [--workers 1 2]
    python bench/pretrain.py --device-only [--device cuda] [--batches 256 1024] [--precision bf16] [--steps 40]

CPU mode, on one featurize table (MOSES molecules when /work/shared/data has them, else the bundled ZINC
sample; random unit 384-d text vectors, since throughput does not depend on what the text says), rows/s of:

  plain       lardo_ray.train.loop.Trainer in this process: torch, no DeepSpeed, no Ray; 1 thread
  plain+ds    the same loop through deepspeed.initialize (ZeRO stage --zero, gloo, 1 process)
  ray-N       the pretrain stage (run_pretrain): Ray Train, DeepSpeed ZeRO --zero, N workers x 1 thread

Every row runs the same epochs with an evaluation and a checkpoint at each epoch end. Figures:
  steady  rows/s of the last logging window (Ray: rank 0's x workers): the step rate itself
  loop    rows over the training loop's time (plain: the fit call; Ray: the workers' session, which includes
        each epoch's data start, evaluations and checkpoint uploads; not Ray's start-up)
  e2e     rows over the wall time of the whole thing (Ray: the stage call, Ray start-up and data setup included)
Ratios: overhead = ray-1 / plain (1.0 = free), scaling = ray-2 / ray-1 (2.0 = perfect on 2 free cores).

--device-only: only the Ray-free training step on one device (for a GPU box): for each batch size, rows/s of
the full step (Arrow rows -> PyG batch -> device -> forward/backward/step) and of the compute alone
(pre-collated batches already on the device), peak device memory, and the fraction of the step time the GPU
is busy (CUDA kernel time from torch.profiler / wall time). Imports neither ray nor deepspeed unless
--deepspeed is given (then the step runs through deepspeed.initialize in one process).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MOSES = ROOT.parent / "shared" / "data" / "pretrain" / "moses_train.csv.gz"
SAMPLE = ROOT / "lardo_ray" / "data" / "zinc_sample.csv"
TEXT_DIM = 384


def load_smiles(n: int) -> list[str]:
    if MOSES.exists():
        with gzip.open(MOSES, "rt") as f:
            next(f)
            return [ln.strip().split(",")[0] for ln in itertools.islice(f, n)]
    base = SAMPLE.read_text().split()[1:]
    return list(itertools.islice(itertools.cycle(base), n))


def make_table(n: int, seed: int = 0):
    """Featurize-shaped rows: mol_id, smiles, text_embedding (random unit vectors), graph columns."""
    import numpy as np
    import pyarrow as pa

    from lardo_ray import schema
    from lardo_ray.chem.graph import GraphFeaturizer

    smiles = load_smiles(n)
    emb = np.random.default_rng(seed).normal(size=(len(smiles), TEXT_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    flat = pa.array(emb.reshape(-1))
    offsets = pa.array(np.arange(0, emb.size + 1, TEXT_DIM, dtype=np.int32))
    table = pa.table({schema.MOL_ID: [f"b{i:08d}" for i in range(len(smiles))], schema.CANONICAL_SMILES: smiles,
                      schema.TEXT_EMBEDDING: pa.ListArray.from_arrays(offsets, flat)})
    graphs, _ = GraphFeaturizer()(table)
    return graphs


def write_featurize(table, root: Path, shard_rows: int) -> None:
    import pyarrow as pa

    from lardo_ray import schema
    from lardo_ray.io import StageOutput

    out = StageOutput(str(root / "featurize"))
    out.prepare()
    chunks = []
    for k, start in enumerate(range(0, table.num_rows, shard_rows)):
        cid = f"00000-{k:06d}"
        chunks.append(cid)
        out.write_table_atomic(out.data_path(cid), table.slice(start, shard_rows))
        out.write_table_atomic(out.rejected_path(cid), pa.table({schema.REJECT_REASON: pa.array([], pa.string())}))
    out.write_manifest({"stage": "featurize", "status": "complete", "chunks": chunks, "config_hash": "bench",
                        "input_fingerprint": f"bench-{table.num_rows}"})


# ---------------------------------------------------------------------------------------------------------
# CPU: plain loop vs Ray Train + DeepSpeed
# ---------------------------------------------------------------------------------------------------------
def overrides(args, out: Path, workers: int) -> list[str]:
    return [
        f"run.output_dir={out}", "run.name=bench", "run.progress=false", "run.overwrite=true",
        "tracking.enabled=false",
        f"model.num_layers={args.layers}", f"model.hidden={args.hidden}",
        f"pretrain.epochs={args.epochs}", f"pretrain.batch_size={args.batch}", "pretrain.warmup_steps=10",
        f"pretrain.eval_fraction={args.eval_fraction}", "pretrain.eval_every_steps=0", "pretrain.log_every_steps=10",
        "pretrain.checkpoint_every_steps=0", f"pretrain.num_workers={workers}",
        "pretrain.resources_per_worker={CPU: 1}", "pretrain.torch_threads=1",
        "pretrain.deepspeed.enabled=true", f"pretrain.deepspeed.zero_stage={args.zero}",
    ]


def run_plain(args, table, deepspeed: bool) -> dict:
    import pyarrow as pa
    import torch

    from lardo_ray import schema
    from lardo_ray.config import load_config
    from lardo_ray.train.loop import Trainer, build_model, estimate_total_steps, eval_mask, iter_table_batches

    torch.set_num_threads(1)
    cfg = load_config(None, overrides(args, Path("/nonexistent"), 1))
    pcfg = cfg.pretrain.model_copy(deep=True)
    pcfg.deepspeed.enabled = deepspeed
    held = eval_mask(table.column(schema.MOL_ID).to_pylist(), pcfg.eval_fraction, pcfg.seed)
    train, held_out = table.filter(pa.array(~held)), table.filter(pa.array(held))
    eval_batches = list(iter_table_batches(held_out, max(pcfg.batch_size, 256), shuffle=False))
    ckpt = Path(tempfile.mkdtemp(prefix="bench-plain-"))
    try:
        t0 = time.perf_counter()
        windows: list[float] = []
        trainer = Trainer(build_model(cfg.model, TEXT_DIM, seed=0), pcfg,
                          estimate_total_steps(train.num_rows, pcfg), device="cpu", checkpoint_root=ckpt,
                          callbacks=[lambda ev: windows.append(ev.metrics["rows_per_s"]) if ev.kind == "train" else None])
        t_fit = time.perf_counter()
        trainer.fit(lambda e: iter_table_batches(train, pcfg.batch_size, seed=e), eval_batches)
        t1 = time.perf_counter()
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        if deepspeed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return {"rows": trainer.rows_seen, "steps": trainer.step, "steady": windows[-1] if windows else 0.0,
            "loop": trainer.rows_seen / (t1 - t_fit),
            "e2e": trainer.rows_seen / (t1 - t0), "seconds": t1 - t0}


def run_ray(args, featurized: Path, workers: int) -> dict:
    from lardo_ray.config import load_config
    from lardo_ray.stages.pretrain import run_pretrain

    out = Path(tempfile.mkdtemp(prefix=f"bench-ray{workers}-"))
    try:
        shutil.copytree(featurized / "featurize", out / "featurize")
        cfg = load_config(None, overrides(args, out, workers))
        t0 = time.perf_counter()
        r = run_pretrain(cfg)
        wall = time.perf_counter() - t0
        rows = r.final_metrics.get("rows_seen", 0.0) * workers
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows, "steps": r.steps, "steady": r.final_metrics.get("rows_per_s", 0.0) * workers,
            "loop": r.samples_per_s, "e2e": rows / wall, "seconds": wall}


def cpu_bench(args) -> None:
    import ray

    from lardo_ray.execution import init_ray

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    table = make_table(args.n)
    print(f"table: {table.num_rows:,} molecules ({'MOSES' if MOSES.exists() else 'ZINC sample'}), "
          f"built in {time.perf_counter() - t0:.1f} s; model {args.layers} x {args.hidden}, batch {args.batch}, "
          f"{args.epochs} epochs, ZeRO {args.zero}; {os.cpu_count()} cores, load {load0[0]:.1f}", flush=True)
    rows: dict[str, dict] = {}
    rows["plain"] = run_plain(args, table, deepspeed=False)
    print(f"  plain     {rows['plain']}", flush=True)
    if not args.skip_plain_ds:
        rows["plain+ds"] = run_plain(args, table, deepspeed=True)
        print(f"  plain+ds  {rows['plain+ds']}", flush=True)
    featurized = Path(tempfile.mkdtemp(prefix="bench-featurize-"))
    try:
        write_featurize(table, featurized, args.shard_rows)
        # Logical CPUs: every worker 1 + room for Ray Data's read tasks (they ask for 0.25 each).
        init_ray(None, max(os.cpu_count() or 1, max(args.workers) + 1))
        for w in args.workers:
            rows[f"ray-{w}"] = run_ray(args, featurized, w)
            print(f"  ray-{w}     {rows[f'ray-{w}']}", flush=True)
    finally:
        shutil.rmtree(featurized, ignore_errors=True)
        if ray.is_initialized():
            ray.shutdown()
    load1 = os.getloadavg()

    print("\nrows/s (steady = last logging window, loop = the whole training loop, e2e = the whole call)")
    print(f"{'':10s} {'steady':>10s} {'loop':>10s} {'e2e':>10s} {'steps':>7s} {'seconds':>8s}")
    for k, v in rows.items():
        print(f"{k:10s} {v['steady']:10.1f} {v['loop']:10.1f} {v['e2e']:10.1f} {v['steps']:7d} {v['seconds']:8.1f}")
    plain = rows["plain"]
    if "ray-1" in rows:
        r1 = rows["ray-1"]
        print(f"\noverhead ray-1 / plain:  steady {r1['steady'] / plain['steady']:.2f}   "
              f"loop {r1['loop'] / plain['loop']:.2f}   e2e {r1['e2e'] / plain['e2e']:.2f}")
        if "plain+ds" in rows:
            pd = rows["plain+ds"]
            print(f"  of which DeepSpeed (plain+ds / plain): steady {pd['steady'] / plain['steady']:.2f}   "
                  f"loop {pd['loop'] / plain['loop']:.2f}")
        if "ray-2" in rows:
            r2 = rows["ray-2"]
            print(f"scaling ray-2 / ray-1:   steady {r2['steady'] / r1['steady']:.2f}   "
                  f"loop {r2['loop'] / r1['loop']:.2f}   e2e {r2['e2e'] / r1['e2e']:.2f}   (ideal 2.0)")
    print(f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end ({os.cpu_count()} cores): "
          "a shared machine makes these figures noisy")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))


# ---------------------------------------------------------------------------------------------------------
# --device-only: the Ray-free training step on one device
# ---------------------------------------------------------------------------------------------------------
def gpu_busy_fraction(step, n_steps: int) -> float | None:
    """CUDA kernel time / wall time over n_steps calls of step() (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy_us = 0.0
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) is not None and "CUDA" in str(evt.device_type):
            busy_us += float(getattr(evt, "self_device_time_total", 0.0) or 0.0)
    return min(1.0, busy_us / 1e6 / wall) if wall > 0 else None


def device_bench(args) -> None:
    import torch

    from lardo_ray.config import load_config
    from lardo_ray.train.loop import Trainer, build_model, collate

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    if not on_cuda:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    table = make_table(max(args.n, 2 * max(args.batches)))
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if on_cuda else ''}; "
          f"{table.num_rows:,} molecules in {time.perf_counter() - t0:.1f} s; model {args.layers} x {args.hidden}; "
          f"precision {args.precision}; {'DeepSpeed ZeRO ' + str(args.zero) if args.deepspeed else 'plain torch'}",
          flush=True)
    results = []
    for bs in args.batches:
        cfg = load_config(None, [
            f"model.num_layers={args.layers}", f"model.hidden={args.hidden}", f"pretrain.batch_size={bs}",
            "pretrain.warmup_steps=5", f"pretrain.deepspeed.enabled={str(args.deepspeed).lower()}",
            f"pretrain.deepspeed.precision={args.precision}", f"pretrain.deepspeed.zero_stage={args.zero}",
        ])
        trainer = Trainer(build_model(cfg.model, TEXT_DIM, seed=0), cfg.pretrain, total_steps=1000, device=device)
        slices = [table.slice(s, bs) for s in range(0, table.num_rows - bs + 1, bs)]
        cycle = itertools.cycle(slices)
        sync = torch.cuda.synchronize if on_cuda else (lambda: None)

        def full_step():
            trainer.train_step(trainer.collate(next(cycle)))

        resident = [collate(s).to(device) for s in slices[: min(len(slices), 4)]]
        res_cycle = itertools.cycle(resident)

        def compute_step():
            trainer.train_step(next(res_cycle))

        for _ in range(args.warmup):
            full_step()
        sync()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            full_step()
        sync()
        full = bs * args.steps / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(args.steps):
            compute_step()
        sync()
        compute = bs * args.steps / (time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else float("nan")
        busy = gpu_busy_fraction(full_step, min(args.steps, 10)) if on_cuda else None
        r = {"batch": bs, "rows_per_s": full, "compute_rows_per_s": compute, "peak_mib": peak, "gpu_busy": busy}
        results.append(r)
        print(f"  batch {bs:5d}: {full:10.1f} rows/s full step, {compute:10.1f} rows/s compute only, "
              f"peak {peak:8.1f} MiB, GPU busy {'n/a' if busy is None else f'{busy:.2f}'}", flush=True)
        trainer = resident = None  # free the model before the next batch size (closures above close over it)
        if on_cuda:
            torch.cuda.empty_cache()
    loaded = [m for m in ("ray", "deepspeed") if m in sys.modules]
    print(f"modules loaded: {', '.join(loaded) if loaded else 'neither ray nor deepspeed'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "results": results, "args": vars(args)},
                                              indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="molecules in the table")
    p.add_argument("--layers", type=int, default=5, help="GINE layers (paper: 5)")
    p.add_argument("--hidden", type=int, default=300, help="GINE width (paper: 300)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    cpu = p.add_argument_group("CPU mode")
    cpu.add_argument("--epochs", type=int, default=3)
    cpu.add_argument("--batch", type=int, default=64, help="rows per micro-batch per worker")
    cpu.add_argument("--eval-fraction", type=float, default=0.05)
    cpu.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    cpu.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts to run")
    cpu.add_argument("--shard-rows", type=int, default=1000, help="rows per featurize shard (Parquet file)")
    cpu.add_argument("--skip-plain-ds", action="store_true", help="skip the plain loop through DeepSpeed")
    dev = p.add_argument_group("--device-only mode")
    dev.add_argument("--device-only", action="store_true", help="only the Ray-free training step (GPU box)")
    dev.add_argument("--device", help="torch device; default cuda when visible, else cpu")
    dev.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    dev.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    dev.add_argument("--steps", type=int, default=40, help="timed steps per batch size")
    dev.add_argument("--warmup", type=int, default=5)
    dev.add_argument("--threads", type=int, default=1, help="torch threads on a CPU device")
    dev.add_argument("--deepspeed", action="store_true", help="run the step through deepspeed.initialize")
    args = p.parse_args(argv)
    if args.device_only:
        device_bench(args)
    else:
        cpu_bench(args)


if __name__ == "__main__":
    main()
