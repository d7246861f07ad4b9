"""Models that outlive their run: a fine-tuned property model (the seeds' best-validation weights) or a
pre-trained encoder, as one directory with everything needed to apply it to new SMILES.

Layout (``lardo_model.json`` says what it is; no pickled code except sklearn's descriptor normaliser):

    lardo_model.json           kind, targets, task type, architecture, label scaling, the standardiser and
                               featurizer versions it was trained with, metrics, the training config
    seed<k>.safetensors        one ensemble member per seed (PropertyModel state, fp32)
    seed<k>.normaliser.pkl     its descriptor CDF normaliser (finetune.dsm_features=all only)
    seed<k>.forest.pkl         kind "forest": that seed's per-target random forests and imputation medians
    seed<k>.safetensors        kind "forest" on an encoder (features gnn, gnn+dsm, ...): that seed's frozen encoder
    encoder/                   kind "encoder": the pre-training export (encoder.safetensors + encoder.json)

``SavedModel.load(dir)`` refuses a model written with another featurizer or standardiser version, naming
what differs; ``predict`` / ``encode`` take SMILES and give arrays in input order plus the rows refused
(with a reason) — never a silent 0 or NaN row. The MLflow flavour (lardo_ray.models.mlflow_model) and the
predict / encode stages all go through this one class, so they give the same numbers.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lardo_ray.chem.graph import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS
from lardo_ray.chem.standardise import STANDARDISER_VERSION

MANIFEST = "lardo_model.json"
FORMAT = "lardo_ray.model"
FORMAT_VERSION = 1
# What the graphs are made of: a model is only valid on graphs with this vocabulary.
FEATURIZER_VERSION = f"ogb:{ATOM_FEATURE_DIMS}:{BOND_FEATURE_DIMS}"
# Fine-tuning featurises the standardised parent with this Standardiser (lardo_ray.finetune.train).
FINETUNE_STANDARDISER = {"max_atoms": 10_000, "keep_largest_fragment": True, "neutralize": True}


class ModelMismatchError(ValueError):
    """The saved model cannot be applied here (another featurizer / standardiser / format version)."""


@dataclass
class Member:
    """One seed's tested weights, and what turns its outputs into the original units."""

    seed: int
    state: bytes  # safetensors of the PropertyModel state dict
    normaliser: bytes | None = None  # pickled QuantileTransformer fitted on that seed's training rows
    label_mean: list[float] | None = None  # regression: the training rows' mean / std per target
    label_std: list[float] | None = None
    encoder_config: dict[str, Any] = field(default_factory=dict)  # GINEConfig of its encoder
    n_descriptors: int = 0
    forest: bytes | None = None  # kind "forest": pickled {"features", "median", "tasks": [forest | constant]}
    # task_mode per_target: one single-output model per target (None: the target had no training rows, its
    # prediction is the constant the fine-tune tested with); this member's own state is then unused
    per_target: list[Member | None] | None = None


@dataclass
class ModelCard:
    kind: str  # "property" (a GNN) | "forest" (the rf_dsm / rf_ecfp baselines) | "encoder"
    name: str  # e.g. "bbbp-rules" (the registry name)
    targets: list[str] = field(default_factory=list)
    task_type: str = ""  # classification | regression
    encoder_config: dict[str, Any] = field(default_factory=dict)
    n_descriptors: int = 0
    head_hidden: int = 256
    descriptor_names: list[str] = field(default_factory=list)
    # kind "forest": rf_dsm (the 223 DSM descriptors), rf_ecfp (Morgan r=2, 2,048 bits), gnn (a frozen encoder's
    # embedding, finetune.head=forest), then +dsm (the descriptors) and/or +ecfp (the bits), in that column order
    features: str = ""
    task_mode: str = "multitask"  # kind "property": one network for every target, or one per target
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    standardiser: dict[str, Any] = field(default_factory=lambda: dict(FINETUNE_STANDARDISER))
    standardiser_version: str = STANDARDISER_VERSION
    featurizer_version: str = FEATURIZER_VERSION
    format: str = FORMAT
    format_version: int = FORMAT_VERSION


def state_bytes(state: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").float().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
                 for k, v in state.items()})


