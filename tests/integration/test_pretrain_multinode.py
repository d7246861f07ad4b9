"""Pre-training across nodes: two Ray Train workers on two worker nodes of a local `ray.cluster_utils.Cluster`,
DeepSpeed ZeRO-2 over gloo between them; one node is killed mid-training, and Ray Train restores the last
checkpoint on a replacement node: the step count and the loss curve go on, and the exported encoder fine-tunes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import local_cluster
from tests.integration.test_pretrain import (  # noqa: F401 - `featurized` is a fixture
    _cfg, _expected_steps, _history, _mlflow_client, _out_dir, featurized)

pytestmark = pytest.mark.slow


@pytest.fixture()
def two_worker_nodes():
    """A head with one CPU (the driver, Ray Data's reads) and two worker nodes, each with one training slot.
    Two logical CPUs per node: a worker (0.75) and the Ray Data tasks that feed it, also while the previous
    attempt's data tasks wind down after a node loss."""
    with local_cluster(1, 2, num_cpus=2, resources={"train_slot": 1}) as (cluster, workers):
        yield cluster, workers


def _run(fn, *args):
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001 - handed to the test's thread
        return e


def _checkpoints(storage: Path) -> list[str]:
    """Checkpoints Ray Train has registered (its snapshot), not merely a step_* directory still uploading:
    a node killed before the registration restarts training from step 0."""
    import json

    snaps = list(storage.glob("*/checkpoint_manager_snapshot.json")) if storage.exists() else []
    try:
        return [c["checkpoint_dir_name"] for s in snaps for c in json.loads(s.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []  # being written


def test_two_nodes_zero2_survive_a_node_kill_and_the_encoder_fine_tunes(two_worker_nodes, featurized, tmp_path):
    import ray

    from lardo_ray.stages.finetune import run_finetune
    from lardo_ray.stages.pretrain import run_pretrain
    from lardo_ray.config import load_config

    cluster, workers = two_worker_nodes
    out = _out_dir(tmp_path, featurized)
    client = _mlflow_client(out)
    epochs = 8
    cfg = _cfg(out, f"pretrain.epochs={epochs}", "pretrain.max_failures=1", "pretrain.placement_strategy=SPREAD",
               "pretrain.resources_per_worker={CPU: 0.75, train_slot: 1}", "pretrain.data_num_cpus=0.25")
    storage = out / "pretrain" / "ray_train"
    killed: dict = {}
    # Training runs in a thread; the cluster's nodes are removed and added from this (the main) thread.
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(result=_run(run_pretrain, cfg)), daemon=True)
    t.start()
    deadline = time.time() + 300
    while time.time() < deadline and t.is_alive():
        if _checkpoints(storage):
            killed["checkpoints"] = len(_checkpoints(storage))
            cluster.remove_node(workers[0], allow_graceful=False)
            killed["replacement"] = cluster.add_node(num_cpus=2, resources={"train_slot": 1})
            break
        time.sleep(0.05)
    t.join(timeout=600)
    assert not t.is_alive(), "pre-training did not finish within 10 min of the node kill"
    result = box["result"]
    if isinstance(result, BaseException):
        raise result

    per_epoch, total = _expected_steps(featurized, epochs)
    assert "replacement" in killed, "the node was never killed"
    n_ckpt_steps = len({*range(cfg.pretrain.checkpoint_every_steps, total + 1, cfg.pretrain.checkpoint_every_steps),
                        *range(per_epoch, total + 1, per_epoch)})
    assert killed["checkpoints"] < n_ckpt_steps, f"the kill landed after training: {killed}"
    # one worker per node: two nodes held a training slot each, the head none
    assert ray.cluster_resources().get("train_slot") == 2
    assert result.num_workers == 2 and result.final_metrics["world_size"] == 2
    # restored from a checkpoint, not restarted from step 0, and the step count went on to the end
    assert result.resumed_from_step > 0
    assert result.steps == total and result.epochs == epochs
    steps = [s for s, _ in _history(client, result.mlflow_run_id, "train_loss")]
    drops = [(a, b) for a, b in zip(steps, steps[1:]) if b <= a]
    assert len(drops) <= 1 and steps[-1] == total, steps  # one rewind to the checkpoint at most, then on
    if drops:
        assert drops[0][1] > result.resumed_from_step - cfg.pretrain.log_every_steps
    losses = [v for _, v in _history(client, result.mlflow_run_id, "train_loss")]
    assert losses[-1] < losses[0]

    ft = load_config(None, [f"run.output_dir={out}", "run.progress=false", "tracking.enabled=false",
                            f"finetune.encoder={result.export_dir}", "finetune.seeds=[0]", "finetune.epochs=1",
                            "finetune.batch_size=64"])
    res = run_finetune(ft, use_ray=False)
    assert res.ok and res.encoder_sha256 and res.seeds[0].test.value > 0
