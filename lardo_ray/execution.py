"""Running a chunked stage on Ray Data: the one place that knows about actor pools and resources.

A stage supplies a *worker* class (built once per actor, holding RDKit calculators, a model...) whose
``process(chunk_row) -> stats`` reads one chunk, transforms it and writes its shard and marker. Ray Data
schedules the chunks over an actor pool with ``map_batches``, retries a chunk whose actor died, and
streams the small stats rows back to the driver for progress. Exactly-once output follows from the
layout (lardo_ray.io): a chunk always writes the same file names, atomically.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from lardo_ray.config_base import RayResources

log = logging.getLogger("lardo_ray")


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Join the cluster named by ``address``/RAY_ADDRESS, else start a private local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers import lardo_ray from the same checkout even when it is not pip-installed.
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"env_vars": {
        "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")])),
        # Model-loading progress bars from every actor would bury the stage's own progress lines.
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TQDM_DISABLE": "1",
    }}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # address="local": a leftover session dir of a killed head must not be joined by accident.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), runtime_env=env,
                 include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True)


def _quiet_data_context() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # we print one line per finished chunk instead
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def pool_size(res: RayResources, n_units: int) -> int:
    if res.concurrency is not None:
        size = res.concurrency
    elif res.num_gpus > 0:
        import ray

        size = max(1, int(ray.cluster_resources().get("GPU", 1) // res.num_gpus))
    else:
        size = max(1, int(cluster_cpus() // max(res.num_cpus, 1e-6)))
    return max(1, min(size, n_units))


class _ChunkUDF:
    """Adapts a stage worker to Ray Data's batch interface: one row = one chunk spec."""

    def __init__(self, worker_cls: type, worker_kwargs: dict[str, Any]):
        self.worker = worker_cls(**worker_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = [self.worker.process(row) for row in batch.to_pylist()]
        return pa.Table.from_pylist(stats)


def run_chunks(
    stage: str,
    units: list[dict[str, Any]],
    worker_cls: type,
    worker_kwargs: dict[str, Any],
    res: RayResources,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Process ``units`` (chunk rows) on an actor pool; yield each unit's stats as it finishes."""
    import ray.data

    if not units:
        return
    _quiet_data_context()
    size = pool_size(res, len(units))
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    # Ray Data's actor pools already restart dead actors and retry their chunks without limit
    # (max_restarts=-1, max_task_retries=-1): a lost node costs time, never rows.
    ds = ds.map_batches(
        _ChunkUDF,
        fn_constructor_kwargs={"worker_cls": worker_cls, "worker_kwargs": worker_kwargs},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus or None,
        resources=dict(res.resources) or None,
        accelerator_type=res.accelerator_type,
    )
    log.info("%s: %d chunks on %d actors (%.2g CPU, %.2g GPU each)", stage, len(units), size, res.num_cpus, res.num_gpus)
    for row in ds.iter_rows():
        row = dict(row)
        if progress:
            progress(row)
        yield row


class Progress:
    """One line per finished chunk: done/total, molecules, rate, ETA. Plain text: logs stay readable."""

    def __init__(self, stage: str, total_chunks: int, total_rows: int, enabled: bool = True, stream=None):
        self.stage, self.total_chunks, self.total_rows = stage, total_chunks, total_rows
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.start = time.time()
        self.chunks = self.rows = 0

    def __call__(self, stats: dict[str, Any]) -> None:
        self.chunks += 1
        self.rows += int(stats.get("n_read", 0))
        if not self.enabled:
            return
        elapsed = max(time.time() - self.start, 1e-9)
        rate = self.rows / elapsed
        eta = (self.total_rows - self.rows) / rate if rate > 0 else float("nan")
        print(
            f"[{self.stage}] {self.chunks}/{self.total_chunks} chunks  {self.rows:,}/{self.total_rows:,} rows  "
            f"{rate:,.0f} rows/s  ETA {eta:,.0f}s",
            file=self.stream,
            flush=True,
        )
