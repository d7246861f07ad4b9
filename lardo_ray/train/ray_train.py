"""Pre-training on Ray Train: one ``TorchTrainer``, DeepSpeed inside every worker, Ray Datasets for the rows.

Driver (``run_training``):

* ``ray.data.read_parquet`` over the featurize shards (only the columns training needs), rows without a text
  dropped, then split into train / held-out by ``eval_mask`` on mol_id (a stable hash: the same split on every
  worker and every run). Both datasets go to the trainer; Ray's DataConfig hands each worker an equal-row
  ``streaming_split`` shard, so every rank sees the same number of batches (DeepSpeed's collectives need that).
* ``TorchTrainer`` with ``ScalingConfig(num_workers, use_gpu, resources_per_worker)`` and
  ``RunConfig(name, storage_path, FailureConfig(max_failures), CheckpointConfig(num_to_keep))``; gloo on CPU.

  The Parquet read uses Ray Data's V1 datasource: 2.60's default V2 read starts every epoch with a ListFiles
  task pinned to 1 whole CPU, which never schedules beside workers holding all but a fraction of the CPUs (a
  silent hang) and costs seconds per epoch even when it does (V1: ~0.4 s per epoch of a small table here).

Worker (``train_loop_per_worker``): ``lardo_ray.train.loop.Trainer`` (which calls ``deepspeed.initialize`` when
``pretrain.deepspeed.enabled``) streaming ``get_dataset_shard("train").iter_batches(...)``; every checkpoint the
loop writes (every ``checkpoint_every_steps`` and at each epoch end) is handed to ``ray.train.report`` by every
rank (DeepSpeed ZeRO shards live on each rank; Ray merges the ranks' files into one checkpoint directory). The
last checkpoint also holds ``export/`` (encoder.safetensors + encoder.json + heads), which the driver copies out.
Every report waits until Ray's controller has committed it (see RayReporter). Rank 0 alone logs step metrics
to MLflow (MlflowClient, into the run the driver opened, never ending it).

Resume: a restarted worker group (FailureConfig) and a re-run with the same ``RunConfig(name, storage_path)``
both start from ``ray.train.get_checkpoint()`` -- Ray Train V2, the default in Ray 2.60, restores the run's
checkpoint list from ``<storage>/<name>/`` on its own (``TorchTrainer.restore`` / ``can_restore`` and
``resume_from_checkpoint=`` raise DeprecationWarning in V2; so does ``FailureConfig(fail_fast=...)``). The loop's step,
epoch and position in the epoch come back with the weights, so the step count continues. Resuming a DeepSpeed
checkpoint needs the same number of workers (ZeRO shards are per rank).

Fault injection (tests): ``LARDO_FAIL_AT_STEP=k`` [``LARDO_FAIL_RANK=r`` (default 0), ``LARDO_FAIL_MODE=raise|exit``,
``LARDO_FAIL_MARKER=path``] in the driver's environment makes rank r fail once right after optimizer step k.
The marker file (created first, exclusively) keeps the restarted attempt or a re-run from failing again.

One module (~520 lines) on purpose: the driver and the per-worker loop share their contract (dataset
columns, checkpoint layout, the reporter's commit protocol, the fault-injection env vars the tests set) and
are read together when a Ray Train upgrade changes either side.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lardo_ray import schema
from lardo_ray.config_base import ConfigError
from lardo_ray.train.holdout import held_out_mask  # noqa: F401  (re-exported: Ray Data tasks import it here)
from lardo_ray.train.settings import ModelConfig, PretrainConfig

log = logging.getLogger("lardo_ray")

FAIL_AT_STEP_ENV = "LARDO_FAIL_AT_STEP"
FAIL_RANK_ENV = "LARDO_FAIL_RANK"
FAIL_MODE_ENV = "LARDO_FAIL_MODE"
FAIL_MARKER_ENV = "LARDO_FAIL_MARKER"
EXPORT_DIR = "export"  # inside the final Ray checkpoint
GRAPH_COLUMNS = [schema.ATOM_FEATURES, schema.EDGE_INDEX, schema.EDGE_FEATURES]


class InjectedFailure(RuntimeError):
    """Raised by the fault-injection knob (never in normal runs)."""


# ---------------------------------------------------------------------------------------------------------
# Fault injection
# ---------------------------------------------------------------------------------------------------------
@dataclass
class FaultInjection:
    """Fail once on ``rank`` right after optimizer step ``step``: raise, or ``exit`` (the process dies)."""

    step: int
    rank: int = 0
    mode: str = "raise"
    marker: str | None = None

    @classmethod
    def from_env(cls, default_marker: str) -> FaultInjection | None:
        step = os.environ.get(FAIL_AT_STEP_ENV)
        if not step:
            return None
        mode = os.environ.get(FAIL_MODE_ENV, "raise")
        if mode not in ("raise", "exit"):
            raise ConfigError(f"{FAIL_MODE_ENV} must be 'raise' or 'exit', got {mode!r}")
        return cls(step=int(step), rank=int(os.environ.get(FAIL_RANK_ENV, "0")), mode=mode,
                   marker=os.environ.get(FAIL_MARKER_ENV) or default_marker)

    def maybe_fail(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank:
            return
        if self.marker:
            Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # already failed once: this is the retry
            os.write(fd, f"step={step} rank={rank} pid={os.getpid()} time={time.time()}\n".encode())
            os.close(fd)
        msg = f"injected failure at step {step} on rank {rank} ({FAIL_AT_STEP_ENV})"
        log.warning(msg)
        if self.mode == "exit":
            os._exit(17)
        raise InjectedFailure(msg)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def train_columns(text_mode: str, descriptors: bool = False) -> list[str]:
    text = schema.TEXT_EMBEDDING if text_mode == "embedding" else schema.DESCRIPTION
    return [schema.MOL_ID, text, *GRAPH_COLUMNS, *([schema.DSM_TARGETS] if descriptors else [])]


class RowFilter:
    """Ray Data batch UDF: keep the rows with a text, then the train (or held-out) side of ``eval_mask``."""

    def __init__(self, part: str, fraction: float, seed: int, text_mode: str):
        self.part, self.fraction, self.seed, self.text_mode = part, fraction, seed, text_mode

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.text_mode == "embedding":
            keep = pc.is_valid(batch.column(schema.TEXT_EMBEDDING)).to_numpy(zero_copy_only=False)
        else:
            col = batch.column(schema.DESCRIPTION)
            ok = pc.and_(pc.is_valid(col), pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
            keep = pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
        held_out = held_out_mask(batch.column(schema.MOL_ID).to_pylist(), self.fraction, self.seed)
        keep = np.asarray(keep, dtype=bool) & (held_out if self.part == "eval" else ~held_out)
        return batch.filter(pa.array(keep))


def make_datasets(files: list[str], cfg: PretrainConfig, text_mode: str, filesystem=None) -> dict[str, Any]:
    """{'train': ..., 'eval': ...} Ray Datasets over the featurize shards (no 'eval' when eval_fraction is 0)."""
    import ray.data

    def part(name: str):
        ctx = ray.data.DataContext.get_current()
        v2 = ctx.use_datasource_v2
        # Ray 2.60's default (V2) Parquet read starts with a ListFiles task that always asks for 1 whole CPU,
        # whatever num_cpus says: beside training workers holding all but a fraction of the CPUs it never
        # schedules and the job waits forever. The V1 read honours data_num_cpus (its sampling tasks run now,
        # before the workers hold their CPUs) and starts each epoch in ~0.4 s instead of ~4 s.
        ctx.use_datasource_v2 = False
        try:
            ds = ray.data.read_parquet(files, columns=train_columns(text_mode, cfg.descriptor_weight > 0),
                                       filesystem=filesystem,
                                       num_cpus=cfg.data_num_cpus)
        finally:
            ctx.use_datasource_v2 = v2
        # An instance (not the class): a plain function to Ray Data, so it runs in tasks fused with the read.
        ds = ds.map_batches(RowFilter(name, cfg.eval_fraction, cfg.seed, text_mode), batch_format="pyarrow",
                            zero_copy_batch=True, num_cpus=cfg.data_num_cpus)
        return ds.materialize() if cfg.cache_data else ds

    out = {"train": part("train")}
    if cfg.eval_fraction > 0:
        out["eval"] = part("eval")
    return out


def count_rows(files: list[str], cfg: PretrainConfig, filesystem=None) -> tuple[int, int]:
    """(train, held-out) row counts from the mol_id column alone (rows without a text still counted)."""
    import pyarrow.parquet as pq

    n_train = n_eval = 0
    for f in files:
        ids = pq.read_table(f, columns=[schema.MOL_ID], filesystem=filesystem).column(0).to_pylist()
        held = int(held_out_mask(ids, cfg.eval_fraction, cfg.seed).sum())
        n_eval += held
        n_train += len(ids) - held
    return n_train, n_eval


def fit_descriptor_scaler(files: list[str], cfg: PretrainConfig, filesystem=None, max_rows: int = 20_000):
    """The descriptor targets' CDFs from up to ``max_rows`` training rows (the first shards; inputs come in
    no particular order), so every worker maps descriptors the same way. Empty shards are skipped; no row,
    or no descriptor that varies, is a ConfigError (the loss would silently be 0)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lardo_ray.models.text import embeddings_from_arrow
    from lardo_ray.train.loop import DescriptorScaler

    parts, n = [], 0
    for f in files:
        t = pq.read_table(f, columns=[schema.MOL_ID, schema.DSM_TARGETS], filesystem=filesystem)
        train = ~held_out_mask(t.column(schema.MOL_ID).to_pylist(), cfg.eval_fraction, cfg.seed)
        if train.any():
            parts.append(embeddings_from_arrow(t.column(schema.DSM_TARGETS).filter(pa.array(train))))
            n += len(parts[-1])
        if n >= max_rows:
            break
    if not parts:
        raise ConfigError("pretrain.descriptor_weight: no training row has dsm_targets")
    scaler = DescriptorScaler.fit(np.concatenate(parts)[:max_rows])
    if not scaler.usable.any():
        raise ConfigError("pretrain.descriptor_weight: no descriptor varies over the training rows' dsm_targets "
                          "(all constant or missing): the descriptor loss would be 0")
    return scaler


