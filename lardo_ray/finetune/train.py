"""Fine-tune and evaluate one seed, without Ray: the core the fine-tune stage runs once per seed as a Ray task.

* Its inputs come from ``lardo_ray.finetune.data``: ``prepare_task(ft)`` (the labelled set, standardised and
  featurised once) and ``split_for(prepared, ft, seed)``.
* ``finetune_seed(cfg, seed, ...)`` trains the property model: Adam with two parameter groups (head at
  ``lr_head``, encoder at ``lr_encoder``), masked multi-task BCE-with-logits for classification (NaN labels do
  not count), MSE on targets standardised with the training rows' mean/std for regression (scores in the
  original units), optional frozen encoder (eval mode: its BatchNorm statistics stay as exported too; the
  graph embeddings are then computed once and only the head trains), validation after every epoch, early
  stopping after ``patience`` epochs without improvement, and the test score of the best-validation weights.
  With ``task_mode=per_target`` and several targets, one such model per target on its labelled training rows.

Everything random comes from the seed (torch init and dropout, numpy shuffling, the split where it depends on
a seed); on CPU with a fixed number of torch threads, the same seed gives bit-identical metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from lardo_ray.finetune.data import (
    PreparedTask,
    apply_descriptor_normaliser,
    dsm_descriptors,
    fit_descriptor_normaliser,
    prepare_task,
    split_for,
    split_hash,
)
from lardo_ray.finetune.metrics import TargetScaler, TaskMetrics, evaluate, is_better
from lardo_ray.finetune.splits import Split

if TYPE_CHECKING:
    import torch

    from lardo_ray.config import PipelineConfig
    from lardo_ray.finetune.model import EncoderSource
    from lardo_ray.finetune.settings import FinetuneConfig

log = logging.getLogger("lardo_ray")

# ---------------------------------------------------------------------------------------------------------
# Training pieces
# ---------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def masked_loss(out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, task_type: str) -> torch.Tensor:
    """Mean over labelled (row, task) entries: BCE-with-logits (classification) or squared error (regression)."""
    import torch
    import torch.nn.functional as F

    y0 = torch.where(mask, y, torch.zeros_like(y))
    if task_type == "classification":
        per = F.binary_cross_entropy_with_logits(out, y0, reduction="none")
    else:
        per = (out - y0) ** 2
    per = per * mask
    return per.sum() / mask.sum().clamp_min(1)


def make_batches(idx: np.ndarray, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Index batches (shuffled with ``rng``); a last batch of one molecule joins the one before it (BatchNorm
    in training mode needs more than one value per channel)."""
    order = rng.permutation(idx) if rng is not None else np.asarray(idx)
    out = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2] = np.concatenate([out[-2], out[-1]])
        out.pop()
    return out


def _pyg(graphs: pa.Table, idx: np.ndarray, device: str):
    from lardo_ray.chem.graph import graphs_to_pyg_batch

    return graphs_to_pyg_batch(graphs.take(pa.array(idx, pa.int64()))).to(device)


