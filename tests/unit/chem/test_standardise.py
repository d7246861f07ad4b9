from __future__ import annotations

from rdkit import Chem

from lardo_ray.chem.standardise import Standardiser, mol_id_of
from tests.conftest import BAD_SMILES, GOOD_SMILES


def test_good_molecules_standardise():
    s = Standardiser()
    for smi in GOOD_SMILES:
        r = s(smi)
        assert r.reason is None, (smi, r)
        assert r.canonical == Chem.MolToSmiles(Chem.MolFromSmiles(r.canonical))
        assert r.mol_id == mol_id_of(r.canonical)
        assert "." not in r.canonical  # largest fragment kept


def test_salt_stripped_and_neutralised():
    s = Standardiser()
    assert s("[Na+].[O-]C(=O)c1ccccc1").canonical == "O=C(O)c1ccccc1"
    assert s("Cl.CCN(CC)CCNC(=O)c1ccc(N)cc1").canonical == Chem.MolToSmiles(Chem.MolFromSmiles("CCN(CC)CCNC(=O)c1ccc(N)cc1"))
    # A quaternary ammonium cannot be neutralised: its charge stays, balanced by the carboxylate.
    assert "+" in s("C[N+](C)(C)CC(=O)[O-]").canonical


def test_bad_inputs_are_reasons_not_exceptions():
    s = Standardiser(max_atoms=200)
    for smi, reason in BAD_SMILES.items():
        assert s(smi).reason == reason, smi
    assert s(None).reason == "empty"
    assert s(float("nan")).reason == "empty"


def test_mol_id_is_stable_and_same_for_same_molecule():
    s = Standardiser()
    a, b = s("OC(=O)c1ccccc1"), s("c1ccccc1C(O)=O")
    assert a.mol_id == b.mol_id == "%016x" % int(a.mol_id, 16)
    assert s("CCO").mol_id != s("CCN").mol_id