def text_dim_of(files: list[str], filesystem=None) -> int:
    """Width of the first non-null ``text_embedding`` in the shards."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for f in files:
        src = filesystem.open_input_file(f) if filesystem is not None else f
        pf = pq.ParquetFile(src)
        if schema.TEXT_EMBEDDING not in pf.schema_arrow.names:
            raise ConfigError(
                f"{f} has no '{schema.TEXT_EMBEDDING}' column: with model.freeze_text=true the featurize stage must "
                "read the embed stage (featurize.upstream=auto|embed)"
            )
        for batch in pf.iter_batches(batch_size=1024, columns=[schema.TEXT_EMBEDDING]):
            col = batch.column(0)
            valid = col.filter(pc.is_valid(col))
            if len(valid):
                return len(valid[0].as_py())
    raise ConfigError("no row of the featurize output has a text embedding: nothing to pre-train on")


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------
def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


class MlflowStepLogger:
    """Rank 0's metrics -> the driver's MLflow run (MlflowClient: no active-run state, never ends the run).

    Never raises: a failing tracking server costs metrics, not the job (failures are counted and logged once).
    """

    def __init__(self, uri: str, run_id: str, world_size: int):
        self.uri, self.run_id, self.world_size = uri, run_id, world_size
        self.client = None
        self.failures = 0

    def __call__(self, ev) -> None:
        if ev.kind not in ("train", "eval"):
            return
        m = _finite(ev.metrics)
        if "rows_per_s" in m:
            m["samples_per_s"] = m["rows_per_s"] * self.world_size  # ranks run in lockstep: global throughput
        try:
            from mlflow.entities import Metric

            if self.client is None:
                import mlflow

                self.client = mlflow.MlflowClient(self.uri)
            ts = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, ev.step) for k, v in m.items()])
        except Exception as e:  # noqa: BLE001 - logging must not kill the training job
            self.failures += 1
            if self.failures == 1:
                log.warning("MLflow: could not log step metrics (%s: %s); training goes on",
                            type(e).__name__, str(e)[:200])


class RayReporter:
    """Every checkpoint of the loop -> ``ray.train.report`` on every rank (a barrier: all ranks call it equally).

    The last checkpoint (epoch == epochs) gets the exported encoder under ``export/`` first.
    """

    def __init__(self, epochs: int, rank: int, world_size: int):
        self.epochs, self.rank, self.world_size = epochs, rank, world_size
        self.trainer = None  # set once the Trainer exists
        self.session_start = time.perf_counter()
        self.session_rows0 = 0
        self.session_step0 = 0
        self.reports = 0

    def __call__(self, ev) -> None:
        import ray.train

        if ev.kind != "checkpoint":
            return
        d = Path(ev.checkpoint_dir)
        if ev.epoch >= self.epochs and self.trainer is not None:
            self.trainer.export(d / EXPORT_DIR)  # every rank: ZeRO-3 gathers; rank 0 writes
        t = self.trainer
        metrics = _finite(ev.metrics)
        metrics.update(step=float(ev.step), epoch=float(ev.epoch), world_size=float(self.world_size))
        if t is not None:
            rows = t.rows_seen - self.session_rows0
            secs = max(1e-9, time.perf_counter() - self.session_start)
            metrics.update(rows_seen=float(t.rows_seen), session_rows=float(rows), session_seconds=secs,
                           session_samples_per_s=rows * self.world_size / secs,
                           session_start_step=float(self.session_step0))
        has_files = d.exists() and any(d.iterdir())
        ckpt = ray.train.Checkpoint.from_directory(str(d)) if has_files else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{ev.step:08d}-epoch_{ev.epoch:04d}",
                         delete_local_checkpoint_after_upload=has_files)
        # Ray Train V2 registers a checkpoint only when its controller has collected the report from every rank
        # (it polls every 2 s, one report per rank per poll). A worker dying before that takes the report with it
        # and the restart falls back to an older checkpoint, even to step 0. Wait for the commit (<= ~2 s).
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        self.reports += 1


def _make_trainer_class():
    from lardo_ray.train.loop import Trainer

    class FaultyTrainer(Trainer):
        """The loop's Trainer plus the fault-injection hook after each optimizer step."""

        fault: FaultInjection | None = None

        def train_step(self, inputs):
            m = super().train_step(inputs)
            if self.fault is not None and m["stepped"]:
                self.fault.maybe_fail(self.step, self.rank)
            return m

    return FaultyTrainer


