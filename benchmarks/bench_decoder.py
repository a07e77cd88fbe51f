"""Decoder fine-tunes at 256²: one set of sampled latents decoded through each decoder, scored as bench_quality scores.

    python benchmarks/bench_decoder.py --work runs/bench_quality_256 --checkpoint RUN/checkpoints/ckpt_00002340.safetensors \
        --decoders runs/bench_quality_256/runs/ae@15,runs/dec --autoguidance 2 --guide RUN/checkpoints/ckpt_00001170.safetensors

A decoder fine-tune (`train-autoencoder --decoder-of AE`) keeps AE's encoder, so the latent run's samples mean the
same to it; sampling once and decoding through each decoder isolates what the decoder changes. The held-out and
training slices are drawn as bench_quality draws them (seed 0) and so is the generation seed, so the row of the
run's own autoencoder repeats bench_quality's row for that checkpoint. Results go to <work>/decoder_results.json
under "LABEL@STEP" keys (LABEL: --label, with " agW" when guided, and the decoder's folder name).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench_quality import _load
from brainfusion.config import FAST_SAMPLER, FAST_STEPS
from brainfusion.data.channels import to_uint8
from brainfusion.diffusion.pipeline import Pipeline
from brainfusion.evaluation.evaluate import EvalConfig, evaluate_images
from brainfusion.fileio import atomic_write_text
from brainfusion.images import save_grid
from brainfusion.models.latent import LatentDecoder, use_decoder

GENERATION_SEED = 12345  # bench_quality.evaluate_checkpoint's


class KeepLatents:
    """A pipeline's decoder that also keeps every latent it decodes."""

    def __init__(self, inner: LatentDecoder):
        self.inner, self.kept = inner, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.kept.append(x.detach().clone())
        return self.inner(x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="a bench_quality --image-size 256 work folder (its data/ split)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a latent run's checkpoint")
    p.add_argument("--decoders", required=True, help="comma list of autoencoder runs: the run's own, and decoder fine-tunes of it")
    p.add_argument("--label", default="latent")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--autoguidance", type=float, default=1.0)
    p.add_argument("--guide", type=Path, help="the guide checkpoint (default: the one the run kept)")
    p.add_argument("--sampler", default=FAST_SAMPLER)
    p.add_argument("--steps", type=int, default=FAST_STEPS)
    args = p.parse_args(argv)

    real, train = _load(args.work / "data" / "heldout", 256), _load(args.work / "data" / "train", 256)
    real = real[np.random.default_rng(0).choice(len(real), min(args.n, len(real)), replace=False)]
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    if args.autoguidance != 1:
        pipe.use_kept_guide(args.autoguidance, args.guide)
    keeper = KeepLatents(pipe.decoder)
    pipe.decoder = keeper
    t0 = time.monotonic()
    own = pipe(len(real), seed=GENERATION_SEED, sampler=args.sampler, steps=args.steps)
    seconds = time.monotonic() - t0
    latents = torch.cat(keeper.kept)
    step = int(args.checkpoint.stem.split("_")[-1]) if args.checkpoint.stem.startswith("ckpt_") else -1
    out_path = args.work / "decoder_results.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    label = args.label + (f" ag{args.autoguidance:g}" if args.autoguidance != 1 else "")
    for decoder in args.decoders.split(","):
        config = copy.deepcopy(pipe.config)
        if Path(decoder).resolve() != Path(config.latent.autoencoder).resolve():
            use_decoder(config, decoder)
            images = to_uint8(LatentDecoder.load(config, pipe.device, pipe.dtype)(latents))
        else:
            images = own
        scores = evaluate_images(images, real, train, EvalConfig(resolution=256, inception=True, inception_samples=len(real),
                                                                 progress=False))["summary"]
        key = f"{label} {Path(decoder).name}@{step}"
        results[key] = {**scores, "checkpoint": str(args.checkpoint), "decoder": decoder, "autoguidance": args.autoguidance,
                        "guide": str(args.guide or "kept"), "n": len(real), "sampling_s": seconds}
        save_grid(images[:64], args.work / "grids" / f"{key.replace(' ', '_').replace('@', '_')}.png")
        atomic_write_text(out_path, json.dumps(results, indent=2))
        print(f"{key}: FID {scores['FID_inception']:.1f}, KID×10³ {scores['KID_inception'] * 1000:.1f}, FD_domain "
              f"{scores['FD_domain']:.3f}, spectrum {scores['spectrum_distance']:.3f}", flush=True)


if __name__ == "__main__":
    main()
