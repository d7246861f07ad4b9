"""SMILES -> molecular graph in the OGB feature scheme, batched, fast, and never raising on bad input.

The features are exactly those of ``ogb.utils.smiles2graph`` (same atom order, same edge order with both
directions of each bond next to each other, same integer values), so models and checkpoints built on the OGB
scheme (pretrain-gnns, KANO, MolGraph-LarDo) can be used unchanged. ogb itself is not imported here: it is
only a test dependency, used to check the equality.

Arrow layout of one featurised molecule (one row; all lists are flat ``list<int64>``, row-major)::

    x           list<int64>  length num_nodes * 9   atom features, node i = x[9*i : 9*i + 9]
    edge_index  list<int64>  length num_edges * 2   (source, target) pairs: edge k = (ei[2k], ei[2k+1])
                                                    i.e. the row-major flattening of edge_index.T (E x 2)
    edge_attr   list<int64>  length num_edges * 3   bond features, edge k = edge_attr[3k : 3k + 3]
    num_nodes   int64
    num_edges   int64        directed edges = 2 * bonds

Flat lists make both directions cheap: writing is one ``ListArray.from_arrays(offsets, values)`` per column
for a whole batch, and reading a batch back is one ``reshape`` of the list's child array per column plus a
vectorised node-offset shift of ``edge_index`` (see :func:`graphs_to_pyg_batch`), with no per-row Python.

The per-molecule Python work is one ``MolFromSmiles`` plus ``list(mol.GetAtoms())`` / ``GetBonds()``: the
RDKit property getters run via ``map`` over all atoms (bonds) of the whole batch at once, and the raw RDKit
values (enum ints, charges, counts) are turned into OGB vocabulary indices with numpy lookup tables.

One module (~500 lines) on purpose: the vocabulary, the writer and the two readers (PyG batch, tensors) of
this layout change together or not at all; split, a changed vocabulary would leave a reader behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
from rdkit import Chem, RDLogger

from lardo_ray import schema
from lardo_ray.chem.standardise import EMPTY, NO_ATOMS, SANITIZE, UNPARSABLE

RDLogger.DisableLog("rdApp.*")

NUM_EDGES = "num_edges"  # not (yet) in lardo_ray.schema: directed edges of the molecule (2 x bonds)

# ---------------------------------------------------------------------------------------------------------
# Vocabularies. Copied from OGB's ogb/utils/features.py (MIT License, Copyright (c) 2019 OGB Team,
# https://github.com/snap-stanford/ogb); the last entry of every list but the three boolean/stereo ones is
# the "misc" bucket that takes any value not in the list.
# ---------------------------------------------------------------------------------------------------------
ALLOWABLE_FEATURES: dict[str, list[Any]] = {
    "possible_atomic_num_list": list(range(1, 119)) + ["misc"],
    "possible_chirality_list": [
        "CHI_UNSPECIFIED",
        "CHI_TETRAHEDRAL_CW",
        "CHI_TETRAHEDRAL_CCW",
        "CHI_OTHER",
        "misc",
    ],
    "possible_degree_list": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, "misc"],
    "possible_formal_charge_list": [-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, "misc"],
    "possible_numH_list": [0, 1, 2, 3, 4, 5, 6, 7, 8, "misc"],
    "possible_number_radical_e_list": [0, 1, 2, 3, 4, "misc"],
    "possible_hybridization_list": ["SP", "SP2", "SP3", "SP3D", "SP3D2", "misc"],
    "possible_is_aromatic_list": [False, True],
    "possible_is_in_ring_list": [False, True],
    "possible_bond_type_list": ["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC", "misc"],
    "possible_bond_stereo_list": [
        "STEREONONE",
        "STEREOZ",
        "STEREOE",
        "STEREOCIS",
        "STEREOTRANS",
        "STEREOANY",
    ],
    "possible_is_conjugated_list": [False, True],
}

_ATOM_LISTS = (
    "possible_atomic_num_list",
    "possible_chirality_list",
    "possible_degree_list",
    "possible_formal_charge_list",
    "possible_numH_list",
    "possible_number_radical_e_list",
    "possible_hybridization_list",
    "possible_is_aromatic_list",
    "possible_is_in_ring_list",
)
_BOND_LISTS = ("possible_bond_type_list", "possible_bond_stereo_list", "possible_is_conjugated_list")

#: Vocabulary size of each of the 9 atom / 3 bond features (same as ogb.utils.features.get_*_feature_dims).
ATOM_FEATURE_DIMS: tuple[int, ...] = tuple(len(ALLOWABLE_FEATURES[k]) for k in _ATOM_LISTS)
BOND_FEATURE_DIMS: tuple[int, ...] = tuple(len(ALLOWABLE_FEATURES[k]) for k in _BOND_LISTS)
NUM_ATOM_FEATURES = len(ATOM_FEATURE_DIMS)  # 9
NUM_BOND_FEATURES = len(BOND_FEATURE_DIMS)  # 3


class _EnumLookup:
    """RDKit enum int -> OGB index; names not in vocab go to the last index (OGB's safe_index).

    For bond stereo OGB has no misc entry and would raise on atropisomer stereo (STEREOATROPCW/CCW, newer
    RDKit); mapping it to the last index (STEREOANY) is what safe_index would do, and never raises.
    """

    def __init__(self, enum_type: Any, vocab: list[Any]):
        values = enum_type.values  # {int: enum member}
        self.misc = len(vocab) - 1
        self.table = np.full(max(values) + 1, self.misc, dtype=np.int64)
        for code, member in values.items():
            if str(member) in vocab:
                self.table[code] = vocab.index(str(member))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        inside = (values >= 0) & (values < len(self.table))
        if inside.all():
            return self.table[values]
        out = np.full(values.shape, self.misc, dtype=np.int64)  # an enum value newer than this RDKit: misc
        out[inside] = self.table[values[inside]]
        return out


def _int_table(vocab: list[Any], lo: int, hi: int) -> tuple[np.ndarray, int]:
    """Lookup table for integer-valued features over [lo, hi]: value -> index; outside -> misc (last)."""
    misc = len(vocab) - 1
    table = np.full(hi - lo + 1, misc, dtype=np.int64)
    for i, v in enumerate(vocab):
        if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
            table[v - lo] = i
    return table, misc


_CHIRALITY = _EnumLookup(Chem.rdchem.ChiralType, ALLOWABLE_FEATURES["possible_chirality_list"])
_HYBRIDIZATION = _EnumLookup(Chem.rdchem.HybridizationType, ALLOWABLE_FEATURES["possible_hybridization_list"])
_BOND_TYPE = _EnumLookup(Chem.rdchem.BondType, ALLOWABLE_FEATURES["possible_bond_type_list"])
_BOND_STEREO = _EnumLookup(Chem.rdchem.BondStereo, ALLOWABLE_FEATURES["possible_bond_stereo_list"])


class _IntLookup:
    """Integer feature values -> vocab indices, misc (last) for anything not listed (vectorised safe_index)."""

    def __init__(self, vocab: list[Any]):
        ints = [v for v in vocab if isinstance(v, int) and not isinstance(v, bool)]
        self.lo, self.hi = min(ints), max(ints)
        self.table, self.misc = _int_table(vocab, self.lo, self.hi)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        inside = (values >= self.lo) & (values <= self.hi)
        if inside.all():
            return self.table[values - self.lo]
        out = np.full(values.shape, self.misc, dtype=np.int64)
        out[inside] = self.table[values[inside] - self.lo]
        return out


_ATOMIC_NUM = _IntLookup(ALLOWABLE_FEATURES["possible_atomic_num_list"])
_DEGREE = _IntLookup(ALLOWABLE_FEATURES["possible_degree_list"])
_CHARGE = _IntLookup(ALLOWABLE_FEATURES["possible_formal_charge_list"])
_NUM_H = _IntLookup(ALLOWABLE_FEATURES["possible_numH_list"])
_RADICAL = _IntLookup(ALLOWABLE_FEATURES["possible_number_radical_e_list"])


# Unbound RDKit getters, mapped over each molecule's atoms/bonds (C-level iteration, no attribute lookups).
# Measured on RDKit 2026.09: ``map(mol.GetAtomWithIdx, range(n))`` makes the atom wrappers ~2x faster than
# iterating ``mol.GetAtoms()``, and dropping them per molecule (instead of holding a batch's worth) keeps
# allocation cheap; the raw values go into one flat Python list per feature for the whole batch.
_A = Chem.rdchem.Atom
_B = Chem.rdchem.Bond
_ATOM_GETTERS = (
    _A.GetAtomicNum,
    _A.GetChiralTag,
    _A.GetTotalDegree,
    _A.GetFormalCharge,
    _A.GetTotalNumHs,  # includeNeighbors=False, as OGB
    _A.GetNumRadicalElectrons,
    _A.GetHybridization,
    _A.GetIsAromatic,
    _A.IsInRing,
)
_ATOM_LOOKUPS = (_ATOMIC_NUM, _CHIRALITY, _DEGREE, _CHARGE, _NUM_H, _RADICAL, _HYBRIDIZATION, None, None)
_BOND_GETTERS = (_B.GetBeginAtomIdx, _B.GetEndAtomIdx, _B.GetBondType, _B.GetStereo, _B.GetIsConjugated)


def _raw_columns(mols: Sequence[Chem.Mol]) -> tuple[list[list], list[list], list[int], list[int]]:
    """Raw RDKit values, one flat list per getter over all atoms (bonds) of all molecules, and the counts."""
    atom_cols: list[list] = [[] for _ in _ATOM_GETTERS]
    bond_cols: list[list] = [[] for _ in _BOND_GETTERS]
    atom_jobs = [(c.extend, g) for c, g in zip(atom_cols, _ATOM_GETTERS)]
    bond_jobs = [(c.extend, g) for c, g in zip(bond_cols, _BOND_GETTERS)]
    n_atoms: list[int] = []
    n_bonds: list[int] = []
    for mol in mols:
        na, nb = mol.GetNumAtoms(), mol.GetNumBonds()
        n_atoms.append(na)
        n_bonds.append(nb)
        atoms = list(map(mol.GetAtomWithIdx, range(na)))
        for extend, getter in atom_jobs:
            extend(map(getter, atoms))
        if nb:
            bonds = list(map(mol.GetBondWithIdx, range(nb)))
            for extend, getter in bond_jobs:
                extend(map(getter, bonds))
    return atom_cols, bond_cols, n_atoms, n_bonds


def _to_int64(values: list) -> np.ndarray:
    # RDKit enums are int subclasses and bools are ints: fromiter converts them without a Python loop.
    return np.fromiter(values, dtype=np.int64, count=len(values))


@dataclass(frozen=True)
class GraphArrays:
    """One molecule's graph, shaped as ogb.utils.smiles2graph returns it."""

    x: np.ndarray  # (num_nodes, 9) int64
    edge_index: np.ndarray  # (2, num_edges) int64, both directions, pairs (i->j, j->i) next to each other
    edge_attr: np.ndarray  # (num_edges, 3) int64
    num_nodes: int

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])


