"""Post-check: find the claims a description makes about its molecule and judge each against the truth.

``check(text, values, smiles=...)`` finds numeric claims such as "logP of 3.2", "molecular weight: 310 g/mol",
"TPSA is 45 Å²", "2 hydrogen bond donors", "no rotatable bonds", "1 ring", "Fsp3 of 45 %", and, given the
molecule's SMILES, the structural claims of ``lardo_ray.llm.claims`` (formula, atom counts, charge,
functional groups, compound classes). Thresholds and ranges ("TPSA below 90", "logP 1 to 3", "fewer than 5
donors") are not claims. Counts must match exactly; a continuous value must be the true value rounded as the
number is written ("3.37" within 0.005, "310 g/mol" within 0.5; "about 300" within 50): the prompt gives the
exact values, so nothing looser is right (``rel_tolerance`` / ``abs_tolerance`` loosen it on purpose).
``correct(text, values, smiles=...)`` rewrites what can be rewritten (numbers, counts, formulas); a wrong
functional group or class cannot be, and is left for ``regenerate``.

Each claim carries its type (``kind``: numeric, ring_count, aromatic_rings, hbd, hba, rotatable_bonds,
stereocentres, heavy_atoms, formula, element_count, formal_charge, functional_group, compound_class), the
stated and the true value and a verdict; an undecidable claim is counted apart, never as right.
The extractor is deliberately conservative: an unusual phrasing is missed rather than misread, so
``n_wrong`` is a lower bound on hallucinations, not an upper one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lardo_ray.llm.claims import StructuralClaim, facts, structural_claims
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
    "RingCount": [r"ring\s+count", r"number\s+of\s+rings", r"rings?"],
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
_COUNT_ONLY = {("RingCount", "rings?")}
CHECKABLE = [d for d in MENTIONS if d]

_UNIT = r"(?:g\s*/\s*mol|g\s*mol-1|g·mol⁻¹|k?da(?:ltons?)?\b|å²|å2|å\^2|a\^2|Å²|square\s+angstroms?)"
_UNIT_RE = re.compile(r"\s*(" + _UNIT + r")", re.I)
_WORDS = {"no": 0, "zero": 0, "one": 1, "a single": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5,
          "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
          "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
          "twenty": 20}
# descriptors that are fractions: "45 %" states 0.45
_FRACTIONS = {"FractionCSP3"}
_PERCENT_RE = re.compile(r"\s*(?:%|percent\b|per\s+cent\b)", re.I)
_APPROX_RE = re.compile(r"(?:approximately|approx\.?|about|around|roughly|nearly|close\s+to|some|~|≈|circa|ca\.)\s*$",
                        re.I)
# numeric descriptors that are structural counts: their claim type, and RDKit truth when the prompt had none
KINDS = {"RingCount": "ring_count", "NumAromaticRings": "aromatic_rings", "NumHDonors": "hbd",
         "NumHAcceptors": "hba", "NumRotatableBonds": "rotatable_bonds", "NumStereoCenters": "stereocentres",
         "HeavyAtomCount": "heavy_atoms"}
CLAIM_KINDS = ["numeric", *KINDS.values(), "formula", "element_count", "formal_charge", "functional_group",
               "compound_class"]
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
    ok: bool | None  # None: no value to compare with (undecidable, counted apart)
    start: int
    end: int
    text: str
    form: str  # value | count | unit | percent
    approximate: bool = False  # "about 300": rounded to its significant digits

    @property
    def kind(self) -> str:
        return KINDS.get(self.descriptor, "numeric")


@dataclass
class PostcheckResult:
    n_claims: int  # decided claims (right or wrong), numeric and structural
    n_wrong: int
    details: list[ClaimCheck] = field(default_factory=list)
    structural: list[StructuralClaim] = field(default_factory=list)

    def wrong(self) -> list[ClaimCheck]:
        return [d for d in self.details if d.ok is False]

    def wrong_structural(self) -> list[StructuralClaim]:
        return [c for c in self.structural if c.ok is False]

    @property
    def n_undecidable(self) -> int:
        return sum(1 for d in self.details if d.ok is None) + sum(1 for c in self.structural if c.ok is None)

    def by_kind(self) -> dict[str, list[int]]:
        """kind -> [decided claims, wrong, undecidable]."""
        out: dict[str, list[int]] = {}
        for kind, ok in [(d.kind, d.ok) for d in self.details] + [(c.kind, c.ok) for c in self.structural]:
            row = out.setdefault(kind, [0, 0, 0])
            if ok is None:
                row[2] += 1
            else:
                row[0] += 1
                row[1] += ok is False
        return out

    def wrong_dicts(self) -> list[dict]:
        """The wrong claims, typed: what the describe stage writes per row (``wrong_claims``)."""
        out = [{"kind": d.kind, "descriptor": d.descriptor, "claimed": d.claimed, "true": round(d.true, 4)}
               for d in self.wrong()]
        out += [{"kind": c.kind, "subject": c.subject, "claimed": c.stated, "true": c.true, "text": c.text}
                for c in self.wrong_structural()]
        return out


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


def _extract(text: str) -> list[tuple[str, int, int, float, str, str, bool]]:
    """(descriptor, start, end, claimed, number text, form, approximate) for every claim found."""
    mentions = _mentions(text)
    numbers = _numbers(text, mentions)
    claims = []
    for start, end, value, ntext, is_word in numbers:
        unit_m = _UNIT_RE.match(text, end)
        after_unit = unit_m.end() if unit_m else end
        percent = _PERCENT_RE.match(text, after_unit)
        if _RANGE_AFTER.match(text[end:end + 30]):
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
                    # the threshold words that make it no claim sit between the name and the number ("TPSA
                    # below 90") or just before the name in its clause ("an ideal logP of 2"), not anywhere
                    # earlier in the sentence ("within the favourable range, it has a logP of 5.9")
                    lead = re.split(r"[,;:()]", _same_sentence(text[max(m[0] - 15, 0):m[0]]))[-1]
                    desc, form, ctx = m[2], "value", lead + " " + gap
            if desc is None and unit_m:
                u = unit_m.group(1).lower()
                if "mol" in u or "da" in u:
                    desc, form, ctx = "MolWt", "unit", before
                elif "2" in u or "²" in u or "angstrom" in u:
                    desc, form, ctx = "TPSA", "unit", before
        if not desc:  # no mention, or the nearest mention is a blocker
            continue
        near = re.split(r"[,;:()]", _same_sentence(text[max(0, start - 12):start]))[-1]
        if _THRESHOLD_CTX.search(_same_sentence(ctx)) or _THRESHOLD_CTX.search(near):
            continue
        if percent:
            if desc not in _FRACTIONS:
                continue  # a percentage of something else ("45 % of the surface"): not this property
            value /= 100.0
            form = "percent"
        if unit_m and "kda" in unit_m.group(1).lower():
            value *= 1000.0
        approx = bool(_APPROX_RE.search(text[max(0, start - 16):start]))
        claims.append((desc, start, end, value, ntext, form, approx))
    return claims


def _rounding(ntext: str, form: str, approximate: bool) -> float:
    """Half a unit of the last digit the number is written with (of the percentage for "45 %")."""
    if not ntext or not ntext[0].isdigit() and ntext[0] not in "-−":
        return 0.5  # a number word
    digits = ntext.replace(",", "").lstrip("-−")
    if "." in digits:
        r = 0.5 * 10 ** (-_decimals(digits))
    else:
        # "about 300": rounded to its significant digits (300 -> the hundreds); "300" alone -> the units
        zeros = len(digits) - len(digits.rstrip("0")) if approximate and digits.strip("0") else 0
        r = 0.5 * 10 ** zeros
    return r / 100.0 if form == "percent" else r


def _within(desc: str, claimed: float, true: float, ntext: str, rel: float, abs_tol: float, form: str = "value",
            approximate: bool = False) -> bool:
    if is_count(desc):
        return claimed == round(true) and float(claimed).is_integer()
    return abs(claimed - true) <= max(rel * abs(true), abs_tol, _rounding(ntext, form, approximate)) + 1e-9


def check(
    text: str | None, values: dict[str, float], rel_tolerance: float = 0.0, abs_tolerance: float = 0.0,
    smiles: str | None = None,
) -> PostcheckResult:
    """Judge every claim in ``text``: numeric ones against ``values`` (descriptor name -> DSM value; structural
    counts fall back to RDKit truth for ``smiles``), structural ones against RDKit truth for ``smiles``."""
    if not text:
        return PostcheckResult(0, 0, [])
    truth = dict(values)
    f = facts(smiles) if smiles else None
    if f is not None:
        for k, v in f.numeric().items():
            if truth.get(k) is None or (isinstance(truth.get(k), float) and math.isnan(truth[k])):
                truth[k] = float(v)
    details = []
    for desc, start, end, claimed, ntext, form, approx in _extract(text):
        true = truth.get(desc)
        if true is None or (isinstance(true, float) and math.isnan(true)):
            details.append(ClaimCheck(desc, claimed, None, None, start, end, ntext, form, approx))
            continue
        ok = _within(desc, claimed, float(true), ntext, rel_tolerance, abs_tolerance, form, approx)
        details.append(ClaimCheck(desc, claimed, float(true), ok, start, end, ntext, form, approx))
    structural = structural_claims(text, smiles) if f is not None else []
    # a span read as both (e.g. "3 nitrogen and oxygen atoms"): the numeric reading stands
    spans = [(d.start, d.end) for d in details]
    structural = [c for c in structural if not any(c.start < e and c.end > s_ for s_, e in spans)]
    n_claims = sum(1 for d in details if d.ok is not None) + sum(1 for c in structural if c.ok is not None)
    n_wrong = sum(1 for d in details if d.ok is False) + sum(1 for c in structural if c.ok is False)
    return PostcheckResult(n_claims, n_wrong, details, structural)


def _replacement(d: ClaimCheck) -> str:
    if is_count(d.descriptor):
        return str(int(round(d.true)))
    if d.form == "percent":
        return f"{d.true * 100:.0f}"
    dec = max(decimals_of(d.descriptor), 0) if d.form != "count" else 0
    out = f"{d.true:.{dec}f}"
    return out[1:] if out.startswith("-") and float(out) == 0 else out


def corrections(result: PostcheckResult) -> list[tuple[int, int, str]]:
    """(start, end, replacement) for every wrong claim that a rewrite can fix: numbers, counts, formulas and
    stated atom counts. A wrong group or class has no rewrite (the sentence would have to change)."""
    out = [(d.start, d.end, _replacement(d)) for d in result.wrong()]
    for c in result.wrong_structural():
        if c.kind == "formula":
            out.append((c.start, c.end, re.sub(r"[+-]\d*$", "", str(c.true))))
    return out


def correct(
    text: str, values: dict[str, float], rel_tolerance: float = 0.0, abs_tolerance: float = 0.0,
    smiles: str | None = None,
) -> str:
    """``text`` with every wrong number and formula replaced by the truth (units and wording kept)."""
    result = check(text, values, rel_tolerance, abs_tolerance, smiles=smiles)
    out = text
    for start, end, rep in sorted(corrections(result), reverse=True):
        out = out[:start] + rep + out[end:]
    return out
