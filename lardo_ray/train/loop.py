"""Graph-text contrastive pre-training in plain PyTorch (+ optional DeepSpeed). No Ray in here.

The pieces, top to bottom:

* ``ContrastiveModel`` (lardo_ray.models.contrastive, re-exported): GINE graph encoder + projection head; text
  side = precomputed embeddings -> MLP head
  (``freeze_text``) or an in-loop HF encoder (fine-tuning its last layers) -> head; learnable temperature.
* ``collate``: one Arrow / pandas / dict batch (rows of the featurize + embed stages) -> model ``Inputs``.
* ``Trainer``: AdamW + warm-up/cosine schedule, ``train_step`` (one micro-batch, optimizer step at the
  accumulation boundary), ``evaluate`` (retrieval accuracy over a held-out pool), ``fit`` (the epoch loop over
  any iterable of batches, e.g. Ray's ``get_dataset_shard("train").iter_batches(batch_format="pyarrow")``),
  checkpoints that resume the step count, and callbacks that receive every metrics event (MLflow, Ray Train).
* With ``deepspeed.enabled`` the same step runs through ``deepspeed.initialize`` (ZeRO 0-3, fp32/bf16/fp16,
  gradient accumulation, micro-batch size); on CPU with torch's Adam, the gloo backend and DS_ACCELERATOR=cpu.

InfoNCE negatives come from the same micro-batch only (no cross-worker gathering): batch_size is the number
of candidates each row is contrasted against.

One module (~560 lines) on purpose, as nanoGPT's train.py: the Trainer reads in one sitting (step, schedule,
evaluation, checkpoint and resume side by side), with the few helpers it calls above it.
"""

from __future__ import annotations

import contextlib

import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from lardo_ray import schema
from lardo_ray.chem.graph import as_arrow_table, graphs_to_pyg_batch
from lardo_ray.models.contrastive import (ContrastiveModel, build_model, contrastive_logits, info_nce,  # noqa: F401
                                         masked_mse, retrieval_accuracy)
from lardo_ray.models.gine import save_encoder
from lardo_ray.models.text import embeddings_from_arrow
from lardo_ray.train.holdout import held_out_mask as eval_mask  # noqa: F401  (the loop's name for it)
from lardo_ray.train.settings import PretrainConfig

TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
PLAIN_STATE = "trainer.pt"
DS_TAG = "deepspeed"


# ---------------------------------------------------------------------------------------------------------
# Data: batches of rows -> model inputs
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    graphs: Any  # torch_geometric Batch
    text: torch.Tensor | dict[str, torch.Tensor]
    num_rows: int
    text_keys: torch.Tensor | None = None  # int64 per row, equal for equal descriptions (multi-positive InfoNCE)
    targets: torch.Tensor | None = None  # (B, n_descriptors) standardised CDF values, NaN where unknown (descriptor loss)

    def to(self, device: torch.device | str) -> Inputs:
        text = {k: v.to(device) for k, v in self.text.items()} if isinstance(self.text, dict) else self.text.to(device)
        keys = self.text_keys.to(device) if self.text_keys is not None else None
        targets = self.targets.to(device) if self.targets is not None else None
        return Inputs(self.graphs.to(device), text, self.num_rows, keys, targets)


