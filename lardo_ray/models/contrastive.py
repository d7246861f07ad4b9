"""Graph-text contrastive pieces: projection heads, learnable temperature, symmetric InfoNCE, retrieval accuracy.

Conventions: ``logits[i, j] = scale * <g_i, t_j>`` with unit-norm g (graph) and t (text) rows; row i of the
batch is a matching pair. graph->text reads rows of ``logits``, text->graph reads columns.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.nn import functional as F

from lardo_ray.models.gine import GINEConfig, GINEEncoder
from lardo_ray.models.text import TextEncoder

if TYPE_CHECKING:
    from lardo_ray.train.settings import ModelConfig

MAX_LOGIT_SCALE = 100.0  # CLIP: the logit scale (1 / temperature) is clamped to [1, 100]


class ProjectionHead(nn.Module):
    """MLP into the shared space: (Linear -> GELU -> dropout) x (num_layers - 1) -> Linear -> L2 normalisation.

    ``hidden=None`` uses the input width. ``num_layers=1`` is a single linear map.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int | None = None, num_layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        hidden = hidden or in_dim
        if num_layers == 1:
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            layers: list[nn.Module] = []
            d = in_dim
            for _ in range(num_layers - 1):
                layers += [nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout)]
                d = hidden
            layers.append(nn.Linear(d, out_dim))
            self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), p=2, dim=-1)


