"""Stage 1: tolerant parsing of the LLM's answer, calibration to DSM calculators, the template and its cache."""

from __future__ import annotations

import json

import pytest

from lardo_ray.llm.cards import load_card
from lardo_ray.llm.stage1 import (
    PropertyClaim,
    Template,
    build_template,
    calibrate,
    default_template,
    generic_template,
    map_property,
    parse_stage1_answer,
)


def names(claims):
    return [c.property for c in claims]


# ------------------------------------------------------------------------------------------- parsing

MALFORMED = [
    # 1. JSON inside a code fence, with a trailing comma
    ('Here you go:\n```json\n[{"property": "logP", "direction": "higher", "threshold": "1 to 3", '
     '"rationale": "x"},\n {"property": "TPSA", "direction": "lower", "threshold": "< 90"},]\n```\nHope it helps!',
     ["logP", "TPSA"]),
    # 2. Python-style single quotes and None
    ("Sure! [{'property': 'Molecular weight', 'direction': 'lower', 'threshold': None}, "
     "{'property': 'H-bond donors', 'direction': 'decrease'}]", ["Molecular weight", "H-bond donors"]),
    # 3. JSON buried in prose, wrapped in an object under "properties", other key names
    ('The answer is {"properties": [{"name": "Fsp3", "effect": "positive"}, {"name": "aromatic rings", '
     '"impact": "negative"}]} as requested.', ["Fsp3", "aromatic rings"]),
    # 4. truncated at max_tokens in the middle of the second object
    ('[{"property": "lipophilicity", "direction": "higher"}, {"property": "polar surface area", "direction": "lo',
     ["lipophilicity"]),
    # 5. unquoted keys (JS object literal)
    ('[{property: "rotatable bonds", direction: "lower", rationale: "flexibility"}]', ["rotatable bonds"]),
    # 6. numbered markdown list of free text
    ("1. **Lipophilicity (logP)**: higher logP increases penetration\n"
     "2. **Polar surface area** - should be below 90\n3. Metabolic stability: important",
     ["Lipophilicity (logP)", "Polar surface area", "Metabolic stability"]),
    # 7. the paper's "<PROPERTIES>: a; b; c" summary line
    ("<PROPERTIES>: Lipophilicity; Molecular weight; Hydrogen bond donors and acceptors; Metabolic stability",
     ["Lipophilicity", "Molecular weight", "Hydrogen bond donors and acceptors", "Metabolic stability"]),
    # 8. bullets with brackets, as the paper's stage-2 format
    ("- [Lipophilicity]: moderate\n- [Molecular weight]: small", ["Lipophilicity", "Molecular weight"]),
    # 9. prose only: known property names are picked up
    ("The most relevant are lipophilicity and the polar surface area. Molecular weight matters too.",
     ["lipophilicity", "polar surface area", "molecular weight"]),
    # 10. a dict keyed by property name, smart quotes
    ("{“logP”: “higher is better”, “TPSA”: {“direction”: “lower”}}", ["logP", "TPSA"]),
    # 11. a JSON list of plain strings
    ('["logP", "molecular weight", "logP"]', ["logP", "molecular weight"]),
]


@pytest.mark.parametrize("text,expected", MALFORMED, ids=[f"case{i + 1}" for i in range(len(MALFORMED))])
def test_parse_malformed_answers(text, expected):
    assert names(parse_stage1_answer(text)) == expected


@pytest.mark.parametrize("text", ["", "   ", None, "I cannot help with that.", "[1, 2, 3]", "{}"])
def test_parse_nothing_usable(text):
    assert parse_stage1_answer(text) == []


def test_parse_keeps_direction_and_threshold():
    claims = parse_stage1_answer(MALFORMED[0][0])
    assert claims[0].direction == "higher" and claims[0].threshold == "1 to 3"
    assert claims[1].direction == "lower" and claims[1].threshold == "< 90"
    free = parse_stage1_answer(MALFORMED[5][0])
    assert free[0].direction == "higher"
    assert free[1].threshold == "below 90" and free[1].direction == "lower"


# ------------------------------------------------------------------------------------------- calibration

