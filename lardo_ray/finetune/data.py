"""Fine-tuning's data, read and featurised once per dataset, without Ray: ``prepare_task(ft)`` reads the
labelled set, standardises each molecule as the dsm stage does (the raw SMILES still define the scaffold
split), featurises it (memoised per dataset in the process, optionally cached as Parquet on disk);
``split_for(prepared, ft, seed)`` gives the split (the deterministic scaffold split is the same for every seed;
scaffold_balanced / random depend on the seed); ``dsm_descriptors`` + the CDF normaliser feed ``+dsm`` heads
and the forests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from lardo_ray.finetune.datasets import LabelledSet, load_task
from lardo_ray.finetune.splits import Split, compute_scaffolds, make_split

if TYPE_CHECKING:
    from lardo_ray.finetune.settings import FinetuneConfig

log = logging.getLogger("lardo_ray")

_MEMO: OrderedDict[tuple, PreparedTask] = OrderedDict()
_MEMO_SIZE = 8


# ---------------------------------------------------------------------------------------------------------
# Data: read + featurise once per dataset
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PreparedTask:
    """A labelled set with its graphs (row i of ``graphs`` is molecule i of ``data``) and scaffolds."""

    data: LabelledSet
    graphs: pa.Table  # graph layout of lardo_ray.chem.graph (x, edge_index, edge_attr, num_nodes, num_edges)
    scaffolds: list[str] | None = None  # Bemis-Murcko scaffold per row (for the scaffold splits)
    n_featurize_rejected: int = 0  # rows RDKit parsed but the featurizer rejected (dropped here)
    featurize_seconds: float = 0.0
    graphs_from_cache: bool = False
    key: str = ""  # sha256 of the SMILES (+ featurizer vocabulary): names the on-disk graph cache
    descriptors: np.ndarray | None = None  # (n, n_descriptors) float32 RDKit descriptors, NaN where not computable

    @property
    def name(self) -> str:
        return self.data.name

    def __len__(self) -> int:
        return len(self.data)


def standardised_smiles(smiles: list[str], name: str = "") -> list[str]:
    """The dsm stage's canonical SMILES of each molecule (same ``Standardiser`` defaults); a molecule it
    refuses keeps its own SMILES, and how many did is logged."""
    from lardo_ray.chem.standardise import Standardiser

    std = Standardiser(max_atoms=10_000)
    out, kept = [], 0
    for s in smiles:
        c = std(s).canonical
        kept += c is None
        out.append(c or s)
    if kept:
        log.warning("finetune: %d molecule(s) of %s could not be standardised and are featurised as written",
                    kept, name or "the data set")
    return out


def _smiles_key(smiles: list[str]) -> str:
    from lardo_ray.chem.graph import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS

    # "std": graphs of the standardised molecules (a cache of raw-SMILES graphs must not be reused)
    h = hashlib.sha256(f"ogb:{ATOM_FEATURE_DIMS}:{BOND_FEATURE_DIMS}:std\n".encode())
    for s in smiles:
        h.update(s.encode())
        h.update(b"\n")
    return h.hexdigest()


def _memo_key(ft: FinetuneConfig) -> tuple:
    from lardo_ray.finetune.datasets import get_card, resolve_path

    card = get_card(ft.dataset) if ft.dataset else None
    path = resolve_path(card, ft.data_path)
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size, ft.dataset, ft.smiles_column,
            tuple(ft.label_columns or ()), ft.task_type, ft.metric, ft.split_column if ft.split == "column" else None,
            ft.drop_unlabelled, ft.limit)


def prepare_task(ft: FinetuneConfig, cache_dir: str | os.PathLike | None = None, *,
                 need_scaffolds: bool | None = None) -> PreparedTask:
    """Read ``ft``'s data set and featurise it (once per process: memoised by file, columns and limit).

    ``cache_dir``: keep the graph table as ``<dataset>-<key>.parquet`` there and reuse it next time.
    Scaffolds are computed when the split needs them (or ``need_scaffolds=True``)."""
    need_scaffolds = ft.split in ("scaffold", "scaffold_balanced") if need_scaffolds is None else need_scaffolds
    mkey = _memo_key(ft)
    hit = _MEMO.get(mkey)
    if hit is not None:
        _MEMO.move_to_end(mkey)
        if need_scaffolds and hit.scaffolds is None:
            hit.scaffolds = compute_scaffolds(hit.data.smiles)
        return hit

    from lardo_ray.chem.graph import featurize_smiles

    t0 = time.perf_counter()
    data = load_task(ft, limit=ft.limit)
    if len(data) == 0:
        raise ValueError(f"finetune: no usable molecule in {data.source!r}")
    key = _smiles_key(data.smiles)
    cache_file = Path(cache_dir) / f"{data.name}-{key[:16]}.parquet" if cache_dir else None
    graphs: pa.Table | None = None
    from_cache = False
    if cache_file is not None and cache_file.is_file():
        import pyarrow.parquet as pq

        try:
            graphs = pq.read_table(cache_file)
            from_cache = graphs.num_rows == len(data)
        except Exception as e:  # noqa: BLE001 - a broken cache file is rebuilt
            log.warning("finetune: graph cache %s unreadable (%s); featurising again", cache_file, e)
            graphs = None
        if not from_cache:
            graphs = None
    n_rej = 0
    if graphs is None:
        # Graphs of the standardised parent molecule (largest fragment, neutralised), as the dsm stage gives
        # pre-training: a salt or a charged form is the same molecule the encoder was pre-trained on. The raw
        # SMILES still define the scaffold split (as MolCLR).
        graphs, rejected = featurize_smiles(standardised_smiles(data.smiles, data.name))
        n_rej = rejected.num_rows
        if n_rej:
            keep = np.asarray([int(i) for i in graphs.column("mol_id").to_pylist()], dtype=np.int64)
            log.warning("finetune: %d molecule(s) of %s could not be featurised and are left out", n_rej, data.name)
            data = data.subset(keep)
            key = _smiles_key(data.smiles)
            cache_file = Path(cache_dir) / f"{data.name}-{key[:16]}.parquet" if cache_dir else None
        graphs = graphs.select(["x", "edge_index", "edge_attr", "num_nodes", "num_edges"])
        if cache_file is not None:
            import pyarrow.parquet as pq

            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
                pq.write_table(graphs, tmp)
                os.replace(tmp, cache_file)
            except OSError as e:
                log.warning("finetune: could not write the graph cache %s: %s", cache_file, e)
    graphs = graphs.combine_chunks()
    scaffolds = compute_scaffolds(data.smiles) if need_scaffolds else None
    prepared = PreparedTask(data=data, graphs=graphs, scaffolds=scaffolds, n_featurize_rejected=n_rej,
                            featurize_seconds=time.perf_counter() - t0, graphs_from_cache=from_cache, key=key)
    _MEMO[mkey] = prepared
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return prepared


def dsm_descriptors(prepared: PreparedTask, max_atoms: int = 200) -> np.ndarray:
    """The dsm stage's RDKit descriptors of every molecule (computed once, kept on ``prepared``): the same
    registry and Standardiser as the dsm stage and the rf_dsm baseline."""
    if prepared.descriptors is None:
        from lardo_ray.finetune.baselines import featurize

        f = featurize("rf_dsm", prepared.data.smiles, max_atoms)
        prepared.descriptors = f.X
        log.info("finetune %s: %d descriptors per molecule in %.1f s (%d NaN/inf values)", prepared.name,
                 f.X.shape[1], f.seconds, int(np.isnan(f.X).sum()))
    return prepared.descriptors


def fit_descriptor_normaliser(X: np.ndarray, train: np.ndarray):
    """Each descriptor's empirical CDF on the training rows (values in [0, 1], outliers and heavy tails
    tamed; chemprop's rdkit_2d_normalized does this with CDFs fitted on a reference set). Nothing is fitted
    on valid or test rows. Saved with the model: new molecules go through the same CDFs."""
    import warnings

    from sklearn.preprocessing import QuantileTransformer

    qt = QuantileTransformer(n_quantiles=max(2, min(1000, len(train))), output_distribution="uniform",
                             subsample=100_000, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # columns with every training value missing: NaN, then 0.5 below
        qt.fit(X[train].astype(np.float64))
    return qt


def apply_descriptor_normaliser(qt, X: np.ndarray) -> np.ndarray:
    """A missing value sits at the middle of the distribution (0.5)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = qt.transform(X.astype(np.float64))
    return np.nan_to_num(out, nan=0.5).astype(np.float32)


def normalise_descriptors(X: np.ndarray, train: np.ndarray) -> np.ndarray:
    return apply_descriptor_normaliser(fit_descriptor_normaliser(X, train), X)


def split_for(prepared: PreparedTask, ft: FinetuneConfig, seed: int) -> Split:
    """The split of one seed (identical for every method: it depends on the data, split kind and seed only)."""
    if ft.split in ("scaffold", "scaffold_balanced") and prepared.scaffolds is None:
        prepared.scaffolds = compute_scaffolds(prepared.data.smiles)
    split = make_split(ft.split, prepared.data.smiles, ft.split_sizes, seed,
                       split_values=prepared.data.split_values, scaffolds=prepared.scaffolds)
    if len(split.train) < 2:
        raise ValueError(f"finetune: {prepared.name}: the {ft.split} split leaves {len(split.train)} training "
                         f"molecule(s); use more data or other split_sizes")
    return split


def split_hash(split: Split) -> str:
    """Short fingerprint of a split (tagged on every seed run: equal hashes = the same molecules)."""
    h = hashlib.sha256()
    for part in split:
        h.update(np.asarray(part, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]
