"""finetune.head=forest (lardo_ray.finetune.forest_head): rf_dsm's forests on the frozen encoder's embedding
(plus the descriptors); the forest reads the embedding, the encoder is the one given, and the saved model
predicts new SMILES exactly as the run scored them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lardo_ray.config import ConfigError, load_config
from lardo_ray.finetune.baselines import baseline_seed, featurize
from lardo_ray.finetune.data import prepare_task, split_for
from lardo_ray.finetune.model import resolve_encoder
from lardo_ray.finetune.train import finetune_seed
from lardo_ray.models.gine import GINEEncoder, save_encoder

SMALL = ["model.num_layers=2", "model.hidden=64", "finetune.limit=400", "finetune.split=random", "finetune.baseline_trees=60"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg_of(*overrides: str):
    return load_config(None, [*SMALL, "finetune.head=forest", *overrides])


def test_the_forest_reads_the_embedding_and_the_descriptors():
    cfg = cfg_of("finetune.dsm_features=all")
    prepared = prepare_task(cfg.finetune)
    split = split_for(prepared, cfg.finetune, 0)
    r = finetune_seed(cfg, 0, prepared=prepared, split=split, threads=1)
    n_desc = prepared.descriptors.shape[1]
    assert r.timing["n_forest_features"] == 64 + n_desc
    assert r.selection == "fixed" and r.epochs_run == 0 and not r.pretrained
    share = r.timing["embedding_importance_share"]
    assert 0.0 < share < 1.0, share  # both halves are used
    again = finetune_seed(cfg, 0, prepared=prepared, split=split, threads=1)
    np.testing.assert_array_equal(r.test_pred, again.test_pred)  # the seed fixes init and forest
    # rf_dsm's forest of the same seed on the descriptors alone is another model
    rf = baseline_seed(cfg, 0, prepared=prepared, split=split, features=featurize("rf_dsm", prepared.data.smiles))
    assert not np.array_equal(rf.test_pred, r.test_pred)
    assert r.test.value > 0.75 and rf.test.value > 0.75, (r.test.value, rf.test.value)  # chance: 0.5


def test_the_embedding_alone_is_a_featurizer_and_the_encoder_is_the_one_given(tmp_path):
    cfg = cfg_of()  # dsm_features=none: the embedding only
    prepared = prepare_task(cfg.finetune)
    split = split_for(prepared, cfg.finetune, 0)
    scratch = finetune_seed(cfg, 0, prepared=prepared, split=split, threads=1)
    assert scratch.timing["n_forest_features"] == 64 and scratch.timing["embedding_importance_share"] == 1.0
    assert scratch.test.value > 0.6, scratch.test.value  # a random GNN's embedding already separates BBBP
    torch.manual_seed(7)
    save_encoder(GINEEncoder(num_layers=2, hidden=64), tmp_path / "enc")
    enc = resolve_encoder(str(tmp_path / "enc"))
    given = finetune_seed(cfg, 0, prepared=prepared, split=split, encoder=enc, threads=1)
    assert given.pretrained and given.encoder_sha256 == enc.sha256 == given.final_encoder_sha256
    assert not np.array_equal(given.test_pred, scratch.test_pred)


def test_the_saved_model_predicts_new_smiles_as_the_run_scored_them(tmp_path):
    from lardo_ray.finetune.forest_head import forest_kind
    from lardo_ray.models.saved import ModelCard, SavedModel, save_property_model

    # every column kind, so that the saved model must rebuild them in the run's order
    cfg = cfg_of("finetune.dsm_features=all", "finetune.ecfp_features=true")
    prepared = prepare_task(cfg.finetune)
    split = split_for(prepared, cfg.finetune, 0)
    members = [finetune_seed(cfg, s, prepared=prepared, split=split, threads=1) for s in (0, 1)]
    assert members[0].timing["n_forest_features"] == 64 + prepared.descriptors.shape[1] + 2048
    card = ModelCard(kind="forest", features=forest_kind("all", True), name="bbbp-rules+dsm+rf+ecfp",
                     targets=list(prepared.data.task_names), task_type="classification",
                     encoder_config=members[0].member.encoder_config)
    save_property_model(tmp_path / "m", card, [r.member for r in members])
    model = SavedModel(tmp_path / "m")
    smiles = [prepared.data.smiles[i] for i in split.test]
    prep, mean, std = model.predict(smiles)
    assert not prep.refused and len(prep.index) == len(smiles)
    expected = np.mean([r.test_pred for r in members], axis=0)
    np.testing.assert_allclose(mean, expected, atol=1e-6)
    assert (std > 0).any()  # two seeds: two encoders, two forests
    emb = model.encode_prepared(prep)
    assert emb.shape == (len(smiles), 64)


def test_a_learning_rate_search_with_a_forest_head_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="lr_scales"):
        cfg_of("finetune.lr_scales=[0.3, 1.0]")
    with pytest.raises(ConfigError, match="ecfp_features"):  # the MLP head reads no fingerprints
        load_config(None, ["finetune.ecfp_features=true"])
