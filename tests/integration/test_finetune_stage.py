"""The fine-tune stage end to end: seeds as Ray tasks on a real local Ray, runs in a real MLflow sqlite store,
the compare contract (parent/child tags and metrics), the encoder's run traced back, compare over the result."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lardo_ray.config import load_config
from lardo_ray.finetune.settings import CompareConfig
from lardo_ray.models.gine import GINEEncoder, save_encoder
from lardo_ray.stages.compare import compare
from lardo_ray.finetune.data import prepare_task
from lardo_ray.stages.finetune import run_finetune, run_finetune_grid
from tests.conftest import SAMPLE

EXP = "ft_stage_test"
TINY = ["model.num_layers=2", "model.hidden=32", "finetune.head_hidden=32", "finetune.limit=300",
        "finetune.epochs=2", "finetune.seeds=[0, 1]", "finetune.ray.num_cpus=1", "run.progress=false"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A sqlite MLflow store with the experiment's artifacts under tmp_path, and a pre-training run that
    logged an encoder export as the artifact 'encoder'."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    eid = mlflow.create_experiment(EXP, artifact_location=str(tmp_path / "artifacts"))
    torch.manual_seed(5)
    export = save_encoder(GINEEncoder(num_layers=2, hidden=32), tmp_path / "export")
    with mlflow.start_run(experiment_id=eid, run_name="pretrain", tags={"lardo.kind": "pretrain"}) as run:
        mlflow.log_artifacts(str(export), "encoder")
    mlflow.set_tracking_uri("")
    yield uri, run.info.run_id
    mlflow.set_tracking_uri("")


def _cfg(uri: str, tmp_path, *more: str):
    return load_config(None, [*TINY, f"tracking.tracking_uri={uri}", f"tracking.experiment={EXP}",
                              f"run.output_dir={tmp_path / 'out'}", *more])


def _runs(uri: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXP)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_finetune_seeds_as_ray_tasks_logged_per_contract(ray_local, store, tmp_path):
    uri, pre_id = store
    # the pre-trained encoder, from its MLflow run
    res = run_finetune(_cfg(uri, tmp_path, f"finetune.encoder=runs:/{pre_id}/encoder", "finetune.method=lardo"))
    assert res.ok and [r.seed for r in res.seeds] == [0, 1]
    assert all(int(r.worker.split(":")[-1]) != os.getpid() for r in res.seeds)  # ran in Ray worker processes
    assert res.encoder_run_id == pre_id and all(r.pretrained for r in res.seeds)
    text = "\n".join(res.lines())
    assert "deterministic Bemis-Murcko scaffold split 80/10/10" in text and "test_roc_auc" in text
    assert res.csv_path and os.path.isfile(res.csv_path)
    # deterministic across processes: seed 0 again in this process (resolving runs:/ itself) = the Ray task
    from lardo_ray.finetune.train import finetune_seed

    again = finetune_seed(_cfg(uri, tmp_path, f"finetune.encoder=runs:/{pre_id}/encoder"), 0, threads=1)
    assert again.test.value == res.seeds[0].test.value and again.encoder_run_id == pre_id
    # the same protocol from scratch, through the grid entry point (same splits)
    grid = run_finetune_grid(_cfg(uri, tmp_path), [("random-init", None)], datasets=["bbbp"])
    assert grid.ok and grid.same_splits
    scratch = grid.get("bbbp", "random-init")
    assert [r.split_hash for r in scratch.seeds] == [r.split_hash for r in res.seeds]
    assert scratch.encoder_run_id == ""

    client, runs = _runs(uri)
    parents = {r.data.tags["lardo.method"]: r for r in runs if r.data.tags.get("lardo.role") == "parent"}
    assert set(parents) == {"lardo", "random-init"}
    for method, p in parents.items():
        t = p.data.tags
        assert t["lardo.kind"] == "finetune" and t["lardo.dataset"] == "bbbp" and t["lardo.split"] == "scaffold"
        assert t["lardo.task_type"] == "classification" and t["lardo.metric"] == "roc_auc"
        assert t["lardo.encoder_run_id"] == (pre_id if method == "lardo" else "")
        assert p.info.status == "FINISHED"
        m = p.data.metrics
        assert m["n_seeds"] == 2 and {"test_roc_auc_mean", "test_roc_auc_std", "valid_roc_auc_mean"} <= set(m)
        assert p.data.params["epochs"] == "2" and p.data.params["method"] == method
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        assert sorted(k.data.tags["lardo.seed"] for k in kids) == ["0", "1"]
        for k in kids:
            kt, km = k.data.tags, k.data.metrics
            assert kt["lardo.kind"] == "finetune" and kt["lardo.role"] == "seed" and k.info.status == "FINISHED"
            assert kt["lardo.method"] == method and kt["lardo.encoder_run_id"] == t["lardo.encoder_run_id"]
            assert {"test_roc_auc", "valid_roc_auc", "best_epoch", "test_n_tasks_scored"} <= set(km)
            assert k.data.params["seed"] == kt["lardo.seed"] and k.data.params["epochs"] == "2"
            curve = client.get_metric_history(k.info.run_id, "epoch/valid_roc_auc")
            assert sorted(x.step for x in curve) == [1, 2]
        assert {k.info.run_id for k in kids} == set((res if method == "lardo" else scratch).child_run_ids.values())
    # the encoder tag traces back to the run that holds the export
    pre = client.get_run(parents["lardo"].data.tags["lardo.encoder_run_id"])
    assert pre.data.tags["lardo.kind"] == "pretrain"
    assert {f.path for f in client.list_artifacts(pre.info.run_id, "encoder")} >= {"encoder/encoder.safetensors",
                                                                                  "encoder/encoder.json"}
    assert parents["lardo"].data.tags["lardo.encoder_sha256"] == res.encoder_sha256

    out = compare(CompareConfig(experiment=EXP, tracking_uri=uri, output_dir=str(tmp_path / "cmp"),
                                filter_string="params.epochs = '2'"))
    table = out.table.set_index("method")
    assert set(table.index) == {"lardo", "random-init"} and (table["n"] == 2).all()
    assert (table["source"] == "runs").all() and (table["split"] == "scaffold").all()
    assert table.loc["lardo", "mean"] == pytest.approx(res.mean)
    assert table.loc["random-init", "mean"] == pytest.approx(scratch.mean)
    with open(out.png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "BBBP" in out.markdown


def test_failed_seed_is_reported_and_logged(store, tmp_path, monkeypatch):
    """Without Ray (use_ray=False): one seed raises, the other finishes; the failure is a FAILED child run."""
    import lardo_ray.finetune.train as train

    uri, _ = store
    real = train.finetune_seed

    def flaky(cfg, seed, **kw):
        if seed == 1:
            raise RuntimeError("boom on seed 1")
        return real(cfg, seed, **kw)

    monkeypatch.setattr(train, "finetune_seed", flaky)
    torch.set_num_threads(1)
    res = run_finetune(_cfg(uri, tmp_path, "finetune.epochs=1"), use_ray=False)
    assert not res.ok and [r.seed for r in res.seeds] == [0] and "boom on seed 1" in res.failed[1]
    assert any("FAILED" in line for line in res.lines())
    _, runs = _runs(uri)
    parent = next(r for r in runs if r.data.tags.get("lardo.role") == "parent")
    assert parent.data.tags["lardo.failed_seeds"] == "1" and parent.data.metrics["n_seeds"] == 1
    status = {r.data.tags["lardo.seed"]: r.info.status for r in runs if r.data.tags.get("lardo.role") == "seed"}
    assert status == {"0": "FINISHED", "1": "FAILED"}

    monkeypatch.setattr(train, "finetune_seed", lambda *a, **k: (_ for _ in ()).throw(ValueError("all bad")))
    with pytest.raises(RuntimeError, match="every seed run failed"):
        run_finetune(_cfg(uri, tmp_path, "finetune.epochs=1"), use_ray=False)


def test_grid_config_errors_and_tracking_off(tmp_path):
    from lardo_ray.config_base import ConfigError

    cfg = load_config(None, [*TINY, "tracking.enabled=false", f"run.output_dir={tmp_path / 'out'}",
                             "finetune.seeds=[3]", "finetune.epochs=1"])
    with pytest.raises(ConfigError, match="distinct"):
        run_finetune_grid(cfg, [("a", None), ("a", None)])
    bad = load_config(None, [*TINY, "tracking.enabled=false", f"finetune.data_path={SAMPLE / 'bbbp.csv'}"])
    with pytest.raises(ConfigError, match="directory"):
        run_finetune_grid(bad, [("a", None)], datasets=["bbbp", "bace"])
    torch.set_num_threads(1)
    grid = run_finetune_grid(cfg, [("scratch", None)], use_ray=False)
    r = grid.get("bbbp", "scratch")
    assert r.ok and r.parent_run_id is None and r.child_run_ids == {} and not r.not_logged
    assert list(r.table["seed"]) == ["3", "mean", "std"]
    assert "scratch" in "\n".join(grid.lines())


@pytest.mark.slow
def test_a_method_that_fails_exits_non_zero_after_the_rest_finished(tmp_path):
    """The CLI as users run it: an encoder that cannot be loaded fails its method (FAILED in MLflow, named on
    stderr, exit 1) while scratch still runs; --allow-partial exits 0 with the same list."""
    import mlflow

    from tests.integration.conftest import run_cli

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["finetune", "--method", f"lardo={tmp_path / 'no-such-encoder'}", "--method", "scratch=",
            "--dataset", "bbbp", "--output", str(tmp_path / "out"), *[a for kv in TINY for a in ("--set", kv)],
            "--set", "finetune.seeds=[0]", "--set", "finetune.epochs=1",
            "--set", f"tracking.tracking_uri={uri}", "--set", f"tracking.experiment={EXP}"]
    r = run_cli(*args, timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "FAILED: 1 failure(s)" in r.stderr and "finetune bbbp/lardo seed 0: EncoderResolveError" in r.stderr
    assert "no-such-encoder" in r.stderr
    assert "scratch: " in r.stdout  # the other method finished and is in the grid's table
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(EXP).experiment_id])
    status = {(x.data.tags.get("lardo.method"), x.data.tags.get("lardo.role")): x.info.status for x in runs}
    assert status[("lardo", "parent")] == "FAILED" and status[("lardo", "seed")] == "FAILED"
    assert status[("scratch", "parent")] == "FINISHED"

    r = run_cli(*args, "--allow-partial", timeout=600)
    assert r.returncode == 0 and "allow_partial" in r.stderr and "bbbp/lardo seed 0" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_pipeline_without_a_pretrained_encoder_exits_non_zero_and_says_why(tmp_path):
    from tests.integration.conftest import run_cli

    r = run_cli("pipeline", "--output", str(tmp_path / "out"), "--set", "pipeline.stages=[finetune,compare]",
                *[a for kv in TINY for a in ("--set", kv)], "--set", "finetune.seeds=[0]",
                "--set", "finetune.epochs=1", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
                timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    # the pre-trained method is named by what wrote its text (the rules writer here)
    assert "no pre-trained encoder at" in r.stderr and "finetune bbbp/rules seed 0" in r.stderr
    table = r.stdout[r.stdout.index("| Dataset"):]
    assert "scratch" in table.splitlines()[0]  # scratch ran and compare still wrote its table


def test_stages_that_read_upstream_refuse_input(tmp_path):
    from tests.integration.conftest import run_cli

    r = run_cli("featurize", "--input", "x.csv", "--output", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2 and "featurize reads the embed" in r.stderr and "--with-upstream" in r.stderr


@pytest.mark.slow
def test_baselines_share_the_split_seeds_metric_and_mlflow_contract(ray_local, store, tmp_path):
    """rf_dsm / rf_ecfp beside a GNN in one grid (seeds as Ray tasks): the same split hash per seed, the same
    per-seed CSV and MLflow parent/child runs, and compare tabulates them like any method."""
    from lardo_ray.stages.finetune import baseline_method

    uri, enc_run = store
    cfg = _cfg(uri, tmp_path, "finetune.epochs=1")
    grid = run_finetune_grid(cfg, [("lardo", f"runs:/{enc_run}/encoder"), ("scratch", None),
                                   baseline_method("rf_dsm"), baseline_method("rf_ecfp")])
    assert grid.ok and grid.same_splits, grid.failures()
    hashes = {r.method: [s.split_hash for s in r.seeds] for r in grid.results}
    assert hashes["rf_dsm"] == hashes["rf_ecfp"] == hashes["scratch"] and len(hashes["scratch"]) == 2
    for kind in ("rf_dsm", "rf_ecfp"):
        res = grid.get(res_ds := grid.results[0].dataset, kind)
        assert res.baseline == kind and 0.0 <= res.mean <= 1.0 and os.path.isfile(res.csv_path)  # 300 rows: no claim
        assert os.path.basename(res.csv_path) == f"{res_ds}__{kind}__scaffold.csv"
        assert "random forest" in "\n".join(res.lines())
    _, runs = _runs(uri)
    seeds = [r for r in runs if r.data.tags.get("lardo.role") == "seed" and r.data.tags["lardo.method"] == "rf_dsm"]
    assert len(seeds) == 2 and all(r.info.status == "FINISHED" and "test_roc_auc" in r.data.metrics for r in seeds)
    assert {r.data.tags.get("lardo.task_mode") for r in runs if r.data.tags.get("lardo.kind") == "finetune"} \
        == {"single_task"}  # one target: neither protocol applies
    res = compare(CompareConfig(experiment=EXP, tracking_uri=uri, output_dir=str(tmp_path / "cmp"),
                                split="scaffold", bootstrap=200))
    assert {"lardo", "scratch", "rf_dsm", "rf_ecfp"} <= set(res.table["method"])
    # the bootstrap reads each seed's logged test predictions back from MLflow
    b, s = res.bootstrap  # against the best classical baseline, then against the GNN from scratch
    assert (b.against, s.against) == ("classical", "scratch") and s.method_b == "scratch"
    assert b.method_a == s.method_a == "lardo" and b.method_b in ("rf_dsm", "rf_ecfp") and b.n_resamples > 150
    assert b.low <= b.diff <= b.high and b.verdict in ("win", "tie", "loss")
    lardo = grid.get(b.dataset, "lardo")
    assert b.n_test == lardo.seeds[0].n_test and "95 % interval" in res.markdown
    assert os.path.isfile(tmp_path / "cmp" / "comparison_bootstrap.csv")
    # seed ensembles: each method's seed-averaged test predictions, scored by the same metric code
    from lardo_ray.finetune.metrics import evaluate

    scratch = grid.get(b.dataset, "scratch")
    mean_pred = np.mean([s.test_pred for s in scratch.seeds], axis=0)
    rows = scratch.seeds[0].test_index
    p = prepare_task(cfg.finetune)
    expect = evaluate("classification", p.data.labels[rows], mean_pred.astype(np.float64), p.data.task_names,
                      "roc_auc").value
    t = res.table.set_index("method")
    assert t.loc["scratch", "ensemble"] == pytest.approx(expect, abs=1e-6)
    assert t.loc[["lardo", "rf_dsm", "rf_ecfp"], "ensemble"].notna().all()
    assert "**Seed ensembles**" in res.markdown
