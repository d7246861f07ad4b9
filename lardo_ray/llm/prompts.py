"""Prompt sets of the describe stage: chat messages (``[{"role": ..., "content": ...}]``).

Two sets:

``paper``
    The prompts released with MolGraph-LarDo (zhangtia16/MolGraph-LarDo, ``mistral_properties.py`` and
    ``mistral_bbbp.py``). Stage 1: "You are a biochemistry expert." + ``<DATASET>`` / ``Description of
    <DATASET>`` / ``<TASK>`` / ``Target of <TASK>`` + the question which molecular ``<PROPERTIES>`` relate to
    the task (the paper used 300 new tokens). Stage 2 (200 tokens): the ``<PROPERTIES>`` list, the
    ``<MOLECULE>`` SMILES, the two DSM lines ``LogP of <MOLECULE>: x`` (Crippen MolLogP, 3 decimals) and
    ``Molecular weight of <MOLECULE>: y g/mol`` (MolWt, 1 decimal) and a fixed answer format
    ``[Property]: ...``. Differences from the release: the system sentence is a system message (the release
    prepended it to a raw-text prompt), the ``<end of prompt>`` marker (used there to cut the echoed prompt from
    raw decoding) is omitted, and the ``no_stage1`` variant adds the two DSM lines to the released
    ``wo_stage1`` prompt (the release's ``wo_stage1`` had none).

``lardo`` (default, ours)
    Stage 1 asks for strict JSON (``[{property, direction, threshold, rationale}]``) and lists computable
    properties, so calibration maps most answers to DSM calculators. Stage 2 puts everything that is the same
    for every molecule (instructions, task, template knowledge) in the system message - a long constant
    prefix that vLLM's prefix cache reuses - and only the SMILES and the DSM values in the user message.

Variants: ``full``; ``no_dsm`` (stage 2 without DSM values); ``no_stage1`` (no template knowledge: a generic
stage-2 prompt with the DSM values of ``DEFAULT_PROPERTY_SET``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from lardo_ray.llm.cards import TaskCard
    from lardo_ray.llm.stage1 import Template

Messages = list[dict[str, str]]

PROMPT_VERSION = 1  # bump when a prompt text changes: it is part of template cache keys and row cache keys

# The "default property set" (no_stage1 variant, generic template, fallback of last resort).
DEFAULT_PROPERTY_SET = [
    "MolLogP", "MolWt", "TPSA", "NumHDonors", "NumHAcceptors", "NumRotatableBonds", "NumAromaticRings",
    "FractionCSP3",
]
# The paper's two DSM lines.
PAPER_DSM = ["MolLogP", "MolWt"]

# descriptor -> (label, unit, decimals). Labels are words the postcheck recognises, so rules text checks clean.
DISPLAY: dict[str, tuple[str, str, int]] = {
    "MolLogP": ("LogP (Crippen)", "", 2),
    "MolWt": ("Molecular weight", "g/mol", 1),
    "ExactMolWt": ("Exact mass", "Da", 3),
    "HeavyAtomMolWt": ("Heavy-atom molecular weight", "g/mol", 1),
    "TPSA": ("Topological polar surface area (TPSA)", "Å²", 1),
    "LabuteASA": ("Labute approximate surface area", "Å²", 1),
    "NumHDonors": ("Hydrogen bond donors", "", 0),
    "NumHAcceptors": ("Hydrogen bond acceptors", "", 0),
    "NumRotatableBonds": ("Rotatable bonds", "", 0),
    "NumAromaticRings": ("Aromatic rings", "", 0),
    "NumAliphaticRings": ("Aliphatic rings", "", 0),
    "NumSaturatedRings": ("Saturated rings", "", 0),
    "RingCount": ("Ring count", "", 0),
    "HeavyAtomCount": ("Heavy atoms", "", 0),
    "NumHeteroatoms": ("Heteroatoms", "", 0),
    "NumHeterocycles": ("Heterocycles", "", 0),
    "NumValenceElectrons": ("Valence electrons", "", 0),
    "FractionCSP3": ("Fraction of sp3 carbons (Fsp3)", "", 2),
    "qed": ("QED drug-likeness", "", 2),
    "MolMR": ("Molar refractivity", "", 1),
    "BertzCT": ("Bertz complexity index", "", 1),
    "MaxAbsPartialCharge": ("Maximum absolute partial charge (Gasteiger)", "", 2),
    "LipinskiViolations": ("Lipinski rule-of-five violations", "", 0),
    "NumStereoCenters": ("Stereocenters", "", 0),
    "NumAmideBonds": ("Amide bonds", "", 0),
    "NOCount": ("Nitrogen and oxygen atoms", "", 0),
}
_BOOL_NAMES = {"LipinskiPass", "VeberPass"}
_COUNT_NAMES = {"RingCount", "HeavyAtomCount", "NHOHCount", "NOCount", "LipinskiViolations", "NumRadicalElectrons"}


def is_count(name: str) -> bool:
    """Integer-valued descriptors: compared exactly by the postcheck, printed without decimals."""
    return name in _COUNT_NAMES or name.startswith(("fr_", "Num")) or name in _BOOL_NAMES


def label_of(name: str) -> str:
    if name in DISPLAY:
        return DISPLAY[name][0]
    if name.startswith("fr_"):
        from lardo_ray.chem.descriptors import fragment_phrase

        text = fragment_phrase(name)
        if text:
            return text[:1].upper() + text[1:]
    return name


def unit_of(name: str) -> str:
    return DISPLAY[name][1] if name in DISPLAY else ""


def decimals_of(name: str) -> int:
    if name in DISPLAY:
        return DISPLAY[name][2]
    return 0 if is_count(name) else 3


def format_value(name: str, value: float | None, with_unit: bool = True, decimals: int | None = None) -> str:
    """The one way a DSM value is written (prompts, rules text, corrections)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not computable"
    if name in _BOOL_NAMES:
        return "yes" if value >= 0.5 else "no"
    d = decimals_of(name) if decimals is None else decimals
    text = str(int(round(value))) if d == 0 else f"{value:.{d}f}"
    if text.startswith("-") and float(text) == 0:
        text = text[1:]
    unit = unit_of(name)
    return f"{text} {unit}" if with_unit and unit else text


