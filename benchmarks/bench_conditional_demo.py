"""Does a conditional model obey slice level and ventricle size? Offline, on the demo data.

    python benchmarks/bench_conditional_demo.py --work runs/cond_demo --minutes 8

1. The demo set (`brainfusion data demo`): its labels.csv gives each subject's ventricle
   enlargement as a class (low/mid/high) and each slice's axial level.
2. A conditional model trained on its train split for `--minutes` (`--labels labels.csv
   --label-columns ventricles --slice-level`, the default EDM recipe).
3. Judges trained on the real training slices: a slice-level regressor and a 3-class ventricle
   classifier (evaluation/classifier.py). Their errors on real slices are printed beside,
   since a judge can only see what it can see on real slices. They are scored on 20 unseen demo
   subjects (`data demo --seed 101 --n-subjects 20`), as the README's demo evaluation is.
4. Generated slices at requested levels 0.2–0.8 and each ventricle class, at `--guidance`
   scales: level mean absolute error (level is in units of the brain's axial extent, 0 to 1) and
   the ventricle hit rate, plus the share of dark (CSF) pixels inside the brain's central box per
   requested class, which should rise from low to high.

Outputs in --work: conditional_demo.json and conditional_demo.md (the table), rows.png (one row per
ventricle class at level 0.5, then one per level).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from brainfusion.checkpoint import latest_checkpoint
from brainfusion.evaluation.classifier import predict, train_classifier, train_regressor
from brainfusion.data.conditions import read_labels
from brainfusion.config import ConditionConfig, DataConfig
from brainfusion.data.slices import load_slices
from brainfusion.fileio import atomic_write_text
from brainfusion.images import save_grid
from brainfusion.diffusion.pipeline import Pipeline
from brainfusion.seeding import derive_seed

LEVELS = (0.2, 0.35, 0.5, 0.65, 0.8)
CLASS_COLUMN = "ventricles"


def labelled(data: Path, split: str, size: int) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """Slices of an OASIS-layout split with their ventricle class and slice level."""
    slices = load_slices(DataConfig(path=str(data), split=split, image_size=size), progress=False)
    cc = ConditionConfig(labels=str(data / "labels.csv"), label_columns=(CLASS_COLUMN,), slice_level=True)
    labels = read_labels(cc, data, slices.sources, slices.levels)
    return slices.images, labels.categorical[CLASS_COLUMN], labels.continuous["level"]


def dark_share(images: np.ndarray, threshold: int = 60) -> np.ndarray:
    """Share of dark pixels in the central third of each slice (where the ventricles are), brain pixels only."""
    h, w = images.shape[1:]
    centre = images[:, h // 3: 2 * h // 3, w // 3: 2 * w // 3].astype(np.int16)
    return ((centre < threshold) & (centre > 5)).mean((1, 2))


def train_model(data: Path, run: Path, minutes: float, size: int) -> Path:
    if latest_checkpoint(run / "checkpoints") is None:
        cmd = [sys.executable, "-m", "brainfusion.cli", "--quiet", "train", "--data", str(data), "--out-dir", str(run),
               "--image-size", str(size), "--labels", str(data / "labels.csv"), "--label-columns", CLASS_COLUMN,
               "--slice-level", "--time-budget-min", str(minutes), "--sample-every", "0"]
        subprocess.run(cmd, check=True)
    return latest_checkpoint(run / "checkpoints")


def judges(data: Path, unseen: Path, size: int, steps: int):
    x, classes, levels = labelled(data, "train", size)
    found = {c for c in classes if c}
    names = [c for c in ("low", "mid", "high") if c in found] or sorted(found)
    y = np.array([names.index(c) for c in classes])
    classifier = train_classifier(x, y, len(names), seed=0, resolution=size, steps=steps)
    regressor = train_regressor(x, levels, seed=0, resolution=size, steps=steps)
    vx, vclasses, vlevels = labelled(unseen, "all", size)
    vy = np.array([names.index(c) for c in vclasses])
    real = {"class_accuracy": float((predict(classifier, vx).argmax(1) == vy).mean()),
            "level_mae": float(np.abs(predict(regressor, vx) - vlevels).mean()),
            "dark_share": {n: float(dark_share(vx[vy == i]).mean()) for i, n in enumerate(names)}}
    return classifier, regressor, names, real


def check(pipe: Pipeline, classifier, regressor, names: list[str], guidance: float, n: int) -> dict:
    out = {"guidance": guidance, "class_hit": {}, "dark_share": {}, "level_mae": {}}
    for i, name in enumerate(names):
        images = pipe(n, seed=derive_seed(1, i), condition={CLASS_COLUMN: name, "level": 0.5}, guidance=guidance)
        out["class_hit"][name] = float((predict(classifier, images).argmax(1) == i).mean())
        out["dark_share"][name] = float(dark_share(images).mean())
    for level in LEVELS:
        images = pipe(n, seed=derive_seed(2, round(level * 100)), condition={"level": level}, guidance=guidance)
        out["level_mae"][str(level)] = float(np.abs(predict(regressor, images) - level).mean())
    out["mean_class_hit"] = float(np.mean(list(out["class_hit"].values())))
    out["mean_level_mae"] = float(np.mean(list(out["level_mae"].values())))
    return out


def markdown(result: dict) -> str:
    real, names = result["real"], result["classes"]
    lines = [f"Model: {result['steps']} steps ({result['minutes']} min); {result['n']} samples per request; judges scored on "
             f"20 unseen demo subjects: ventricle class accuracy {real['class_accuracy']:.1%}, level MAE {real['level_mae']:.3f}.", "",
             "| guidance | ventricle hit rate | " + " | ".join(f"dark share {n}" for n in names) + " | level MAE |",
             "|---|---|" + "---|" * len(names) + "---|",
             "| real (unseen subjects) | – | " + " | ".join(f"{real['dark_share'][n]:.3f}" for n in names) + f" | {real['level_mae']:.3f} |"]
    for r in result["checks"]:
        lines.append(f"| {r['guidance']:g} | {r['mean_class_hit']:.1%} | " + " | ".join(f"{r['dark_share'][n]:.3f}" for n in names)
                     + f" | {r['mean_level_mae']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/cond_demo"))
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=64, help="samples per requested class or level")
    p.add_argument("--guidance", default="1,2")
    p.add_argument("--judge-steps", type=int, default=400)
    args = p.parse_args(argv)
    data = args.work / "data"
    if not (data / "labels.csv").is_file():
        subprocess.run([sys.executable, "-m", "brainfusion.cli", "--quiet", "data", "demo", "--out", str(data)], check=True)
    ckpt = train_model(data, args.work / "run", args.minutes, args.size)
    unseen = args.work / "unseen"
    if not (unseen / "labels.csv").is_file():
        subprocess.run([sys.executable, "-m", "brainfusion.cli", "--quiet", "data", "demo", "--out", str(unseen),
                        "--seed", "101", "--n-subjects", "20"], check=True)
    classifier, regressor, names, real = judges(data, unseen, args.size, args.judge_steps)
    pipe = Pipeline.from_checkpoint(ckpt)
    checks = [check(pipe, classifier, regressor, names, float(g), args.n) for g in args.guidance.split(",")]
    rows = [pipe(8, seed=7, condition={CLASS_COLUMN: name, "level": 0.5}, guidance=2.0) for name in names]
    rows += [pipe(8, seed=7, condition={CLASS_COLUMN: "mid", "level": level}, guidance=2.0) for level in LEVELS]
    save_grid(np.concatenate(rows), args.work / "rows.png", nrow=8)
    result = {"checkpoint": str(ckpt), "steps": int(ckpt.stem.split("_")[-1]), "minutes": args.minutes, "n": args.n,
              "classes": names, "real": real, "checks": checks}
    atomic_write_text(args.work / "conditional_demo.json", json.dumps(result, indent=2))
    atomic_write_text(args.work / "conditional_demo.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
