"""Stage 1 end to end: ask, parse, calibrate, retry, fall back to the card's defaults, cache."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path


from lardo_ray.llm.cards import TaskCard
from lardo_ray.llm.prompts import PROMPT_VERSION, stage1_messages
from lardo_ray.llm.stage1.calibrate import SYNONYMS, calibrate, default_template, generic_template, map_property
from lardo_ray.llm.stage1.parse import parse_stage1_answer
from lardo_ray.llm.stage1.template import (TEMPLATE_VERSION, DroppedClaim, Messages, PropertyClaim, Template,
                                          TemplateProperty)

def template_cache_path(cache_dir: str | Path, card: TaskCard, model: str | None, prompt_set: str) -> Path:
    key = json.dumps([card.content_hash(), model or "", prompt_set, PROMPT_VERSION, TEMPLATE_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe_model = re.sub(r"[^A-Za-z0-9._-]+", "_", (model or "none"))[-40:]
    return Path(cache_dir) / f"{card.key}__{prompt_set}__{safe_model}__{digest}.json"


def build_template(
    card: TaskCard,
    llm_generate_fn: Callable[[Messages], str] | None,
    prompt_set: str = "lardo",
    max_retries: int = 2,
    model: str | None = None,
    cache_dir: str | Path | None = None,
) -> Template:
    """Run stage 1 for one task: ask, parse, calibrate; retry unusable answers; fall back to card defaults.

    ``llm_generate_fn(messages) -> text`` (None = no LLM: the card's defaults, e.g. for the rules backend).
    Exceptions from it count as failed attempts. A template built from an LLM answer is cached in
    ``cache_dir`` under (card content, model, prompt set, prompt version); fallbacks are not cached, so a
    later run with a working endpoint gets a real template.
    """
    if llm_generate_fn is None:
        return default_template(card, prompt_set, reason="no LLM for stage 1 (rules backend)")
    cache_path = template_cache_path(cache_dir, card, model, prompt_set) if cache_dir else None
    if cache_path is not None and cache_path.exists():
        try:
            return Template.load(cache_path)
        except (ValueError, OSError):
            pass  # a stale or damaged cache entry is rebuilt
    messages = stage1_messages(card, prompt_set)
    problems: list[str] = []
    last_text: str | None = None
    for attempt in range(1, max_retries + 2):
        try:
            text = llm_generate_fn(messages)
        except Exception as e:  # noqa: BLE001 - an endpoint failure is one failed attempt
            problems.append(f"attempt {attempt}: {type(e).__name__}: {str(e)[:120]}")
            continue
        last_text = text
        claims = parse_stage1_answer(text)
        if not claims:
            problems.append(f"attempt {attempt}: no properties could be parsed")
            continue
        tpl = calibrate(claims, card, prompt_set, model=model, source="llm")
        if not tpl.properties:
            problems.append(f"attempt {attempt}: none of {len(claims)} properties maps to a DSM calculator")
            continue
        tpl = tpl.model_copy(update={"raw_answer": text, "attempts": attempt})
        if cache_path is not None:
            tpl.save(cache_path)
        return tpl
    fb = default_template(card, prompt_set, reason="; ".join(problems) or "stage 1 failed")
    # raw_answer / attempts / model are not hashed: the fallback keeps the card default's template_id.
    return fb.model_copy(update={"raw_answer": last_text, "attempts": max_retries + 1, "model": model})


__all__ = [
    "PropertyClaim", "TemplateProperty", "DroppedClaim", "Template", "parse_stage1_answer", "map_property",
    "calibrate", "default_template", "generic_template", "build_template", "template_cache_path", "SYNONYMS",
]