@dataclass(frozen=True)
class Rejection:
    """Why a SMILES could not be featurised: a value of lardo_ray.chem.standardise.REASONS plus a detail."""

    reason: str
    detail: str | None = None


def parse(smiles: object) -> Chem.Mol | Rejection:
    """Parse exactly as OGB does (``MolFromSmiles`` with sanitisation); bad input -> Rejection, never raises."""
    if smiles is None or (isinstance(smiles, str) and not smiles.strip()):
        return Rejection(EMPTY)
    if not isinstance(smiles, str):
        return Rejection(UNPARSABLE, f"not a string: {type(smiles).__name__}")
    try:
        mol = Chem.MolFromSmiles(smiles)
    except Exception as e:  # noqa: BLE001 - defensive: RDKit reports errors by returning None
        return Rejection(UNPARSABLE, str(e)[:200])
    if mol is None:
        # Slow path only for failures: tell "not SMILES at all" from "SMILES but chemically invalid".
        try:
            raw = Chem.MolFromSmiles(smiles, sanitize=False)
        except Exception:  # noqa: BLE001
            raw = None
        if raw is None:
            return Rejection(UNPARSABLE)
        try:
            Chem.SanitizeMol(raw)
        except Exception as e:  # noqa: BLE001
            return Rejection(SANITIZE, str(e)[:200])
        return Rejection(SANITIZE)
    if mol.GetNumAtoms() == 0:
        return Rejection(NO_ATOMS)
    return mol


