"""Where a latent run's spectrum distance comes from: its autoencoder's reconstructions beside its samples, by band.

    python benchmarks/spectrum_bands.py --heldout runs/bench_quality_256/data/heldout \
        --run runs/bench_quality_256/runs/latent_ae15 --n-real 500 --n 64

Prints, for the reconstructions of held-out slices and for the run's samples, the spectrum distance
to the held-out slices (evaluation's `spectrum_distance`) and the signed mean log10 power difference
in three bands of radii (cycles per image): below zero, too little power there. If the samples'
bands match the reconstructions', the U-Net reproduces its latents and the autoencoder sets the detail.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from brainfusion.config import DataConfig
from brainfusion.data.slices import load_slices
from brainfusion.diffusion.pipeline import Pipeline
from brainfusion.evaluation.metrics.distances import radial_power_spectrum, spectrum_distance
from brainfusion.training.train_autoencoder import reconstruct


def power(images: np.ndarray) -> np.ndarray:
    return radial_power_spectrum(torch.from_numpy(images).float()[:, None] / 255.0)[1]


def bands(p: np.ndarray, reference: np.ndarray, size: int) -> str:
    diff = np.log10(p + 1e-12) - np.log10(reference + 1e-12)
    edges = (0, size // 16, size // 4, size // 2)
    parts = [f"{lo + 1}-{hi}: {diff[lo:hi].mean():+.2f}" for lo, hi in zip(edges, edges[1:])]
    return f"distance {spectrum_distance(p, reference):.3f}; log10 power vs real, radii " + ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heldout", type=Path, required=True, help="folder of held-out slices")
    p.add_argument("--run", type=Path, required=True, help="a latent diffusion run (its autoencoder is the one it recorded)")
    p.add_argument("--n-real", type=int, default=500)
    p.add_argument("--n", type=int, default=64, help="samples, and reconstructions, to compare")
    p.add_argument("--seed", type=int, default=12345)
    args = p.parse_args(argv)
    pipe = Pipeline.from_checkpoint(args.run)
    size = pipe.config.data.image_size
    real = load_slices(DataConfig(path=str(args.heldout), split="train", image_size=size), progress=False).images
    real = real[np.random.default_rng(0).choice(len(real), min(args.n_real, len(real)), replace=False)]
    reference = power(real)
    print(f"reconstructions ({args.n}): {bands(power(reconstruct(pipe.decoder.ae, real[: args.n], pipe.device, None)), reference, size)}")
    print(f"samples ({args.n}): {bands(power(pipe(args.n, seed=args.seed)), reference, size)}")
    print(f"real, first {args.n}: {bands(power(real[: args.n]), reference, size)}")


if __name__ == "__main__":
    main()
