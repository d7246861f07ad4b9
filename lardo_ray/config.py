"""One config model for the whole pipeline.

YAML file -> ``--set key.sub=value`` overrides -> pydantic validation, before any work starts.
Every model forbids unknown keys, so a typo stops the job with the key's dotted path in the message.
Only pydantic/yaml are imported here: ``lardo-ray --help`` must stay fast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lardo_ray.config_base import ConfigError, RayResources, Section
from lardo_ray.finetune.settings import CompareConfig, FinetuneConfig
from lardo_ray.llm.settings import DescribeConfig
from lardo_ray.stages.predict import ApplyModelConfig
from lardo_ray.stages.registry import STAGES, pipeline_order
from lardo_ray.stages.embed import EmbedConfig
from lardo_ray.stages.featurize import FeaturizeConfig
from lardo_ray.train.settings import ModelConfig, PretrainConfig

__all__ = ["ConfigError", "PipelineConfig", "RayResources", "Section", "load_config", "dump_config"]


# The stage names come from the registry (lardo_ray.stages.registry), the one place they are listed.
PIPELINE_STAGES = pipeline_order()
PipelineStageName = Literal[PIPELINE_STAGES]  # type: ignore[valid-type]
StageName = Literal[tuple(STAGES)]  # type: ignore[valid-type]


class RunConfig(Section):
    name: str = Field(default="lardo", description="run name; outputs go to <output_dir>/<stage>/")
    output_dir: str = Field(default="outputs/lardo", description="local dir or pyarrow URI (s3://, gs://)")
    seed: int = 0
    ray_address: str | None = Field(
        default=None, description="None = connect to RAY_ADDRESS / a running cluster or start a local one"
    )
    ray_num_cpus: int | None = Field(
        default=None, ge=1, description="logical CPUs of a local Ray instance (ignored on a cluster)"
    )
    stage_dirs: dict[StageName, str] = Field(
        default_factory=dict, description="per-stage output dir instead of <output_dir>/<stage> (e.g. one DSM "
        "output shared by several runs)",
    )
    ray_dashboard: bool = Field(
        default=True, description="start Ray's dashboard with a local instance (127.0.0.1:8265 or the next free "
        "port; ~1 GB RAM): job progress in a browser, and Ray Train needs its state API to clean up"
    )
    progress: bool = True
    overwrite: bool = Field(default=False, description="discard a stage's existing output instead of resuming it")
    allow_partial: bool = Field(
        default=False, description="exit 0 when some fine-tune seeds / methods / variants failed but others "
        "finished (the failures are still printed and logged as FAILED); default: any failure exits 1"
    )


class InputConfig(Section):
    path: str | None = Field(default=None, description="file, directory, glob, URI, or hf:NAME / a saved HF dataset")
    format: Literal["auto", "csv", "tsv", "smi", "parquet", "hf"] = "auto"
    smiles_column: str = "smiles"
    id_column: str | None = Field(default=None, description="optional user id column carried to the output")
    keep_columns: list[str] = Field(default_factory=list, description="extra input columns carried forward (labels...)")
    hf_split: str = "train"
    limit: int | None = Field(default=None, ge=1, description="read at most this many rows (smoke runs)")
    chunk_rows: int = Field(
        default=20_000, ge=1, description="rows per unit of work: one output shard, the resume granularity"
    )


class IngestConfig(Section):
    max_atoms: int = Field(default=200, ge=1, description="heavy atoms above this are rejected (too_many_atoms)")
    keep_largest_fragment: bool = True
    neutralize: bool = True
    dedupe: Literal["drop", "keep"] = Field(
        default="drop", description="drop: later copies of a molecule go to rejected/ as 'duplicate'"
    )


class DsmConfig(Section):
    descriptors: list[str] | Literal["all"] = Field(
        default="all", description="'all' or names / groups from `lardo-ray dsm --list-descriptors`"
    )
    batch_rows: int = Field(default=2_000, ge=1, description="rows per calculator call inside a unit of work")
    ray: RayResources = Field(default_factory=lambda: RayResources(num_cpus=1.0))




class PipelineSection(Section):
    stages: list[PipelineStageName] = Field(
        default_factory=lambda: list(PIPELINE_STAGES),
        description="stages `lardo-ray pipeline` runs, in this order (embed is skipped when model.freeze_text=false)",
    )
    scratch_baseline: bool = Field(
        default=True, description="also fine-tune a randomly initialised encoder on the same splits, for compare"
    )
    predict_input: str | None = Field(
        default=None, description="after fine-tuning, score this file of molecules (a 'smiles' column; a 'name' "
        "column is kept) with the model the run registered, into <output_dir>/predict (the demo's last step)")
    method_name: str | None = Field(
        default=None, description="method label of the pre-trained encoder in compare; None = what wrote its text "
        "(describe.text_writer_label: 'rules', 'llm:smollm2', or 'llm:smollm2x8+rules' for an LLM slice), then "
        "'_dsmreg' with pretrain.descriptor_weight > 0 and '+dsm' with finetune.dsm_features (scratch too)")


class AblationConfig(Section):
    """`lardo-ray ablate`: one pre-training per variant, then every encoder (and a random init) fine-tuned on
    the same splits and compared. Variants are --set style overrides of this config."""

    variants: dict[str, list[str]] = Field(
        default_factory=dict,
        description="method label -> overrides of its pre-training, e.g. {rules: [describe.backend=rules], "
        "llm_no_dsm: [describe.variant=no_dsm]}; each pre-trains into <output_dir>/<label>/",
    )
    scratch: bool = Field(default=True, description="add the random-init encoder ('scratch') to the grid")
    finetune_variants: dict[str, list[str]] = Field(
        default_factory=dict,
        description="label suffix -> finetune.* overrides: every GNN method (each variant's encoder and scratch) "
        "is also fine-tuned with them, as '<method><suffix>', e.g. {'+dsm': [finetune.dsm_features=all]}",
    )
    baselines: list[Literal["rf_dsm", "rf_ecfp"]] = Field(
        default_factory=lambda: ["rf_dsm", "rf_ecfp"],
        description="classical baselines in the grid, on the same splits and seeds (lardo_ray.finetune.baselines)",
    )
    chemprop: str | None = Field(
        default=None, description="the `chemprop` executable (e.g. .venv-chemprop/bin/chemprop from `make "
        "chemprop`): adds chemprop's D-MPNN, trained from scratch on the same splits and seeds, as a method",
    )
    chemprop_epochs: int | None = Field(default=None, ge=3, description="chemprop epochs; None = finetune.epochs")
    share_dsm: bool = Field(
        default=True, description="compute the DSM stage once into <output_dir>/dsm for every variant "
        "(variants that change dsm.* or input.* get their own)",
    )

    @field_validator("finetune_variants")
    @classmethod
    def _finetune_only(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for suffix, overrides in v.items():
            if not suffix or any(c.isspace() or c == "/" for c in suffix):
                raise ValueError(f"finetune_variants: suffix {suffix!r} must be non-empty, without spaces or '/'")
            bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("finetune.") or "=" not in o]
            if bad:
                raise ValueError(f"finetune_variants.{suffix}: only finetune.KEY=VALUE overrides, got {bad}")
        return v

    @field_validator("variants")
    @classmethod
    def _labels(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for label in v:
            if label in ("scratch", "chemprop", "rf_dsm", "rf_ecfp") or not label.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"variant label {label!r}: letters, digits, '_' or '-', and not 'scratch' or "
                                 "'chemprop' (the baselines' labels)")
        return v


class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; None = sqlite:///<output_dir>/mlflow.db"
    )
    experiment: str = "lardo_ray"


# section -> {key: default} of keys added after outputs were written with the section: hashing them only when
# set keeps a stage's earlier outputs resumable (a new key at its default changes nothing the stage does).
KEYS_ADDED_LATER: dict[str, dict[str, Any]] = {
    "describe": {"rules_structure": False},
    "featurize": {"dsm_targets": False},
    "pretrain": {"descriptor_weight": 0.0},
}


def without_later_defaults(section: str, dumped: dict[str, Any]) -> dict[str, Any]:
    later = KEYS_ADDED_LATER.get(section, {})
    return {k: v for k, v in dumped.items() if not (k in later and v == later[k])}


class PipelineConfig(Section):
    """The root: one section per stage. Later stages add their sections here."""

    run: RunConfig = Field(default_factory=RunConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    dsm: DsmConfig = Field(default_factory=DsmConfig)
    describe: DescribeConfig = Field(default_factory=DescribeConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    featurize: FeaturizeConfig = Field(default_factory=FeaturizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    predict: ApplyModelConfig = Field(default_factory=ApplyModelConfig)
    encode: ApplyModelConfig = Field(default_factory=ApplyModelConfig)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    ablation: AblationConfig = Field(default_factory=AblationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("dsm")
    @classmethod
    def _known_descriptors(cls, v: DsmConfig) -> DsmConfig:
        # Imported lazily: the registry needs RDKit, which this module should not load for --help.
        from lardo_ray.chem.descriptors import resolve_descriptor_names

        if v.descriptors != "all":
            try:
                resolve_descriptor_names(v.descriptors)
            except KeyError as e:
                raise ValueError(str(e.args[0])) from None
        return v

    @model_validator(mode="after")
    def _descriptor_loss_has_targets(self) -> PipelineConfig:
        if self.pretrain.descriptor_weight > 0 and not self.featurize.dsm_targets:
            raise ValueError("pretrain.descriptor_weight > 0 regresses the dsm descriptors, which the featurize "
                             "table carries only with featurize.dsm_targets: true")
        return self

    def stage_dir(self, stage: str) -> str:
        if stage in self.run.stage_dirs:
            return self.run.stage_dirs[stage].rstrip("/")
        return f"{self.run.output_dir.rstrip('/')}/{stage}"

    def fingerprint(self, *sections: str) -> str:
        """Hash of the named sections: a stage's outputs are only reused under the same settings.

        Keys added after outputs existed are left out while at their default (KEYS_ADDED_LATER), so those
        outputs stay resumable. featurize with dsm_targets also hashes the dsm section it joins."""
        payload = {s: without_later_defaults(s, getattr(self, s).model_dump(mode="json")) for s in sections}
        if "featurize" in sections and self.featurize.dsm_targets:
            payload["dsm_joined"] = self.dsm.model_dump(mode="json")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _parse_scalar(text: str) -> Any:
    # YAML gives "3" -> 3, "true" -> True, "[a, b]" -> list, "null" -> None, like the file would.
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return data


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'")
        else:
            lines.append(f"config key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, top: dict[str, Any] | None = None
) -> PipelineConfig:
    """Load YAML, apply overrides, validate. Raises ConfigError naming the bad key."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        data = loaded
    data = apply_overrides(data, list(overrides or []))
    # Common CLI flags (--input, --output, ...) win over the file and --set.
    for dotted, value in (top or {}).items():
        if value is not None:
            node = data
            parts = dotted.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
