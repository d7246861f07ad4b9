"""Benchmark of the ingest+dsm stage: the Ray pipeline against a plain single-process RDKit loop.

    python bench/dsm.py [--n 20000] [--descriptors all] [--skip-baseline]

Baseline: parse each SMILES and run the same calculators in one Python loop (no standardisation, no I/O).
Pipeline: the real stage end to end (plan, read, standardise, descriptors, write Parquet, dedupe,
reconcile), Ray start-up included, with the stage's default settings (all cores, its own chunk plan). Prints molecules/s of both and
ratio = pipeline / (cores x baseline), plus peak memory of the driver and of the Ray workers.
Run it with --n 20000 and --n 200000 to see that memory does not grow with N.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MOSES = ROOT.parent / "shared" / "data" / "pretrain" / "moses_train.csv.gz"
SAMPLE = ROOT / "lardo_ray" / "data" / "zinc_sample.csv"


def load_smiles(n: int) -> list[str]:
    if MOSES.exists():
        with gzip.open(MOSES, "rt") as f:
            next(f)
            return [ln.strip() for ln in itertools.islice(f, n)]
    base = SAMPLE.read_text().split()[1:]
    return list(itertools.islice(itertools.cycle(base), n))


def baseline(smiles: list[str], descriptors) -> float:
    from rdkit import Chem

    from lardo_ray.chem.descriptors import DescriptorCalculator

    calc = DescriptorCalculator(descriptors)
    t0 = time.perf_counter()
    for s in smiles:
        m = Chem.MolFromSmiles(s)
        if m is not None:
            calc.compute([m])
    return len(smiles) / (time.perf_counter() - t0)


class WorkerMemory(threading.Thread):
    """Samples the RSS of Ray worker processes (all `ray::` processes) while the pipeline runs."""

    def __init__(self, descendants_of: int | None = None):
        super().__init__(daemon=True)
        self.peak_each = 0
        self.peak_total = 0
        self.stop = threading.Event()
        self.root = descendants_of  # only this process's own Ray (another job's workers are not ours)

    def _processes(self):
        import psutil

        if self.root is None:
            return list(psutil.process_iter())
        try:
            return psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            return []

    def run(self):
        import psutil

        while not self.stop.is_set():
            rss = []
            for p in self._processes():
                try:
                    cmd = " ".join(p.cmdline() or [])
                    if "ray::" in cmd:
                        rss.append(p.memory_info().rss)
                except psutil.Error:
                    continue
            if rss:
                self.peak_each = max(self.peak_each, max(rss))
                self.peak_total = max(self.peak_total, sum(rss))
            self.stop.wait(0.5)


def pipeline(smiles: list[str], descriptors, cores: int, chunk_rows: int, dashboard: bool = True) -> tuple[float, object, WorkerMemory]:
    from lardo_ray.config import load_config
    from lardo_ray.stages.ingest_dsm import run_dsm

    tmp = Path(tempfile.mkdtemp(prefix="lardo-bench-dsm-"))
    inp = tmp / "in.csv"
    inp.write_text("smiles\n" + "\n".join(smiles) + "\n")
    desc = descriptors if isinstance(descriptors, str) else "[" + ",".join(descriptors) + "]"
    overrides = [
        f"input.path={inp}", f"run.output_dir={tmp / 'out'}",
        f"dsm.descriptors={desc}", "run.progress=false", "tracking.enabled=false",
        f"run.ray_dashboard={str(dashboard).lower()}",
    ]
    if chunk_rows:  # else the stage's own plan (auto_chunk_rows), as a user gets it
        overrides.append(f"input.chunk_rows={chunk_rows}")
    cfg = load_config(None, overrides)
    mem = WorkerMemory()
    mem.start()
    t0 = time.perf_counter()
    summary = run_dsm(cfg)
    wall = time.perf_counter() - t0
    mem.stop.set()
    mem.join()
    return len(smiles) / wall, summary, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="molecules (first N of MOSES when present)")
    ap.add_argument("--descriptors", default="all", help="'all' or comma-separated names/groups")
    ap.add_argument("--baseline-n", type=int, default=3_000, help="molecules timed in the single-process loop")
    ap.add_argument("--chunk-rows", type=int, default=0, help="input.chunk_rows (0: the default, as a user runs it)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard (run.ray_dashboard)")
    args = ap.parse_args()
    descriptors = args.descriptors if args.descriptors == "all" else args.descriptors.split(",")
    cores = os.cpu_count() or 1
    smiles = load_smiles(args.n)
    src = "MOSES train" if MOSES.exists() else "bundled ZINC sample, repeated"
    print(f"bench/dsm.py: {len(smiles):,} molecules from {src}; descriptors={args.descriptors}; cores={cores}")
    base = None
    if not args.skip_baseline:
        base = baseline(smiles[: args.baseline_n], descriptors)
        print(f"  single-process loop : {base:8.1f} mol/s  (first {min(args.baseline_n, len(smiles)):,} molecules)")
    rate, summary, mem = pipeline(smiles, descriptors, cores, args.chunk_rows, dashboard=not args.no_dashboard)
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  ray pipeline        : {rate:8.1f} mol/s  end to end, {summary.wall_seconds:.1f} s, {summary.chunks_total} chunks")
    print(f"  written/rejected/dup: {summary.n_written:,}/{summary.n_rejected:,}/{summary.n_duplicates:,} "
          f"(reconciled: {summary.reconciled})")
    print(f"  peak memory         : driver {driver_peak:,.0f} MiB; largest Ray worker {mem.peak_each / 2**20:,.0f} MiB; "
          f"all Ray processes {mem.peak_total / 2**20:,.0f} MiB")
    if base:
        print(f"  RATIO pipeline / (cores x single) = {rate:.1f} / ({cores} x {base:.1f}) = {rate / (cores * base):.3f}")


if __name__ == "__main__":
    main()
