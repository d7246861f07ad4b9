"""The pretrain stage on Ray Train + DeepSpeed (2 CPU workers, ZeRO 2, gloo): it learns, a dying worker is
replaced from the last checkpoint (FailureConfig), a crashed job resumes on re-run with its step count, and
MLflow holds the params, the metrics and the exported encoder, which reloads without DeepSpeed or Ray.

The table: 320 ZINC molecules, "rules" descriptions built from RDKit descriptors, embedded with the bundled
all-MiniLM-L6-v2, written as a complete featurize output. MiniLM puts all these templated sentences within
cosine ~0.97 of each other, so the vectors are centred (minus their mean, re-normalised): the same signal,
learnable in a few dozen steps instead of a few hundred.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lardo_ray import schema
from lardo_ray.config import ConfigError, load_config
from lardo_ray.io import StageOutput
from tests.conftest import ROOT, SAMPLE

pytestmark = pytest.mark.slow

N_MOLS = 320
SHARD_ROWS = 160
EVAL_FRACTION = 0.2
BATCH = 16
WORKERS = 2


def rules_description(mol) -> str:
    from rdkit.Chem import Descriptors, rdMolDescriptors

    return (f"LogP {Descriptors.MolLogP(mol):.1f}; molecular weight {Descriptors.MolWt(mol):.0f} g/mol; "
            f"{rdMolDescriptors.CalcNumHBD(mol)} H-bond donors; {rdMolDescriptors.CalcNumHBA(mol)} H-bond acceptors; "
            f"TPSA {rdMolDescriptors.CalcTPSA(mol):.0f} Å²; {rdMolDescriptors.CalcNumRings(mol)} rings, "
            f"{rdMolDescriptors.CalcNumAromaticRings(mol)} aromatic; "
            f"{rdMolDescriptors.CalcNumRotatableBonds(mol)} rotatable bonds")


@pytest.fixture(scope="module")
def featurized(tmp_path_factory) -> Path:
    """A complete featurize output (shards + manifest, as the stage writes it); copy it into each run's dir."""
    import torch
    from rdkit import Chem

    from lardo_ray.chem.graph import GraphFeaturizer
    from lardo_ray.models.text import TextEmbedder, embeddings_from_arrow, embeddings_to_arrow

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("featurized")
    with open(SAMPLE / "zinc_sample.csv", newline="") as f:
        smiles = [r["smiles"] for r in csv.DictReader(f)][:N_MOLS]
    mols = [Chem.MolFromSmiles(s) for s in smiles]
    table = pa.table({schema.MOL_ID: [f"m{i:04d}" for i in range(len(mols))],
                      schema.CANONICAL_SMILES: [Chem.MolToSmiles(m) for m in mols],
                      schema.DESCRIPTION: [rules_description(m) for m in mols]})
    table = TextEmbedder(batch_size=64)(table)
    emb = embeddings_from_arrow(table.column(schema.TEXT_EMBEDDING))
    emb = emb - emb.mean(0)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = table.set_column(table.schema.get_field_index(schema.TEXT_EMBEDDING), schema.TEXT_EMBEDDING,
                             embeddings_to_arrow(emb.astype(np.float32)))
    graphs, rejected = GraphFeaturizer()(table)
    assert rejected.num_rows == 0
    out = StageOutput(str(root / "featurize"))
    out.prepare()
    chunks = []
    for k, start in enumerate(range(0, graphs.num_rows, SHARD_ROWS)):
        cid = f"00000-{k:06d}"
        chunks.append(cid)
        out.write_table_atomic(out.data_path(cid), graphs.slice(start, SHARD_ROWS))
        out.write_table_atomic(out.rejected_path(cid), pa.table({schema.REJECT_REASON: pa.array([], pa.string())}))
    out.write_manifest({"stage": "featurize", "status": "complete", "chunks": chunks, "config_hash": "test",
                        "input_fingerprint": "zinc320"})
    return root / "featurize"


def _out_dir(tmp_path: Path, featurized: Path) -> Path:
    import shutil

    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(featurized, out / "featurize")
    return out


