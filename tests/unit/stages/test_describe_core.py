"""The describe stage's per-actor core (no Ray): slicing a shard must not change a single row."""

from __future__ import annotations

import lardo_ray.stages.describe as describe_stage
from lardo_ray.config import load_config
from lardo_ray.llm.describe import resolve_template
from tests.unit.llm.conftest import dsm_table


def test_sliced_shard_equals_whole_shard(monkeypatch):
    cfg = load_config(None, ["describe.backend=rules", "describe.task=bbbp"])
    template_json = resolve_template(cfg.describe).model_dump_json()
    table = dsm_table(30)
    whole = describe_stage.DescribeCore(cfg, template_json)(table).drop_columns(["latency_s"])
    monkeypatch.setattr(describe_stage, "SLICE_ROWS", 7)  # 30 rows -> slices of 7, 7, 7, 7, 2
    sliced = describe_stage.DescribeCore(cfg, template_json)(table).drop_columns(["latency_s"])
    assert sliced.num_rows == 30 and sliced.equals(whole)
    assert sliced.column("mol_id").to_pylist() == table.column("mol_id").to_pylist()
    assert describe_stage.DescribeCore(cfg, template_json)(table.slice(0, 0)).num_rows == 0
