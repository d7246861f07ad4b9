"""Train / valid / test splits as index arrays: Bemis-Murcko scaffold (two variants), random, column.

``scaffold`` — deterministic, as deepchem's ScaffoldSplitter and MolCLR / pretrain-gnns: molecules are
grouped by their Bemis-Murcko scaffold (RDKit ``MurckoScaffoldSmiles``, ``includeChirality=False``; an
acyclic molecule has the scaffold "" and all of them share one group), groups are sorted by
(size, smallest index) descending, and filled greedily: a group goes to train unless train would exceed
80 % of the molecules, then to valid unless train+valid would exceed 90 %, else to test. The split does not
depend on the seed: the same molecules are in test for every run (only the model init changes).

``scaffold_balanced`` — chemprop / KANO ``scaffold_split(balanced=True)``: groups larger than half the
valid or half the test size are "big" and come first, each list shuffled with ``random.Random(seed)``; a
group goes to train if it fits within 80 %, else to valid if it fits within 10 %, else to test. A new split
per seed.

Either way no scaffold is ever in two parts. Index arrays are returned sorted ascending.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

SPLITS = ("scaffold", "scaffold_balanced", "random", "column")
_COLUMN_VALUES = {
    "train": "train", "training": "train",
    "valid": "valid", "val": "valid", "validation": "valid", "dev": "valid",
    "test": "test", "testing": "test",
}  # fmt: skip


class Split(NamedTuple):
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def sizes(self) -> tuple[int, int, int]:
        return len(self.train), len(self.valid), len(self.test)

    def fractions(self) -> tuple[float, float, float]:
        n = max(sum(self.sizes()), 1)
        return tuple(x / n for x in self.sizes())  # type: ignore[return-value]


def _as_split(train, valid, test) -> Split:
    return Split(*(np.asarray(sorted(p), dtype=np.int64) for p in (train, valid, test)))


def _check_sizes(sizes: Sequence[float]) -> tuple[float, float, float]:
    if len(sizes) != 3 or any(s < 0 for s in sizes) or abs(sum(sizes) - 1.0) > 1e-6:
        raise ValueError(f"sizes must be three non-negative fractions summing to 1, got {list(sizes)}")
    return float(sizes[0]), float(sizes[1]), float(sizes[2])


def murcko_scaffold(smiles_or_mol, include_chirality: bool = False) -> str:
    """Bemis-Murcko scaffold SMILES ("" for an acyclic molecule), as deepchem's ``_generate_scaffold``."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Scaffolds import MurckoScaffold

    mol = smiles_or_mol
    if isinstance(smiles_or_mol, str):
        RDLogger.DisableLog("rdApp.*")
        mol = Chem.MolFromSmiles(smiles_or_mol)
    if mol is None:
        raise ValueError(f"RDKit cannot parse {str(smiles_or_mol)[:80]!r}: drop it before splitting (load_task does)")
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=include_chirality)


def compute_scaffolds(smiles: Sequence, include_chirality: bool = False) -> list[str]:
    """One scaffold per molecule (compute once, pass as ``scaffolds=`` to split several seeds)."""
    return [murcko_scaffold(s, include_chirality) for s in smiles]


