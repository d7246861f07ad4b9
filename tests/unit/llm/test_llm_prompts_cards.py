"""Task cards, settings and the two prompt sets (paper / lardo) in their three variants."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lardo_ray.config_base import ConfigError
from lardo_ray.llm.cards import list_cards, load_card
from lardo_ray.llm.prompts import DEFAULT_PROPERTY_SET, PromptBuilder, format_value, stage1_messages
from lardo_ray.llm.settings import DescribeConfig
from lardo_ray.llm.stage1 import PropertyClaim, calibrate, default_template

VALUES = {"MolLogP": 2.31449, "MolWt": 310.361, "TPSA": 45.23, "NumHDonors": 2.0, "NumHAcceptors": 4.0,
          "NumRotatableBonds": 5.0, "NumAromaticRings": 2.0, "FractionCSP3": 0.35}
SMILES = "CC(C)NCC(O)COc1cccc2ccccc12"


def test_all_cards_load_and_validate():
    keys = list_cards()
    for k in ["bbbp", "bace", "clintox", "tox21", "toxcast", "sider", "hiv", "esol", "freesolv", "lipophilicity",
              "pretrain"]:
        assert k in keys
        card = load_card(k)
        assert card.default_properties and card.description and card.endpoint
    assert load_card("Lipo").key == "lipophilicity" and load_card("DELANEY").key == "esol"
    assert load_card("bbbp").task_type == "classification" and load_card("esol").task_type == "regression"


def test_user_card_and_errors(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: MyAssay\ntask_type: regression\ndescription: An in-house potency assay of kinases.\n"
                 "endpoint: pIC50 against kinase X\ndefault_properties:\n  - {descriptor: MolLogP}\n")
    card = load_card(str(p))
    assert card.key == "myassay" and card.default_properties[0].descriptor == "MolLogP"
    with pytest.raises(ConfigError, match="unknown task card"):
        load_card("no_such_task")
    with pytest.raises(ConfigError, match="not found"):
        load_card(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: X\ntask_type: ranking\ndescription: too short\nendpoint: y\nextra_key: 1\n")
    with pytest.raises(ConfigError) as e:
        load_card(str(bad))
    assert "task_type" in str(e.value) and "extra_key" in str(e.value)
    wrong_desc = tmp_path / "wd.yaml"
    wrong_desc.write_text("name: X\ntask_type: regression\ndescription: a long enough text\nendpoint: yyyy\n"
                          "default_properties:\n  - {descriptor: NotADescriptor}\n")
    with pytest.raises(ConfigError, match="NotADescriptor"):
        load_card(str(wrong_desc))


def test_settings_defaults_and_validation():
    cfg = DescribeConfig()
    assert cfg.sampling.max_tokens_stage1 == 300 and cfg.sampling.max_tokens_stage2 == 200
    assert cfg.model_name == "rules-v1"
    assert DescribeConfig(backend="vllm").model_name.startswith("mistralai/")
    assert cfg.sampling.for_stage(2).max_tokens == 200
    with pytest.raises(ValidationError):
        DescribeConfig(backend="gpt")
    with pytest.raises(ValidationError):
        DescribeConfig(hf={"batch_size": 4, "typo": 1})
    for name, field in DescribeConfig.model_fields.items():
        assert field.description, name


def test_paper_stage1_prompt():
    msgs = stage1_messages(load_card("bbbp"), "paper")
    assert msgs[0] == {"role": "system", "content": "You are a biochemistry expert."}
    user = msgs[1]["content"]
    assert user.startswith("<DATASET>: BBBP\nDescription of <DATASET>: ")
    assert "\n<TASK>: Classification\nTarget of <TASK>: Blood-brain barrier" in user
    assert user.endswith("what are the are the molecular <PROPERTIES> related to <TASK>?")


def test_lardo_stage1_prompt_asks_for_json():
    msgs = stage1_messages(load_card("esol"), "lardo")
    assert "JSON" in msgs[0]["content"] and '"direction"' in msgs[1]["content"]
    assert "Task type: regression" in msgs[1]["content"]


@pytest.fixture()
def paper_template():
    claims = [PropertyClaim(property=p) for p in
              ["Lipophilicity", "Molecular weight", "Hydrogen bond donors and acceptors", "Metabolic stability"]]
    return calibrate(claims, load_card("bbbp"), prompt_set="paper")


def test_paper_stage2_variants(paper_template):
    full = PromptBuilder("paper", "full", paper_template).stage2(SMILES, VALUES)[1]["content"]
    assert full.startswith("<PROPERTIES>: Lipophilicity; Molecular weight; Hydrogen bond donors and acceptors; "
                           "Metabolic stability\n<MOLECULE>: " + SMILES)
    assert "LogP of <MOLECULE>: 2.314\nMolecular weight of <MOLECULE>: 310.4 g/mol\n" in full
    assert full.endswith("[Hydrogen bond donors and acceptors]: ...\n[Metabolic stability]: ...")
    no_dsm = PromptBuilder("paper", "no_dsm", paper_template).stage2(SMILES, VALUES)[1]["content"]
    assert "LogP of" not in no_dsm and "[Lipophilicity]: ..." in no_dsm
    no_s1 = PromptBuilder("paper", "no_stage1", paper_template).stage2(SMILES, VALUES)[1]["content"]
    assert "<PROPERTIES>" not in no_s1 and "LogP of <MOLECULE>: 2.314" in no_s1
    assert no_s1.endswith("Provide the concise information about <MOLECULE>:\n")


def test_lardo_stage2_shared_prefix_and_variants():
    tpl = default_template(load_card("bbbp"))
    b = PromptBuilder("lardo", "full", tpl)
    m1, m2 = b.stage2(SMILES, VALUES), b.stage2("CCO", {k: 1.0 for k in VALUES})
    assert m1[0] == m2[0]  # the long system message is identical for every molecule (prefix cache)
    assert len(m1[0]["content"]) > 3 * len(m1[1]["content"])
    assert "Knowledge about the properties" in m1[0]["content"] and "guide value < 90" in m1[0]["content"]
    user = m1[1]["content"]
    assert SMILES in user and "- LogP (Crippen): 2.31" in user and "- Molecular weight: 310.4 g/mol" in user
    assert "- Topological polar surface area (TPSA): 45.2 Å²" in user and "- Hydrogen bond donors: 2" in user
    assert b.descriptors == tpl.descriptors()
    nd = PromptBuilder("lardo", "no_dsm", tpl).stage2(SMILES, VALUES)
    assert "2.31" not in nd[1]["content"] and "estimate" in nd[0]["content"]
    ns = PromptBuilder("lardo", "no_stage1", tpl)
    assert ns.descriptors == DEFAULT_PROPERTY_SET and "Knowledge" not in ns.system
    assert "Fraction of sp3 carbons (Fsp3): 0.35" in ns.stage2(SMILES, VALUES)[1]["content"]


def test_format_value():
    assert format_value("MolWt", 310.361) == "310.4 g/mol"
    assert format_value("NumHDonors", 2.0) == "2"
    assert format_value("MolLogP", -0.001) == "0.00"
    assert format_value("TPSA", float("nan")) == "not computable"
    assert format_value("LipinskiPass", 1.0) == "yes"