def _featurize_mols(mols: Sequence[Chem.Mol]) -> dict[str, np.ndarray]:
    """Flat arrays for a list of parsed molecules (the core shared by the single and batch entry points).

    Returns x (N_total, 9), edge_index_pairs (E_total, 2) local node ids, edge_attr (E_total, 3),
    num_nodes (n_mols,), num_edges (n_mols,).
    """
    atom_cols, bond_cols, n_atoms, n_bonds = _raw_columns(mols)
    x = np.empty((sum(n_atoms), NUM_ATOM_FEATURES), dtype=np.int64)
    for k, (col, lookup) in enumerate(zip(atom_cols, _ATOM_LOOKUPS)):
        raw = _to_int64(col)
        x[:, k] = lookup(raw) if lookup is not None else raw
    begin, end, btype, stereo, conj = (_to_int64(c) for c in bond_cols)
    # OGB order: for every bond (i, j) then (j, i); the attributes repeat per direction.
    n_edges = 2 * len(begin)
    pairs = np.empty((n_edges, 2), dtype=np.int64)
    pairs[0::2, 0] = begin
    pairs[0::2, 1] = end
    pairs[1::2, 0] = end
    pairs[1::2, 1] = begin
    edge_attr = np.empty((n_edges, NUM_BOND_FEATURES), dtype=np.int64)
    for k, values in enumerate((_BOND_TYPE(btype), _BOND_STEREO(stereo), conj)):
        edge_attr[0::2, k] = values
        edge_attr[1::2, k] = values
    return {
        "x": x,
        "edge_index_pairs": pairs,
        "edge_attr": edge_attr,
        "num_nodes": np.asarray(n_atoms, dtype=np.int64),
        "num_edges": 2 * np.asarray(n_bonds, dtype=np.int64),
    }


