"""Numeric post-check: find property values stated in a description and compare them with the DSM values.

``check(text, values)`` finds claims such as "logP of 3.2", "molecular weight: 310 g/mol", "TPSA is 45 Å²",
"2 hydrogen bond donors", "no rotatable bonds", "a weight of 250 g/mol"; thresholds and ranges ("TPSA below
90", "logP 1 to 3", "fewer than 5 donors") are not claims. Counts must match exactly; continuous values within
``max(rel_tolerance * |true|, abs_tolerance, rounding of the stated number)``. ``correct(text, values)``
rewrites the wrong numbers with the true ones. Regenerating is the caller's decision.

The extractor is deliberately conservative: an unusual phrasing is missed rather than misread, so
``n_wrong`` is a lower bound on hallucinated numbers, not an upper one.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from lardo_ray.llm.prompts import decimals_of, is_count

# descriptor -> regex alternatives naming it (case-insensitive). Longer alternatives win at a position.
MENTIONS: dict[str, list[str]] = {
    "MolLogP": [r"crippen\s+log\s?p", r"c?log\s?p(?:\s+value)?", r"[asx]log\s?p", r"mollogp",
                r"octanol[-/ ]water partition coefficient", r"partition coefficient", r"lipophilicity"],
    "MolWt": [r"molecular\s+weight", r"molecular\s+mass", r"molar\s+mass", r"mol\.?\s*wt\.?", r"\bmw",
              r"weight"],
    "HeavyAtomMolWt": [r"heavy[- ]atom\s+molecular\s+weight"],
    "ExactMolWt": [r"exact\s+(?:molecular\s+)?mass", r"monoisotopic\s+mass"],
    "TPSA": [r"topological\s+polar\s+surface\s+area", r"polar\s+surface\s+area", r"t?psa"],
    "LabuteASA": [r"labute\s+(?:approximate\s+surface\s+area|asa)", r"approximate\s+surface\s+area"],
    "NumHDonors": [r"hydrogen[- ]bond(?:ing)?\s+donors?", r"h[- ]bond\s+donors?", r"hbds?", r"donors?"],
    "NumHAcceptors": [r"hydrogen[- ]bond(?:ing)?\s+acceptors?", r"h[- ]bond\s+acceptors?", r"hbas?",
                      r"acceptors?"],
    "NumRotatableBonds": [r"rotatable\s+bonds?(?:\s+count)?", r"rotatable\s+bond\s+count"],
    "NumAromaticRings": [r"aromatic\s+rings?"],
    "NumAromaticHeterocycles": [r"aromatic\s+heterocycles?", r"heteroaromatic\s+rings?"],
    "NumAliphaticRings": [r"aliphatic\s+rings?"],
    "NumSaturatedRings": [r"saturated\s+rings?"],
    "NumHeterocycles": [r"heterocycles?"],
    "RingCount": [r"ring\s+count", r"number\s+of\s+rings", r"rings"],
    "HeavyAtomCount": [r"heavy\s+atoms?(?:\s+count)?", r"heavy\s+atom\s+count", r"non-hydrogen\s+atoms"],
    "NumHeteroatoms": [r"heteroatoms?"],
    "NumValenceElectrons": [r"valence\s+electrons"],
    "FractionCSP3": [r"fraction\s+of\s+sp3(?:[- ]hybridi[sz]ed)?\s+carbons?(?:\s+atoms)?", r"fsp3",
                     r"fraction\s*c?sp3", r"sp3\s+fraction"],
    "qed": [r"qed(?:\s+drug-likeness)?(?:\s+score)?", r"quantitative\s+estimate\s+of\s+drug-likeness",
            r"drug-likeness\s+score"],
    "MolMR": [r"molar\s+refractivity"],
    "BertzCT": [r"bertz\s+(?:complexity(?:\s+index)?|ct)"],
    "MaxAbsPartialCharge": [r"maximum\s+absolute\s+partial\s+charge"],
    "LipinskiViolations": [r"lipinski\s+(?:rule-of-five\s+)?violations?", r"rule[- ]of[- ]five\s+violations?",
                           r"violations?\s+of\s+lipinski(?:'s)?\s+rule(?:\s+of\s+(?:five|5))?"],
    "NumStereoCenters": [r"stereocent(?:er|re)s?", r"chiral\s+cent(?:er|re)s?"],
    "NumAmideBonds": [r"amide\s+bonds?"],
    "NOCount": [r"nitrogen\s+and\s+oxygen\s+atoms"],
}
# Quantities a DSM does not compute but an LLM states next to ours: as the nearest mention they keep their
# numbers from being read as, e.g., a logP ("lipophilicity (logD 2.1)").
BLOCKERS = [r"log\s?d(?:7\.4)?", r"log\s?s", r"pka", r"pkb", r"ic50", r"ec50", r"ki", r"kd", r"ph",
            r"solubility", r"half-life", r"melting\s+point", r"boiling\s+point", r"hydration\s+free\s+energy",
            r"free\s+energy", r"kcal/mol", r"heavy\s+metal"]
MENTIONS[""] = BLOCKERS
# "N rings" only as a count right before the word; "rings" alone after a number would be RingCount.
_COUNT_ONLY = {("RingCount", "rings")}
CHECKABLE = [d for d in MENTIONS if d]

_UNIT = r"(?:g\s*/\s*mol|g\s*mol-1|g·mol⁻¹|k?da(?:ltons?)?\b|å²|å2|å\^2|a\^2|Å²|square\s+angstroms?)"
_UNIT_RE = re.compile(r"\s*(" + _UNIT + r")", re.I)
_WORDS = {"no": 0, "zero": 0, "one": 1, "a single": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5,
          "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}
_NUM_RE = re.compile(r"(?<![\w.])([-−]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[-−]?\d+(?:\.\d+)?)(?![\w]|\.\d)")
_WORD_RE = re.compile(r"\b(" + "|".join(sorted(_WORDS, key=len, reverse=True)) + r")\b", re.I)
_THRESHOLD_CTX = re.compile(
    r"(<|>|≤|≥|=<|>=|<=|\bbelow\b|\bunder\b|\babove\b|\bover\b|exceed|less than|more than|greater than|"
    r"fewer than|at most|at least|up to|no more|no less|maximum|minimum|\bmax\b|\bmin\b|\blimit|threshold|"
    r"cut-?off|\brange\b|between|\bfrom\b|\btarget|\bideal|optimal|optimum|typical|recommended|preferred|"
    r"favou?rable|should|guide value|\brule\b|criteri|\bthan\b|within|beyond|outside|\bbelow\b|\bif\b)",
    re.I,
)
_RANGE_AFTER = re.compile(r"^\s*(?:" + _UNIT + r")?\s*(?:-|–|—|to|and)\s*[-−]?\d", re.I)
_COUNT_GAP = re.compile(r"^[\s-]*(?:(?:freely|total|distinct|separate|individual|free)\s+)?$", re.I)


@dataclass
class ClaimCheck:
    descriptor: str
    claimed: float
    true: float | None
    ok: bool | None  # None: no DSM value to compare with (not counted)
    start: int
    end: int
    text: str
    form: str  # value | count | unit


@dataclass
class PostcheckResult:
    n_claims: int
    n_wrong: int
    details: list[ClaimCheck] = field(default_factory=list)

    def wrong(self) -> list[ClaimCheck]:
        return [d for d in self.details if d.ok is False]

    def to_dicts(self) -> list[dict]:
        return [asdict(d) for d in self.details]


_MENTION_RE: re.Pattern | None = None
_MENTION_KEYS: list[tuple[str, str]] = []


def _mention_re() -> re.Pattern:
    global _MENTION_RE, _MENTION_KEYS
    if _MENTION_RE is None:
        pairs = [(d, alt) for d, alts in MENTIONS.items() for alt in alts]
        # Longest pattern text first: a crude but effective "longest alternative wins".
        pairs.sort(key=lambda p: len(p[1]), reverse=True)
        _MENTION_KEYS = pairs
        # One shared lookbehind in front of the alternation: mid-word positions fail at once instead of
        # trying every alternative (~60x faster on long texts). A failed lookahead still backtracks into the
        # alternation, so the match is the same as with per-alternative lookarounds.
        _MENTION_RE = re.compile(
            "(?<![\\w-])(?:" + "|".join(f"(?P<m{i}>{alt})" for i, (_, alt) in enumerate(pairs)) + ")(?![\\w])",
            re.I,
        )
    return _MENTION_RE


def _mentions(text: str) -> list[tuple[int, int, str, str]]:
    rx = _mention_re()
    out = []
    for m in rx.finditer(text):
        i = int(m.lastgroup[1:])
        d, alt = _MENTION_KEYS[i]
        out.append((m.start(), m.end(), d, alt))
    return out


def _parse_num(s: str) -> float:
    return float(s.replace("−", "-").replace(",", ""))


def _numbers(text: str, mentions: list) -> list[tuple[int, int, float, str, bool]]:
    """(start, end, value, text, is_word) outside mention spans."""
    inside = [(s, e) for s, e, *_ in mentions]

    def free(a: int, b: int) -> bool:
        return not any(a < e and b > s for s, e in inside)

    nums = [(m.start(), m.end(), _parse_num(m.group(1)), m.group(1), False) for m in _NUM_RE.finditer(text)
            if free(m.start(), m.end())]
    words = [(m.start(), m.end(), float(_WORDS[m.group(1).lower()]), m.group(1), True)
             for m in _WORD_RE.finditer(text) if free(m.start(), m.end())]
    return sorted(nums + words)


def _decimals(num_text: str) -> int:
    return len(num_text.split(".")[1]) if "." in num_text else 0


_SENTENCE_END = re.compile(r".*(?:[.!?;]\s|\n)", re.S)


_TAG = re.compile(r"<[A-Za-z_ ]{2,30}>")


def _same_sentence(context: str) -> str:
    """The part of a left context after the last sentence break, without <TAGS> such as the paper's
    <MOLECULE> (whose '<' is no comparison)."""
    m = _SENTENCE_END.match(context)
    return _TAG.sub(" ", context[m.end():] if m else context)


def _extract(text: str) -> list[tuple[str, int, int, float, str, str]]:
    """(descriptor, start, end, claimed, number text, form) for every claim found."""
    mentions = _mentions(text)
    numbers = _numbers(text, mentions)
    claims = []
    for start, end, value, ntext, is_word in numbers:
        unit_m = _UNIT_RE.match(text, end)
        after_unit = unit_m.end() if unit_m else end
        if _RANGE_AFTER.match(text[end:end + 30]) or text[after_unit:after_unit + 1] == "%":
            continue
        before = text[max(0, start - 25):start]
        # count form: "2 hydrogen bond donors", "no rotatable bonds"
        nxt = next((m for m in mentions if m[0] >= end), None)
        desc, form, ctx = None, None, ""
        if nxt is not None and _COUNT_GAP.match(text[end:nxt[0]]) and nxt[2] and is_count(nxt[2]):
            desc, form, ctx = nxt[2], "count", before
        elif is_word:
            continue  # word numbers only count in the count form ("rule of five" is no claim)
        else:
            prev = [m for m in mentions if m[1] <= start]
            if prev:
                m = prev[-1]
                gap = text[m[1]:start]
                if (
                    (m[2], m[3]) not in _COUNT_ONLY
                    and len(gap) <= 60
                    and "\n" not in gap
                    and not re.search(r"[;!?]|\.\s", gap)
                    and not _NUM_RE.search(gap)
                ):
                    desc, form, ctx = m[2], "value", _same_sentence(text[max(m[0] - 12, 0):m[0]]) + " " + gap
            if desc is None and unit_m:
                u = unit_m.group(1).lower()
                if "mol" in u or "da" in u:
                    desc, form, ctx = "MolWt", "unit", before
                elif "2" in u or "²" in u or "angstrom" in u:
                    desc, form, ctx = "TPSA", "unit", before
        if not desc:  # no mention, or the nearest mention is a blocker
            continue
        if _THRESHOLD_CTX.search(_same_sentence(ctx)) or _THRESHOLD_CTX.search(
            _same_sentence(text[max(0, start - 12):start])
        ):
            continue
        if unit_m and "kda" in unit_m.group(1).lower():
            value *= 1000.0
        claims.append((desc, start, end, value, ntext, form))
    return claims


def _within(desc: str, claimed: float, true: float, ntext: str, rel: float, abs_tol: float) -> bool:
    if is_count(desc):
        return claimed == round(true) and float(claimed).is_integer()
    rounding = 0.5 * 10 ** (-_decimals(ntext)) if ntext and ntext[0] not in "nNzZoOtTfFsSeE" else 0.5
    return abs(claimed - true) <= max(rel * abs(true), abs_tol, rounding) + 1e-9


def check(
    text: str | None, values: dict[str, float], rel_tolerance: float = 0.05, abs_tolerance: float = 0.1
) -> PostcheckResult:
    """Compare every numeric property claim in ``text`` with ``values`` (descriptor name -> DSM value)."""
    if not text:
        return PostcheckResult(0, 0, [])
    details = []
    for desc, start, end, claimed, ntext, form in _extract(text):
        true = values.get(desc)
        if true is None or (isinstance(true, float) and math.isnan(true)):
            details.append(ClaimCheck(desc, claimed, None, None, start, end, ntext, form))
            continue
        ok = _within(desc, claimed, float(true), ntext, rel_tolerance, abs_tolerance)
        details.append(ClaimCheck(desc, claimed, float(true), ok, start, end, ntext, form))
    n_claims = sum(1 for d in details if d.ok is not None)
    n_wrong = sum(1 for d in details if d.ok is False)
    return PostcheckResult(n_claims, n_wrong, details)


def _replacement(d: ClaimCheck) -> str:
    if is_count(d.descriptor):
        return str(int(round(d.true)))
    dec = max(decimals_of(d.descriptor), 0) if d.form != "count" else 0
    out = f"{d.true:.{dec}f}"
    return out[1:] if out.startswith("-") and float(out) == 0 else out


def correct(
    text: str, values: dict[str, float], rel_tolerance: float = 0.05, abs_tolerance: float = 0.1
) -> str:
    """``text`` with every wrong number replaced by the DSM value (units and wording kept)."""
    result = check(text, values, rel_tolerance, abs_tolerance)
    out = text
    for d in sorted(result.wrong(), key=lambda d: d.start, reverse=True):
        out = out[: d.start] + _replacement(d) + out[d.end:]
    return out
