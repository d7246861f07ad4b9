"""The DSM registry: every calculator a DSM (RDKit) can compute exactly, by name.

Names are RDKit's own (``MolLogP``, ``TPSA``, ``fr_amide`` ...) plus a few derived rule flags and counts.
Groups (``rdkit``, ``fragments``, ``rules``, ``rings``, ``stereo``, ``qed``, ``all``) expand to names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from rdkit import Chem
from rdkit.Chem import Descriptors, rdMolDescriptors


@dataclass(frozen=True)
class Calculator:
    name: str
    fn: Callable[[Chem.Mol], float]
    group: str
    description: str = ""
    unit: str = ""


def _lipinski_violations(m: Chem.Mol) -> float:
    return float(
        (Descriptors.MolWt(m) > 500)
        + (Descriptors.MolLogP(m) > 5)
        + (rdMolDescriptors.CalcNumLipinskiHBD(m) > 5)
        + (rdMolDescriptors.CalcNumLipinskiHBA(m) > 10)
    )


def _veber_pass(m: Chem.Mol) -> float:
    return float(rdMolDescriptors.CalcNumRotatableBonds(m) <= 10 and rdMolDescriptors.CalcTPSA(m) <= 140)


def _stereo_centers(m: Chem.Mol) -> float:
    return float(len(Chem.FindMolChiralCenters(m, includeUnassigned=True, useLegacyImplementation=False)))


def _unassigned_stereo_centers(m: Chem.Mol) -> float:
    centers = Chem.FindMolChiralCenters(m, includeUnassigned=True, useLegacyImplementation=False)
    return float(sum(1 for _, label in centers if label == "?"))


def _stereo_bonds(m: Chem.Mol) -> float:
    return float(sum(1 for b in m.GetBonds() if b.GetStereo() != Chem.BondStereo.STEREONONE))


_UNITS = {"MolWt": "g/mol", "HeavyAtomMolWt": "g/mol", "ExactMolWt": "g/mol", "TPSA": "Å²", "LabuteASA": "Å²"}

_RING_NAMES = {
    "RingCount", "NumAromaticRings", "NumAliphaticRings", "NumSaturatedRings", "NumAromaticCarbocycles",
    "NumAromaticHeterocycles", "NumAliphaticCarbocycles", "NumAliphaticHeterocycles",
    "NumSaturatedCarbocycles", "NumSaturatedHeterocycles", "NumSpiroAtoms", "NumBridgeheadAtoms",
}
_RULE_NAMES = {"MolWt", "MolLogP", "NumHDonors", "NumHAcceptors", "NumRotatableBonds", "TPSA"}


def _group_of(name: str) -> str:
    if name.startswith("fr_"):
        return "fragments"
    if name == "qed":
        return "qed"
    if name in _RING_NAMES:
        return "rings"
    return "rdkit"


@lru_cache(maxsize=1)
def registry() -> dict[str, Calculator]:
    """Ordered name -> calculator. RDKit's list first, in RDKit's order, so columns match CalcMolDescriptors."""
    reg: dict[str, Calculator] = {}
    for name, fn in Descriptors._descList:
        reg[name] = Calculator(name, fn, _group_of(name), unit=_UNITS.get(name, ""))
    extras = [
        Calculator("LipinskiViolations", _lipinski_violations, "rules", "Lipinski rule-of-five violations (0-4)"),
        Calculator("LipinskiPass", lambda m: float(_lipinski_violations(m) <= 1), "rules",
                   "1 if at most one rule-of-five violation"),
        Calculator("VeberPass", _veber_pass, "rules", "1 if rotatable bonds <= 10 and TPSA <= 140"),
        Calculator("NumStereoCenters", _stereo_centers, "stereo", "tetrahedral stereocentres, assigned or not"),
        Calculator("NumUnassignedStereoCenters", _unassigned_stereo_centers, "stereo"),
        Calculator("NumStereoBonds", _stereo_bonds, "stereo", "double bonds with defined stereo"),
    ]
    for c in extras:
        reg[c.name] = c
    return reg


def fragment_phrase(name: str) -> str | None:
    """What an ``fr_*`` calculator counts, from RDKit's docstring: 'Number of aliphatic carboxylic acids' ->
    'aliphatic carboxylic acids'; None for other calculators or an unexpected docstring. The one reader of
    those docstrings (prompt labels and stage 1's synonyms both use it)."""
    calc = registry().get(name) if name.startswith("fr_") else None
    if calc is None:
        return None
    first = ((getattr(calc.fn, "__doc__", None) or "").strip().splitlines() or [""])[0]
    if not first.lower().startswith("number of "):
        return None
    return first[len("number of "):].strip().rstrip(".") or None


def groups() -> dict[str, list[str]]:
    reg = registry()
    out: dict[str, list[str]] = {"all": list(reg)}
    out["rdkit"] = [n for n, _ in Descriptors._descList]
    for c in reg.values():
        if c.group != "rdkit":
            out.setdefault(c.group, []).append(c.name)
    out["rules"] = sorted(_RULE_NAMES) + out.get("rules", [])
    return out


def resolve_descriptor_names(names: Iterable[str] | str) -> list[str]:
    """Expand groups, validate names, keep order, drop repeats. Unknown names raise KeyError listing choices."""
    if isinstance(names, str):
        names = [names]
    reg, grp = registry(), groups()
    out: list[str] = []
    for n in names:
        expanded = grp.get(n, [n])
        for e in expanded:
            if e not in reg:
                close = [k for k in reg if k.lower() == e.lower()]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise KeyError(
                    f"unknown descriptor {e!r}{hint}; groups: {sorted(grp)}; "
                    f"see `lardo-ray dsm --list-descriptors` for the {len(reg)} names"
                )
            if e not in out:
                out.append(e)
    return out


class DescriptorCalculator:
    """Computes the chosen descriptors for a list of RDKit molecules.

    Like ``Descriptors.CalcMolDescriptors`` it catches a calculator's failure and yields NaN, but it also
    records which calculators failed, so a row can say why a value is missing.
    """

    def __init__(self, names: Iterable[str] | str = "all"):
        self.names = resolve_descriptor_names(names)
        reg = registry()
        self._fns = [reg[n].fn for n in self.names]

    def compute_into(self, mol: Chem.Mol, row: np.ndarray) -> str | None:
        """Fill ``row`` (pre-set to NaN) for one molecule; return a note of failed calculators, if any."""
        failed = None
        for j, fn in enumerate(self._fns):
            try:
                v = fn(mol)
                row[j] = v if v is not None else math.nan
            except Exception as e:  # noqa: BLE001 - one bad calculator must not lose the molecule
                failed = (failed or []) + [f"{self.names[j]}: {type(e).__name__}: {str(e)[:80]}"]
        return "; ".join(failed) if failed else None

    def compute(self, mols: list[Chem.Mol]) -> tuple[np.ndarray, list[str | None]]:
        values = np.full((len(mols), len(self.names)), np.nan, dtype=np.float64)
        errors = [self.compute_into(m, values[i]) for i, m in enumerate(mols)]
        return values, errors
