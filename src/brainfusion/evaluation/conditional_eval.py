"""`brainfusion evaluate --conditional`: does a conditional checkpoint make what it is asked for?

    pipe = Pipeline.from_checkpoint("runs/kaggle_cond")
    report = evaluate_conditional(pipe, LabelledData("data/train"), LabelledData("data/heldout"),
                                  ConditionalEvalConfig(guidance_scales=(0, 1, 2), n_per_class=100))
    write_conditional(report, "runs/eval")          # conditional.json and conditional.md

Both real sets are labelled as the run's training slices were, by the run's own `ConditionConfig`
(class folders, or its label table; `LabelledData.table` names another table, e.g. the held-out
set's). The judges are trained on the real training slices, so their errors on the real held-out
slices are the scale to read the generated slices' on (`conditional_checks`):

* a categorical condition (`class_column`, default the model's first): `classifier.train_classifier`,
  then `conditional_checks.check_conditional` with one generator per guidance scale;
* the slice level, where the model has that input: `classifier.train_regressor`, and its mean
  absolute error on slices generated at requested levels against its error on held-out real slices.

Seeds: class c draws its noise from (seed, c) and requested level j from (seed, 1, j), the same at
every guidance scale, so the scales are compared image by image; the judges train from `seed`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import FAST_SAMPLER, FAST_STEPS, FOLDER_LABELS, LEVEL_COLUMN, ConditionConfig
from ..data.conditions import SliceLabels, labelled_subset
from ..data.slices import load_set
from ..errors import BrainfusionError
from ..fileio import atomic_write_text
from ..seeding import derive_seed
from .classifier import ClassifierConfig, predict, train_classifier, train_regressor
from .conditional_checks import check_conditional, class_generator, conditional_table
from .evaluate import EvalConfig

log = logging.getLogger(__name__)


@dataclass
class ConditionalEvalConfig:
    guidance_scales: tuple[float, ...] = (0.0, 1.0, 2.0)  # one generator per scale
    n_per_class: int = 100  # generated slices per class, and per requested level, at each scale
    class_column: str = ""  # the categorical condition judged; "" = the model's first
    levels: tuple[float, ...] = (0.2, 0.35, 0.5, 0.65, 0.8)  # requested slice levels (models with the level input)
    judge_steps: int = 600  # optimiser steps of each judge (ClassifierConfig.steps)
    seed: int = 0
    sampler: str = FAST_SAMPLER
    steps: int = FAST_STEPS
    batch_size: int = 64
    image_size: int = 64  # real slices are read at this size; the judges see every set at it
    on_bad_file: str = "fail"
    device: str = "cpu"  # where the judges train

    def __post_init__(self):
        self.guidance_scales = tuple(float(g) for g in self.guidance_scales)
        if not self.guidance_scales or not all(math.isfinite(g) for g in self.guidance_scales):
            raise BrainfusionError(f"guidance_scales={','.join(map(str, self.guidance_scales)) or 'none'} must be finite numbers, e.g. 0,1,2.")
        if self.n_per_class < 2:
            raise BrainfusionError(f"n_per_class={self.n_per_class} is too few to judge a class by; give 2 or more, e.g. 100.")
        if self.judge_steps < 1:
            raise BrainfusionError(f"judge_steps={self.judge_steps} trains no judge; give 1 or more, e.g. 600.")
        if not all(0 <= v <= 1 for v in self.levels):
            raise BrainfusionError(f"the requested slice levels {self.levels} must lie in 0..1 (lowest to highest slice).")


@dataclass
class LabelledData:
    """A real set to label as the run's training slices were."""

    path: str
    split: str = "all"  # OASIS layout only (data.slices.load_set)
    table: str = ""  # a label table in place of the run's own (condition.labels), e.g. the held-out set's


@dataclass
class LabelledSet:
    images: np.ndarray
    labels: SliceLabels
    path: str


