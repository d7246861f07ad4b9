"""The OGB featurizer: identical to ogb.utils.smiles2graph, batched through Arrow, never raising."""

from __future__ import annotations

import csv
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lardo_ray import schema
from lardo_ray.chem import graph as G
from lardo_ray.chem.standardise import EMPTY, NO_ATOMS, SANITIZE, UNPARSABLE


def _no_pypi_check(*_args, **_kwargs):
    raise RuntimeError("offline: no PyPI version check")


# Importing ogb starts a thread that asks PyPI whether ogb is outdated (package `outdated`); keep tests offline.
sys.modules.setdefault("outdated", types.SimpleNamespace(check_outdated=_no_pypi_check))
ogb_mol = pytest.importorskip("ogb.utils.mol")
ogb_features = pytest.importorskip("ogb.utils.features")
from tests.conftest import BAD_SMILES, GOOD_SMILES, SAMPLE  # noqa: E402

# Odd but valid chemistry: radicals, dummy atoms, isotopes, hypervalent centres (SP3D/SP3D2), metals,
# dative/quadruple bonds (bond-type misc), non-tetrahedral chirality (chirality misc), allenes, cis/trans.
WEIRD_SMILES = [
    "[Na+].[Cl-]", "[CH3]", "[CH2]", "*C(=O)O", "[2H]C([2H])([2H])O", "F[P-](F)(F)(F)(F)F", "F[S](F)(F)(F)(F)F",
    "ClP(Cl)(Cl)(Cl)Cl", "F/C=C/F", "F/C=C\\F", "C=[C@]=CC", "[Pt@SP1](Cl)(Cl)([NH3])[NH3]", "C[Fe@OH1](C)(C)(C)(C)C",
    "[NH3]->[Pt](Cl)(Cl)<-[NH3]", "[O-][N+](=O)c1ccccc1", "[He]", "[U+6]", "C#N", "[Cu+2].[O-2]", "[C-4]",
    "[H][H]", "[H]", "O", "[OH-]", "[se]1cccc1", "B1=NB=NB=N1", "[B-](F)(F)(F)F", "C[S+](C)C", "[Xe](F)(F)(F)F",
    "C$C", "[Fe]", "C1CC2CCC1C2", "[nH]1cccc1", "O=C([O-])C[N+](C)(C)C",
]


