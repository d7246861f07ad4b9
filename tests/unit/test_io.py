"""Every input format is planned and read without Ray, with the same rows in the same order."""

from __future__ import annotations

import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lardo_ray.io import InputError, StageOutput, plan_chunks, read_chunk
from tests.conftest import GOOD_SMILES

SMILES = GOOD_SMILES + ["CCO", "c1ccncc1", "CC(=O)N"]


def _read_all(uri, **kw):
    chunks = plan_chunks(uri, chunk_rows=4, **kw)
    tables = [read_chunk(c) for c in chunks]
    return chunks, pa.concat_tables(tables)


def _csv(path, sep=","):
    path.write_text("smiles" + sep + "label\n" + "".join(f"{s}{sep}{i % 2}\n" for i, s in enumerate(SMILES)))
    return path


def test_csv_chunks_cover_all_rows_in_order(tmp_path):
    chunks, t = _read_all(str(_csv(tmp_path / "a.csv")), keep_columns=["label"])
    assert [c.n_rows for c in chunks] == [4, 4, 4, 1]
    assert t.column("input_smiles").to_pylist() == SMILES
    assert t.column("label").to_pylist() == [i % 2 for i in range(len(SMILES))]
    assert t.column("source_row").to_pylist()[4] == f"{chunks[1].chunk_id}:0"


def test_tsv_and_gzip(tmp_path):
    p = _csv(tmp_path / "a.tsv", sep="\t")
    gz = tmp_path / "b.tsv.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    for uri in (p, gz):
        _, t = _read_all(str(uri))
        assert t.column("input_smiles").to_pylist() == SMILES


def test_smi_with_names_and_blank_lines(tmp_path):
    p = tmp_path / "a.smi"
    p.write_text("CCO ethanol\nc1ccccc1\tbenzene ring\n\nCC(=O)O acetic acid\n")
    _, t = _read_all(str(p))
    assert t.column("input_smiles").to_pylist() == ["CCO", "c1ccccc1", "", "CC(=O)O"]


def test_parquet_row_groups_directory_and_glob(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    half = len(SMILES) // 2
    pq.write_table(pa.table({"smi": SMILES[:half], "id": [f"m{i}" for i in range(half)]}), d / "p0.parquet", row_group_size=3)
    pq.write_table(pa.table({"smi": SMILES[half:], "id": [f"m{i}" for i in range(half, len(SMILES))]}), d / "p1.parquet")
    (d / "_SUCCESS").write_text("")
    for uri in (str(d), str(d / "*.parquet"), "file://" + str(d)):
        chunks, t = _read_all(uri, smiles_column="smi", id_column="id")
        assert t.column("input_smiles").to_pylist() == SMILES, uri
        assert t.column("input_id").to_pylist() == [f"m{i}" for i in range(len(SMILES))]
        assert len({c.uri for c in chunks}) == 2


def test_hf_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"SMILES": SMILES, "y": list(range(len(SMILES)))})
    ds.save_to_disk(str(tmp_path / "hf"))
    chunks, t = _read_all(str(tmp_path / "hf"), smiles_column="SMILES", keep_columns=["y"])
    assert chunks[0].format == "hf"
    assert t.column("input_smiles").to_pylist() == SMILES
    assert t.column("y").to_pylist() == list(range(len(SMILES)))


def test_limit_and_missing_column(tmp_path):
    p = str(_csv(tmp_path / "a.csv"))
    chunks = plan_chunks(p, chunk_rows=4, limit=6)
    assert sum(c.n_rows for c in chunks) == 6
    with pytest.raises(InputError, match=r"column\(s\) \['SMILES'\] not found .*smiles"):
        plan_chunks(p, smiles_column="SMILES")
    with pytest.raises(InputError, match="input not found"):
        plan_chunks(str(tmp_path / "nope.csv"))


def test_malformed_csv_is_a_clear_error_at_planning(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("smiles,label\nCCO,1\nCCN,1,extra,fields\n")
    with pytest.raises(InputError, match="not valid CSV"):
        plan_chunks(str(p))


def test_invalid_utf8_becomes_a_row_not_a_crash(tmp_path):
    p = tmp_path / "u.csv"
    p.write_bytes(b"smiles\nCCO\n\xff\xfe\xfa\nCCN\n")
    _, t = _read_all(str(p))
    vals = t.column("input_smiles").to_pylist()
    assert vals[0] == "CCO" and vals[2] == "CCN" and "\ufffd" in vals[1]


def test_atomic_shards_and_markers(tmp_path):
    out = StageOutput(str(tmp_path / "stage"))
    out.prepare()
    out.write_table_atomic(out.data_path("00000-000000"), pa.table({"a": [1]}))
    out.write_marker("00000-000000", {"n_read": 1})
    assert out.read_markers() == {"00000-000000": {"n_read": 1}}
    assert not [p for p in (tmp_path / "stage" / "data").iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("total, actors, upper, expect", [
    (30_000, 2, 20_000, 3_750),  # 8 even chunks, not 20,000 + 10,000 with one actor idle
    (100_000, 2, 20_000, 12_500),
    (1_584_663, 2, 20_000, 20_000),  # input.chunk_rows stays the upper bound (the resume unit)
    (6_000, 2, 20_000, 2_000),  # chunks stay >= MIN_CHUNK_ROWS ...
    (3_000, 2, 20_000, 1_500),  # ... unless that would leave an actor without a chunk
    (500, 8, 20_000, 63),
    (10_000, 1, 20_000, 2_500),
])
def test_auto_chunk_rows_keeps_every_actor_busy(total, actors, upper, expect):
    from lardo_ray.io import auto_chunk_rows

    rows = auto_chunk_rows(total, actors, upper)
    assert rows == expect
    n_chunks = -(-total // rows)
    assert n_chunks >= min(actors, total)


def test_plan_chunks_sizes_chunks_from_the_row_count(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("smiles\n" + "\n".join(["CCO"] * 1000) + "\n")
    seen = []
    chunks = plan_chunks(str(p), chunk_rows=lambda n: seen.append(n) or 300, limit=900)
    assert seen == [900]  # the count after input.limit
    assert [c.n_rows for c in chunks] == [300, 300, 300]


def test_a_temporary_left_by_a_killed_writer_is_not_read_as_a_shard(tmp_path):
    """A writer killed between write and rename leaves its temporary beside the shards (CI met this after a
    node kill in describe); reading the directory, as users do, must skip it rather than fail on it."""
    from lardo_ray.fs import temporary_name

    out = StageOutput(str(tmp_path / "stage"))
    out.prepare()
    out.write_table_atomic(out.data_path("00000-000000"), pa.table({"a": [1, 2]}))
    leftover = temporary_name(out.data_path("00000-000001"))
    with open(leftover, "wb") as f:
        f.write(b"PAR1 half a file")
    assert pq.read_table(str(tmp_path / "stage" / "data")).num_rows == 2
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "stage" / "data")) == 2
