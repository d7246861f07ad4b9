"""The property model of the fine-tune stage: a GINE graph encoder + a 2-layer MLP head, one output per task.

Where the encoder comes from (``FinetuneConfig.encoder``):

* ``None``: a random initialisation of the architecture in ``cfg.model`` (the no-pre-training baseline);
* an export directory (``save_encoder`` output: ``encoder.safetensors`` + ``encoder.json``; a directory
  whose ``encoder/`` sub-directory holds them is accepted too), local or in object storage (``s3://``, ``gs://``);
* ``runs:/<run_id>/<artifact path>`` or ``models:/<name>/<version>`` (also ``models:/<name>@<alias>``),
  downloaded with ``mlflow.artifacts.download_artifacts`` from the current tracking URI.

``resolve_encoder`` does the download and finds the MLflow run that produced the encoder (for the
``lardo.encoder_run_id`` tag); ``EncoderSource.from_dir`` packs the two files as bytes so that Ray tasks on
other nodes need neither the driver's disk nor the tracking server. ``build_property_model`` loads the
weights with ``strict=True`` and then checks the encoder's tensors against the export's file tensor by
tensor (``encoder_state_sha256``): a fine-tune run provably starts from the pre-trained weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lardo_ray.fs import StorageError, is_remote, local_copy
from lardo_ray.models.gine import ENCODER_CONFIG, ENCODER_WEIGHTS, GINEConfig, GINEEncoder, load_encoder

if TYPE_CHECKING:
    from lardo_ray.config import PipelineConfig

log = logging.getLogger("lardo_ray")

# Keys that may name the MLflow run an export came from: in encoder.json (top level or under "extra"/"mlflow"),
# in a model.json next to it, or in a manifest.json in the export directory or its parent.
RUN_ID_KEYS = ("mlflow_run_id", "encoder_run_id", "source_run_id", "run_id")
SIDECARS = ("encoder.json", "model.json", "manifest.json")


class EncoderResolveError(ValueError):
    """finetune.encoder cannot be found / downloaded / read."""


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class PropertyModel(nn.Module):
    """Graph encoder [+ DSM descriptors] -> Linear(hidden) -> ReLU -> Dropout -> Linear(hidden, n_tasks).

    ``n_descriptors`` > 0: the head also reads that many normalised molecule descriptors, concatenated with the
    graph embedding (the DSMs' exact values used at prediction time, not only through pre-training text)."""

    def __init__(self, encoder: GINEEncoder, n_tasks: int, head_hidden: int = 256, head_dropout: float = 0.0,
                 n_descriptors: int = 0):
        super().__init__()
        if n_tasks < 1:
            raise ValueError("n_tasks must be >= 1")
        self.encoder = encoder
        self.n_tasks = n_tasks
        self.n_descriptors = int(n_descriptors)
        self.head = nn.Sequential(
            nn.Linear(encoder.out_dim + self.n_descriptors, head_hidden),
            nn.ReLU(),
            nn.Dropout(head_dropout),
            nn.Linear(head_hidden, n_tasks),
        )

    def head_on(self, h: torch.Tensor, descriptors: torch.Tensor | None = None) -> torch.Tensor:
        """The head on graph embeddings ``h`` (and the molecules' descriptors when the model reads them)."""
        if self.n_descriptors:
            if descriptors is None:
                raise ValueError(f"this model reads {self.n_descriptors} descriptors per molecule; none given")
            h = torch.cat([h, descriptors], dim=1)
        return self.head(h)

    def forward(self, batch, descriptors: torch.Tensor | None = None) -> torch.Tensor:
        """A PyG batch -> (num_graphs, n_tasks): logits for classification, standardised values for regression."""
        return self.head_on(self.encoder(batch), descriptors)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def set_encoder_dropout(self, p: float) -> None:
        self.encoder.dropout.p = float(p)
        self.encoder.config.dropout = float(p)


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Order-independent fingerprint of a state dict: name, dtype, shape and bytes of every tensor.

    Floating tensors are fingerprinted as fp32 (the dtype every model is rebuilt in), so an export from a
    bf16/fp16 run written before exports were fp32 still matches the model that loaded it (the widening is
    exact); a changed value still changes the hash."""
    from lardo_ray.models.gine import fp32_tensor

    h = hashlib.sha256()
    for k in sorted(state):
        t = fp32_tensor(state[k])
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def encoder_state_sha256(encoder: nn.Module) -> str:
    return state_sha256(encoder.state_dict())


# ---------------------------------------------------------------------------------------------------------
# Where the encoder comes from
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EncoderSource:
    """A pre-trained encoder, as bytes (travels to Ray tasks through the object store), with its provenance."""

    spec: str  # finetune.encoder as given
    files: dict[str, bytes]  # encoder.safetensors, encoder.json
    run_id: str = ""  # MLflow run that produced it ("" when unknown)
    local_dir: str = ""  # where it was read from on the driver
    sha256: str = ""  # state_sha256 of the export's tensors
    meta: dict[str, Any] = field(default_factory=dict)  # encoder.json

    @classmethod
    def from_dir(cls, directory: str | Path, spec: str | None = None, run_id: str = "") -> EncoderSource:
        from safetensors.torch import load_file

        d = find_export_dir(directory)
        files = {name: (d / name).read_bytes() for name in (ENCODER_WEIGHTS, ENCODER_CONFIG)}
        meta = json.loads(files[ENCODER_CONFIG])
        run_id = run_id or find_run_id(d) or ""
        sha = state_sha256(load_file(str(d / ENCODER_WEIGHTS)))
        return cls(spec=spec or str(directory), files=files, run_id=run_id, local_dir=str(d), sha256=sha, meta=meta)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta.get("config", {}))

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self.files[ENCODER_WEIGHTS])

    def load(self, map_location: str | torch.device = "cpu") -> GINEEncoder:
        """The encoder (via ``lardo_ray.models.gine.load_encoder``: format checks, strict loading)."""
        with tempfile.TemporaryDirectory(prefix="lardo_enc_") as tmp:
            for name, blob in self.files.items():
                (Path(tmp) / name).write_bytes(blob)
            return load_encoder(tmp, map_location=map_location)

    def describe(self) -> str:
        arch = self.config
        what = f"{arch.get('num_layers', '?')} x {arch.get('hidden', '?')} GINE" if arch else "GINE"
        run = f", MLflow run {self.run_id}" if self.run_id else ""
        return f"{self.spec} ({what}{run}, sha256 {self.sha256[:12]})"


def find_export_dir(directory: str | Path) -> Path:
    """The directory holding encoder.safetensors + encoder.json: ``directory`` or its ``encoder/`` child."""
    d = Path(directory).expanduser()
    for cand in (d, d / "encoder"):
        if (cand / ENCODER_WEIGHTS).is_file() and (cand / ENCODER_CONFIG).is_file():
            return cand
    if not d.exists():
        raise EncoderResolveError(f"finetune.encoder: {str(d)!r} does not exist")
    listing = sorted(p.name for p in d.iterdir())[:20] if d.is_dir() else []
    raise EncoderResolveError(
        f"finetune.encoder: {str(d)!r} holds no {ENCODER_WEIGHTS} + {ENCODER_CONFIG} (an export of "
        f"lardo_ray.models.gine.save_encoder / the pretrain stage); found {listing}"
    )


def _run_id_in(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    for k in RUN_ID_KEYS:
        v = obj.get(k)
        if isinstance(v, str) and v.strip():
            return v.strip()
    for sub in ("extra", "mlflow", "tracking", "pretrain"):
        found = _run_id_in(obj.get(sub))
        if found:
            return found
    return None


def find_run_id(export_dir: str | Path) -> str | None:
    """The MLflow run id recorded with an export (encoder.json / model.json / manifest.json in the directory,
    then manifest.json / run.json in its parent), or None."""
    d = Path(export_dir)
    candidates = [d / n for n in SIDECARS] + [d.parent / "manifest.json", d.parent / "run.json"]
    for p in candidates:
        if not p.is_file():
            continue
        try:
            found = _run_id_in(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
        if found:
            return found
    return None


def _remote_run_id(spec: str) -> str:
    """The run id in the pretrain manifest beside a remote export (``<out>/pretrain/manifest.json``), or ""."""
    from lardo_ray import fs

    parent = spec.rstrip("/").rsplit("/", 1)[0]
    for cand in (fs.join(spec, "manifest.json"), fs.join(parent, "manifest.json")):
        try:
            found = _run_id_in(json.loads(fs.read_bytes(cand))) if fs.is_file(cand) else None
        except (OSError, ValueError):
            found = None
        if found:
            return found
    return ""


def _model_uri_run_id(uri: str) -> str:
    """The source run of ``models:/name/version`` or ``models:/name@alias`` (best effort; "" when unknown)."""
    import mlflow

    rest = uri[len("models:/"):].strip("/")
    client = mlflow.MlflowClient()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = rest.partition("/")
            version = version.split("/")[0]
            if version.lower() == "latest" or not version:
                versions = client.search_model_versions(f"name = '{name}'")
                mv = max(versions, key=lambda v: int(v.version))
            elif version.isdigit():
                mv = client.get_model_version(name, version)
            else:  # a stage name (Production, ...)
                mv = client.get_latest_versions(name, stages=[version])[0]
        if mv.run_id:
            return str(mv.run_id)
        src = str(getattr(mv, "source", "") or "")
        if src.startswith("runs:/"):
            return src[len("runs:/"):].split("/")[0]
        model_id = getattr(mv, "model_id", None)
        if model_id:
            return str(getattr(client.get_logged_model(model_id), "source_run_id", "") or "")
    except Exception as e:  # noqa: BLE001 - provenance is best effort; the weights are what matters
        log.warning("finetune: could not find the source run of %s: %s", uri, str(e)[:200])
    return ""


def _resolve_mlflow(spec: str, dst: str) -> EncoderSource:
    import os

    import mlflow

    prev = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=dst)
    except Exception as e:  # noqa: BLE001 - many exception types for a missing run / artifact / server
        raise EncoderResolveError(
            f"finetune.encoder={spec!r}: cannot download it from MLflow at {mlflow.get_tracking_uri()!r}: "
            f"{type(e).__name__}: {str(e)[:300]}"
        ) from None
    finally:
        if prev is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = prev
    if spec.startswith("runs:/"):
        run_id = spec[len("runs:/"):].split("/")[0]
    else:
        run_id = _model_uri_run_id(spec) or find_run_id(find_export_dir(local)) or ""
    return EncoderSource.from_dir(local, spec=spec, run_id=run_id)


def resolve_encoder(spec: str | None, download_dir: str | Path | None = None) -> EncoderSource | None:
    """``finetune.encoder`` -> an ``EncoderSource`` (None for random init). MLflow URIs are downloaded from the
    current tracking URI (``mlflow.set_tracking_uri``) into ``download_dir`` (a temporary directory if None)."""
    if spec is None or not str(spec).strip():
        return None
    spec = str(spec).strip()
    if spec.startswith(("runs:/", "models:/")):
        if download_dir is None:  # the bytes are read into memory: the download need not outlive this call
            with tempfile.TemporaryDirectory(prefix="lardo_encoder_") as tmp:
                return _resolve_mlflow(spec, tmp)
        Path(download_dir).mkdir(parents=True, exist_ok=True)
        return _resolve_mlflow(spec, str(download_dir))
    if is_remote(spec):  # an export directory in object storage (s3://, gs://, ...): read into memory
        try:
            with local_copy(spec) as local:
                return EncoderSource.from_dir(local, spec=spec, run_id=_remote_run_id(spec))
        except StorageError as e:
            raise EncoderResolveError(f"finetune.encoder={spec!r}: {e}") from None
    return EncoderSource.from_dir(spec, spec=spec)


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------
def random_encoder_config(cfg: PipelineConfig) -> GINEConfig:
    m = cfg.model
    return GINEConfig(num_layers=m.num_layers, hidden=m.hidden, dropout=m.dropout, pooling=m.pooling, jk=m.jk,
                      batch_norm=m.batch_norm)


@dataclass
class BuiltModel:
    model: PropertyModel
    encoder_run_id: str  # "" for random init / unknown provenance
    encoder_sha256: str  # fingerprint of the encoder's tensors at the start of fine-tuning
    pretrained: bool
    spec: str | None


def build_property_model(
    cfg: PipelineConfig,
    n_tasks: int,
    seed: int,
    encoder: EncoderSource | None = None,
    device: str | torch.device = "cpu",
    n_descriptors: int = 0,
) -> BuiltModel:
    """The property model of one fine-tune run.

    ``encoder`` (an already resolved ``EncoderSource``) wins; else ``cfg.finetune.encoder`` is resolved here
    (downloaded when it is an MLflow URI); None there = random init from ``cfg.model``. The head (and a random
    encoder) are initialised from the seed; the head's init is the same for every encoder. Raises if the
    loaded encoder's tensors are not exactly the export's.
    """
    ft = cfg.finetune
    if encoder is None and ft.encoder:
        encoder = resolve_encoder(ft.encoder)
    torch.manual_seed(seed)
    if encoder is None:
        enc = GINEEncoder(random_encoder_config(cfg))
    else:
        enc = encoder.load()
        loaded = encoder_state_sha256(enc)
        if encoder.sha256 and loaded != encoder.sha256:
            raise RuntimeError(f"encoder {encoder.spec}: loaded tensors differ from the export (sha256 "
                               f"{loaded[:12]} vs {encoder.sha256[:12]})")
    # The head's init depends on the seed only (not on the encoder's source): in an ablation the methods
    # differ in the encoder alone.
    torch.manual_seed((int(seed) * 1_000_003 + 17) % (2**63))
    model = PropertyModel(enc, n_tasks, ft.head_hidden, ft.head_dropout, n_descriptors)
    if ft.encoder_dropout is not None:
        model.set_encoder_dropout(ft.encoder_dropout)
    sha = encoder_state_sha256(model.encoder)
    if encoder is not None and encoder.sha256 and sha != encoder.sha256:  # pragma: no cover - defensive
        raise RuntimeError(f"encoder {encoder.spec}: weights changed while building the model")
    model.to(device)
    return BuiltModel(model=model, encoder_run_id=encoder.run_id if encoder else "", encoder_sha256=sha,
                      pretrained=encoder is not None, spec=encoder.spec if encoder else None)
