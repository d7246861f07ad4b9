"""Stage embed: each description's embedding from the frozen text encoder, computed once.

The paper's text side is a frozen sentence encoder followed by an MLP: running that encoder at every
training step would waste most of the step, so this stage computes it once per description (identical
descriptions in a shard share one forward pass, keyed by their hash) and training streams the vectors.
"""

from __future__ import annotations

import hashlib
import logging

import pyarrow as pa

from lardo_ray import schema
from lardo_ray.config import PipelineConfig
from lardo_ray.stages.common import ShardWorker, StageSummary, run_derived_stage

STAGE = "embed"
CARRIED = [schema.MOL_ID, schema.CANONICAL_SMILES, schema.DESCRIPTION, schema.TEMPLATE_ID]
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


class EmbedWorker(ShardWorker):
    stage = STAGE

    def build_core(self, cfg: PipelineConfig):
        return EmbedCore(cfg)

    def columns(self) -> list[str]:
        return [schema.MOL_ID, schema.CANONICAL_SMILES, schema.DESCRIPTION, schema.TEMPLATE_ID]


def run_embed(cfg: PipelineConfig, tracker=None) -> StageSummary:
    return run_derived_stage(cfg, STAGE, "describe", EmbedWorker, cfg.embed.ray,
                             sections=("embed", "model"), tracker=tracker)
