"""Task cards: what stage 1 tells the LLM about a dataset, and the fallback knowledge when it cannot.

A card is a small YAML file (``lardo_ray/data/cards/<name>.yaml``, or any user path) with the dataset's name,
description, task type and endpoint, plus ``default_properties``: DSM descriptors known to relate to the
endpoint. Those are used by the rules backend, the ``no_stage1`` variant, and as the fallback template when
the LLM's stage-1 answer gives nothing usable.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from lardo_ray.config_base import ConfigError, Section

Direction = Literal["higher", "lower", "range", "unclear"]
TaskType = Literal["classification", "regression", "unlabelled"]


class PropertyHint(Section):
    """One DSM descriptor with what is known about it for the endpoint."""

    descriptor: str = Field(description="registry name, e.g. MolLogP, TPSA")
    direction: Direction = Field(
        default="unclear", description="which values favour the endpoint (positive label / larger target)"
    )
    threshold: str | None = Field(default=None, description="e.g. '< 90', '1 to 3', '<= 3' (free text)")
    rationale: str | None = Field(default=None, description="one sentence: why it matters for the endpoint")


class BenchmarkFacts(Section):
    """The benchmark file a card describes (fine-tuning reads these; stage 1 does not need them)."""

    order: int = Field(default=99, description="position in tables")
    metric: str = Field(description="headline metric: roc_auc | rmse")
    file_names: list[str] = Field(description="usual file names, first = the one the card is written for")
    n_molecules: int | None = Field(default=None, description="rows of the usual file")
    n_tasks: int | None = Field(default=None, description="targets when label_columns is empty (every column a task)")
    units: str = ""
    smiles_column: str = "smiles"
    summary: str = Field(default="", description="one line for tables and --help")


class TaskCard(Section):
    name: str = Field(description="display name, e.g. BBBP")
    key: str = Field(description="lower-case lookup key, e.g. bbbp")
    aliases: list[str] = Field(default_factory=list, description="other lookup names (lower case)")
    task_type: TaskType = Field(description="classification, regression or unlabelled")
    description: str = Field(min_length=10, description="what the dataset is (for the stage-1 prompt)")
    endpoint: str = Field(min_length=3, description="what is predicted: the target of the task")
    label_columns: list[str] = Field(default_factory=list, description="label columns of the benchmark file; empty "
                                     "= every column except the SMILES column")
    benchmark: BenchmarkFacts | None = Field(default=None, description="the benchmark file, for fine-tuning")
    default_properties: list[PropertyHint] = Field(
        default_factory=list, description="fallback template / rules-backend knowledge"
    )

    @field_validator("key")
    @classmethod
    def _lower(cls, v: str) -> str:
        if v != v.lower() or not v.strip():
            raise ValueError("key must be a non-empty lower-case name")
        return v

    def content_hash(self) -> str:
        """Hash of everything stage 1 sees: a changed card invalidates cached templates."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def validate_descriptors(self) -> "TaskCard":
        """Check ``default_properties`` against the DSM registry (imports RDKit). Raises ConfigError."""
        from lardo_ray.chem.descriptors import registry

        reg = registry()
        bad = [p.descriptor for p in self.default_properties if p.descriptor not in reg]
        if bad:
            raise ConfigError(f"task card {self.key!r}: unknown descriptors in default_properties: {bad}")
        return self


def _cards_dir():
    return resources.files("lardo_ray") / "data" / "cards"


@lru_cache(maxsize=1)
def _builtin_index() -> dict[str, str]:
    """lookup name (key or alias) -> file name of the built-in cards."""
    index: dict[str, str] = {}
    for entry in _cards_dir().iterdir():
        if not entry.name.endswith((".yaml", ".yml")):
            continue
        data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        for name in [data.get("key", ""), *data.get("aliases", [])]:
            if name:
                index[str(name).lower()] = entry.name
    return index


def list_cards() -> list[str]:
    """Keys of the built-in cards."""
    keys = []
    for entry in _cards_dir().iterdir():
        if entry.name.endswith((".yaml", ".yml")):
            keys.append(str((yaml.safe_load(entry.read_text(encoding="utf-8")) or {}).get("key", "")))
    return sorted(k for k in keys if k)


def _parse(text: str, origin: str) -> TaskCard:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"task card {origin}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"task card {origin}: must be a mapping")
    data.setdefault("key", str(data.get("name", "")).lower().replace(" ", "_"))
    try:
        return TaskCard.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid task card {origin}:\n  " + "\n  ".join(lines)) from None


def load_card(name_or_path: str | Path, check_descriptors: bool = True) -> TaskCard:
    """A built-in card by name/alias (case-insensitive), or a user's YAML file by path. Raises ConfigError."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"task card file not found: {path}")
        card = _parse(path.read_text(encoding="utf-8"), str(path))
    else:
        fname = _builtin_index().get(text.lower())
        if fname is None:
            raise ConfigError(
                f"unknown task card {text!r}; built-in: {sorted(set(_builtin_index()))} or give a YAML path"
            )
        card = _parse((_cards_dir() / fname).read_text(encoding="utf-8"), fname)
    return card.validate_descriptors() if check_descriptors else card
