"""Where does the texture error come from? Two diagnostics for trained checkpoints.

    python benchmarks/diagnose_quality.py levels  --checkpoints runs/a,runs/b --real DIR --train DIR --out DIR
    python benchmarks/diagnose_quality.py samplers --checkpoint runs/a --real DIR --out DIR \
        --samplers ddpm-1000,ddim-50,dpm++-25,dpm++sde-25,heun-18 --n 256

`levels`: the denoising error RMS(D(x₀ + σn, σ) − x₀) in image units (x₀ in [-1, 1]) at 12 noise
levels σ from 0.01 to 80, on held-out and on training slices, for each checkpoint. One measure for
both formulations (a VP model is read at the timestep whose σ_t is nearest), so the curves show at
which noise levels one recipe denoises worse than another; held-out above training means overfitting.
`samplers`: the same network sampled by several samplers, each scored against held-out slices
(Inception FID at n vs n, FD_domain, spectrum distance) with its wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from brainfusion.fileio import atomic_write_text
from brainfusion.config import DataConfig
from brainfusion.data.channels import to_model_range
from brainfusion.data.slices import load_slices
from brainfusion.diffusion.process import make_process
from brainfusion.evaluation.evaluate import EvalConfig, evaluate_images
from brainfusion.diffusion.pipeline import Pipeline
from brainfusion.seeding import seeded_generator

LEVELS = np.geomspace(0.01, 80, 12)


@torch.no_grad()
def denoising_error(pipe: Pipeline, images: np.ndarray, sigma: float, batch: int = 128) -> float:
    denoise = make_process(pipe.config.diffusion).denoiser(pipe.network)
    x0 = to_model_range(torch.from_numpy(images))
    noise = torch.randn(x0.shape, generator=seeded_generator(0, int(sigma * 1000)))
    err = [(denoise(x0[i:i + batch] + sigma * noise[i:i + batch], sigma) - x0[i:i + batch]).square().sum()
           for i in range(0, len(x0), batch)]
    return float((sum(err) / x0.numel()).sqrt())


def _label(ckpt: Path) -> str:
    """run-folder/step, e.g. edm/1360, for checkpoints of several runs."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return f"{run.name}/{int(ckpt.stem[5:])}" if ckpt.stem.startswith("ckpt_") else ckpt.name


def levels(args, real: np.ndarray, train: np.ndarray) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for ckpt in args.checkpoints.split(","):
        pipe = Pipeline.from_checkpoint(ckpt)
        held = [denoising_error(pipe, real, s) for s in LEVELS]
        seen = [denoising_error(pipe, train, s) for s in LEVELS]
        out[ckpt] = {"sigma": LEVELS.tolist(), "heldout_rms": held, "train_rms": seen}
        name = _label(Path(ckpt))
        line, = ax.plot(LEVELS, held, marker="o", label=f"{name} held-out")
        ax.plot(LEVELS, seen, ls=":", c=line.get_color(), label=f"{name} training")
        print(ckpt, " ".join(f"σ={s:.3g}:{h:.4f}/{t:.4f}" for s, h, t in zip(LEVELS, held, seen)), flush=True)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise level σ")
    ax.set_ylabel("RMS denoising error (x₀ in [-1, 1])")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "denoising_error.png")
    return out


def samplers(args, real: np.ndarray, train: np.ndarray) -> dict:
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    out = {}
    for spec in args.samplers.split(","):
        name, steps = spec.rsplit("-", 1)
        t0 = time.monotonic()
        images = pipe(args.n, seed=7, sampler=name, steps=int(steps))
        seconds = time.monotonic() - t0
        summary = evaluate_images(images, real[: args.n], train, EvalConfig(inception=True, inception_samples=args.n,
                                                                          progress=False))["summary"]
        out[spec] = {**summary, "seconds": seconds}
        print(f"{spec}: FID {summary['FID_inception']:.1f}  FD_domain {summary['FD_domain']:.3f}  "
              f"spectrum {summary['spectrum_distance']:.3f}  {seconds:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("levels", "samplers"))
    p.add_argument("--checkpoints", default="")
    p.add_argument("--checkpoint", default="")
    p.add_argument("--real", type=Path, required=True)
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samplers", default="ddpm-1000,ddim-50,dpm++-25,dpm++sde-25,heun-18")
    p.add_argument("--n", type=int, default=256)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load = lambda path: load_slices(DataConfig(path=str(path), split="train"), progress=False).images  # noqa: E731
    rng = np.random.default_rng(0)
    real, train = load(args.real), load(args.train)
    real, train = real[rng.permutation(len(real))], train[rng.choice(len(train), 1000, replace=False)]
    result = (levels if args.what == "levels" else samplers)(args, real[:1000] if args.what == "levels" else real, train)
    atomic_write_text(args.out / f"{args.what}.json", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