def dsm_lines(names: list[str], values: dict[str, float]) -> list[str]:
    return [f"{label_of(n)}: {format_value(n, values.get(n))}" for n in names]


# ----------------------------------------------------------------------------------------------- stage 1

_TASK_WORD = {"classification": "Classification", "regression": "Regression", "unlabelled": "Description"}


def stage1_messages(card: "TaskCard", prompt_set: str = "lardo") -> Messages:
    if prompt_set == "paper":
        user = (
            f"<DATASET>: {card.name}\n"
            f"Description of <DATASET>: {card.description}\n"
            f"<TASK>: {_TASK_WORD[card.task_type]}\n"
            f"Target of <TASK>: {card.endpoint}\n"
            # Verbatim from the release, including its doubled "are the".
            "Given the SMILES of a <Molecule>, what are the are the molecular <PROPERTIES> related to <TASK>?"
        )
        return [{"role": "system", "content": "You are a biochemistry expert."}, {"role": "user", "content": user}]
    if prompt_set != "lardo":
        raise ValueError(f"unknown prompt set {prompt_set!r}")
    system = (
        "You are a biochemistry and medicinal chemistry expert. You answer with strict JSON only: "
        "no prose before or after it, no code fence."
    )
    user = (
        f"Dataset: {card.name}\n"
        f"Description: {card.description}\n"
        f"Task type: {card.task_type}\n"
        f"Endpoint: {card.endpoint}\n\n"
        "Which molecular properties, computable from the structure alone (for example with RDKit), are most "
        "related to this endpoint? Give 4 to 8 properties, most important first. Prefer these computable ones: "
        "logP, molecular weight, topological polar surface area (TPSA), hydrogen bond donors, hydrogen bond "
        "acceptors, rotatable bonds, aromatic rings, fraction of sp3 carbons, heavy atoms, QED drug-likeness, "
        "molar refractivity, stereocenters, and counts of functional groups (carboxylic acids, basic amines, "
        "halogens, nitro groups, phenols, amides).\n\n"
        "Answer with a JSON list; each item is an object with the keys\n"
        '  "property": the property name,\n'
        '  "direction": "higher", "lower", "range" or "unclear" - which values favour the endpoint '
        "(the positive class, or a larger target value),\n"
        '  "threshold": a cut-off or range such as "< 90" or "1 to 3", or null,\n'
        '  "rationale": one short sentence.\n'
        'Example of the shape: [{"property": "...", "direction": "lower", "threshold": "< 5", "rationale": "..."}]'
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------------------------- stage 2

_DIRECTION_TEXT = {
    "higher": "higher values favour the endpoint",
    "lower": "lower values favour the endpoint",
    "range": "intermediate values favour the endpoint",
    "unclear": "relation to the endpoint is mixed",
}


def knowledge_lines(template: "Template") -> list[str]:
    lines = []
    for p in template.properties:
        names = ", ".join(label_of(d) for d in p.descriptors)
        parts = [_DIRECTION_TEXT.get(p.direction, p.direction)]
        if p.threshold:
            parts.append(f"guide value {p.threshold}")
        text = f"- {p.property} [{names}]: " + "; ".join(parts) + "."
        if p.rationale:
            text += f" {p.rationale.rstrip('.')}."
        lines.append(text)
    return lines


class PromptBuilder:
    """Builds stage-2 messages for one (prompt set, variant, template). Built once per actor.

    ``descriptors`` are the DSM values that appear in the prompt; ``system`` is the constant prefix.
    """

    def __init__(self, prompt_set: str, variant: str, template: "Template"):
        if prompt_set not in ("lardo", "paper"):
            raise ValueError(f"unknown prompt set {prompt_set!r}")
        if variant not in ("full", "no_dsm", "no_stage1"):
            raise ValueError(f"unknown variant {variant!r}")
        self.prompt_set, self.variant, self.template = prompt_set, variant, template
        if prompt_set == "paper":
            self.descriptors = [] if variant == "no_dsm" else list(PAPER_DSM)
            self.system = "You are a biochemistry expert."
            names = template.property_names()[:6]
            self._paper_props = names
        else:
            if variant == "no_dsm":
                self.descriptors = []
            elif variant == "no_stage1":
                self.descriptors = list(DEFAULT_PROPERTY_SET)
            else:
                self.descriptors = template.descriptors()
            self.system = self._lardo_system()

    # -- lardo
    def _lardo_system(self) -> str:
        t = self.template
        head = (
            "You are an expert medicinal chemist. You write short, factual descriptions of molecules for a "
            "machine-learning dataset that pairs molecular graphs with text.\n\n"
        )
        if self.variant == "no_stage1":
            props = ", ".join(label_of(d) for d in DEFAULT_PROPERTY_SET)
            return head + (
                "Describe the molecule's physicochemical profile.\n\n"
                "Instructions:\n"
                f"- Write one line per property ({props}), formatted as '<Property>: <value> - <what it means>'.\n"
                "- Use the computed values given for the molecule exactly as written; never invent, round "
                "differently or recompute numbers.\n"
                "- End with one line 'Overall: <one sentence summarising the profile>'.\n"
                "- Plain text, no markdown, do not repeat the SMILES, at most 150 words."
            )
        value_rule = (
            "- Give your best estimate of each property from the structure."
            if self.variant == "no_dsm"
            else "- Use the computed values given for the molecule exactly as written; never invent, round "
            "differently or recompute numbers."
        )
        return head + (
            f"Task: {t.task_name} - {t.endpoint}.\n{t.description}\n\n"
            "Knowledge about the properties that matter for this endpoint:\n"
            + "\n".join(knowledge_lines(t))
            + "\n\nInstructions:\n"
            "- Write one line per property above, in that order, formatted as "
            "'<Property>: <value> - <what it implies for the endpoint>'.\n"
            f"{value_rule}\n"
            f"- End with one line 'Overall: <one sentence on the endpoint ({t.endpoint})>'.\n"
            "- Plain text, no markdown, do not repeat the SMILES, at most 150 words."
        )

    # -- paper
    def _paper_user(self, smiles: str, values: dict[str, float]) -> str:
        props = self._paper_props
        if self.variant == "no_stage1":
            text = f"<MOLECULE>: {smiles}\n"
            text += self._paper_dsm(values)
            return text + "Provide the concise information about <MOLECULE>:\n"
        text = f"<PROPERTIES>: {'; '.join(props)}\n<MOLECULE>: {smiles}\n"
        if self.variant == "full":
            text += self._paper_dsm(values)
        text += "Provide the concise information about <PROPERTIES> of <MOLECULE> in the following format:\n"
        return text + "\n".join(f"[{p}]: ..." for p in props)

    @staticmethod
    def _paper_dsm(values: dict[str, float]) -> str:
        # The release printed round(Crippen.MolLogP, 3) and round(MolWt, 1) with Python's str().
        logp, mw = values.get("MolLogP"), values.get("MolWt")
        logp_s = "not computable" if logp is None or math.isnan(logp) else str(round(float(logp), 3))
        mw_s = "not computable" if mw is None or math.isnan(mw) else f"{round(float(mw), 1)} g/mol"
        return f"LogP of <MOLECULE>: {logp_s}\nMolecular weight of <MOLECULE>: {mw_s}\n"

    def stage2(self, smiles: str, values: dict[str, float]) -> Messages:
        if self.prompt_set == "paper":
            user = self._paper_user(smiles, values)
        else:
            user = f"Molecule (SMILES): {smiles}\n"
            if self.descriptors:
                user += "Computed values (RDKit):\n" + "\n".join(
                    f"- {line}" for line in dsm_lines(self.descriptors, values)
                )
            else:
                user += "No computed values are available for this molecule."
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def render_plain(messages: Messages) -> str:
    """Fallback rendering for tokenizers without a chat template (e.g. tiny test models)."""
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"