def _cfg(out: Path, *extra: str):
    return load_config(None, [
        f"run.output_dir={out}", "run.name=t", "run.progress=false",
        f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        "model.num_layers=2", "model.hidden=64", "model.projection_dim=32",
        "pretrain.epochs=5", f"pretrain.batch_size={BATCH}", "pretrain.lr=3e-3", "pretrain.warmup_steps=3",
        f"pretrain.eval_fraction={EVAL_FRACTION}", "pretrain.eval_every_steps=0", "pretrain.log_every_steps=2",
        "pretrain.checkpoint_every_steps=5", f"pretrain.num_workers={WORKERS}",
        # The session's Ray instance has 2 CPUs: 2 x 0.75 for the workers leaves 0.5 for Ray Data's reads.
        "pretrain.resources_per_worker={CPU: 0.75}", "pretrain.torch_threads=1",
        "pretrain.deepspeed.enabled=true", "pretrain.deepspeed.zero_stage=2",
        *extra,
    ])


def _mlflow_client(out: Path):
    """The stage's MLflow store, its experiment created with artifacts under ``out`` (not the CWD's mlruns/)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    if client.get_experiment_by_name("lardo_ray") is None:
        client.create_experiment("lardo_ray", artifact_location=(out / "mlartifacts").as_uri())
    return client


def _train_rows(featurized: Path) -> int:
    from lardo_ray.train.loop import eval_mask

    ids = pq.read_table(str(featurized / "data"), columns=[schema.MOL_ID]).column(0).to_pylist()
    return int((~eval_mask(ids, EVAL_FRACTION, 0)).sum())


def _expected_steps(featurized: Path, epochs: int) -> tuple[int, int]:
    """(steps per epoch, total): Ray's equal split gives each worker floor(rows / workers) rows; a last batch of
    one row has no negatives and is skipped."""
    per_worker = _train_rows(featurized) // WORKERS
    per_epoch = per_worker // BATCH + (1 if per_worker % BATCH >= 2 else 0)
    return per_epoch, per_epoch * epochs


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]


# ---------------------------------------------------------------------------------------------------------
# One 2-worker run whose rank 1 dies (os._exit) at step 7, recovered by FailureConfig(max_failures=1).
# ---------------------------------------------------------------------------------------------------------
FAIL_STEP = 7


@pytest.fixture(scope="module")
def recovered_run(ray_local, featurized, tmp_path_factory):
    from lardo_ray.stages.pretrain import run_pretrain

    out = _out_dir(tmp_path_factory.mktemp("recovered"), featurized)
    client = _mlflow_client(out)
    cfg = _cfg(out, "pretrain.max_failures=1")
    marker = out / "fault-marker"
    env = {"LARDO_FAIL_AT_STEP": str(FAIL_STEP), "LARDO_FAIL_RANK": "1", "LARDO_FAIL_MODE": "exit",
           "LARDO_FAIL_MARKER": str(marker)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t0 = time.time()
    try:
        result = run_pretrain(cfg)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"cfg": cfg, "out": out, "result": result, "client": client, "marker": marker,
            "seconds": time.time() - t0}


def test_two_worker_deepspeed_run_learns(recovered_run, featurized):
    r, client = recovered_run["result"], recovered_run["client"]
    m = r.final_metrics
    assert r.num_workers == 2 and r.deepspeed and m["world_size"] == 2
    chance = m["eval_chance_top1"]
    assert 0 < chance < 0.05 and m["eval_pool"] >= 60
    assert m["eval_top1"] > 2.5 * chance, m
    assert m["eval_top5"] > m["eval_top1"]
    losses = [v for _, v in _history(client, r.mlflow_run_id, "train_loss")]
    assert losses[0] > 2.0 and losses[-1] < 0.75 * losses[0], losses
    evals = _history(client, r.mlflow_run_id, "eval_loss")
    assert evals[-1][1] < evals[0][1]
    assert r.samples_per_s > 0 and r.wall_seconds > 0
    text = "\n".join(r.lines())
    assert "pretrain summary" in text and "retrieval" in text and r.export_dir in text


def test_dying_worker_is_replaced_from_the_last_checkpoint(recovered_run, featurized):
    r, client, cfg = recovered_run["result"], recovered_run["client"], recovered_run["cfg"]
    assert recovered_run["marker"].exists()  # rank 1 did die at FAIL_STEP
    per_epoch, total = _expected_steps(featurized, cfg.pretrain.epochs)
    assert r.steps == total and r.epochs == cfg.pretrain.epochs
    # The replacement group started from the last checkpoint before the failure (steps 5 and every epoch end).
    last_ckpt = max(s for s in [5, per_epoch] if s < FAIL_STEP)
    assert r.resumed_from_step == last_ckpt
    # rank 0 logged the steps between that checkpoint and the failure twice: before and after the restart.
    steps = [s for s, _ in _history(client, r.mlflow_run_id, "train_loss")]
    drops = [(a, b) for a, b in zip(steps, steps[1:]) if b <= a]
    assert len(drops) == 1 and steps[-1] == total, steps
    before, after = drops[0]
    assert before <= FAIL_STEP and last_ckpt < after <= before
    manifest = StageOutput(str(recovered_run["out"] / "pretrain")).read_manifest()
    assert manifest["status"] == "complete" and manifest["result"]["steps"] == total


def test_mlflow_holds_params_metrics_and_a_reloadable_encoder(recovered_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    from lardo_ray.models.gine import load_encoder

    r, client = recovered_run["result"], recovered_run["client"]
    run = client.get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["pretrain.deepspeed.zero_stage"] == "2" and p["pretrain.num_workers"] == "2"
    assert p["model.hidden"] == "64" and p["pretrain.batch_size"] == str(BATCH) and "run.output_dir" in p
    for key in ("train_loss", "temperature", "lr", "samples_per_s", "eval_top1", "eval_top5", "final_eval_top1",
                "wall_seconds"):
        assert key in run.data.metrics, key
    arts = {a.path for a in client.list_artifacts(r.mlflow_run_id)}
    assert {"config.yaml", "deepspeed_config.json", "encoder"} <= arts
    ds_cfg = json.loads(Path(client.download_artifacts(r.mlflow_run_id, "deepspeed_config.json", str(tmp_path))).read_text())
    assert ds_cfg["zero_optimization"]["stage"] == 2 and ds_cfg["train_batch_size"] == BATCH * WORKERS
    enc_dir = client.download_artifacts(r.mlflow_run_id, "encoder", str(tmp_path))
    assert {"encoder.safetensors", "encoder.json"} <= set(os.listdir(enc_dir))

    # The artifact, the stage's export dir and the final DeepSpeed checkpoint hold the same tensors.
    from_mlflow = load_encoder(enc_dir).state_dict()
    exported = load_encoder(r.export_dir).state_dict()
    assert from_mlflow.keys() == exported.keys()
    for k in exported:
        assert torch.equal(from_mlflow[k], exported[k]), k
    ds_states = torch.load(Path(r.checkpoint) / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    for k, v in exported.items():
        assert torch.equal(ds_states[f"graph_encoder.{k}"].float(), v.float()), k
    assert load_file(os.path.join(enc_dir, "heads.safetensors"))

    # Loading needs neither DeepSpeed nor Ray.
    code = ("import sys; from lardo_ray.models.gine import load_encoder; "
            f"m = load_encoder({r.export_dir!r}); assert m.out_dim == 64; "
            "bad = [x for x in ('deepspeed', 'ray') if x in sys.modules]; assert not bad, bad; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]

    # A re-run of the finished stage trains nothing and reports the same result.
    from lardo_ray.stages.pretrain import run_pretrain

    again = run_pretrain(recovered_run["cfg"])
    assert again.skipped and again.steps == r.steps and again.export_dir == r.export_dir


# ---------------------------------------------------------------------------------------------------------
# A crashed job (max_failures=0) resumes on re-run, its step count continuing.
# ---------------------------------------------------------------------------------------------------------
def test_crashed_job_resumes_on_rerun(ray_local, featurized, tmp_path, monkeypatch):
    from lardo_ray.stages.pretrain import run_pretrain

    out = _out_dir(tmp_path, featurized)
    client = _mlflow_client(out)
    epochs = 2
    cfg = _cfg(out, f"pretrain.epochs={epochs}", "pretrain.checkpoint_every_steps=3", "pretrain.max_failures=0")
    per_epoch, total = _expected_steps(featurized, epochs)
    fail_at = per_epoch + 2  # in epoch 2, after the step-3 / epoch-end / step-(per_epoch+1) checkpoints
    monkeypatch.setenv("LARDO_FAIL_AT_STEP", str(fail_at))
    monkeypatch.setenv("LARDO_FAIL_RANK", "0")
    monkeypatch.setenv("LARDO_FAIL_MARKER", str(tmp_path / "marker"))
    with pytest.raises(RuntimeError, match="run the same command again to resume"):
        run_pretrain(cfg)
    manifest = StageOutput(str(out / "pretrain")).read_manifest()
    assert manifest["status"] == "failed"
    first_run = manifest["mlflow_run_id"]
    assert client.get_run(first_run).info.status == "FAILED"
    ckpts = sorted(p.name for p in (out / "pretrain" / "ray_train" / "t-pretrain").glob("step_*"))
    assert ckpts, "no Ray checkpoint before the crash"

    for k in ("LARDO_FAIL_AT_STEP", "LARDO_FAIL_RANK", "LARDO_FAIL_MARKER"):
        monkeypatch.delenv(k)
    result = run_pretrain(cfg)
    last_ckpt = max(s for s in range(1, fail_at) if s % 3 == 0 or s == per_epoch)
    assert result.resumed_from_step == last_ckpt
    assert result.steps == total and not result.skipped
    steps = [s for s, _ in _history(client, result.mlflow_run_id, "train_loss")]
    assert steps and min(steps) > last_ckpt and steps[-1] == total  # the count continued
    assert result.mlflow_run_id != first_run


# ---------------------------------------------------------------------------------------------------------
# bf16 / fp16 training -> an fp32 export that fine-tunes (the GPU preset's setting, here on CPU)
# ---------------------------------------------------------------------------------------------------------
def test_fp16_on_cpu_is_refused_at_start_and_an_fp16_encoder_exports_fp32_that_fine_tunes(tmp_path):
    """DeepSpeed has no fp16 on CPUs: the config says so before any work. What an fp16 engine holds (an
    fp16 encoder) still exports fp32 and fine-tunes, which is the GPU path's round trip without the GPU."""
    import torch

    from lardo_ray.finetune.model import EncoderSource
    from lardo_ray.models.gine import GINEConfig, GINEEncoder, save_encoder
    from lardo_ray.stages.finetune import run_finetune

    with pytest.raises(ConfigError, match=r"pretrain.deepspeed.precision=fp16 needs GPUs"):
        _cfg(tmp_path / "out", "pretrain.deepspeed.precision=fp16")
    assert _cfg(tmp_path / "out", "pretrain.deepspeed.precision=fp16", "pretrain.use_gpu=true")
    enc = GINEEncoder(GINEConfig(num_layers=2, hidden=64)).half()
    export = save_encoder(enc, tmp_path / "enc")
    meta = json.loads((export / "encoder.json").read_text())
    assert meta["trained_dtype"] == "float16"
    src = EncoderSource.from_dir(export)
    assert all(t.dtype == torch.float32 for t in src.state_dict().values() if t.is_floating_point())
    # fp16 -> fp32 is exact: the export holds the fp16 values
    assert all(torch.equal(src.state_dict()[k], v.float()) for k, v in enc.state_dict().items())
    ft = load_config(None, [f"run.output_dir={tmp_path / 'ft'}", "run.progress=false", "tracking.enabled=false",
                            f"finetune.encoder={export}", "finetune.seeds=[0]", "finetune.epochs=1",
                            "finetune.batch_size=64"])
    res = run_finetune(ft, use_ray=False)
    assert res.ok and res.encoder_sha256 == src.sha256


