"""Models that outlive the run, against a real MLflow registry (sqlite) and real servers on 127.0.0.1:
fine-tune -> registered seed ensemble -> `lardo-ray predict` / `encode` on other molecules (the CLI, Ray
actors) gives the numbers the model gives in-process; a killed predict resumes to the same output;
`mlflow models serve` answers with the same numbers; bad SMILES and a wrong-version model are refused
with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from tests.integration.conftest import run_cli
from tests.mlflow_server import free_port

TINY = ["model.num_layers=2", "model.hidden=32", "finetune.head_hidden=32", "finetune.limit=300",
        "finetune.epochs=2", "finetune.seeds=[0, 1]", "run.progress=false", "finetune.dsm_features=all",
        "finetune.method=tiny"]
ZINC = ROOT / "lardo_ray" / "data" / "zinc_sample.csv"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny BBBP fine-tune (2 seeds, DSM features: the saved normaliser is exercised) registered in a
    sqlite store: (tracking URI, models:/ URI, FinetuneResult, workdir)."""
    import mlflow

    from lardo_ray.config import load_config
    from lardo_ray.stages.finetune import run_finetune

    work = tmp_path_factory.mktemp("models")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(None, [*TINY, f"tracking.tracking_uri={uri}", f"run.output_dir={work / 'ft'}"])
    res = run_finetune(cfg, use_ray=False)
    mlflow.set_tracking_uri("")
    assert res.ok and res.registered == "models:/bbbp-tiny/1", (res.registered, res.not_logged)
    return uri, res.registered, res, work, cfg


def _frame(path):
    import pandas as pd

    files = sorted(path.glob("*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True) if files else pd.DataFrame()


def test_registry_holds_the_ensemble_with_its_metrics_and_every_seed_has_its_model(registered):
    import mlflow

    uri, model_uri, res, _, _ = registered
    client = mlflow.MlflowClient(uri)
    mv = client.get_model_version("bbbp-tiny", "1")
    assert mv.tags["lardo.method"] == "tiny" and mv.tags["lardo.seeds"] == "0,1"
    assert float(mv.tags["test_roc_auc_mean"]) == pytest.approx(res.summary()["test_roc_auc"].mean, rel=1e-5)
    for seed, run_id in res.child_run_ids.items():  # each seed's own tested model, loadable on its own
        models = client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id],
                                             filter_string=f"source_run_id = '{run_id}'")
        assert len(models) == 1, (seed, models)


def test_predict_cli_equals_the_model_in_process_and_the_finetune_itself(registered, tmp_path):
    import mlflow

    from lardo_ray.finetune.data import prepare_task
    from lardo_ray.models.mlflow_model import download
    from lardo_ray.models.saved import SavedModel

    uri, model_uri, res, work, cfg = registered
    # (1) the saved ensemble on the fine-tune's own test molecules = the mean of the seeds' test predictions
    prepared = prepare_task(cfg.finetune)
    test_smiles = [prepared.data.smiles[i] for i in res.seeds[0].test_index]
    saved = SavedModel(download(model_uri, uri))
    prep, mean, std = saved.predict(test_smiles)
    assert len(prep.index) == len(test_smiles) and not prep.refused
    want = np.mean([r.test_pred for r in res.seeds], axis=0)
    np.testing.assert_allclose(mean, want, atol=2e-6)
    assert (std > 0).any()  # two different seeds: the ensemble has a spread
    # (2) the CLI on other molecules (+ a bad SMILES) = the same model applied in-process to them
    src = tmp_path / "new.csv"
    lines = ZINC.read_text().splitlines()[:301]
    lines.insert(5, "not-a-smiles")
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "pred"
    p = run_cli("predict", "--model", model_uri, "--input", str(src), "--output", str(out), "--tracking-uri", uri,
                "-q", "--set", "input.chunk_rows=100", "--set", "predict.ray.concurrency=2", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "reconcile   read = written + rejected + duplicates: OK" in p.stdout
    df = _frame(out / "predict" / "data").sort_values("source_row", key=lambda s: s.map(
        lambda r: (r.split(":")[0], int(r.split(":")[1])))).reset_index(drop=True)
    rej = _frame(out / "predict" / "rejected")
    assert len(df) + len(rej) == 301 and list(rej["input_smiles"]) == ["not-a-smiles"]
    assert rej["reason"].iloc[0] == "unparsable_smiles"
    assert {"mol_id", "smiles", "input_smiles", "pred_p_np", "pred_p_np_std"} <= set(df.columns)
    assert df["pred_p_np"].between(0, 1).all() and not df["pred_p_np"].isna().any()
    _, mean2, std2 = saved.predict(list(df["input_smiles"]))
    np.testing.assert_allclose(df["pred_p_np"].to_numpy(), mean2[:, 0], atol=1e-6)  # float32 nets, other batches
    np.testing.assert_allclose(df["pred_p_np_std"].to_numpy(), std2[:, 0], atol=1e-6)
    # (3) the MLflow pyfunc (what `mlflow models serve` runs) gives the same numbers, and says why a row has none
    mlflow.set_tracking_uri(uri)
    import pandas as pd

    frame = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"smiles": [*df["input_smiles"][:20], "xx("]}))
    mlflow.set_tracking_uri("")
    np.testing.assert_allclose(frame["pred_p_np"][:20].to_numpy(), mean2[:20, 0], atol=1e-6)
    assert np.isnan(frame["pred_p_np"].iloc[20]) and frame["error"].iloc[20].startswith("unparsable_smiles")
    # (4) encode: the first member's fine-tuned encoder, fixed-size float32 vectors
    e = run_cli("encode", "--model", model_uri, "--input", str(src), "--output", str(out), "--tracking-uri", uri,
                "-q", timeout=600)
    assert e.returncode == 0, e.stderr[-3000:]
    emb = pq.read_table(next((out / "encode" / "data").glob("*.parquet")))
    assert str(emb.schema.field("embedding").type) == "fixed_size_list<element: float>[32]"
    vec = saved.encode([emb.column("input_smiles")[0].as_py()])[1]
    np.testing.assert_allclose(np.asarray(emb.column("embedding")[0].as_py()), vec[0], atol=1e-6)


