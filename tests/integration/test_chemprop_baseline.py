"""chemprop's real CLI as the D-MPNN baseline: our split per seed, our metric, MLflow runs compare reads.

`make test` builds chemprop's own venv and sets LARDO_CHEMPROP; there a missing chemprop fails the test
instead of skipping it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lardo_ray.config import ConfigError, load_config
from tests.conftest import ROOT


def _chemprop() -> str | None:
    env = os.environ.get("LARDO_CHEMPROP")
    if env:
        path = shutil.which(env) or shutil.which(str(ROOT / env))
        assert path, f"LARDO_CHEMPROP={env} is not an executable"
        return path
    local = ROOT / ".venv-chemprop" / "bin" / "chemprop"
    return str(local) if local.exists() else shutil.which("chemprop")


CHEMPROP = _chemprop()


def _cfg(tmp_path: Path, **extra):
    src = ROOT / "lardo_ray" / "data" / "bbbp.csv"
    sub = tmp_path / "bbbp_slice.csv"
    sub.write_text("".join(src.read_text().splitlines(keepends=True)[:401]))
    return load_config(None, [
        f"run.output_dir={tmp_path / 'out'}", "run.progress=false", "finetune.dataset=bbbp",
        f"finetune.data_path={sub}", "finetune.split=scaffold", "finetune.seeds=[0,1]",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=cp",
        *[f"{k}={v}" for k, v in extra.items()],
    ])


def test_missing_chemprop_is_a_config_error_naming_the_key():
    from lardo_ray.stages.chemprop_baseline import resolve_executable

    with pytest.raises(ConfigError, match="ablation.chemprop"):
        resolve_executable("/nonexistent/chemprop")


@pytest.mark.slow
@pytest.mark.skipif(CHEMPROP is None, reason="chemprop not installed (make chemprop)")
def test_chemprop_on_our_split_logged_for_compare(tmp_path):
    import mlflow

    from lardo_ray.finetune.data import prepare_task, split_for, split_hash
    from lardo_ray.stages.chemprop_baseline import run_chemprop_baseline
    from lardo_ray.stages.compare import compare, resolved_compare_config

    cfg = _cfg(tmp_path)
    res = run_chemprop_baseline(cfg, CHEMPROP, epochs=4)
    assert not res.failed, res.failed
    prepared = prepare_task(cfg.finetune)
    for seed, m in res.per_seed.items():
        split = split_for(prepared, cfg.finetune, seed)
        assert m["n_test"] == len(split.test) and m["n_train"] == len(split.train)
        assert 0.0 <= m["test_roc_auc"] <= 1.0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cp")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("lardo.seed") is not None]
    assert {r.data.tags["lardo.method"] for r in runs} == {"chemprop"}
    assert sorted(int(r.data.tags["lardo.seed"]) for r in children) == [0, 1]
    for r in children:  # the same molecules our fine-tunes use for that seed
        seed = int(r.data.tags["lardo.seed"])
        split = split_for(prepared, cfg.finetune, seed)
        assert r.data.tags["lardo.split_hash"] == split_hash(split)
        assert r.data.tags["lardo.task_mode"] == "single_task"
        # scored on validation too (compare chooses the best baseline there), predictions kept for the bootstrap
        assert 0.0 <= r.data.metrics["valid_roc_auc"] <= 1.0
        local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id,
                                                    artifact_path=r.data.tags["lardo.predictions"],
                                                    tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        import pandas as pd

        pred = pd.read_parquet(local)
        assert pred["row"].tolist() == list(split.test)
        assert pred["smiles"].tolist() == [prepared.data.smiles[i] for i in split.test]
        assert pred.filter(like="pred_").shape[1] == prepared.data.n_tasks
    table = compare(resolved_compare_config(cfg))
    assert "chemprop" in table.markdown
