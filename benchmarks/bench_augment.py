"""Do generated slices help a diagnosis classifier? Train on real, real + generated, generated; test on held-out real.

    python benchmarks/bench_augment.py --data ../shared/data/kaggle-alzheimer-mri-train \
        --work runs/bench_augment --generator real-copies --arms real,balanced --seeds 0,1,2
    python benchmarks/bench_augment.py --data ... --checkpoint runs/conditional --guidance 3 --checks 100

1. Split as `bench_quality.py` does (its `split_blocks`): the last `--holdout` share of every class
   folder, by file number, is held out as one block, because neighbouring numbers are the same subject.
2. Arms, each trained with `--seeds` seeds for the same `--steps` optimiser steps (equal compute),
   without the classifier's own class balancing (`balance="none"`, the arms balance the data):
   * `real`: the real training slices as they are (2,048 NonDemented to 42 ModerateDemented);
   * `real-sampler`: the same slices with the classifier's class-balanced sampling (its default);
   * `balanced`: real slices plus generated ones, per class up to the largest class's count;
   * `generated`: `--gen-per-class` generated slices per class and nothing real.
3. The generator is a conditional checkpoint (`--checkpoint RUN_OR_CKPT --guidance G`) or
   `--generator real-copies`, which "generates" by drawing real training slices of the class with
   replacement. Copies are the baseline an honest reader needs: generated slices only add something
   if `balanced` beats `balanced` with real copies. Generated sets are made once (`--gen-seed`) and
   cached in `<work>/generated/`, so the seed spread is the classifier's.
4. Every arm is scored on all held-out real slices: balanced accuracy and macro-F1 (mean ± sample
   standard deviation over seeds), per-class recall, and the confusion matrix.
   `--checks N` also runs `conditional_checks` (N slices per class) with the first seed's
   `real-sampler` classifier (trained first if that arm was not asked for).

Measured (real-copies, 64x64, 600 steps, seeds 0-2, OMP_NUM_THREADS=1 on the shared 2-core box, 8 min
in all, 38-44 s per training; 1,023 held-out slices): balanced accuracy / macro-F1 real as is
0.309 ± 0.019 / 0.291 ± 0.029; class-balanced sampling 0.457 ± 0.010 / 0.494 ± 0.013; real + copies
to balance 0.429 ± 0.035 / 0.467 ± 0.043; copies only 0.457 ± 0.023 / 0.491 ± 0.021. Balancing is
worth +0.15 and copying is the same as balanced sampling within the spread: that is the bar a
generator has to clear.

Outputs in --work: results.json, augment.md (the table), confusion.png (mean row-normalised confusion
matrix of each arm), classifiers/<arm>.safetensors (the first seed's), conditional.md with --checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from brainfusion.evaluation.classifier import ClassifierConfig, predict, save_classifier, train_classifier
from brainfusion.evaluation.conditional_checks import Generator, check_conditional, class_generator, conditional_table, resampling_generator
from brainfusion.data.conditions import read_labels
from brainfusion.config import FOLDER_COLUMN, FOLDER_LABELS, ConditionConfig, DataConfig
from brainfusion.data.slices import load_slices
from brainfusion.fileio import atomic_output, atomic_write_text
from brainfusion.images import save_figure
from brainfusion.evaluation.metrics.classification import classification_scores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import split_blocks  # noqa: E402 - the one definition of the subject-block split

ARMS = ("real", "real-sampler", "balanced", "generated")


def arm_label(arm: str, generator: str) -> str:
    generator = "real copies" if generator == "real-copies" else "generated"
    return {"real": "real, as is", "real-sampler": "real, class-balanced sampling",
            "balanced": f"real + {generator} to balance", "generated": f"{generator} only"}[arm]


def load_labelled(folder: Path, size: int, class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Slices of `folder`'s class sub-folders at size×size, their class indices, and the sorted class names."""
    slices = load_slices(DataConfig(path=str(folder), split="train", image_size=size), progress=False)
    labels = read_labels(ConditionConfig(labels=FOLDER_LABELS), folder, slices.sources)  # class = first folder, as training reads it
    if problem := next((p for p in labels.problems if p), None):
        raise SystemExit(f"a slice {problem}; put every slice in a folder named after its class.")
    found = labels.categorical[FOLDER_COLUMN]
    class_names = class_names or sorted(set(found))
    return slices.images, np.array([class_names.index(f) for f in found]), class_names