class DescriptorScaler:
    """Each descriptor's empirical CDF, fitted on a sample of the training rows, then centred and scaled
    ((u - 0.5) * sqrt(12) for the CDF value u): ~200 descriptors on scales from 0.01 to 10^4 weigh alike in
    one MSE. A continuous descriptor gets mean 0 and variance 1, so predicting the mean scores 1 and
    ``pretrain.descriptor_weight`` reads against InfoNCE's ~log(batch). Counts that are mostly 0 (the fr_*
    groups) are pinned at the CDF's ends as scikit-learn pins them, so for them a constant scores more (about
    3 for a count that is 0 in 95 % of molecules) until the head has learned their offset. The CDF is the
    fine-tune head's (finetune.data.fit_descriptor_normaliser), in numpy so that workers need no
    scikit-learn object. Constant or never-computed descriptors are masked (NaN targets): they teach
    nothing."""

    SCALE = math.sqrt(12.0)  # the standard deviation of a uniform [0, 1] variable is 1 / sqrt(12)

    def __init__(self, quantiles: np.ndarray):
        self.quantiles = np.asarray(quantiles, dtype=np.float64)  # (n_quantiles, n_descriptors)
        q = self.quantiles
        self.usable = np.isfinite(q).all(axis=0) & (q[-1] > q[0])
        self.references = np.linspace(0.0, 1.0, q.shape[0])

    @classmethod
    def fit(cls, X: np.ndarray, n_quantiles: int = 1000) -> DescriptorScaler:
        import warnings

        n = max(2, min(n_quantiles, len(X)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN quantiles, masked
            return cls(np.nanquantile(np.asarray(X, dtype=np.float64), np.linspace(0.0, 1.0, n), axis=0))

    @property
    def n_descriptors(self) -> int:
        return int(self.quantiles.shape[1])

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        out = np.full(X.shape, np.nan, dtype=np.float32)
        r = self.references
        for j in np.flatnonzero(self.usable):
            q, x = self.quantiles[:, j], X[:, j]
            # both directions averaged, as scikit-learn's QuantileTransformer: ties (counts) land mid-plateau
            v = 0.5 * (np.interp(x, q, r) - np.interp(-x, -q[::-1], -r[::-1]))
            v = np.where(x <= q[0], 0.0, np.where(x >= q[-1], 1.0, v))  # the ends as scikit-learn pins them
            out[:, j] = np.where(np.isfinite(x), (v - 0.5) * self.SCALE, np.nan)
        return out

    def to_json(self) -> list[list[float | None]]:
        return [[None if not np.isfinite(v) else float(v) for v in row] for row in self.quantiles]

    @classmethod
    def from_json(cls, rows: list[list[float | None]]) -> DescriptorScaler:
        return cls(np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64))


def text_keys(items: Iterable[bytes]) -> torch.Tensor:
    """A stable 63-bit key per text (or per embedding's bytes): equal texts, equal keys, on every rank."""
    import hashlib

    return torch.tensor([int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little") >> 1 for b in items],
                        dtype=torch.int64)


def collate(batch: Any, text_mode: Literal["embedding", "tokens"] = "embedding",
            tokenizer: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
            scaler: DescriptorScaler | None = None) -> Inputs | None:
    """Rows with graph columns + ``text_embedding`` (or ``description`` in token mode) -> Inputs; with a
    ``scaler``, the ``dsm_targets`` column too (the descriptor loss's targets).

    Rows without a text (null embedding / blank description) are dropped; a batch left with fewer than two
    rows gives None (InfoNCE needs negatives).
    """
    table = as_arrow_table(batch)
    if text_mode == "embedding":
        col = table.column(schema.TEXT_EMBEDDING)
        if col.null_count:
            table = table.filter(pc.is_valid(col))
    else:
        col = table.column(schema.DESCRIPTION)
        keep = pc.and_(pc.is_valid(col), pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
        if not pc.all(keep).as_py():
            table = table.filter(pc.fill_null(keep, False))
    if table.num_rows < 2:
        return None
    graphs = graphs_to_pyg_batch(table)
    if text_mode == "embedding":
        emb = embeddings_from_arrow(table.column(schema.TEXT_EMBEDDING))
        text: Any = torch.from_numpy(emb)
        # the embed stage gives one vector per distinct description: equal vectors = the same text
        keys = text_keys(row.tobytes() for row in emb)
    else:
        if tokenizer is None:
            raise ValueError("token mode needs a tokenizer (model.text_encoder.tokenize)")
        descriptions = table.column(schema.DESCRIPTION).to_pylist()
        text = tokenizer(descriptions)
        keys = text_keys(d.encode() for d in descriptions)
    targets = None
    if scaler is not None:
        raw = embeddings_from_arrow(table.column(schema.DSM_TARGETS))  # the same list<float32> layout
        if raw.shape[1] != scaler.n_descriptors:
            raise ValueError(f"{schema.DSM_TARGETS}: rows of {raw.shape[1:]} values, the scaler has "
                             f"{scaler.n_descriptors} descriptors (featurize and pretrain disagree)")
        targets = torch.from_numpy(scaler.transform(raw))
    return Inputs(graphs, text, table.num_rows, keys, targets)


def iter_table_batches(table: pa.Table, batch_size: int, shuffle: bool = True, seed: int = 0,
                       drop_last: bool = False) -> Iterator[pa.Table]:
    """Local stand-in for Ray's iter_batches: slices of a table, optionally shuffled with a seed."""
    n = table.num_rows
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        yield table.take(pa.array(idx, pa.int64()))


# ---------------------------------------------------------------------------------------------------------
# Optimisation helpers
# ---------------------------------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then cosine/constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, embeddings' 1-d params and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("log_scale") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def estimate_total_steps(num_rows: int, cfg: PretrainConfig, world_size: int = 1) -> int:
    """Optimizer steps of a run over ``num_rows`` training rows (for the cosine schedule).

    Accumulation carries across epoch ends (a partial accumulation finishes with the next epoch's first
    micro-batches), hence the floor over the whole run.
    """
    per_worker = math.ceil(num_rows / max(1, world_size))
    micro_batches = math.ceil(per_worker / cfg.micro_batch_size)
    return max(1, cfg.epochs * micro_batches // cfg.deepspeed.grad_accum)


def deepspeed_config(cfg: PretrainConfig, world_size: int = 1, on_cpu: bool = True) -> dict:
    """The DeepSpeed JSON config from the pretrain section (optimizer = AdamW; torch's on CPU)."""
    ds = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": cfg.micro_batch_size * ds.grad_accum * world_size,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: FusedAdam would JIT-compile a C++ op for ~80 s on CPU; torch's AdamW is as good there.
            "params": {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": cfg.weight_decay,
                       "torch_adam": on_cpu},
        },
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_deepspeed_env(on_cpu: bool) -> None:
    """Env DeepSpeed needs without a launcher: a one-process 'world' (unless a launcher/Ray set one up)."""
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:  # no launcher, no Ray: single process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StepEvent:
    """What callbacks receive. kind: 'train' (every log_every_steps), 'eval', 'checkpoint', 'end'."""

    kind: Literal["train", "eval", "checkpoint", "end"]
    step: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint_dir: str | None = None


Callback = Callable[[StepEvent], None]
Batches = Iterable[Any] | Callable[[int], Iterable[Any]]  # an iterable, or epoch -> iterable


class Trainer:
    """One training process (one Ray Train worker, or a plain script).

    model: a ContrastiveModel. total_steps: optimizer steps of the whole run (cosine schedule length).
    wrap_model: e.g. ``ray.train.torch.prepare_model`` for DDP in the plain-torch path (ignored with DeepSpeed).
    checkpoint_root: where ``fit`` writes step_XXXXXXXX/ checkpoints (None: no automatic checkpoints).
    """

    def __init__(self, model: ContrastiveModel, cfg: PretrainConfig, total_steps: int, *,
                 device: str | torch.device | None = None, callbacks: Iterable[Callback] = (),
                 checkpoint_root: str | Path | None = None, wrap_model: Callable[[nn.Module], nn.Module] | None = None,
                 descriptor_scaler: DescriptorScaler | None = None):
        self.cfg = cfg
        self.descriptor_scaler = descriptor_scaler if cfg.descriptor_weight > 0 else None
        if self.descriptor_scaler is not None and model.descriptor_head is None:
            raise ValueError("pretrain.descriptor_weight > 0 needs a model built with n_descriptors")
        self.total_steps = max(1, int(total_steps))
        self.callbacks = list(callbacks)
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.device = torch.device(device) if device is not None else self._default_device()
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # completed epochs
        self.batches_in_epoch = 0  # micro-batches consumed in the current epoch (resume skips them)
        self.rows_seen = 0
        self.use_deepspeed = cfg.deepspeed.enabled
        self.engine = None
        self.precision = cfg.deepspeed.precision
        model = model.to(self.device)
        self.module: ContrastiveModel = model  # always the bare model (for encode/export)
        groups = param_groups(model, cfg.weight_decay)

        def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
                s, self.total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio))

        if self.use_deepspeed:
            on_cpu = self.device.type == "cpu"
            prepare_deepspeed_env(on_cpu)
            import deepspeed

            if not torch.distributed.is_initialized():
                deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", verbose=False)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=groups, lr_scheduler=schedule,
                config=deepspeed_config(cfg, _dist_info()[1], on_cpu),
            )
            if cfg.deepspeed.precision != "fp32":
                # DeepSpeed casts parameters, not buffers: batch norm would then mix bf16 weights with fp32
                # running statistics, which torch rejects. Keep every floating buffer in the training dtype.
                dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float16
                for buf in model.buffers():
                    if buf.is_floating_point():
                        buf.data = buf.data.to(dtype)
            self.model = self.engine
        else:
            if self.precision == "fp16":
                raise ValueError("precision fp16 needs DeepSpeed (deepspeed.enabled: true); use bf16 or fp32")
            self.model = wrap_model(model) if wrap_model else model
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
            self.scheduler = schedule(self.optimizer)
        self.rank, self.world_size = _dist_info()
        self._micro = 0

    @staticmethod
    def _default_device() -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    # -- data ------------------------------------------------------------------------------------------------
    def collate(self, batch: Any, targets: bool = True) -> Inputs | None:
        """``targets=False``: no descriptor targets (retrieval evaluation never reads them)."""
        tok = None
        if self.module.text_mode == "tokens":
            tok = self.module.text_encoder.tokenize
        inputs = collate(batch, self.module.text_mode, tok, self.descriptor_scaler if targets else None)
        return inputs.to(self.device) if inputs is not None else None

    def _autocast(self):
        if not self.use_deepspeed and self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    # -- one micro-batch -------------------------------------------------------------------------------------
    def train_step(self, inputs: Inputs) -> dict[str, float]:
        """Forward + backward of one micro-batch; optimizer step at the accumulation boundary.

        Returns the micro-batch metrics (loss, in-batch top1/top5, ...) and ``stepped`` (1.0 when the optimizer
        stepped, so ``self.step`` advanced).
        """
        self.model.train()
        with_descriptors = inputs.targets is not None
        extra: dict[str, float] = {}
        with self._autocast():
            g, t, scale, *pred = self.model(inputs.graphs, inputs.text, descriptors=with_descriptors)
            logits = contrastive_logits(g.float(), t.float(), scale.float())
            loss, l_g2t, l_t2g = info_nce(logits, inputs.text_keys)
            if with_descriptors:
                l_desc = masked_mse(pred[0].float(), inputs.targets)
                extra = {"loss_contrastive": float(loss.detach()), "loss_descriptors": float(l_desc.detach())}
                loss = loss + self.cfg.descriptor_weight * l_desc
        if self.use_deepspeed:
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.backward(loss)
            self.engine.step()
            stepped = boundary
            if stepped:
                self.step = int(self.engine.global_steps)
        else:
            (loss / self.cfg.deepspeed.grad_accum).backward()
            self._micro += 1
            stepped = self._micro % self.cfg.deepspeed.grad_accum == 0
            if stepped:
                if self.cfg.deepspeed.gradient_clipping > 0:
                    nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.deepspeed.gradient_clipping)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
        self.rows_seen += inputs.num_rows
        acc = retrieval_accuracy(logits.detach(), keys=inputs.text_keys)
        return {"loss": float(loss.detach()), "loss_g2t": float(l_g2t.detach()), "loss_t2g": float(l_t2g.detach()),
                "top1": acc["top1"], "top5": acc["top5"], "batch_rows": float(inputs.num_rows),
                "stepped": float(stepped), **extra}

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, batches: Iterable[Any],
              max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """Graph and text embeddings (projected, normalised) of up to max_rows rows, and per-batch losses.
        The rows' text keys are kept in ``self.last_text_keys`` (for retrieval over the pool)."""
        self.model.eval()
        gs, ts, ks, losses, n = [], [], [], [], 0
        for batch in batches:
            inputs = self.collate(batch, targets=False)
            if inputs is None:
                continue
            with self._autocast():
                g, t, scale = self.model(inputs.graphs, inputs.text)
            g, t = g.float(), t.float()
            losses.append(float(info_nce(contrastive_logits(g, t, scale.float()), inputs.text_keys)[0]))
            gs.append(g)
            ts.append(t)
            ks.append(inputs.text_keys.cpu() if inputs.text_keys is not None else torch.arange(n, n + len(g)) - (1 << 62))
            n += inputs.num_rows
            if max_rows is not None and n >= max_rows:
                break
        if not gs:
            self.last_text_keys = torch.empty(0, dtype=torch.int64)
            return torch.empty(0), torch.empty(0), []
        G, T, K = torch.cat(gs), torch.cat(ts), torch.cat(ks)
        if max_rows is not None:
            G, T, K = G[:max_rows], T[:max_rows], K[:max_rows]
        self.last_text_keys = K
        return G, T, losses

    def evaluate(self, batches: Iterable[Any], max_rows: int | None = None) -> dict[str, float]:
        """Retrieval over the whole held-out pool (candidates = every other held-out row) + in-batch loss.

        Keys: eval_loss, eval_pool (rows), eval_g2t_top1/5, eval_t2g_top1/5, eval_top1/5, eval_chance_top1.
        With several workers each evaluates its own shard and the values are averaged over ranks, weighted by
        pool size (eval_pool is then the total); every rank must call this, as it all-reduces.
        """
        max_rows = max_rows if max_rows is not None else self.cfg.eval_max_rows
        G, T, losses = self.embed(batches, max_rows)
        keys = ("g2t_top1", "t2g_top1", "top1", "g2t_top5", "t2g_top5", "top5")
        metrics = {f"eval_{k}": 0.0 for k in keys}
        metrics.update(eval_loss=0.0, eval_chance_top1=0.0)
        pool = len(G) if len(G) >= 2 else 0
        if pool:
            with torch.no_grad():
                scale = float(self.module.logit_scale())
            acc = retrieval_accuracy(contrastive_logits(G, T, scale), keys=self.last_text_keys.to(G.device))
            metrics.update({f"eval_{k}": acc[k] for k in keys})
            metrics.update(eval_loss=float(np.mean(losses)), eval_chance_top1=1.0 / pool)
        return self._pool_weighted_mean(metrics, pool)

    def _pool_weighted_mean(self, metrics: dict[str, float], pool: int) -> dict[str, float]:
        if self.world_size > 1:
            keys = sorted(metrics)
            t = torch.tensor([metrics[k] * pool for k in keys] + [float(pool)], dtype=torch.float64)
            if self.device.type == "cuda" and torch.distributed.get_backend() == "nccl":
                t = t.to(self.device)
            torch.distributed.all_reduce(t)
            t = t.cpu()
            pool = int(t[-1])
            metrics = {k: float(v) / max(pool, 1) for k, v in zip(keys, t[:-1].tolist())}
        if pool == 0:
            return {"eval_pool": 0.0}
        return {**metrics, "eval_pool": float(pool)}

    # -- the loop ------------------------------------------------------------------------------------------------
    def _emit(self, kind: str, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        event = StepEvent(kind, self.step, self.epoch, metrics, checkpoint_dir)  # type: ignore[arg-type]
        for cb in self.callbacks:
            cb(event)

    def fit(self, train_batches: Batches, eval_batches: Batches | None = None,
            epochs: int | None = None) -> dict[str, float]:
        """Train until ``epochs`` (default cfg.epochs) are complete; resumes from self.epoch / batches_in_epoch.

        train_batches / eval_batches: an iterable re-iterated each epoch, or a callable epoch -> iterable (Ray:
        ``lambda e: shard.iter_batches(batch_size=..., batch_format="pyarrow")``).
        Returns the last eval metrics merged with the last training window.
        """
        cfg = self.cfg
        epochs = epochs or cfg.epochs
        get = lambda src, e: src(e) if callable(src) else src  # noqa: E731
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        t0, rows0 = time.perf_counter(), self.rows_seen
        while self.epoch < epochs:
            skip = self.batches_in_epoch
            for i, batch in enumerate(get(train_batches, self.epoch)):
                if i < skip:
                    continue  # already trained on before the checkpoint we resumed from
                self.batches_in_epoch += 1
                inputs = self.collate(batch)
                if inputs is None:
                    continue
                m = self.train_step(inputs)
                window.append(m)
                if not m["stepped"]:
                    continue
                if self.step % cfg.log_every_steps == 0:
                    last.update(self._log_window(window, t0, rows0))
                    window, t0, rows0 = [], time.perf_counter(), self.rows_seen
                if eval_batches is not None and cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0:
                    last.update(self._run_eval(eval_batches))
                if self.checkpoint_root and cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                    self._checkpoint(last)
            self.epoch += 1
            self.batches_in_epoch = 0
            if window:
                last.update(self._log_window(window, t0, rows0))
                window, t0, rows0 = [], time.perf_counter(), self.rows_seen
            if eval_batches is not None:
                last.update(self._run_eval(eval_batches))
            if self.checkpoint_root:
                self._checkpoint(last)
        self._emit("end", dict(last))
        return last

    def _log_window(self, window: list[dict[str, float]], t0: float, rows0: int) -> dict[str, float]:
        keys = ("loss", "loss_g2t", "loss_t2g", "top1", "top5", "loss_contrastive", "loss_descriptors")
        m = {f"train_{k}": float(np.mean([w[k] for w in window])) for k in keys if k in window[0]}
        dt = max(1e-9, time.perf_counter() - t0)
        m.update(lr=self.lr, temperature=self.module.logit_scale.temperature, epoch=float(self.epoch),
                 rows_per_s=(self.rows_seen - rows0) / dt, rows_seen=float(self.rows_seen))
        self._emit("train", m)
        return m

    def _run_eval(self, eval_batches: Batches) -> dict[str, float]:
        src = eval_batches(self.epoch) if callable(eval_batches) else eval_batches
        m = self.evaluate(src)
        self._emit("eval", m)
        return m

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        path = self.save_checkpoint(self.checkpoint_root / f"step_{self.step:08d}")
        self._emit("checkpoint", dict(metrics), str(path))
        if self.rank == 0:
            for old in list_checkpoints(self.checkpoint_root)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "rows_seen": self.rows_seen, "micro": self._micro, "total_steps": self.total_steps}

    def save_checkpoint(self, directory: str | Path) -> Path:
        """A self-contained checkpoint in ``directory`` (model, optimizer, scheduler, counters).

        DeepSpeed: every rank must call this (ZeRO shards); plain torch: rank 0 writes, the others wait.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = self.state()
        if self.use_deepspeed:
            self.engine.save_checkpoint(str(d), tag=DS_TAG, client_state={"trainer": state})
        elif self.rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "trainer": state}, d / PLAIN_STATE)
        if self.rank == 0:
            (d / TRAINER_STATE).write_text(json.dumps({**state, "deepspeed": self.use_deepspeed}, indent=2))
        if self.world_size > 1:
            torch.distributed.barrier()
        return d

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore model/optimizer/scheduler and the step/epoch counters from ``save_checkpoint`` output."""
        d = Path(directory)
        meta = json.loads((d / TRAINER_STATE).read_text())
        if bool(meta.get("deepspeed")) != self.use_deepspeed:
            raise ValueError(f"{d} was written {'with' if meta.get('deepspeed') else 'without'} DeepSpeed")
        if self.use_deepspeed:
            _, client = self.engine.load_checkpoint(str(d), tag=DS_TAG)
            state = (client or {}).get("trainer", meta)
        else:
            blob = torch.load(d / PLAIN_STATE, map_location=self.device, weights_only=False)
            self.module.load_state_dict(blob["model"])
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
            state = blob["trainer"]
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.rows_seen = int(state.get("rows_seen", 0))
        self._micro = int(state.get("micro", 0))
        return state

    # -- export --------------------------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Graph encoder for downstream use: encoder.safetensors + encoder.json (lardo_ray.models.gine.load_encoder),
        plus the projection heads and temperature in heads.safetensors + model.json."""
        from safetensors.torch import save_file

        d = Path(directory)
        gather = _gathered(self.module) if self.use_deepspeed and self.cfg.deepspeed.zero_stage == 3 else contextlib.nullcontext()
        with gather:
            if self.rank == 0:
                save_encoder(self.module.graph_encoder, d, extra={"step": self.step})
                heads = {f"{name}.{k}": v.detach().float().cpu().contiguous()
                         for name in ("graph_proj", "text_proj", "logit_scale")
                         for k, v in getattr(self.module, name).state_dict().items()}
                save_file(heads, str(d / "heads.safetensors"))
                (d / "model.json").write_text(json.dumps(
                    {"model": self.module.cfg.model_dump(mode="json"), "text_dim": self.module.text_dim,
                     "step": self.step}, indent=2))
        if self.world_size > 1:
            torch.distributed.barrier()
        return d


def _gathered(module: nn.Module):
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root (those with trainer_state.json), oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).exists())


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None
