"""Benchmark of the featurize stage: SMILES -> OGB graphs.

    python bench/featurize.py [--n 20000]

1. One process, the same canonical SMILES: lardo_ray's GraphFeaturizer vs ogb.utils.smiles2graph vs
   torch_geometric.utils.from_smiles (graphs/s and ratios).
2. The Ray stage end to end (read the DSM shards, featurize, write Parquet; actor start-up included) vs
   cores x the single-process featurizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dsm import load_smiles  # noqa: E402  (bench/dsm.py: first N MOSES molecules, or the bundled sample)


def rate(fn, items) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return len(items) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="molecules for the Ray stage")
    ap.add_argument("--single-n", type=int, default=3_000, help="molecules timed in one process")
    args = ap.parse_args()
    cores = os.cpu_count() or 1

    import pyarrow as pa
    from rdkit import Chem

    from lardo_ray.chem.graph import GraphFeaturizer

    smiles = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in load_smiles(args.n)]
    few = smiles[: args.single_n]
    print(f"bench/featurize.py: {len(smiles):,} molecules; single-process runs on {len(few):,}; cores={cores}")

    feat = GraphFeaturizer()
    table = pa.table({"mol_id": [str(i) for i in range(len(few))], "smiles": few})
    t0 = time.perf_counter()
    for start in range(0, len(few), 2_000):
        feat(table.slice(start, 2_000))
    ours = len(few) / (time.perf_counter() - t0)

    sys.modules.setdefault("outdated", types.SimpleNamespace(check_outdated=lambda *a, **k: (False, "")))
    from ogb.utils import smiles2graph
    from torch_geometric.utils import from_smiles

    ogb = rate(smiles2graph, few)
    pyg = rate(from_smiles, few)
    print(f"  lardo_ray GraphFeaturizer     : {ours:8.0f} graphs/s")
    print(f"  ogb.utils.smiles2graph        : {ogb:8.0f} graphs/s   ratio ours/ogb = {ours / ogb:.2f}")
    print(f"  torch_geometric from_smiles   : {pyg:8.0f} graphs/s   ratio ours/pyg = {ours / pyg:.2f}")

    from lardo_ray.config import load_config
    from lardo_ray.stages.featurize import run_featurize
    from lardo_ray.stages.ingest_dsm import run_dsm

    tmp = Path(tempfile.mkdtemp(prefix="lardo-bench-feat-"))
    inp = tmp / "in.csv"
    inp.write_text("smiles\n" + "\n".join(smiles) + "\n")
    chunk = max(500, min(20_000, args.n // (4 * cores)))
    cfg = load_config(None, [
        f"input.path={inp}", f"run.output_dir={tmp / 'out'}", f"input.chunk_rows={chunk}", "dsm.descriptors=[MolWt]",
        f"run.ray_num_cpus={cores}", "run.progress=false", "tracking.enabled=false", "featurize.upstream=dsm",
    ])
    run_dsm(cfg)  # the stage's input: DSM shards (only one cheap descriptor)
    t0 = time.perf_counter()
    s = run_featurize(cfg)
    wall = time.perf_counter() - t0
    stage = s.n_read / wall
    print(f"  ray featurize stage           : {stage:8.0f} graphs/s end to end ({wall:.1f} s, chunks of {chunk:,})")
    print(f"  RATIO stage / (cores x single) = {stage:.0f} / ({cores} x {ours:.0f}) = {stage / (cores * ours):.3f}")


if __name__ == "__main__":
    main()
