"""GINE graph encoder over OGB-featurised molecules, exportable without DeepSpeed or Ray.

Architecture as in the OGB mol examples / pretrain-gnns (Hu et al. 2020) that KANO and MolGraph-LarDo use:
sum of per-feature atom embeddings -> L x [GINEConv (edge = sum of per-feature bond embeddings, one set per
layer; update MLP h -> 2h -> h) -> BatchNorm -> ReLU (not after the last layer) -> dropout] -> jumping
knowledge -> graph pooling.

``save_encoder(model, dir)`` writes ``encoder.safetensors`` (weights) + ``encoder.json`` (config);
``load_encoder(dir)`` rebuilds the model from those two files alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch_geometric.nn import GINEConv, global_add_pool, global_max_pool, global_mean_pool
from torch_geometric.nn.aggr import AttentionalAggregation

from lardo_ray.chem.graph import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CONFIG = "encoder.json"
FORMAT = "lardo_ray.gine"
FORMAT_VERSION = 1


@dataclass
class GINEConfig:
    num_layers: int = 5
    hidden: int = 300
    dropout: float = 0.0
    pooling: Literal["mean", "sum", "max", "attention"] = "mean"
    jk: Literal["last", "sum", "concat"] = "last"
    batch_norm: bool = True
    # Vocabulary sizes are saved with the weights, so a checkpoint keeps loading if the featurizer grows.
    atom_feature_dims: list[int] = field(default_factory=lambda: list(ATOM_FEATURE_DIMS))
    bond_feature_dims: list[int] = field(default_factory=lambda: list(BOND_FEATURE_DIMS))

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if self.pooling not in ("mean", "sum", "max", "attention"):
            raise ValueError(f"unknown pooling {self.pooling!r}")
        if self.jk not in ("last", "sum", "concat"):
            raise ValueError(f"unknown jk {self.jk!r}")

    @property
    def out_dim(self) -> int:
        # concat: the input embedding and every layer's output (L + 1 blocks), as OGB's JK.
        return self.hidden * (self.num_layers + 1) if self.jk == "concat" else self.hidden


class FeatureEmbedding(nn.Module):
    """Sum of one embedding table per categorical column (OGB's AtomEncoder / BondEncoder)."""

    def __init__(self, feature_dims: list[int] | tuple[int, ...], dim: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in feature_dims)
        for t in self.tables:
            nn.init.xavier_uniform_(t.weight.data)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.tables[0](feats[:, 0])
        for i in range(1, len(self.tables)):
            out = out + self.tables[i](feats[:, i])
        return out


class GINEEncoder(nn.Module):
    """Molecule graph -> graph embedding of width ``config.out_dim``."""

    def __init__(self, config: GINEConfig | None = None, **overrides):
        super().__init__()
        cfg = config or GINEConfig(**overrides)
        if config is not None and overrides:
            cfg = GINEConfig(**{**asdict(config), **overrides})
        self.config = cfg
        h = cfg.hidden
        self.atom_encoder = FeatureEmbedding(cfg.atom_feature_dims, h)
        self.bond_encoders = nn.ModuleList(FeatureEmbedding(cfg.bond_feature_dims, h) for _ in range(cfg.num_layers))
        self.convs = nn.ModuleList(
            GINEConv(
                nn.Sequential(
                    nn.Linear(h, 2 * h),
                    nn.BatchNorm1d(2 * h) if cfg.batch_norm else nn.Identity(),
                    nn.ReLU(),
                    nn.Linear(2 * h, h),
                ),
                train_eps=True,
            )
            for _ in range(cfg.num_layers)
        )
        self.norms = nn.ModuleList(
            (nn.BatchNorm1d(h) if cfg.batch_norm else nn.Identity()) for _ in range(cfg.num_layers)
        )
        self.dropout = nn.Dropout(cfg.dropout)
        d = cfg.out_dim
        if cfg.pooling == "attention":
            gate = nn.Sequential(nn.Linear(d, 2 * d), nn.BatchNorm1d(2 * d) if cfg.batch_norm else nn.Identity(),
                                 nn.ReLU(), nn.Linear(2 * d, 1))
            self.pool = AttentionalAggregation(gate)
        else:
            self.pool = None

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def node_embeddings(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        h = self.atom_encoder(x)
        hs = [h]
        last = self.config.num_layers - 1
        for i, (conv, norm, bond) in enumerate(zip(self.convs, self.norms, self.bond_encoders)):
            h = norm(conv(h, edge_index, bond(edge_attr)))
            if i < last:
                h = torch.relu(h)
            h = self.dropout(h)
            hs.append(h)
        if self.config.jk == "last":
            return h
        if self.config.jk == "sum":
            return torch.stack(hs, dim=0).sum(dim=0)
        return torch.cat(hs, dim=-1)

    def forward(self, data, batch: torch.Tensor | None = None, num_graphs: int | None = None) -> torch.Tensor:
        """``forward(pyg_batch)``: graph embeddings (num_graphs, out_dim)."""
        x, edge_index, edge_attr = data.x, data.edge_index, data.edge_attr
        if batch is None:
            batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if num_graphs is None:
            num_graphs = int(getattr(data, "num_graphs", 0) or (int(batch.max()) + 1 if batch.numel() else 0))
        h = self.node_embeddings(x, edge_index, edge_attr)
        if self.pool is not None:
            return self.pool(h, batch, dim_size=num_graphs)
        pool = {"mean": global_mean_pool, "sum": global_add_pool, "max": global_max_pool}[self.config.pooling]
        return pool(h, batch, size=num_graphs)


def fp32_tensor(t: torch.Tensor) -> torch.Tensor:
    """A CPU, contiguous copy with floating dtypes widened to float32 (integer buffers unchanged)."""
    t = t.detach().to("cpu")
    return (t.float() if t.is_floating_point() else t).contiguous()


def save_encoder(model: GINEEncoder, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``encoder.safetensors`` + ``encoder.json`` under ``directory`` (created). Returns the directory.

    Floating tensors are written in fp32 whatever the training precision: a bf16/fp16 engine's weights would
    otherwise not load bit-exactly into the fp32 model every consumer builds (bf16/fp16 -> fp32 is exact).
    The training dtype is kept in encoder.json (``trained_dtype``)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    raw = model.state_dict()
    trained = sorted({str(v.dtype).removeprefix("torch.") for v in raw.values() if v.is_floating_point()})
    state = {k: fp32_tensor(v) for k, v in raw.items()}
    save_file(state, str(d / ENCODER_WEIGHTS), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": asdict(model.config), "out_dim": model.out_dim,
            "dtype": "float32", "trained_dtype": ",".join(trained)}
    if extra:
        meta["extra"] = extra
    (d / ENCODER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return d


def load_encoder(directory: str | Path, map_location: str | torch.device = "cpu") -> GINEEncoder:
    """Rebuild a GINEEncoder from ``save_encoder`` output (eval mode)."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta = json.loads((d / ENCODER_CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d / ENCODER_CONFIG} is not a {FORMAT} export (format={meta.get('format')!r})")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{d} was written by a newer lardo_ray (format version {meta['version']})")
    model = GINEEncoder(GINEConfig(**meta["config"]))
    state = load_file(str(d / ENCODER_WEIGHTS), device=str(map_location))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()
