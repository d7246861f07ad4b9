"""Built-in MoleculeNet dataset cards and one loader for labelled SMILES tables.

The cards are lardo_ray/data/cards/*.yaml, one per dataset, shared with describe's stage 1 (their
``benchmark:`` block and ``label_columns`` are what fine-tuning reads). A card names what a benchmark file holds: task type, headline metric, SMILES and label columns and the
usual file name. Label columns are those of the "SMILES + labels" variants that chemprop and KANO ship
(see ../shared/data/moleculenet/PROVENANCE.md); the DeepChem originals carry extra columns and other names,
so for those give ``smiles_column`` / ``label_columns`` explicitly.

``load_task`` reads a CSV (.csv, .csv.gz) or Parquet file, keeps the SMILES text as written (no
standardisation: the graph featurizer does its own), turns labels into a float array with NaN for a missing
label, and drops rows whose SMILES RDKit cannot parse, counting them (``n_dropped`` / ``dropped``).

Imports stay light at module level (stdlib + numpy): the settings validator looks cards up from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from lardo_ray import fs

if TYPE_CHECKING:
    from lardo_ray.finetune.settings import FinetuneConfig

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data"

@dataclass(frozen=True)
class DatasetCard:
    """What one benchmark file holds. ``label_columns=None`` means every column except the SMILES column."""

    key: str  # lower-case id: config value, MLflow tag lardo.dataset
    name: str  # display name
    task_type: str  # classification | regression
    metric: str  # headline metric: roc_auc | rmse
    label_columns: tuple[str, ...] | None
    file_names: tuple[str, ...]  # usual file names, first = the one the card is written for
    smiles_column: str = "smiles"
    n_tasks: int = 1
    n_molecules: int | None = None  # rows of the usual file (approximate for files not checked here)
    units: str = ""
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def file_name(self) -> str:
        return self.file_names[0]


def _load_cards() -> dict[str, DatasetCard]:
    """Every benchmark card of lardo_ray/data/cards/*.yaml (the same files describe's stage 1 reads)."""
    import yaml

    out: dict[str, DatasetCard] = {}
    entries = [yaml.safe_load(p.read_text(encoding="utf-8")) or {} for p in (BUNDLED_DIR / "cards").glob("*.yaml")]
    entries = sorted((d for d in entries if d.get("benchmark")),  # the pre-training card has no labelled file
                     key=lambda d: (d["benchmark"].get("order", 99), d["key"]))
    for data in entries:
        bench = data["benchmark"]
        labels = tuple(data.get("label_columns") or ()) or None
        out[data["key"]] = DatasetCard(
            key=data["key"], name=data["name"], task_type=data["task_type"], metric=bench["metric"],
            label_columns=labels, file_names=tuple(bench["file_names"]),
            smiles_column=bench.get("smiles_column", "smiles"),
            n_tasks=len(labels) if labels else int(bench.get("n_tasks") or 1), n_molecules=bench.get("n_molecules"),
            units=bench.get("units", ""), aliases=tuple(data.get("aliases", ())),
            description=bench.get("summary", ""))
    return out


CARDS: dict[str, DatasetCard] = _load_cards()
TOX21_TASKS = CARDS["tox21"].label_columns
SIDER_TASKS = CARDS["sider"].label_columns


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def get_card(name: str) -> DatasetCard:
    """A card by key, display name or alias (case-insensitive). KeyError names the known cards."""
    n = _norm(name)
    for card in CARDS.values():
        if n in {card.key, _norm(card.name), *(_norm(a) for a in card.aliases)}:
            return card
    raise KeyError(f"unknown dataset {name!r}; built-in cards: {', '.join(CARDS)} (or set dataset=null and "
                   f"give data_path, label_columns and task_type)")


@dataclass(frozen=True)
class DroppedRow:
    row: int  # 0-based data row in the file (header not counted)
    smiles: str
    reason: str  # empty | unparsable_smiles


@dataclass
class LabelledSet:
    """Molecules with labels, ready to split. ``labels[i, t]`` is NaN where task t has no label for row i."""

    name: str
    smiles: list[str]
    labels: np.ndarray  # float64, shape (n, n_tasks)
    task_names: list[str]
    task_type: str
    metric: str
    source: str = ""
    row_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # file row of each kept row
    n_read: int = 0
    n_dropped: int = 0  # rows dropped because RDKit cannot parse their SMILES (or it is empty)
    dropped: list[DroppedRow] = field(default_factory=list)
    n_unlabelled: int = 0  # rows with every label missing (dropped only with drop_unlabelled=True)
    split_values: np.ndarray | None = None  # with split=column: the raw split column, one value per row

    def __len__(self) -> int:
        return len(self.smiles)

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def subset(self, idx: np.ndarray | list[int]) -> LabelledSet:
        """Rows ``idx`` (e.g. one part of a split), every other field kept."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            smiles=[self.smiles[i] for i in idx],
            labels=self.labels[idx],
            row_index=self.row_index[idx] if len(self.row_index) else self.row_index,
            split_values=None if self.split_values is None else self.split_values[idx],
        )

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.name,
            "task_type": self.task_type,
            "n_tasks": self.n_tasks,
            "n_read": self.n_read,
            "n_molecules": len(self),
            "n_dropped_unparsable": self.n_dropped,
            "n_unlabelled": self.n_unlabelled,
            "missing_label_fraction": float(np.isnan(self.labels).mean()) if self.labels.size else 0.0,
        }
        if self.task_type == "classification" and self.labels.size:
            with np.errstate(invalid="ignore"):
                out["positive_fraction"] = float(np.nanmean(self.labels))
        return out


_MISSING = {"", "nan", "na", "n/a", "null", "none"}
_BOOL = {"true": 1.0, "false": 0.0}


def _cached_download(uri: str, card: DatasetCard | None) -> str:
    """A labelled set in object storage (a file, or a directory holding the card's file) -> a local copy,
    cached under ~/.cache/lardo_ray/data by URI, size and modification time."""
    import hashlib

    fsys, path = fs.filesystem_and_path(uri)
    info = fsys.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data file not found: {uri!r}")
    if info.type == pafs.FileType.Directory:
        names = {i.path.rsplit("/", 1)[-1].lower(): i for i in fsys.get_file_info(pafs.FileSelector(path))}
        wanted = [c.lower() for f in (card.file_names if card else ()) for c in (f, f + ".gz", f.rsplit(".", 1)[0] + ".parquet")]
        hit = next((names[w] for w in wanted if w in names), None)
        if hit is None:
            raise FileNotFoundError(f"none of {wanted} in {uri!r}" + (f" for dataset {card.key}" if card else ""))
        info, uri = hit, fs.join(uri, hit.path.rsplit("/", 1)[-1])
    key = hashlib.sha256(f"{uri}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:16]
    local_dir = Path(os.environ.get("LARDO_CACHE", Path.home() / ".cache" / "lardo_ray")) / "data" / key
    local = local_dir / uri.rsplit("/", 1)[-1]
    if not local.is_file():
        fs.download(uri, str(local_dir))
    return str(local)


def resolve_path(card: DatasetCard | None, data_path: str | os.PathLike | None) -> Path:
    """The file to read: ``data_path`` itself, the card's usual file inside it, or the bundled copy."""
    if data_path is None:
        if card is not None:
            for fname in card.file_names:
                p = BUNDLED_DIR / fname
                if p.is_file():
                    return p
        what = card.key if card else "a custom dataset"
        usual = card.file_name if card else "data.csv"
        raise FileNotFoundError(
            f"no data_path for {what} and no bundled copy: set finetune.data_path to the file (e.g. "
            f"/data/{usual}) or to a directory holding {usual}"
        )
    if fs.is_remote(str(data_path)):
        data_path = _cached_download(str(data_path), card)
    p = Path(data_path).expanduser()
    if p.is_dir():
        if card is None:
            raise FileNotFoundError(f"data_path {str(p)!r} is a directory; without a dataset card give the file")
        tried = []
        for fname in card.file_names:
            stem = fname.rsplit(".", 1)[0]
            for cand in (fname, fname + ".gz", stem + ".parquet"):
                tried.append(cand)
                if (p / cand).is_file():
                    return p / cand
                # case-insensitive match (BBBP.csv vs bbbp.csv)
                for f in p.iterdir():
                    if f.name.lower() == cand.lower() and f.is_file():
                        return f
        raise FileNotFoundError(f"none of {tried} in directory {str(p)!r} for dataset {card.key}")
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {str(p)!r}")
    return p


def _is_parquet(p: Path) -> bool:
    return p.suffix.lower() in (".parquet", ".pq")


def _read_columns(p: Path) -> list[str]:
    if _is_parquet(p):
        import pyarrow.parquet as pq

        return list(pq.read_schema(p).names)
    import pandas as pd

    return [str(c) for c in pd.read_csv(p, nrows=0).columns]


_NA_TEXT = ["", "nan", "NaN", "NAN", "na", "NA", "n/a", "N/A", "null", "NULL", "None", "none"]


def _read_table(p: Path, columns: list[str], text_columns: list[str]):
    import pandas as pd

    if _is_parquet(p):
        import pyarrow.parquet as pq

        return pq.read_table(p, columns=columns).to_pandas()
    # SMILES (and split) columns as plain text: "NA"/"N/A"/"nan" must not turn into NaN there. Label
    # columns get the usual missing-value spellings and parse as floats in C; a column that still holds
    # a stray word comes back as text and fails the strict conversion in _labels_to_float.
    na = {c: _NA_TEXT for c in columns if c not in text_columns}
    return pd.read_csv(p, usecols=columns, dtype={c: str for c in text_columns}, keep_default_na=False,
                       na_values=na)


def _match_column(wanted: str, columns: list[str], what: str) -> str:
    if wanted in columns:
        return wanted
    lower = {c.lower(): c for c in columns}
    if wanted.lower() in lower:
        return lower[wanted.lower()]
    raise KeyError(f"{what} column {wanted!r} not in the file; its columns: {columns[:20]}"
                   + (" ..." if len(columns) > 20 else ""))


def _labels_to_float(series, column: str, task_type: str) -> np.ndarray:
    """One label column -> float64 with NaN for missing; raises on values that are not numbers."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        out = series.astype("float64").to_numpy(copy=True)
    else:
        out = np.empty(len(series), dtype=np.float64)
        bad: list[str] = []
        for i, v in enumerate(series.tolist()):
            if v is None or (isinstance(v, float) and np.isnan(v)):
                out[i] = np.nan
                continue
            s = str(v).strip()
            if s.lower() in _MISSING:
                out[i] = np.nan
            elif s.lower() in _BOOL:
                out[i] = _BOOL[s.lower()]
            else:
                try:
                    out[i] = float(s)
                except ValueError:
                    out[i] = np.nan
                    if len(bad) < 5:
                        bad.append(s)
        if bad:
            raise ValueError(f"label column {column!r} holds values that are not numbers: {bad}")
    if task_type == "classification":
        vals = np.unique(out[~np.isnan(out)])
        if not np.isin(vals, (0.0, 1.0)).all():
            raise ValueError(
                f"classification label column {column!r} must hold 0/1 (empty = missing); found "
                f"{vals[:10].tolist()}. Recode it (e.g. -1/1 files: -1 -> 0), or set task_type=regression"
            )
    elif not np.isfinite(out[~np.isnan(out)]).all():
        raise ValueError(f"regression label column {column!r} holds infinite values")
    return out


def load_task(
    source: FinetuneConfig | DatasetCard | str | None = None,
    data_path: str | os.PathLike | None = None,
    *,
    smiles_column: str | None = None,
    label_columns: list[str] | tuple[str, ...] | None = None,
    task_type: str | None = None,
    metric: str | None = None,
    split_column: str | None = None,
    drop_unlabelled: bool | None = None,
    name: str | None = None,
    limit: int | None = None,
) -> LabelledSet:
    """Read a labelled SMILES table into a ``LabelledSet``.

    ``source`` is a ``FinetuneConfig`` (every field used; explicit keyword arguments win), a card, a card
    name, or None (a custom file: give ``data_path``, ``label_columns`` and ``task_type``). Rows whose
    SMILES is empty or that RDKit cannot parse are dropped and counted. ``limit`` keeps the first rows only
    (smoke tests).
    """
    card: DatasetCard | None = None
    if source is not None and not isinstance(source, (str, DatasetCard)):  # a FinetuneConfig
        cfg = source
        card = get_card(cfg.dataset) if cfg.dataset else None
        data_path = data_path if data_path is not None else cfg.data_path
        smiles_column = smiles_column or cfg.smiles_column
        label_columns = label_columns or cfg.label_columns
        task_type = task_type or cfg.task_type
        metric = metric or cfg.metric
        if cfg.split == "column":
            split_column = split_column or cfg.split_column
        drop_unlabelled = cfg.drop_unlabelled if drop_unlabelled is None else drop_unlabelled
    elif isinstance(source, DatasetCard):
        card = source
    elif isinstance(source, str):
        card = get_card(source)

    task_type = task_type or (card.task_type if card else None)
    if task_type not in ("classification", "regression"):
        raise ValueError(f"task_type must be classification or regression, got {task_type!r}")
    if metric is None:
        metric = card.metric if card and card.task_type == task_type else (
            "roc_auc" if task_type == "classification" else "rmse")
    path = resolve_path(card, data_path)
    columns = _read_columns(path)

    smiles_col = _match_column(smiles_column or (card.smiles_column if card else "smiles"), columns, "SMILES")
    wanted = list(label_columns) if label_columns else (list(card.label_columns) if card and card.label_columns
                                                       else None)
    if wanted is None:
        if card is None:
            raise ValueError("label_columns are required for a custom dataset")
        excluded = {smiles_col} | ({split_column} if split_column else set())
        wanted = [c for c in columns if c not in excluded]
    labels_cols = [_match_column(c, columns, "label") for c in wanted]
    if not labels_cols:
        raise ValueError(f"no label columns in {str(path)!r}")
    split_col = _match_column(split_column, columns, "split") if split_column else None
    if smiles_col in labels_cols:
        raise ValueError(f"the SMILES column {smiles_col!r} cannot also be a label column")

    read_cols = list(dict.fromkeys([smiles_col, *labels_cols, *([split_col] if split_col else [])]))
    df = _read_table(path, read_cols, [smiles_col, *([split_col] if split_col else [])])
    if limit is not None:
        df = df.iloc[:limit]
    n_read = len(df)
    y = np.column_stack([_labels_to_float(df[c], c, task_type) for c in labels_cols]) if n_read else np.zeros(
        (0, len(labels_cols)))

    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    keep: list[int] = []
    smiles_out: list[str] = []
    dropped: list[DroppedRow] = []
    for i, s in enumerate(df[smiles_col].tolist()):
        text = "" if s is None or (isinstance(s, float) and np.isnan(s)) else str(s).strip()
        if not text:
            dropped.append(DroppedRow(i, "", "empty"))
            continue
        if Chem.MolFromSmiles(text) is None:
            dropped.append(DroppedRow(i, text, "unparsable_smiles"))
            continue
        keep.append(i)
        smiles_out.append(text)
    keep_arr = np.asarray(keep, dtype=np.int64)
    y = y[keep_arr]
    split_values = None
    if split_col:
        split_values = np.asarray([str(v).strip() for v in df[split_col].to_numpy()[keep_arr]], dtype=object)

    unlabelled = np.isnan(y).all(axis=1) if len(y) else np.zeros(0, dtype=bool)
    n_unlabelled = int(unlabelled.sum())
    if drop_unlabelled and n_unlabelled:
        m = ~unlabelled
        keep_arr, y = keep_arr[m], y[m]
        smiles_out = [s for s, k in zip(smiles_out, m) if k]
        split_values = None if split_values is None else split_values[m]

    return LabelledSet(
        name=name or (card.key if card else path.name.split(".")[0]),
        smiles=smiles_out,
        labels=np.ascontiguousarray(y, dtype=np.float64),
        task_names=[str(c) for c in labels_cols],
        task_type=task_type,
        metric=metric,
        source=str(path),
        row_index=keep_arr,
        n_read=n_read,
        n_dropped=len(dropped),
        dropped=dropped,
        n_unlabelled=n_unlabelled,
        split_values=split_values,
    )
