"""Building blocks of the config: every section forbids unknown keys; Ray knobs live in one model.

Stage packages define their own sections from these (light imports only), and ``lardo_ray.config``
assembles them into the one ``PipelineConfig``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """A config that cannot run: raised before any work, naming the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayResources(Section):
    """Where and how wide a stage runs on Ray. The only place a stage's Ray knobs live."""

    concurrency: int | None = Field(
        default=None, ge=1, description="actor-pool size; None = number of CPUs in the cluster"
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per actor")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved per actor")
    accelerator_type: str | None = Field(default=None, description="e.g. 'H100' (Ray accelerator type)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources / node labels, e.g. {'cpu_node': 0.01}"
    )
