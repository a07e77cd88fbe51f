"""Does a conditional generator make slices of the class it is asked for, and real-looking ones?

    generate = lambda n, c: pipe(n, seed=0, condition={"class": names[c]}, guidance=3.0)  # any callable
    report = check_conditional({"guidance 3": generate}, classifier, heldout, heldout_labels, names,
                               n_per_class=100, reference=train, reference_labels=train_labels)
    print(conditional_table(report))

For every generator (one per guidance scale, say) and class c it asks for `n_per_class` slices of c
and reports:

* **hit rate**: the share the classifier (`brainfusion.evaluation.classifier`) assigns to c. It is read beside
  the classifier's own recall of c on held-out *real* slices, which is what a generator of new,
  correct slices of unseen subjects can expect: on the development slices, split by subject blocks,
  that is far from 100 % (balanced accuracy 0.46 at 64x64, chance 0.25), so a hit rate equal to it
  is full marks. With `reference` (the judge's and generator's training slices) its recall there is
  reported too: a generator that copies training slices scores that instead (with copies: 76 % mean
  hit rate against 45 % on held-out slices, `bench_augment.py --checks 100`), so a hit rate well
  above the held-out recall means training-like slices, not better ones.
* **FD_domain per class** (and the rest of `evaluate.quick_metrics`: KID, spectrum, histogram,
  within-set MS-SSIM), against c's held-out real slices. With `reference` (the training slices) the
  same numbers are computed for c's real training slices, at the same image count: the floor a
  generator that reproduced its training data would reach. FD is biased upward at small n and the
  rare class has few held-out slices (10 ModerateDemented at a 20 % hold-out), so compare a class's
  FD only with its own floor, never across classes.

`class_generator` makes a generator of a conditional `pipeline.Pipeline` at one guidance scale
(`conditional_eval` runs these checks on a checkpoint for `brainfusion evaluate --conditional`).
`resampling_generator` stands in for a conditional model (it draws real slices of the class asked
for), so the checks can be tested and run before one exists, and it is the "balance by copying"
baseline of `benchmarks/bench_augment.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..errors import BrainfusionError
from ..seeding import derive_seed
from .classifier import SliceCNN, predict
from .evaluate import EvalConfig, quick_metrics
from .metrics.classification import classification_scores
from .metrics.features import check_images

Generator = Callable[[int, int], np.ndarray]  # (n, class index) -> uint8 (n, H, W)
FD_KEYS = ("FD_domain", "KID_domain", "spectrum_distance", "histogram_w1", "msssim_gen", "msssim_real")


def resampling_generator(images: np.ndarray, labels, seed: int = 0) -> Generator:
    """A stand-in `generate(n, c)`: n real slices of class c drawn with replacement (seeded by seed and c)."""
    images, labels = check_images(images, "resampled", min_count=1), np.asarray(labels)

    def generate(n: int, class_index: int) -> np.ndarray:
        pool = np.flatnonzero(labels == class_index)
        if len(pool) == 0:
            raise BrainfusionError(f"there are no real slices of class {class_index} to resample; pass a set holding that class.")
        rng = np.random.default_rng(derive_seed(seed, class_index))
        return images[rng.choice(pool, n, replace=True)]

    return generate


def class_generator(pipe: Callable[..., np.ndarray], column: str, class_names: Sequence[str], guidance: float, seed: int = 0,
                    **sampling) -> Generator:
    """`generate(n, c)` of a conditional `pipeline.Pipeline`: n slices asked for class c of condition `column` at
    guidance scale `guidance`. Class c draws its noise from seed (seed, c), the same at every scale, so the scales
    are compared image by image; `sampling` goes to the pipeline (sampler, steps, batch_size)."""

    def generate(n: int, class_index: int) -> np.ndarray:
        return pipe(n, seed=derive_seed(seed, class_index), condition={column: class_names[class_index]}, guidance=guidance, **sampling)

    return generate


def _call(generate: Generator, n: int, class_index: int, name: str) -> np.ndarray:
    images = check_images(generate(n, class_index), f"{name} (class {class_index})", min_count=1)
    if len(images) != n:
        raise BrainfusionError(f"generator {name!r} returned {len(images)} images for class {class_index}, not the {n} asked for; fix its batching.")
    return images


def _distances(images: np.ndarray, real: np.ndarray, config: EvalConfig) -> dict:
    """quick_metrics' numbers, or Nones when either set has fewer than 2 images."""
    if min(len(images), len(real)) < 2:
        return {k: None for k in FD_KEYS}
    metrics = quick_metrics(images, real, config)
    return {k: metrics[k] for k in FD_KEYS}