@pytest.mark.parametrize("precision", ["bf16"])
def test_low_precision_pretraining_exports_fp32_that_fine_tunes(ray_local, featurized, tmp_path, precision):
    import torch
    from safetensors.torch import load_file

    from lardo_ray.finetune.model import EncoderSource
    from lardo_ray.stages.finetune import run_finetune
    from lardo_ray.stages.pretrain import run_pretrain

    out = _out_dir(tmp_path, featurized)
    _mlflow_client(out)
    cfg = _cfg(out, "pretrain.epochs=1", "pretrain.num_workers=1", f"pretrain.deepspeed.precision={precision}")
    result = run_pretrain(cfg)
    export = Path(result.export_dir)
    state = load_file(str(export / "encoder.safetensors"))
    floats = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}, floats
    meta = json.loads((export / "encoder.json").read_text())
    assert meta["dtype"] == "float32" and meta["trained_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert math.isfinite(result.final_metrics["train_loss"])

    ft = load_config(None, [f"run.output_dir={out}", "run.progress=false", "tracking.enabled=false",
                            f"finetune.encoder={export}", "finetune.seeds=[0]", "finetune.epochs=1",
                            "finetune.batch_size=64"])
    res = run_finetune(ft, use_ray=False)
    assert res.ok, res.failed  # the sha check passed: the fine-tune starts from exactly the exported tensors
    assert res.encoder_sha256 == EncoderSource.from_dir(export).sha256


def _add_dsm_targets(featurize_dir: Path) -> None:
    """Give every shard a dsm_targets column (5 RDKit descriptors), as featurize.dsm_targets writes it."""
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    fns = dict(Descriptors.descList)
    for f in sorted((featurize_dir / "data").glob("*.parquet")):
        t = pq.read_table(f)
        X = [[float(fns[n](Chem.MolFromSmiles(s))) for n in ("MolWt", "MolLogP", "TPSA", "NumHDonors", "RingCount")]
             for s in t.column(schema.CANONICAL_SMILES).to_pylist()]
        pq.write_table(t.append_column(schema.DSM_TARGETS, pa.array(X, pa.list_(pa.float32()))), f)


def test_descriptor_loss_trains_on_two_deepspeed_workers(ray_local, featurized, tmp_path):
    """pretrain.descriptor_weight through Ray Train: every worker scales the targets with the driver's CDFs,
    the descriptor loss falls, MLflow has it, and the export is the encoder alone (it fine-tunes as before)."""
    from safetensors.torch import load_file

    from lardo_ray.stages.pretrain import run_pretrain

    out = _out_dir(tmp_path, featurized)
    _add_dsm_targets(out / "featurize")
    client = _mlflow_client(out)
    cfg = _cfg(out, "featurize.dsm_targets=true", "pretrain.descriptor_weight=1.0", "pretrain.epochs=6")
    result = run_pretrain(cfg)
    m = result.final_metrics
    assert math.isfinite(m["train_loss_descriptors"]) and math.isfinite(m["train_loss_contrastive"])
    hist = [v for _, v in _history(client, result.mlflow_run_id, "train_loss_descriptors")]
    # these five descriptors are continuous enough that predicting the mean scores about 1, where the head starts
    assert len(hist) >= 3 and hist[0] > 0.85 and np.mean(hist[-2:]) < 0.75, hist
    assert m["eval_top1"] > 3 * m["eval_chance_top1"]  # still contrastive
    heads = load_file(str(Path(result.export_dir) / "heads.safetensors"))
    assert heads and not any("descriptor" in k for k in heads)


# ---------------------------------------------------------------------------------------------------------
# Checks before any work (no Ray needed)
# ---------------------------------------------------------------------------------------------------------
def test_descriptor_loss_without_targets_is_refused_before_training(featurized, tmp_path):
    from lardo_ray.stages.pretrain import run_pretrain

    out = _out_dir(tmp_path, featurized)
    _mlflow_client(out)
    with pytest.raises(ConfigError, match=r"lacks column\(s\) \['dsm_targets'\].*featurize.dsm_targets=true"):
        run_pretrain(_cfg(out, "featurize.dsm_targets=true", "pretrain.descriptor_weight=1.0"))
    with pytest.raises(ConfigError, match="featurize.dsm_targets: true"):
        _cfg(out, "pretrain.descriptor_weight=1.0")  # the config alone already says why


def test_needs_complete_featurize_output(tmp_path):
    from lardo_ray.stages.pretrain import run_pretrain

    with pytest.raises(ConfigError, match="run `lardo-ray featurize` first"):
        run_pretrain(_cfg(tmp_path / "out"))


def test_unreachable_mlflow_fails_before_training(featurized, tmp_path, monkeypatch):
    from lardo_ray.stages.pretrain import run_pretrain

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    out = _out_dir(tmp_path, featurized)
    cfg = _cfg(out, "tracking.tracking_uri=http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="not reachable"):
        run_pretrain(cfg)
    assert not (out / "pretrain").exists()


def test_other_config_in_the_output_is_refused(featurized, tmp_path):
    from lardo_ray.stages.pretrain import run_pretrain

    out = _out_dir(tmp_path, featurized)
    _mlflow_client(out)
    (out / "pretrain").mkdir()
    StageOutput(str(out / "pretrain")).write_manifest({"stage": "pretrain", "status": "failed", "config_hash": "x",
                                                        "input_fingerprint": "y"})
    with pytest.raises(ConfigError, match="run.overwrite=true"):
        run_pretrain(_cfg(out))


def test_ray_data_split_equals_the_loop_split():
    from lardo_ray.train.loop import eval_mask
    from lardo_ray.train.ray_train import held_out_mask

    ids = [f"{i:016x}" for i in range(5000)]
    for frac, seed in ((0.05, 0), (0.2, 3), (0.0, 0)):
        assert np.array_equal(held_out_mask(ids, frac, seed), eval_mask(ids, frac, seed))
    assert math.isclose(held_out_mask(ids, 0.2, 0).mean(), 0.2, abs_tol=0.03)
