"""lardo_ray models as MLflow models: a ``pyfunc`` over lardo_ray.models.saved.SavedModel.

In: a DataFrame with a ``smiles`` column (any other columns are ignored). Out, one row per input row:
``pred_<target>`` (probabilities for classification, original units for regression) and
``pred_<target>_std`` (the seed ensemble's spread) for a property model, or ``embedding`` (float32 list)
for an encoder; ``error`` names why a row got no numbers (unparsable SMILES, too many atoms ...), so a
refused molecule is never a silent NaN. `mlflow models serve -m models:/<dataset>-<method>/<version>
--env-manager local` serves it; `lardo-ray predict --model <the same URI>` scores files of millions.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import mlflow.pyfunc

log = logging.getLogger("lardo_ray")

SMILES_COLUMN = "smiles"
ERROR_COLUMN = "error"
ARTIFACT = "lardo_model"


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("lardo-ray", "torch", "torch-geometric", "rdkit", "scikit-learn", "safetensors", "pandas"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def smiles_of(frame: Any) -> list[Any]:
    """The SMILES column of a request, or a refusal naming the columns it has."""
    cols = list(getattr(frame, "columns", []))
    for c in cols:
        if str(c).lower() == SMILES_COLUMN:
            return list(frame[c])
    raise ValueError(f"the input needs a '{SMILES_COLUMN}' column (one SMILES per row); it has: "
                     f"{', '.join(map(str, cols)) or 'no columns'}")


def output_frame(model: Any, smiles: list[Any], batch_size: int = 256):
    """The pyfunc's answer for ``smiles`` from a loaded SavedModel (also what the Ray Serve app returns)."""
    import numpy as np
    import pandas as pd

    n = len(smiles)
    errors: list[str | None] = [None] * n
    if model.kind == "encoder":
        prep, emb = model.encode(smiles, batch_size)
        vectors: list[Any] = [None] * n
        for j, i in enumerate(prep.index):
            vectors[int(i)] = emb[j].astype(np.float32).tolist()
        for r in prep.refused:
            errors[r.index] = f"{r.reason}: {r.detail}" if r.detail else r.reason
        return pd.DataFrame({"embedding": vectors, ERROR_COLUMN: errors})
    prep, mean, std = model.predict(smiles, batch_size)
    cols: dict[str, Any] = {}
    for t, name in enumerate(model.targets):
        m = np.full(n, np.nan)
        s = np.full(n, np.nan)
        m[prep.index] = mean[:, t]
        s[prep.index] = std[:, t]
        cols[f"pred_{name}"], cols[f"pred_{name}_std"] = m, s
    for r in prep.refused:
        errors[r.index] = f"{r.reason}: {r.detail}" if r.detail else r.reason
    cols[ERROR_COLUMN] = errors
    return pd.DataFrame(cols)


class LardoModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from lardo_ray.models.saved import SavedModel

        self.model = SavedModel(context.artifacts[ARTIFACT])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        return output_frame(self.model, smiles_of(model_input))


def log_model(model_dir: str, name: str = "model") -> str:
    """Log ``model_dir`` (a SavedModel directory) as a pyfunc in the active run; returns its model URI."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import pandas as pd
    from mlflow.models import infer_signature

    from lardo_ray.models.saved import SavedModel

    if os.path.basename(os.path.normpath(model_dir)) != ARTIFACT:  # MLflow keeps the directory's own name
        import shutil

        tmp = os.path.join(tempfile.mkdtemp(prefix="lardo-log-"), ARTIFACT)
        shutil.copytree(model_dir, tmp)
        model_dir = tmp
    saved = SavedModel(model_dir)
    example = pd.DataFrame({SMILES_COLUMN: ["CCO", "c1ccccc1O"]})
    signature = infer_signature(example, output_frame(saved, list(example[SMILES_COLUMN])))
    entry = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyfunc_entry.py")
    info = mlflow.pyfunc.log_model(name=name, python_model=entry, artifacts={ARTIFACT: model_dir},
                                   signature=signature, input_example=example, pip_requirements=_requirements())
    return info.model_uri


def register(model_uri: str, name: str, tags: dict[str, str], tracking_uri: str) -> str:
    """A new version of registered model ``name`` from ``model_uri``; returns "models:/name/version".
    ``mlflow.register_model`` (not the client's create_model_version): a logged model's ``models:/m-<id>``
    source needs its model id passed along, which a tracking server insists on."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return f"models:/{name}/{mv.version}"


def download(uri: str, tracking_uri: str | None = None, dst: str | None = None) -> str:
    """A local SavedModel directory for a model URI (models:/NAME/VERSION, models:/NAME@alias, runs:/...,
    an MLflow model directory) or a SavedModel directory itself."""
    from lardo_ray.models.saved import MANIFEST

    if os.path.isdir(uri):
        if os.path.isfile(os.path.join(uri, MANIFEST)):
            return uri
        inner = os.path.join(uri, "artifacts", ARTIFACT)
        if os.path.isfile(os.path.join(inner, MANIFEST)):
            return inner
        raise ValueError(f"{uri} is neither a lardo_ray model directory nor an MLflow model logged by lardo_ray")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    dst = dst or tempfile.mkdtemp(prefix="lardo-model-")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    return download(local)


def resolve_version(uri: str, tracking_uri: str) -> str:
    """models:/NAME@alias or models:/NAME/latest -> models:/NAME/<number>, so a resumed predict keeps scoring
    with the model it started with even if the alias moves."""
    if not uri.startswith("models:/"):
        return uri
    client = mlflow.MlflowClient(tracking_uri)
    rest = uri[len("models:/"):]
    if "/" not in rest and "@" not in rest and rest.startswith("m-"):
        return uri  # a logged model's id (MLflow 3): fixed already
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"
    name, _, version = rest.partition("/")
    if version in ("", "latest"):
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ValueError(f"no registered model named {name!r} in {tracking_uri}")
        return f"models:/{name}/{max(int(v.version) for v in versions)}"
    client.get_model_version(name, version)  # raises naming it when absent
    return uri
