"""The rules backend: no LLM. Deterministic, readable descriptions from the template and the DSM values.

It is the fallback when no LLM is available, the "without LLM" ablation, and the cheap bulk path of the
demo (``llm_slice``). The text follows the lardo stage-2 answer format (one ``<Property>: <value> - ...``
line per template property, then ``Overall: ...``) and states only DSM values, so the post-check finds no
wrong number in it (a rationale that itself contains a checkable number is left out to keep that true).
The ``no_dsm`` variant does not apply: the rules always write from the DSM values. With ``structure``
(``describe.rules_structure``) three more lines state RDKit's structural facts of the molecule (formula,
rings, functional groups, stereocentres, charge) in the words the post-check reads back, so those claims are
checked against RDKit truth like an LLM's.
"""

from __future__ import annotations

import math
import re
import time

from lardo_ray.llm.backends.base import DescribeRecord, Generation, LLMBackend, Messages
from lardo_ray.llm.postcheck import CHECKABLE, check
from lardo_ray.llm.prompts import format_value, label_of
from lardo_ray.llm.settings import DescribeConfig, SamplingParams

RULES_VERSION = "rules-v1"
_CHECKABLE = frozenset(CHECKABLE)

_OP = r"(<=|>=|≤|≥|<|>|=<|=>)"
_NUM = r"(-?\d+(?:\.\d+)?)"


def parse_threshold(text: str | None) -> tuple[str, float, float | None] | None:
    """'< 90 Å²' -> ('<', 90, None); '1 to 3' -> ('range', 1, 3); anything else -> None."""
    if not text:
        return None
    t = text.strip().replace("≤", "<=").replace("≥", ">=").replace("=<", "<=").replace("=>", ">=")
    m = re.match(rf"^\s*(?:between\s+)?{_NUM}\s*(?:to|and|-|–)\s*{_NUM}", t, re.I)
    if m:
        a, b = float(m.group(1)), float(m.group(2))
        return ("range", min(a, b), max(a, b))
    m = re.match(rf"^\s*{_OP}\s*{_NUM}", t)
    if m:
        return (m.group(1), float(m.group(2)), None)
    words = {"below": "<", "under": "<", "less than": "<", "at most": "<=", "up to": "<=", "above": ">",
             "over": ">", "more than": ">", "greater than": ">", "at least": ">="}
    for w, op in words.items():
        m = re.match(rf"^\s*{w}\s+{_NUM}", t, re.I)
        if m:
            return (op, float(m.group(1)), None)
    return None


def _meets(value: float, thr: tuple[str, float, float | None]) -> bool:
    op, a, b = thr
    if op == "range":
        return a <= value <= b
    return {"<": value < a, "<=": value <= a, ">": value > a, ">=": value >= a}[op]