class LogitScale(nn.Module):
    """Learnable inverse temperature, stored as log(1 / T) and clamped to [1, 100] as CLIP does."""

    def __init__(self, temperature_init: float = 0.07, learnable: bool = True, max_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        if temperature_init <= 0:
            raise ValueError("temperature_init must be > 0")
        # Shape (1,), not a 0-d scalar: DeepSpeed's parameter broadcast views every parameter as bytes.
        value = torch.tensor([math.log(1.0 / temperature_init)], dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(0.0, self.max_log).exp().squeeze(0)

    @property
    def temperature(self) -> float:
        return float(1.0 / self().detach().float())


def contrastive_logits(graph_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """(B, B) similarity logits; the inputs are expected L2-normalised."""
    return scale * graph_emb @ text_emb.t()


def positives(keys: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """(n, n) bool: j is a right answer for query i. Rows with the same text key (the same description of
    different molecules: stereo- and positional isomers share their 2D descriptors) are each other's
    positives, never negatives; without keys only the diagonal."""
    eye = torch.eye(n, dtype=torch.bool, device=device)
    if keys is None:
        return eye
    keys = keys.to(device)
    return eye | (keys[:, None] == keys[None, :])


def info_nce(logits: torch.Tensor, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE on square logits with matches on the diagonal.

    ``keys`` (one int per row, e.g. a hash of the text) makes it multi-positive: for query i the target is
    every j with the same key, -log(sum_{j in P(i)} e^{l_ij} / sum_j e^{l_ij}), so two molecules with one
    description do not push each other away. Without keys (or all distinct) it is the usual cross-entropy.
    Returns (loss, loss_graph_to_text, loss_text_to_graph); loss is their mean.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"expected square logits, got {tuple(logits.shape)}")
    logits = logits.float()
    pos = positives(keys, logits.shape[0], logits.device)
    if bool(pos.sum() == logits.shape[0]):  # no shared text: plain InfoNCE (the common, cheaper case)
        target = torch.arange(logits.shape[0], device=logits.device)
        g2t = F.cross_entropy(logits, target)
        t2g = F.cross_entropy(logits.t(), target)
        return (g2t + t2g) / 2, g2t, t2g
    neg_inf = torch.finfo(logits.dtype).min

    def one_side(lg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return (torch.logsumexp(lg, dim=1) - torch.logsumexp(lg.masked_fill(~p, neg_inf), dim=1)).mean()

    g2t, t2g = one_side(logits, pos), one_side(logits.t(), pos.t())
    return (g2t + t2g) / 2, g2t, t2g


def info_nce_loss(graph_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float,
                  keys: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE loss of a batch of matching (graph, text) embedding pairs."""
    return info_nce(contrastive_logits(graph_emb, text_emb, scale), keys)[0]


def match_ranks(logits: torch.Tensor, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the true match per query, graph->text (rows) and text->graph (columns).

    Ties count against the query (rank = number of wrong candidates scoring >= the match), so a collapsed
    model whose logits are all equal gets the worst rank, not 0. A candidate with the query's own text key
    is a right answer, not a wrong one: an identical description ranks as a tie it cannot lose.
    """
    diag = logits.diagonal()
    wrong = ~positives(keys, logits.shape[0], logits.device)
    g2t = ((logits >= diag[:, None]) & wrong).sum(dim=1)
    t2g = ((logits >= diag[None, :]) & wrong).sum(dim=0)
    return g2t, t2g


@torch.no_grad()
def retrieval_accuracy(logits: torch.Tensor, ks: tuple[int, ...] = (1, 5),
                       keys: torch.Tensor | None = None) -> dict[str, float]:
    """Top-k retrieval accuracy in both directions over square logits (candidates = the other rows).

    Keys: ``g2t_top{k}``, ``t2g_top{k}`` and their mean ``top{k}``; values in [0, 1].
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"expected square logits, got {tuple(logits.shape)}")
    g2t, t2g = match_ranks(logits.float(), keys)
    out: dict[str, float] = {}
    for k in ks:
        a = float((g2t < k).float().mean())
        b = float((t2g < k).float().mean())
        out[f"g2t_top{k}"], out[f"t2g_top{k}"], out[f"top{k}"] = a, b, (a + b) / 2
    return out


# ------------------------------------------------------------------ the pre-training model
class ContrastiveModel(nn.Module):
    """GINE + graph/text projection heads + temperature; with ``n_descriptors`` > 0 also a descriptor head
    (pooled graph embedding -> the molecule's CDF-normalised dsm descriptors), trained beside InfoNCE and not
    exported: fine-tuning starts from the encoder alone."""

    def __init__(self, cfg: ModelConfig, text_dim: int | None = None, text_encoder: TextEncoder | None = None,
                 n_descriptors: int = 0):
        super().__init__()
        self.cfg = cfg
        self.graph_encoder = GINEEncoder(
            GINEConfig(num_layers=cfg.num_layers, hidden=cfg.hidden, dropout=cfg.dropout, pooling=cfg.pooling,
                       jk=cfg.jk, batch_norm=cfg.batch_norm)
        )
        self.graph_proj = ProjectionHead(self.graph_encoder.out_dim, cfg.projection_dim, cfg.projection_hidden)
        if cfg.freeze_text:
            text_dim = text_dim or cfg.text_dim
            if not text_dim:
                raise ValueError("freeze_text=True trains on precomputed embeddings: give text_dim")
            self.text_encoder = None
        else:
            self.text_encoder = text_encoder or TextEncoder(
                cfg.text_encoder, trainable_layers=cfg.text_trainable_layers, max_length=cfg.text_max_length
            )
            text_dim = self.text_encoder.dim
        self.text_dim = int(text_dim)
        self.text_proj = ProjectionHead(self.text_dim, cfg.projection_dim, cfg.projection_hidden)
        self.logit_scale = LogitScale(cfg.temperature_init, learnable=cfg.learn_temperature)
        self.descriptor_head: nn.Module | None = None
        if n_descriptors > 0:
            d = self.graph_encoder.out_dim
            self.descriptor_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, n_descriptors))

    @property
    def text_mode(self) -> Literal["embedding", "tokens"]:
        return "embedding" if self.text_encoder is None else "tokens"

    def encode_graphs(self, graphs) -> torch.Tensor:
        return self.graph_proj(self.graph_encoder(graphs))

    def encode_texts(self, text: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if self.text_encoder is None:
            w = self.text_proj.net[0] if isinstance(self.text_proj.net, nn.Sequential) else self.text_proj.net
            return self.text_proj(text.to(w.weight.dtype))  # bf16 engines get fp32 embeddings from the data
        return self.text_proj(self.text_encoder(**text))

    def forward(self, graphs, text, descriptors: bool = False) -> tuple[torch.Tensor, ...]:
        """(graph embeddings, text embeddings, logit scale); embeddings L2-normalised, (B, projection_dim).
        ``descriptors=True`` appends the descriptor head's (B, n_descriptors) predictions from the same pass."""
        h = self.graph_encoder(graphs)
        out = (self.graph_proj(h), self.encode_texts(text), self.logit_scale())
        if descriptors:
            if self.descriptor_head is None:
                raise ValueError("this model has no descriptor head (n_descriptors=0)")
            out = (*out, self.descriptor_head(h))
        return out


def build_model(cfg: ModelConfig, text_dim: int | None = None, seed: int | None = 0,
                n_descriptors: int = 0) -> ContrastiveModel:
    if seed is not None:
        torch.manual_seed(seed)
    return ContrastiveModel(cfg, text_dim=text_dim, n_descriptors=n_descriptors)


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the finite targets only (a descriptor RDKit could not compute is NaN)."""
    ok = torch.isfinite(target)
    diff = torch.where(ok, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    return (diff * diff).sum() / ok.sum().clamp(min=1)
