"""Run selection of `compare` on a search_runs-shaped frame (pandas >= 3 types tag columns as `str`)."""

from __future__ import annotations

import pandas as pd

from lardo_ray.finetune.settings import CompareConfig
from lardo_ray.stages.compare import _select_runs


def test_children_inherit_missing_tags_from_a_string_typed_parent_column():
    s = pd.StringDtype(na_value=float("nan"))
    df = pd.DataFrame({
        "run_id": ["p1", "c1", "c2"],
        "status": ["FINISHED"] * 3,
        "tags.lardo.kind": pd.array(["finetune", "finetune", "finetune"], dtype=s),
        "tags.lardo.seed": pd.array([None, "0", "1"], dtype=s),
        "tags.lardo.method": pd.array(["lardo", None, ""], dtype=s),
        "tags.lardo.template_id": pd.array([None, None, None], dtype=s),
        "tags.mlflow.parentRunId": pd.array([None, "p1", "p1"], dtype=s),
    })
    notes: list[str] = []
    children, parents = _select_runs(df, CompareConfig(), notes)
    assert list(children["tags.lardo.method"]) == ["lardo", "lardo"]
    assert list(parents["run_id"]) == ["p1"]