def labelled_set(cc: ConditionConfig, data: LabelledData, role: str, image_size: int, on_bad_file: str = "fail") -> LabelledSet:
    """The slices of `data` with their labels under the run's conditions; `role` ("real", "train") names the
    argument a fix needs (`real_labels=FILE`). Unlabelled slices are refused or left out by cc.on_missing_label."""
    if data.table:
        if cc.labels in ("", FOLDER_LABELS):
            raise BrainfusionError(f"{role}_labels={data.table} names a label table, but this model's conditions come from "
                                   f"{'class folders' if cc.labels else 'the slice level alone'}; leave it out.")
        if not Path(data.table).is_file():
            raise BrainfusionError(f"{role}_labels={data.table} does not exist; give the label table of the {role} set {data.path}.")
        cc = dataclasses.replace(cc, labels=str(data.table))
    elif cc.labels not in ("", FOLDER_LABELS) and not Path(cc.labels).is_file():
        raise BrainfusionError(f"the run's label table {cc.labels} does not exist here; give the table of the {role} set "
                               f"{data.path} with {role}_labels=FILE.")
    slices = load_set(data.path, data.split, image_size, on_bad_file)
    keep, labels = labelled_subset(cc, data.path, slices)
    return LabelledSet(slices.images[keep], labels, str(data.path))


def class_indices(cc: ConditionConfig, column: str, data: LabelledSet) -> np.ndarray:
    """Each slice's class index under the run's vocabulary; refuses classes the model does not know, and a set
    without a slice of each of its classes (a judge cannot learn, nor a recall be read for, a class never seen)."""
    names = cc.classes[column]
    values = data.labels.categorical[column]
    for source, value in zip(data.labels.sources, values):
        if value not in names:
            raise BrainfusionError(f"{source} has class {value!r} for condition '{column}', which the model does not know "
                                   f"({', '.join(names)}); leave it out of {data.path} or relabel it.")
    index = np.array([names.index(v) for v in values], dtype=np.int64)
    absent = [name for c, name in enumerate(names) if not (index == c).any()]
    if absent:
        raise BrainfusionError(f"{data.path} has no slice of class '{absent[0]}' (condition '{column}'); judging needs real "
                               f"slices of every class of the model ({', '.join(names)}).")
    return index


def _class_column(cc: ConditionConfig, wanted: str, where: str) -> str | None:
    """The categorical condition to judge (None: the slice level alone); refuses models with nothing to judge."""
    categorical, continuous = cc.names()
    if not cc.fitted:
        raise BrainfusionError(f"{where} is an unconditional model; the conditional checks need one trained with condition.labels "
                               "or condition.slice_level.")
    if wanted and wanted not in categorical:
        raise BrainfusionError(f"class_column={wanted} is not a categorical condition of this model; "
                               f"choose one of {', '.join(categorical) or 'none (it has only ' + ', '.join(continuous) + ')'}.")
    if not categorical and LEVEL_COLUMN not in continuous:
        raise BrainfusionError(f"{where}'s conditions ({', '.join(continuous)}) hold no class and no slice level to judge; "
                               "the conditional checks cover categorical conditions and the slice level.")
    return wanted or (categorical[0] if categorical else None)


def _name(guidance: float) -> str:
    return f"guidance {guidance:g}"


def _level_check(pipe, train: LabelledSet, heldout: LabelledSet, config: ConditionalEvalConfig, judge: ClassifierConfig,
                 sampling: dict) -> dict:
    """The regressor's mean absolute level error on slices generated at each requested level, beside its error on real ones."""
    log.info("slice level: training the regressor, then sampling %d slices at each of %d levels and %d guidance scales",
             config.n_per_class, len(config.levels), len(config.guidance_scales))
    regressor = train_regressor(train.images, train.labels.continuous[LEVEL_COLUMN], seed=config.seed, config=judge)

    def mae(images: np.ndarray, levels) -> float:
        return float(np.abs(predict(regressor, images) - levels).mean())

    generators = {}
    for g in config.guidance_scales:
        per_level = {}
        for j, level in enumerate(config.levels):
            images = pipe(config.n_per_class, seed=derive_seed(config.seed, 1, j), condition={LEVEL_COLUMN: level}, guidance=g, **sampling)
            per_level[f"{level:g}"] = mae(images, level)
        generators[_name(g)] = {"per_level": per_level, "mean_abs_error": float(np.mean(list(per_level.values())))}
    return {"levels": list(config.levels), "n_per_level": config.n_per_class, "generators": generators,
            "regressor_heldout_mae": mae(heldout.images, heldout.labels.continuous[LEVEL_COLUMN]),
            "regressor_train_mae": mae(train.images, train.labels.continuous[LEVEL_COLUMN]), "n_heldout": len(heldout.images)}


