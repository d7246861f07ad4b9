"""Config sections of the fine-tune and compare stages (pydantic only: cheap to import for --help).

Defaults follow the MolCLR fine-tuning protocol (Wang et al., Nat. Mach. Intell. 2022, as inherited from
pretrain-gnns / deepchem): the deterministic Bemis-Murcko scaffold split 80/10/10, 3 runs (seeds 0, 1, 2),
100 epochs, batch size 32, Adam with lr 5e-4 for the prediction head and 1e-4 for the pre-trained encoder,
weight decay 1e-6; the test score is read at the epoch with the best validation score.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lardo_ray.config_base import RayResources, Section

TaskType = Literal["classification", "regression"]
SplitName = Literal["scaffold", "scaffold_balanced", "random", "column"]
MetricName = Literal["roc_auc", "rmse", "mae"]


class FinetuneConfig(Section):
    """Fine-tune / evaluate a graph encoder on one labelled data set, one run per seed."""

    dataset: str | None = Field(
        default="bbbp",
        description="built-in dataset card (bbbp, bace, clintox, tox21, toxcast, sider, hiv, esol, freesolv, "
        "lipophilicity; aliases allowed); None = a custom file: set data_path, label_columns and task_type",
    )
    data_path: str | None = Field(
        default=None,
        description="CSV (.csv/.csv.gz) or Parquet file, or a directory holding the card's usual file name "
        "(e.g. tox21.csv); None = the copy bundled with the package (BBBP only)",
    )
    smiles_column: str | None = Field(
        default=None, description="SMILES column; None = the card's ('smiles'), matched case-insensitively"
    )
    label_columns: list[str] | None = Field(
        default=None, description="label columns, one task each; None = from the card"
    )
    task_type: TaskType | None = Field(default=None, description="classification | regression; None = from the card")
    metric: MetricName | None = Field(
        default=None,
        description="model-selection / headline metric; None = the card's (roc_auc for classification, "
        "rmse for regression)",
    )
    drop_unlabelled: bool = Field(
        default=False,
        description="drop rows whose labels are all missing (deepchem/chemprop keep them, masked); "
        "they are counted either way",
    )
    split: SplitName = Field(
        default="scaffold",
        description="scaffold: deterministic Bemis-Murcko (deepchem/MolCLR; the same split for every seed); "
        "scaffold_balanced: chemprop/KANO balanced scaffold split, a new split per seed; random: seeded; "
        "column: train/valid/test values from split_column",
    )
    split_column: str | None = Field(
        default=None, description="with split=column: the column holding train / valid / test per row"
    )
    split_sizes: list[float] = Field(
        default_factory=lambda: [0.8, 0.1, 0.1],
        min_length=3,
        max_length=3,
        description="train / valid / test fractions (sum 1)",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="one fine-tuning run per seed (model init, shuffling and, for scaffold_balanced/random, "
        "the split); results are reported as mean ± std over them",
    )
    epochs: int = Field(default=100, ge=1, description="training epochs per run")
    batch_size: int = Field(default=32, ge=1, description="molecules per optimizer step")
    lr_head: float = Field(default=5e-4, gt=0.0, description="learning rate of the prediction head (Adam)")
    lr_encoder: float = Field(
        default=1e-4, ge=0.0, description="learning rate of the pre-trained encoder (ignored when frozen)"
    )
    lr_scales: list[float] = Field(
        default_factory=lambda: [1.0], min_length=1,
        description="learning rates chosen on validation: each seed is trained once per factor (lr_head and "
        "lr_encoder both multiplied by it) and the run with the best validation score is the one tested, e.g. "
        "[0.3, 1, 3] (three times the cost); [1.0] = the rates as given. The chosen factor is logged per seed "
        "(metric lr_scale)",
    )
    weight_decay: float = Field(default=1e-6, ge=0.0, description="Adam weight decay")
    freeze_encoder: bool = Field(
        default=False, description="true: linear/MLP probe on a frozen encoder; false: fine-tune everything"
    )
    patience: int | None = Field(
        default=None,
        ge=1,
        description="stop after this many epochs without a better validation score; None = run all epochs "
        "(MolCLR); either way the test score is taken at the best validation epoch",
    )
    task_mode: Literal["multitask", "per_target"] = Field(
        default="multitask",
        description="data sets with several targets (Tox21, ToxCast, ...): multitask = one model with a "
        "masked loss over every target; per_target = one model per target, trained on that target's labelled "
        "training rows (as MolCLR's and the paper's released code do); the table names which. The random-forest "
        "baselines are always per target",
    )
    dsm_features: Literal["none", "all"] = Field(
        default="none",
        description="all: the molecule's RDKit descriptors (the dsm stage's registry, same Standardiser) "
        "concatenated with the graph embedding before the head, each mapped through its empirical CDF on the "
        "training rows (chemprop's rdkit_2d_normalized idea); none: the graph embedding alone",
    )
    head: Literal["mlp", "forest"] = Field(
        default="mlp",
        description="mlp: a 2-layer head trained with the encoder (fine-tuning); forest: the encoder as a "
        "featurizer, frozen, and the rf_dsm baseline's random forests (same trees and seeds, one per target) on "
        "its embedding, plus the raw descriptors with dsm_features=all (lardo_ray.finetune.forest_head)",
    )
    ecfp_features: bool = Field(
        default=False,
        description="head=forest only: the molecule's ECFP4 bits (Morgan radius 2, 2,048 bits, rf_ecfp's features) "
        "also go into the forest, after the embedding (and the descriptors); method label '+ecfp'",
    )
    save_models: bool = Field(
        default=True, description="keep each seed's tested (best-validation) weights as an MLflow model on its "
        "run, and the method's seed ensemble on the method's run (lardo_ray.models.saved; `lardo-ray predict`)",
    )
    register_models: bool = Field(
        default=True, description="register the seed ensemble in the MLflow model registry as "
        "'<dataset>-<method>' (a new version per fine-tune; needs a database-backed store: sqlite or a server)",
    )
    baselines: list[Literal["rf_dsm", "rf_ecfp"]] = Field(
        default_factory=list, description="classical baselines fitted on the same splits and seeds beside the GNN "
        "(rf_dsm: random forest on the dsm stage's RDKit descriptors; rf_ecfp: on ECFP4 2048-bit fingerprints); "
        "--baseline on the command line"
    )
    baseline_trees: int = Field(
        default=500, ge=1, description="trees per random forest of the baselines (fixed, never tuned on test); "
        "ToxCast's 617 targets x 3 seeds x 2 forests at 500 trees take hours on 2 cores: configs/ablation_cpu.yaml "
        "says when it lowers this"
    )
    encoder: str | None = Field(
        default=None,
        description="pre-trained encoder: a local export directory, runs:/RUN_ID/encoder or "
        "models:/NAME/VERSION; None = random initialisation (the no-pre-training baseline)",
    )
    method: str | None = Field(
        default=None,
        description="method label in the comparison table (MLflow tag lardo.method); None = derived "
        "from encoder ('random-init' when None)",
    )
    encoder_dropout: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="dropout after every encoder layer while fine-tuning; None = the export's own (random init: "
        "model.dropout). MolCLR fine-tunes its GIN with 0.3 on BBBP",
    )
    limit: int | None = Field(
        default=None, ge=1, description="read only the first rows of the data file (smoke runs / CI); None = all"
    )
    eval_batch_size: int = Field(
        default=64,
        ge=1,
        description="molecules per forward pass when scoring valid / test (eval mode; on CPU larger batches "
        "are slower, on a GPU raise it)",
    )
    head_hidden: int = Field(default=256, ge=1, description="hidden width of the 2-layer prediction head")
    head_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout before the head's output layer")
    device: str | None = Field(default=None, description="torch device; None = cuda when a GPU is visible, else cpu")
    ray: RayResources = Field(
        default_factory=lambda: RayResources(num_cpus=1.0),
        description="one Ray task per (dataset, seed) run: resources of each",
    )

    @field_validator("lr_scales")
    @classmethod
    def _scales_positive_distinct(cls, v: list[float]) -> list[float]:
        if any(not x > 0 for x in v):
            raise ValueError(f"lr_scales must be positive factors, got {v}")
        if len({f"{x:g}" for x in v}) != len(v):  # as their metric names (valid_at_lr_scale_<x>) tell them apart
            raise ValueError(f"lr_scales must be distinct (to 6 significant digits), got {v}")
        return v

    @field_validator("split_sizes")
    @classmethod
    def _sizes_sum_to_one(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split_sizes must be three non-negative fractions summing to 1, got {v}")
        if v[0] <= 0:
            raise ValueError("split_sizes: the train fraction must be > 0")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from lardo_ray.finetune.datasets import get_card  # light: stdlib + numpy

        try:
            return get_card(v).key
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None

    @model_validator(mode="after")
    def _complete(self) -> FinetuneConfig:
        if self.dataset is None:
            missing = [k for k in ("data_path", "label_columns", "task_type") if getattr(self, k) in (None, [])]
            if missing:
                raise ValueError(
                    f"finetune: without a dataset card, set finetune.{', finetune.'.join(missing)} "
                    f"(or set finetune.dataset to a built-in card)"
                )
        if self.head == "forest" and len(self.lr_scales) > 1:
            raise ValueError("finetune.lr_scales: head=forest trains no network, so there is no learning rate "
                             "to choose; leave lr_scales at [1.0]")
        if self.ecfp_features and self.head != "forest":
            raise ValueError("finetune.ecfp_features: only a forest head reads fingerprints (set finetune.head=forest)")
        if self.split == "column" and not self.split_column:
            raise ValueError("split=column needs split_column (the column holding train/valid/test)")
        if self.metric is not None:
            task_type = self.task_type
            if task_type is None and self.dataset is not None:
                from lardo_ray.finetune.datasets import get_card

                task_type = get_card(self.dataset).task_type
            ok = {"classification": {"roc_auc"}, "regression": {"rmse", "mae"}}.get(task_type or "", set())
            if self.metric not in ok:
                raise ValueError(f"metric {self.metric!r} does not fit task_type {task_type!r}")
        return self

    def resolved_task_type(self) -> str:
        """task_type, or the card's."""
        if self.task_type is not None:
            return self.task_type
        from lardo_ray.finetune.datasets import get_card

        return get_card(self.dataset).task_type  # type: ignore[arg-type]  # validated: dataset set

    def resolved_metric(self) -> str:
        """metric, or the default of the task type (roc_auc / rmse)."""
        return self.metric or ("roc_auc" if self.resolved_task_type() == "classification" else "rmse")

    def method_label(self) -> str:
        """The lardo.method tag of this run: ``method`` or a short name derived from ``encoder``."""
        if self.method:
            return self.method
        if self.encoder is None:
            return "random-init"
        e = self.encoder.rstrip("/")
        if e.startswith("runs:/"):
            return "run-" + e[len("runs:/"):].split("/")[0][:8]
        if e.startswith("models:/"):
            return e[len("models:/"):]
        return e.split("/")[-1] or e


