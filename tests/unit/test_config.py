from __future__ import annotations

import pytest

from lardo_ray.config import ConfigError, PipelineConfig, apply_overrides, load_config


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.dsm.descriptors == "all"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("input:\n  path: a.csv\n  chunk_rows: 10\ndsm:\n  descriptors: [MolLogP]\n")
    cfg = load_config(p, ["input.chunk_rows=20", "dsm.ray.concurrency=3", "dsm.descriptors=[TPSA, rules]"])
    assert cfg.input.path == "a.csv"
    assert cfg.input.chunk_rows == 20
    assert cfg.dsm.ray.concurrency == 3
    assert cfg.dsm.descriptors == ["TPSA", "rules"]


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dsm:\n  descriptorz: all\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'dsm.descriptorz'"):
        load_config(p)


def test_unknown_section_from_override():
    with pytest.raises(ConfigError, match=r"unknown config key 'dsmm'"):
        load_config(None, ["dsmm.x=1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"config key 'input.chunk_rows'"):
        load_config(None, ["input.chunk_rows=many"])
    with pytest.raises(ConfigError, match=r"config key 'dsm.ray.num_cpus'"):
        load_config(None, ["dsm.ray.num_cpus=-1"])


def test_unknown_descriptor_lists_choices():
    with pytest.raises(ConfigError, match=r"dsm.*unknown descriptor 'MolLogp'.*did you mean 'MolLogP'"):
        load_config(None, ["dsm.descriptors=[MolLogp]"])


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])


def test_fingerprint_changes_with_settings():
    a = load_config(None, ["dsm.descriptors=[MolLogP]"])
    b = load_config(None, ["dsm.descriptors=[TPSA]"])
    assert a.fingerprint("dsm") != b.fingerprint("dsm")
    assert a.fingerprint("dsm") == load_config(None, ["dsm.descriptors=[MolLogP]"]).fingerprint("dsm")


CONFIGS = sorted((__import__("pathlib").Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    """Every preset in configs/ loads against the one config model (a renamed key breaks here, not for users)."""
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    from lardo_ray.stages.ablation import variant_config

    for label in cfg.ablation.variants:  # variant overrides are checked too
        assert variant_config(cfg, label).run.output_dir.endswith(f"/{label}")


def test_paper_preset_holds_the_published_settings():
    cfg = load_config(CONFIGS[0].parent / "paper.yaml")
    m, p = cfg.model, cfg.pretrain
    assert (m.num_layers, m.pooling, m.projection_dim, m.temperature_init, m.freeze_text) == (5, "mean", 128, 0.07, True)
    assert (p.batch_size, p.epochs, p.lr, p.schedule, p.weight_decay, p.eval_fraction) == (32, 100, 5e-3, "cosine", 0.0, 0.1)
    assert (cfg.describe.prompt_set, cfg.describe.variant) == ("paper", "full")
    assert cfg.describe.model == "mistralai/Mistral-7B-Instruct-v0.2"
    assert (cfg.finetune.split, cfg.finetune.epochs, cfg.finetune.lr_head, cfg.finetune.lr_encoder) == (
        "scaffold", 100, 5e-4, 1e-4)


def test_keys_added_later_keep_earlier_outputs_resumable_and_the_joined_dsm_counts():
    from lardo_ray.config import load_config
    from lardo_ray.stages.pretrain import config_hash

    base = load_config(None, [])
    # at their defaults the new keys are not hashed: outputs written before they existed still resume
    dumped = base.featurize.model_dump(mode="json")
    assert "dsm_targets" in dumped
    import hashlib
    import json

    old = {"featurize": {k: v for k, v in dumped.items() if k != "dsm_targets"}}
    assert base.fingerprint("featurize") == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    on = load_config(None, ["featurize.dsm_targets=true"])
    assert on.fingerprint("featurize") != base.fingerprint("featurize")
    # with the join on, the dsm stage's descriptors are part of featurize's identity; without it they are not
    fewer = ["dsm.descriptors=[MolLogP,TPSA]"]
    assert load_config(None, ["featurize.dsm_targets=true", *fewer]).fingerprint("featurize") != on.fingerprint("featurize")
    assert load_config(None, fewer).fingerprint("featurize") == base.fingerprint("featurize")
    weighted = load_config(None, ["featurize.dsm_targets=true", "pretrain.descriptor_weight=1"])
    assert config_hash(weighted) != config_hash(base) == config_hash(load_config(None, ["pretrain.descriptor_weight=0"]))
