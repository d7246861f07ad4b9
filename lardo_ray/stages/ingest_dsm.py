"""Stage ingest+dsm: read, standardise, give each molecule a mol_id, compute DSM (RDKit) descriptors.

``IngestDsm`` is the core (a table in, molecules and rejected rows out; no Ray); the registry's "dsm"
entry and the shared lifecycle do the rest (plan input chunks, skip finished ones, run on Ray, reconcile,
log), and this module adds the one step only dsm has: dropping duplicates across chunks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lardo_ray import schema
from lardo_ray.chem.descriptors import DescriptorCalculator
from lardo_ray.chem.standardise import DUPLICATE, Standardiser
from lardo_ray.config import IngestConfig, PipelineConfig
from lardo_ray.io import StageOutput
from lardo_ray.stages.lifecycle import SlicedCore, StageSummary, rejected_table, run_stage

if TYPE_CHECKING:
    from lardo_ray.tracking import Tracker

log = logging.getLogger("lardo_ray")
STAGE = "dsm"


class IngestDsm:
    """Standardise and describe a batch of input rows. Built once per worker."""

    def __init__(self, ingest: IngestConfig, descriptors: list[str] | str = "all"):
        self.standardiser = Standardiser(ingest.max_atoms, ingest.keep_largest_fragment, ingest.neutralize)
        self.calculator = DescriptorCalculator(descriptors)

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> SlicedCore:
        return SlicedCore(cls(cfg.ingest, cfg.dsm.descriptors), cfg.dsm.batch_rows)

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        raw = table.column(schema.INPUT_SMILES).to_pylist()
        values = np.full((len(raw), len(self.calculator.names)), np.nan, dtype=np.float64)
        ok_idx: list[int] = []
        canon: list[str | None] = []
        ids: list[str | None] = []
        errors: list[str | None] = []
        rej_idx: list[int] = []
        reasons: list[str] = []
        details: list[str | None] = []
        for i, smi in enumerate(raw):
            s = self.standardiser(smi)
            if s.reason is None:
                assert s.mol is not None  # no reject reason: the standardiser returned a molecule
                # Describe each molecule right after parsing it: RDKit's per-molecule caches stay hot,
                # which measured ~25% faster than parsing a whole batch first.
                errors.append(self.calculator.compute_into(s.mol, values[len(ok_idx)]))
                ok_idx.append(i)
                canon.append(s.canonical)
                ids.append(s.mol_id)
            else:
                rej_idx.append(i)
                reasons.append(s.reason)
                details.append(s.detail)
        values = values[: len(ok_idx)]
        carried = [c for c in table.column_names if c != schema.INPUT_SMILES]
        ok_take = pa.array(ok_idx, pa.int64())
        out_cols: dict[str, Any] = {
            schema.MOL_ID: pa.array(ids, pa.string()),
            schema.INPUT_SMILES: table.column(schema.INPUT_SMILES).take(ok_take),
            schema.CANONICAL_SMILES: pa.array(canon, pa.string()),
        }
        for c in carried:
            out_cols[c] = table.column(c).take(ok_take)
        for j, name in enumerate(self.calculator.names):
            out_cols[name] = pa.array(values[:, j], pa.float64())
        out_cols[schema.DSM_ERROR] = pa.array(errors, pa.string())
        rej_take = pa.array(rej_idx, pa.int64())
        rejected = rejected_table(
            {
                schema.INPUT_SMILES: [raw[i] if isinstance(raw[i], str) else None for i in rej_idx],
                schema.SOURCE_ROW: table.column(schema.SOURCE_ROW).take(rej_take).to_pylist(),
                schema.REJECT_REASON: reasons,
                schema.REJECT_DETAIL: details,
            },
            STAGE,
        )
        return pa.table(out_cols), rejected


# ---------------------------------------------------------------- duplicates across chunks


def _ids_to_u64(ids: pa.ChunkedArray) -> np.ndarray:
    hexes = ids.to_pylist()
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").astype(np.uint64) if hexes else np.empty(0, np.uint64)


def drop_duplicates(out: StageOutput, chunk_ids: list[str]) -> int:
    """Keep the first occurrence of each mol_id in input order; move the others to rejected/.

    Only the 8-byte ids are held (13 MB per 1.6 M molecules); shards without duplicates are not touched.
    Idempotent: a re-run after a kill finds the already-moved rows gone and rewrites nothing twice.
    """
    arrays = [_ids_to_u64(pq.read_table(out.data_path(c), columns=[schema.MOL_ID], filesystem=out.fs).column(0))
              for c in chunk_ids]
    if not arrays:
        return 0
    all_ids = np.concatenate(arrays)
    owner = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])
    _, first = np.unique(all_ids, return_index=True)
    dup_mask = np.ones(len(all_ids), bool)
    dup_mask[first] = False
    moved = 0
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])])
    for k in np.unique(owner[dup_mask]):
        c = chunk_ids[k]
        local = dup_mask[offsets[k] : offsets[k + 1]]
        data = pq.read_table(out.data_path(c), filesystem=out.fs)
        dups = data.filter(pa.array(local))
        rej = rejected_table(
            {
                schema.INPUT_SMILES: dups.column(schema.INPUT_SMILES).to_pylist(),
                schema.SOURCE_ROW: dups.column(schema.SOURCE_ROW).to_pylist(),
                schema.REJECT_REASON: [DUPLICATE] * dups.num_rows,
                schema.REJECT_DETAIL: [f"mol_id {m}" for m in dups.column(schema.MOL_ID).to_pylist()],
            },
            STAGE,
        )
        old = pq.read_table(out.rejected_path(c), filesystem=out.fs)
        # Rejected first, then data: a kill in between leaves the rows in data, and the re-run moves them again.
        out.write_table_atomic(out.rejected_path(c), pa.concat_tables([old.filter(
            pa.compute.not_equal(old.column(schema.REJECT_REASON), DUPLICATE)), rej]))
        out.write_table_atomic(out.data_path(c), data.filter(pa.array(~local)))
        moved += dups.num_rows
    return moved


# ---------------------------------------------------------------- the stage's hooks (registry: "dsm")


def after_chunks(cfg: PipelineConfig, out: StageOutput, chunk_ids: list[str]) -> None:
    if cfg.ingest.dedupe == "drop":
        drop_duplicates(out, chunk_ids)


def manifest_extra(cfg: PipelineConfig, context: dict[str, Any], summary: StageSummary) -> dict[str, Any]:
    return {"descriptors": DescriptorCalculator(cfg.dsm.descriptors).names}


def run_dsm(cfg: PipelineConfig, tracker: Tracker | None = None) -> StageSummary:
    """The whole stage (lardo_ray.stages.lifecycle.run_stage). Raises ConfigError/InputError before any work
    when the setup is wrong."""
    return run_stage("dsm", cfg, tracker)


__all__ = ["IngestDsm", "run_dsm", "drop_duplicates", "StageSummary"]
