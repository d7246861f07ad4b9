"""Dataset cards and load_task: the bundled BBBP always, the shared MoleculeNet files when present."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from lardo_ray.finetune.datasets import CARDS, SIDER_TASKS, get_card, load_task, resolve_path
from lardo_ray.finetune.settings import CompareConfig, FinetuneConfig
from tests.conftest import SHARED_DATA

MOLNET = SHARED_DATA / "moleculenet"
needs_shared = pytest.mark.skipif(not MOLNET.is_dir(), reason=f"{MOLNET} not present")


def test_cards_table():
    assert set(CARDS) == {"bbbp", "bace", "clintox", "tox21", "toxcast", "sider", "hiv", "esol", "freesolv",
                          "lipophilicity"}
    for c in CARDS.values():
        assert c.task_type in ("classification", "regression")
        assert c.metric == ("roc_auc" if c.task_type == "classification" else "rmse")
        assert c.smiles_column == "smiles" and c.file_name.endswith(".csv")
        if c.label_columns is not None:
            assert c.n_tasks == len(c.label_columns) == len(set(c.label_columns))
    assert get_card("ClinTox").label_columns == ("FDA_APPROVED", "CT_TOX")
    assert get_card("hiv").label_columns == ("HIV_active",)
    assert get_card("FreeSolv").label_columns == ("freesolv",)
    assert len(SIDER_TASKS) == 27 and get_card("sider").n_tasks == 27
    assert get_card("toxcast").label_columns is None and get_card("toxcast").n_tasks == 617
    assert get_card("lipo").key == "lipophilicity" and get_card("Delaney").key == "esol"
    with pytest.raises(KeyError, match="built-in cards"):
        get_card("muv")


def test_bundled_bbbp_always():
    d = load_task("bbbp")  # no data_path: the copy shipped in lardo_ray/data
    assert d.source.endswith("bbbp.csv") and d.name == "bbbp"
    assert len(d) == 2039 and d.n_read == 2039 and d.n_dropped == 0
    assert d.labels.shape == (2039, 1) and d.labels.dtype == np.float64
    assert set(np.unique(d.labels)) == {0.0, 1.0}
    assert d.task_names == ["p_np"] and d.task_type == "classification" and d.metric == "roc_auc"
    assert abs(np.mean(d.labels) - 0.765) < 0.01  # PROVENANCE: 76.5 % positive
    sub = d.subset([0, 5, 9])
    assert len(sub) == 3 and sub.smiles[1] == d.smiles[5] and sub.row_index.tolist() == [0, 5, 9]


def test_config_drives_load_task():
    cfg = FinetuneConfig(dataset="BBBP")
    assert cfg.dataset == "bbbp" and cfg.split == "scaffold" and cfg.seeds == [0, 1, 2] and cfg.epochs == 100
    assert cfg.lr_head == 5e-4 and cfg.lr_encoder == 1e-4 and cfg.split_sizes == [0.8, 0.1, 0.1]
    assert len(load_task(cfg)) == 2039
    assert cfg.method_label() == "random-init"
    assert FinetuneConfig(dataset="bbbp", encoder="runs:/0123456789abcdef/encoder").method_label() == "run-01234567"


def test_config_validation():
    with pytest.raises(ValueError, match="unknown dataset"):
        FinetuneConfig(dataset="nope")
    assert FinetuneConfig().dataset == "bbbp"  # the bundled set: the whole pipeline validates with defaults
    with pytest.raises(ValueError, match="finetune.data_path, finetune.label_columns, finetune.task_type"):
        FinetuneConfig(dataset=None)
    with pytest.raises(ValueError, match="split_column"):
        FinetuneConfig(dataset="bbbp", split="column")
    with pytest.raises(ValueError, match="summing to 1"):
        FinetuneConfig(dataset="bbbp", split_sizes=[0.8, 0.1, 0.2])
    with pytest.raises(ValueError, match="distinct"):
        FinetuneConfig(dataset="bbbp", seeds=[0, 0])
    with pytest.raises(ValueError, match="does not fit"):
        FinetuneConfig(dataset="bbbp", task_type="classification", metric="rmse")
    with pytest.raises(ValueError, match="does not fit"):
        FinetuneConfig(dataset="esol", metric="roc_auc")  # task type from the card
    esol = FinetuneConfig(dataset="esol", metric="mae")
    assert esol.resolved_task_type() == "regression" and esol.resolved_metric() == "mae"
    assert FinetuneConfig(dataset="tox21").resolved_metric() == "roc_auc"
    with pytest.raises(ValueError, match="Extra inputs"):
        FinetuneConfig(dataset="bbbp", lr=1.0)
    for name, f in {**FinetuneConfig.model_fields, **CompareConfig.model_fields}.items():
        assert f.description, name


def test_custom_file_unparsable_dropped_and_counted(tmp_path):
    p = tmp_path / "mine.csv.gz"
    rows = ["SMILES,act,logp,fold", "CCO,1,0.5,train", "C1CC,0,1.0,train", ",1,2.0,valid",
            "c1ccccc1,,1.5,test", "NA,0,,train", "CC(=O)O,0,-0.2,valid", "c1ccccc1O,1,1.1,test"]
    p.write_bytes(gzip.compress("\n".join(rows).encode()))
    d = load_task(None, p, smiles_column="smiles", label_columns=["act"], task_type="classification",
                  split_column="fold")
    assert d.n_read == 7 and d.n_dropped == 3 and len(d) == 4
    assert [(r.row, r.reason) for r in d.dropped] == [(1, "unparsable_smiles"), (2, "empty"),
                                                      (4, "unparsable_smiles")]
    assert d.smiles == ["CCO", "c1ccccc1", "CC(=O)O", "c1ccccc1O"]
    assert np.isnan(d.labels[1, 0]) and d.labels[:, 0][[0, 2, 3]].tolist() == [1.0, 0.0, 1.0]
    assert d.split_values.tolist() == ["train", "test", "valid", "test"] and d.name == "mine"
    cfg = FinetuneConfig(data_path=str(p), label_columns=["act", "logp"], task_type="regression",
                         split="column", split_column="fold", drop_unlabelled=True)
    r = load_task(cfg)
    assert r.labels.shape == (4, 2) and r.task_type == "regression" and r.metric == "rmse"


def test_bad_labels_are_errors(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("smiles,y\nCCO,1\nCCC,maybe\n")
    with pytest.raises(ValueError, match="not numbers"):
        load_task(None, p, label_columns=["y"], task_type="classification")
    p.write_text("smiles,y\nCCO,1\nCCC,-1\n")
    with pytest.raises(ValueError, match="0/1"):
        load_task(None, p, label_columns=["y"], task_type="classification")
    with pytest.raises(KeyError, match="not in the file"):
        load_task(None, p, label_columns=["z"], task_type="regression")


def test_parquet_and_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"smiles": ["CCO", "xx", "c1ccccc1"], "p_np": [1, 0, 0]}), tmp_path / "bbbp.parquet")
    d = load_task("bbbp", tmp_path)  # a directory: the card's file name, here as Parquet
    assert len(d) == 2 and d.n_dropped == 1 and d.labels[:, 0].tolist() == [1.0, 0.0]
    with pytest.raises(FileNotFoundError, match="tox21"):
        resolve_path(get_card("tox21"), tmp_path)
    with pytest.raises(FileNotFoundError, match="data_path"):
        load_task("tox21")  # no bundled copy


@needs_shared
@pytest.mark.parametrize(
    "key, n_rows, n_kept, n_tasks",
    [("bbbp", 2039, 2039, 1), ("bace", 1513, 1513, 1), ("tox21", 7831, 7823, 12),
     ("esol", 1128, 1128, 1), ("lipophilicity", 4200, 4200, 1)],
)
def test_shared_moleculenet_files(key, n_rows, n_kept, n_tasks):
    d = load_task(key, MOLNET)
    card = get_card(key)
    assert d.n_read == n_rows and len(d) == n_kept and d.n_dropped == n_rows - n_kept
    assert d.labels.shape == (n_kept, n_tasks) and d.task_names == list(card.label_columns)
    if card.task_type == "classification":
        assert set(np.unique(d.labels[~np.isnan(d.labels)])) == {0.0, 1.0}
    else:
        assert not np.isnan(d.labels).any()
    if key == "tox21":  # 8 hypervalent-aluminium SMILES do not parse (PROVENANCE.md)
        assert all("Al" in r.smiles for r in d.dropped)
        assert abs(np.isnan(d.labels).mean() - 0.171) < 0.005


@needs_shared
def test_shared_toxcast_gz():
    d = load_task("toxcast", MOLNET)  # toxcast.csv.gz found from the card's toxcast.csv
    assert d.source.endswith("toxcast.csv.gz") and d.n_tasks == 617 and len(d) == 8576
    assert abs(np.isnan(d.labels).mean() - 0.710) < 0.005