def _check_generator(name: str, generate: Generator, classifier: SliceCNN, real_by_class: list[np.ndarray],
                     n_fd: list[int], n_per_class: int, class_names: Sequence[str], config: EvalConfig) -> dict:
    asked, predicted, rows = [], [], []
    for c, cname in enumerate(class_names):
        images = _call(generate, n_per_class, c, name)
        probs = predict(classifier, images)
        hits = probs.argmax(1)
        asked.append(np.full(len(hits), c))
        predicted.append(hits)
        rows.append({
            "class": cname, "n": n_per_class, "hit_rate": float(np.mean(hits == c)),
            "mean_probability": float(probs[:, c].mean()),
            "classified_as": np.bincount(hits, minlength=len(class_names)).tolist(),
            "n_fd": min(n_fd[c], n_per_class), "n_real": len(real_by_class[c]),
            **_distances(images[: n_fd[c]], real_by_class[c], config),
        })
    scores = classification_scores(np.concatenate(asked), np.concatenate(predicted), len(class_names))
    return {"per_class": rows, "mean_hit_rate": scores["balanced_accuracy"], "macro_f1": scores["macro_f1"],
            "confusion_matrix": scores["confusion_matrix"]}


def check_conditional(generators: Mapping[str, Generator] | Generator, classifier: SliceCNN, heldout: np.ndarray,
                      heldout_labels, class_names: Sequence[str], n_per_class: int = 100, reference: np.ndarray | None = None,
                      reference_labels=None, eval_config: EvalConfig | None = None) -> dict:
    """Per-class hit rate and per-class distances of each generator, beside the classifier's held-out scores."""
    if callable(generators):
        generators = {"generator": generators}
    if not generators or n_per_class < 2:
        raise BrainfusionError(f"check_conditional needs at least one generator and n_per_class >= 2, not {len(generators)} and {n_per_class}.")
    heldout, heldout_labels = check_images(heldout, "held-out real", min_count=1), np.asarray(heldout_labels)
    if heldout_labels.shape != (len(heldout),):
        raise BrainfusionError(f"heldout_labels has shape {heldout_labels.shape}; give one class index per held-out image ({len(heldout)}).")
    k = len(class_names)
    config = eval_config or EvalConfig(progress=False, kid_subsets=50)
    real_by_class = [heldout[heldout_labels == c] for c in range(k)]
    own = classification_scores(heldout_labels, predict(classifier, heldout).argmax(1), k)
    n_fd, floor, on_reference = [n_per_class] * k, None, None
    if reference is not None:
        ref_labels = np.asarray(reference_labels)
        on_reference = classification_scores(ref_labels, predict(classifier, reference).argmax(1), k)
        ref_by_class = [reference[ref_labels == c] for c in range(k)]
        n_fd = [min(n_per_class, len(r)) for r in ref_by_class]
        rng = np.random.default_rng(config.seed)
        floor = [{"class": name, "n_fd": n_fd[c], **_distances(
                  ref_by_class[c][np.sort(rng.choice(len(ref_by_class[c]), n_fd[c], replace=False))], real_by_class[c], config)}
                 for c, name in enumerate(class_names)]
    results = {name: _check_generator(name, gen, classifier, real_by_class, n_fd, n_per_class, class_names, config)
               for name, gen in generators.items()}
    return {"class_names": list(class_names), "n_per_class": n_per_class, "classifier_heldout": own,
            "classifier_reference": on_reference, "reference_floor": floor, "generators": results}


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def conditional_table(report: dict) -> str:
    """Markdown: one row per generator and class, the classifier's real-slice recall and the FD floor beside."""
    own, ref = report["classifier_heldout"], report["classifier_reference"] or {}
    recall, ref_recall = own["recall_per_class"], ref.get("recall_per_class") or [None] * len(report["class_names"])
    floor = report["reference_floor"] or [{} for _ in report["class_names"]]
    lines = ["| generator | class | classified as asked | classifier recall: held-out real | training slices | "
             "FD_domain (n) | FD floor, training slices |", "|---|---|---|---|---|---|---|"]
    for name, result in report["generators"].items():
        for c, row in enumerate(result["per_class"]):
            lines.append(f"| {name} | {row['class']} | {row['hit_rate']:.1%} | {_fmt(recall[c], '.1%')} | {_fmt(ref_recall[c], '.1%')} | "
                         f"{_fmt(row['FD_domain'], '.3f')} ({row['n_fd']}) | {_fmt(floor[c].get('FD_domain'), '.3f')} |")
        lines.append(f"| {name} | **mean over classes** | **{result['mean_hit_rate']:.1%}** | "
                     f"**{own['balanced_accuracy']:.1%}** | **{_fmt(ref.get('balanced_accuracy'), '.1%')}** | | |")
    return "\n".join(lines) + "\n"