def _thr_text(thr: tuple[str, float, float | None]) -> str:
    def f(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    op, a, b = thr
    return f"{f(a)} to {f(b)}" if op == "range" else f"{op} {f(a)}"


def _short_endpoint(endpoint: str) -> str:
    text = re.sub(r"\s*\([^)]*\)", "", endpoint).strip().rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


_DIR = {
    "higher": "higher values favour {e}",
    "lower": "lower values favour {e}",
    "range": "intermediate values favour {e}",
}


class RulesBackend(LLMBackend):
    name = "rules"
    uses_sampling = False

    def __init__(self, model: str = RULES_VERSION, include_rationale: bool = False, structure: bool = False):
        # Rationales are the same for every molecule: they cost text-encoder tokens and tell molecules
        # apart not at all, so they are off by default.
        super().__init__((model or RULES_VERSION) + ("+rationale" if include_rationale else "")
                         + ("+structure" if structure else ""))
        self.include_rationale = include_rationale
        self.structure = structure

    @classmethod
    def from_config(cls, cfg: DescribeConfig) -> "RulesBackend":
        return cls(RULES_VERSION, structure=cfg.rules_structure)

    def generate(self, prompts: list[Messages], sampling: SamplingParams) -> list[Generation]:
        msg = "the rules backend writes from structured inputs: call describe_batch(records)"
        return [Generation.failed(msg) for _ in prompts]

    def describe_batch(self, records: list[DescribeRecord], sampling: SamplingParams) -> list[Generation]:
        out = []
        for r in records:
            t0 = time.perf_counter()
            try:
                text = self.describe(r)
                out.append(Generation(text=text, latency_s=time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001 - one odd record must not lose the batch
                out.append(Generation.failed(f"{type(e).__name__}: {e}", time.perf_counter() - t0))
        return out

    def stated(self, record: DescribeRecord) -> int:
        """The post-check's claim count for ``describe(record)`` without parsing all of it: the DSM values it
        states of descriptors the post-check knows, all true by construction (tests/unit/llm/test_llm_postcheck_rules.py
        checks the two agree), so bulk runs need not re-parse the text. With ``structure`` the text is checked
        as an LLM's would be (its structural claims are read against RDKit truth for the SMILES)."""
        if self.structure:
            return check(self.describe(record), record.values, smiles=record.smiles).n_claims
        n = 0
        for prop in record.template.properties:
            for d in prop.descriptors:
                v = record.values.get(d)
                n += d in _CHECKABLE and not (v is None or (isinstance(v, float) and math.isnan(v)))
        return n

    def describe(self, record: DescribeRecord) -> str:
        tpl, values = record.template, record.values
        endpoint = _short_endpoint(tpl.endpoint)
        lines: list[str] = []
        met = judged = 0
        for prop in tpl.properties:
            thr = parse_threshold(prop.threshold)
            rationale = (prop.rationale or "").strip().rstrip(".") if self.include_rationale else ""
            # A rationale that states a checkable number could contradict this molecule: leave it out.
            if rationale and check(rationale, {}).details:
                rationale = ""
            for d in prop.descriptors:
                v = values.get(d)
                value_text = format_value(d, v)
                parts: list[str] = []
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    parts.append("no value could be computed")
                elif thr is not None:
                    judged += 1
                    ok = _meets(float(v), thr)
                    met += ok
                    where = "within" if ok else "outside"
                    parts.append(f"{where} the favourable guide range ({_thr_text(thr)})")
                elif prop.direction in _DIR:
                    parts.append(_DIR[prop.direction].format(e="the endpoint"))
                if rationale:
                    parts.append(rationale[:1].lower() + rationale[1:])
                line = f"{label_of(d)}: {value_text}"
                if parts:
                    line += " - " + "; ".join(parts)
                lines.append(line + ".")
        if judged:
            share = met / judged
            verdict = (
                "a profile that favours" if share >= 0.75 else "a mixed profile for" if share >= 0.4
                else "a profile that disfavours"
            )
            lines.append(f"Overall: the molecule meets {met} of the {judged} guide ranges, {verdict} {endpoint}.")
        else:
            lines.append(f"Overall: computed physicochemical profile relevant to {endpoint}.")
        if self.structure:
            text = structure_text(record.smiles)
            if text is None:  # the row fails with this reason (describe_batch), never a text without them
                raise ValueError(f"describe.rules_structure: RDKit cannot parse {record.smiles!r}, so its "
                                 "structure lines cannot be written")
            lines.append(text)
        return "\n".join(lines)


_RING_GROUPS = frozenset({"benzene", "pyridine", "pyrimidine", "imidazole", "pyrrole", "indole", "furan", "thiophene",
                          "thiazole", "oxazole", "tetrazole", "piperidine", "piperazine", "morpholine", "pyrrolidine",
                          "naphthalene", "quinoline", "epoxide"})


def _plural(name: str, n: int) -> str:
    return name if n == 1 else name + ("es" if name.endswith(("s", "x", "sh", "ch")) else "s")


def structure_text(smiles: str) -> str | None:
    """What RDKit says the molecule is made of, in words the post-check reads back: formula, rings, the
    functional groups present (with counts, in the post-check's GROUPS order), stereocentres and charge.
    A sentence encoder reads "LogP (Crippen): 2.58" almost alike for every molecule; groups and rings are
    what tells two of them apart. None when RDKit cannot parse the SMILES."""
    from lardo_ray.llm.claims import facts

    f = facts(smiles)
    if f is None:
        return None
    rings = f"{f.rings} ring" + ("" if f.rings == 1 else "s") + (f", {f.aromatic_rings} aromatic" if f.rings else "")
    # "<n> <group> group(s)" / "ring(s)": the form the post-check reads as a count claim in a list
    groups = [f"{n} {g} {_plural('ring' if g in _RING_GROUPS else 'group', n)}" for g, n in f.groups.items() if n > 0]
    return "\n".join([
        f"Structure: formula {f.formula}; {rings}.",
        "Functional groups: " + (", ".join(groups) if groups else "none of the common ones") + ".",
        f"Stereocentres: {f.stereocentres}. Net formal charge of "
        + (f"{f.formal_charge:+d}." if f.formal_charge else "0."),
    ])
