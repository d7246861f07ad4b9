"""The one backend interface of the describe stage, and the registry of backends by name.

Every backend implements ``generate(prompts, sampling) -> list[Generation]`` (chat messages in, text out,
one Generation per prompt, in order, never raising for a single bad prompt) and inherits the batch-level
``describe_batch(records, sampling)`` which stage 2 calls. Real LLMs only need ``generate``; the rules backend
overrides ``describe_batch`` because it writes from the structured inputs (template + DSM values) instead
of the prompt text.

Backends are registered as ``"module:Class"`` strings and imported on first use, so choosing ``rules`` never
imports torch, and ``openai``/``vllm`` never load transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lardo_ray.llm.settings import DescribeConfig, SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from lardo_ray.llm.stage1 import Template

Messages = list[dict[str, str]]


@dataclass
class Generation:
    """One completion. ``text`` is None when ``error`` says why (the row is kept, with the error)."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None

    @classmethod
    def failed(cls, error: str, latency_s: float = 0.0, prompt_tokens: int = 0) -> "Generation":
        return cls(text=None, prompt_tokens=prompt_tokens, completion_tokens=0, latency_s=latency_s, error=error)


@dataclass
class DescribeRecord:
    """One molecule's stage-2 request: the prompt and the structured inputs it was built from."""

    smiles: str
    messages: Messages
    values: dict[str, float]
    template: "Template"
    prompt_descriptors: list[str] = field(default_factory=list)  # DSM values that appear in the prompt
    mol_id: str | None = None
    prompt_set: str = "lardo"
    variant: str = "full"


class LLMBackend:
    """Base class. Subclasses set ``name`` and implement ``generate`` and ``from_config``."""

    name: str = "base"
    # True when outputs carry sampling randomness (the row's sampling params are recorded and hashed).
    uses_sampling: bool = True

    def __init__(self, model: str):
        self.model = model

    @classmethod
    def from_config(cls, cfg: DescribeConfig) -> "LLMBackend":
        raise NotImplementedError

    def generate(self, prompts: list[Messages], sampling: SamplingParams) -> list[Generation]:
        raise NotImplementedError

    def describe_batch(self, records: list[DescribeRecord], sampling: SamplingParams) -> list[Generation]:
        if not records:
            return []
        return self.generate([r.messages for r in records], sampling)

    def close(self) -> None:
        """Free the model/engine/connections (optional)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"


_REGISTRY: dict[str, Any] = {
    "rules": "lardo_ray.llm.backends.rules:RulesBackend",
    "hf": "lardo_ray.llm.backends.hf:HFBackend",
    # Not written yet in this package: registering the module path keeps the error message useful.
    "openai": "lardo_ray.llm.backends.openai:OpenAIBackend",
    "vllm": "lardo_ray.llm.backends.vllm:VLLMBackend",
}


def register_backend(name: str, target: str | type[LLMBackend]) -> None:
    """Add or replace a backend: a class or ``"package.module:ClassName"`` (imported lazily)."""
    _REGISTRY[name] = target


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend_class(name: str) -> type[LLMBackend]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown backend {name!r}; choices: {available_backends()}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module_name, _, cls_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ImportError(f"backend {name!r} needs module {module_name!r}, which cannot be imported: {e}") from e
        target = getattr(module, cls_name)
        _REGISTRY[name] = target
    return target


def create_backend(cfg: DescribeConfig, name: str | None = None) -> LLMBackend:
    """Build the backend named by ``cfg.backend`` (or ``name``) from the config. Heavy: once per actor."""
    return get_backend_class(name or cfg.backend).from_config(cfg)


def generate_fn(backend: LLMBackend, sampling: SamplingParams) -> Callable[[Messages], str]:
    """A one-prompt text function for ``stage1.build_template``: raises on errors, new seed per call
    (so a retry of an unparsable answer is not the same answer again under seeded sampling)."""
    calls = {"n": 0}

    def fn(messages: Messages) -> str:
        seed = None if sampling.seed is None else sampling.seed + calls["n"]
        calls["n"] += 1
        g = backend.generate([messages], sampling.with_seed(seed))[0]
        if g.error is not None or g.text is None:
            raise RuntimeError(g.error or "empty generation")
        return g.text

    return fn
