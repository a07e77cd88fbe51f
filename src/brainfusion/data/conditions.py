"""Conditions for conditional generation: labels read from where users keep them, the vocabulary
that turns them into network inputs, and the label dropout that classifier-free guidance needs.

Where a run's conditions come from (`config.ConditionConfig`):
  * class folders (`labels = "folders"`): a file's class is its first folder under the data path
    (`kaggle/ModerateDemented/x.jpg` → ModerateDemented), the layout of most labelled image sets;
  * a CSV or TSV table (`labels = "table.csv"`, tab-separated if it ends in .tsv or its header has
    a tab): one row per file or per subject. The key column (the first, or `key_column`) is
    matched against, in this order, the file's path relative to the data path, its name, its name
    without suffixes, the name before `_slice_<n>`, the slice's subject ID (layouts.subject_of: BIDS
    `sub-*`, DICOM PatientID, `OAS1_xxxx`, ...) and its folders' names, nearest first, so one table
    serves slices, volumes, subject folders (OASIS-1's `OAS1_0001_MR1`) and BIDS participants.tsv.
    `label_columns` are categorical, `continuous_columns` numeric;
  * the slice level (`slice_level`): k/(n−1) for axial slice k of a volume's n, or, for 2-D files
    named `<subject>_slice_<k>` (the OASIS PNG layout), k scaled to 0..1 over that subject's
    slices. 0 is the most inferior slice.

A cell that is empty, "NA", "n/a", "nan", "none", "null" or "?" is missing; so is a file that no
row matches. Missing labels stop the run naming the file and the column, or, with
`on_missing_label = "skip"`, leave those files out.

The encoding is one float tensor (N, K): the categorical conditions first (the class index), then
the continuous ones as (value − mean)/std; NaN (`NULL`) is an unknown or dropped condition, which
the network replaces by its learned null embedding. The vocabulary (class names in index order,
and each continuous condition's training mean and std) is fitted on the training slices when a run
starts and saved in its config, so every checkpoint maps `class=ModerateDemented` to the same index.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import FOLDER_COLUMN, FOLDER_LABELS, LEVEL_COLUMN, ConditionConfig, RunConfig
from ..errors import BrainfusionError

log = logging.getLogger(__name__)

NULL = float("nan")  # an unknown or dropped condition: the network uses its null embedding
MISSING = ("", "na", "n/a", "nan", "none", "null", "?")
NAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".gz", ".hdr", ".img")
SLICE_NAME = re.compile(r"^(?P<subject>.+?)_slice_(?P<index>\d+)")

Request = Mapping[str, object] | Sequence[Mapping[str, object]] | torch.Tensor


@dataclass
class SliceLabels:
    """Raw condition values per slice, before the vocabulary: class names (None = missing) and
    floats (NaN = missing); `problems[i]` says why slice i lacks a label (None: it has all)."""

    sources: list[str]
    categorical: dict[str, list[str | None]]
    continuous: dict[str, np.ndarray]
    problems: list[str | None]

    def subset(self, keep: np.ndarray) -> "SliceLabels":
        rows = np.flatnonzero(keep)
        return SliceLabels(
            [self.sources[i] for i in rows], {k: [v[i] for i in rows] for k, v in self.categorical.items()},
            {k: v[rows] for k, v in self.continuous.items()}, [self.problems[i] for i in rows],
        )


def _relative(root: Path, source: str) -> Path:
    path = Path(source)
    try:
        rel = path.relative_to(root)
    except ValueError:
        return Path(path.name)
    return Path(path.name) if rel == Path(".") else rel


def _stem(name: str) -> str:
    while any(name.lower().endswith(s) for s in NAME_SUFFIXES) and "." in name[1:]:
        name = name[: name.rindex(".")]
    return name


def file_keys(root: Path, source: str, subject: str = "") -> list[str]:
    """The names a table row may use for this file, in the order they are tried; `subject` is the slice's
    subject ID (SliceSet.subjects: BIDS participant_id, DICOM PatientID, ...), so participants.tsv matches."""
    rel = _relative(root, source)
    match = SLICE_NAME.match(rel.name)
    named = match["subject"] if match else _stem(rel.name)
    keys = [rel.as_posix(), rel.name, _stem(rel.name), named, subject, *reversed(rel.parent.parts)]
    return list(dict.fromkeys(k for k in keys if k))


@dataclass
class LabelTable:
    path: Path
    key: str
    rows: dict[str, dict[str, str]]


def read_table(path: Path, key_column: str, columns: tuple[str, ...]) -> LabelTable:
    """A CSV/TSV label table, indexed by its key column; refuses missing columns and duplicate keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BrainfusionError(f"label table {path} does not exist; check condition.labels.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BrainfusionError(f"label table {path} could not be read as UTF-8 text ({exc}); save it as a CSV or TSV file.") from None
    first = text.split("\n", 1)[0]
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" or "\t" in first else ",")
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    key = key_column or (header[0] if header else "")
    absent = [c for c in (key, *columns) if c not in header]
    if absent:
        raise BrainfusionError(f"label table {path} has no column '{absent[0]}'; its columns are {', '.join(header) or 'none'}.")
    rows: dict[str, dict[str, str]] = {}
    for line, row in enumerate(reader, start=2):
        name = (row.get(key) or "").strip()
        if name in rows:
            raise BrainfusionError(f"label table {path} names '{name}' twice in column '{key}' (line {line}); keep one row per key.")
        if name:
            rows[name] = {c: (row.get(c) or "").strip() for c in columns}
    return LabelTable(path, key, rows)


def _number(text: str, source: str, column: str, table: Path) -> float:
    if text.lower() in MISSING:
        return NULL
    try:
        value = float(text)
    except ValueError:
        value = math.inf
    if not math.isfinite(value):
        raise BrainfusionError(
            f"{source}: column '{column}' of {table} holds {text!r}, which is not a finite number; "
            "fix the cell or make the column a categorical one."
        )
    return value


def _read_table_labels(cc: ConditionConfig, root: Path, sources: list[str], out: SliceLabels, subjects: list[str]) -> None:
    table = read_table(Path(cc.labels), cc.key_column, cc.label_columns + cc.continuous_columns)
    found: dict[str, tuple[dict[str, str] | None, list[str]]] = {}
    for i, source in enumerate(sources):
        if source not in found:  # a volume's slices share one source: match it once
            keys = file_keys(root, source, subjects[i] if subjects else "")
            found[source] = next((table.rows[k] for k in keys if k in table.rows), None), keys
        row, keys = found[source]
        if row is None:
            out.problems[i] = out.problems[i] or (
                f"has no row in {table.path} (its column '{table.key}' matches none of {', '.join(keys)})"
            )
            continue
        for name in cc.label_columns:
            value = row[name]
            out.categorical[name][i] = None if value.lower() in MISSING else value
        for name in cc.continuous_columns:
            out.continuous[name][i] = _number(row[name], source, name, table.path)
        empty = [n for n in cc.label_columns if out.categorical[n][i] is None]
        empty += [n for n in cc.continuous_columns if math.isnan(out.continuous[n][i])]
        if empty:
            out.problems[i] = out.problems[i] or f"has no value in column '{empty[0]}' of {table.path}"


def slice_levels(sources: list[str], levels: np.ndarray | None) -> np.ndarray:
    """Each slice's normalised axial level: a volume slice's own (slices.py), else the `_slice_<k>`
    number of its name scaled over the same subject's slices in the same folder; NaN if neither."""
    out = np.full(len(sources), np.nan) if levels is None else np.asarray(levels, dtype=np.float64).copy()
    groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for i, source in enumerate(sources):
        match = SLICE_NAME.match(Path(source).name)
        if math.isnan(out[i]) and match:
            groups.setdefault((str(Path(source).parent), match["subject"]), []).append((i, int(match["index"])))
    for members in groups.values():
        lo, hi = min(k for _, k in members), max(k for _, k in members)
        for i, k in members:
            out[i] = (k - lo) / (hi - lo) if hi > lo else 0.5
    return out


def read_labels(cc: ConditionConfig, data_path: str | Path, sources: list[str], levels: np.ndarray | None = None,
                subjects: list[str] | None = None) -> SliceLabels:
    """The raw conditions of slices read from `sources` (SliceSet.sources, with their SliceSet.subjects) under `data_path`."""
    root = Path(data_path)
    categorical, continuous = cc.names()
    n = len(sources)
    out = SliceLabels(list(sources), {k: [None] * n for k in categorical}, {k: np.full(n, np.nan) for k in continuous}, [None] * n)
    if cc.labels == FOLDER_LABELS:
        for i, source in enumerate(sources):
            rel = _relative(root, source)
            out.categorical[FOLDER_COLUMN][i] = rel.parts[0] if len(rel.parts) > 1 else None
            if len(rel.parts) < 2:
                out.problems[i] = f"sits directly in {root}, not in a class folder (for column '{FOLDER_COLUMN}')"
    elif cc.labels:
        _read_table_labels(cc, root, sources, out, subjects or [])
    if cc.slice_level:
        out.continuous[LEVEL_COLUMN] = slice_levels(sources, levels)
        for i in np.flatnonzero(np.isnan(out.continuous[LEVEL_COLUMN])):
            out.problems[i] = out.problems[i] or (
                f"has no slice level (for column '{LEVEL_COLUMN}'): it is no volume slice and its name has no _slice_<number>"
            )
    return out


def _class_order(name: str) -> tuple:
    """Numbers in numeric order (CDR 0, 0.5, 1, 2), then names alphabetically."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def fit_vocabulary(cc: ConditionConfig, labels: SliceLabels) -> None:
    """Class names (sorted) and continuous mean/std from the training slices, into `cc`."""
    cc.classes = {k: tuple(sorted({v for v in values if v is not None}, key=_class_order)) for k, values in labels.categorical.items()}
    cc.stats = {}
    for name, values in labels.continuous.items():
        known = values[~np.isnan(values)]
        if known.size == 0:
            raise BrainfusionError(f"no training slice has a value for condition '{name}'; check the labels.")
        std = float(known.std())
        cc.stats[name] = (float(known.mean()), std if std > 0 else 1.0)  # a constant column still encodes to 0
    empty = [k for k, v in cc.classes.items() if not v]
    if empty:
        raise BrainfusionError(f"no training slice has a class for condition '{empty[0]}'; check the labels.")


def encode_labels(cc: ConditionConfig, labels: SliceLabels) -> np.ndarray:
    """(N, K) float32 network inputs of raw labels under the vocabulary in `cc` (missing → NULL)."""
    categorical, continuous = cc.names()
    columns = []
    for name in categorical:
        index = {c: float(i) for i, c in enumerate(cc.classes[name])}
        for source, value in zip(labels.sources, labels.categorical[name]):
            if value is not None and value not in index:
                raise BrainfusionError(
                    f"{source} has class {value!r} for condition '{name}', which is not among this run's classes "
                    f"({', '.join(cc.classes[name])}); relabel it or start a new run."
                )
        columns.append(np.array([NULL if v is None else index[v] for v in labels.categorical[name]]))
    for name in continuous:
        mean, std = cc.stats[name]
        columns.append((labels.continuous[name] - mean) / std)
    return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((len(labels.sources), 0), np.float32)


def _keep_labelled(cc: ConditionConfig, labels: SliceLabels, total_files: int) -> np.ndarray:
    """Which slices have every label; refuses the first one that has not unless `on_missing_label` is skip."""
    bad = [i for i, problem in enumerate(labels.problems) if problem]
    if bad and cc.on_missing_label == "fail":
        i = bad[0]
        raise BrainfusionError(
            f"{labels.sources[i]} {labels.problems[i]}; add the label, or set condition.on_missing_label to 'skip' "
            "to leave such files out."
        )
    keep = np.ones(len(labels.sources), dtype=bool)
    keep[bad] = False
    if bad:
        files = sorted({labels.sources[i] for i in bad})
        log.warning("left out %d slice(s) of %d file(s) without labels (of %d files), e.g. %s %s", len(bad), len(files),
                    total_files, labels.sources[bad[0]], labels.problems[bad[0]])
    if not keep.any():
        raise BrainfusionError(f"none of the {len(labels.sources)} slices has every label; check condition.labels and its columns.")
    return keep


def labelled_subset(cc: ConditionConfig, data_path: str | Path, slices) -> tuple[np.ndarray, SliceLabels]:
    """Which slices of a `slices.SliceSet` keep their labels (`_keep_labelled`), and those slices' labels."""
    labels = read_labels(cc, data_path, slices.sources, slices.levels, getattr(slices, "subjects", None))
    keep = _keep_labelled(cc, labels, len(set(slices.sources)))
    return keep, labels.subset(keep)


def label_slices(config: RunConfig, slices) -> tuple[np.ndarray, np.ndarray | None]:
    """The training images and their encoded conditions (None for an unconditional run).

    Reads the labels of a `slices.SliceSet`, leaves out or refuses unlabelled slices, fits the
    vocabulary into `config` unless it holds one (a resumed run keeps its own), and encodes them.
    """
    cc = config.condition
    if not cc.active:
        return slices.images, None
    keep, labels = labelled_subset(cc, config.data.path, slices)
    if not cc.fitted:
        fit_vocabulary(cc, labels)
        config.validate()  # the network's condition inputs follow the new vocabulary
    return slices.images[keep], encode_labels(cc, labels)


def inherit_vocabulary(config: RunConfig, saved: RunConfig, where: Path) -> None:
    """A resumed run keeps the vocabulary it was trained with (refitting on changed data could
    reorder classes under trained embeddings); its condition names must be the checkpoint's."""
    mine, theirs = config.condition, saved.condition
    if mine.names() != theirs.names():
        raise BrainfusionError(
            f"{where} was trained with the conditions {theirs.names()}, not {mine.names()}; resume with the same label settings."
        )
    if mine.fitted and (mine.classes, mine.stats) != (theirs.classes, theirs.stats):
        raise BrainfusionError(f"the condition vocabulary given differs from the one {where} was trained with; clear it to resume.")
    mine.classes, mine.stats = dict(theirs.classes), dict(theirs.stats)
    config.validate()


def encode_request(cc: ConditionConfig, condition: Request | None, n: int) -> torch.Tensor | None:
    """Network inputs (n, K) for a sampling request: one {name: value} for all n images, a list of
    n of them, or an already encoded (n, K) tensor. Names left out are NULL (not conditioned on)."""
    if condition is None:
        return None
    categorical, continuous = cc.names()
    names = categorical + continuous
    if not cc.fitted:
        raise BrainfusionError("this model was trained without conditions; sample it without a condition.")
    if isinstance(condition, torch.Tensor):
        if tuple(condition.shape) != (n, len(names)):
            raise BrainfusionError(f"the condition tensor has shape {tuple(condition.shape)}; give ({n}, {len(names)}) for {names}.")
        return condition.float()
    requests = [condition] * n if isinstance(condition, Mapping) else list(condition)
    if len(requests) != n:
        raise BrainfusionError(f"{len(requests)} conditions were given for {n} images; give one, or one per image.")
    out = np.full((n, len(names)), NULL)
    encoded: dict[tuple, np.ndarray] = {}
    for i, request in enumerate(requests):
        key = tuple(sorted((str(k), str(v)) for k, v in request.items()))
        if key not in encoded:
            encoded[key] = _encode_one(cc, request, names, len(categorical))
        out[i] = encoded[key]
    return torch.from_numpy(out.astype(np.float32))


def encode_guided_request(cc: ConditionConfig, condition: Request | None, n: int, guidance: float) -> torch.Tensor | None:
    """`encode_request` behind the checks every sampling front end needs (brainfusion's Pipeline, the
    diffusers export): a finite guidance scale, and one other than 1 only with a condition to guide towards."""
    if not math.isfinite(guidance):
        raise BrainfusionError(f"the guidance scale is {guidance}; give a finite number, e.g. 2.")
    if guidance != 1 and condition is None:
        raise BrainfusionError(f"a guidance scale of {guidance} needs a condition to guide towards; give one, or leave guidance at 1.")
    return encode_request(cc, condition, n)


def _encode_one(cc: ConditionConfig, request: Mapping[str, object], names: tuple[str, ...], n_categorical: int) -> np.ndarray:
    row = np.full(len(names), NULL)
    for name, value in request.items():
        if name not in names:
            raise BrainfusionError(f"condition '{name}' is unknown to this model; it knows {', '.join(names)}.")
        j = names.index(name)
        if j < n_categorical:
            classes = cc.classes[name]
            if str(value) not in classes:
                raise BrainfusionError(f"'{value}' is not a class of condition '{name}'; choose one of {', '.join(classes)}.")
            row[j] = classes.index(str(value))
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise BrainfusionError(f"condition '{name}' needs a finite number, got {value!r}.")
        mean, std = cc.stats[name]
        row[j] = (np.float64(number) - mean) / std
    return row


def drop_labels(cond: torch.Tensor, p: float, generator: torch.Generator, global_batch: int, offset: int) -> torch.Tensor:
    """Label dropout for classifier-free guidance (Ho & Salimans 2022): each slice's whole condition
    becomes NULL with probability p, so the same network learns the unconditional model; with more
    than one condition each is also dropped on its own with probability p, so any subset can be
    given at sampling. Drawn for the global batch (rank r takes rows offset..), so it depends on
    (seed, step) alone, as every other draw of a training step does."""
    u = torch.rand(global_batch, cond.shape[1] + 1, generator=generator)[offset : offset + len(cond)]
    drop = u[:, :1] < p
    if cond.shape[1] > 1:
        drop = drop | (u[:, 1:] < p)
    return torch.where(drop, torch.full_like(cond, NULL), cond)
