"""Shared fixtures. Small inputs are built here, in the test, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "lardo_ray" / "data"
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A few real molecules with salts, charges, stereo and aromatics, plus the bad rows every stage must survive.
GOOD_SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O",  # aspirin
    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",  # caffeine
    "[Na+].[O-]C(=O)c1ccccc1",  # sodium benzoate -> benzoic acid
    "C[C@H](N)C(=O)O",  # L-alanine
    "CC(C)Cc1ccc(cc1)[C@@H](C)C(=O)O",  # ibuprofen
    "c1ccc2c(c1)cc1ccc3cccc4ccc2c1c34",  # benzo[a]pyrene
    "C/C=C/C(=O)O",  # crotonic acid
    "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O",  # glucose
    "Cl.CCN(CC)CCNC(=O)c1ccc(N)cc1",  # procainamide HCl
    "C[N+](C)(C)CC(=O)[O-]",  # betaine (zwitterion)
]
BAD_SMILES = {
    "": "empty",
    "C1CC": "unparsable_smiles",
    "not a molecule": "unparsable_smiles",
    "☃☃☃ 💥": "unparsable_smiles",
    "C(C)(C)(C)(C)C": "sanitization_failed",  # pentavalent carbon
    "c1cccc1": "sanitization_failed",  # cannot kekulize
    "C" * 2000: "too_many_atoms",
}


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE
