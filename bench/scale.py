"""Scale benchmark: the DSM, featurize and rules-describe stages over the MOSES training set (1.58 M molecules)
in bounded memory.

    python bench/scale.py                                  # 100 k, then the full set; memory ratio between them
    python bench/scale.py --sizes 20000 --describe-n 5000  # a quick look
    python bench/scale.py --descriptors all                # every RDKit descriptor (~1/10 the speed)

Each size runs in its own process, the stages in pipeline order (dsm -> featurize -> rules describe, by
default over every DSM row of the size), straight from the gzip CSV (the driver never holds the molecules). Per stage:
wall time, molecules/s, peak RSS of the driver (sampled) and of the largest Ray worker, and the bytes Ray
spilled. The last lines compare peak memory at the largest size with the smallest (target: within 1.2x) and
project a cluster's throughput from molecules/s per core.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MOSES = ROOT.parent / "shared" / "data" / "pretrain" / "moses_train.csv.gz"
# the Lipinski / Veber properties the `pretrain` template leads with (describe computes any other it needs):
# what a pre-training corpus run computes (`all` is the full RDKit set, ~10x slower)
DEFAULT_DESCRIPTORS = "MolWt,MolLogP,TPSA,NumHDonors,NumHAcceptors,NumRotatableBonds,RingCount,NumAromaticRings,FractionCSP3"


class MemorySampler(threading.Thread):
    """Peak RSS of this process (the driver) and of every Ray worker process, sampled twice a second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.driver = self.worker = 0
        self.stop = threading.Event()

    def run(self):
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith("ray::") and p.info["memory_info"] is not None:
                    self.worker = max(self.worker, p.info["memory_info"].rss)
            self.stop.wait(0.5)


def spilled_mib() -> float:
    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Spilled (\d+) MiB", text)
    return float(m.group(1)) if m else 0.0


def run_one(n: int, describe_n: int | None, descriptors: str, chunk_rows: int, cores: int, out: Path) -> dict:
    """Run the stages over the first n molecules (this process = the driver); one dict of figures."""
    import ray

    from lardo_ray.config import load_config
    from lardo_ray.execution import init_ray
    from lardo_ray.stages.describe import run_describe
    from lardo_ray.stages.featurize import run_featurize
    from lardo_ray.stages.ingest_dsm import run_dsm

    base = [f"input.path={MOSES}", "input.smiles_column=SMILES", f"input.limit={n}", f"input.chunk_rows={chunk_rows}",
            f"run.output_dir={out}", f"run.ray_num_cpus={cores}", "run.progress=false", "tracking.enabled=false",
            f"dsm.descriptors=[{descriptors}]" if descriptors != "all" else "dsm.descriptors=all",
            "describe.backend=rules", "describe.task=pretrain", "featurize.upstream=dsm"]
    cfg = load_config(None, base)
    init_ray(num_cpus=cores)
    figures: dict = {"n": n}
    stages = [("dsm", run_dsm, cfg), ("featurize", run_featurize, cfg)]
    if describe_n is None or describe_n >= n:
        stages.append(("describe", run_describe, cfg))  # over this size's own DSM output
    elif describe_n:
        # describe reads a DSM output: its own (untimed) DSM run over the first describe_n molecules
        sub = load_config(None, base + [f"input.limit={describe_n}", f"run.output_dir={out}/describe_subset"])
        run_dsm(sub)
        stages.append(("describe", run_describe, sub))
    for name, fn, c in stages:
        mem = MemorySampler()
        mem.start()
        t0 = time.perf_counter()
        s = fn(c)
        wall = time.perf_counter() - t0
        mem.stop.set()
        mem.join()
        figures[name] = {
            "rows": s.n_read, "written": s.n_written, "rejected": s.n_rejected, "duplicates": s.n_duplicates,
            "reconciled": bool(s.reconciled), "wall_s": round(wall, 1), "mol_per_s": round(s.n_read / wall, 1),
            "driver_peak_mib": round(mem.driver / 2**20), "worker_peak_mib": round(mem.worker / 2**20),
            "spilled_mib": spilled_mib(),
        }
        label = f"{n:,}" if n < 10**9 else "all"
        print(f"  [{label}] {name:<9s} {s.n_read:>9,} rows  {wall:7.1f} s  {s.n_read / wall:8.1f} mol/s  "
              f"driver {mem.driver / 2**20:6.0f} MiB  worker {mem.worker / 2**20:6.0f} MiB  "
              f"reconciled {s.reconciled}", flush=True)
    ray.shutdown()
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,0", help="comma-separated molecule counts; 0 = the whole file")
    ap.add_argument("--describe-n", default="all",
                    help="rows of the rules describe stage per size: 'all' (every DSM row of the size), a count "
                         "(its own DSM run over that many molecules), or 0 to skip")
    ap.add_argument("--descriptors", default=DEFAULT_DESCRIPTORS, help="'all' or comma-separated names")
    ap.add_argument("--chunk-rows", type=int, default=20_000)
    ap.add_argument("--out", default=None, help="output root (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one size
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    if not MOSES.exists():
        sys.exit(f"bench/scale.py needs {MOSES} (the MOSES training set)")
    if args.one is not None:
        n = args.one or 10**9
        out = Path(args.out) / f"n{args.one}"
        describe_n = None if args.describe_n == "all" else int(args.describe_n)
        print(json.dumps(run_one(n, describe_n, args.descriptors, args.chunk_rows, cores, out)), flush=True)
        return

    root = Path(args.out or tempfile.mkdtemp(prefix="lardo-bench-scale-"))
    print(f"bench/scale.py: MOSES train, sizes {args.sizes}, descriptors {args.descriptors}, cores {cores}, out {root}")
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(size), "--out", str(root), "--describe-n", str(args.describe_n),
               "--descriptors", args.descriptors, "--chunk-rows", str(args.chunk_rows)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.rstrip().splitlines()
        for ln in lines[:-1]:
            if ln.startswith("  ["):
                print(ln)
        if proc.returncode != 0 or not lines:
            sys.exit(f"size {size} failed (exit {proc.returncode})")
        results.append(json.loads(lines[-1]))

    print("\n| stage | molecules | wall s | mol/s | mol/s/core | driver peak MiB | worker peak MiB | spilled MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for st in ("dsm", "featurize", "describe"):
            if st in r:
                f = r[st]
                print(f"| {st} | {f['rows']:,} | {f['wall_s']:,.1f} | {f['mol_per_s']:,.1f} | "
                      f"{f['mol_per_s'] / cores:,.1f} | {f['driver_peak_mib']:,} | {f['worker_peak_mib']:,} | "
                      f"{f['spilled_mib']:,.0f} |")
    if len(results) >= 2:
        small, big = results[0], results[-1]
        for st in ("dsm", "featurize", "describe"):
            if st in small and st in big:
                d = big[st]["driver_peak_mib"] / max(small[st]["driver_peak_mib"], 1)
                w = big[st]["worker_peak_mib"] / max(small[st]["worker_peak_mib"], 1)
                print(f"MEMORY {st}: peak at {big[st]['rows']:,} / at {small[st]['rows']:,} = driver {d:.2f}x, "
                      f"worker {w:.2f}x (target <= 1.2x)")
    last = results[-1]
    for st in ("dsm", "featurize", "describe"):
        if st in last:
            per_core = last[st]["mol_per_s"] / cores
            print(f"PROJECTION {st}: {per_core:,.0f} mol/s/core -> 1,000 cores ~ {per_core * 1000:,.0f} mol/s "
                  f"({1e9 / (per_core * 1000) / 3600:,.1f} h per billion molecules)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
