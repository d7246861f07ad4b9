"""Calibration: the LLM's property names mapped to DSM calculators (synonym table, registry names, fuzzy
matching), directions of opposite names inverted, thresholds converted to the calculators' units."""

from __future__ import annotations

import difflib
import re
from typing import Literal


from lardo_ray.llm.cards import TaskCard
from lardo_ray.llm.stage1.template import DroppedClaim, PropertyClaim, Template, TemplateProperty

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
    from lardo_ray.chem.descriptors import fragment_phrase, registry

    out: dict[str, list[str]] = {}
    for name in registry():
        text = fragment_phrase(name)
        if text:
            phrase = _norm(re.sub(r"\(.*?\)|,.*$|excluding.*$", "", text))
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


