from __future__ import annotations

import math

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import Descriptors

from lardo_ray.chem.descriptors import DescriptorCalculator, groups, registry, resolve_descriptor_names
from tests.conftest import GOOD_SMILES, SAMPLE


def test_registry_has_full_rdkit_set_and_extras():
    reg = registry()
    rdkit_names = [n for n, _ in Descriptors._descList]
    assert len(rdkit_names) >= 210
    assert list(reg)[: len(rdkit_names)] == rdkit_names
    for extra in ("LipinskiViolations", "LipinskiPass", "VeberPass", "NumStereoCenters", "qed", "fr_amide", "RingCount"):
        assert extra in reg
    g = groups()
    assert all(n.startswith("fr_") for n in g["fragments"]) and len(g["fragments"]) > 50
    assert set(g["stereo"]) >= {"NumStereoCenters", "NumStereoBonds"}


def test_resolve_names_groups_and_errors():
    assert resolve_descriptor_names(["MolLogP", "TPSA", "MolLogP"]) == ["MolLogP", "TPSA"]
    assert "fr_amide" in resolve_descriptor_names("fragments")
    with pytest.raises(KeyError, match="unknown descriptor 'NoSuch'"):
        resolve_descriptor_names(["NoSuch"])


def _sample_mols(n=150):
    smiles = [ln.strip() for ln in (SAMPLE / "zinc_sample.csv").read_text().splitlines()[1 : n + 1]] + GOOD_SMILES
    return [Chem.MolFromSmiles(s) for s in smiles]


def test_values_equal_calcmoldescriptors():
    mols = _sample_mols()
    calc = DescriptorCalculator("rdkit")
    values, errors = calc.compute(mols)
    for i, m in enumerate(mols):
        ref = Descriptors.CalcMolDescriptors(m)
        for j, name in enumerate(calc.names):
            r, v = ref[name], values[i, j]
            if r is None or (isinstance(r, float) and math.isnan(r)):
                assert math.isnan(v), (name, i)
            else:
                assert v == r, (name, i, v, r)  # exact, not approximately
    assert values.dtype == np.float64


def test_rule_flags_match_definitions():
    m = Chem.MolFromSmiles("CC(C)Cc1ccc(cc1)[C@@H](C)C(=O)O")
    calc = DescriptorCalculator(["LipinskiViolations", "LipinskiPass", "VeberPass", "NumStereoCenters"])
    v, _ = calc.compute([m])
    assert v[0].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_failing_calculator_gives_nan_and_note():
    calc = DescriptorCalculator(["MolLogP", "TPSA"])
    calc._fns[1] = lambda m: 1 / 0  # a calculator that fails for this molecule
    v, err = calc.compute([Chem.MolFromSmiles("CCO")])
    assert not math.isnan(v[0, 0]) and math.isnan(v[0, 1])
    assert "TPSA: ZeroDivisionError" in err[0]
