"""MLflow: one way to open runs and log params, metrics and artifacts.

The tracking server is checked at start (a clear error before any work). Once work has started, a
failing server never stops the job: what could not be logged is kept and reported at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any, TypedDict

from lardo_ray.config_base import ConfigError

log = logging.getLogger("lardo_ray")


def resolve_tracking_uri(tracking_uri: str | None, output_dir: str) -> str:
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):  # e.g. set for every job by the cluster's head
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in output_dir:
        return "sqlite:///mlflow.db"
    return f"sqlite:///{os.path.abspath(os.path.join(output_dir, 'mlflow.db'))}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


class Tracker:
    """A thin wrapper over an active MLflow run that never raises once the run is open."""

    def __init__(self, enabled: bool, uri: str, experiment: str, artifact_location: str | None = None):
        self.enabled, self.uri, self.experiment = enabled, uri, experiment
        self.artifact_location = artifact_location  # for a new experiment in a local store; None = beside it
        self.run_id: str | None = None
        self.not_logged: list[str] = []

    def check_reachable(self) -> None:
        if not self.enabled:
            return
        import mlflow

        if self.uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.uri[len("sqlite:///"):]) or ".", exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        try:
            client = mlflow.MlflowClient(self.uri)
            if client.get_experiment_by_name(self.experiment) is None:
                # A local store keeps its artifacts beside itself, not in ./mlruns of whatever cwd.
                location = self.artifact_location
                if location is None and self.uri.startswith("sqlite:///"):
                    db = self.uri[len("sqlite:///"):]
                    location = "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
                client.create_experiment(self.experiment, artifact_location=location)
        except Exception as e:  # noqa: BLE001 - mlflow raises many types for an unreachable store
            raise ConfigError(
                f"MLflow tracking store {self.uri!r} (config key tracking.tracking_uri) is not reachable: "
                f"{type(e).__name__}: {str(e)[:300]}. Start the server, fix the URI, or set tracking.enabled=false."
            ) from None

    @contextlib.contextmanager
    def run(self, run_name: str, tags: dict[str, str] | None = None, nested: bool = False) -> Iterator[Tracker]:
        if not self.enabled:
            yield self
            return
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment)
        # Inside the pipeline's parent run every stage becomes a child run.
        nested = nested or mlflow.active_run() is not None
        r = mlflow.start_run(run_name=run_name, tags=tags or {}, nested=nested)
        outer, self.run_id = self.run_id, r.info.run_id
        outer_failed, self._failed = getattr(self, "_failed", False), False
        status = "FAILED"
        try:
            yield self
            status = "FAILED" if self._failed else "FINISHED"
        finally:
            self._failed = outer_failed
            # end_run pops the run first and then calls the server: a dead server costs only the status.
            self._safe(f"run status {status}", mlflow.end_run, status)
            self.run_id = outer  # the enclosing run again (None at top level): nothing is logged to an ended run

    def fail_run(self) -> None:
        """End the innermost open run as FAILED (a method or seed that failed) without raising through it."""
        self._failed = True

    def _safe(self, what: str, fn, *args, **kwargs) -> None:
        if not self.enabled or self.run_id is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - logging must not kill hours of work
            self.not_logged.append(what)
            log.warning("MLflow: could not log %s: %s", what, str(e)[:200])

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        flat = flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._safe("params", mlflow.log_params, dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._safe(f"metrics {sorted(clean)} step={step}", mlflow.log_metrics, clean, step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        import mlflow

        self._safe(f"artifact {os.path.basename(path)}", mlflow.log_artifact, path, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        import mlflow

        self._safe(f"artifact {name}", mlflow.log_text, text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        self._safe("tags", mlflow.set_tags, tags)


def make_tracker(cfg) -> Tracker:
    """The pipeline config's tracker (cfg: lardo_ray.config.PipelineConfig)."""
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.run.output_dir)
    # A local store for a run whose outputs are in object storage keeps its artifacts there too.
    location = (f"{cfg.run.output_dir.rstrip('/')}/mlartifacts"
                if uri.startswith("sqlite:///") and "://" in cfg.run.output_dir else None)
    return Tracker(cfg.tracking.enabled, uri, cfg.tracking.experiment, location)


# ------------------------------------------------------------------ the tags every fine-tune run carries
# The compare contract: lardo_ray.stages.compare finds fine-tune runs by these, whoever wrote them
# (the fine-tune grid, the chemprop baseline).
TAG_KIND = "lardo.kind"
TAG_ROLE = "lardo.role"
TAG_DATASET = "lardo.dataset"
TAG_METHOD = "lardo.method"
TAG_SPLIT = "lardo.split"
TAG_ENCODER_RUN = "lardo.encoder_run_id"
TAG_TASK_TYPE = "lardo.task_type"
TAG_METRIC = "lardo.metric"
TAG_SEED = "lardo.seed"
KIND_FINETUNE = "finetune"
PARENT_TAG = "mlflow.parentRunId"
TAG_ENCODER = "lardo.encoder"  # finetune.encoder as given ("" = no pre-trained encoder)
TAG_PREDICTIONS = "lardo.predictions"  # artifact name of a seed run's test predictions
TAG_TASK_MODE = "lardo.task_mode"  # single_task | multitask | per_target (the protocol the numbers come from)
TAG_ENCODER_SHA = "lardo.encoder_sha256"  # fingerprint of the encoder tensors the runs started from
TAG_SPLIT_HASH = "lardo.split_hash"  # fingerprint of the seed's train/valid/test indices
TAG_FAILED_SEEDS = "lardo.failed_seeds"


class FinetuneTagKwargs(TypedDict, total=False):
    """The keywords of ``finetune_tags`` a method's parent and seed runs share (all but ``seed``)."""

    encoder_run_id: str | None
    task_type: str | None
    metric: str | None
    task_mode: str | None


def finetune_tags(
    dataset: str,
    method: str,
    split: str,
    *,
    encoder_run_id: str | None = None,
    task_type: str | None = None,
    metric: str | None = None,
    seed: int | None = None,
    task_mode: str | None = None,
) -> dict[str, str]:
    """The lardo.* tags of a fine-tune parent run (seed=None) or of one seed's child run."""
    tags = {
        TAG_KIND: KIND_FINETUNE,
        TAG_ROLE: "parent" if seed is None else "seed",
        TAG_DATASET: dataset,
        TAG_METHOD: method,
        TAG_SPLIT: split,
        TAG_ENCODER_RUN: encoder_run_id or "",
    }
    if task_type:
        tags[TAG_TASK_TYPE] = task_type
        from lardo_ray.finetune.metrics import default_metric

        tags[TAG_METRIC] = metric or default_metric(task_type)
    if seed is not None:
        tags[TAG_SEED] = str(int(seed))
    if task_mode:
        tags[TAG_TASK_MODE] = task_mode
    return tags