def _collect_eval(shard, cfg: PretrainConfig) -> list:
    """The held-out shard, read once per worker (at most eval_max_rows rows kept; the epoch is read to its end,
    which streaming_split needs) and reused by every evaluation."""
    if shard is None:
        return []
    kept, n = [], 0
    for batch in shard.iter_batches(batch_size=max(cfg.micro_batch_size, 256), batch_format="pyarrow"):
        if n < cfg.eval_max_rows:
            batch = batch.slice(0, cfg.eval_max_rows - n)
            kept.append(batch)
            n += batch.num_rows
    return kept


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (one per worker). ``config``: see ``run_training``."""
    import ray.train
    import ray.train.torch
    import torch

    from lardo_ray.train.loop import build_model, estimate_total_steps

    pcfg = PretrainConfig.model_validate(config["pretrain"])
    mcfg = ModelConfig.model_validate(config["model"])
    threads = pcfg.torch_threads or max(1, int(pcfg.resources_per_worker.get("CPU", 1)))
    torch.set_num_threads(threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if pcfg.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported (inside the Trainer)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch_geometric")

    total = estimate_total_steps(config["train_rows"], pcfg, world)
    scaler = None
    if config.get("descriptor_quantiles") is not None:
        from lardo_ray.train.loop import DescriptorScaler

        scaler = DescriptorScaler.from_json(config["descriptor_quantiles"])
    model = build_model(mcfg, text_dim=config.get("text_dim"), seed=pcfg.seed,
                        n_descriptors=scaler.n_descriptors if scaler is not None else 0)
    callbacks: list = []
    reporter = RayReporter(pcfg.epochs, rank, world)
    callbacks.append(reporter)
    mlflow_cfg = config.get("mlflow")
    if rank == 0 and mlflow_cfg:
        callbacks.append(MlflowStepLogger(mlflow_cfg["uri"], mlflow_cfg["run_id"], world))
    local_root = Path(tempfile.mkdtemp(prefix=f"lardo-pretrain-r{rank}-"))
    wrap = None
    if not pcfg.deepspeed.enabled and world > 1:
        wrap = lambda m: ray.train.torch.prepare_model(m, move_to_device=False)  # noqa: E731 - DDP
    Trainer = _make_trainer_class()
    trainer = Trainer(model, pcfg, total, device=device, callbacks=callbacks, checkpoint_root=local_root,
                      wrap_model=wrap, descriptor_scaler=scaler)
    fault = config.get("fault")
    trainer.fault = FaultInjection(**fault) if fault else None
    reporter.trainer = trainer

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = trainer.load_checkpoint(d)
        if rank == 0:  # worker stdout reaches the driver's console
            print(f"[pretrain] resumed from {ckpt.path} at step {state['step']} (epoch {state['epoch']})", flush=True)
    reporter.session_rows0, reporter.session_step0 = trainer.rows_seen, trainer.step
    reporter.session_start = time.perf_counter()

    train_shard = ray.train.get_dataset_shard("train")
    eval_tables = _collect_eval(ray.train.get_dataset_shard("eval") if config.get("has_eval") else None, pcfg)
    mbs = pcfg.micro_batch_size

    def train_batches(epoch: int):
        kw: dict[str, Any] = {}
        if pcfg.shuffle_buffer > 0:
            kw = {"local_shuffle_buffer_size": pcfg.shuffle_buffer, "local_shuffle_seed": pcfg.seed + epoch}
        return train_shard.iter_batches(batch_size=mbs, batch_format="pyarrow", **kw)

    try:
        trainer.fit(train_batches, eval_tables if config.get("has_eval") else None)
    finally:
        shutil.rmtree(local_root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    metrics: dict[str, float]  # rank 0's metrics of the last checkpoint (final eval + last training window)
    checkpoint_path: str | None  # the last Ray checkpoint (holds export/)
    checkpoint_fs: Any = None
    storage: str = ""  # <storage_path>/<name>
    train_rows: int = 0
    eval_rows: int = 0
    text_dim: int | None = None
    fit_seconds: float = 0.0


def check_cluster_resources(cfg: PretrainConfig) -> None:
    """Fail fast instead of waiting forever: workers + one data task must fit the cluster's CPUs (and GPUs)."""
    import ray

    total = ray.cluster_resources()
    cpu_per_worker = float(cfg.resources_per_worker.get("CPU", 1.0))
    need_cpu = cfg.num_workers * cpu_per_worker + cfg.data_num_cpus
    if total.get("CPU", 0.0) + 1e-9 < need_cpu:
        raise ConfigError(
            f"pre-training needs {need_cpu:g} CPUs ({cfg.num_workers} workers x {cpu_per_worker:g} "
            f"(pretrain.resources_per_worker) + {cfg.data_num_cpus:g} for Ray Data reads (pretrain.data_num_cpus)) "
            f"but the Ray cluster has {total.get('CPU', 0.0):g}: lower them or raise run.ray_num_cpus"
        )
    if cfg.use_gpu:
        gpu_per_worker = float(cfg.resources_per_worker.get("GPU", 1.0))
        if total.get("GPU", 0.0) + 1e-9 < cfg.num_workers * gpu_per_worker:
            raise ConfigError(
                f"pretrain.use_gpu: {cfg.num_workers} workers x {gpu_per_worker:g} GPU, but the Ray cluster has "
                f"{total.get('GPU', 0.0):g} GPUs"
            )