def mol_to_graph(mol: Chem.Mol) -> GraphArrays:
    """Featurise an already parsed (sanitised) RDKit molecule."""
    a = _featurize_mols([mol])
    return GraphArrays(
        x=a["x"],
        edge_index=np.ascontiguousarray(a["edge_index_pairs"].T),
        edge_attr=a["edge_attr"],
        num_nodes=int(a["num_nodes"][0]),
    )


def smiles_to_graph(smiles: object) -> GraphArrays | Rejection:
    """Same arrays as ``ogb.utils.smiles2graph(smiles)`` (node_feat=x, edge_feat=edge_attr), or a Rejection."""
    mol = parse(smiles)
    if isinstance(mol, Rejection):
        return mol
    try:
        return mol_to_graph(mol)
    except Exception as e:  # noqa: BLE001 - never raise on data
        return Rejection(SANITIZE, f"featurisation failed: {e}"[:200])


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values.reshape(-1), pa.int64()))


GRAPH_COLUMNS = (schema.ATOM_FEATURES, schema.EDGE_INDEX, schema.EDGE_FEATURES, schema.NUM_NODES, NUM_EDGES)
REJECTED_SCHEMA = pa.schema(
    [
        (schema.MOL_ID, pa.string()),
        (schema.CANONICAL_SMILES, pa.string()),
        (schema.REJECT_REASON, pa.string()),
        (schema.REJECT_DETAIL, pa.string()),
    ]
)