@dataclass
class SeedResult:
    """One seed's fine-tune run: scores at the best validation epoch, history, timing, provenance."""

    seed: int
    dataset: str
    method: str
    split: str
    task_type: str
    metric: str  # headline / model-selection metric
    test: TaskMetrics
    valid: TaskMetrics
    best_epoch: int  # 1-based epoch whose weights were tested
    epochs_run: int
    stopped_early: bool
    selection: str  # "best_valid" or "last_epoch" (no validation rows / no scorable validation)
    n_train: int
    n_valid: int
    n_test: int
    split_hash: str
    encoder_run_id: str
    encoder_sha256: str  # encoder tensors at the start of fine-tuning
    final_encoder_sha256: str  # encoder tensors of the tested (best-validation) weights
    pretrained: bool
    n_params: int
    n_trainable: int
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: epoch, train_loss, valid_<m>, seconds
    timing: dict[str, float] = field(default_factory=dict)
    test_index: np.ndarray | None = None  # rows of the labelled set in test
    test_pred: np.ndarray | None = None  # (n_test, n_tasks) probabilities / values in original units
    valid_pred: np.ndarray | None = None  # (n_valid, n_tasks), as test_pred
    task_mode: str = "single_task"  # single_task (one target) | multitask | per_target
    device: str = "cpu"
    threads: int = 1
    model: Any = None  # the tested PropertyModel, only with finetune_seed(keep_model=True)
    worker: str = ""  # host:pid of the process that trained it
    member: Any = None  # lardo_ray.models.saved.Member: the tested weights (finetune.save_models)
    lr_scale: float = 1.0  # the factor of finetune.lr_scales whose run was tested (chosen on validation)
    lr_valid: dict[float, float] = field(default_factory=dict)  # each factor's best validation score

    def metrics(self) -> dict[str, float]:
        """Flat metrics of the child run (compare contract: test_<m>, valid_<m>, best_epoch ...)."""
        out = {**self.test.to_mlflow("test_"), **self.valid.to_mlflow("valid_", per_task=False)}
        out.update({
            "best_epoch": float(self.best_epoch), "epochs_run": float(self.epochs_run),
            "stopped_early": float(self.stopped_early), "n_train": float(self.n_train),
            "n_valid": float(self.n_valid), "n_test": float(self.n_test), "n_params": float(self.n_params),
            "n_trainable_params": float(self.n_trainable), "lr_scale": float(self.lr_scale),
        })  # fmt: skip
        out.update({f"valid_at_lr_scale_{lr_scale_name(k)}": float(v) for k, v in self.lr_valid.items()})
        out.update({k: float(v) for k, v in self.timing.items()})
        return out


def lr_scale_name(scale: float) -> str:
    """A factor as MLflow metric names allow it (no '+': 1e6 -> '1e06')."""
    return f"{scale:g}".replace("+", "")


