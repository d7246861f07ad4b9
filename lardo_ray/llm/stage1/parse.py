"""Tolerant parsing of the stage-1 answer: JSON (fenced, trailing commas, unquoted keys), bullet lists, prose."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable
from typing import Any


from lardo_ray.llm.cards import Direction
from lardo_ray.llm.stage1.calibrate import _find_synonyms, _norm
from lardo_ray.llm.stage1.template import PropertyClaim

_NAME_KEYS = ("property", "name", "property_name", "descriptor", "feature", "title", "prop")
_DIR_KEYS = ("direction", "effect", "trend", "relationship", "relation", "impact", "sign", "correlation")
_THR_KEYS = ("threshold", "cutoff", "cut_off", "range", "optimal_range", "limit", "value", "ideal")
_WHY_KEYS = ("rationale", "reason", "explanation", "why", "justification", "relevance", "description", "note")
_LIST_KEYS = ("properties", "molecular_properties", "items", "answer", "result", "results", "data")

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_UNQUOTED_KEY = re.compile(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_ ]*?)\s*:")
_COMMENT = re.compile(r"(?m)^\s*//.*$|/\*.*?\*/", re.S)


def _norm_direction(value: Any, context: str = "") -> Direction:
    text = f"{value or ''}".lower()
    if any(w in text for w in ("range", "moderate", "optimal", "intermediate", "between", "balanced")):
        return "range"
    if re.search(r"\b(higher|high|increas\w*|positive(ly)?|more|greater|larger|up)\b", text):
        return "higher"
    if re.search(r"\b(lower|low|decreas\w*|negative(ly)?|less|fewer|smaller|down|reduc\w*)\b", text):
        return "lower"
    if text.strip() in ("+", ">", "↑"):
        return "higher"
    if text.strip() in ("-", "<", "↓"):
        return "lower"
    if context and not text.strip():
        thr = _extract_threshold(context)
        if thr:
            if re.match(r"\s*(<|≤|<=|below|under|less)", thr):
                return "lower"
            if re.match(r"\s*(>|≥|>=|above|over|more|greater)", thr):
                return "higher"
            return "range"
    return "unclear"


_THRESHOLD = re.compile(
    r"(?:(?:<=|>=|≤|≥|<|>|below|under|above|over|less than|more than|greater than|at most|at least|up to)"
    r"\s*-?\d+(?:\.\d+)?(?:\s*(?:g/mol|Da|Å²|Å2|A\^?2))?"
    r"|(?:between\s+)?-?\d+(?:\.\d+)?\s*(?:to|and|-|–)\s*-?\d+(?:\.\d+)?(?:\s*(?:g/mol|Da|Å²))?)",
    re.I,
)


def _extract_threshold(text: str) -> str | None:
    m = _THRESHOLD.search(text or "")
    return m.group(0).strip() if m else None


def _as_text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        v = " to ".join(str(x) for x in v) if len(v) == 2 and all(isinstance(x, (int, float)) for x in v) else "; ".join(
            str(x) for x in v
        )
    text = str(v).strip()
    return text or None


def _clean_name(name: str) -> str:
    name = re.sub(r"[*_`#]+", "", name).strip()
    name = re.sub(r"^\[(.*)\]$", r"\1", name).strip()
    return name.strip(" :.-–—\t\"'")


def _claim_from_item(item: Any) -> PropertyClaim | None:
    if isinstance(item, str):
        return _claim_from_line(item)
    if not isinstance(item, dict):
        return None
    low = {str(k).lower().strip().replace(" ", "_"): v for k, v in item.items()}

    def pick(keys: Iterable[str]) -> Any:
        for k in keys:
            if k in low and low[k] not in (None, ""):
                return low[k]
        return None

    name = pick(_NAME_KEYS)
    if name is None and len(low) == 1:  # {"logP": "higher is better"}
        (name, value), = low.items()
        return _claim_from_item({"property": name, "rationale": value})
    if not isinstance(name, str) or not _clean_name(name) or len(name) > 160:
        return None
    threshold = _as_text(pick(_THR_KEYS))
    rationale = _as_text(pick(_WHY_KEYS))
    return PropertyClaim(
        property=_clean_name(name),
        direction=_norm_direction(pick(_DIR_KEYS), context=threshold or ""),
        threshold=threshold,
        rationale=rationale,
    )


def _items_from_obj(obj: Any) -> list:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        low = {str(k).lower(): v for k, v in obj.items()}
        for k in _LIST_KEYS:
            if isinstance(low.get(k), list):
                return low[k]
        if any(k in low for k in _NAME_KEYS):
            return [obj]
        # {"logP": {...} or "text", "TPSA": ...}: keys are property names
        out = []
        for k, v in obj.items():
            if isinstance(v, dict):
                out.append({"property": k, **v})
            elif isinstance(v, (str, int, float)) or v is None:
                out.append({"property": k, "rationale": None if v is None else str(v)})
        return out
    return []


def _balanced_spans(text: str) -> list[tuple[int, int]]:
    """Top-level [...] / {...} spans, honouring quoted strings; an unclosed span runs to the end."""
    spans, i, n = [], 0, len(text)
    while i < n:
        if text[i] in "[{":
            stack, j, quote = [], i, None
            while j < n:
                c = text[j]
                if quote:
                    if c == "\\":
                        j += 1
                    elif c == quote:
                        quote = None
                elif c in "\"'" and (quote is None) and (text[j - 1] in "[{,: \n\t" if j else True):
                    quote = c
                elif c in "[{":
                    stack.append(c)
                elif c in "]}":
                    if stack:
                        stack.pop()
                    if not stack:
                        break
                j += 1
            spans.append((i, min(j + 1, n)))
            i = j + 1
        else:
            i += 1
    return spans


def _loads(text: str) -> Any:
    """json, then repaired json, then Python literal syntax (single quotes, None/True)."""
    text = text.strip()
    smart = text.translate(str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'"}))
    smart = _COMMENT.sub("", smart)
    candidates = [text, _TRAILING_COMMA.sub(r"\1", smart)]
    candidates.append(_TRAILING_COMMA.sub(r"\1", _UNQUOTED_KEY.sub(r'\1"\2":', smart)))
    for c in candidates:
        try:
            return json.loads(c)
        except (ValueError, RecursionError):
            pass
    py = re.sub(r"\bnull\b", "None", re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", smart)))
    try:
        return ast.literal_eval(py)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def _json_claims(text: str) -> list[PropertyClaim]:
    sources = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for src in sources:
        for start, end in _balanced_spans(src):
            obj = _loads(src[start:end])
            if obj is None:
                continue
            claims = [c for c in (_claim_from_item(it) for it in _items_from_obj(obj)) if c]
            if claims:
                return claims
        # A truncated list (answer cut at max_tokens): recover the complete objects inside it.
        objs = []
        for m in re.finditer(r"\{[^{}]*\}", src):
            obj = _loads(m.group(0))
            if isinstance(obj, dict):
                objs.append(obj)
        claims = [c for c in (_claim_from_item(o) for o in objs) if c]
        if claims:
            return claims
    return []


_BULLET = re.compile(r"^\s*(?:[-*•+▪◦]|\d{1,2}\s*[.)]|\(\d{1,2}\)|[a-hA-H][.)])\s+(.+)$")
_BRACKET = re.compile(r"^\s*\[([^\]]{2,80})\]\s*:?\s*(.*)$")
_SPLIT = re.compile(r"\s*(?::|\s[-–—]\s)\s*")


def _claim_from_line(content: str) -> PropertyClaim | None:
    content = content.strip()
    if not content:
        return None
    m = _BRACKET.match(content)
    if m:
        name, rest = m.group(1), m.group(2)
    else:
        plain = re.sub(r"[*_`]+", "", content)
        parts = _SPLIT.split(plain, maxsplit=1)
        if len(parts) == 2 and 0 < len(parts[0].split()) <= 10:
            name, rest = parts
        else:
            # "Lipophilicity (logP) affects ..." : the name is the leading noun phrase
            m2 = re.match(r"^(.{2,80}?)(?:\s+(?:is|are|affects?|influences?|determines?|can|may|plays?|has|have)\b|[,;.]|$)", plain)
            name, rest = (m2.group(1), plain[m2.end():]) if m2 else (plain[:60], plain[60:])
    name = _clean_name(name)
    if not name or len(name.split()) > 12 or not re.search(r"[A-Za-z]{2}", name):
        return None
    rest = (rest or "").strip() or None
    threshold = _extract_threshold(rest or "")
    direction = _norm_direction("", context=rest or "")
    if direction == "unclear" and rest:  # "higher logP increases ..." - only the first clause is trusted
        direction = _norm_direction(re.split(r"[,;.]", rest, maxsplit=1)[0][:50])
    return PropertyClaim(property=name, direction=direction, threshold=threshold, rationale=rest)


def _line_claims(text: str) -> list[PropertyClaim]:
    claims: list[PropertyClaim] = []
    for line in text.splitlines():
        semi = re.match(r"^\s*<?PROPERTIES>?\s*:\s*(.+)$", line, re.I)
        if semi:  # the paper's "<PROPERTIES>: a; b; c"
            for part in re.split(r"\s*;\s*", semi.group(1)):
                c = _claim_from_line(part)
                if c:
                    claims.append(c)
            continue
        m = _BULLET.match(line) or _BRACKET.match(line)
        if m:
            c = _claim_from_line(m.group(1) if m.re is _BULLET else line)
            if c:
                claims.append(c)
    return claims


def _prose_claims(text: str) -> list[PropertyClaim]:
    """Last resort: known property names mentioned anywhere in prose, in order, with their sentence."""
    claims = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        for _, _, phrase, ds in _find_synonyms(_norm(sentence)):
            if ds:
                claims.append(PropertyClaim(property=phrase, rationale=sentence.strip() or None))
    return claims


def _dedupe(claims: list[PropertyClaim]) -> list[PropertyClaim]:
    seen, out = set(), []
    for c in claims:
        k = _norm(c.property)
        if k and k not in seen:
            seen.add(k)
            out.append(c)
    return out


def parse_stage1_answer(text: str | None) -> list[PropertyClaim]:
    """Claims from an LLM's stage-1 answer, whatever its shape; [] when nothing usable is in it.

    Tries, in order: JSON (inside prose or code fences; trailing commas, single quotes, unquoted keys,
    Python literals, a list truncated at max_tokens), a bullet / numbered / ``[Name]:`` list of free text
    (and the paper's ``<PROPERTIES>: a; b; c``), then known property names mentioned in prose.
    """
    if not text or not text.strip():
        return []
    for finder in (_json_claims, _line_claims, _prose_claims):
        claims = _dedupe(finder(text))
        if claims:
            return claims
    return []