def checkpoint_generator(checkpoint: str, guidance: float, class_names: list[str], seed: int) -> Generator:
    """`generate(n, c)` from a conditional checkpoint (conditional_checks.class_generator)."""
    from brainfusion.diffusion.pipeline import Pipeline

    return class_generator(Pipeline.from_checkpoint(checkpoint), FOLDER_COLUMN, class_names, guidance, seed)


def stored_sets(folder: Path) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{"g2": (images (classes, n, H, W), class names)} from `bench_gpu.py conditional`'s files in `folder`."""
    sets: dict[str, list] = {}
    for file in sorted(folder.glob("cond_g*_*.npz")):
        with np.load(file) as z:
            entry = sets.setdefault(file.stem.split("_")[1], [[], []])
            entry[0].append(z["images"])
            entry[1] += [str(c) for c in z["classes"]]
    if (folder / "cond_curve.npz").is_file():
        with np.load(folder / "cond_curve.npz") as z:
            for key in (k for k in z.files if k.startswith("g")):
                sets[key] = [[z[key]], [str(c) for c in z["classes"]]]
    if not sets:
        raise SystemExit(f"{folder} holds no cond_g*.npz sets; make them with `bench_gpu.py conditional`.")
    return {k: (np.concatenate(v[0]), v[1]) for k, v in sets.items()}


def stored_generator(images: np.ndarray, stored_names: list[str], class_names: list[str]) -> Generator:
    """`generate(n, c)`: the first n stored slices of class c (image i is image i of the class's seed)."""

    def generate(n: int, class_index: int) -> np.ndarray:
        stock = images[stored_names.index(class_names[class_index])]
        if n > len(stock):
            raise SystemExit(f"the stored set holds {len(stock)} slices of {class_names[class_index]}, {n} asked for.")
        return stock[:n]

    return generate


def generated_set(args, train: np.ndarray, labels: np.ndarray, names: list[str], counts: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """counts[c] generated slices of each class c, cached in <work>/generated/ by generator and counts."""
    tag = {"real-copies": "real-copies", "stored": f"{args.stored}|{args.guidance}"}.get(
        args.generator, f"{Path(str(args.checkpoint)).resolve()}|{args.guidance}")
    key = hashlib.sha256(json.dumps([tag, str(args.data.resolve()), args.holdout, args.gen_seed, args.size, sorted(counts.items())]).encode()).hexdigest()[:12]
    path = args.work / "generated" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return stored["images"], stored["labels"]
    generate = make_generator(args, train, labels, names)
    t0 = time.perf_counter()
    parts = [(generate(n, c), np.full(n, c)) for c, n in counts.items() if n > 0]
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, args.size, args.size), np.uint8)
    out = images, np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, int)
    print(f"generated {len(images)} slices ({args.generator}) in {time.perf_counter() - t0:.0f} s", flush=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, images=out[0], labels=out[1], tag=tag)
    return out


