"""Stage featurize: canonical SMILES -> OGB graph columns. Its output is the pre-training table.

Reads the previous stage's shards one to one (``embed`` when the text encoder is frozen, else
``describe``; ``dsm`` when asked), carries forward only what training needs, and adds x, edge_index,
edge_attr, num_nodes, num_edges (layout: lardo_ray.chem.graph).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from lardo_ray import schema
from lardo_ray.config_base import RayResources, Section

if TYPE_CHECKING:
    import pyarrow as pa

    from lardo_ray.config import PipelineConfig
    from lardo_ray.stages.lifecycle import StageSummary
    from lardo_ray.tracking import Tracker

STAGE = "featurize"


# The stage's config section (PipelineConfig.featurize): defined here, beside its stage, and kept cheap to import
# (config.py imports it for --help): pyarrow, the lifecycle and the models are imported where they run.
class FeaturizeConfig(Section):
    """SMILES -> OGB graph columns (lardo_ray.chem.graph.GraphFeaturizer)."""

    upstream: Literal["auto", "embed", "describe", "dsm"] = Field(
        default="auto",
        description="stage whose shards are featurized; auto = embed when model.freeze_text, else describe",
    )
    batch_rows: int = Field(default=2_000, ge=1, description="rows per featurizer call inside a unit of work")
    dsm_targets: bool = Field(
        default=False, description="carry the dsm stage's descriptors of each row (its shard of the same chunk, "
        "joined on mol_id) as one float32 vector, dsm_targets, for pre-training's descriptor loss "
        "(pretrain.descriptor_weight)",
    )
    ray: RayResources = Field(
        default_factory=lambda: RayResources(num_cpus=1.0), description="actor pool of the featurize stage"
    )


def featurize_upstream(cfg: PipelineConfig) -> str:
    if cfg.featurize.upstream != "auto":
        return cfg.featurize.upstream
    return "embed" if cfg.model.freeze_text else "describe"


class FeaturizeCore:
    """GraphFeaturizer with rejected rows in the pipeline's shape (input_smiles, reason, detail, stage)."""

    def __init__(self, cfg: PipelineConfig):
        from lardo_ray.chem.graph import GraphFeaturizer

        self.featurizer = GraphFeaturizer()
        self.batch_rows = cfg.featurize.batch_rows

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        import pyarrow as pa

        outs, rejs = [], []
        for start in range(0, max(table.num_rows, 1), self.batch_rows):
            g, r = self.featurizer(table.slice(start, self.batch_rows))
            outs.append(g)
            rejs.append(r)
        rej = pa.concat_tables(rejs)
        rej = pa.table({
            schema.MOL_ID: rej.column(schema.MOL_ID),
            schema.INPUT_SMILES: rej.column(schema.CANONICAL_SMILES),
            schema.REJECT_REASON: rej.column(schema.REJECT_REASON),
            schema.REJECT_DETAIL: rej.column(schema.REJECT_DETAIL),
            schema.STAGE: pa.array([STAGE] * rej.num_rows, pa.string()),
        })
        return pa.concat_tables(outs), rej


def descriptor_columns(cfg: PipelineConfig, names: list[str]) -> list[str]:
    """The dsm shard's descriptor columns, in the registry's order: never ids, notes or the user's kept
    columns (a label among the targets would leak it into pre-training)."""
    from lardo_ray.chem.descriptors import resolve_descriptor_names

    present = set(names)
    return [n for n in resolve_descriptor_names(cfg.dsm.descriptors) if n in present]


def check(cfg: PipelineConfig) -> None:
    """Before any work: the descriptors must come from a finished dsm stage."""
    if not cfg.featurize.dsm_targets:
        return
    from lardo_ray.config import ConfigError
    from lardo_ray.io import StageOutput

    dsm = StageOutput(cfg.stage_dir("dsm"))
    manifest = dsm.read_manifest()
    if not manifest or manifest.get("status") != "complete":
        raise ConfigError(f"featurize.dsm_targets reads the dsm stage's shards, but {dsm.uri} is not a finished "
                          "dsm output (run dsm first, or point run.stage_dirs.dsm at one)")


def with_dsm_targets(cfg: PipelineConfig, table: pa.Table, unit: dict[str, Any]) -> pa.Table:
    """The stage's ``enrich`` hook. With featurize.dsm_targets: ``table`` plus a ``dsm_targets`` column, the
    row's descriptors from the dsm shard of the same chunk (the stages' shards are one to one; float32, NaN
    where RDKit gave none). A row the dsm shard lacks is an error, not a silent NaN row."""
    if not cfg.featurize.dsm_targets:
        return table
    chunk_id = unit["chunk_id"]
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lardo_ray.config import ConfigError
    from lardo_ray.io import StageOutput

    dsm = StageOutput(cfg.stage_dir("dsm"))
    path = dsm.data_path(chunk_id)
    names = descriptor_columns(cfg, pq.read_schema(path, filesystem=dsm.fs).names)
    if not names:
        raise ConfigError(f"featurize.dsm_targets: {path} has no descriptor columns")
    d = pq.read_table(path, columns=[schema.MOL_ID, *names], filesystem=dsm.fs)
    index = {m: i for i, m in enumerate(d.column(schema.MOL_ID).to_pylist())}
    found = [index.get(m) for m in table.column(schema.MOL_ID).to_pylist()]
    rows = [r for r in found if r is not None]
    if len(rows) != len(found):
        missing = len(found) - len(rows)
        raise RuntimeError(f"featurize.dsm_targets: {missing} row(s) of chunk {chunk_id} are not in {path}")
    X = np.column_stack([d.column(n).to_numpy(zero_copy_only=False).astype(np.float32) for n in names])[rows]
    X[~np.isfinite(X)] = np.nan
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), len(names))
    return table.append_column(schema.DSM_TARGETS, vectors.cast(pa.list_(pa.float32())))


def run_featurize(cfg: PipelineConfig, tracker: Tracker | None = None) -> StageSummary:
    from lardo_ray.stages.lifecycle import run_stage

    return run_stage("featurize", cfg, tracker)