@pytest.mark.parametrize(
    "name,expected",
    [
        ("logP", ["MolLogP"]), ("Lipophilicity", ["MolLogP"]), ("octanol-water partition coefficient", ["MolLogP"]),
        ("cLogP", ["MolLogP"]), ("Polar surface area (PSA)", ["TPSA"]), ("TPSA", ["TPSA"]),
        ("Molecular weight (MW)", ["MolWt"]), ("MW", ["MolWt"]), ("molar mass", ["MolWt"]),
        ("H-bond donors", ["NumHDonors"]), ("Number of hydrogen bond acceptors", ["NumHAcceptors"]),
        ("Hydrogen bond donors and acceptors", ["NumHDonors", "NumHAcceptors"]),
        ("Rotatable bonds", ["NumRotatableBonds"]), ("molecular flexibility", ["NumRotatableBonds"]),
        ("Aromatic rings", ["NumAromaticRings"]), ("heavy atom count", ["HeavyAtomCount"]),
        ("Fraction sp3 (Fsp3)", ["FractionCSP3"]), ("partial charge", ["MaxAbsPartialCharge"]),
        ("QED", ["qed"]), ("drug-likeness", ["qed"]), ("molar refractivity", ["MolMR"]),
        ("halogens", ["fr_halogen"]), ("nitriles", ["fr_nitrile"]), ("stereocenters", ["NumStereoCenters"]),
        ("Lipinski's rule of five", ["LipinskiViolations"]), ("MolLogP", ["MolLogP"]),
        ("lipophilicty", ["MolLogP"]),  # typo -> fuzzy
        ("molecular wieght", ["MolWt"]),  # typo -> fuzzy
    ],
)
def test_map_property(name, expected):
    ds, kind, reason = map_property(name)
    assert ds == expected, (name, ds, kind, reason)
    assert reason is None


@pytest.mark.parametrize("name", ["Metabolic stability", "pKa", "formal charge", "Solubility", "toxicity", "Shape"])
def test_map_property_unmappable(name):
    ds, _, reason = map_property(name)
    assert ds == [] and reason


def test_calibrate_drops_and_reports():
    card = load_card("bbbp")
    claims = parse_stage1_answer(MALFORMED[6][0])
    tpl = calibrate(claims, card, prompt_set="paper", model="m")
    assert [p.descriptors for p in tpl.properties] == [["MolLogP"], ["MolWt"], ["NumHDonors", "NumHAcceptors"]]
    assert [d.property for d in tpl.dropped] == ["Metabolic stability"]
    assert "not computable" in tpl.dropped[0].reason
    # the paper's <PROPERTIES> keep the answer's order, dropped ones included
    assert tpl.property_names() == ["Lipophilicity", "Molecular weight", "Hydrogen bond donors and acceptors",
                                    "Metabolic stability"]
    # a descriptor claimed twice is kept once
    dup = calibrate([PropertyClaim(property="logP"), PropertyClaim(property="lipophilicity")], card)
    assert len(dup.properties) == 1 and "duplicate" in dup.dropped[0].reason


def test_calibrate_keeps_knowledge():
    claims = [PropertyClaim(property="TPSA", direction="lower", threshold="< 90 Å²", rationale="polarity")]
    p = calibrate(claims, load_card("bbbp")).properties[0]
    assert (p.direction, p.threshold, p.rationale, p.match) == ("lower", "< 90 Å²", "polarity", "exact")


# ------------------------------------------------------------------------------------------- template

def test_template_hash_stable(tmp_path):
    card = load_card("bbbp")
    claims = parse_stage1_answer(MALFORMED[0][0])
    a = calibrate(claims, card, model="model-a")
    b = calibrate(claims, card, model="model-b")
    assert a.template_id == b.template_id  # model, time, raw answer are not content
    assert a.template_id.startswith("tpl-") and a.template_id == a.compute_id()
    c = calibrate(claims[:1], card)
    assert c.template_id != a.template_id
    path = a.save(tmp_path / "t.json")
    loaded = Template.load(path)
    assert loaded.template_id == a.template_id and loaded == a
    data = json.loads(path.read_text())
    assert data["format"] == "lardo_ray.template" and data["version"] == 1
    data["properties"][0]["threshold"] = "edited"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match"):
        Template.load(path)
    assert default_template(card).template_id == default_template(load_card("BBB")).template_id
    # a pinned value: the hash must not drift between runs, Python versions or machines
    pinned = calibrate([PropertyClaim(property="logP", direction="higher", threshold="1 to 3", rationale="r"),
                        PropertyClaim(property="pKa")], None, prompt_set="lardo")
    assert pinned.template_id == "tpl-f022f8cb1d8d0198"