def scaffold_groups(scaffolds: Sequence[str]) -> dict[str, list[int]]:
    """scaffold -> ascending indices, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(scaffolds):
        groups.setdefault(s, []).append(i)
    return groups


def _scaffolds(smiles: Sequence | None, scaffolds: Sequence[str] | None) -> Sequence[str]:
    if scaffolds is not None:
        if smiles is not None and len(smiles) != len(scaffolds):
            raise ValueError(f"{len(scaffolds)} scaffolds for {len(smiles)} molecules")
        return scaffolds
    if smiles is None:
        raise ValueError("give smiles or scaffolds")
    return compute_scaffolds(smiles)


def scaffold_split(
    smiles: Sequence | None,
    sizes: Sequence[float] = (0.8, 0.1, 0.1),
    *,
    scaffolds: Sequence[str] | None = None,
) -> Split:
    """Deterministic scaffold split (deepchem ``ScaffoldSplitter`` / MolCLR / pretrain-gnns)."""
    f_train, f_valid, _ = _check_sizes(sizes)
    scafs = _scaffolds(smiles, scaffolds)
    n = len(scafs)
    groups = scaffold_groups(scafs)
    # deepchem: sorted(key=(len, first index), reverse=True) -> bigger first; equal sizes: later first index first
    ordered = sorted(groups.values(), key=lambda g: (len(g), g[0]), reverse=True)
    train_cutoff, valid_cutoff = f_train * n, (f_train + f_valid) * n
    train: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    for g in ordered:
        if len(train) + len(g) > train_cutoff:
            if len(train) + len(valid) + len(g) > valid_cutoff:
                test += g
            else:
                valid += g
        else:
            train += g
    return _as_split(train, valid, test)


def scaffold_balanced_split(
    smiles: Sequence | None,
    sizes: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    scaffolds: Sequence[str] | None = None,
) -> Split:
    """Balanced scaffold split (chemprop / KANO ``scaffold_split(balanced=True, seed=seed)``)."""
    f_train, f_valid, f_test = _check_sizes(sizes)
    scafs = _scaffolds(smiles, scaffolds)
    n = len(scafs)
    train_size, valid_size, test_size = f_train * n, f_valid * n, f_test * n
    big: list[list[int]] = []
    small: list[list[int]] = []
    for g in scaffold_groups(scafs).values():
        (big if len(g) > valid_size / 2 or len(g) > test_size / 2 else small).append(g)
    rng = _random.Random(seed)
    rng.shuffle(big)
    rng.shuffle(small)
    train: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    for g in big + small:
        if len(train) + len(g) <= train_size:
            train += g
        elif len(valid) + len(g) <= valid_size:
            valid += g
        else:
            test += g
    return _as_split(train, valid, test)


def random_split(n: int, sizes: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """Seeded random split: int(0.8 n) train, int(0.9 n) - int(0.8 n) valid, the rest test."""
    f_train, f_valid, _ = _check_sizes(sizes)
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(f_train * n), int((f_train + f_valid) * n)
    return _as_split(perm[:a].tolist(), perm[a:b].tolist(), perm[b:].tolist())


def column_split(values: Sequence) -> Split:
    """Split from a column: train / valid / test per row (also val, validation, dev, training, testing)."""
    parts: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    bad: list[str] = []
    for i, v in enumerate(values):
        key = _COLUMN_VALUES.get(str(v).strip().lower()) if v is not None else None
        if key is None:
            if len(bad) < 5:
                bad.append(repr(v))
            continue
        parts[key].append(i)
    if bad:
        raise ValueError(f"split column values must be train / valid / test; found {', '.join(bad)}")
    if not parts["train"]:
        raise ValueError("split column: no row is marked train")
    return _as_split(parts["train"], parts["valid"], parts["test"])


def make_split(
    method: str,
    smiles: Sequence,
    sizes: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    split_values: Sequence | None = None,
    scaffolds: Sequence[str] | None = None,
) -> Split:
    """One entry point for the fine-tune stage: ``make_split(cfg.split, data.smiles, cfg.split_sizes, seed,
    split_values=data.split_values)``."""
    if method == "scaffold":
        return scaffold_split(smiles, sizes, scaffolds=scaffolds)
    if method == "scaffold_balanced":
        return scaffold_balanced_split(smiles, sizes, seed, scaffolds=scaffolds)
    if method == "random":
        return random_split(len(smiles), sizes, seed)
    if method == "column":
        if split_values is None:
            raise ValueError("split=column needs the split column's values (finetune.split_column)")
        if len(split_values) != len(smiles):
            raise ValueError(f"{len(split_values)} split values for {len(smiles)} molecules")
        return column_split(split_values)
    raise ValueError(f"unknown split {method!r}; one of {', '.join(SPLITS)}")


def describe_split(method: str, sizes: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """Human words for a split, for table titles and logs."""
    pct = "/".join(f"{round(100 * s):g}" for s in sizes)
    return {
        "scaffold": f"deterministic Bemis-Murcko scaffold split {pct} (deepchem/MolCLR; same split every seed)",
        "scaffold_balanced": f"balanced Bemis-Murcko scaffold split {pct} (chemprop/KANO; a new split per seed)",
        "random": f"random split {pct} (a new split per seed)",
        "column": "split given by a column of the data file",
    }.get(method, str(method))
