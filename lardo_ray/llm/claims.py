"""Structural claims in a description, checked against RDKit truth for the molecule.

The numeric post-check (``postcheck.py``) compares property values with the DSM values of the prompt. The
claims a real LLM gets wrong are mostly structural: formulas, atom counts, functional groups that are not
there, ring counts, charges, stereocentres, compound classes ("a complex carbohydrate" for an amide). This
module computes those facts from the SMILES (``MoleculeFacts``) and finds and judges such claims:

==================  ====================================================================================
claim type          examples (true value from RDKit)
==================  ====================================================================================
formula             "molecular formula C16H21NO2", "(C2H2N2Cl4)"               CalcMolFormula, order-free
element_count       "3 nitrogen atoms", "two chlorines", "no sulfur", "a fluorine atom" (= at least one)
formal_charge       "a net charge of +1", "is neutral", "uncharged", "positively charged"
functional_group    "contains a carboxylic acid", "an amide group", "no hydroxyl groups", "two esters"
compound_class      "is a steroid", "a complex carbohydrate", "a peptide", "a beta-lactam", "an
                    organophosphorus compound", "a heterocycle", "an aromatic compound"
==================  ====================================================================================

(ring, aromatic-ring, heavy-atom, donor/acceptor, rotatable-bond and stereocentre counts are numeric-form
claims: ``postcheck.check`` reads them and takes their truth from these facts when the prompt had no DSM
value for them.)

Every claim found carries its type, the stated and the true value and a verdict: True (right), False (wrong)
or None (undecidable: a class no substructure decides, a group we have no pattern for). Undecidable claims
are counted as such, never as correct. The extractor is conservative (precision first): a phrasing it does
not know is missed rather than misread.

One module (~520 lines) on purpose: most of it is the claim tables (SMARTS per group and class, their
synonyms and plurals) next to the patterns that read them; bench/postcheck.py measures them as one unit.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------------------------------------- facts

ELEMENTS = {  # name (and synonyms) -> symbol
    "carbon": "C", "hydrogen": "H", "nitrogen": "N", "oxygen": "O", "sulfur": "S", "sulphur": "S",
    "fluorine": "F", "chlorine": "Cl", "bromine": "Br", "iodine": "I", "phosphorus": "P", "boron": "B",
    "silicon": "Si", "selenium": "Se", "sodium": "Na", "potassium": "K",
}
HALOGENS = ("F", "Cl", "Br", "I")

# functional group -> (names/synonyms (singular; plurals are derived), SMARTS). SMARTS from RDKit's
# FragmentDescriptors.csv (the fr_* descriptors the dsm stage computes) where one exists, so a group the
# description names and the fr_ count the DSM reports agree.
GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "hydroxyl": (("hydroxyl", "hydroxy", "alcohol", "oh"), "[OX2H][#6]"),
    "phenol": (("phenol", "phenolic hydroxyl", "phenolic"), "[OX2H]-c"),
    "carboxylic acid": (("carboxylic acid", "carboxyl", "carboxylate", "carboxy"), "[CX3](=O)[OX1H0-,OX2H1]"),
    "ester": (("ester",), "[#6][CX3](=O)[OX2H0][#6]"),
    "amide": (("amide", "carboxamide"), "C(=O)-N"),
    "lactam": (("lactam",), "[C;R](=O)[N;R]"),
    "beta-lactam": (("beta-lactam", "β-lactam", "beta lactam"), "N1C(=O)CC1"),
    "lactone": (("lactone",), "[C&R1](=O)[O&R1][C&R1]"),
    "ketone": (("ketone",), "[#6][CX3](=O)[#6]"),
    "aldehyde": (("aldehyde",), "[CX3H1](=O)[#6]"),
    "carbonyl": (("carbonyl",), "[CX3]=[OX1]"),
    "ether": (("ether",), "[OD2;!$(O-C=O)]([#6])[#6]"),
    "methoxy": (("methoxy",), "[OX2](-[#6])-[CH3]"),
    "amine": (("amine", "amino"), "[NX3;!$(N-[C,S,P]=[O,S,N]);!$(N-a);!$(N#*);!$(N=*);!$(N-N);!$(N-O)]"),
    "primary amine": (("primary amine",), "[NX3H2;!$(N-[C,S,P]=[O,S,N]);!$(N-a)]"),
    "aniline": (("aniline", "aromatic amine", "arylamine"), "c-[NX3;!$(N=*);!$(N-[C,S]=[O,S])]"),
    "quaternary ammonium": (("quaternary ammonium", "quaternary amine"), "[NX4+]"),
    "nitro": (("nitro",), "[$([NX3](=O)=O),$([NX3+](=O)[O-])][!#8]"),
    "nitrile": (("nitrile", "cyano"), "[NX1]#[CX2]"),
    "imine": (("imine",), "[CX3]=[NX2;!$(N-O);!$(N-N)]"),
    "oxime": (("oxime",), "[CX3]=[NX2]-[OX2]"),
    "hydrazine": (("hydrazine",), "[NX3]-[NX3]"),
    "hydrazone": (("hydrazone",), "C=N-[NX3]"),
    "azo": (("azo",), "[#6]-N=N-[#6]"),
    "azide": (("azide",), "[$(*-[NX2-]-[NX2+]#[NX1]),$(*-[NX2]=[NX2+]=[NX1-])]"),
    "urea": (("urea",), "[NX3]C(=O)[NX3]"),
    "carbamate": (("carbamate", "urethane"), "[NX3]C(=O)O[#6]"),
    "guanidine": (("guanidine", "guanidino"), "[NX3]C(=[NX2])[NX3]"),
    "amidine": (("amidine",), "C(=N)(-N)-[!#7]"),
    "imide": (("imide",), "N(-C(=O))-C=O"),
    "isocyanate": (("isocyanate",), "N=C=O"),
    "isothiocyanate": (("isothiocyanate",), "N=C=S"),
    "sulfonamide": (("sulfonamide", "sulphonamide"), "N-S(=,-[OX1;+0,-1])(=,-[OX1;+0,-1])-[#6]"),
    "sulfone": (("sulfone", "sulphone"), "[#6]S(=O)(=O)[#6]"),
    "sulfoxide": (("sulfoxide", "sulphoxide"), "[#6][SX3](=O)[#6]"),
    "sulfonic acid": (("sulfonic acid", "sulfonate", "sulphonate"), "S(=O)(=O)[OX2H1,OX1-]"),
    "thiol": (("thiol", "sulfhydryl", "mercapto"), "[SX2H]"),
    "thioether": (("thioether", "sulfide", "sulphide"), "[SX2](-[#6])-[#6]"),
    "thiocarbonyl": (("thiocarbonyl", "thione"), "C=[SX1]"),
    "halogen": (("halogen", "halide", "halo"), "[F,Cl,Br,I]"),
    "alkyl halide": (("alkyl halide", "haloalkane"), "[CX4]-[Cl,Br,I,F]"),
    "trifluoromethyl": (("trifluoromethyl", "cf3"), "C(F)(F)F"),
    "phosphate": (("phosphate", "phosphoric acid", "phosphate ester"), "P(=O)(O)(O)O"),
    "phosphonate": (("phosphonate",), "[#6]P(=O)(O)O"),
    "alkyne": (("alkyne", "acetylene"), "C#C"),
    "alkene": (("alkene", "olefin", "carbon-carbon double bond", "c=c double bond"), "C=C"),
    "epoxide": (("epoxide", "oxirane"), "C1OC1"),
    "benzene": (("benzene", "phenyl"), "c1ccccc1"),
    "pyridine": (("pyridine", "pyridyl"), "n1ccccc1"),
    "pyrimidine": (("pyrimidine",), "c1ncncc1"),
    "imidazole": (("imidazole",), "c1ncc[nH,n]1"),
    "pyrrole": (("pyrrole",), "c1cc[nH]c1"),
    "indole": (("indole",), "c1ccc2[nH]ccc2c1"),
    "furan": (("furan",), "o1cccc1"),
    "thiophene": (("thiophene",), "s1cccc1"),
    "thiazole": (("thiazole",), "c1scnc1"),
    "oxazole": (("oxazole",), "c1ocnc1"),
    "tetrazole": (("tetrazole",), "c1nnn[nH,n]1"),
    "piperidine": (("piperidine", "piperidinyl"), "N1CCCCC1"),
    "piperazine": (("piperazine", "piperazinyl"), "N1CCNCC1"),
    "morpholine": (("morpholine", "morpholino"), "O1CCNCC1"),
    "pyrrolidine": (("pyrrolidine",), "N1CCCC1"),
    "naphthalene": (("naphthalene", "naphthyl"), "c1ccc2ccccc2c1"),
    "quinoline": (("quinoline",), "c1ccc2ncccc2c1"),
}

# compound class -> (names, decision). A decision is a callable on the facts: True / False.
# Classes not in this table are undecidable.
_STEROID = "[#6]1~[#6]~[#6]~[#6]2~[#6](~[#6]~1)~[#6]~[#6]~[#6]1~[#6]~2~[#6]~[#6]~[#6]2~[#6]~[#6]~[#6]~[#6]~1~2"
_PYRANOSE = "[OX2;R1]1[CX4;R1][CX4;R1]([OX2])[CX4;R1]([OX2])[CX4;R1]([OX2])[CX4;R1]1"
_FURANOSE = "[OX2;R1]1[CX4;R1][CX4;R1]([OX2])[CX4;R1]([OX2])[CX4;R1]1"
_PEPTIDE = "[NX3][CX4][CX3](=O)[NX3][CX4][CX3](=O)"
_BENZODIAZEPINE = "c12ccccc1-,:[#6]~[#7]~[#6]~[#6]~[#7]~2"
_BETA_LACTAM = "N1C(=O)CC1"
_NUCLEOBASE = "[$(c1nc2c(n1)ncnc2),$(c1cn(cn1)),$(O=c1ccn([#6])c(=O)[nH]1),$(O=c1nc[nH]cc1)]"


@dataclass
class MoleculeFacts:
    """What RDKit says about one molecule (the one the description is about)."""

    smiles: str
    formula: str
    elements: dict[str, int]  # symbol -> count, hydrogens included
    heavy_atoms: int
    rings: int
    aromatic_rings: int
    hbd: int
    hba: int
    rotatable_bonds: int
    stereocentres: int
    formal_charge: int
    groups: dict[str, int]  # GROUPS name -> number of matches (0 = absent)
    classes: dict[str, bool] = field(default_factory=dict)  # CLASSES name -> decided by substructure

    def numeric(self) -> dict[str, float]:
        """The counts under the numeric post-check's descriptor names (RDKit's own descriptors)."""
        return {"RingCount": self.rings, "NumAromaticRings": self.aromatic_rings, "NumHDonors": self.hbd,
                "NumHAcceptors": self.hba, "NumRotatableBonds": self.rotatable_bonds,
                "NumStereoCenters": self.stereocentres, "HeavyAtomCount": self.heavy_atoms}


@functools.lru_cache(maxsize=None)
def _pattern(smarts: str):
    from rdkit import Chem

    p = Chem.MolFromSmarts(smarts)
    if p is None:  # pragma: no cover - a typo in the tables above
        raise ValueError(f"bad SMARTS {smarts!r}")
    return p


def _n(mol, smarts: str) -> int:
    return len(mol.GetSubstructMatches(_pattern(smarts)))


def _classes(mol, f: MoleculeFacts) -> dict[str, bool]:
    from rdkit.Chem import rdMolDescriptors

    el = f.elements
    hetero_ring = rdMolDescriptors.CalcNumHeterocycles(mol) > 0
    sugar = bool(_n(mol, _PYRANOSE) or _n(mol, _FURANOSE))
    return {
        "steroid": _n(mol, _STEROID) > 0,
        "carbohydrate": sugar,
        "peptide": _n(mol, _PEPTIDE) > 0,
        "beta-lactam": _n(mol, _BETA_LACTAM) > 0,
        "benzodiazepine": _n(mol, _BENZODIAZEPINE) > 0,
        "nucleoside": sugar and _n(mol, _NUCLEOBASE) > 0,
        "organophosphorus": el.get("P", 0) > 0,
        "organohalogen": any(el.get(h, 0) for h in HALOGENS),
        "heterocycle": hetero_ring,
        "aromatic": f.aromatic_rings > 0,
        "hydrocarbon": set(el) <= {"C", "H"},
        "amino acid": _n(mol, "[NX3;H2,H1][CX4][CX3](=O)[OX2H1,OX1-]") > 0,
    }


CLASSES: dict[str, tuple[str, ...]] = {  # class -> names as written (singular; plurals derived)
    "steroid": ("steroid", "steroidal compound", "sterol"),
    "carbohydrate": ("carbohydrate", "sugar", "saccharide", "monosaccharide", "polysaccharide", "glycoside"),
    "peptide": ("peptide", "polypeptide", "oligopeptide", "dipeptide", "tripeptide"),
    "beta-lactam": ("beta-lactam", "β-lactam", "beta-lactam antibiotic"),
    "benzodiazepine": ("benzodiazepine",),
    "nucleoside": ("nucleoside", "nucleotide"),
    "organophosphorus": ("organophosphorus compound", "organophosphate", "phosphonamidinium", "phosphonium",
                         "phosphonamide", "phosphonate", "phosphine"),
    "organohalogen": ("organohalogen", "halogenated compound", "organochlorine", "organofluorine"),
    "heterocycle": ("heterocycle", "heterocyclic compound"),
    "aromatic": ("aromatic compound",),
    "hydrocarbon": ("hydrocarbon",),
    "amino acid": ("amino acid",),
    # named but not decided by a substructure here: counted as undecidable, never as right
    "alkaloid": ("alkaloid",),
    "flavonoid": ("flavonoid",),
    "terpenoid": ("terpenoid", "terpene"),
    "natural product": ("natural product",),
    "antibiotic": ("antibiotic",),
    "opioid": ("opioid",),
    "prodrug": ("prodrug",),
}


@functools.lru_cache(maxsize=4096)
def facts(smiles: str) -> MoleculeFacts | None:
    """RDKit truth for ``smiles`` (None if RDKit cannot parse it)."""
    from rdkit import Chem
    from rdkit.Chem import Descriptors, Lipinski, rdMolDescriptors

    mol = Chem.MolFromSmiles(smiles) if smiles else None
    if mol is None:
        return None
    counts: Counter[str] = Counter()
    for a in mol.GetAtoms():
        counts[a.GetSymbol()] += 1
        counts["H"] += a.GetTotalNumHs()
    f = MoleculeFacts(
        smiles=smiles,
        formula=rdMolDescriptors.CalcMolFormula(mol),
        elements=dict(counts),
        heavy_atoms=mol.GetNumHeavyAtoms(),
        rings=rdMolDescriptors.CalcNumRings(mol),
        aromatic_rings=rdMolDescriptors.CalcNumAromaticRings(mol),
        hbd=Lipinski.NumHDonors(mol),
        hba=Lipinski.NumHAcceptors(mol),
        rotatable_bonds=Descriptors.NumRotatableBonds(mol),
        stereocentres=len(Chem.FindMolChiralCenters(mol, includeUnassigned=True, useLegacyImplementation=False)),
        formal_charge=Chem.GetFormalCharge(mol),
        groups={name: _n(mol, smarts) for name, (_, smarts) in GROUPS.items()},
    )
    f.classes = _classes(mol, f)
    return f


# ------------------------------------------------------------------------------------------- claims

@dataclass
class StructuralClaim:
    kind: str  # formula | element_count | formal_charge | functional_group | compound_class
    subject: str  # the element symbol, group or class name ("" for formula / charge)
    stated: Any  # what the text says (a formula string, a count, True/False for presence)
    true: Any  # what RDKit says (None when undecidable)
    ok: bool | None  # None: undecidable
    start: int
    end: int
    text: str


_WORD_NUMBERS = {"no": 0, "zero": 0, "none": 0, "one": 1, "a single": 1, "single": 1, "two": 2, "three": 3,
                 "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11,
                 "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
                 "eighteen": 18, "nineteen": 19, "twenty": 20, "a pair of": 2, "both": 2}
_ONE_OR_MORE = {"a", "an", "one or more", "several", "multiple", "some", "many", "various"}


def _plural(name: str) -> str:
    """A regex alternative for the singular and plural of ``name`` (its last word)."""
    head, _, last = name.rpartition(" ")
    esc = re.escape(last)
    if last.endswith(("y",)) and not last.endswith(("ey", "ay", "oy")):
        alt = f"(?:{esc}|{re.escape(last[:-1])}ies)"
    elif last.endswith(("s", "x", "ch", "sh")):
        alt = f"{esc}(?:es)?"
    else:
        alt = f"{esc}s?"
    return (re.escape(head) + r"[\s-]+" if head else "") + alt


def _names_re(table: dict[str, tuple[str, ...]]) -> tuple[re.Pattern, dict[str, str]]:
    alts: list[tuple[str, str]] = []
    for key, names in table.items():
        for n in names:
            alts.append((n, key))
    alts.sort(key=lambda p: len(p[0]), reverse=True)  # longest first: "primary amine" before "amine"
    index = {}
    parts = []
    for i, (n, key) in enumerate(alts):
        index[f"g{i}"] = key
        parts.append(f"(?P<g{i}>{_plural(n.lower())})")
    return re.compile(r"(?<![\w-])(?:" + "|".join(parts) + r")(?![\w-])", re.I), index


_GROUP_RE, _GROUP_KEYS = _names_re({k: v[0] for k, v in GROUPS.items()})
_CLASS_RE, _CLASS_KEYS = _names_re(CLASSES)
_ELEMENT_RE = re.compile(r"(?<![\w-])(" + "|".join(sorted(ELEMENTS, key=len, reverse=True)) +
                         r")(?:s)?(?:\s+atoms?)?(?![\w-])", re.I)
_QUANT = (r"(?P<q>\d+|" + "|".join(sorted((re.escape(w) for w in {**_WORD_NUMBERS, **dict.fromkeys(_ONE_OR_MORE)}),
                                         key=len, reverse=True)) + r")")
_HAS = (r"(?:contains?|containing|has|have|having|bears?|bearing|features?|featuring|possess(?:es)?|"
        r"possessing|includ(?:es?|ing)|with|carries|carrying|incorporat(?:es?|ing)|presents?|displays?|shows?|"
        r"exhibits?|comprises?|comprising)")
_NEG = r"(?:lacks?|lacking|without|devoid\s+of|free\s+of|absence\s+of|no|not\s+contain|does\s+not\s+(?:contain|have))"
_ADJ = r"(?:(?:\w+[- ]?)?(?:substituted|free|terminal|secondary|tertiary|aliphatic|aromatic|cyclic|phenolic|" \
       r"basic|acidic|polar|central|fused|additional|single|distinct|separate|reactive|functional|primary)\s+)*"
_GROUP_TAIL = r"(?:\s+(?:groups?|moiet(?:y|ies)|functionalit(?:y|ies)|functional\s+groups?|rings?|residues?|" \
              r"substituents?|units?|linkages?|bonds?))?"
_FORMULA_RE = re.compile(r"(?<![\w-])((?:(?:[A-Z][a-z]?)\d*){2,})(?:\s*[+-−]?\d*[+-−])?(?![\w])")
_CLAUSE_BREAK = re.compile(r"[.;:!?\n]|,\s+(?:but|while|whereas|and\s+(?:it|the))\b")


def _quant_value(q: str) -> int | None:
    """A quantifier word -> count, or None for 'at least one' ("a", "several")."""
    q = q.lower()
    if q.isdigit():
        return int(q)
    return _WORD_NUMBERS.get(q)


# element symbols (a static set: RDKit's periodic-table lookup prints a C++ stack trace for a non-element)
_SYMBOLS = set(
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr Rb Sr Y Zr "
    "Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir "
    "Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu".split())
_SMILES_NEIGHBOURS = set("()[]=#@/\\+%") | set("cnosp0123456789")


def _parse_formula(s: str) -> dict[str, int] | None:
    parts = re.findall(r"([A-Z][a-z]?)(\d*)", s)
    if "".join(a + b for a, b in parts) != s:
        return None
    out: Counter[str] = Counter()
    for sym, n in parts:
        if sym not in _SYMBOLS:
            return None
        out[sym] += int(n) if n else 1
    return dict(out)


def _formula_claims(text: str, f: MoleculeFacts) -> list[StructuralClaim]:
    out = []
    truth = _parse_formula(re.sub(r"[+-]\d*$", "", f.formula))
    for m in _FORMULA_RE.finditer(text):
        token = m.group(1)
        # inside a SMILES (or an LLM's pseudo-SMILES: "CC(C18H20FN3O4(C)CC"): no formula claim
        left = text[m.start(1) - 1] if m.start(1) else " "
        right = text[m.end()] if m.end() < len(text) else " "
        before_paren = text[m.start(1) - 2] if m.start(1) > 1 else " "
        in_parens = left == "(" and right == ")" and not before_paren.strip()  # " (C2H2N2Cl4)" is prose
        if not in_parens and (left in _SMILES_NEIGHBOURS or right in _SMILES_NEIGHBOURS):
            continue
        parsed = _parse_formula(token)
        # a formula starts with carbon and its count, names hydrogen, has three or more elements or a C count
        # above 1 ("CH3" is a methyl group, "NaCl", "CO", "SMILES", "MW", "N3CCN" are not formulas)
        if parsed is None or not re.match(r"C\d", token) or "H" not in parsed or len(parsed) < 3 and parsed["C"] < 2:
            continue
        ok = parsed == truth
        out.append(StructuralClaim("formula", "", token, f.formula, ok, m.start(1), m.end(1), token))
    return out


def _clause_before(text: str, start: int, limit: int = 60) -> str:
    left = text[max(0, start - limit):start]
    parts = _CLAUSE_BREAK.split(left)
    return parts[-1] if parts else left


def _element_claims(text: str, f: MoleculeFacts) -> list[StructuralClaim]:
    out = []
    for m in _ELEMENT_RE.finditer(text):
        name = m.group(1).lower()
        sym = ELEMENTS[name]
        before = _clause_before(text, m.start())
        # "<quantity> [adjective] <element> [atoms]" right before, e.g. "3 nitrogen atoms", "no sulfur"
        # the quantity is a word of its own: "sp3 carbons" states no count of carbons
        q = re.search(r"(?<![\w.-])" + _QUANT + r"\s+(?:(?:additional|basic|aromatic|aliphatic|heavy|total|ring)\s+)?$",
                      before, re.I)
        neg = re.search(r"(?:^|\s)" + _NEG + r"\s+(?:any\s+)?$", before, re.I)
        after = text[m.end():m.end() + 12]
        if re.match(r"[\s-]*(?:-?containing|substituent|substituted|atom\s+of|ated|ine)", after, re.I):
            continue  # "nitrogen-containing ring", "chlorine substituent": no count stated
        if not (q or neg):
            continue
        true = f.elements.get(sym, 0)
        if neg:
            stated: Any = 0
        else:
            v = _quant_value(q.group("q"))
            if v is None:  # "a chlorine atom", "several oxygens": at least one
                out.append(StructuralClaim("element_count", sym, ">=1", true, true >= 1, m.start(), m.end(),
                                           m.group(0)))
                continue
            stated = v
            if "atom" not in m.group(0).lower() and not re.match(r"\s+atoms?", after, re.I) and v > 0 \
                    and not m.group(0).lower().endswith("s"):
                continue  # "one nitrogen" without 'atom(s)' or a plural is too loose a claim to judge
        out.append(StructuralClaim("element_count", sym, stated, true, stated == true, m.start(), m.end(),
                                   m.group(0)))
    return out


_CHARGE_NUM = re.compile(r"(?:net|overall|total|formal)\s+(?:formal\s+)?charge\s+(?:of\s+|is\s+|=\s*|:\s*)?"
                         r"(?P<v>[+-−]?\s?\d+)(?!\.\d)", re.I)
_CHARGE_WORD = re.compile(r"(?<![\w-])(?P<w>(?:electrically\s+)?neutral|uncharged|zwitterion(?:ic)?|"
                          r"positively\s+charged|negatively\s+charged|(?:a\s+)?cation(?:ic)?|(?:an\s+)?anion(?:ic)?)"
                          r"(?:\s+(?:molecule|compound|species|overall|form))?(?![\w-])", re.I)


def _charge_claims(text: str, f: MoleculeFacts) -> list[StructuralClaim]:
    out = []
    q = f.formal_charge
    for m in _CHARGE_NUM.finditer(text):
        v = int(m.group("v").replace("−", "-").replace(" ", ""))
        out.append(StructuralClaim("formal_charge", "", v, q, v == q, m.start(), m.end(), m.group(0)))
    for m in _CHARGE_WORD.finditer(text):
        before = _clause_before(text, m.start(), 40).lower()
        if re.search(r"\b(?:ph|at\s+physiological|protonat|in\s+water|in\s+solution|can|may|could|would)\b", before):
            continue  # a statement about a state, not the structure
        if re.search(r"\b(?:hydrophob|polar|lipoph)", text[m.end():m.end() + 20], re.I):
            continue
        w = m.group("w").lower()
        if "neutral" in w or "uncharged" in w:
            stated, ok = 0, q == 0
        elif "zwitter" in w:
            continue  # needs both charges; the standardised parent is neutralised: undecidable here
        elif "positive" in w or "cation" in w:
            stated, ok = "+", q > 0
        else:
            stated, ok = "-", q < 0
        out.append(StructuralClaim("formal_charge", "", stated, q, ok, m.start(), m.end(), m.group(0)))
    return out


def _group_claims(text: str, f: MoleculeFacts) -> list[StructuralClaim]:
    out = []
    for m in _GROUP_RE.finditer(text):
        key = _GROUP_KEYS[m.lastgroup]
        tail = re.match(_GROUP_TAIL, text[m.end():], re.I)
        tail_text = tail.group(0) if tail else ""
        before = _clause_before(text, m.start())
        true = f.groups.get(key, 0)
        neg = re.search(r"(?:^|\s)" + _NEG + r"\s+(?:any\s+|an?\s+|a\s+single\s+)?(?:free\s+)?" + _ADJ + r"$",
                        before, re.I)
        q = re.search(r"(?:^|\s)" + _QUANT + r"\s+" + _ADJ + r"$", before, re.I)
        has = re.search(_HAS + r"\s+(?:\S+\s+){0,6}$", before, re.I)
        after = text[m.end() + len(tail_text):m.end() + len(tail_text) + 25]
        if re.match(r"[\s-]*(?:-?like|-?type|-?derived|-?based|analog|mimetic|isoster)", after, re.I):
            continue  # "amide-like", "a pyridine analogue": not a statement that the group is there
        if neg:
            out.append(StructuralClaim("functional_group", key, False, true > 0, true == 0, m.start(),
                                       m.end() + len(tail_text), text[m.start():m.end() + len(tail_text)]))
            continue
        if q and (has or tail_text):
            v = _quant_value(q.group("q"))
            if v is None:
                out.append(StructuralClaim("functional_group", key, True, true > 0, true > 0, m.start(),
                                           m.end() + len(tail_text), text[m.start():m.end() + len(tail_text)]))
            elif v == 0:
                out.append(StructuralClaim("functional_group", key, False, true > 0, true == 0, m.start(),
                                           m.end() + len(tail_text), text[m.start():m.end() + len(tail_text)]))
            else:
                # a stated number of groups: our SMARTS count what RDKit's fr_ count; exact match
                out.append(StructuralClaim("functional_group", key, v, true, v == true, m.start(),
                                           m.end() + len(tail_text), text[m.start():m.end() + len(tail_text)]))
            continue
        if has and tail_text:
            out.append(StructuralClaim("functional_group", key, True, true > 0, true > 0, m.start(),
                                       m.end() + len(tail_text), text[m.start():m.end() + len(tail_text)]))
            continue
        # "A nitrile group is present", "no hydroxyl groups are present", "an amide moiety is absent"
        there = re.match(r"\s+(?:is|are)\s+(?:also\s+)?(present|absent|missing)\b", after, re.I)
        lead = re.search(r"(?:^|\s)(an?|one|two|three|four|no|\d+)\s+" + _ADJ + r"$", before, re.I)
        if tail_text and there and lead:
            present = there.group(1).lower() == "present" and lead.group(1).lower() != "no"
            out.append(StructuralClaim("functional_group", key, present, true > 0, (true > 0) == present, m.start(),
                                       m.end() + len(tail_text), text[m.start():m.end() + len(tail_text)]))
    return out


_CLASS_LEAD = re.compile(r"(?:\bis|\bas|\bbeing|\bclassified\s+as|\bbelongs\s+to\s+the\s+class\s+of|\bis\s+one\s+of)"
                         r"\s+(?:a|an|the)?\s*(?:[\w-]+\s+){0,3}$", re.I)


def _class_claims(text: str, f: MoleculeFacts) -> list[StructuralClaim]:
    out = []
    for m in _CLASS_RE.finditer(text):
        key = _CLASS_KEYS[m.lastgroup]
        before = _clause_before(text, m.start(), 50)
        if not _CLASS_LEAD.search(before):
            continue
        if re.search(r"\b(?:not|no|neither|nor|never)\b", before, re.I):
            stated = False
        else:
            stated = True
        if re.search(r"\b(?:like|similar|related|analog|mimic|derived|resembl)", before + text[m.end():m.end() + 15],
                     re.I):
            continue  # "like a steroid", "a sugar-derived": no class statement
        true = f.classes.get(key)
        ok = None if true is None else (true == stated)
        out.append(StructuralClaim("compound_class", key, stated, true, ok, m.start(), m.end(), m.group(0)))
    return out


def structural_claims(text: str | None, smiles: str | None) -> list[StructuralClaim]:
    """Every structural claim found in ``text`` about the molecule ``smiles``, each judged (or undecidable)."""
    if not text or not smiles:
        return []
    f = facts(smiles)
    if f is None:
        return []
    claims = (_formula_claims(text, f) + _element_claims(text, f) + _charge_claims(text, f)
              + _group_claims(text, f) + _class_claims(text, f))
    claims.sort(key=lambda c: c.start)
    # one span, one claim: a group named inside a class phrase ("beta-lactam") counts once, as the class
    kept: list[StructuralClaim] = []
    for c in claims:
        if kept and c.start < kept[-1].end:
            continue
        kept.append(c)
    return kept
