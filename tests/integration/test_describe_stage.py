"""The describe stage on Ray: rules for every molecule, a real (tiny) LLM on a slice, resume, summary."""

from __future__ import annotations

import importlib.util
import json

import pyarrow.parquet as pq
import pytest

from lardo_ray.config import load_config
from lardo_ray.stages.describe import run_describe
from lardo_ray.stages.ingest_dsm import run_dsm
from tests.conftest import SAMPLE
from tests.unit.llm.conftest import minilm_tokenizer_dir, tiny_llm_dir  # noqa: F401 - fixtures


def _cfg(tmp_path, *extra):
    lines = (SAMPLE / "bbbp.csv").read_text().splitlines()[:61]
    inp = tmp_path / "bbbp60.csv"
    inp.write_text("\n".join(lines) + "\nnot_a_smiles,0\n")
    return load_config(None, [
        f"input.path={inp}", "input.keep_columns=[p_np]", f"run.output_dir={tmp_path / 'out'}",
        "run.progress=false", "input.chunk_rows=25", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "dsm.descriptors=[rdkit]", "describe.task=bbbp", *extra,
    ])


def test_rules_describes_every_molecule_without_wrong_numbers(ray_local, tmp_path):
    cfg = _cfg(tmp_path)
    dsm = run_dsm(cfg)
    s = run_describe(cfg)
    assert s.reconciled and s.n_read == dsm.n_written == s.n_written
    rows = pq.read_table(str(tmp_path / "out" / "describe" / "data")).to_pylist()
    assert all(r["description"] and r["error"] is None and r["backend"] == "rules" for r in rows)
    assert sum(r["n_claims"] for r in rows) > len(rows)  # the text carries DSM facts...
    assert sum(r["n_wrong"] for r in rows) == 0  # ...and none of them wrong
    assert {r["p_np"] for r in rows} <= {0, 1}  # labels ride along
    tpl = json.loads((tmp_path / "out" / "describe" / "template.json").read_text())
    assert tpl["template_id"] == rows[0]["template_id"] and tpl["properties"]
    assert s.extra["halluc_before"] == 0.0 and s.extra["failed"] == 0
    again = run_describe(cfg)
    assert again.chunks_skipped == again.chunks_total


def test_tiny_llm_on_a_slice_rules_on_the_rest(ray_local, tmp_path, tiny_llm_dir):
    cfg = _cfg(tmp_path, "describe.backend=hf", f"describe.model={tiny_llm_dir}", "describe.llm_slice=7",
               "describe.sampling.max_tokens_stage2=12", "describe.sampling.max_tokens_stage1=24",
               "describe.sampling.temperature=0", "describe.hf.batch_size=4", "describe.ray.concurrency=1")
    run_dsm(cfg)
    s = run_describe(cfg)
    rows = pq.read_table(str(tmp_path / "out" / "describe" / "data")).to_pylist()
    assert len(rows) == s.n_written == s.n_read
    llm = [r for r in rows if r["backend"] == "hf"]
    assert len(llm) == 7 and s.extra["llm_rows"] == 7  # a global slice across chunks, not per actor
    assert all(r["completion_tokens"] > 0 and r["model"] == tiny_llm_dir for r in llm)
    assert all(r["backend"] == "rules" for r in rows if r not in llm)
    # Stage 1 asked the (random) LLM; its unusable answer falls back to the card, and says so.
    tpl = json.loads((tmp_path / "out" / "describe" / "template.json").read_text())
    assert tpl["source"] in ("llm", "card_default") and tpl["attempts"] >= 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_backend_in_waves_every_row_once(ray_local, tmp_path, monkeypatch):
    """`lardo-ray describe` with backend=vllm: ray.data.llm on CPU (a tiny Llama), waves regrouped per shard."""
    from tests.integration._tiny_llm import build_tiny_llama

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model = build_tiny_llama(tmp_path / "tiny", chat_template=False)
    cfg = _cfg(tmp_path, "describe.backend=vllm", f"describe.model={model}", "describe.llm_slice=30",
               "describe.sampling.max_tokens_stage2=8", "describe.sampling.temperature=0",
               "describe.vllm.gpu=false", "describe.vllm.dtype=float32", "describe.vllm.max_model_len=768",
               "describe.vllm.batch_size=8", "describe.vllm.wave_chunks=2", "describe.template_path=" + str(
                   _bbbp_template(tmp_path)))
    run_dsm(cfg)
    s = run_describe(cfg)
    rows = pq.read_table(str(tmp_path / "out" / "describe" / "data")).to_pylist()
    assert s.reconciled and len(rows) == s.n_read
    assert len({r["mol_id"] for r in rows}) == len(rows)
    assert sum(r["backend"] == "vllm" for r in rows) == 30
    assert all((r["description"] is None) != (r["error"] is None) for r in rows)
    assert not (tmp_path / "out" / "describe" / "_waves").exists() or not any(
        (tmp_path / "out" / "describe" / "_waves").iterdir())
    again = run_describe(cfg)
    assert again.chunks_skipped == again.chunks_total


def _bbbp_template(tmp_path):
    from lardo_ray.llm.cards import load_card
    from lardo_ray.llm.stage1 import default_template

    p = tmp_path / "tpl.json"
    default_template(load_card("bbbp"), "lardo").save(str(p))
    return p
