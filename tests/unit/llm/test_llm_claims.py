"""Structural claims against RDKit truth: what a real small LLM got wrong is caught, the truth passes."""

from __future__ import annotations

import pytest

from lardo_ray.llm.claims import facts, structural_claims
from lardo_ray.llm.postcheck import check, correct

PROPRANOLOL = "CC(C)NCC(O)COc1cccc2ccccc12"  # C16H21NO2: a secondary amine, an aryl ether, an alcohol
ACETANILIDE = "CC(=O)Nc1ccccc1"


def kinds(text, smiles=PROPRANOLOL):
    return [(c.kind, c.subject, c.ok) for c in structural_claims(text, smiles)]


def test_what_smollm2_wrote_is_caught():
    # SmolLM2-135M on propranolol: "It is a phosphonamidinium chloride (C2H2N2Cl4)"
    got = kinds("It is a phosphonamidinium chloride (C2H2N2Cl4).")
    assert ("formula", "", False) in got and ("compound_class", "organophosphorus", False) in got
    # ... and on an amide: "a complex carbohydrate"
    assert kinds("This compound is a complex carbohydrate.", ACETANILIDE) == [("compound_class", "carbohydrate",
                                                                                False)]


def test_true_statements_pass():
    text = ("Its molecular formula is C16H21NO2. It contains one nitrogen atom and two oxygen atoms, a hydroxyl "
            "group and a naphthalene ring, but no carboxylic acid groups. The molecule is neutral. It is an "
            "aromatic compound.")
    got = kinds(text)
    assert got and all(ok for _, _, ok in got), got
    assert {k for k, _, _ in got} == {"formula", "element_count", "functional_group", "formal_charge",
                                      "compound_class"}


@pytest.mark.parametrize("text,kind", [
    ("Its formula is C16H23NO2.", "formula"),
    ("It contains 3 nitrogen atoms.", "element_count"),
    ("There are two chlorine atoms.", "element_count"),
    ("It has a net charge of +1.", "formal_charge"),
    ("It is positively charged.", "formal_charge"),
    ("It bears a carboxylic acid group.", "functional_group"),
    ("It has no hydroxyl groups.", "functional_group"),
    ("It features two ether groups.", "functional_group"),
    ("A nitrile group is present.", "functional_group"),
    ("It is a steroid.", "compound_class"),
    ("It is a peptide.", "compound_class"),
])
def test_each_planted_error_is_flagged(text, kind):
    got = kinds(text)
    assert [(k, ok) for k, _, ok in got] == [(kind, False)], got


@pytest.mark.parametrize("text", [
    "A nitrogen-containing ring.",  # no count
    "The amide-like linker.",  # not the group
    "Like a steroid, it is rigid.",  # no class statement
    "At physiological pH it is positively charged.",  # a state, not the structure
    "Hydroxyl groups generally raise solubility.",  # general chemistry, not this molecule
])
def test_not_claims(text):
    assert kinds(text) == []


def test_undecidable_is_counted_apart_never_as_right():
    r = check("It is an alkaloid with a logP of 3.1.", {"MolLogP": 3.1}, smiles=PROPRANOLOL)
    assert r.n_claims == 1 and r.n_wrong == 0 and r.n_undecidable == 1
    assert r.by_kind() == {"numeric": [1, 0, 0], "compound_class": [0, 0, 1]}


def test_counts_take_rdkit_truth_and_formula_is_rewritten():
    f = facts(PROPRANOLOL)
    r = check("It has 4 rings and 1 stereocentre; formula C16H25NO2.", {}, smiles=PROPRANOLOL)
    assert {(d.kind, d.ok) for d in r.details} == {("ring_count", False), ("stereocentres", True)}
    assert [(c.kind, c.ok) for c in r.structural] == [("formula", False)]
    assert f.rings == 2 and f.stereocentres == 1
    fixed = correct("It has 4 rings and 1 stereocentre; formula C16H25NO2.", {}, smiles=PROPRANOLOL)
    assert fixed == "It has 2 rings and 1 stereocentre; formula C16H21NO2."
    assert check(fixed, {}, smiles=PROPRANOLOL).n_wrong == 0