def graph_columns(arrays: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    """Flat feature arrays (from _featurize_mols) -> the five Arrow graph columns (layout in module doc)."""
    nn, ne = arrays["num_nodes"], arrays["num_edges"]
    return {
        schema.ATOM_FEATURES: _list_array(arrays["x"], nn * NUM_ATOM_FEATURES),
        schema.EDGE_INDEX: _list_array(arrays["edge_index_pairs"], ne * 2),
        schema.EDGE_FEATURES: _list_array(arrays["edge_attr"], ne * NUM_BOND_FEATURES),
        schema.NUM_NODES: pa.array(nn, pa.int64()),
        NUM_EDGES: pa.array(ne, pa.int64()),
    }


def as_arrow_table(batch: Any) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    if isinstance(batch, dict):
        return pa.table({k: (v if isinstance(v, (pa.Array, pa.ChunkedArray)) else list(v)) for k, v in batch.items()})
    import pandas as pd

    if isinstance(batch, pd.DataFrame):
        return pa.Table.from_pandas(batch, preserve_index=False)
    raise TypeError(f"expected a pyarrow Table/RecordBatch, pandas DataFrame or dict of columns, got {type(batch)}")


class GraphFeaturizer:
    """Batch UDF: table with ``mol_id`` and ``smiles`` (plus any columns, carried forward) -> (graphs, rejected).

    ``graphs`` keeps the input columns of the molecules that featurised and adds x, edge_index, edge_attr,
    num_nodes, num_edges (layout in the module docstring; an existing column of the same name is replaced).
    ``rejected`` has mol_id, smiles, reason, detail. Nothing raises on bad SMILES.
    """

    def __init__(self, smiles_column: str = schema.CANONICAL_SMILES, id_column: str = schema.MOL_ID):
        self.smiles_column = smiles_column
        self.id_column = id_column

    def __call__(self, batch: Any) -> tuple[pa.Table, pa.Table]:
        table = as_arrow_table(batch)
        smiles = table.column(self.smiles_column).to_pylist()
        mols: list[Chem.Mol] = []
        keep: list[int] = []
        bad: list[tuple[int, Rejection]] = []
        for i, s in enumerate(smiles):
            m = parse(s)
            if isinstance(m, Rejection):
                bad.append((i, m))
            else:
                mols.append(m)
                keep.append(i)
        try:
            arrays = _featurize_mols(mols)
        except Exception:  # noqa: BLE001 - find the culprit(s) one by one; never lose the batch
            arrays, mols, keep = self._featurize_one_by_one(mols, keep, bad)
        graphs = table if len(keep) == len(smiles) else table.take(pa.array(keep, pa.int64()))
        for name, col in graph_columns(arrays).items():
            idx = graphs.schema.get_field_index(name)
            graphs = graphs.set_column(idx, name, col) if idx >= 0 else graphs.append_column(name, col)
        return graphs, self._rejected(table, bad)

    def _featurize_one_by_one(self, mols, keep, bad):
        ok_mols, ok_keep = [], []
        for m, i in zip(mols, keep):
            try:
                _featurize_mols([m])
            except Exception as e:  # noqa: BLE001
                bad.append((i, Rejection(SANITIZE, f"featurisation failed: {e}"[:200])))
            else:
                ok_mols.append(m)
                ok_keep.append(i)
        bad.sort(key=lambda t: t[0])
        return _featurize_mols(ok_mols), ok_mols, ok_keep

    def _rejected(self, table: pa.Table, bad: list[tuple[int, Rejection]]) -> pa.Table:
        if not bad:
            return REJECTED_SCHEMA.empty_table()
        rows = pa.array([i for i, _ in bad], pa.int64())
        ids = (
            table.column(self.id_column).take(rows).cast(pa.string())
            if self.id_column in table.column_names
            else pa.nulls(len(bad), pa.string())
        )
        return pa.table(
            {
                schema.MOL_ID: ids,
                schema.CANONICAL_SMILES: table.column(self.smiles_column).take(rows).cast(pa.string()),
                schema.REJECT_REASON: pa.array([r.reason for _, r in bad], pa.string()),
                schema.REJECT_DETAIL: pa.array([r.detail for _, r in bad], pa.string()),
            },
            schema=REJECTED_SCHEMA,
        )


def featurize_smiles(smiles: Iterable[object]) -> tuple[pa.Table, pa.Table]:
    """Convenience: a list of SMILES -> (graphs, rejected) with mol_id = the position as a string."""
    smiles = list(smiles)
    table = pa.table(
        {
            schema.MOL_ID: pa.array([str(i) for i in range(len(smiles))], pa.string()),
            schema.CANONICAL_SMILES: pa.array([s if isinstance(s, str) else None for s in smiles], pa.string()),
        }
    )
    return GraphFeaturizer()(table)


# ---------------------------------------------------------------------------------------------------------
# Arrow rows -> one batched PyG graph
# ---------------------------------------------------------------------------------------------------------
def _flat_values(col: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list column (Arrow, or pandas/numpy object array of sequences) -> (flat int64 values, row lengths)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(col, (pa.ListArray, pa.LargeListArray)):
        if col.null_count:
            raise ValueError("graph list columns must not hold nulls")
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        # Arrow buffers are read-only; torch wants writable memory (one memcpy of a few MB per batch).
        return np.array(values, dtype=np.int64, copy=True), np.diff(offsets).astype(np.int64)
    # pandas / numpy batch format: an object array whose items are arrays (Ray's numpy/pandas batches).
    items = list(col)
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
    if not items:
        return np.empty(0, np.int64), lengths
    values = np.concatenate([np.asarray(v, dtype=np.int64).reshape(-1) for v in items])
    return values, lengths


def _get_column(batch: Any, name: str) -> Any:
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        return batch.column(name)
    return batch[name]  # pandas DataFrame or dict of columns


def graphs_to_pyg_batch(batch: Any):
    """Rows in the graph layout (pa.Table / RecordBatch, pandas DataFrame or dict of columns) -> PyG ``Batch``.

    Concatenates the flat list columns with numpy (no per-row Data objects). The result has x (N, 9),
    edge_index (2, E), edge_attr (E, 3) as int64, batch, ptr, and the slice bookkeeping that
    ``Batch.to_data_list()`` / ``batch[i]`` need.
    """
    import torch
    from torch_geometric.data import Batch

    x_flat, x_len = _flat_values(_get_column(batch, schema.ATOM_FEATURES))
    ei_flat, ei_len = _flat_values(_get_column(batch, schema.EDGE_INDEX))
    ea_flat, _ = _flat_values(_get_column(batch, schema.EDGE_FEATURES))
    num_nodes = x_len // NUM_ATOM_FEATURES
    num_edges = ei_len // 2
    n_graphs = len(num_nodes)

    node_ptr = np.zeros(n_graphs + 1, dtype=np.int64)
    np.cumsum(num_nodes, out=node_ptr[1:])
    edge_ptr = np.zeros(n_graphs + 1, dtype=np.int64)
    np.cumsum(num_edges, out=edge_ptr[1:])

    pairs = ei_flat.reshape(-1, 2) + np.repeat(node_ptr[:-1], num_edges)[:, None]
    x = torch.from_numpy(x_flat.reshape(-1, NUM_ATOM_FEATURES))
    edge_index = torch.from_numpy(np.ascontiguousarray(pairs.T))
    edge_attr = torch.from_numpy(ea_flat.reshape(-1, NUM_BOND_FEATURES))
    batch_vec = torch.from_numpy(np.repeat(np.arange(n_graphs, dtype=np.int64), num_nodes))
    ptr = torch.from_numpy(node_ptr)

    out = Batch(x=x, edge_index=edge_index, edge_attr=edge_attr, batch=batch_vec, ptr=ptr)
    edge_ptr_t = torch.from_numpy(edge_ptr)
    zeros = torch.zeros(n_graphs, dtype=torch.long)
    out._num_graphs = n_graphs
    out._slice_dict = {"x": ptr, "edge_index": edge_ptr_t, "edge_attr": edge_ptr_t}
    out._inc_dict = {"x": zeros, "edge_index": ptr[:-1], "edge_attr": zeros}
    return out
