"""Stage pretrain: graph-text contrastive pre-training of the GINE encoder on Ray Train (+ DeepSpeed).

Reads the featurize shards (lardo_ray.train.ray_train does the Ray part), writes

* ``<out>/pretrain/encoder/``: encoder.safetensors + encoder.json (``lardo_ray.models.gine.load_encoder``, no
  DeepSpeed or Ray needed), heads.safetensors + model.json (projection heads, temperature);
* ``<out>/pretrain/deepspeed_config.json`` (when DeepSpeed is on) and ``manifest.json``;
* Ray Train's checkpoints under ``pretrain.storage_path`` (default ``<out>/pretrain/ray_train``), run name
  ``<run.name>-pretrain``: re-running the command after a crash resumes from the latest one, the step count
  continuing. A finished run is not trained again (``run.overwrite=true`` starts over).

MLflow: the driver opens the run and logs the whole config as params, the DeepSpeed config, the exported
encoder and the final metrics; rank 0 of the training job logs the per-step metrics into the same run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lardo_ray.config import ConfigError, PipelineConfig, dump_config
from lardo_ray.io import StageOutput, check_writable, filesystem_and_path

if TYPE_CHECKING:
    from lardo_ray.stages.pipeline import PipelineResult
    from lardo_ray.tracking import Tracker

log = logging.getLogger("lardo_ray")

STAGE = "pretrain"
UPSTREAM = "featurize"
ENCODER_DIR = "encoder"
DS_CONFIG_FILE = "deepspeed_config.json"
# Settings that change how the job runs, not what it learns: changing them keeps a run resumable.
OPERATIONAL = {"max_failures", "placement_strategy", "storage_path", "keep_checkpoints", "torch_threads", "data_num_cpus",
               "resources_per_worker", "log_every_steps", "eval_every_steps", "eval_max_rows",
               "checkpoint_every_steps", "cache_data"}


@dataclass
class PretrainResult:
    output: str
    export_dir: str
    mlflow_run_id: str | None
    ray_run: str  # <storage_path>/<name>: Ray Train's checkpoints of this run
    checkpoint: str | None  # the final Ray checkpoint
    steps: int
    epochs: int
    train_rows: int
    eval_rows: int
    num_workers: int
    deepspeed: bool
    wall_seconds: float  # this invocation, Ray start-up included
    samples_per_s: float  # training rows/s over all workers, within the training loop (last worker session)
    resumed_from_step: int = 0
    skipped: bool = False  # the run was already complete: nothing trained
    final_metrics: dict[str, float] = field(default_factory=dict)
    not_logged: list[str] = field(default_factory=list)
    stage: str = STAGE
    registered: str | None = None  # models:/<run name>-encoder/<version> (pyfunc: embeddings out)

    def lines(self) -> list[str]:
        m = self.final_metrics
        eval_line = "n/a (pretrain.eval_fraction=0)"
        if "eval_top1" in m:
            eval_line = (f"top1 {m['eval_top1']:.3f}  top5 {m.get('eval_top5', float('nan')):.3f}  "
                         f"(chance {m.get('eval_chance_top1', float('nan')):.3f}, pool {int(m.get('eval_pool', 0))})")
        engine = "DeepSpeed" if self.deepspeed else "torch"
        out = [
            f"== {self.stage} summary ==",
            f"  output      {self.output}",
            f"  encoder     {self.export_dir}" + (f"  (registered: {self.registered})" if self.registered else ""),
            f"  rows        {self.train_rows:,} train, {self.eval_rows:,} held out",
            f"  steps       {self.steps:,} optimizer steps, {self.epochs} epochs, {self.num_workers} worker(s), {engine}"
            + (f"  (resumed at step {self.resumed_from_step:,})" if self.resumed_from_step else ""),
            f"  train loss  {m.get('train_loss', float('nan')):.4f}   temperature {m.get('temperature', float('nan')):.4f}",
            f"  retrieval   {eval_line}",
            f"  wall time   {self.wall_seconds:,.1f} s   ({self.samples_per_s:,.1f} samples/s in the training loop)",
            f"  checkpoints {self.ray_run}",
        ]
        if self.skipped:
            out.insert(1, "  (already complete: nothing trained; run.overwrite=true to train again)")
        if self.mlflow_run_id:
            out.append(f"  mlflow run  {self.mlflow_run_id}")
        return out

    def metrics(self) -> dict[str, float]:
        out = {"steps": float(self.steps), "train_rows": float(self.train_rows), "eval_rows": float(self.eval_rows),
               "wall_seconds": self.wall_seconds, "samples_per_s": self.samples_per_s,
               "resumed_from_step": float(self.resumed_from_step)}
        out.update({f"final_{k}": v for k, v in self.final_metrics.items()})
        return out


def config_hash(cfg: PipelineConfig) -> str:
    import hashlib

    from lardo_ray.config import without_later_defaults

    payload = {"model": cfg.model.model_dump(mode="json"),
               "pretrain": without_later_defaults("pretrain", cfg.pretrain.model_dump(mode="json", exclude=OPERATIONAL))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ray_run_name(cfg: PipelineConfig) -> str:
    return f"{cfg.run.name}-{STAGE}"


def storage_path(cfg: PipelineConfig) -> str:
    p = cfg.pretrain.storage_path or f"{cfg.stage_dir(STAGE)}/ray_train"
    return p if "://" in p else os.path.abspath(p)


def _check_inputs(cfg: PipelineConfig, up: StageOutput, files: list[str]) -> None:
    import pyarrow.parquet as pq

    from lardo_ray import schema

    names = set(pq.read_schema(files[0], filesystem=up.fs).names)
    need = {schema.MOL_ID, schema.ATOM_FEATURES, schema.EDGE_INDEX, schema.EDGE_FEATURES}
    need.add(schema.TEXT_EMBEDDING if cfg.model.freeze_text else schema.DESCRIPTION)
    if cfg.pretrain.descriptor_weight > 0:
        need.add(schema.DSM_TARGETS)
    missing = sorted(need - names)
    if missing:
        hint = (" (model.freeze_text=true trains on the embed stage's vectors: featurize must read embed/)"
                if schema.TEXT_EMBEDDING in missing else "")
        if schema.DSM_TARGETS in missing:
            hint += (" (pretrain.descriptor_weight > 0 regresses the descriptors that featurize carries with "
                     "featurize.dsm_targets=true)")
        raise ConfigError(f"the featurize output {up.uri} lacks column(s) {missing}{hint}")


def _result_from_manifest(manifest: dict[str, Any], t0: float) -> PretrainResult:
    r = dict(manifest["result"])
    r.update(skipped=True, wall_seconds=time.time() - t0, not_logged=[])
    return PretrainResult(**r)


def _local_copy(directory: str) -> tuple[str, str | None]:
    """A local path with the files of ``directory`` (a temp copy when it is a URI) and the temp dir to remove."""
    if "://" not in directory:
        return directory, None
    import pyarrow.fs as pafs

    tmp = tempfile.mkdtemp(prefix="lardo-export-")
    fs, path = filesystem_and_path(directory)
    pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return tmp, tmp


def run_pretrain(cfg: PipelineConfig, tracker: Tracker | None = None) -> PretrainResult:
    """Pre-train (or resume, or find finished) the encoder on the featurize output; see the module docstring.

    Raises ConfigError before any work when featurize is incomplete, MLflow unreachable, the output not
    writable or the cluster too small; RuntimeError (naming the checkpoints to resume from) if training fails.
    """
    from lardo_ray.execution import init_ray
    from lardo_ray.stages.lifecycle import upstream_chunks
    from lardo_ray.tracking import make_tracker
    from lardo_ray.train import ray_train as rt
    from lardo_ray.train.loop import deepspeed_config

    t0 = time.time()
    pcfg = cfg.pretrain
    up, chunk_ids, fingerprint = upstream_chunks(cfg, UPSTREAM)
    if not chunk_ids:
        raise ConfigError(f"the featurize output {up.uri} has no shards: nothing to pre-train on")
    files = up.data_files(chunk_ids)
    _check_inputs(cfg, up, files)
    tracker = tracker or make_tracker(cfg)
    tracker.check_reachable()
    stage_dir = cfg.stage_dir(STAGE)
    check_writable(stage_dir)
    out = StageOutput(stage_dir)
    chash = config_hash(cfg)
    store, name = storage_path(cfg), ray_run_name(cfg)
    manifest = out.read_manifest()
    if cfg.run.overwrite:
        out.clear()
        rt.delete_run_storage(store, name)
        manifest = None
    elif manifest and (manifest.get("config_hash") != chash or manifest.get("input_fingerprint") != fingerprint):
        raise ConfigError(
            f"{stage_dir} holds pre-training of another config or input (config_hash {manifest.get('config_hash')} "
            f"vs {chash}); its Ray checkpoints would not fit: use another run.output_dir / run.name or set "
            "run.overwrite=true"
        )
    elif manifest and manifest.get("status") == "complete" and manifest.get("result"):
        log.info("pretrain: %s is already complete", stage_dir)
        return _result_from_manifest(manifest, t0)

    export_dir = f"{stage_dir.rstrip('/')}/{ENCODER_DIR}"
    on_cpu = not pcfg.use_gpu
    ds_cfg = deepspeed_config(pcfg, pcfg.num_workers, on_cpu) if pcfg.deepspeed.enabled else None
    base_manifest = {"stage": STAGE, "config_hash": chash, "input_fingerprint": fingerprint,
                     "upstream_chunks": len(chunk_ids), "ray_run": rt.storage_uri(store, name),
                     "export_dir": export_dir}
    init_ray(cfg.run.ray_address, cfg.run.ray_num_cpus, cfg.run.ray_dashboard)
    rt.check_cluster_resources(pcfg)  # a job that cannot get its CPUs would wait forever
    default_marker = os.path.join(store if "://" not in store else tempfile.gettempdir(),
                                  f".{name}-injected-failure")
    fault = rt.FaultInjection.from_env(default_marker)
    with tracker.run(run_name=f"{cfg.run.name}/{STAGE}", tags={"stage": STAGE}):
        out.write_manifest({**base_manifest, "status": "running", "mlflow_run_id": tracker.run_id})
        tracker.log_params(cfg.model_dump(mode="json"))
        tracker.log_text(dump_config(cfg), "config.yaml")
        if ds_cfg is not None:
            text = json.dumps(ds_cfg, indent=2)
            tracker.log_text(text, DS_CONFIG_FILE)
            fs, path = filesystem_and_path(stage_dir)
            with fs.open_output_stream(f"{path.rstrip('/')}/{DS_CONFIG_FILE}") as f:
                f.write(text.encode())
        try:
            outcome = rt.run_training(
                pcfg, cfg.model, files, name=name, storage_path=store, filesystem=up.fs,
                mlflow_uri=tracker.uri if tracker.enabled and tracker.run_id else None,
                mlflow_run_id=tracker.run_id, fault=fault,
            )
        except Exception as e:
            out.write_manifest({**base_manifest, "status": "failed", "error": str(e)[:2000],
                                "mlflow_run_id": tracker.run_id})
            raise
        rt.copy_export(outcome, export_dir)
        m = outcome.metrics
        result = PretrainResult(
            output=out.uri, export_dir=export_dir, mlflow_run_id=tracker.run_id, ray_run=outcome.storage,
            checkpoint=outcome.checkpoint_path, steps=int(m.get("step", 0)), epochs=int(m.get("epoch", 0)),
            train_rows=outcome.train_rows, eval_rows=outcome.eval_rows, num_workers=pcfg.num_workers,
            deepspeed=pcfg.deepspeed.enabled, wall_seconds=time.time() - t0,
            samples_per_s=float(m.get("session_samples_per_s", 0.0)),
            resumed_from_step=int(m.get("session_start_step", 0)),
            final_metrics={k: v for k, v in m.items() if not k.startswith("session_")},
        )
        local, tmp = _local_copy(export_dir)
        try:
            for fname in sorted(os.listdir(local)):
                tracker.log_artifact(os.path.join(local, fname), ENCODER_DIR)
            result.registered = _log_encoder_model(cfg, tracker, local, result)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        tracker.log_metrics(result.metrics(), step=result.steps)
        tracker.set_tags({"ray_run": outcome.storage, "export_dir": export_dir})
        result.not_logged = list(tracker.not_logged)
    out.write_manifest({**base_manifest, "status": "complete", "mlflow_run_id": result.mlflow_run_id,
                        "result": {k: v for k, v in asdict(result).items() if k not in ("skipped", "not_logged")}})
    return result


def _log_encoder_model(cfg: PipelineConfig, tracker: Tracker, export_dir: str, result: PretrainResult) -> str | None:
    """The encoder as an MLflow model (pyfunc: SMILES in, embeddings out), registered as <run name>-encoder."""
    import re

    name = re.sub(r"[^0-9A-Za-z_.-]+", "_", f"{cfg.run.name}-encoder").strip("_")
    out: list[str] = []

    def log() -> None:
        from lardo_ray.models.mlflow_model import log_model, register
        from lardo_ray.models.saved import save_encoder_model

        with tempfile.TemporaryDirectory(prefix="lardo-encoder-") as tmp:
            d = save_encoder_model(os.path.join(tmp, "lardo_model"), export_dir, name, cfg.model_dump(mode="json"),
                                   result.final_metrics)
            uri = log_model(str(d))
        out.append(uri)
        if cfg.finetune.register_models:
            out.append(register(uri, name, {"lardo.kind": "encoder", "lardo.run_id": tracker.run_id or "",
                                            **{k: f"{v:.6g}" for k, v in result.final_metrics.items()}}, tracker.uri))

    tracker._safe("encoder model", log)
    return out[-1] if out else None


def run_in_pipeline(cfg: PipelineConfig, result: PipelineResult) -> PretrainResult:
    return run_pretrain(cfg)