def test_default_and_generic_templates():
    card = load_card("esol")
    d = default_template(card)
    assert d.source == "card_default" and d.descriptors()[0] == "MolLogP"
    g = generic_template()
    assert g.source == "generic" and "TPSA" in g.descriptors()


def test_build_template_retries_then_succeeds(tmp_path):
    answers = iter(["I don't know.", '[{"property": "logP", "direction": "higher"}]'])
    calls = []

    def fn(messages):
        calls.append(messages)
        return next(answers)

    card = load_card("bbbp")
    tpl = build_template(card, fn, prompt_set="lardo", max_retries=2, model="fake", cache_dir=tmp_path)
    assert len(calls) == 2 and tpl.source == "llm" and tpl.attempts == 2
    assert tpl.descriptors() == ["MolLogP"]
    # cached: no further LLM call, same id
    again = build_template(card, lambda m: pytest.fail("should come from the cache"), model="fake",
                           cache_dir=tmp_path)
    assert again.template_id == tpl.template_id
    # another model is another cache entry
    other = build_template(card, lambda m: '["TPSA"]', model="other", cache_dir=tmp_path)
    assert other.descriptors() == ["TPSA"]


def test_build_template_falls_back_and_records_why(tmp_path):
    def broken(messages):
        raise ConnectionError("endpoint down")

    card = load_card("bbbp")
    tpl = build_template(card, broken, max_retries=1, cache_dir=tmp_path)
    assert tpl.source == "card_default" and "ConnectionError" in tpl.fallback_reason
    assert tpl.template_id == default_template(card).template_id
    assert not list(tmp_path.iterdir())  # fallbacks are not cached
    unmapped = build_template(card, lambda m: '["metabolic stability", "toxicity"]', max_retries=0)
    assert unmapped.source == "card_default" and "maps to a DSM" in unmapped.fallback_reason
    assert build_template(card, None).source == "card_default"  # no LLM (rules backend)


def test_review_fixes_opposites_units_logd_and_pka():
    """Stage-1 review findings, each failing before: the opposite of a descriptor flips the direction, a
    threshold is converted to the descriptor's units, logD and pKa are not silently mapped."""
    from lardo_ray.llm.stage1 import PropertyClaim, calibrate, map_property

    tpl = calibrate([
        PropertyClaim(property="hydrophilicity", direction="higher", threshold="> 2"),
        PropertyClaim(property="rigidity", direction="higher"),
        PropertyClaim(property="Lipinski compliance", direction="higher"),
        PropertyClaim(property="molecular weight", direction="lower", threshold="< 0.5 kDa"),
        PropertyClaim(property="Fsp3", direction="higher", threshold="> 40 %"),
        PropertyClaim(property="logD at pH 7.4", direction="range", threshold="1 to 3"),
        PropertyClaim(property="pKa of the basic amine", direction="lower"),
    ])
    by = {p.descriptors[0]: p for p in tpl.properties}
    assert by["MolLogP"].direction == "lower" and by["MolLogP"].threshold is None
    assert by["NumRotatableBonds"].direction == "lower"
    assert by["LipinskiViolations"].direction == "lower"
    assert by["MolWt"].threshold == "< 500 g/mol"
    assert by["FractionCSP3"].threshold == "> 0.4"
    dropped = {d.property: d.reason for d in tpl.dropped}
    assert "not computable" in dropped["logD at pH 7.4"] and "not computable" in dropped["pKa of the basic amine"]
    # a property that names a count and only mentions pKa aside is still the count
    assert map_property("basic amines (pKa)")[0] == ["fr_NH0", "fr_NH1", "fr_NH2"]
    assert map_property("lipophilicity")[0] == ["MolLogP"]  # not inverted
