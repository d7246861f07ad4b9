"""The saved-model directory's refusals and URI handling that need no MLflow store."""

from __future__ import annotations

import json

import pytest

from lardo_ray.models.mlflow_model import download, resolve_version, smiles_of
from lardo_ray.models.saved import FEATURIZER_VERSION, MANIFEST, ModelMismatchError, SavedModel


def test_a_logged_model_id_needs_no_lookup(tmp_path):
    # MLflow 3's models:/m-<id> is already fixed: resolving it must not ask a registry for a model named m-<id>
    assert resolve_version("models:/m-0123abcd", f"sqlite:///{tmp_path / 'none.db'}") == "models:/m-0123abcd"
    assert resolve_version("runs:/abc/model", "sqlite:///x.db") == "runs:/abc/model"


def test_a_directory_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(ModelMismatchError, match=MANIFEST):
        SavedModel(tmp_path)
    with pytest.raises(ValueError, match="neither a lardo_ray model"):
        download(str(tmp_path))


def test_another_featurizer_version_is_refused_naming_both(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"kind": "property", "name": "x", "featurizer_version": "ogb:[1]:[2]",
                                                 "members": []}))
    with pytest.raises(ModelMismatchError) as e:
        SavedModel(tmp_path)
    assert "ogb:[1]:[2]" in str(e.value) and FEATURIZER_VERSION in str(e.value)


def test_a_request_without_a_smiles_column_names_what_it_has():
    import pandas as pd

    assert smiles_of(pd.DataFrame({"SMILES": ["CCO"]})) == ["CCO"]
    with pytest.raises(ValueError, match="needs a 'smiles' column.*smi, name"):
        smiles_of(pd.DataFrame({"smi": ["CCO"], "name": ["e"]}))
