"""DescribeStage2 end to end on 20 BBBP molecules: rules, a tiny hf model, planted errors, failures kept."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from lardo_ray.llm.backends.base import Generation, LLMBackend
from lardo_ray.llm.backends.rules import RulesBackend
from lardo_ray.llm.cards import load_card
from lardo_ray.llm.describe import OUTPUT_COLUMNS, USE_LLM, DescribeStage2
from lardo_ray.llm.settings import DescribeConfig
from lardo_ray.llm.stage1 import default_template


@pytest.fixture(scope="module")
def template():
    return default_template(load_card("bbbp"))


class FakeLLM(LLMBackend):
    """Answers with a fixed text per call number; records what it was asked."""

    name = "fake"

    def __init__(self, texts_per_call, fail_rows=()):
        super().__init__("fake-model")
        self.texts_per_call = texts_per_call
        self.fail_rows = set(fail_rows)
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append((prompts, sampling))
        text = self.texts_per_call[min(len(self.calls), len(self.texts_per_call)) - 1]
        out = []
        for i, p in enumerate(prompts):
            if len(self.calls) == 1 and i in self.fail_rows:
                out.append(Generation.failed("server said no", latency_s=0.01))
            else:
                out.append(Generation(text=text, prompt_tokens=100, completion_tokens=20, latency_s=0.5))
        return out


def test_rules_end_to_end(bbbp20, template, make_dsm_table):
    cfg = DescribeConfig(task="bbbp", backend="rules")
    stage = DescribeStage2(cfg, template, RulesBackend())
    out = stage(bbbp20)
    assert out.num_rows == 20 and out.column_names[: len(OUTPUT_COLUMNS)] == OUTPUT_COLUMNS
    assert {"input_smiles", "p_np"} <= set(out.column_names) and "MolLogP" not in out.column_names
    rows = out.to_pylist()
    assert all(r["error"] is None and r["description"] for r in rows)
    assert all(r["n_wrong"] == 0 and r["n_wrong_before"] == 0 and r["n_claims"] == 6 for r in rows)
    assert {r["backend"] for r in rows} == {"rules"} and {r["model"] for r in rows} == {"rules-v1"}
    assert {r["template_id"] for r in rows} == {template.template_id} and rows[0]["sampling_params"] == "{}"
    assert rows[0]["mol_id"] == bbbp20.column("mol_id")[0].as_py()
    # deterministic, and the same whether descriptors come from the batch or are computed on the fly
    again = DescribeStage2(cfg, template, RulesBackend())(make_dsm_table(20, descriptors=()))
    assert again.column("description").to_pylist() == out.column("description").to_pylist()
    assert again.column("cache_key").to_pylist() == out.column("cache_key").to_pylist()
    assert len(set(out.column("cache_key").to_pylist())) == 20


def test_invalid_smiles_row_is_kept(template):
    batch = pa.table({"mol_id": ["a", "b"], "smiles": ["CCO", "C1CC(("]})
    out = DescribeStage2(DescribeConfig(), template, RulesBackend())(batch).to_pylist()
    assert out[0]["description"] and out[0]["error"] is None
    assert out[1]["description"] is None and "invalid SMILES" in out[1]["error"] and out[1]["n_claims"] is None


PLANTED = "LogP (Crippen): 9.99 - very high.\nMolecular weight: 1.0 g/mol - tiny.\nOverall: odd."


def test_postcheck_correct_fixes_planted_numbers(bbbp20, template):
    fake = FakeLLM([PLANTED], fail_rows=[3])
    cfg = DescribeConfig(backend="openai", model="fake-model", postcheck="correct",
                         sampling={"temperature": 0.0, "seed": 1})
    rows = DescribeStage2(cfg, template, fake)(bbbp20).to_pylist()
    assert rows[3]["description"] is None and rows[3]["error"] == "server said no"  # failed row kept
    ok = [r for i, r in enumerate(rows) if i != 3]
    assert all(r["n_claims_before"] == 2 and r["n_wrong_before"] == 2 for r in ok)
    assert all(r["n_claims"] == 2 and r["n_wrong"] == 0 for r in ok)
    logp = bbbp20.column("MolLogP").to_pylist()
    assert f"LogP (Crippen): {logp[0]:.2f} - very high." in ok[0]["description"]
    assert json.loads(ok[0]["wrong_claims"])[0]["claimed"] == 9.99
    assert json.loads(ok[0]["sampling_params"]) == {"max_tokens": 200, "seed": 1, "temperature": 0.0, "top_p": 0.95}
    assert ok[0]["backend"] == "fake" and ok[0]["prompt_tokens"] == 100 and ok[0]["completion_tokens"] == 20
    # the prompt the fake got is the lardo stage-2 prompt with this molecule's values
    assert bbbp20.column("smiles")[0].as_py() in fake.calls[0][0][0][1]["content"]


def test_postcheck_flag_and_off(bbbp20, template):
    flag = DescribeStage2(DescribeConfig(postcheck="flag"), template, FakeLLM([PLANTED]))(bbbp20).to_pylist()
    assert flag[0]["description"] == PLANTED and flag[0]["n_wrong"] == 2 == flag[0]["n_wrong_before"]
    off = DescribeStage2(DescribeConfig(postcheck="off"), template, FakeLLM([PLANTED]))(bbbp20).to_pylist()
    assert off[0]["n_claims"] is None and off[0]["n_wrong_before"] is None and off[0]["description"] == PLANTED


def test_regenerate_then_correct(bbbp20, template):
    batch = bbbp20.slice(0, 4)
    mw = batch.column("MolWt").to_pylist()
    # second call: right molecular weight for row 0 only (the fake returns one text for all rows)
    better = f"Molecular weight: {mw[0]:.1f} g/mol."
    fake = FakeLLM([PLANTED, better])
    cfg = DescribeConfig(postcheck="regenerate", max_regenerations=2, sampling={"seed": 5})
    rows = DescribeStage2(cfg, template, fake)(batch).to_pylist()
    assert len(fake.calls) == 3  # first pass, then two regenerations of the still-wrong rows
    assert fake.calls[1][1].seed == 6 and fake.calls[2][1].seed == 7  # a new seed per attempt
    assert rows[0]["description"] == better and rows[0]["n_regenerations"] == 1
    assert all(r["n_wrong_before"] == 2 and r["n_wrong"] == 0 for r in rows)
    assert rows[1]["n_regenerations"] == 2 and rows[1]["prompt_tokens"] == 300  # tokens of all attempts


def test_backend_crash_keeps_rows(bbbp20, template):
    class Broken(LLMBackend):
        name = "broken"

        def generate(self, prompts, sampling):
            raise RuntimeError("CUDA out of memory")

    rows = DescribeStage2(DescribeConfig(), template, Broken("m"))(bbbp20.slice(0, 3)).to_pylist()
    assert all(r["description"] is None and "CUDA out of memory" in r["error"] for r in rows)


def test_llm_slice_routes_the_rest_to_rules(bbbp20, template):
    cfg = DescribeConfig(llm_slice=5)
    stage = DescribeStage2(cfg, template, FakeLLM(["Overall: fine."]))
    first = stage(bbbp20.slice(0, 3)).column("backend").to_pylist()
    second = stage(bbbp20.slice(3, 10)).column("backend").to_pylist()
    assert first == ["fake"] * 3 and second == ["fake"] * 2 + ["rules"] * 8
    marked = bbbp20.slice(0, 4).append_column(USE_LLM, pa.array([True, False, True, False]))
    assert stage(marked).column("backend").to_pylist() == ["fake", "rules", "fake", "rules"]


def test_no_stage1_variant_uses_generic_template(bbbp20):
    cfg = DescribeConfig(variant="no_stage1")
    fake = FakeLLM(["Overall: fine."])
    out = DescribeStage2(cfg, None, fake)(bbbp20.slice(0, 2)).to_pylist()
    assert out[0]["template_id"].startswith("tpl-")
    assert "Fraction of sp3 carbons (Fsp3)" in fake.calls[0][0][0][1]["content"]
    with pytest.raises(ValueError):
        DescribeStage2(DescribeConfig(), None, fake)


def test_tiny_hf_end_to_end(bbbp20, tiny_llm_dir, template):
    from lardo_ray.llm.backends.hf import HFBackend

    cfg = DescribeConfig(backend="hf", model=tiny_llm_dir, hf={"device": "cpu", "batch_size": 8},
                         sampling={"temperature": 0.0, "max_tokens_stage2": 8}, postcheck="correct")
    backend = HFBackend.from_config(cfg)
    stage = DescribeStage2(cfg, template, backend)
    # make the longest prompts fail: their rows must come back with an error and no description
    lengths = []
    for s, rec in zip(bbbp20.column("smiles").to_pylist(), stage.prepare(bbbp20).records):
        lengths.append(len(backend.tokenizer(backend.render(rec.messages), add_special_tokens=False)["input_ids"]))
    limit = sorted(lengths)[14]
    backend.max_input_tokens = limit
    out = stage(bbbp20)
    rows = out.to_pylist()
    assert out.num_rows == 20
    failed = [r for r, n in zip(rows, lengths) if n > limit]
    assert failed and all(r["description"] is None and "prompt too long" in r["error"] for r in failed)
    done = [r for r, n in zip(rows, lengths) if n <= limit]
    assert sum(r["description"] is not None for r in done) >= len(done) - 2
    for r in done:
        if r["description"] is not None:
            assert r["backend"] == "hf" and r["model"] == tiny_llm_dir and r["prompt_tokens"] > 100
            assert 0 < r["completion_tokens"] <= 8 and r["n_wrong"] == 0 and r["error"] is None
    assert json.loads(rows[0]["sampling_params"])["max_tokens"] == 8


def test_backend_registry_is_extensible():
    from lardo_ray.llm.backends.base import (
        available_backends, create_backend, generate_fn, get_backend_class, register_backend,
    )
    from lardo_ray.llm.settings import SamplingParams

    assert {"rules", "hf", "openai", "vllm"} <= set(available_backends())
    assert get_backend_class("rules") is RulesBackend
    with pytest.raises(KeyError, match="unknown backend"):
        get_backend_class("nope")

    class Echo(LLMBackend):
        name = "echo"

        @classmethod
        def from_config(cls, cfg):
            return cls(cfg.model_name)

        def generate(self, prompts, sampling):
            return [Generation(text=f"{p[-1]['content']}|{sampling.seed}") for p in prompts]

    register_backend("echo", Echo)
    b = create_backend(DescribeConfig(model="m"), name="echo")
    assert isinstance(b, Echo) and b.model == "m"
    fn = generate_fn(b, SamplingParams(seed=10))
    assert fn([{"role": "user", "content": "x"}]) == "x|10" and fn([{"role": "user", "content": "x"}]) == "x|11"


def test_resolve_template(tmp_path, template):
    from lardo_ray.llm.describe import resolve_template

    assert resolve_template(DescribeConfig(task="bbbp")).template_id == template.template_id  # rules: card
    assert resolve_template(DescribeConfig(variant="no_stage1")).source == "generic"
    cfg = DescribeConfig(task="esol", backend="openai", model="m", template_cache_dir=str(tmp_path))
    tpl = resolve_template(cfg, backend=FakeLLM(['[{"property": "logP", "direction": "lower"}]']))
    assert tpl.source == "llm" and tpl.descriptors() == ["MolLogP"] and tpl.model == "m"
    path = tpl.save(tmp_path / "saved.json")
    assert resolve_template(DescribeConfig(template_path=str(path))).template_id == tpl.template_id