def evaluate_conditional(pipe, train: LabelledData, heldout: LabelledData, config: ConditionalEvalConfig | None = None,
                         eval_config: EvalConfig | None = None) -> dict:
    """The class checks (and the slice-level check, where the model has that input) of a conditional `Pipeline`."""
    config = config or ConditionalEvalConfig()
    cc = pipe.config.condition
    column = _class_column(cc, config.class_column, str(getattr(pipe, "checkpoint", "this model")))
    eval_config = eval_config or EvalConfig(resolution=config.image_size, seed=config.seed, progress=False, kid_subsets=50)
    train_set = labelled_set(cc, train, "train", config.image_size, config.on_bad_file)
    real_set = labelled_set(cc, heldout, "real", config.image_size, config.on_bad_file)
    judge = ClassifierConfig(resolution=config.image_size, steps=config.judge_steps, device=config.device)
    sampling = {"sampler": config.sampler, "steps": config.steps, "batch_size": config.batch_size}
    report = {"checkpoint": str(getattr(pipe, "checkpoint", "")), "class_column": column, "guidance_scales": list(config.guidance_scales),
              "sampling": sampling, "seed": config.seed, "judge_steps": config.judge_steps, "real": real_set.path,
              "train": train_set.path, "classes": None, "level": None}
    if column is not None:
        names = cc.classes[column]
        y_train, y_real = class_indices(cc, column, train_set), class_indices(cc, column, real_set)
        log.info("condition '%s': training the judge on %d slices, then sampling %d per class of %d at %d guidance scales",
                 column, len(y_train), config.n_per_class, len(names), len(config.guidance_scales))
        classifier = train_classifier(train_set.images, y_train, len(names), seed=config.seed, config=judge)
        generators = {_name(g): class_generator(pipe, column, names, g, config.seed, **sampling) for g in config.guidance_scales}
        report["classes"] = check_conditional(generators, classifier, real_set.images, y_real, names, config.n_per_class,
                                              train_set.images, y_train, eval_config)
    if LEVEL_COLUMN in cc.names()[1]:
        report["level"] = _level_check(pipe, train_set, real_set, config, judge, sampling)
    return report


def level_table(level: dict) -> str:
    """Markdown: the regressor's mean absolute level error per requested level and guidance scale, and on real slices."""
    lines = ["| generator | " + " | ".join(f"level {v:g}" for v in level["levels"]) + " | mean abs error | regressor on held-out real |",
             "|---|" + "---|" * (len(level["levels"]) + 2)]
    for name, result in level["generators"].items():
        lines.append(f"| {name} | " + " | ".join(f"{e:.3f}" for e in result["per_level"].values())
                     + f" | **{result['mean_abs_error']:.3f}** | {level['regressor_heldout_mae']:.3f} |")
    return "\n".join(lines) + "\n"


def conditional_markdown(report: dict) -> str:
    """The class table (conditional_checks.conditional_table) and the slice-level table, under one line saying what ran."""
    s = report["sampling"]
    parts = [(f"Conditional checks of `{report['checkpoint']}` ({s['sampler']}, {s['steps']} steps; judges trained "
              f"{report['judge_steps']} steps on `{report['train']}`, scored on held-out `{report['real']}`).\n")]
    if report["classes"] is not None:
        parts.append(f"Condition '{report['class_column']}', {report['classes']['n_per_class']} slices per class:\n\n"
                     + conditional_table(report["classes"]))
    if report["level"] is not None:
        parts.append(f"Slice level, {report['level']['n_per_level']} slices per requested level "
                     "(mean absolute error in units of the brain's axial extent):\n\n" + level_table(report["level"]))
    return "\n".join(parts)


def write_conditional(report: dict, out: Path | str) -> tuple[Path, Path]:
    """conditional.json and conditional.md in `out`, each written atomically."""
    out = Path(out)
    return (atomic_write_text(out / "conditional.json", json.dumps(report, indent=2)),
            atomic_write_text(out / "conditional.md", conditional_markdown(report)))