def finetune_seed(
    cfg: PipelineConfig,
    seed: int,
    *,
    prepared: PreparedTask | None = None,
    split: Split | None = None,
    encoder: EncoderSource | None = None,
    threads: int | None = None,
    verbose: bool = False,
    keep_model: bool = False,
) -> SeedResult:
    """Fine-tune ``cfg.finetune`` on one seed and score valid/test at the best validation epoch.

    ``prepared`` / ``split`` / ``encoder`` are computed from the config when not given (the stage computes them
    once on the driver and ships them to every seed). ``threads`` sets torch's intra-op threads;
    ``keep_model`` returns the tested model in ``result.model``."""
    import torch

    from lardo_ray.finetune.model import build_property_model, encoder_state_sha256

    t_start = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    ft = cfg.finetune
    prepared = prepared if prepared is not None else prepare_task(ft)
    split = split if split is not None else split_for(prepared, ft, seed)
    data = prepared.data
    task_type, metric = data.task_type, ft.resolved_metric()
    device = resolve_device(ft.device)
    if ft.head == "forest":  # the encoder as a featurizer: forests, always one per target
        from lardo_ray.finetune.forest_head import forest_head_seed

        return forest_head_seed(cfg, seed, prepared=prepared, split=split, encoder=encoder, threads=threads)
    if ft.task_mode == "per_target" and data.n_tasks > 1:
        return _per_target_seed(cfg, seed, prepared, split, encoder, threads, verbose, t_start)
    if len(ft.lr_scales) > 1:  # after the per-target split: each target chooses its own rate
        return _lr_selected_seed(cfg, seed, prepared, split, encoder, threads, verbose, keep_model, t_start)

    D: torch.Tensor | None = None  # normalised descriptors of every molecule (dsm_features=all)
    normaliser = None
    if ft.dsm_features != "none":
        X_desc = dsm_descriptors(prepared, cfg.ingest.max_atoms)
        normaliser = fit_descriptor_normaliser(X_desc, np.asarray(split.train))
        D = torch.as_tensor(apply_descriptor_normaliser(normaliser, X_desc), device=device)

    def desc(idx) -> torch.Tensor | None:
        return None if D is None else D[torch.as_tensor(idx, device=device)]

    seed_everything(seed)
    built = build_property_model(cfg, data.n_tasks, seed, encoder=encoder, device=device,
                                 n_descriptors=0 if D is None else int(D.shape[1]))
    model = built.model
    frozen = ft.freeze_encoder or ft.lr_encoder == 0.0

    # targets: NaN = missing; regression standardised with the training rows only
    y_raw = data.labels.astype(np.float64)
    scaler = TargetScaler.fit(y_raw[split.train]) if task_type == "regression" else None
    y_work = scaler.transform(y_raw) if scaler is not None else y_raw
    Y = torch.tensor(np.nan_to_num(y_work, nan=0.0), dtype=torch.float32, device=device)
    M = torch.tensor(~np.isnan(y_work), dtype=torch.bool, device=device)

    if frozen:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        groups = [{"params": model.head_parameters(), "lr": ft.lr_head}]
    else:
        groups = [{"params": model.encoder_parameters(), "lr": ft.lr_encoder},
                  {"params": model.head_parameters(), "lr": ft.lr_head}]
    opt = torch.optim.Adam(groups, weight_decay=ft.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for g in groups for p in g["params"])

    # Frozen: eval-mode embeddings of every molecule once (BatchNorm stats stay as exported, no dropout).
    emb: torch.Tensor | None = None
    if frozen:
        model.encoder.eval()
        with torch.no_grad():
            all_idx = np.arange(len(data))
            emb = torch.cat([model.encoder(_pyg(prepared.graphs, b, device))
                             for b in make_batches(all_idx, ft.eval_batch_size)])

    eval_batches: dict[str, list[tuple[np.ndarray, Any]]] = {}

    def predict(part: str, idx: np.ndarray) -> np.ndarray:
        model.eval()
        outs = []
        with torch.no_grad():
            if emb is not None:
                outs.append(model.head_on(emb[torch.as_tensor(idx, device=device)], desc(idx)))
            else:
                if part not in eval_batches:  # valid / test batches are built once
                    eval_batches[part] = [(b, _pyg(prepared.graphs, b, device))
                                          for b in make_batches(idx, ft.eval_batch_size)]
                outs += [model(g, desc(b)) for b, g in eval_batches[part]]
        out = (torch.cat(outs) if outs else torch.zeros((0, data.n_tasks), device=device)).double()
        if task_type == "classification":
            return torch.sigmoid(out).cpu().numpy()
        return scaler.inverse(out.cpu().numpy())  # type: ignore[union-attr]

    def score(part: str, idx: np.ndarray) -> tuple[TaskMetrics, np.ndarray]:
        pred = predict(part, idx)
        return evaluate(task_type, y_raw[idx], pred, data.task_names, metric), pred

    rng = np.random.default_rng(seed)
    has_valid = len(split.valid) > 0
    best_val: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, since_best, stopped_early = 0, 0, False
    history: list[dict[str, float]] = []
    t_train = time.perf_counter()
    eval_seconds = 0.0
    epoch = 0
    for epoch in range(1, ft.epochs + 1):
        t_ep = time.perf_counter()
        model.train()
        if frozen:
            model.encoder.eval()
        loss_sum, n_seen = 0.0, 0
        for b in make_batches(split.train, ft.batch_size, rng):
            bt = torch.as_tensor(b, device=device)
            yb, mb = Y[bt], M[bt]
            if not bool(mb.any()):
                continue
            out = model.head_on(emb[bt], desc(b)) if emb is not None else \
                model(_pyg(prepared.graphs, b, device), desc(b))
            loss = masked_loss(out, yb, mb, task_type)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(b)
            n_seen += len(b)
        rec: dict[str, float] = {"epoch": float(epoch), "train_loss": loss_sum / max(n_seen, 1)}
        t_ev = time.perf_counter()
        if has_valid:
            vm, _ = score("valid", split.valid)
            rec[f"valid_{metric}"] = vm.value
            if is_better(vm.value, best_val, metric):
                best_val, best_epoch, since_best = vm.value, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
        eval_seconds += time.perf_counter() - t_ev
        rec["seconds"] = time.perf_counter() - t_ep
        history.append(rec)
        if verbose:
            log.info("finetune %s seed %d epoch %d: %s", data.name, seed, epoch,
                     {k: round(v, 4) for k, v in rec.items() if k != "epoch"})
        if ft.patience is not None and best_state is not None and since_best >= ft.patience:
            stopped_early = epoch < ft.epochs
            break
    train_seconds = time.perf_counter() - t_train

    if best_state is not None:
        model.load_state_dict(best_state)
        selection = "best_valid"
    else:  # no validation rows, or no epoch could be scored (e.g. one class only in valid)
        best_epoch, selection = epoch, "last_epoch"
        if has_valid:
            log.warning("finetune %s seed %d: the validation set could not be scored (%s); the last epoch's "
                        "weights are tested", data.name, seed, metric)
    t_ev = time.perf_counter()
    valid_m, valid_pred = score("valid", split.valid) if has_valid else (
        evaluate(task_type, np.zeros((0, data.n_tasks)), np.zeros((0, data.n_tasks)), data.task_names, metric),
        None)
    test_m, test_pred = score("test", split.test)
    eval_seconds += time.perf_counter() - t_ev
    member = None
    if ft.save_models:  # the tested weights, to be saved as an MLflow model (lardo_ray.models.saved)
        from lardo_ray.models.saved import Member, pickle_bytes, state_bytes

        member = Member(seed=int(seed), state=state_bytes(model.state_dict()),
                        normaliser=pickle_bytes(normaliser) if normaliser is not None else None,
                        label_mean=scaler.mean.tolist() if scaler is not None else None,
                        label_std=scaler.std.tolist() if scaler is not None else None,
                        encoder_config=dataclasses.asdict(model.encoder.config), n_descriptors=model.n_descriptors)
    total = time.perf_counter() - t_start
    return SeedResult(
        seed=int(seed), dataset=data.name, method=ft.method_label(), split=ft.split, task_type=task_type,
        metric=metric, test=test_m, valid=valid_m, best_epoch=int(best_epoch), epochs_run=int(epoch),
        stopped_early=stopped_early, selection=selection, n_train=len(split.train), n_valid=len(split.valid),
        n_test=len(split.test), split_hash=split_hash(split), encoder_run_id=built.encoder_run_id,
        encoder_sha256=built.encoder_sha256, final_encoder_sha256=encoder_state_sha256(model.encoder),
        pretrained=built.pretrained, n_params=int(n_params),
        n_trainable=int(n_trainable), history=history,
        timing={"train_seconds": train_seconds, "eval_seconds": eval_seconds,
                "seconds_per_epoch": train_seconds / max(epoch, 1), "seed_seconds": total},
        test_index=np.asarray(split.test), test_pred=test_pred.astype(np.float32),
        valid_pred=None if valid_pred is None else valid_pred.astype(np.float32),
        task_mode="multitask" if data.n_tasks > 1 else "single_task", device=str(device),
        threads=int(torch.get_num_threads()), model=model if keep_model else None,
        worker=f"{socket.gethostname()}:{os.getpid()}", member=member,
    )


