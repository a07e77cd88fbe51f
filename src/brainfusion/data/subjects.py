"""Holding whole subjects out of training.

Neighbouring slices of one brain are near-copies, so a held-out set drawn slice by slice scores a
model on anatomy it has trained on. A run can instead keep whole subjects (SliceSet.subjects) out:
which ones is drawn from the run's seed alone (seeding key (seed, 4)), recorded in its config, and
kept when the run resumes, so evaluation can score against exactly those subjects later.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import DataConfig
from ..errors import BrainfusionError
from ..seeding import seeded_generator

HOLDOUT_KEY = 4  # seeding key of the subject draw (seeding.py lists the others)
NOT_PER_SLICE = ("skipped", "mask_values")  # SliceSet fields that are not one entry per slice


def holdout_count(amount: float, n_subjects: int) -> int:
    """`amount` ≥ 1 is a number of subjects, 0 < amount < 1 a share of them (at least one)."""
    if amount <= 0:
        return 0
    return int(amount) if amount >= 1 else max(1, round(amount * n_subjects))


def choose_heldout(subjects: list[str], amount: float, seed: int) -> tuple[str, ...]:
    """The subjects to hold out, drawn from `seed` alone over the sorted distinct IDs (so a file order
    or a resumed run does not change the choice), in sorted order."""
    distinct = sorted(set(subjects))
    count = holdout_count(amount, len(distinct))
    if count >= len(distinct):
        raise BrainfusionError(
            f"data.holdout_subjects={amount:g} would hold out {count} of the {len(distinct)} subjects in the data, leaving none "
            "to train on; hold out fewer subjects or add data."
        )
    order = torch.randperm(len(distinct), generator=seeded_generator(seed, HOLDOUT_KEY)).tolist()
    return tuple(sorted(distinct[i] for i in order[:count]))


def subset(slices, keep: np.ndarray):
    """The SliceSet of the slices where `keep` is true; every per-slice field (also ones added later) follows."""
    n = len(slices)
    changes = {}
    for f in dataclasses.fields(slices):
        value = getattr(slices, f.name)
        if f.name in NOT_PER_SLICE or value is None or not hasattr(value, "__len__") or len(value) != n:
            continue
        changes[f.name] = value[keep] if isinstance(value, np.ndarray) else [v for v, k in zip(value, keep) if k]
    return dataclasses.replace(slices, **changes)


def split_subjects(data: DataConfig, slices, seed: int):
    """(training slices, held-out slices) for `data.holdout_subjects`; records the held-out IDs in
    `data.heldout_subjects`, or keeps the ones already there (a resumed run's)."""
    if not data.holdout_subjects and not data.heldout_subjects:
        return slices, None
    if not data.heldout_subjects:
        data.heldout_subjects = choose_heldout(slices.subjects, data.holdout_subjects, seed)
    held = np.array([s in set(data.heldout_subjects) for s in slices.subjects], dtype=bool)
    if held.all():
        raise BrainfusionError(f"every slice of {data.path} belongs to a held-out subject (data.heldout_subjects); "
                               "hold out fewer subjects or add data.")
    return subset(slices, ~held), subset(slices, held)


def heldout_slices(data: DataConfig, image_size: int, on_bad_file: str = "fail"):
    """The slices of the subjects a run held out (`data.heldout_subjects` of its config), read from its data at
    `image_size`: the real set to score its samples against."""
    from .slices import load_slices

    if not data.heldout_subjects:
        raise BrainfusionError(f"the run held out no subjects of {data.path} (data.heldout_subjects is empty); "
                               "train with data.holdout_subjects to hold some out.")
    config = dataclasses.replace(data, image_size=image_size, on_bad_file=on_bad_file, holdout_subjects=0.0, heldout_subjects=())
    slices = load_slices(config, progress=False)
    held = np.isin(np.array(slices.subjects, dtype=str), np.array(data.heldout_subjects, dtype=str))
    if not held.any():
        raise BrainfusionError(f"none of the subjects the run held out ({', '.join(data.heldout_subjects)}) is in {data.path} "
                               "any more; restore them, or compare with other real slices.")
    return subset(slices, held)
