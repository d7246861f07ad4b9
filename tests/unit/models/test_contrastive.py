"""InfoNCE, temperature and retrieval accuracy against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from lardo_ray.models.contrastive import (
    LogitScale,
    ProjectionHead,
    contrastive_logits,
    info_nce,
    info_nce_loss,
    match_ranks,
    retrieval_accuracy,
)

LOGITS = torch.tensor(
    [
        [2.0, 1.0, 0.0],
        [0.5, 1.0, 3.0],
        [0.0, 0.0, 1.0],
    ]
)


def _ce(row: list[float], target: int) -> float:
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def test_info_nce_by_hand():
    rows = LOGITS.tolist()
    cols = LOGITS.t().tolist()
    g2t = sum(_ce(rows[i], i) for i in range(3)) / 3
    t2g = sum(_ce(cols[i], i) for i in range(3)) / 3
    loss, a, b = info_nce(LOGITS)
    assert a.item() == pytest.approx(g2t, rel=1e-6)
    assert b.item() == pytest.approx(t2g, rel=1e-6)
    assert loss.item() == pytest.approx((g2t + t2g) / 2, rel=1e-6)
    # The two directions are different numbers here, so a one-sided loss would fail this test.
    assert abs(g2t - t2g) > 0.05


def test_info_nce_is_symmetric():
    loss, a, b = info_nce(LOGITS)
    loss_t, a_t, b_t = info_nce(LOGITS.t())
    assert loss.item() == pytest.approx(loss_t.item())
    assert a.item() == pytest.approx(b_t.item()) and b.item() == pytest.approx(a_t.item())


def test_info_nce_loss_from_embeddings():
    g = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    t = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    scale = 10.0
    # Cosines: g0.t0 = 0.8, g0.t1 = 0, g1.t0 = 0.96, g1.t1 = 0.8.
    logits = [[8.0, 0.0], [9.6, 8.0]]
    g2t = (_ce(logits[0], 0) + _ce(logits[1], 1)) / 2
    t2g = (_ce([8.0, 9.6], 0) + _ce([0.0, 8.0], 1)) / 2
    assert torch.allclose(contrastive_logits(g, t, scale), torch.tensor(logits), atol=1e-5)
    assert info_nce_loss(g, t, scale).item() == pytest.approx((g2t + t2g) / 2, rel=1e-5)
    # Perfectly separated pairs at a high scale: the loss goes to 0.
    eye = torch.eye(4)
    assert info_nce_loss(eye, eye, 100.0).item() < 1e-10
    with pytest.raises(ValueError):
        info_nce(torch.zeros(2, 3))


def test_retrieval_accuracy_by_hand():
    # Row-wise (graph->text): row 0 best is col 0 (rank 0); row 1 best is col 2 (true col 1 ranks 1);
    # row 2 best is col 2 (rank 0)  -> top1 = 2/3.
    # Column-wise (text->graph): col 0 best is row 0 (rank 0); col 1 has 1.0 at rows 0 and 1: tie counts
    # against -> rank 1; col 2: true row 2 has 1.0 < 3.0 of row 1 -> rank 1  -> top1 = 1/3.
    g2t, t2g = match_ranks(LOGITS)
    assert g2t.tolist() == [0, 1, 0]
    assert t2g.tolist() == [0, 1, 1]
    acc = retrieval_accuracy(LOGITS, ks=(1, 2))
    assert acc["g2t_top1"] == pytest.approx(2 / 3)
    assert acc["t2g_top1"] == pytest.approx(1 / 3)
    assert acc["top1"] == pytest.approx(0.5)
    assert acc["g2t_top2"] == 1.0 and acc["t2g_top2"] == 1.0


def test_collapsed_model_scores_zero_not_one():
    acc = retrieval_accuracy(torch.zeros(8, 8), ks=(1, 5))
    assert acc["top1"] == 0.0 and acc["top5"] == 0.0
    acc = retrieval_accuracy(torch.eye(8) * 5, ks=(1, 5))
    assert acc["top1"] == 1.0


def test_top5_against_topk():
    torch.manual_seed(0)
    logits = torch.randn(32, 32)
    acc = retrieval_accuracy(logits, ks=(1, 5))
    target = torch.arange(32)
    want = (logits.topk(5, dim=1).indices == target[:, None]).any(dim=1).float().mean().item()
    assert acc["g2t_top5"] == pytest.approx(want)
    want_t = (logits.t().topk(5, dim=1).indices == target[:, None]).any(dim=1).float().mean().item()
    assert acc["t2g_top5"] == pytest.approx(want_t)


def test_logit_scale():
    s = LogitScale(0.07)
    assert s().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert s.temperature == pytest.approx(0.07, rel=1e-5)
    assert s().ndim == 0 and s.log_scale.shape == (1,)
    with torch.no_grad():
        s.log_scale.fill_(10.0)  # exp(10) > 100: clamped as CLIP does
    assert s().item() == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        s.log_scale.fill_(-3.0)  # below scale 1: clamped
    assert s().item() == pytest.approx(1.0)
    fixed = LogitScale(0.1, learnable=False)
    assert not any(True for _ in fixed.parameters()) and fixed().item() == pytest.approx(10.0, rel=1e-5)
    # The temperature learns: a gradient flows into log_scale.
    s = LogitScale(0.07)
    info_nce(contrastive_logits(torch.eye(3), torch.eye(3), s()))[0].backward()
    assert s.log_scale.grad is not None and s.log_scale.grad.item() != 0.0


def test_projection_head():
    torch.manual_seed(0)
    head = ProjectionHead(12, 4)
    out = head(torch.randn(5, 12))
    assert out.shape == (5, 4)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-6)
    assert isinstance(ProjectionHead(12, 4, num_layers=1).net, torch.nn.Linear)
    assert ProjectionHead(12, 4, hidden=7).net[0].out_features == 7


def test_rows_with_the_same_text_are_positives_never_negatives():
    """Two molecules with one description (isomers): their texts are each other's right answers."""
    import torch

    from lardo_ray.models.contrastive import info_nce, match_ranks, retrieval_accuracy

    torch.manual_seed(0)
    logits = torch.randn(4, 4)
    keys = torch.tensor([7, 7, 1, 2])  # rows 0 and 1 share a text
    plain, _, _ = info_nce(logits)
    multi, g2t, _ = info_nce(logits, keys)
    # by hand: -log(sum over positives / sum over all), rows and columns
    pos = keys[:, None] == keys[None, :]
    by_hand = lambda lg, p: (torch.logsumexp(lg, 1) - torch.logsumexp(lg.masked_fill(~p, -1e30), 1)).mean()  # noqa: E731
    assert torch.allclose(g2t, by_hand(logits, pos)) and torch.allclose(multi, (by_hand(logits, pos) + by_hand(logits.t(), pos)) / 2)
    # raising the twin's logit lowers the multi-positive loss; plain InfoNCE would push the twins apart
    bumped = logits.clone()
    bumped[0, 1] += 2.0
    assert info_nce(bumped, keys)[0] < multi and info_nce(bumped)[0] > plain
    # distinct keys = plain InfoNCE
    assert torch.allclose(info_nce(logits, torch.tensor([1, 2, 3, 4]))[0], plain)
    # identical texts give identical logits: the tie with the twin does not count against the query
    tied = torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    g2t_plain, _ = match_ranks(tied)
    g2t_keys, _ = match_ranks(tied, torch.tensor([3, 3, 4]))
    assert g2t_plain.tolist() == [1, 1, 0] and g2t_keys.tolist() == [0, 0, 0]
    assert retrieval_accuracy(tied, ks=(1,), keys=torch.tensor([3, 3, 4]))["top1"] == 1.0


def test_collate_gives_equal_keys_to_equal_descriptions():
    import numpy as np
    import pyarrow as pa

    from lardo_ray import schema
    from lardo_ray.chem.graph import GraphFeaturizer
    from lardo_ray.models.text import embeddings_to_arrow
    from lardo_ray.train.loop import collate

    smiles = ["CCO", "OCC", "c1ccccc1", "CC(=O)O"]
    emb = np.array([[1, 0], [1, 0], [0, 1], [0.5, 0.5]], np.float32)  # rows 0, 1: one description
    table = pa.table({schema.MOL_ID: ["a", "b", "c", "d"], schema.CANONICAL_SMILES: smiles,
                      schema.TEXT_EMBEDDING: embeddings_to_arrow(emb)})
    graphs, _ = GraphFeaturizer()(table)
    inputs = collate(graphs, "embedding")
    k = inputs.text_keys.tolist()
    assert k[0] == k[1] and len(set(k)) == 3