def _lr_selected_seed(cfg: PipelineConfig, seed: int, prepared: PreparedTask, split: Split,
                      encoder: EncoderSource | None, threads: int | None, verbose: bool, keep_model: bool,
                      t_start: float) -> SeedResult:
    """``finetune.lr_scales``: the seed trained once per factor (lr_head and lr_encoder both scaled, same init,
    same shuffling), and the run with the best validation score tested. The test scores of the other runs
    are never looked at: choosing among them on test would be tuning on test."""
    ft = cfg.finetune
    metric = ft.resolved_metric()
    runs: dict[float, SeedResult] = {}
    for scale in ft.lr_scales:
        one = cfg.model_copy(update={"finetune": ft.model_copy(update={
            "lr_scales": [1.0], "lr_head": ft.lr_head * scale, "lr_encoder": ft.lr_encoder * scale})})
        r = runs[float(scale)] = finetune_seed(one, seed, prepared=prepared, split=split, encoder=encoder,
                                               threads=threads, verbose=verbose, keep_model=keep_model)
        if verbose:
            log.info("finetune %s seed %d lr x%g: valid %s %.4f", r.dataset, seed, scale, metric, r.valid.value)
    # only runs whose validation could be scored compete; the first of equals wins
    chosen_scale: float | None = None
    for scale, r in runs.items():
        if r.selection == "best_valid" and (chosen_scale is None
                                            or is_better(r.valid.value, runs[chosen_scale].valid.value, metric)):
            chosen_scale = scale
    if chosen_scale is None:
        # nothing could be scored (no or one-class validation rows): the rates as given, not the first factor
        chosen_scale = 1.0 if 1.0 in runs else next(iter(runs))
        log.warning("finetune %s seed %d: no learning-rate factor could be scored on validation; x%g is tested",
                    runs[chosen_scale].dataset, seed, chosen_scale)
    chosen = runs[chosen_scale]
    chosen.lr_scale, chosen.lr_valid = chosen_scale, {s_: r.valid.value for s_, r in runs.items()}
    # the search's whole cost: every factor's training, not only the tested run's
    chosen.timing["lr_search_train_seconds"] = sum(r.timing["train_seconds"] for r in runs.values())
    chosen.timing["seed_seconds"] = time.perf_counter() - t_start
    return chosen


