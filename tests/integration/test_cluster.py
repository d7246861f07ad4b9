"""Cluster use, tested offline and for real: cluster.yaml against the schema in the ray package, the KubeRay
RayJob manifest, and `ray job submit --working-dir .` of jobs/dsm.py and jobs/pipeline.py to a head this test
starts (`ray start --head`, dashboard on 127.0.0.1, Ray 2.60's token auth) and stops."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def _validated(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize("name", ["cluster.yaml", "deploy/gcp.yaml"])
def test_cluster_launcher_config_validates(name):
    cfg = _validated(ROOT / name)
    types = cfg["available_node_types"]
    # a CPU pool that autoscales for the RDKit stages, a GPU pool for vLLM and training
    cpu = [t for t in types.values() if "cpu_node" in t.get("resources", {})]
    gpu = [t for t in types.values() if "gpu_node" in t.get("resources", {})]
    assert cpu and cpu[0]["max_workers"] > cpu[0].get("min_workers", 0)
    assert gpu
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "[vllm" in setup
    assert "MLFLOW_TRACKING_URI" in " ".join(cfg["head_start_ray_commands"])


def test_cluster_launcher_config_with_a_wrong_key_is_refused(tmp_path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    raw["available_node_types"]["cpu_worker"]["max_wokers"] = 3
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(raw))


def test_rayjob_manifest_runs_the_pipeline_job():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "rayjob.yaml").read_text()))
    job = next(d for d in docs if d and d.get("kind") == "RayJob")
    assert job["apiVersion"].startswith("ray.io/")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/pipeline.py"]
    config = entry[entry.index("--config") + 1]
    assert (ROOT / config).exists() and (ROOT / entry[1]).exists()
    from lardo_ray.config import load_config

    load_config(ROOT / config)  # the config the manifest names validates
    groups = {g["groupName"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert {"cpu-workers", "gpu-workers"} <= groups
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "MLFLOW_TRACKING_URI" in env["env_vars"]


# --- a real head, real `ray job submit` --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` in its own process group: stopping it stops every process it started, and
    only those (the test session's own local Ray instance is left alone)."""
    tmp = tmp_path_factory.mktemp("head")
    gcs, dash, agent, client, metrics = (_free_port() for _ in range(5))
    # the venv first on PATH, as for a user who activated it: the job's `python` is the one with lardo_ray
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_DISABLE_USAGE_STATS="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         f"--metrics-export-port={metrics}", "--num-cpus=4", "--include-dashboard=true"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    env["RAY_API_SERVER_ADDRESS"] = url
    deadline = time.time() + 120
    while True:
        r = subprocess.run([str(BIN / "ray"), "job", "list"], env=env, capture_output=True, text=True)
        if r.returncode == 0:
            break
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"ray head did not start: {(tmp / 'head.log').read_text()[-3000:]}\n{r.stderr[-2000:]}")
        time.sleep(2)
    yield {"env": env, "url": url, "tmp": tmp}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def _submit(head, *args: str, timeout: int = 540) -> str:
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", *args],
        env=head["env"], cwd=str(ROOT), capture_output=True, text=True, timeout=timeout,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", out)
    assert job_id, out[-6000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", job_id.group(1)], env=head["env"],
                            capture_output=True, text=True, timeout=60)
    # the job server's own record, not only the submit command's exit code
    assert f"Job '{job_id.group(1)}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    return out


def _mlflow_runs(db: Path, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {db}"
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_ray_job_submit_dsm(head, tmp_path):
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    log = _submit(head, "jobs/dsm.py", "--input", "lardo_ray/data/bbbp.csv", "--output", str(out),
                  "--set", "input.limit=300", "--set", "dsm.descriptors=[MolLogP,MolWt,TPSA]",
                  "--set", f"tracking.tracking_uri=sqlite:///{db}", "--set", "tracking.experiment=job_dsm")
    assert "reconcile   read = written + rejected + duplicates: OK" in log
    manifest = json.loads((out / "dsm" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["read"] == 300
    t = pq.read_table(out / "dsm" / "data", columns=["mol_id", "MolLogP"])
    assert t.num_rows == manifest["counts"]["written"] >= 290
    runs = _mlflow_runs(db, "job_dsm")
    assert any(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_ray_job_submit_pipeline_demo_config(head, tmp_path):
    """The demo's config, shrunk (120 molecules, rules text, 1 epoch, 1 seed), as a submitted job."""
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    log = _submit(
        head, "jobs/pipeline.py", "--config", "configs/demo.yaml", "--output", str(out),
        "--set", "input.limit=120", "--set", "describe.backend=rules", "--set", "describe.model=null",
        "--set", "describe.llm_slice=null", "--set", "pretrain.epochs=1", "--set", "pretrain.num_workers=1",
        "--set", "finetune.seeds=[0]", "--set", "finetune.epochs=2",
        "--set", f"tracking.tracking_uri=sqlite:///{db}", "--set", "tracking.experiment=job_pipeline",
    )
    for stage in ("dsm", "describe", "embed", "featurize", "pretrain", "finetune"):
        assert (out / stage).is_dir(), f"no {stage} output\n{log[-3000:]}"
    assert "pipeline summary" in log
    # the demo's last step: a few drugs scored with the model the run registered, one refused with its reason
    assert "== predictions (models:/bbbp-rules_dsm/1" in log and "caffeine" in log and "(1 refused" in log, log[-3000:]
    assert len(list((out / "predict" / "data").glob("*.parquet"))) == 1
    names = {r.data.tags.get("mlflow.runName") for r in _mlflow_runs(db, "job_pipeline")}
    assert {"dsm", "describe", "pretrain"} & {n.split(":")[-1].split("/")[-1] for n in names if n}, names
