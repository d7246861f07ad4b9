"""The stage-1 template: what the LLM named, calibrated to DSM calculators, as versioned JSON."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lardo_ray.llm.cards import Direction

TEMPLATE_FORMAT = "lardo_ray.template"
TEMPLATE_VERSION = 1

Messages = list[dict[str, str]]


class PropertyClaim(BaseModel):
    """One property the LLM named, with what it said about it."""

    model_config = ConfigDict(extra="forbid")
    property: str
    direction: Direction = "unclear"
    threshold: str | None = None
    rationale: str | None = None


class TemplateProperty(BaseModel):
    model_config = ConfigDict(extra="forbid")
    property: str = Field(description="the name as given by the LLM (or the card)")
    descriptors: list[str] = Field(description="DSM calculators it maps to (usually one)")
    direction: Direction = "unclear"
    threshold: str | None = None
    rationale: str | None = None
    match: Literal["exact", "synonym", "fuzzy", "card", "default"] = "synonym"
    position: int = Field(default=0, description="index in the stage-1 answer")


class DroppedClaim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    property: str
    reason: str
    direction: Direction = "unclear"
    threshold: str | None = None
    rationale: str | None = None
    position: int = 0


# Fields that do not change what stage 2 does: kept in the JSON, left out of the hash.
_NOT_HASHED = {"template_id", "model", "raw_answer", "attempts", "created_at", "fallback_reason", "card_hash"}


class Template(BaseModel):
    """The molecular description template of one task. ``template_id`` = hash of its content."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["lardo_ray.template"] = TEMPLATE_FORMAT
    version: int = TEMPLATE_VERSION
    template_id: str = ""
    task: str = Field(description="card key")
    task_name: str
    task_type: str
    description: str
    endpoint: str
    prompt_set: str
    source: Literal["llm", "card_default", "generic"]
    properties: list[TemplateProperty]
    dropped: list[DroppedClaim] = Field(default_factory=list)
    fallback_reason: str | None = None
    model: str | None = None
    raw_answer: str | None = None
    attempts: int = 0
    card_hash: str | None = None
    created_at: float = Field(default_factory=time.time)

    def model_post_init(self, __context: Any) -> None:
        if not self.template_id:
            self.template_id = self.compute_id()

    def content(self) -> dict:
        return self.model_dump(mode="json", exclude=_NOT_HASHED)

    def compute_id(self) -> str:
        payload = json.dumps(self.content(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "tpl-" + hashlib.sha256(payload.encode()).hexdigest()[:16]

    def descriptors(self) -> list[str]:
        out: list[str] = []
        for p in self.properties:
            for d in p.descriptors:
                if d not in out:
                    out.append(d)
        return out

    def property_names(self) -> list[str]:
        """All properties the answer named (mapped and dropped) in answer order (the paper's <PROPERTIES>)."""
        items = [(p.position, p.property) for p in self.properties] + [(d.position, d.property) for d in self.dropped]
        return [name for _, name in sorted(items, key=lambda x: x[0])]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tpl-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: concurrent writers of the same template never leave half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Template":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != TEMPLATE_FORMAT:
            raise ValueError(f"{path}: not a template file (format={data.get('format')!r})")
        if data.get("version") != TEMPLATE_VERSION:
            raise ValueError(f"{path}: template version {data.get('version')} != {TEMPLATE_VERSION}")
        tpl = cls.model_validate(data)
        if tpl.template_id != tpl.compute_id():
            raise ValueError(f"{path}: template_id does not match its content (edited by hand?)")
        return tpl


