"""Parse and standardise one SMILES with RDKit. Bad input is data: a reason, never an exception."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from rdkit import Chem, RDLogger
from rdkit.Chem.MolStandardize import rdMolStandardize

RDLogger.DisableLog("rdApp.*")  # RDKit's stderr chatter for bad SMILES would flood worker logs

# Rejection reasons: a closed vocabulary, so summaries can count them.
EMPTY = "empty"
UNPARSABLE = "unparsable_smiles"
SANITIZE = "sanitization_failed"
NO_ATOMS = "no_atoms"
TOO_MANY_ATOMS = "too_many_atoms"
STANDARDISE = "standardisation_failed"
DUPLICATE = "duplicate"
REASONS = (EMPTY, UNPARSABLE, SANITIZE, NO_ATOMS, TOO_MANY_ATOMS, STANDARDISE, DUPLICATE)


@dataclass(frozen=True)
class Standardised:
    mol: Chem.Mol | None
    canonical: str | None
    mol_id: str | None
    reason: str | None = None
    detail: str | None = None


def mol_id_of(canonical_smiles: str) -> str:
    """Stable id: the same molecule gets the same id in every run and on every node."""
    return hashlib.blake2b(canonical_smiles.encode(), digest_size=8).hexdigest()


# Bumped whenever standardisation changes what a molecule becomes: saved models record it (their graphs
# and descriptors were computed from molecules standardised this way) and refuse another version.
STANDARDISER_VERSION = "1"


class Standardiser:
    """Sanitise, keep the largest organic fragment, neutralise, canonicalise.

    Built once per worker: the RDKit standardisation objects are not free to create.
    """

    def __init__(self, max_atoms: int = 200, keep_largest_fragment: bool = True, neutralize: bool = True):
        self.max_atoms = max_atoms
        self._chooser = rdMolStandardize.LargestFragmentChooser(preferOrganic=True) if keep_largest_fragment else None
        self._uncharger = rdMolStandardize.Uncharger() if neutralize else None

    def __call__(self, smiles: object) -> Standardised:
        if smiles is None or not isinstance(smiles, str) or not smiles.strip():
            return Standardised(None, None, None, EMPTY)
        text = smiles.strip()
        # A too-long string is rejected before parsing: RDKit would spend seconds on a 10 MB garbage line.
        if len(text) > 20 * self.max_atoms + 100:
            return Standardised(None, None, None, TOO_MANY_ATOMS, f"{len(text)} characters")
        mol = Chem.MolFromSmiles(text, sanitize=False)
        if mol is None:
            return Standardised(None, None, None, UNPARSABLE)
        try:
            Chem.SanitizeMol(mol)
        except Exception as e:  # noqa: BLE001 - RDKit raises several types; the message is the detail
            return Standardised(None, None, None, SANITIZE, str(e)[:200])
        if mol.GetNumAtoms() == 0:
            return Standardised(None, None, None, NO_ATOMS)
        try:
            if self._chooser is not None:
                mol = self._chooser.choose(mol)
            if self._uncharger is not None:
                mol = self._uncharger.uncharge(mol)
            canonical = Chem.MolToSmiles(mol)
            # Re-parse the canonical SMILES so every later stage sees exactly the molecule it would build itself.
            mol = Chem.MolFromSmiles(canonical)
        except Exception as e:  # noqa: BLE001
            return Standardised(None, None, None, STANDARDISE, str(e)[:200])
        if mol is None:
            return Standardised(None, None, None, STANDARDISE, "canonical SMILES does not re-parse")
        n_heavy = mol.GetNumHeavyAtoms()
        if n_heavy > self.max_atoms:
            return Standardised(None, None, None, TOO_MANY_ATOMS, f"{n_heavy} heavy atoms > {self.max_atoms}")
        if n_heavy == 0:
            return Standardised(None, None, None, NO_ATOMS)
        return Standardised(mol, canonical, mol_id_of(canonical))
