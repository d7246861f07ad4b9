"""The train / held-out split of pre-training: a stable hash of (seed, mol_id), the same on every worker and run.

Kept free of torch and Ray: Ray Data's read tasks run it, and a fresh task process importing torch +
torch_geometric costs seconds per epoch; the plain loop uses the same function, so both split alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np


def held_out_mask(mol_ids: Iterable[Any], fraction: float, seed: int = 0) -> np.ndarray:
    """True for the held-out rows (about ``fraction`` of them)."""
    mol_ids = list(mol_ids)
    if fraction <= 0:
        return np.zeros(len(mol_ids), dtype=bool)
    limit = int(fraction * 2**64)
    prefix = f"{seed}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + str(m).encode(), digest_size=8).digest(), "little") < limit
         for m in mol_ids),
        dtype=bool, count=len(mol_ids),
    )
