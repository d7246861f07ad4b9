"""`lardo-ray ablate` for real: two rules-text variants pre-trained on a BBBP slice (shared DSM output), scratch,
one fine-tune grid on the same split, the compare table and MLflow runs (a sqlite store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lardo_ray.config import ConfigError, load_config
from tests.integration.conftest import run_cli

CFG = """
run: {{name: abl, output_dir: {out}, ray_num_cpus: 3, ray_dashboard: false}}
input: {{path: lardo_ray/data/bbbp.csv, smiles_column: smiles, limit: 120, chunk_rows: 60}}
dsm: {{descriptors: [MolLogP, MolWt, TPSA, NumHDonors, NumHAcceptors, NumRotatableBonds]}}
describe: {{task: bbbp, backend: rules}}
embed: {{max_length: 64}}
model: {{num_layers: 2, hidden: 32, projection_dim: 32}}
pretrain: {{epochs: 2, batch_size: 32, num_workers: 1, resources_per_worker: {{CPU: 1}}, eval_fraction: 0.2,
           checkpoint_every_steps: 1000, warmup_steps: 0}}
finetune: {{dataset: bbbp, data_path: {sub}, split: scaffold, seeds: [0], epochs: 2, batch_size: 32, ray: {{num_cpus: 1}}}}
ablation:
  variants:
    rules: [describe.variant=full]
    rules_no_stage1: [describe.variant=no_stage1]
  baselines: [rf_dsm]
  finetune_variants: {{"+dsm": [finetune.dsm_features=all]}}
tracking: {{tracking_uri: "sqlite:///{out}/mlflow.db", experiment: abl}}
"""


@pytest.fixture()
def config(tmp_path) -> Path:
    src = Path(__file__).resolve().parents[2] / "lardo_ray" / "data" / "bbbp.csv"
    sub = tmp_path / "bbbp_slice.csv"
    sub.write_text("".join(src.read_text().splitlines(keepends=True)[:301]))  # fine-tune on 300 molecules
    p = tmp_path / "ablation.yaml"
    p.write_text(CFG.format(out=tmp_path / "out", sub=sub))
    return p


def test_variant_with_a_wrong_override_is_named(config):
    from lardo_ray.stages.ablation import variant_config

    cfg = load_config(config, ["ablation.variants={bad: [describe.backnd=rules]}"])
    with pytest.raises(ConfigError, match=r"(?s)ablation.variants.bad.*unknown config key .describe.backnd."):
        variant_config(cfg, "bad")
    with pytest.raises(ConfigError, match="ablation.variants"):
        load_config(config, ["ablation.variants={scratch: []}"])
    from lardo_ray.stages.ablation import finetune_variant

    with pytest.raises(ConfigError, match=r"finetune_variants.*only finetune.KEY=VALUE.*describe.backend"):
        load_config(config, ["ablation.finetune_variants={x: [describe.backend=rules]}"])
    cfg = load_config(config, ["ablation.finetune_variants={x: [finetune.dsm_features=some]}"])
    with pytest.raises(ConfigError, match=r"(?s)ablation.finetune_variants.x.*dsm_features"):
        finetune_variant(cfg, "x")


@pytest.mark.slow
def test_ablate_grid_shares_dsm_and_compares_every_method(config, tmp_path):
    r = run_cli("ablate", "--config", str(config), timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = tmp_path / "out"
    # one DSM output for both variants, each variant its own describe and encoder
    assert json.loads((out / "dsm" / "manifest.json").read_text())["status"] == "complete"
    for label in ("rules", "rules_no_stage1"):
        assert not (out / label / "dsm").exists()
        assert (out / label / "pretrain" / "encoder" / "encoder.json").exists()
    texts = {}
    import pyarrow.parquet as pq

    for label in ("rules", "rules_no_stage1"):
        t = pq.read_table(out / label / "describe" / "data", columns=["mol_id", "description", "template_id"])
        texts[label] = dict(zip(t["mol_id"].to_pylist(), t["description"].to_pylist()))
    assert texts["rules"].keys() == texts["rules_no_stage1"].keys()
    assert texts["rules"] != texts["rules_no_stage1"]  # the variants really wrote different text
    table = r.stdout[r.stdout.index("| Dataset"):]
    header = table.splitlines()[0]
    for method in ("rules", "rules_no_stage1", "scratch", "rules+dsm", "rules_no_stage1+dsm", "scratch+dsm",
                   "rf_dsm"):
        assert f" {method} |" in header, table
    # the +dsm methods fine-tune the same encoders with the DSM descriptors in the head, on the same split
    from lardo_ray.stages.compare import search_finetune_runs
    from lardo_ray.finetune.settings import CompareConfig

    runs = search_finetune_runs(CompareConfig(experiment="abl", tracking_uri=f"sqlite:///{out}/mlflow.db"))[0]
    parents = runs[runs["tags.lardo.role"] == "parent"].set_index("tags.lardo.method")
    assert parents.loc["rules+dsm", "params.dsm_features"] == "all"
    assert parents.loc["rules", "params.dsm_features"] == "none"
    assert parents.loc["rules+dsm", "tags.lardo.encoder"] == parents.loc["rules", "tags.lardo.encoder"] != ""
    assert (out / "compare" / "comparison.png").stat().st_size > 0
