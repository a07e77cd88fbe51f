"""Noise conditioning augmentation in a cascade: which sampling level, and what it is worth.

    python benchmarks/bench_cascade_augment.py --work runs/bench_cascade \
        --base runs/bench_cascade/runs/up64_edm/checkpoints/ckpt_00001720.safetensors \
        --upsamplers augmented=runs/bench_cascade/runs/upsampler,plain=runs/upsampler_plain --levels 0,0.05,0.1,0.2 --n 500

The base's 64² slices are drawn once (seed 12345, as bench_quality.py draws them) and brought up to 256² by each
upsampler at each level (the level the low-resolution slice is noised to and the network is told; an upsampler
trained without augmentation, `train --augment-max 0`, only at 0), exactly as `Pipeline.use_upsampler` would.
Each set is scored against `--n` held-out slices of bench_quality.py's split in `--work` (Inception FID, FD_domain,
spectrum distance). `--autoguidance W` adds each upsampler guided by its run's kept halfway weights, and
`--base-autoguidance W` draws the base's slices guided too (Karras et al. 2024), as `sample --autoguidance` guides
a cascade (its base only). `--seed S` draws both stages with another seed, for a second sample of one figure.
Writes augment.json and augment.md in --work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from brainfusion.config import FAST_SAMPLER, FAST_STEPS, DataConfig
from brainfusion.data.slices import load_slices
from brainfusion.diffusion.pipeline import Pipeline
from brainfusion.evaluation.evaluate import EvalConfig, evaluate_images
from brainfusion.fileio import atomic_write_text
from brainfusion.images import save_grid
from brainfusion.seeding import derive_seed

SEED = 12345


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="a bench_quality.py --work folder (its data/heldout split)")
    p.add_argument("--base", required=True, help="the 64² base checkpoint")
    p.add_argument("--upsamplers", required=True, help="NAME=RUN,... upsampler runs to compare")
    p.add_argument("--levels", default="0,0.05,0.1,0.2", help="sampling levels for upsamplers trained with augmentation")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--autoguidance", type=float, default=1.0,
                   help="also upsample guided by each upsampler's kept halfway weights at this weight (1: not)")
    p.add_argument("--base-autoguidance", type=float, default=1.0,
                   help="draw the base's slices guided by --base-guide (default: its run's kept halfway weights) at this weight")
    p.add_argument("--base-guide", default=None, help="the base's guide checkpoint for --base-autoguidance")
    p.add_argument("--seed", type=int, default=SEED, help=f"the sampling seed of both stages (default {SEED}, bench_quality.py's)")
    args = p.parse_args(argv)
    upsamplers = {name: run for name, _, run in (spec.partition("=") for spec in args.upsamplers.split(","))}
    size = Pipeline.from_checkpoint(next(iter(upsamplers.values()))).config.data.image_size
    real = load_slices(DataConfig(path=str(args.work / "data" / "heldout"), image_size=size), progress=False).images
    real = real[np.random.default_rng(0).choice(len(real), min(args.n, len(real)), replace=False)]
    base = Pipeline.from_checkpoint(args.base)
    if args.base_autoguidance != 1:
        base.use_kept_guide(args.base_autoguidance, args.base_guide)
    t0 = time.monotonic()
    low = base(len(real), seed=args.seed, sampler=FAST_SAMPLER, steps=FAST_STEPS)
    print(f"{len(low)} base slices in {time.monotonic() - t0:.0f} s", flush=True)
    out = args.work / "augment.json"
    done = json.loads(out.read_text()) if out.is_file() else {}
    for name, run in upsamplers.items():
        up = Pipeline.from_checkpoint(run)
        trained = up.config.upsample.augment_max
        levels = [float(v) for v in args.levels.split(",")] if trained else [0.0]
        for level, weight in [(lv, w) for w in sorted({1.0, args.autoguidance}) for lv in levels]:
            key = (f"{name} @ {level:g}" + (f", autoguidance {weight:g}" if weight != 1 else "")
                   + (f", base autoguidance {args.base_autoguidance:g}" if args.base_autoguidance != 1 else "")
                   + (f", seed {args.seed}" if args.seed != SEED else ""))
            if key in done:
                continue
            up.guide = None
            if weight != 1:
                up.use_kept_guide(weight)
            t0 = time.monotonic()
            made = up.upscale(low, seed=derive_seed(args.seed, 3), augment=level)
            seconds = time.monotonic() - t0
            scores = evaluate_images(made, real, None, EvalConfig(resolution=size, inception=True, inception_samples=len(real),
                                                                  progress=False))["summary"]
            done[key] = {"upsampler": name, "run": run, "augment_max": trained, "level": level, "autoguidance": weight,
                         "base_autoguidance": args.base_autoguidance, "seed": args.seed, "n": len(real),
                         "seconds": seconds, **{k: scores.get(k) for k in ("FID_inception", "FD_domain", "spectrum_distance")}}
            atomic_write_text(out, json.dumps(done, indent=2))
            tag = ((f"_ag{weight:g}" if weight != 1 else "") + (f"_base_ag{args.base_autoguidance:g}" if args.base_autoguidance != 1 else "")
                   + (f"_seed{args.seed}" if args.seed != SEED else ""))
            save_grid(made[:16], args.work / "grids" / f"augment_{name}_{level:g}{tag}.png")
            print(f"{key}: FID {done[key]['FID_inception']:.1f}, FD_domain {done[key]['FD_domain']:.3f}, "
                  f"spectrum {done[key]['spectrum_distance']:.3f}", flush=True)
    rows = ["| upsampler | trained up to | sampling level | autoguidance | base autoguidance | seed | FID | FD_domain | spectrum |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {r['upsampler']} | {r['augment_max']:g} | {r['level']:g} | {r.get('autoguidance', 1):g} | "
             f"{r.get('base_autoguidance', 1):g} | {r.get('seed', SEED)} | {r['FID_inception']:.1f} | {r['FD_domain']:.3f} | "
             f"{r['spectrum_distance']:.3f} |" for r in done.values()]
    atomic_write_text(args.work / "augment.md", "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