def storage_uri(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def delete_run_storage(storage_path: str, name: str) -> None:
    """Forget a Ray Train run (checkpoints + snapshot): the next run with this name starts from scratch."""
    from lardo_ray.io import filesystem_and_path

    fs, path = filesystem_and_path(storage_uri(storage_path, name))
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def run_training(pcfg: PretrainConfig, mcfg: ModelConfig, files: list[str], *, name: str, storage_path: str,
                 filesystem=None, mlflow_uri: str | None = None, mlflow_run_id: str | None = None,
                 fault: FaultInjection | None = None) -> TrainOutcome:
    """Run (or resume) the Ray Train job ``name`` under ``storage_path`` on the featurize shards ``files``.

    Ray must be initialised. Raises RuntimeError (with the storage path to resume from) if the job fails.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from lardo_ray.execution import _quiet_data_context

    text_mode = "embedding" if mcfg.freeze_text else "tokens"
    check_cluster_resources(pcfg)
    text_dim = (mcfg.text_dim or text_dim_of(files, filesystem)) if text_mode == "embedding" else None
    n_train, n_eval = count_rows(files, pcfg, filesystem)
    if n_train < 2 * pcfg.num_workers:
        raise ConfigError(f"only {n_train} training rows for {pcfg.num_workers} workers: nothing to train on")
    _quiet_data_context()
    datasets = make_datasets(files, pcfg, text_mode, filesystem)
    loop_config = {
        "pretrain": pcfg.model_dump(mode="json"),
        "model": mcfg.model_dump(mode="json"),
        "text_dim": text_dim,
        "descriptor_quantiles": (fit_descriptor_scaler(files, pcfg, filesystem).to_json()
                                 if pcfg.descriptor_weight > 0 else None),
        "train_rows": n_train,
        "has_eval": "eval" in datasets,
        "mlflow": {"uri": mlflow_uri, "run_id": mlflow_run_id} if mlflow_uri and mlflow_run_id else None,
        "fault": fault.__dict__ if fault else None,
    }
    resources = dict(pcfg.resources_per_worker)
    if pcfg.use_gpu:
        resources.setdefault("GPU", 1.0)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=pcfg.num_workers, use_gpu=pcfg.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=pcfg.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=pcfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=pcfg.keep_checkpoints),
            # Ray Train logs every report (all metrics, every rank) and checkpoint at INFO on the console;
            # rank 0's progress line says it in one line. Warnings (restarts, failures) still show.
            **({"logging_config": ray.train.LoggingConfig(log_level="WARNING")}
               if hasattr(ray.train, "LoggingConfig") else {}),
        ),
        datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if pcfg.use_gpu else "gloo"),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - V2 raises TrainingFailedError / WorkerGroupError / ControllerError
        raise RuntimeError(
            f"pre-training failed ({type(e).__name__}: {str(e)[:2000]}); its checkpoints are under "
            f"{storage_uri(storage_path, name)}: run the same command again to resume from the latest one"
        ) from e
    fit_seconds = time.perf_counter() - t0
    if getattr(result, "error", None):
        raise RuntimeError(f"pre-training failed: {result.error}; re-run to resume from "
                           f"{storage_uri(storage_path, name)}")
    ckpt = result.checkpoint
    return TrainOutcome(
        metrics=_finite(result.metrics or {}),
        checkpoint_path=ckpt.path if ckpt is not None else None,
        checkpoint_fs=ckpt.filesystem if ckpt is not None else None,
        storage=storage_uri(storage_path, name),
        train_rows=n_train, eval_rows=n_eval, text_dim=text_dim, fit_seconds=fit_seconds,
    )


def copy_export(outcome: TrainOutcome, destination: str) -> str:
    """Copy ``export/`` of the final Ray checkpoint to ``destination`` (local path or URI), replacing it."""
    import pyarrow.fs as pafs

    from lardo_ray.io import filesystem_and_path

    if outcome.checkpoint_path is None:
        raise RuntimeError(f"the Ray Train run {outcome.storage} reported no checkpoint: nothing to export")
    src_fs = outcome.checkpoint_fs or pafs.LocalFileSystem()
    src = f"{outcome.checkpoint_path.rstrip('/')}/{EXPORT_DIR}"
    if src_fs.get_file_info(src).type == pafs.FileType.NotFound:
        raise RuntimeError(f"the last checkpoint {outcome.checkpoint_path} has no {EXPORT_DIR}/ (the run did not "
                           "finish its last epoch)")
    dst_fs, dst = filesystem_and_path(destination)
    if dst_fs.get_file_info(dst).type != pafs.FileType.NotFound:
        dst_fs.delete_dir(dst)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    return destination