def _per_target_seed(cfg: PipelineConfig, seed: int, prepared: PreparedTask, split: Split,
                     encoder: EncoderSource | None, threads: int | None, verbose: bool, t_start: float) -> SeedResult:
    """``task_mode=per_target``: one model per target, each trained on that target's labelled training rows and
    selected on its own validation score; their predictions are scored together by the same metric code as a
    multi-task model's (mean over targets), so the two protocols read the same in the table."""
    from dataclasses import replace

    data = prepared.data
    ft = cfg.finetune
    task_type, metric = data.task_type, ft.resolved_metric()
    one_cfg = cfg.model_copy(update={"finetune": ft.model_copy(update={"task_mode": "multitask"})})
    valid_idx, test_idx = np.asarray(split.valid), np.asarray(split.test)
    valid_pred = np.full((len(valid_idx), data.n_tasks), np.nan)
    test_pred = np.full((len(test_idx), data.n_tasks), np.nan)
    per_task: list[SeedResult] = []
    members: list[Any] = []  # per target: its tested weights (finetune.save_models), None when untrained
    n_untrained = 0
    for t, name in enumerate(data.task_names):
        labels = data.labels[:, [t]]
        train = np.asarray(split.train)[~np.isnan(labels[np.asarray(split.train), 0])]
        if len(train) == 0:  # nothing to learn from: the constant the scorer ignores (no labels, no score)
            n_untrained += 1
            valid_pred[:, t] = test_pred[:, t] = 0.5 if task_type == "classification" else 0.0
            members.append(None)
            continue
        view = replace(prepared, data=replace(data, labels=labels, task_names=[name]))
        r = finetune_seed(one_cfg, seed, prepared=view, split=Split(train, valid_idx, test_idx), encoder=encoder,
                          threads=threads)
        test_pred[:, t] = r.test_pred[:, 0]
        if r.valid_pred is not None:
            valid_pred[:, t] = r.valid_pred[:, 0]
        per_task.append(r)
        members.append(r.member)
        if verbose:
            log.info("finetune %s seed %d target %s: valid %.4f test %.4f (%d training rows)", data.name, seed,
                     name, r.valid.value, r.test.value, len(train))
    y = data.labels.astype(np.float64)
    test_m = evaluate(task_type, y[test_idx], test_pred, data.task_names, metric)
    valid_m = evaluate(task_type, y[valid_idx], valid_pred, data.task_names, metric)
    epochs = max((len(r.history) for r in per_task), default=0)
    history = []
    for e in range(epochs):  # the targets' curves averaged per epoch (a target that stopped early drops out)
        recs = [r.history[e] for r in per_task if len(r.history) > e]
        history.append({k: float(np.nanmean([h.get(k, np.nan) for h in recs])) for k in recs[0]})
    train_seconds = sum(r.timing["train_seconds"] for r in per_task)
    final_sha = hashlib.sha256("".join(r.final_encoder_sha256 for r in per_task).encode()).hexdigest()
    first = per_task[0] if per_task else None
    return SeedResult(
        seed=int(seed), dataset=data.name, method=ft.method_label(), split=ft.split, task_type=task_type,
        metric=metric, test=test_m, valid=valid_m,
        best_epoch=int(np.median([r.best_epoch for r in per_task])) if per_task else 0, epochs_run=epochs,
        stopped_early=any(r.stopped_early for r in per_task),
        selection="best_valid" if all(r.selection == "best_valid" for r in per_task) else "mixed",
        n_train=len(split.train), n_valid=len(split.valid), n_test=len(split.test), split_hash=split_hash(split),
        encoder_run_id=first.encoder_run_id if first else "", encoder_sha256=first.encoder_sha256 if first else "",
        final_encoder_sha256=final_sha, pretrained=bool(first and first.pretrained),
        n_params=sum(r.n_params for r in per_task), n_trainable=sum(r.n_trainable for r in per_task),
        history=history,
        timing={"train_seconds": train_seconds, "eval_seconds": sum(r.timing["eval_seconds"] for r in per_task),
                "seconds_per_epoch": train_seconds / max(sum(r.epochs_run for r in per_task), 1),
                "seed_seconds": time.perf_counter() - t_start, "n_target_models": float(len(per_task)),
                "n_targets_without_training_rows": float(n_untrained)},
        test_index=test_idx, test_pred=test_pred.astype(np.float32), valid_pred=valid_pred.astype(np.float32),
        task_mode="per_target", device=first.device if first else "cpu", threads=first.threads if first else 1,
        worker=f"{socket.gethostname()}:{os.getpid()}", member=_per_target_member(seed, members, data.n_tasks, ft),
        lr_scale=float(np.median([r.lr_scale for r in per_task])) if per_task else 1.0,  # each target chose its own
    )


