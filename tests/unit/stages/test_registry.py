"""The registry is the one list of stages: CLI, config, pipeline order and jobs/ all follow it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lardo_ray.cli import build_parser, subcommands
from lardo_ray.config import PIPELINE_STAGES, ConfigError, load_config
from lardo_ray.stages.registry import STAGES, Stage, get, load_ref, pipeline_order, register

ROOT = Path(__file__).resolve().parents[3]


def test_every_stage_is_a_subcommand_and_a_job():
    cmds = subcommands()
    for name in STAGES:
        assert name in cmds
        assert (ROOT / "jobs" / f"{name}.py").exists(), f"jobs/{name}.py missing for registered stage {name}"
    job_names = {p.stem for p in (ROOT / "jobs").glob("*.py") if not p.stem.startswith("_")}
    assert job_names <= set(cmds), f"jobs/ without a command: {job_names - set(cmds)}"


def test_pipeline_order_is_the_config_default():
    assert PIPELINE_STAGES == pipeline_order()
    assert load_config().pipeline.stages == list(pipeline_order())
    with pytest.raises(ConfigError, match="pipeline.stages"):
        load_config(overrides=["pipeline.stages=[dsm,nope]"])
    with pytest.raises(ConfigError, match="run.stage_dirs"):
        load_config(overrides=["run.stage_dirs={nope: /tmp/x}"])


def test_hooks_and_cores_resolve():
    """Every "module:attr" in a registration names something that exists (a typo fails here, not mid-run)."""
    for st in STAGES.values():
        for field in ("core", "check", "prepare", "todo", "execute", "after", "summary", "manifest", "worker", "run"):
            ref = getattr(st, field)
            if ref:
                assert callable(load_ref(ref)), f"{st.name}.{field} = {ref}"
        if st.upstream and ":" in st.upstream:
            assert callable(load_ref(st.upstream))
        if st.chunked:
            assert st.core and st.resources and st.sections, st.name
            assert st.resources_of(load_config()) is not None


def test_register_refuses_a_duplicate_and_get_names_the_choices():
    with pytest.raises(ValueError, match="twice"):
        register(Stage(name="dsm", help="again"))
    with pytest.raises(KeyError, match="dsm"):
        get("nope")


def test_help_lists_the_stages_without_importing_heavy_modules():
    code = ("import sys; from lardo_ray.cli import build_parser; build_parser(); "
            "print(','.join(m for m in ('torch', 'ray', 'rdkit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    text = build_parser().format_help()
    for name in STAGES:
        assert name in text
