"""compare() against real MLflow stores: a sqlite file, and a real `mlflow server` (slow)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest

from lardo_ray.config_base import ConfigError
from lardo_ray.finetune.metrics import parent_summary
from lardo_ray.finetune.settings import CompareConfig
from lardo_ray.stages.compare import compare
from lardo_ray.tracking import finetune_tags

EXP = "ft_compare_test"

# (dataset, method, task_type, {seed: test metric}) logged as parent + one child per seed
CHILD_RUNS = [
    ("bbbp", "random-init", "classification", {0: 0.70, 1: 0.72, 2: 0.68}),
    ("bbbp", "lardo-gine", "classification", {0: 0.75, 1: 0.76, 2: 0.74}),
    ("esol", "random-init", "regression", {0: 1.20, 1: 1.10, 2: 1.30}),
    ("esol", "lardo-gine", "regression", {0: 0.90, 1: 1.00, 2: 0.95}),
    ("tox21", "random-init", "classification", {0: 0.71, 1: 0.73}),
]


@contextlib.contextmanager
def _uri(uri: str):
    import mlflow

    prev = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(prev)


def _log_runs(uri: str, full: bool = True) -> None:
    """Parents and per-seed children as the fine-tune stage logs them (fluent API, nested runs)."""
    import mlflow

    with _uri(uri):
        mlflow.set_experiment(EXP)
        with mlflow.start_run(run_name="pretrain", tags={"lardo.kind": "pretrain"}):
            mlflow.log_metric("loss", 1.0)
        for i, (ds, method, tt, by_seed) in enumerate(CHILD_RUNS):
            m = "roc_auc" if tt == "classification" else "rmse"
            with mlflow.start_run(run_name=f"{ds}/{method}",
                                  tags=finetune_tags(ds, method, "scaffold", encoder_run_id="abc",
                                                     task_type=tt)):
                per_seed = []
                for seed, v in by_seed.items():
                    # the second pair's children carry only the seed tag: compare inherits the rest
                    tags = ({"lardo.seed": str(seed)} if i == 1 else
                            finetune_tags(ds, method, "scaffold", task_type=tt, seed=seed))
                    with mlflow.start_run(run_name=f"seed{seed}", nested=True, tags=tags):
                        mets = {f"test_{m}": v, f"valid_{m}": v + 0.01}
                        if tt == "regression":
                            mets["test_mae"] = v * 0.8
                        mlflow.log_metrics(mets)
                        per_seed.append(mets)
                mlflow.log_metrics(parent_summary(per_seed))
        if not full:
            return
        # a rerun of seed 0 for bbbp/lardo-gine (the latest counts) and a FAILED child (ignored)
        time.sleep(0.01)
        with mlflow.start_run(run_name="bbbp/lardo-gine rerun",
                              tags=finetune_tags("bbbp", "lardo-gine", "scaffold", task_type="classification")):
            with mlflow.start_run(run_name="seed0", nested=True,
                                  tags=finetune_tags("bbbp", "lardo-gine", "scaffold", seed=0)):
                mlflow.log_metric("test_roc_auc", 0.77)
            with mlflow.start_run(run_name="seed1", nested=True,
                                  tags=finetune_tags("bbbp", "lardo-gine", "scaffold", seed=1)):
                mlflow.log_metric("test_roc_auc", 0.10)
                mlflow.set_tag("note", "crashed")
            client = mlflow.MlflowClient()
            failed = client.search_runs([mlflow.active_run().info.experiment_id],
                                        "tags.note = 'crashed'")[0].info.run_id
            client.set_terminated(failed, "FAILED")
        # a parent with aggregated metrics only (no children): compare falls back to it
        with mlflow.start_run(run_name="tox21/lardo-gine",
                              tags=finetune_tags("tox21", "lardo-gine", "scaffold", task_type="classification")):
            mlflow.log_metrics({"test_roc_auc_mean": 0.78, "test_roc_auc_std": 0.01, "n_seeds": 3})
        # the same model on another split
        with mlflow.start_run(run_name="bbbp/random-init random",
                              tags=finetune_tags("bbbp", "random-init", "random", task_type="classification")):
            with mlflow.start_run(run_name="seed0", nested=True,
                                  tags=finetune_tags("bbbp", "random-init", "random", seed=0)):
                mlflow.log_metric("test_roc_auc", 0.90)


def _check_result(res, out_dir) -> None:
    t = res.table.set_index(["dataset", "method"])
    bl = t.loc[("bbbp", "lardo-gine")]
    vals = [0.77, 0.76, 0.74]  # seed 0 from the rerun, the FAILED seed-1 rerun ignored
    assert bl["mean"] == pytest.approx(np.mean(vals)) and bl["std"] == pytest.approx(np.std(vals))
    assert bl["n"] == 3 and bl["source"] == "runs" and bl["is_best"]
    br = t.loc[("bbbp", "random-init")]
    assert br["mean"] == pytest.approx(0.70) and br["n"] == 3 and not br["is_best"]
    el = t.loc[("esol", "lardo-gine")]
    assert el["metric"] == "rmse" and el["mean"] == pytest.approx(0.95) and el["is_best"]  # lower is better
    assert not t.loc[("esol", "random-init")]["is_best"]
    tl = t.loc[("tox21", "lardo-gine")]
    assert tl["source"] == "parent" and tl["mean"] == pytest.approx(0.78) and tl["n"] == 3 and tl["is_best"]
    assert t.loc[("tox21", "random-init")]["n"] == 2

    md = res.markdown
    assert "deterministic Bemis-Murcko scaffold split 80/10/10" in res.title and res.title in md
    assert "| Dataset | Metric | lardo-gine | random-init |" in md
    bbbp_line = next(line for line in md.splitlines() if line.startswith("| BBBP"))
    assert "**75.7 ± 1.2 (n=3)**" in bbbp_line and "| 70.0 ± 1.6 (n=3) |" in bbbp_line
    assert "ROC-AUC (%) ↑" in bbbp_line
    esol_line = next(line for line in md.splitlines() if line.startswith("| ESOL"))
    assert "RMSE ↓" in esol_line and "**0.950 ± 0.041 (n=3)**" in esol_line and "**1.200" not in esol_line
    assert "repeated seed" in md  # the rerun is reported
    assert md.index("| BBBP") < md.index("| Tox21") < md.index("| ESOL")  # card order

    csv = pd.read_csv(res.csv_path)
    assert {"dataset", "method", "metric", "mean", "std", "n", "source", "is_best", "split"} <= set(csv.columns)
    assert len(csv) == 6 and set(csv["split"]) == {"scaffold"}
    assert open(res.markdown_path, encoding="utf-8").read() == md
    with open(res.png_path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(res.png_path) > 5_000
    assert os.path.dirname(res.png_path) == str(out_dir)


def test_compare_on_sqlite(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_runs(uri)
    out = tmp_path / "cmp"

    # the experiment mixes splits: refuse to average them together
    with pytest.raises(ConfigError, match="different splits"):
        compare(CompareConfig(experiment=EXP, tracking_uri=uri, output_dir=str(out)))

    res = compare(CompareConfig(experiment=EXP, tracking_uri=uri, output_dir=str(out), split="scaffold"),
                  echo=True)
    _check_result(res, out)
    assert res.markdown in capsys.readouterr().out
    assert "published" not in res.markdown

    # published anchors only when asked, marked and never bold
    pub = compare(CompareConfig(experiment=EXP, tracking_uri=uri, output_dir=str(out), split="scaffold",
                                include_published=True, name="with_published"))
    line = next(x for x in pub.markdown.splitlines() if x.startswith("| BBBP"))
    assert "MolCLR-GIN (published)" in pub.markdown and "*73.6* †" in line and "**73.6" not in line
    assert "*71.2* †" in line and "*70.8* †" in line
    tox = next(x for x in pub.markdown.splitlines() if x.startswith("| Tox21"))
    assert "*79.8* †" in tox and "**78.0 ± 1.0 (n=3)**" in tox
    esol = next(x for x in pub.markdown.splitlines() if x.startswith("| ESOL"))
    assert "†" not in esol  # no published ROC-AUC anchors for a regression set
    assert pub.table["published"].sum() == 6  # BBBP x3, Tox21 x3

    # split as a group key: both splits side by side, the random one as its own column
    both = compare(CompareConfig(experiment=EXP, tracking_uri=uri, output_dir=str(out), name="by_split",
                                 group_by=["dataset", "method", "split"]))
    assert "random-init / random" in both.markdown and "random-init / scaffold" in both.markdown

    # filters and sources
    only = compare(CompareConfig(experiment=EXP, tracking_uri=uri, output_dir=str(out), split="scaffold",
                                 datasets=["BBBP"], source="parents", name="parents"))
    assert set(only.table["dataset"]) == {"bbbp"} and set(only.table["source"]) == {"parent"}

    with pytest.raises(ConfigError, match="not found"):
        compare(CompareConfig(experiment="nope", tracking_uri=uri, output_dir=str(out)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_compare_against_mlflow_server(tmp_path):
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}): "
                            + (tmp_path / "server.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("mlflow server did not answer /health within 180 s")
            time.sleep(0.5)
        _log_runs(uri)
        out = tmp_path / "cmp"
        res = compare(CompareConfig(experiment=EXP, tracking_uri=uri, output_dir=str(out), split="scaffold"))
        _check_result(res, out)
    finally:
        # the server and its uvicorn worker share the session/process group started above
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_task_modes_named_and_never_averaged_together(tmp_path):
    """The same method fine-tuned multitask and per target on Tox21: two columns, each cell naming its
    protocol; a single-target set's cells name none."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'modes.db'}"
    runs = [("tox21", "scratch", "multitask", [0.70, 0.72]), ("tox21", "scratch", "per_target", [0.76, 0.78]),
            ("tox21", "rf_dsm", "per_target", [0.77, 0.77]), ("bbbp", "scratch", "single_task", [0.70, 0.71])]
    with _uri(uri):
        mlflow.set_experiment(EXP)
        for ds, method, mode, vals in runs:
            with mlflow.start_run(run_name=f"{ds}/{method}", tags=finetune_tags(
                    ds, method, "scaffold", task_type="classification", task_mode=mode)):
                for seed, v in enumerate(vals):
                    with mlflow.start_run(run_name=f"seed{seed}", nested=True, tags=finetune_tags(
                            ds, method, "scaffold", task_type="classification", seed=seed, task_mode=mode)):
                        mlflow.log_metrics({"test_roc_auc": v, "valid_roc_auc": v})
    res = compare(CompareConfig(experiment=EXP, tracking_uri=uri, output_dir=str(tmp_path / "out"), bootstrap=0))
    t = res.table.set_index(["dataset", "method"])
    assert t.loc[("tox21", "scratch (multitask)")]["mean"] == pytest.approx(0.71)
    assert t.loc[("tox21", "scratch (per_target)")]["mean"] == pytest.approx(0.77)
    assert t.loc[("tox21", "rf_dsm")]["task_mode"] == "per_target"
    assert t.loc[("bbbp", "scratch")]["mean"] == pytest.approx(0.705)
    tox = next(line for line in res.markdown.splitlines() if line.startswith("| Tox21"))
    assert "71.0 ± 1.0 (n=2, multitask)" in tox and "77.0 ± 1.0 (n=2, per_target)" in tox
    bbbp = next(line for line in res.markdown.splitlines() if line.startswith("| BBBP"))
    assert "(n=2)" in bbbp and "single_task" not in bbbp
    assert "*per_target* = one model per target" in res.markdown
