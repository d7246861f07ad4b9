"""The DSM stage for real: local Ray cluster, RDKit, MLflow on sqlite, every input format."""

from __future__ import annotations

import gzip
import math
import os
import signal
import subprocess
import sys
import time

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rdkit import Chem
from rdkit.Chem import Descriptors

from lardo_ray.config import load_config
from lardo_ray.stages.ingest_dsm import run_dsm
from tests.conftest import BAD_SMILES, GOOD_SMILES, ROOT, SAMPLE
from tests.integration.conftest import run_cli

# Good molecules, every kind of bad row, and duplicates (the same molecule written differently, and again).
ROWS = GOOD_SMILES + list(BAD_SMILES) + ["OC(=O)c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O", "c1ccccc1C(O)=O"]
N_DUPLICATES = 3  # benzoic acid twice more (after salt stripping), aspirin once more
SUBSET = ["MolLogP", "MolWt", "TPSA", "NumHDonors", "qed", "fr_benzene", "LipinskiPass"]


def _write(fmt: str, d) -> tuple[str, dict]:
    labels = [i % 2 for i in range(len(ROWS))]
    if fmt == "csv.gz":
        p = d / "in.csv.gz"
        text = "smiles,label\n" + "".join(f'"{s}",{y}\n' for s, y in zip(ROWS, labels))
        p.write_bytes(gzip.compress(text.encode()))
        return str(p), {}
    if fmt == "tsv":
        p = d / "in.tsv"
        p.write_text("smiles\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in zip(ROWS, labels)))
        return str(p), {}
    if fmt == "smi":
        p = d / "in.smi"
        p.write_text("".join(f"{s} name{i}\n" if s else "\n" for i, s in enumerate(ROWS)))
        return str(p), {}
    if fmt == "parquet":
        (d / "pq").mkdir()
        half = len(ROWS) // 2
        pq.write_table(pa.table({"SMILES": ROWS[:half]}), d / "pq" / "a.parquet", row_group_size=4)
        pq.write_table(pa.table({"SMILES": ROWS[half:]}), d / "pq" / "b.parquet")
        return str(d / "pq"), {"input.smiles_column": "SMILES"}
    if fmt == "hf":
        import datasets

        datasets.Dataset.from_dict({"smiles": ROWS}).save_to_disk(str(d / "hf"))
        return str(d / "hf"), {}
    raise AssertionError(fmt)


def _cfg(tmp_path, path, extra=(), **top):
    over = [f"input.path={path}", f"run.output_dir={tmp_path / 'out'}", "input.chunk_rows=5", "run.progress=false",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    over += [f"{k}={v}" for k, v in top.items()]
    return load_config(None, over)


@pytest.mark.parametrize("fmt", ["csv.gz", "tsv", "smi", "parquet", "hf"])
def test_every_format_reconciles(ray_local, tmp_path, fmt):
    path, extra = _write(fmt, tmp_path)
    cfg = _cfg(tmp_path, path, [f"dsm.descriptors=[{','.join(SUBSET)}]"], **extra)
    s = run_dsm(cfg)
    n_bad = len(BAD_SMILES)
    assert s.n_read == len(ROWS)
    assert s.n_duplicates == N_DUPLICATES
    assert s.n_rejected == n_bad
    assert s.n_written == len(ROWS) - n_bad - N_DUPLICATES
    assert s.reconciled
    assert s.rejected_by_reason == {"empty": 1, "unparsable_smiles": 3, "sanitization_failed": 2, "too_many_atoms": 1}
    data = pq.read_table(str(tmp_path / "out" / "dsm" / "data"))
    assert data.num_rows == s.n_written
    assert len(set(data.column("mol_id").to_pylist())) == data.num_rows
    rej = pq.read_table(str(tmp_path / "out" / "dsm" / "rejected"))
    assert sorted(r for r in rej.column("reason").to_pylist()).count("duplicate") == N_DUPLICATES
    # The original text of each bad row is kept beside its reason.
    # .smi lines are "SMILES name", so there the molecule's text is the first word.
    assert ("not" if fmt == "smi" else "not a molecule") in rej.column("input_smiles").to_pylist()


def test_full_descriptor_set_equals_rdkit_and_is_logged(ray_local, tmp_path):
    path, _ = _write("csv.gz", tmp_path)
    cfg = _cfg(tmp_path, path, ["input.keep_columns=[label]"])
    s = run_dsm(cfg)
    data = pq.read_table(str(tmp_path / "out" / "dsm" / "data")).to_pylist()
    assert len(data) == s.n_written
    for row in data:
        ref = Descriptors.CalcMolDescriptors(Chem.MolFromSmiles(row["smiles"]))
        assert len(ref) >= 210
        for name, r in ref.items():
            v = row[name]
            assert (math.isnan(v) and (r is None or math.isnan(r))) or v == r, (row["smiles"], name)
        assert row["label"] in (0, 1)
    manifest = (tmp_path / "out" / "dsm" / "manifest.json").read_text()
    assert '"status": "complete"' in manifest and '"duplicates": 3' in manifest
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lardo_ray")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.data.metrics["n_read"] == len(ROWS) and r.data.metrics["reconciled"] == 1.0
    assert r.data.params["input.chunk_rows"] == "5"
    assert r.data.params["dsm.descriptors"] == "all"


def test_rerun_skips_finished_chunks(ray_local, tmp_path):
    path, _ = _write("tsv", tmp_path)
    cfg = _cfg(tmp_path, path, ["dsm.descriptors=[MolLogP]"])
    first = run_dsm(cfg)
    second = run_dsm(cfg)
    assert second.chunks_skipped == second.chunks_total == first.chunks_total
    assert (second.n_written, second.n_rejected, second.n_duplicates) == (first.n_written, first.n_rejected, first.n_duplicates)
    # Other settings over the same output refuse to mix results, naming the way out.
    from lardo_ray.config import ConfigError

    with pytest.raises(ConfigError, match="run.overwrite"):
        run_dsm(_cfg(tmp_path, path, ["dsm.descriptors=[TPSA]"]))


def _zinc_input(tmp_path, n):
    lines = (SAMPLE / "zinc_sample.csv").read_text().splitlines()[: n + 1]
    p = tmp_path / "zinc.csv"
    p.write_text("\n".join(lines + ["C1CC", "CCO", "CCO"]) + "\n")
    return p


def test_killed_job_resumes_without_duplicates(tmp_path):
    """Kill the driver (and its Ray) mid-stage, re-run the same command: same result as one clean run."""
    inp = _zinc_input(tmp_path, 400)
    common = ["dsm", "--input", str(inp), "--set", "input.chunk_rows=25", "--set", "dsm.ray.concurrency=1",
              "--set", "dsm.descriptors=[rdkit]", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lardo_ray.cli", *common, "--output", str(out)],
                                cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    done_dir = out / "dsm" / "_done"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and (
        not done_dir.exists() or len(list(done_dir.glob("*.json"))) < 3
    ):
        time.sleep(0.2)
    n_done_at_kill = len(list(done_dir.glob("*.json"))) if done_dir.exists() else 0
    exited_early = proc.poll()
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (same session)
    proc.wait()
    assert exited_early is None, log_path.read_text()[-3000:]
    assert 3 <= n_done_at_kill < 17, (n_done_at_kill, log_path.read_text()[-3000:])  # really mid-stage

    resumed = run_cli(*common, "--output", str(out), timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = int(resumed.stdout.split("chunks")[-1].split("(")[1].split()[0])
    assert skipped >= n_done_at_kill
    assert "reconcile   read = written + rejected + duplicates: OK" in resumed.stdout

    clean = run_cli(*common, "--output", str(tmp_path / "clean"), timeout=400)
    assert clean.returncode == 0, clean.stderr[-3000:]
    a = pq.read_table(str(out / "dsm" / "data")).sort_by("mol_id")
    b = pq.read_table(str(tmp_path / "clean" / "dsm" / "data")).sort_by("mol_id")
    assert a.column("mol_id").to_pylist() == b.column("mol_id").to_pylist()
    assert len(set(a.column("mol_id").to_pylist())) == a.num_rows == 401  # 400 + CCO once
    assert a.drop_columns(["dsm_error"]).equals(b.drop_columns(["dsm_error"]))
    # A kill mid-write may leave a *.tmp-* file behind: the stage reads shards by the manifest's chunk ids,
    # never by listing, so such a leftover is never data.
    from lardo_ray.io import StageOutput

    so = StageOutput(str(out / "dsm"))
    listed = set(so.data_files(so.read_manifest()["chunks"]))
    assert listed == {str(p) for p in (out / "dsm" / "data").glob("part-*.parquet")}
    assert not any(".tmp-" in f for f in listed)
    ra = pq.read_table(str(out / "dsm" / "rejected"))
    assert sorted(ra.column("reason").to_pylist()) == ["duplicate", "unparsable_smiles"]


def test_cli_bad_config_fails_fast_naming_the_key(tmp_path):
    t0 = time.time()
    r = run_cli("dsm", "--input", str(SAMPLE / "bbbp.csv"), "--output", str(tmp_path / "o"), "--set", "dsm.descriptorz=all")
    assert r.returncode == 2
    assert "unknown config key 'dsm.descriptorz'" in r.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "o").exists()  # no work started


def test_cli_missing_smiles_column_is_clear(tmp_path):
    r = run_cli("dsm", "--input", str(SAMPLE / "bbbp.csv"), "--output", str(tmp_path / "o"), "--smiles-column", "SMILES")
    assert r.returncode == 2
    assert "['SMILES'] not found" in r.stderr and "smiles" in r.stderr


def test_cli_help_and_descriptor_list():
    r = run_cli("dsm", "--help")
    assert r.returncode == 0 and "--smiles-column" in r.stdout and "--set" in r.stdout
    r = run_cli("dsm", "--list-descriptors")
    assert r.returncode == 0 and "MolLogP" in r.stdout and "fr_amide" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "dsm.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--input" in r.stdout
