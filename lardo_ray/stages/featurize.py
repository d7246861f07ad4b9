"""Stage featurize: canonical SMILES -> OGB graph columns. Its output is the pre-training table.

Reads the previous stage's shards one to one (``embed`` when the text encoder is frozen, else
``describe``; ``dsm`` when asked), carries forward only what training needs, and adds x, edge_index,
edge_attr, num_nodes, num_edges (layout: lardo_ray.chem.graph).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

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


def run_featurize(cfg: PipelineConfig, tracker: Tracker | None = None) -> StageSummary:
    from lardo_ray.stages.lifecycle import run_stage

    return run_stage("featurize", cfg, tracker)
