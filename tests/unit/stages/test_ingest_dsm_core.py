"""The ingest+dsm core on a batch, without Ray: bad rows become rejected rows, values equal RDKit's."""

from __future__ import annotations

import math

import pyarrow as pa
from rdkit import Chem
from rdkit.Chem import Descriptors

from lardo_ray.config import IngestConfig
from lardo_ray.stages.ingest_dsm import IngestDsm
from tests.conftest import BAD_SMILES, GOOD_SMILES


def _batch(smiles):
    return pa.table({"input_smiles": pa.array(smiles, pa.string()),
                     "source_row": [f"c:{i}" for i in range(len(smiles))],
                     "label": list(range(len(smiles)))})


def test_good_and_bad_rows_all_accounted_for():
    rows = GOOD_SMILES + list(BAD_SMILES) + [None]
    core = IngestDsm(IngestConfig(max_atoms=200), "all")
    out, rej = core(_batch(rows))
    assert out.num_rows == len(GOOD_SMILES)
    assert rej.num_rows == len(BAD_SMILES) + 1
    assert out.num_rows + rej.num_rows == len(rows)
    reasons = dict(zip(rej.column("input_smiles").to_pylist(), rej.column("reason").to_pylist()))
    for smi, reason in BAD_SMILES.items():
        assert reasons[smi] == reason
    assert set(rej.column("stage").to_pylist()) == {"dsm"}
    # carried columns travel with their molecule
    assert out.column("label").to_pylist() == list(range(len(GOOD_SMILES)))
    assert out.schema.field("MolLogP").type == pa.float64()


def test_values_equal_calcmoldescriptors_on_standardised_molecule():
    core = IngestDsm(IngestConfig(), "rdkit")
    out, _ = core(_batch(GOOD_SMILES))
    for row in out.to_pylist():
        ref = Descriptors.CalcMolDescriptors(Chem.MolFromSmiles(row["smiles"]))
        for name, r in ref.items():
            v = row[name]
            assert (math.isnan(v) and (r is None or math.isnan(r))) or v == r, (row["smiles"], name)
