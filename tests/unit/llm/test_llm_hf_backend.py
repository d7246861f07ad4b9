"""The hf backend on a tiny random Llama built by the test: batching, left padding, token counts, errors."""

from __future__ import annotations

import pytest

from lardo_ray.llm.backends.base import create_backend, generate_fn
from lardo_ray.llm.cards import load_card
from lardo_ray.llm.settings import DescribeConfig, SamplingParams
from lardo_ray.llm.stage1 import build_template

PROMPTS = [
    [{"role": "system", "content": "You are a chemist."}, {"role": "user", "content": "Describe CCO."}],
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "You write short, factual descriptions of molecules for a dataset."},
     {"role": "user", "content": "Molecule (SMILES): CC(C)NCC(O)COc1cccc2ccccc12\n- LogP (Crippen): 2.58\n"
                                 "- Molecular weight: 259.3 g/mol"}],
    [{"role": "user", "content": "logP and polar surface area of aspirin"}],
    [{"role": "user", "content": "a b c d e f g h i j k l m n o p"}],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def hf(tiny_llm_dir):
    from lardo_ray.llm.backends.hf import HFBackend

    return HFBackend(tiny_llm_dir, device="cpu", dtype="float32", batch_size=4)


def test_batched_equals_one_at_a_time(hf):
    batched = hf.generate(PROMPTS, GREEDY)
    hf.batch_size = 1
    try:
        single = hf.generate(PROMPTS, GREEDY)
    finally:
        hf.batch_size = 4
    assert all(g.error in (None, "empty completion") for g in batched)
    assert sum(g.text is not None for g in batched) >= 3  # the comparison is not vacuous
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.completion_tokens for g in batched] == [g.completion_tokens for g in single]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]  # padding not counted
    for g, msgs in zip(batched, PROMPTS):
        assert 0 < g.completion_tokens <= GREEDY.max_tokens
        assert g.prompt_tokens == len(hf.tokenizer(hf.render(msgs), add_special_tokens=False)["input_ids"])
        assert g.latency_s > 0


def test_seeded_sampling_is_reproducible(hf):
    s = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=3)
    assert [g.text for g in hf.generate(PROMPTS[:3], s)] == [g.text for g in hf.generate(PROMPTS[:3], s)]


def test_too_long_prompt_fails_alone(hf):
    lengths = [len(hf.tokenizer(hf.render(m), add_special_tokens=False)["input_ids"]) for m in PROMPTS]
    hf.max_input_tokens = sorted(lengths)[2]
    try:
        out = hf.generate(PROMPTS, GREEDY)
    finally:
        hf.max_input_tokens = None
    for g, n in zip(out, lengths):
        if n > sorted(lengths)[2]:
            assert g.text is None and "prompt too long" in g.error
        else:
            assert g.error in (None, "empty completion")


def test_from_config_and_stage1_through_hf(tiny_llm_dir, hf):
    cfg = DescribeConfig(backend="hf", model=tiny_llm_dir, hf={"device": "cpu", "batch_size": 2},
                         sampling={"temperature": 0.0, "max_tokens_stage1": 12})
    backend = create_backend(cfg)
    assert backend.name == "hf" and backend.model == tiny_llm_dir and backend.batch_size == 2
    # random weights answer gibberish: stage 1 retries, then falls back to the card, saying why
    tpl = build_template(load_card("bbbp"), generate_fn(hf, cfg.sampling.for_stage(1)), max_retries=1,
                         model=tiny_llm_dir)
    assert tpl.source in ("llm", "card_default")
    if tpl.source == "card_default":
        assert tpl.fallback_reason and tpl.attempts == 2
