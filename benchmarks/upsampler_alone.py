"""The upsampler alone on held-out slices shrunk to 64², beside bicubic enlargement and the floor, at n slices:
    python benchmarks/upsampler_alone.py 300   (after bench_quality.py --recipes cascade in runs/bench_cascade)
"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "benchmarks")
from bench_quality import _load, upsample
from brainfusion import Pipeline
from brainfusion.data.channels import to_model_range, to_uint8
from brainfusion.diffusion.upsample import shrink
from brainfusion.evaluation.evaluate import EvalConfig, evaluate_images
from brainfusion.evaluation.metrics.distances import fidelity_inside_brain
from brainfusion.images import save_grid
N = int(sys.argv[1])
W = Path("runs/bench_cascade")
real = _load(W / "data" / "heldout", 256)
rng = np.random.default_rng(0)
real = real[rng.choice(len(real), min(1000, len(real)), replace=False)][:N]
train = _load(W / "data" / "train", 256)
low = to_uint8(shrink(to_model_range(torch.as_tensor(real)), 64))
config = EvalConfig(resolution=256, inception=True, inception_samples=N, progress=False)
out = {}
for name, make in (("bicubic alone", lambda: upsample(low, 256)),
                   ("floor", lambda: train[np.random.default_rng(1).choice(len(train), N, replace=False)]),
                   ("upsampler alone", lambda: Pipeline.from_checkpoint(W / "runs/upsampler").upscale(low, seed=12345))):
    t0 = time.monotonic(); made = make(); s = time.monotonic() - t0
    summary = evaluate_images(made, real, None, config)["summary"]
    out[name] = {k: summary.get(k) for k in ("FID_inception", "FD_domain", "spectrum_distance")} | {"n": N, "seconds": s}
    if name != "floor":
        out[name] |= fidelity_inside_brain(made, real)
        save_grid(np.concatenate([real[:8], made[:8]]), W / "grids" / f"{name.replace(' ', '_')}@10.png")
    print(name, out[name], flush=True)
    Path(f"runs/alone_{N}.json").write_text(json.dumps(out, indent=2, default=float))
