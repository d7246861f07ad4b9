from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the in-process integration tests."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def local_cluster(head_cpus: float, n_workers: int, **worker_args):
    """A real multi-node Ray cluster on this host (``ray.cluster_utils.Cluster``), the driver attached to it.

    Yields (cluster, worker node handles). All nodes share one host, and the driver now and then attaches to a
    worker node's raylet instead of the head's; killing that node would kill the driver's own node (and what
    is pinned there: Ray Data's stats actor, Ray Train's controller), the head-loss fault, not a worker loss.
    So the worker the driver is NOT on comes first: tests kill ``workers[0]``."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
    workers = [cluster.add_node(**worker_args) for _ in range(n_workers)]  # keep the handles: worker_nodes is a set
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    driver_node = ray.get_runtime_context().get_node_id()
    workers.sort(key=lambda w: w.node_id == driver_node)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "lardo_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=str(ROOT), **kw)
