"""GINE encoder: shapes, batching consistency, export / reload without DeepSpeed or Ray."""

from __future__ import annotations

import json

import pytest
import torch

from lardo_ray.chem.graph import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS, featurize_smiles, graphs_to_pyg_batch
from lardo_ray.models.gine import (
    ENCODER_CONFIG,
    ENCODER_WEIGHTS,
    FeatureEmbedding,
    GINEConfig,
    GINEEncoder,
    load_encoder,
    save_encoder,
)
from tests.conftest import GOOD_SMILES

torch.set_num_threads(1)  # 2 shared cores: two intra-op threads thrash when the other core is busy


@pytest.fixture(scope="module")
def batch():
    graphs, rejected = featurize_smiles(GOOD_SMILES + ["[Na+]", "C"])
    assert rejected.num_rows == 0
    return graphs_to_pyg_batch(graphs)


@pytest.mark.parametrize("pooling", ["mean", "sum", "max", "attention"])
@pytest.mark.parametrize("jk", ["last", "sum", "concat"])
def test_shapes(batch, pooling, jk):
    torch.manual_seed(0)
    m = GINEEncoder(num_layers=3, hidden=16, pooling=pooling, jk=jk).eval()
    out = m(batch)
    width = 16 * 4 if jk == "concat" else 16
    assert m.out_dim == width
    assert out.shape == (batch.num_graphs, width)
    assert torch.isfinite(out).all()
    # Every parameter that should learn gets a gradient in training mode.
    m.train()
    m(batch).pow(2).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


def test_defaults_and_embedding_sizes():
    m = GINEEncoder()
    assert m.config.num_layers == 5 and m.config.hidden == 300 and m.out_dim == 300
    assert [t.num_embeddings for t in m.atom_encoder.tables] == list(ATOM_FEATURE_DIMS)
    assert [t.num_embeddings for t in m.bond_encoders[0].tables] == list(BOND_FEATURE_DIMS)
    assert len(m.convs) == len(m.bond_encoders) == 5
    with pytest.raises(ValueError):
        GINEConfig(pooling="median")


def test_feature_embedding_is_sum_of_tables():
    emb = FeatureEmbedding([3, 4], dim=2)
    feats = torch.tensor([[2, 1], [0, 3]])
    want = emb.tables[0].weight[[2, 0]] + emb.tables[1].weight[[1, 3]]
    assert torch.allclose(emb(feats), want)


def test_graph_embedding_does_not_depend_on_batch_mates(batch):
    torch.manual_seed(1)
    m = GINEEncoder(num_layers=2, hidden=8, pooling="attention", jk="concat").eval()
    together = m(batch)
    for i in (0, 4, batch.num_graphs - 1):
        single = graphs_to_pyg_batch(featurize_smiles([(GOOD_SMILES + ["[Na+]", "C"])[i]])[0])
        assert torch.allclose(m(single)[0], together[i], atol=1e-5)


def test_export_reload_equal(tmp_path, batch):
    torch.manual_seed(2)
    m = GINEEncoder(num_layers=3, hidden=24, pooling="attention", jk="sum", dropout=0.1, batch_norm=True)
    # Train a few steps so the batch-norm running statistics and eps are not at their initial values.
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        m(batch).pow(2).mean().backward()
        opt.step()
    m.eval()
    save_encoder(m, tmp_path / "enc", extra={"step": 3})
    assert (tmp_path / "enc" / ENCODER_WEIGHTS).exists()
    meta = json.loads((tmp_path / "enc" / ENCODER_CONFIG).read_text())
    assert meta["config"]["hidden"] == 24 and meta["config"]["pooling"] == "attention" and meta["out_dim"] == 24
    assert meta["extra"] == {"step": 3}

    back = load_encoder(tmp_path / "enc")
    assert not back.training
    want, got = m.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert torch.equal(m(batch), back(batch))
    assert not torch.equal(GINEEncoder(back.config).eval()(batch), back(batch))  # weights really came from disk


def test_load_rejects_other_files(tmp_path):
    (tmp_path / ENCODER_CONFIG).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError):
        load_encoder(tmp_path)


def test_without_batch_norm(batch):
    m = GINEEncoder(num_layers=2, hidden=8, batch_norm=False)
    assert not any(isinstance(x, torch.nn.BatchNorm1d) for x in m.modules())
    assert m(batch).shape == (batch.num_graphs, 8)