def _read_smiles(name: str) -> list[str]:
    with open(SAMPLE / name, newline="") as f:
        return [row["smiles"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def diverse_smiles() -> list[str]:
    """~200 molecules: every 20th of BBBP (raw, salts and charges) and of the ZINC sample, plus oddities."""
    bbbp, zinc = _read_smiles("bbbp.csv"), _read_smiles("zinc_sample.csv")
    return bbbp[::20] + zinc[::25] + GOOD_SMILES + WEIRD_SMILES


def _ogb(smiles: str) -> dict | None:
    try:
        ref = ogb_mol.smiles2graph(smiles)
    except Exception:  # noqa: BLE001 - OGB raises on SMILES RDKit cannot parse
        return None
    # OGB turns "" into a graph with no nodes; we reject it (reason "empty").
    return ref if ref["num_nodes"] > 0 else None


def _assert_same(ours: G.GraphArrays, ref: dict) -> None:
    assert ours.x.dtype == np.int64 and ours.edge_index.dtype == np.int64 and ours.edge_attr.dtype == np.int64
    np.testing.assert_array_equal(ours.x, ref["node_feat"].reshape(-1, 9))
    np.testing.assert_array_equal(ours.edge_index, ref["edge_index"])
    np.testing.assert_array_equal(ours.edge_attr, ref["edge_feat"])
    assert ours.num_nodes == ref["num_nodes"]


def test_vocabularies_match_ogb():
    assert list(G.ATOM_FEATURE_DIMS) == ogb_features.get_atom_feature_dims()
    assert list(G.BOND_FEATURE_DIMS) == ogb_features.get_bond_feature_dims()
    assert G.ALLOWABLE_FEATURES == ogb_features.allowable_features


def test_single_molecule_equals_ogb(diverse_smiles):
    n_compared = 0
    for s in diverse_smiles:
        ref = _ogb(s)
        ours = G.smiles_to_graph(s)
        if ref is None:
            assert isinstance(ours, G.Rejection), s
            continue
        assert isinstance(ours, G.GraphArrays), (s, ours)
        _assert_same(ours, ref)
        n_compared += 1
    assert n_compared >= 190


def test_sample_covers_the_hard_features(diverse_smiles):
    graphs = [g for g in map(G.smiles_to_graph, diverse_smiles) if isinstance(g, G.GraphArrays)]
    x = np.concatenate([g.x for g in graphs])
    ea = np.concatenate([g.edge_attr for g in graphs])
    assert (x[:, 1] == 1).any() and (x[:, 1] == 2).any()  # tetrahedral CW and CCW
    assert (x[:, 1] == 4).any()  # chirality misc (square planar / octahedral)
    assert (x[:, 3] != 5).any()  # formal charges
    assert (x[:, 0] == 118).any()  # atomic number misc (dummy atom)
    assert (x[:, 5] > 0).any()  # radicals
    assert set(np.unique(x[:, 6])) >= {0, 1, 2, 3, 4, 5}  # SP .. SP3D2 and misc
    assert (x[:, 7] == 1).any() and (x[:, 8] == 1).any()  # aromatic, in ring
    assert set(np.unique(ea[:, 0])) == {0, 1, 2, 3, 4}  # single .. aromatic + misc (dative)
    assert {1, 2} <= set(np.unique(ea[:, 1]))  # Z and E double bonds
    assert (ea[:, 2] == 1).any()  # conjugated


def test_known_values():
    # The example in OGB's own features.py: the chiral carbon of Cl[C@H](/C=C/C)Br and its E double bond.
    g = G.smiles_to_graph("Cl[C@H](/C=C/C)Br")
    assert g.x[1].tolist() == [5, 2, 4, 5, 1, 0, 2, 0, 0]
    assert g.edge_attr[2 * 2].tolist() == [1, 2, 0]
    # Edge order: each bond twice, (i, j) then (j, i).
    assert g.edge_index[:, :4].tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]


def test_bad_input_is_rejected_never_raises():
    for bad, reason in BAD_SMILES.items():
        r = G.smiles_to_graph(bad)
        if reason == "too_many_atoms":  # a valid (long) molecule: the featurizer has no size limit
            assert isinstance(r, G.GraphArrays) and r.num_nodes == 2000
            continue
        assert isinstance(r, G.Rejection), bad
        assert r.reason == reason, (bad, r)
    assert G.smiles_to_graph(None) == G.Rejection(EMPTY)
    assert G.smiles_to_graph("   ") == G.Rejection(EMPTY)
    assert G.smiles_to_graph(42).reason == UNPARSABLE
    assert G.smiles_to_graph("CN(C)(C)(C)C").reason == SANITIZE
    assert "valence" in G.smiles_to_graph("CN(C)(C)(C)C").detail
    assert G.smiles_to_graph("[Xx]").reason == UNPARSABLE
    assert G.parse("").reason == EMPTY
    # SMILES that parse to zero atoms are rejected, not featurised into an empty graph.
    assert G.smiles_to_graph("-").reason in (NO_ATOMS, UNPARSABLE)


def test_featurizer_batch_equals_ogb_and_carries_columns(diverse_smiles):
    smiles = diverse_smiles + ["", None, "C1CC", "c1cccc1"]
    n = len(smiles)
    table = pa.table({
        schema.MOL_ID: [f"id{i}" for i in range(n)],
        schema.CANONICAL_SMILES: pa.array(smiles, pa.string()),
        "label": list(range(n)),
    })
    graphs, rejected = G.GraphFeaturizer()(table)

    refs = [_ogb(s) if isinstance(s, str) else None for s in smiles]
    ok = [i for i, r in enumerate(refs) if r is not None]
    assert graphs.num_rows == len(ok)
    assert rejected.num_rows == n - len(ok) >= 4
    assert graphs.column("label").to_pylist() == ok  # carried forward, input order kept
    assert graphs.column(schema.MOL_ID).to_pylist() == [f"id{i}" for i in ok]
    assert rejected.schema.names == [schema.MOL_ID, schema.CANONICAL_SMILES, schema.REJECT_REASON, schema.REJECT_DETAIL]
    rej = {r[schema.MOL_ID]: r for r in rejected.to_pylist()}
    assert rej[f"id{n - 4}"][schema.REJECT_REASON] == EMPTY
    assert rej[f"id{n - 3}"][schema.REJECT_REASON] == EMPTY
    assert rej[f"id{n - 2}"][schema.REJECT_REASON] == UNPARSABLE
    assert rej[f"id{n - 1}"][schema.REJECT_REASON] == SANITIZE
    assert rej[f"id{n - 1}"][schema.CANONICAL_SMILES] == "c1cccc1"

    # Layout: flat int64 lists + counts.
    for col in (schema.ATOM_FEATURES, schema.EDGE_INDEX, schema.EDGE_FEATURES):
        assert graphs.schema.field(col).type == pa.list_(pa.int64())
    assert graphs.schema.field(schema.NUM_NODES).type == pa.int64()
    assert graphs.schema.field(G.NUM_EDGES).type == pa.int64()

    # Round trip through Parquet, then every row back equals OGB.
    buf = pa.BufferOutputStream()
    pq.write_table(graphs, buf)
    back = pq.read_table(pa.BufferReader(buf.getvalue()))
    for row, i in zip(back.to_pylist(), ok):
        ref = refs[i]
        nn_, ne = row[schema.NUM_NODES], row[G.NUM_EDGES]
        np.testing.assert_array_equal(np.array(row[schema.ATOM_FEATURES]).reshape(nn_, 9), ref["node_feat"])
        np.testing.assert_array_equal(np.array(row[schema.EDGE_INDEX], dtype=np.int64).reshape(ne, 2).T,
                                      ref["edge_index"])
        np.testing.assert_array_equal(np.array(row[schema.EDGE_FEATURES]).reshape(ne, 3).reshape(-1, 3),
                                      ref["edge_feat"])


def test_featurizer_all_rejected_and_empty_batch():
    table = pa.table({schema.MOL_ID: ["a", "b"], schema.CANONICAL_SMILES: ["C1CC", ""]})
    graphs, rejected = G.GraphFeaturizer()(table)
    assert graphs.num_rows == 0 and rejected.num_rows == 2
    assert graphs.schema.field(schema.ATOM_FEATURES).type == pa.list_(pa.int64())
    empty = table.slice(0, 0)
    graphs, rejected = G.GraphFeaturizer()(empty)
    assert graphs.num_rows == 0 and rejected.num_rows == 0


def test_pyg_batch_equals_from_data_list(diverse_smiles):
    from torch_geometric.data import Batch, Data

    graphs, _ = G.GraphFeaturizer()(pa.table({
        schema.MOL_ID: [str(i) for i in range(len(diverse_smiles))], schema.CANONICAL_SMILES: diverse_smiles}))
    expected = []
    for s in graphs.column(schema.CANONICAL_SMILES).to_pylist():
        ref = ogb_mol.smiles2graph(s)
        expected.append(Data(x=torch.from_numpy(ref["node_feat"]), edge_index=torch.from_numpy(ref["edge_index"]),
                             edge_attr=torch.from_numpy(ref["edge_feat"]), num_nodes=ref["num_nodes"]))
    want = Batch.from_data_list(expected)
    for batch_format in ("arrow", "pandas", "chunked"):
        if batch_format == "arrow":
            src = graphs
        elif batch_format == "pandas":
            src = graphs.to_pandas()
        else:  # several record batches, as Ray hands over
            src = pa.Table.from_batches(graphs.to_batches(max_chunksize=17))
        got = G.graphs_to_pyg_batch(src)
        assert got.num_graphs == len(expected)
        for key in ("x", "edge_index", "edge_attr", "batch", "ptr"):
            assert torch.equal(getattr(got, key), getattr(want, key)), (batch_format, key)
    # The slice bookkeeping works: rows come back out one by one.
    got = G.graphs_to_pyg_batch(graphs)
    for i in (0, 7, len(expected) - 1):
        d = got.get_example(i)
        assert torch.equal(d.x, expected[i].x) and torch.equal(d.edge_index, expected[i].edge_index)
    assert got.to_data_list()[3].edge_attr.shape == expected[3].edge_attr.shape