def save_property_model(directory: str | Path, card: ModelCard, members: list[Member]) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    card.seeds = [m.seed for m in members]
    meta = asdict(card)
    meta["members"] = []
    for m in members:
        entry: dict[str, Any] = {"seed": m.seed, "label_mean": m.label_mean, "label_std": m.label_std}
        if m.forest is not None:
            (d / f"seed{m.seed}.forest.pkl").write_bytes(m.forest)
            entry["forest"] = f"seed{m.seed}.forest.pkl"
            if m.state:  # a forest on an encoder's embedding: the encoder too
                (d / f"seed{m.seed}.safetensors").write_bytes(m.state)
                entry["encoder_state"] = f"seed{m.seed}.safetensors"
        elif m.per_target is not None:
            entry["per_target"] = [_save_target(d, m.seed, t, sub) for t, sub in enumerate(m.per_target)]
        else:
            (d / f"seed{m.seed}.safetensors").write_bytes(m.state)
        if m.normaliser is not None:
            (d / f"seed{m.seed}.normaliser.pkl").write_bytes(m.normaliser)
            entry["normaliser"] = f"seed{m.seed}.normaliser.pkl"
        meta["members"].append(entry)
    (d / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return d


def _save_target(d: Path, seed: int, t: int, sub: Member | None) -> dict[str, Any] | None:
    if sub is None:
        return None
    (d / f"seed{seed}.target{t}.safetensors").write_bytes(sub.state)
    entry: dict[str, Any] = {"state": f"seed{seed}.target{t}.safetensors", "label_mean": sub.label_mean,
                             "label_std": sub.label_std}
    if sub.normaliser is not None:
        (d / f"seed{seed}.target{t}.normaliser.pkl").write_bytes(sub.normaliser)
        entry["normaliser"] = f"seed{seed}.target{t}.normaliser.pkl"
    return entry


def save_encoder_model(directory: str | Path, export_dir: str | Path, name: str, config: dict[str, Any],
                       metrics: dict[str, float] | None = None) -> Path:
    import shutil

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    shutil.copytree(export_dir, d / "encoder", dirs_exist_ok=True)
    meta_enc = json.loads((d / "encoder" / "encoder.json").read_text())
    card = ModelCard(kind="encoder", name=name, encoder_config=meta_enc.get("config", {}), config=config,
                     metrics=dict(metrics or {}))
    (d / MANIFEST).write_text(json.dumps({**asdict(card), "members": []}, indent=2, sort_keys=True))
    return d


@dataclass
class Refused:
    index: int  # row of the input
    reason: str
    detail: str


@dataclass
class Prepared:
    """Input SMILES turned into what the model reads: graphs (and descriptors) of the accepted rows."""

    index: np.ndarray  # accepted input rows, in input order
    canonical: list[str]  # their standardised canonical SMILES
    mol_ids: list[str]  # and their mol_id (lardo_ray.chem.standardise.mol_id_of), as the dsm stage gives
    graphs: Any  # pa.Table in the graph layout
    refused: list[Refused]
    descriptors: np.ndarray | None = None  # raw (un-normalised) descriptors of the accepted rows


class SavedModel:
    """A loaded ``lardo_model.json`` directory. Built once per actor / server replica."""

    def __init__(self, directory: str | Path, device: str = "cpu"):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise ModelMismatchError(f"{self.dir} holds no {MANIFEST}: not a lardo_ray model (a fine-tune seed's "
                                     "model, a registered ensemble or an encoder)")
        self.meta = json.loads(path.read_text())
        self.card = ModelCard(**{k: v for k, v in self.meta.items() if k in ModelCard.__dataclass_fields__})
        self.device = device
        self._check()
        from lardo_ray.chem.standardise import Standardiser

        self.standardiser = Standardiser(**self.card.standardiser)
        self._members: list[tuple[Any, dict[str, Any]]] | None = None
        self._encoder = None

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> SavedModel:
        return cls(directory, device)

    def _check(self) -> None:
        c = self.card
        wrong = []
        if c.format != FORMAT or int(c.format_version) != FORMAT_VERSION:
            wrong.append(f"format {c.format} v{c.format_version} (this lardo_ray reads {FORMAT} v{FORMAT_VERSION})")
        if c.featurizer_version != FEATURIZER_VERSION:
            wrong.append(f"featurizer version {c.featurizer_version!r} (this lardo_ray: {FEATURIZER_VERSION!r})")
        if c.standardiser_version != STANDARDISER_VERSION:
            wrong.append(f"standardiser version {c.standardiser_version!r} (this lardo_ray: {STANDARDISER_VERSION!r})")
        if wrong:
            raise ModelMismatchError(f"model {c.name!r} in {self.dir} was built with another " + "; ".join(wrong)
                                     + ": its graphs would not mean the same here. Re-train it with this version, "
                                     "or install the lardo_ray version that built it.")

    @property
    def kind(self) -> str:
        return self.card.kind

    @property
    def on_encoder(self) -> bool:
        """A forest on a frozen encoder's embedding (finetune.head=forest): it needs graphs, not only features."""
        from lardo_ray.finetune.forest_head import FOREST_KINDS

        return self.kind == "forest" and self.card.features in FOREST_KINDS

    @property
    def targets(self) -> list[str]:
        return list(self.card.targets)

    # ------------------------------------------------------------------ input
    def prepare(self, smiles: list[Any]) -> Prepared:
        """Standardise (the model's own settings), then graphs (GNNs) or the forests' features."""
        import pyarrow as pa

        from lardo_ray import schema
        from lardo_ray.chem.graph import GraphFeaturizer

        refused: list[Refused] = []
        ok, canon, mols, ids = [], [], [], []
        for i, s in enumerate(smiles):
            st = self.standardiser(s)
            if st.reason is not None:
                refused.append(Refused(i, st.reason, st.detail or ""))
            else:
                ok.append(i)
                canon.append(st.canonical)
                mols.append(st.mol)
                ids.append(st.mol_id)
        table = pa.table({schema.MOL_ID: pa.array([str(i) for i in ok], pa.string()),
                          schema.CANONICAL_SMILES: pa.array(canon, pa.string())})
        graphs, rej = (GraphFeaturizer()(table) if self.kind != "forest" or self.on_encoder else
                       (table, table.slice(0, 0).append_column(schema.REJECT_REASON, pa.array([], pa.string()))
                        .append_column(schema.REJECT_DETAIL, pa.array([], pa.string()))))
        if rej.num_rows:
            bad = {int(m): (r, d) for m, r, d in zip(rej.column(schema.MOL_ID).to_pylist(),
                                                     rej.column(schema.REJECT_REASON).to_pylist(),
                                                     rej.column(schema.REJECT_DETAIL).to_pylist())}
            refused += [Refused(i, r, d or "") for i, (r, d) in bad.items()]
            keep = [j for j, i in enumerate(ok) if i not in bad]
            ok, canon, mols, ids = ([ok[j] for j in keep], [canon[j] for j in keep], [mols[j] for j in keep],
                                    [ids[j] for j in keep])
        descriptors = None
        if self.kind == "forest" and not self.on_encoder:
            descriptors = _descriptors(mols) if self.card.features == "rf_dsm" else _ecfp(mols)
        elif self.kind == "forest":  # the embedding is computed later; the other columns here, in their order
            parts = self.card.features.split("+")[1:]
            cols = [_descriptors(mols) if p == "dsm" else _ecfp(mols) for p in parts]
            descriptors = np.concatenate(cols, axis=1) if cols else None
        elif self.card.n_descriptors:
            descriptors = _descriptors(mols)
            if descriptors.shape[1] != self.card.n_descriptors:
                raise ModelMismatchError(f"model {self.card.name!r} reads {self.card.n_descriptors} descriptors; "
                                         f"this RDKit computes {descriptors.shape[1]}")
        refused.sort(key=lambda r: r.index)
        return Prepared(index=np.asarray(ok, np.int64), canonical=canon, mol_ids=ids, graphs=graphs, refused=refused,
                        descriptors=descriptors)

    # ------------------------------------------------------------------ the networks
    def _network(self, state_file: str, n_out: int) -> Any:
        from safetensors.torch import load

        from lardo_ray.finetune.model import PropertyModel
        from lardo_ray.models.gine import GINEConfig, GINEEncoder

        enc = GINEEncoder(GINEConfig(**self.card.encoder_config))
        model = PropertyModel(enc, n_out, self.card.head_hidden, 0.0, self.card.n_descriptors)
        model.load_state_dict(load((self.dir / state_file).read_bytes()))
        return model.to(self.device).eval()

    def _normaliser(self, entry: dict[str, Any]) -> Any:
        if not entry.get("normaliser"):
            return None
        return pickle.loads((self.dir / entry["normaliser"]).read_bytes())  # noqa: S301 - our own file

    def _load_members(self) -> list[tuple[Any, dict[str, Any]]]:
        """Per seed: (network, entry) for a multi-task model; (None, entry with ``targets_obj``: per target
        (network, entry) or None) for a per-target one."""
        if self._members is None:
            out = []
            for entry in self.meta["members"]:
                if entry.get("per_target") is not None:
                    subs = [None if e is None else (self._network(e["state"], 1), {**e, "normaliser_obj":
                                                                                   self._normaliser(e)})
                            for e in entry["per_target"]]
                    out.append((None, {**entry, "targets_obj": subs}))
                else:
                    model = self._network(f"seed{entry['seed']}.safetensors", len(self.card.targets))
                    out.append((model, {**entry, "normaliser_obj": self._normaliser(entry)}))
            self._members = out
        return self._members

    def _batches(self, prep: Prepared, batch_size: int):
        import pyarrow as pa

        from lardo_ray.chem.graph import graphs_to_pyg_batch

        n = len(prep.index)
        for start in range(0, n, batch_size):
            idx = pa.array(np.arange(start, min(n, start + batch_size)), pa.int64())
            yield start, graphs_to_pyg_batch(prep.graphs.take(idx)).to(self.device)

    def predict_prepared(self, prep: Prepared, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) over the ensemble, (n_accepted, n_targets) float64: probabilities for classification,
        values in the original units for regression. std is 0 for a one-member model."""
        if self.kind == "encoder":
            raise ModelMismatchError(f"model {self.card.name!r} is an encoder: it gives embeddings (`lardo-ray "
                                     "encode`), not predictions")
        n, t = len(prep.index), len(self.card.targets)
        if self.kind == "forest":
            return self._forest_predict(prep)
        preds = []
        for model, entry in self._load_members():
            if model is None:  # per target: each column from its own network (or the untrained constant)
                out = np.zeros((n, t), np.float64)
                for k, sub in enumerate(entry["targets_obj"]):
                    if sub is None:
                        out[:, k] = 0.5 if self.card.task_type == "classification" else 0.0
                    else:
                        out[:, k] = self._apply(sub[0], sub[1], prep, batch_size)[:, 0]
            else:
                out = self._apply(model, entry, prep, batch_size)
            preds.append(out)
        stack = np.stack(preds) if preds else np.zeros((0, n, t))
        return stack.mean(axis=0), stack.std(axis=0)

    def _apply(self, model: Any, entry: dict[str, Any], prep: Prepared, batch_size: int) -> np.ndarray:
        """One network over the prepared rows, in the original units (probabilities / label scale)."""
        import torch

        from lardo_ray.finetune.data import apply_descriptor_normaliser

        D = None
        if self.card.n_descriptors:
            D = torch.as_tensor(apply_descriptor_normaliser(entry["normaliser_obj"], prep.descriptors),
                                device=self.device)
        out = np.zeros((len(prep.index), int(model.n_tasks)), np.float64)
        with torch.no_grad():
            for start, g in self._batches(prep, batch_size):
                d = None if D is None else D[start : start + g.num_graphs]
                out[start : start + g.num_graphs] = model(g, d).double().cpu().numpy()
        if self.card.task_type == "classification":
            return 1.0 / (1.0 + np.exp(-out))
        return out * np.asarray(entry["label_std"]) + np.asarray(entry["label_mean"])

    def _forest_predict(self, prep: Prepared) -> tuple[np.ndarray, np.ndarray]:
        from lardo_ray.finetune.baselines import fill_missing, forest_predict

        preds = []
        for forest, entry in self._forest_members():
            X_raw = prep.descriptors
            if self.on_encoder:
                from lardo_ray.finetune.forest_head import forest_features

                X_raw = forest_features(self._embed(self._member_encoder(entry), prep, 256), prep.descriptors)
            X, _ = fill_missing(X_raw, forest["median"])
            out = np.zeros((len(prep.index), len(self.card.targets)))
            for t, model in enumerate(forest["tasks"]):
                out[:, t] = forest_predict(model, X) if len(X) else 0.0
            preds.append(out)
        stack = np.stack(preds)
        return stack.mean(axis=0), stack.std(axis=0)

    def _forest_members(self) -> list[tuple[Any, dict[str, Any]]]:
        if self._members is None:
            self._members = [(pickle.loads((self.dir / e["forest"]).read_bytes()), dict(e))  # noqa: S301 - ours
                             for e in self.meta["members"]]
        return self._members

    def _member_encoder(self, entry: dict[str, Any]) -> Any:
        """A forest-head member's frozen encoder (loaded once per member)."""
        if "encoder_obj" not in entry:
            from safetensors.torch import load

            from lardo_ray.models.gine import GINEConfig, GINEEncoder

            enc = GINEEncoder(GINEConfig(**self.card.encoder_config))
            enc.load_state_dict(load((self.dir / entry["encoder_state"]).read_bytes()))
            entry["encoder_obj"] = enc.to(self.device).eval()
        return entry["encoder_obj"]

    def _embed(self, encoder: Any, prep: Prepared, batch_size: int) -> np.ndarray:
        """(n_accepted, dim) float32 eval-mode embeddings of the prepared rows."""
        import torch

        outs = []
        with torch.no_grad():
            for _, g in self._batches(prep, batch_size):
                outs.append(encoder(g).float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, int(encoder.out_dim)), np.float32)

    def encode_prepared(self, prep: Prepared, batch_size: int = 256) -> np.ndarray:
        """(n_accepted, dim) float32 graph embeddings (eval mode). A property model gives its first member's
        fine-tuned encoder; an encoder model its pre-trained one; a forest on an encoder its first member's."""
        if self.kind == "forest" and not self.on_encoder:
            raise ModelMismatchError(f"model {self.card.name!r} is a random forest: it has no graph encoder to "
                                     "give embeddings")
        if self._encoder is None:
            if self.on_encoder:  # its first member's frozen encoder, as a property model gives its first
                self._encoder = self._member_encoder(self._forest_members()[0][1])
            elif self.kind == "encoder":
                from lardo_ray.models.gine import load_encoder

                self._encoder = load_encoder(self.dir / "encoder").to(self.device).eval()
            elif self.card.task_mode == "per_target":
                raise ModelMismatchError(f"model {self.card.name!r} holds one fine-tuned encoder per target: no "
                                         "single embedding to give; encode with its pre-trained encoder "
                                         "(<run name>-encoder) or a multitask model")
            else:
                self._encoder = self._load_members()[0][0].encoder
        return self._embed(self._encoder, prep, batch_size)

    def predict(self, smiles: list[Any], batch_size: int = 256) -> tuple[Prepared, np.ndarray, np.ndarray]:
        prep = self.prepare(smiles)
        mean, std = self.predict_prepared(prep, batch_size)
        return prep, mean, std

    def encode(self, smiles: list[Any], batch_size: int = 256) -> tuple[Prepared, np.ndarray]:
        prep = self.prepare(smiles)
        return prep, self.encode_prepared(prep, batch_size)


def _descriptors(mols: list[Any]) -> np.ndarray:
    """The rf_dsm / dsm_features descriptor matrix of standardised molecules (lardo_ray.finetune.baselines)."""
    from lardo_ray.finetune.baselines import descriptor_matrix

    return descriptor_matrix(mols)


def _ecfp(mols: list[Any]) -> np.ndarray:
    from lardo_ray.finetune.baselines import ecfp_matrix

    return ecfp_matrix(mols)


def pickle_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    pickle.dump(obj, buf)
    return buf.getvalue()
