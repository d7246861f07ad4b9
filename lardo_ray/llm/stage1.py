"""Stage 1: the molecular description template of a task.

The LLM is asked once per task which properties relate to the endpoint (``prompts.stage1_messages``). Its
answer is parsed tolerantly (``parse_stage1_answer``), each property is calibrated to DSM calculators
(``calibrate``: synonym table, registry names, fuzzy matching; unmappable ones are dropped and reported),
and the result is a ``Template``: versioned JSON whose content hash is its ``template_id``.
``build_template`` wraps the whole thing with retries, a card-default fallback and a cache directory.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lardo_ray.llm.cards import Direction, TaskCard
from lardo_ray.llm.prompts import PROMPT_VERSION, stage1_messages

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


# ============================================================================ parsing the stage-1 answer

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


# ================================================================================ calibration (mapping)

# Phrases (after _norm: lower case, singular words, punctuation -> spaces) -> DSM calculators.
SYNONYMS: dict[str, list[str]] = {}


def _syn(descriptors: str | list[str], *phrases: str) -> None:
    ds = [descriptors] if isinstance(descriptors, str) else descriptors
    for p in phrases:
        SYNONYMS[_norm(p)] = ds


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _norm(text: str) -> str:
    t = (text or "").lower()
    t = t.replace("å", "a").replace("²", "2").replace("′", "").replace("'s", "")
    t = re.sub(r"[^a-z0-9]+", " ", t)
    return " ".join(_singular(w) for w in t.split())


_syn("MolLogP", "logP", "log P", "cLogP", "ALogP", "SlogP", "XlogP", "MLogP", "Crippen logP", "MolLogP",
     "lipophilicity", "lipophilic", "hydrophobicity", "hydrophobic character", "hydrophilicity",
     "octanol-water partition coefficient", "octanol/water partition", "partition coefficient",
     "log Kow", "Kow")
_syn("MolWt", "molecular weight", "MW", "MolWt", "molecular mass", "molar mass", "molecular weight (g/mol)",
     "weight", "mass", "g/mol", "dalton", "Da", "size and weight")
_syn("ExactMolWt", "exact mass", "monoisotopic mass", "exact molecular weight")
_syn("HeavyAtomCount", "heavy atoms", "heavy atom count", "number of heavy atoms", "non-hydrogen atoms",
     "molecular size", "size", "atom count", "number of atoms")
_syn("TPSA", "TPSA", "PSA", "polar surface area", "topological polar surface area", "polar surface",
     "polarity", "polar character", "tPSA (Å²)", "Å²")
_syn("LabuteASA", "surface area", "molecular surface area", "accessible surface area", "Labute ASA")
_syn("NumHDonors", "hydrogen bond donors", "H-bond donors", "HBD", "HBDs", "donors", "hydrogen-bond donor count",
     "number of hydrogen bond donors", "NH and OH groups", "NumHDonors", "H donors")
_syn("NumHAcceptors", "hydrogen bond acceptors", "H-bond acceptors", "HBA", "HBAs", "acceptors",
     "number of hydrogen bond acceptors", "NumHAcceptors", "H acceptors")
_syn(["NumHDonors", "NumHAcceptors"], "hydrogen bond donors and acceptors", "H-bond donors and acceptors",
     "hydrogen bond donors/acceptors", "HBD/HBA", "hydrogen bonding", "hydrogen bonds", "hydrogen bond capacity",
     "hydrogen bonding capacity", "H-bonding", "donors and acceptors")
_syn("NumRotatableBonds", "rotatable bonds", "number of rotatable bonds", "rotatable bond count", "RotB",
     "nRot", "flexibility", "molecular flexibility", "conformational flexibility", "rigidity", "NumRotatableBonds")
_syn("NumAromaticRings", "aromatic rings", "number of aromatic rings", "aromatic ring count", "aromaticity",
     "aromatic systems", "aromatic character")
_syn("NumAromaticHeterocycles", "aromatic heterocycles", "heteroaromatic rings")
_syn("NumAliphaticRings", "aliphatic rings")
_syn("NumSaturatedRings", "saturated rings")
_syn("NumHeterocycles", "heterocycles", "heterocyclic rings")
_syn("RingCount", "rings", "ring count", "number of rings", "ring systems", "cyclic structures")
_syn("FractionCSP3", "fraction sp3", "Fsp3", "fraction of sp3 carbons", "fraction of sp3 hybridized carbons",
     "sp3 fraction", "sp3 character", "saturation", "carbon bond saturation", "three-dimensionality",
     "planarity", "FractionCSP3")
_syn("qed", "QED", "drug-likeness", "druglikeness", "drug likeness score", "quantitative estimate of drug-likeness")
_syn("LipinskiViolations", "Lipinski's rule of five", "rule of five", "Ro5", "Lipinski", "Lipinski violations",
     "rule-of-five violations")
_syn("VeberPass", "Veber's rule", "Veber rules", "Veber")
_syn("MolMR", "molar refractivity", "MR", "polarizability", "polarisability", "molecular volume", "MolMR")
_syn("BertzCT", "molecular complexity", "complexity", "structural complexity", "Bertz complexity", "BertzCT")
_syn("MaxAbsPartialCharge", "charge", "partial charge", "partial charges", "charge distribution",
     "electrostatic", "Gasteiger charge")
_syn("NumStereoCenters", "stereocenters", "stereocentres", "chiral centers", "chiral centres", "chirality",
     "stereochemistry", "number of stereocenters")
_syn("NumHeteroatoms", "heteroatoms", "number of heteroatoms", "heteroatom count", "heteroatom content")
_syn("NOCount", "nitrogen and oxygen atoms", "N and O count", "NO count")
_syn("NumValenceElectrons", "valence electrons")
_syn("NumSpiroAtoms", "spiro atoms", "spiro centers")
_syn("NumBridgeheadAtoms", "bridgehead atoms")
_syn("NumAmideBonds", "amide bonds")
_syn("fr_halogen", "halogens", "halogen atoms", "halogenation", "halogen count", "number of halogens")
_syn("fr_COO", "carboxylic acids", "carboxylic acid groups", "carboxylates", "acidic groups", "acidity")
_syn(["fr_NH0", "fr_NH1", "fr_NH2"], "amines", "basic amines", "basic nitrogen", "basic groups", "basicity")
_syn("fr_NH2", "primary amines")
_syn("fr_NH1", "secondary amines")
_syn("fr_NH0", "tertiary amines")
_syn("fr_amide", "amides", "amide groups")
_syn("fr_nitro", "nitro groups", "nitro")
_syn("fr_phenol", "phenols", "phenolic groups", "phenolic hydroxyl")
_syn(["fr_Al_OH", "fr_Ar_OH"], "hydroxyl groups", "hydroxy groups", "OH groups", "alcohols")
_syn("fr_ester", "esters", "ester groups")
_syn("fr_sulfonamd", "sulfonamides")
_syn("fr_ketone", "ketones")
_syn("fr_ether", "ethers", "ether groups")
_syn("fr_benzene", "benzene rings", "phenyl rings")

# Not computable by any DSM: dropped with this reason rather than fuzzy-matched to something wrong.
NOT_COMPUTABLE = {
    _norm(p): p for p in (
        "solubility", "aqueous solubility", "water solubility", "logS", "pKa", "ionization", "ionisation",
        "ionization state", "metabolic stability", "metabolism", "toxicity", "permeability", "bioavailability",
        "protein binding", "plasma protein binding", "half-life", "clearance", "efflux", "P-glycoprotein",
        "P-gp substrate", "binding affinity", "potency", "selectivity", "formal charge", "net charge",
        "melting point", "boiling point", "stability", "reactivity",
        # logD depends on pH and pKa: no DSM here computes it (the post-check blocks it too), so it must not
        # silently become the Crippen logP
        "logD", "log D", "logD7.4", "distribution coefficient",
    )
}

# Phrases that name the OPPOSITE of the descriptor they map to: "hydrophilicity: higher" means a LOWER
# logP, "rigidity: higher" FEWER rotatable bonds, "Lipinski compliance: higher" FEWER violations.
INVERTED = {_norm(p) for p in (
    "hydrophilicity", "hydrophilic", "hydrophilic character", "rigidity", "molecular rigidity",
    "conformational rigidity", "planarity", "flatness", "Lipinski compliance", "rule of five compliance",
    "Ro5 compliance", "compliance with Lipinski's rule of five", "Lipinski's rule of five compliance",
    "drug-likeness compliance",
)}
_syn("MolLogP", "hydrophilic character")
_syn("NumRotatableBonds", "molecular rigidity", "conformational rigidity")
_syn("FractionCSP3", "flatness")
_syn("LipinskiViolations", "Lipinski compliance", "rule of five compliance", "Ro5 compliance",
     "compliance with Lipinski's rule of five", "Lipinski's rule of five compliance")

_OPPOSITE = {"higher": "lower", "lower": "higher"}


def _blockers() -> dict[str, list[str]]:
    return {phrase: [] for phrase in NOT_COMPUTABLE}


def _fragment_synonyms() -> dict[str, list[str]]:
    """'Number of nitriles' -> 'nitrile' for every fr_ calculator (lower priority than SYNONYMS)."""
    from lardo_ray.chem.descriptors import registry

    out: dict[str, list[str]] = {}
    for name, calc in registry().items():
        if not name.startswith("fr_"):
            continue
        doc = ((getattr(calc.fn, "__doc__", None) or "").strip().splitlines() or [""])[0]
        if doc.lower().startswith("number of "):
            phrase = _norm(re.sub(r"\(.*?\)|,.*$|excluding.*$", "", doc[len("number of "):]))
            if phrase and phrase not in SYNONYMS and len(phrase) >= 4:
                out.setdefault(phrase, [name])
    return out


_PHRASE_RE: re.Pattern | None = None
_ALL_PHRASES: dict[str, list[str]] = {}


def _phrases() -> tuple[re.Pattern, dict[str, list[str]]]:
    global _PHRASE_RE, _ALL_PHRASES
    if _PHRASE_RE is None:
        table = dict(_fragment_synonyms())
        table.update(SYNONYMS)  # curated phrases win
        # Non-computable phrases match too (with no descriptor), so "formal charge" is not read as "charge".
        for phrase, ds in _blockers().items():
            table.setdefault(phrase, ds)
        _ALL_PHRASES = table
        alts = sorted(table, key=len, reverse=True)
        _PHRASE_RE = re.compile(r"\b(?:" + "|".join(re.escape(a) for a in alts) + r")\b")
    return _PHRASE_RE, _ALL_PHRASES


def _find_synonyms(normed: str) -> list[tuple[int, int, str, list[str]]]:
    """Leftmost-longest non-overlapping synonym phrases in a normalised text."""
    rx, table = _phrases()
    return [(m.start(), m.end(), m.group(0), table[m.group(0)]) for m in rx.finditer(normed)]


def map_property(name: str) -> tuple[list[str], str, str | None]:
    """(descriptors, match kind, reason if unmapped) for one property name."""
    from lardo_ray.chem.descriptors import registry

    reg = registry()
    raw = name.strip()
    # 1. registry names written as such ("TPSA", "MolLogP", "fr_amide"), possibly inside the text
    lower_reg = {k.lower(): k for k in reg}
    exact: list[str] = []
    for tok in re.findall(r"[A-Za-z_][A-Za-z0-9_]+", raw):
        hit = lower_reg.get(tok.lower())
        if hit and len(tok) > 2 and (tok == hit or (tok != tok.lower() and hit not in ("Ipc", "Phi"))):
            if hit not in exact:
                exact.append(hit)
    if exact:
        return exact, "exact", None
    normed = _norm(raw)
    if not normed:
        return [], "", "empty property name"
    # 2. synonym phrases (all of them, in order, deduplicated); non-computable phrases block
    found: list[str] = []
    blocked: list[str] = []
    for _, _, phrase, ds in _find_synonyms(normed):
        if not ds:
            if not found:  # "pKa of the basic amine" is a pKa, not an amine count; "amines (pKa)" stays amines
                blocked.append(NOT_COMPUTABLE.get(phrase, phrase))
            continue
        for d in ds:
            if d not in found:
                found.append(d)
    if blocked:
        return [], "", f"not computable by a DSM ({blocked[0]})"
    if found:
        return found, "synonym", None
    # 3. fuzzy: typos, over the whole name and its 1-4 word windows
    _, table = _phrases()
    keys = list(table) + [k.lower() for k in reg]
    words = normed.split()
    windows = [normed] + [" ".join(words[i:i + n]) for n in (4, 3, 2, 1) for i in range(len(words) - n + 1)]
    for w in windows:
        if len(w) < 5:
            continue
        close = difflib.get_close_matches(w, keys, n=1, cutoff=0.86)
        if close:
            k = close[0]
            ds = list(table[k]) if k in table else [lower_reg[k]]
            if not ds:
                return [], "", f"not computable by a DSM ({NOT_COMPUTABLE.get(k, k)})"
            return ds, "fuzzy", None
    return [], "", f"no DSM calculator matches {name!r}"


def is_inverted(name: str) -> bool:
    """True when the property names the opposite of the descriptor it maps to (hydrophilicity vs logP)."""
    normed = _norm(name)
    return any(m[2] in INVERTED for m in _find_synonyms(normed)) or normed in INVERTED


_KDA = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?:kDa|kilodaltons?)\b", re.I)
_DA = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?:Da|daltons?)\b", re.I)
_PCT = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?:%|percent\b)", re.I)
_MASS = {"MolWt", "ExactMolWt", "HeavyAtomMolWt"}
_FRACTION = {"FractionCSP3"}


def normalise_threshold(threshold: str, descriptor: str) -> str:
    """A threshold in the descriptor's own units: "< 0.5 kDa" -> "< 500 g/mol" for MolWt, "> 40 %" ->
    "> 0.4" for Fsp3 (the DSM value it is later compared with is in g/mol / a fraction)."""
    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    t = threshold
    if descriptor in _MASS:
        t = _KDA.sub(lambda m: f"{fmt(float(m.group('num')) * 1000)} g/mol", t)
        t = _DA.sub(lambda m: f"{m.group('num')} g/mol", t)
    if descriptor in _FRACTION:
        t = _PCT.sub(lambda m: fmt(float(m.group("num")) / 100.0), t)
    return t


def calibrate(
    claims: list[PropertyClaim],
    card: TaskCard | None = None,
    prompt_set: str = "lardo",
    model: str | None = None,
    source: Literal["llm", "card_default", "generic"] = "llm",
) -> Template:
    """Map each claim to DSM calculators; unmappable ones go to ``dropped`` with the reason.

    A descriptor claimed twice keeps its first claim. The template may have no properties: callers
    (``build_template``) then fall back to the card's defaults.
    """
    props: list[TemplateProperty] = []
    dropped: list[DroppedClaim] = []
    used: set[str] = set()
    for i, c in enumerate(claims):
        ds, kind, reason = map_property(c.property)
        if not ds and c.threshold:  # a unit in the threshold can identify it: "weight: < 500 g/mol"
            unit_ds, unit_kind, _ = map_property(c.threshold) if re.search(r"g/mol|Da\b|Å", c.threshold) else ([], "", None)
            if unit_ds:
                ds, kind = unit_ds, unit_kind
        new = [d for d in ds if d not in used]
        if not ds:
            dropped.append(DroppedClaim(property=c.property, reason=reason or "unmapped", direction=c.direction,
                                        threshold=c.threshold, rationale=c.rationale, position=i))
            continue
        if not new:
            dropped.append(DroppedClaim(property=c.property, reason=f"duplicate of {', '.join(ds)}",
                                        direction=c.direction, threshold=c.threshold, rationale=c.rationale,
                                        position=i))
            continue
        used.update(new)
        direction = c.direction
        if is_inverted(c.property):
            direction = _OPPOSITE.get(direction, direction)  # type: ignore[assignment]
        threshold = c.threshold
        if threshold and not is_inverted(c.property):
            threshold = normalise_threshold(threshold, new[0])
        elif threshold:
            threshold = None  # "hydrophilicity > 2" has no meaning on the logP scale: dropped, not guessed
        props.append(TemplateProperty(property=c.property, descriptors=new, direction=direction,
                                      threshold=threshold, rationale=c.rationale, match=kind, position=i))
    return Template(
        task=card.key if card else "generic",
        task_name=card.name if card else "Generic",
        task_type=card.task_type if card else "unlabelled",
        description=card.description if card else "Molecules described by their physicochemical profile.",
        endpoint=card.endpoint if card else "physicochemical profile",
        prompt_set=prompt_set,
        source=source,
        properties=props,
        dropped=dropped,
        model=model,
        card_hash=card.content_hash() if card else None,
    )


def default_template(card: TaskCard, prompt_set: str = "lardo", reason: str | None = None) -> Template:
    """The card's own property hints as a template (rules backend, fallback)."""
    props = [
        TemplateProperty(
            property=label_for(p.descriptor), descriptors=[p.descriptor], direction=p.direction,
            threshold=p.threshold, rationale=p.rationale, match="card", position=i,
        )
        for i, p in enumerate(card.default_properties)
    ]
    if not props:
        return generic_template(prompt_set, card=card, reason=reason or "card has no default properties")
    tpl = Template(
        task=card.key, task_name=card.name, task_type=card.task_type, description=card.description,
        endpoint=card.endpoint, prompt_set=prompt_set, source="card_default", properties=props,
        fallback_reason=reason, card_hash=card.content_hash(),
    )
    return tpl


def generic_template(prompt_set: str = "lardo", card: TaskCard | None = None, reason: str | None = None) -> Template:
    """No stage-1 knowledge: the default property set (``no_stage1`` variant, last-resort fallback)."""
    from lardo_ray.llm.prompts import DEFAULT_PROPERTY_SET

    props = [
        TemplateProperty(property=label_for(d), descriptors=[d], match="default", position=i)
        for i, d in enumerate(DEFAULT_PROPERTY_SET)
    ]
    return Template(
        task=card.key if card else "generic",
        task_name=card.name if card else "Generic",
        task_type=card.task_type if card else "unlabelled",
        description=card.description if card else "Molecules described by their physicochemical profile.",
        endpoint=card.endpoint if card else "physicochemical profile",
        prompt_set=prompt_set, source="generic", properties=props, fallback_reason=reason,
        card_hash=card.content_hash() if card else None,
    )


def label_for(descriptor: str) -> str:
    from lardo_ray.llm.prompts import label_of

    return label_of(descriptor)


# ======================================================================================= build + cache


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
