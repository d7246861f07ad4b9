"""Config sections of pre-training: the model and the pretrain stage (pydantic only: cheap to import for --help).

Defaults follow the OGB / pretrain-gnns / KANO line that MolGraph-LarDo builds on: a 5-layer GINE with 300
hidden units, a 128-d shared projection space and an initial InfoNCE temperature of 0.07.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lardo_ray.config_base import Section


class ModelConfig(Section):
    """Graph encoder (GINE), text side and the shared projection space."""

    num_layers: int = Field(default=5, ge=1, description="GINE message-passing layers")
    hidden: int = Field(default=300, ge=1, description="GINE hidden / embedding width")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout after every GINE layer")
    pooling: Literal["mean", "sum", "max", "attention"] = Field(
        default="mean", description="graph readout over the node embeddings"
    )
    jk: Literal["last", "sum", "concat"] = Field(
        default="last", description="jumping knowledge: which layer outputs make the node embedding"
    )
    batch_norm: bool = Field(default=True, description="batch norm after every GINE layer")
    text_encoder: str | None = Field(
        default=None,
        description="HF encoder name/path for the in-loop text side; None = bundled all-MiniLM-L6-v2",
    )
    freeze_text: bool = Field(
        default=True,
        description="true: train on precomputed text embeddings (embed stage) through an MLP head; "
        "false: run the text encoder in the loop and fine-tune its last `text_trainable_layers` layers",
    )
    text_trainable_layers: int = Field(
        default=2, ge=-1, description="with freeze_text=false: transformer layers to fine-tune (-1 = all)"
    )
    text_max_length: int = Field(default=128, ge=8, description="tokens per description for the in-loop encoder")
    text_dim: int | None = Field(
        default=None, ge=1, description="width of precomputed text embeddings; None = read from the data"
    )
    projection_dim: int = Field(default=128, ge=1, description="width of the shared graph-text space")
    projection_hidden: int | None = Field(
        default=None, ge=1, description="hidden width of the projection MLPs; None = the input width"
    )
    temperature_init: float = Field(default=0.07, gt=0.0, description="initial InfoNCE temperature (learnable)")
    learn_temperature: bool = Field(default=True, description="learn the temperature (CLIP) or keep it fixed")


class DeepSpeedConfig(Section):
    """Optional DeepSpeed engine (on CPU: DS_ACCELERATOR=cpu, gloo, torch Adam)."""

    enabled: bool = Field(default=False, description="train through deepspeed.initialize instead of plain torch")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="ZeRO optimisation stage")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="training precision (fp16 needs a GPU; bf16 works on recent CPUs and GPUs)"
    )
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step (plain torch too)")
    micro_batch: int | None = Field(
        default=None,
        ge=2,
        description="DeepSpeed train_micro_batch_size_per_gpu: rows per forward pass per worker (the in-batch "
        "negatives), overriding pretrain.batch_size when set; None = pretrain.batch_size",
    )
    gradient_clipping: float = Field(default=1.0, ge=0.0, description="max global grad norm; 0 = no clipping")


class PretrainConfig(Section):
    """Graph-text contrastive pre-training (lardo_ray.train.loop)."""

    epochs: int = Field(default=20, ge=1, description="passes over the training rows")
    batch_size: int = Field(
        default=256, ge=2, description="rows per micro-batch per worker: the in-batch negatives of InfoNCE"
    )
    lr: float = Field(default=1e-3, gt=0.0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(
        default=1e-5, ge=0.0, description="AdamW weight decay (not on biases/norms/temperature)"
    )
    schedule: Literal["cosine", "constant"] = Field(
        default="cosine", description="learning-rate schedule after warm-up"
    )
    warmup_steps: int = Field(default=100, ge=0, description="linear warm-up optimizer steps")
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    eval_fraction: float = Field(
        default=0.05, ge=0.0, lt=1.0, description="held-out fraction of molecules (chosen by mol_id hash)"
    )
    eval_max_rows: int = Field(default=2_000, ge=2, description="at most this many held-out rows per evaluation")
    eval_every_steps: int = Field(default=500, ge=0, description="evaluate every N optimizer steps; 0 = per epoch only")
    log_every_steps: int = Field(default=10, ge=1, description="report training metrics every N optimizer steps")
    seed: int = Field(default=0, description="seed of model init, shuffling and the eval split")
    descriptor_weight: float = Field(
        default=0.0, ge=0.0, description="weight of an auxiliary loss beside InfoNCE: the graph embedding regresses "
        "the molecule's dsm descriptors (each through its empirical CDF, centred and scaled to unit variance for a "
        "continuous descriptor; "
        "GraphMVP/KPGT-style). Needs "
        "featurize.dsm_targets; 0 = contrastive only",
    )
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="optional DeepSpeed engine")
    checkpoint_every_steps: int = Field(
        default=1_000, ge=0, description="checkpoint every N optimizer steps; 0 = at the end of every epoch only"
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="local checkpoints kept (Ray keeps its own copies)")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (data-parallel ranks)")
    use_gpu: bool = Field(default=False, description="one GPU per Ray Train worker")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0}, description="Ray resources per training worker, e.g. {'CPU': 4, 'GPU': 1}"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="where the workers go (Ray placement group strategy): PACK fills a node "
        "first, SPREAD puts them on different nodes where it can, STRICT_SPREAD one per node or not at all"
    )
    max_failures: int = Field(
        default=0, ge=-1, description="Ray Train restarts from the last checkpoint (-1 = forever)"
    )
    storage_path: str | None = Field(
        default=None, description="Ray Train storage (shared FS or s3://...); None = <output_dir>/pretrain/ray_train"
    )
    torch_threads: int | None = Field(
        default=None, ge=1,
        description="torch intra-op threads per training worker; None = the worker's CPUs in resources_per_worker "
        "(at least 1). More threads than reserved cores make steps many times slower on a busy machine",
    )
    data_num_cpus: float = Field(
        default=0.25, gt=0.0,
        description="Ray CPUs of each Ray Data read/filter task feeding the workers; the cluster must keep this "
        "much CPU free beside the training workers, or the job waits forever for its data",
    )
    cache_data: bool = Field(
        default=False,
        description="materialise the filtered rows once in Ray's object store (shared per node, spilled to disk "
        "when full) instead of re-reading the Parquet shards every epoch: faster epochs for tables that fit",
    )
    shuffle_buffer: int = Field(
        default=1_000, ge=0,
        description="rows in each worker's local shuffle buffer (Ray Data iter_batches); 0 = stream order",
    )

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> PretrainConfig:
        # DeepSpeed's CPU accelerator has no fp16 (it raises deep inside the first worker); refuse it at start.
        if self.deepspeed.precision == "fp16" and not self.use_gpu:
            raise ValueError("pretrain.deepspeed.precision=fp16 needs GPUs (pretrain.use_gpu=true): DeepSpeed has "
                             "no fp16 on CPUs; use bf16 or fp32 there")
        return self

    @property
    def micro_batch_size(self) -> int:
        """Rows per forward pass per worker: what the data iterator should yield (iter_batches(batch_size=...)).

        One optimizer step sees micro_batch_size x grad_accum x num_workers rows. Note that InfoNCE negatives
        come only from the same micro-batch: accumulation and more workers do not add negatives.
        """
        return self.deepspeed.micro_batch or self.batch_size