def _per_target_member(seed: int, members: list[Any], n_targets: int, ft: FinetuneConfig) -> Any:
    """The seed's per-target networks as one saved member; none past MAX_SAVED_TARGETS targets (ToxCast's
    617 x 3 seeds would be gigabytes: its predictions are logged, the summary says it was not saved)."""
    from lardo_ray.finetune.baselines import MAX_SAVED_TARGETS
    from lardo_ray.models.saved import Member

    trained = [m for m in members if m is not None]
    if not ft.save_models or not trained or n_targets > MAX_SAVED_TARGETS:
        return None
    return Member(seed=int(seed), state=b"", encoder_config=trained[0].encoder_config,
                  n_descriptors=trained[0].n_descriptors, per_target=members)


def constant_baseline(prepared: PreparedTask, split: Split, metric: str | None = None) -> TaskMetrics:
    """Test scores of predicting the training mean (regression) / the training positive rate (classification):
    the floor a fine-tuned model has to beat (ROC-AUC 0.5, RMSE = spread of test around the train mean)."""
    data = prepared.data
    y = data.labels
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(y[split.train], axis=0)
    mean = np.where(np.isnan(mean), 0.0, mean)
    pred = np.tile(mean, (len(split.test), 1))
    return evaluate(data.task_type, y[split.test], pred, data.task_names, metric)

