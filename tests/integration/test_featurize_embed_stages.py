"""featurize and embed as Ray stages: one-to-one over upstream shards, resumable, exact graphs."""

from __future__ import annotations

import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lardo_ray import schema
from lardo_ray.config import ConfigError, load_config
from lardo_ray.io import StageOutput
from lardo_ray.stages.embed import run_embed
from lardo_ray.stages.featurize import run_featurize
from lardo_ray.stages.ingest_dsm import run_dsm
from tests.conftest import GOOD_SMILES, SAMPLE


def _cfg(tmp_path, *extra):
    return load_config(None, [
        f"run.output_dir={tmp_path / 'out'}", "run.progress=false", "input.chunk_rows=40",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "dsm.descriptors=[MolLogP,MolWt,TPSA]", *extra,
    ])


@pytest.fixture()
def ogb_smiles2graph(monkeypatch):
    # ogb checks PyPI for a newer version on import; keep the test offline.
    monkeypatch.setitem(sys.modules, "outdated", types.SimpleNamespace(check_outdated=lambda *a, **k: (False, "")))
    from ogb.utils import smiles2graph

    return smiles2graph


def test_featurize_after_dsm_equals_ogb(ray_local, tmp_path, ogb_smiles2graph):
    lines = (SAMPLE / "zinc_sample.csv").read_text().splitlines()[:121]
    inp = tmp_path / "in.csv"
    inp.write_text("\n".join(lines + GOOD_SMILES) + "\n")
    cfg = _cfg(tmp_path, f"input.path={inp}", "featurize.upstream=dsm")
    dsm = run_dsm(cfg)
    feat = run_featurize(cfg)
    assert feat.reconciled and feat.n_read == dsm.n_written == feat.n_written
    assert feat.chunks_total == dsm.chunks_total  # one shard per upstream shard
    table = pq.read_table(str(tmp_path / "out" / "featurize" / "data"))
    assert set(table.column_names) >= {schema.MOL_ID, "smiles", "x", "edge_index", "edge_attr", "num_nodes"}
    for row in table.slice(0, 60).to_pylist() + table.slice(table.num_rows - 10).to_pylist():
        ref = ogb_smiles2graph(row["smiles"])
        n, e = ref["num_nodes"], ref["edge_index"].shape[1]
        assert row["num_nodes"] == n
        assert np.array_equal(np.array(row["x"]).reshape(n, 9), ref["node_feat"])
        assert np.array_equal(np.array(row["edge_index"]).reshape(e, 2).T, ref["edge_index"])
        assert np.array_equal(np.array(row["edge_attr"]).reshape(e, 3), ref["edge_feat"])
    again = run_featurize(cfg)
    assert again.chunks_skipped == again.chunks_total


def test_featurize_needs_complete_upstream(tmp_path):
    cfg = _cfg(tmp_path, "featurize.upstream=dsm")
    with pytest.raises(ConfigError, match="run `lardo-ray dsm` first"):
        run_featurize(cfg)


def test_embed_once_per_description(ray_local, tmp_path):
    """The embed stage over a describe-shaped upstream: identical texts share one vector; nulls stay null."""
    up = StageOutput(str(tmp_path / "out" / "describe"))
    up.prepare()
    texts = ["A small polar molecule.", "A lipophilic aromatic amine.", None, "A small polar molecule."]
    for k in range(2):
        cid = f"00000-{k:06d}"
        t = pa.table({schema.MOL_ID: [f"{k}{i}" for i in range(4)], "smiles": ["CCO", "c1ccccc1N", "CC", "CCN"],
                      schema.DESCRIPTION: texts, schema.TEMPLATE_ID: ["t"] * 4})
        up.write_table_atomic(up.data_path(cid), t)
        up.write_table_atomic(up.rejected_path(cid), pa.table({"reason": pa.array([], pa.string())}))
    up.write_manifest({"status": "complete", "chunks": ["00000-000000", "00000-000001"], "config_hash": "x",
                       "input_fingerprint": "y"})
    cfg = _cfg(tmp_path)
    s = run_embed(cfg)
    assert s.reconciled and s.n_written == 8
    out = pq.read_table(str(tmp_path / "out" / "embed" / "data")).to_pylist()
    vecs = [r[schema.TEXT_EMBEDDING] for r in out]
    assert vecs[2] is None and len(vecs[0]) == 384
    assert vecs[0] == vecs[3] and vecs[0] != vecs[1]
    assert abs(float(np.linalg.norm(vecs[0])) - 1.0) < 1e-4
    # the summary says how distinct the texts are: 2 distinct of 8 rows (two are null)
    assert s.extra["text_distinct"] == 0.25 and 0.0 < s.extra["text_mean_cosine"] < 1.0


def test_featurize_carries_the_dsm_descriptors_of_each_row(ray_local, tmp_path):
    """dsm -> describe (rules) -> embed -> featurize with featurize.dsm_targets: each row's vector holds the
    dsm stage's values for that molecule, in the registry's order, and no kept input column (a label)."""
    from lardo_ray.stages.describe import run_describe

    lines = (SAMPLE / "zinc_sample.csv").read_text().splitlines()[:81]
    inp = tmp_path / "in.csv"
    inp.write_text("\n".join([lines[0] + ",label"] + [f"{s},{i % 2}" for i, s in enumerate(lines[1:])]) + "\n")
    cfg = _cfg(tmp_path, f"input.path={inp}", "input.keep_columns=[label]", "describe.backend=rules",
               "featurize.dsm_targets=true")
    run_dsm(cfg)
    run_describe(cfg)
    run_embed(cfg)
    feat = run_featurize(cfg)
    assert feat.reconciled and feat.n_written == 80 and feat.chunks_total == 2
    got = pq.read_table(str(tmp_path / "out" / "featurize" / "data"), columns=[schema.MOL_ID, schema.DSM_TARGETS])
    dsm = pq.read_table(str(tmp_path / "out" / "dsm" / "data")).to_pandas().set_index(schema.MOL_ID)
    names = ["MolLogP", "MolWt", "TPSA"]  # dsm.descriptors in _cfg, in the registry's order
    from lardo_ray.chem.descriptors import resolve_descriptor_names

    assert resolve_descriptor_names(names) == names
    for mol_id, vec in zip(got.column(0).to_pylist(), got.column(1).to_pylist()):
        assert len(vec) == len(names), vec  # the kept label is not among them
        assert np.allclose(vec, dsm.loc[mol_id, names].to_numpy(dtype=np.float32), equal_nan=True), mol_id


def test_featurize_dsm_targets_needs_a_finished_dsm_stage(tmp_path):
    up = StageOutput(str(tmp_path / "out" / "embed"))
    up.prepare()
    up.write_manifest({"status": "complete", "chunks": [], "config_hash": "x", "input_fingerprint": "y"})
    with pytest.raises(ConfigError, match="featurize.dsm_targets reads the dsm stage"):
        run_featurize(_cfg(tmp_path, "featurize.dsm_targets=true"))