def _wait_for(pred, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_predict_killed_mid_run_resumes_to_the_uninterrupted_output(registered, tmp_path):
    uri, model_uri, *_ = registered
    args = ["--model", model_uri, "--input", str(ZINC), "--tracking-uri", uri, "-q",
            "--set", "input.chunk_rows=200", "--set", "predict.ray.concurrency=1"]
    full = run_cli("predict", *args, "--output", str(tmp_path / "full"), timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "lardo_ray.cli", "predict", *args, "--output", str(out)],
                            cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    done = out / "predict" / "_done"
    _wait_for(lambda: done.is_dir() and len(list(done.glob("*.json"))) >= 2, 600, "two finished chunks")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(done.glob("*.json")))
    assert n_done < 10, "the run finished before it was killed"
    again = run_cli("predict", *args, "--output", str(out), timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"({n_done} already done, skipped)" in again.stdout or "already done, skipped" in again.stdout
    a = _frame(tmp_path / "full" / "predict" / "data").sort_values("source_row").reset_index(drop=True)
    b = _frame(out / "predict" / "data").sort_values("source_row").reset_index(drop=True)
    assert len(a) == len(b) == 2000 - len(_frame(out / "predict" / "rejected"))
    assert a.equals(b)


def test_mlflow_models_serve_answers_with_the_same_numbers(registered, tmp_path):
    from lardo_ray.models.mlflow_model import download
    from lardo_ray.models.saved import SavedModel

    uri, model_uri, *_ = registered
    port = free_port()
    bindir = os.path.dirname(sys.executable)  # mlflow runs `uvicorn` from PATH: the venv's, as when activated
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(ROOT), PATH=f"{bindir}:{os.environ['PATH']}")
    mlflow_bin = os.path.join(bindir, "mlflow")
    srv = subprocess.Popen([mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local",
                            "-h", "127.0.0.1", "-p", str(port), "--workers", "1"], env=env, cwd=str(tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200
            except (urllib.error.URLError, ConnectionError, OSError):
                assert srv.poll() is None, srv.stdout.read().decode()[-3000:]
                return False

        _wait_for(ready, 240, "mlflow models serve")
        smiles = ZINC.read_text().splitlines()[1:11]

        def post(body: dict):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            return urllib.request.urlopen(req, timeout=60)

        answer = json.loads(post({"dataframe_split": {"columns": ["smiles"], "data": [[s] for s in smiles]}}).read())
        got = np.asarray([row["pred_p_np"] for row in answer["predictions"]])
        _, mean, _ = SavedModel(download(model_uri, uri)).predict(smiles)
        np.testing.assert_allclose(got, mean[:, 0], atol=1e-6)
        with pytest.raises(urllib.error.HTTPError) as bad:  # no smiles column: a 4xx that says so
            post({"dataframe_split": {"columns": ["smi"], "data": [["CCO"]]}})
        assert 400 <= bad.value.code < 500 and "smiles" in bad.value.read().decode()
    finally:
        if srv.poll() is None:
            os.killpg(srv.pid, signal.SIGKILL)
        srv.wait()


def test_a_model_of_another_featurizer_version_and_a_missing_model_are_refused_naming_why(registered, tmp_path):
    from lardo_ray.models.mlflow_model import download

    uri, model_uri, *_ = registered
    d = tmp_path / "old_model"
    shutil.copytree(download(model_uri, uri), d)
    meta = json.loads((d / "lardo_model.json").read_text())
    meta["featurizer_version"] = "ogb:[1, 2]:[3]"
    (d / "lardo_model.json").write_text(json.dumps(meta))
    p = run_cli("predict", "--model", str(d), "--input", str(ZINC), "--output", str(tmp_path / "o"), "-q",
                "--set", "tracking.enabled=false", timeout=300)
    assert p.returncode == 2 and "featurizer version" in p.stderr and "ogb:[1, 2]:[3]" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "o" / "predict" / "_done").exists() or not list((tmp_path / "o" / "predict" / "_done").iterdir())
    p = run_cli("predict", "--model", "models:/no-such-model/1", "--input", str(ZINC), "--output",
                str(tmp_path / "o2"), "-q", "--tracking-uri", uri, timeout=300)
    assert p.returncode == 2 and "predict.model 'models:/no-such-model/1'" in p.stderr, p.stderr[-2000:]
    p = run_cli("predict", "--input", str(ZINC), "--output", str(tmp_path / "o3"), "-q", timeout=120)
    assert p.returncode == 2 and "predict.model" in p.stderr


def test_ray_serve_app_batches_requests_and_answers_like_predict(registered, ray_local):
    """`lardo_ray.serve:app` on the real local Ray: concurrent HTTP requests, the same numbers as the model
    in-process, a refused SMILES with its reason, 400 for a malformed body."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from lardo_ray.models.mlflow_model import download
    from lardo_ray.models.saved import SavedModel
    from lardo_ray.serve import app

    uri, model_uri, *_ = registered
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"model": model_uri, "tracking_uri": uri, "num_cpus": "0.5"}), name="lardo", route_prefix="/")
        smiles = ZINC.read_text().splitlines()[1:41]

        def post(body: Any) -> tuple[int, dict]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        parts = [smiles[i : i + 5] + (["C1CC"] if i == 0 else []) for i in range(0, 40, 5)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: post({"smiles": p}), parts))
        assert all(code == 200 for code, _ in answers), answers
        got = [row for _, a in answers for row in a["predictions"]]
        assert got[5]["pred_p_np"] is None and got[5]["error"].startswith("unparsable_smiles")
        got = [row for row in got if row["error"] is None]
        _, mean, std = SavedModel(download(model_uri, uri)).predict(smiles)
        np.testing.assert_allclose([r["pred_p_np"] for r in got], mean[:, 0], atol=1e-6)
        np.testing.assert_allclose([r["pred_p_np_std"] for r in got], std[:, 0], atol=1e-6)
        code, body = post({"smi": ["CCO"]})
        assert code == 400 and "smiles" in body["error"]
        code, body = post(["CCO"])
        assert code == 400
    finally:
        serve.shutdown()


def test_forest_baselines_are_registered_and_predict_like_their_seeds(tmp_path):
    """rf_dsm and rf_ecfp seed ensembles are models too: registered, and their pyfunc gives the seeds'
    own test predictions averaged (the imputation medians travel with the forests); so does a forest on a
    GNN's embedding and the descriptors (finetune.head=forest: each seed's encoder travels with its forests)."""
    import mlflow
    import pandas as pd

    from lardo_ray.config import load_config
    from lardo_ray.finetune.data import prepare_task
    from lardo_ray.stages.finetune import baseline_method, registered_name, run_finetune_grid

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["finetune.limit=300", "finetune.seeds=[0, 1]", "finetune.baseline_trees=20",
                             "run.progress=false", f"tracking.tracking_uri={uri}", f"run.output_dir={tmp_path / 'o'}"])
    grid = run_finetune_grid(cfg, [baseline_method("rf_dsm"), baseline_method("rf_ecfp"),
                                   ("scratch+dsm+rf", None, {"head": "forest", "dsm_features": "all"})], use_ray=False)
    prepared = prepare_task(cfg.finetune)
    mlflow.set_tracking_uri(uri)
    try:
        for method in ("rf_dsm", "rf_ecfp", "scratch+dsm+rf"):
            res = grid.get("bbbp", method)
            assert res.registered == f"models:/{registered_name('bbbp', method)}/1", (res.registered, res.not_logged)
            smiles = [prepared.data.smiles[i] for i in res.seeds[0].test_index]
            out = mlflow.pyfunc.load_model(res.registered).predict(pd.DataFrame({"smiles": smiles}))
            np.testing.assert_allclose(out["pred_p_np"], np.mean([r.test_pred[:, 0] for r in res.seeds], axis=0),
                                       atol=1e-6)
            assert out["error"].isna().all()
    finally:
        mlflow.set_tracking_uri("")
