"""The ablation grid's method labels say what the head reads, whatever the base config."""

from __future__ import annotations

from lardo_ray.config import load_config
from lardo_ray.stages.ablation import grid_methods

ENCODED = [("rules", "out/rules/pretrain/encoder"), ("scratch", None)]


def test_base_methods_plain_and_variants_suffixed():
    cfg = load_config(None, [])
    methods = grid_methods(cfg, ENCODED, {"+dsm": {"dsm_features": "all"}})
    assert [m[0] for m in methods] == ["rules", "scratch", "rules+dsm", "scratch+dsm"]
    assert methods[2] == ("rules+dsm", "out/rules/pretrain/encoder", {"dsm_features": "all"})


def test_a_base_head_with_descriptors_is_named_by_them():
    cfg = load_config(None, ["finetune.dsm_features=all"])
    methods = grid_methods(cfg, ENCODED, {"+lr": {"lr_scales": [0.3, 1.0, 3.0], "dsm_features": "all"},
                                          "-nodsm": {"dsm_features": "none"}})
    assert [m[0] for m in methods] == ["rules+dsm", "scratch+dsm", "rules+dsm+lr", "rules-nodsm",
                                       "scratch+dsm+lr", "scratch-nodsm"]


def test_a_forest_head_and_a_learning_rate_search_are_named_in_the_label():
    from lardo_ray.stages.pipeline import head_suffix, pretrained_method_label

    forest = load_config(None, ["finetune.dsm_features=all", "finetune.head=forest", "describe.backend=rules"])
    assert head_suffix(forest) == "+dsm+rf" and pretrained_method_label(forest) == "rules+dsm+rf"
    fp = load_config(None, ["finetune.head=forest", "finetune.ecfp_features=true", "describe.backend=rules"])
    assert pretrained_method_label(fp) == "rules+rf+ecfp"
    lr = load_config(None, ["finetune.lr_scales=[0.3, 1.0]", "describe.backend=rules"])
    assert pretrained_method_label(lr) == "rules+lr"
    methods = grid_methods(forest, ENCODED, {"-mlp": {"head": "mlp"}})
    assert [m[0] for m in methods] == ["rules+dsm+rf", "scratch+dsm+rf", "rules+dsm-mlp", "scratch+dsm-mlp"]