class CompareConfig(Section):
    """Build the dataset x method table (mean ± std over seeds) from fine-tune runs logged in MLflow."""

    experiment: str = Field(default="lardo_ray", description="MLflow experiment holding the fine-tune runs")
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (sqlite:///..., http://host:5000, ...); None = MLflow's default "
        "(MLFLOW_TRACKING_URI)",
    )
    metric: MetricName | None = Field(
        default=None,
        description="metric to tabulate; None = per task type: roc_auc for classification, rmse for regression",
    )
    subset: Literal["test", "valid"] = Field(default="test", description="which split's metric is tabulated")
    group_by: list[str] = Field(
        default_factory=lambda: ["dataset", "method"],
        min_length=2,
        description="keys naming a cell: the first gives the table rows, the others (joined by ' / ') the "
        "columns; a short name means the tag lardo.<name>, or give tags.<tag> / params.<param>",
    )
    split: str | None = Field(
        default=None,
        description="keep only runs with this lardo.split; None = all (an error if they mix splits and "
        "'split' is not in group_by)",
    )
    datasets: list[str] | None = Field(default=None, description="keep only these datasets; None = all")
    methods: list[str] | None = Field(default=None, description="keep only these methods; None = all")
    source: Literal["auto", "children", "parents"] = Field(
        default="auto",
        description="auto: per group, per-seed child runs when there are any, else the parent's aggregated "
        "metrics; children / parents: only that kind",
    )
    include_published: bool = Field(
        default=False,
        description="add published reference numbers (MolCLR, D-MPNN, MoleculeSTM; deterministic scaffold "
        "split) as extra columns marked 'published'",
    )
    filter_string: str | None = Field(
        default=None, description="extra MLflow search filter, e.g. \"params.epochs = '100'\""
    )
    include_unfinished: bool = Field(default=False, description="also use runs that are not FINISHED")
    bootstrap: int = Field(
        default=1000, ge=0, description="paired bootstrap resamples of the test molecules for the interval of "
        "(best pre-trained method - best baseline) per dataset; 0 = off"
    )
    ensemble: bool = Field(
        default=True, description="also score each method's seed ensemble (test predictions averaged over seeds), "
        "in a second table and the CSV's 'ensemble' column"
    )
    baseline_methods: list[str] = Field(
        default_factory=lambda: ["rf_dsm", "rf_ecfp", "chemprop"],
        description="the classical baselines (what a user would fit instead): the bootstrap compares the best "
        "pre-trained method with the best of these, and separately with the best GNN trained from scratch "
        "(any other method whose runs name no pre-trained encoder: scratch, scratch+dsm, random-init)",
    )
    output_dir: str = Field(default="outputs/compare", description="where the CSV, Markdown and PNG are written")
    name: str = Field(default="comparison", description="file stem of the outputs (<name>.csv/.md/.png)")