def arm_data(arm: str, args, train: np.ndarray, labels: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(labels, minlength=len(names))
    if arm in ("real", "real-sampler"):
        return train, labels
    if arm == "balanced":
        gx, gy = generated_set(args, train, labels, names, {c: int(counts.max() - n) for c, n in enumerate(counts)})
        return np.concatenate([train, gx]), np.concatenate([labels, gy])
    per_class = args.gen_per_class or int(counts.max())
    return generated_set(args, train, labels, names, {c: per_class for c in range(len(names))})


def run_arm(arm: str, args, data, held: np.ndarray, held_labels: np.ndarray, k: int) -> dict:
    x, y = data
    runs = []
    for seed in args.seeds:
        config = ClassifierConfig(resolution=args.size, steps=args.steps, balance="sampler" if arm == "real-sampler" else "none")
        model = train_classifier(x, y, k, seed=seed, config=config)
        scores = classification_scores(held_labels, predict(model, held).argmax(1), k)
        runs.append({**scores, "seed": seed, "train_seconds": model.info["seconds"]})
        if seed == args.seeds[0]:
            save_classifier(model, args.work / "classifiers" / f"{arm}.safetensors")
        print(f"{arm} seed {seed}: balanced accuracy {scores['balanced_accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f} "
              f"({model.info['seconds']:.0f} s)", flush=True)
    summary = {m: [float(np.mean([r[m] for r in runs])), float(np.std([r[m] for r in runs], ddof=1)) if len(runs) > 1 else 0.0]
               for m in ("balanced_accuracy", "macro_f1", "accuracy", "train_seconds")}
    recall = np.array([[np.nan if v is None else v for v in r["recall_per_class"]] for r in runs])
    return {"arm": arm, "n_train": int(len(x)), "train_class_counts": np.bincount(y, minlength=k).tolist(),
            "summary": summary, "recall_per_class_mean": np.nanmean(recall, 0).tolist(), "runs": runs}


def markdown(results: dict, names: list[str], args) -> str:
    short = [n.replace("Demented", "") or n for n in names]
    lines = [f"Generator: {results['generator']}; classifier: {args.steps} steps at {args.size}×{args.size}, seeds "
             f"{', '.join(map(str, args.seeds))} (mean ± sample s.d.); test: {results['n_heldout']} held-out real slices.", "",
             "| arm | training slices | balanced accuracy | macro-F1 | " + " | ".join(f"recall {s}" for s in short) + " | s per training |",
             "|---|---|---|---|" + "---|" * len(names) + "---|"]
    for arm, r in results["arms"].items():
        s = r["summary"]
        cells = " | ".join(f"{v:.2f}" for v in r["recall_per_class_mean"])
        lines.append(f"| {arm_label(arm, results['generator'])} | {r['n_train']} | {s['balanced_accuracy'][0]:.3f} ± {s['balanced_accuracy'][1]:.3f} | "
                     f"{s['macro_f1'][0]:.3f} ± {s['macro_f1'][1]:.3f} | {cells} | {s['train_seconds'][0]:.0f} |")
    return "\n".join(lines) + "\n"


def plot_confusions(results: dict, names: list[str], path: Path) -> Path:
    """One panel per arm: the seed-mean confusion matrix, each row divided by its class's held-out count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"].items())
    short = [n.replace("Demented", "") or n for n in names]
    fig, axes = plt.subplots(1, len(arms), figsize=(3.6 * len(arms), 3.6), dpi=120, squeeze=False)
    for ax, (arm, r) in zip(axes[0], arms):
        mats = np.array([run["confusion_matrix"] for run in r["runs"]], dtype=float).mean(0)
        share = mats / np.maximum(mats.sum(1, keepdims=True), 1)
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{share[i, j]:.0%}", ha="center", va="center", fontsize=8, color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(names)), short, rotation=30, fontsize=8)
        ax.set_yticks(range(len(names)), short, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_title(f"{arm_label(arm, results['generator'])}\nbalanced accuracy {r['summary']['balanced_accuracy'][0]:.2f}", fontsize=9)
    axes[0][0].set_ylabel("true (held-out real)")
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches="tight")


def run_checks(args, train, labels, held, held_labels, names) -> None:
    """conditional_checks with the real-sampler classifier of the first seed."""
    from brainfusion.evaluation.classifier import load_classifier

    path = args.work / "classifiers" / "real-sampler.safetensors"
    model = load_classifier(path) if path.is_file() else train_classifier(train, labels, len(names), seed=args.seeds[0],
                                                                          resolution=args.size, steps=args.steps)
    if args.generator == "stored":  # every stored guidance scale, side by side
        generators = {f"guidance {k[1:]}": stored_generator(x, stored, names) for k, (x, stored) in sorted(stored_sets(args.stored).items())}
    else:
        generators = {results_name(args): make_generator(args, train, labels, names)}
    report = check_conditional(generators, model, held, held_labels, names, args.checks, train, labels)
    atomic_write_text(args.work / "conditional.json", json.dumps(report, indent=2))
    atomic_write_text(args.work / "conditional.md", conditional_table(report))
    print(conditional_table(report))


def make_generator(args, train: np.ndarray, labels: np.ndarray, names: list[str]) -> Generator:
    if args.generator == "real-copies":
        return resampling_generator(train, labels, seed=args.gen_seed)
    if args.generator == "stored":
        images, stored = stored_sets(args.stored)[f"g{args.guidance:g}"]
        return stored_generator(images, stored, names)
    return checkpoint_generator(args.checkpoint, args.guidance, names, args.gen_seed)


def results_name(args) -> str:
    source = {"real-copies": "real-copies", "stored": f"stored sets in {args.stored}"}.get(args.generator, str(args.checkpoint))
    return source if args.generator == "real-copies" else f"{source} (guidance {args.guidance:g})"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder of class folders of numbered slices")
    p.add_argument("--work", type=Path, default=Path("runs/bench_augment"))
    p.add_argument("--generator", choices=("checkpoint", "real-copies", "stored"), default="checkpoint")
    p.add_argument("--stored", type=Path, help="with --generator stored: a folder of `bench_gpu.py conditional` sets")
    p.add_argument("--checkpoint", help="a conditional run folder or ckpt_*.safetensors (with --generator checkpoint)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--arms", default="real,balanced,generated", help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=ClassifierConfig.steps, help="classifier optimiser steps per training")
    p.add_argument("--size", type=int, default=64, help="slice size for loading, generating and classifying")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--gen-per-class", type=int, default=0, help="generated-only arm: slices per class (0: largest class count)")
    p.add_argument("--gen-seed", type=int, default=0)
    p.add_argument("--checks", type=int, default=0, help="also run conditional_checks with this many slices per class")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.arms = [a for a in args.arms.split(",") if a]
    if bad := [a for a in args.arms if a not in ARMS]:
        p.error(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    if args.generator == "checkpoint" and not args.checkpoint and (set(args.arms) & {"balanced", "generated"} or args.checks):
        p.error("give --checkpoint RUN_OR_CKPT, or --generator real-copies for the copying baseline")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    t_start = time.perf_counter()
    train_dir, held_dir = split_blocks(args.data, args.work / "data", args.holdout)
    train, labels, names = load_labelled(train_dir, args.size)
    held, held_labels, _ = load_labelled(held_dir, args.size, names)
    print(f"{len(train)} training slices {np.bincount(labels).tolist()}, {len(held)} held-out {np.bincount(held_labels).tolist()}, classes {names}")
    results = {"generator": results_name(args), "class_names": names, "n_heldout": int(len(held)),
               "heldout_class_counts": np.bincount(held_labels, minlength=len(names)).tolist(), "args": {
                   k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "arms": {}}
    for arm in args.arms:
        results["arms"][arm] = run_arm(arm, args, arm_data(arm, args, train, labels, names), held, held_labels, len(names))
        atomic_write_text(args.work / "results.json", json.dumps(results, indent=2))
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_text(args.work / "results.json", json.dumps(results, indent=2))
    atomic_write_text(args.work / "augment.md", markdown(results, names, args))
    plot_confusions(results, names, args.work / "confusion.png")
    print(markdown(results, names, args))
    if args.checks:
        run_checks(args, train, labels, held, held_labels, names)
    print(f"total {time.perf_counter() - t_start:.0f} s; outputs in {args.work}")


if __name__ == "__main__":
    main()
