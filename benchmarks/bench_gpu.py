"""GPU checks in one short run: training speed per precision, and quality per 5 GPU-minutes at 64² and 128².

On the GPU machine (a folder of training slices, e.g. bench_quality's train split copied as files):

    python benchmarks/bench_gpu.py run --data gpu/train --out $OUT --minutes 5

1. Speed: the default recipe at 64×64 for `--speed-steps` steps in fp32, bf16 and fp16 (the last with
   torch.amp's gradient scaler), one after another with the GPU to itself; img/s between the first
   logged window and the end (warm-up excluded). Written to speed.json.
2. Quality: the default recipe at 64×64 and 128×128, both at once (one process each, sharing the GPU)
   for `--minutes` wall minutes each; then 1,000 samples of each EMA model with the fast sampler and
   the benchmark's seed, saved as samples_<size>.npz with the run's log, plus a grid.

Then, anywhere (the Inception weights need not travel to the GPU machine):

    python benchmarks/bench_gpu.py score --samples gpu_out --data ../shared/data/kaggle-alzheimer-mri-train \
        --work runs/bench_quality

scores each samples file against the held-out block at its size with bench_quality's evaluation, and
the floor (training slices against the same held-out slices) at that size; it prints a markdown table
and adds the rows to <work>/gpu_results.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
SEED = 12345  # bench_quality's sampling seed


def _train(data: Path, run: Path, size: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "brainfusion.cli", "--quiet", "train", "--data", str(data), "--out-dir", str(run),
           "--image-size", str(size), "--sample-every", "0", "--checkpoint-every", "1000000", "--log-every", "50", *extra]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _log_rows(run: Path) -> list[dict]:
    with open(run / "train_log.csv") as fh:
        return list(csv.DictReader(fh))


def _rate(run: Path, batch: int = 32) -> dict:
    rows = _log_rows(run) if (run / "train_log.csv").is_file() else []
    if len(rows) < 2:
        return {"steps": int(rows[-1]["step"]) if rows else 0}
    first, last = rows[0], rows[-1]
    steps = int(last["step"]) - int(first["step"])
    seconds = float(last["elapsed_s"]) - float(first["elapsed_s"])
    return {"steps": int(last["step"]), "img_per_s": steps * batch / seconds, "steps_per_s": steps / seconds}


def run(args: argparse.Namespace) -> None:
    import torch

    out = Path(args.out)
    work = Path(args.work)
    speed = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    for precision in args.precisions.split(","):
        run_dir = work / f"speed_{precision}"
        _train(args.data, run_dir, 64, ["--max-steps", str(args.speed_steps), "--precision", precision]).wait()
        speed[precision] = _rate(run_dir)
        print(f"speed {precision}: {speed[precision]}", flush=True)
        (out / "speed.json").write_text(json.dumps(speed, indent=2))
    sizes = [int(s) for s in args.sizes.split(",")]
    procs = {size: _train(args.data, work / f"q{size}", size, ["--time-budget-min", str(args.minutes)]) for size in sizes}
    for size, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"training at {size}x{size} failed")
    from brainfusion.checkpoint import latest_checkpoint
    from brainfusion.config import FAST_SAMPLER, FAST_STEPS
    from brainfusion.images import save_grid
    from brainfusion.diffusion.pipeline import Pipeline

    for size in sizes:
        run_dir = work / f"q{size}"
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        t0 = time.monotonic()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        images = Pipeline.from_checkpoint(ckpt, device=device)(args.n, seed=SEED, sampler=FAST_SAMPLER, steps=FAST_STEPS, batch_size=250)
        info = {**_rate(run_dir), "steps": int(ckpt.stem.split("_")[-1]), "size": size, "minutes": args.minutes, "sampling_s": time.monotonic() - t0,
                "sampler": f"{FAST_SAMPLER}-{FAST_STEPS}", "concurrent_runs": len(sizes), **{k: speed[k] for k in ("device", "torch")}}
        np.savez_compressed(out / f"samples_{size}.npz", images=images, info=json.dumps(info))
        save_grid(images[:64], out / f"grid_{size}.png")
        print(f"{size}: {info}", flush=True)


def latent(args: argparse.Namespace) -> None:
    """Issue 18's GPU check: the 64² step before/after (batch 32 eager against a large compiled batch), then
    both stages at 256² (autoencoder, then latent diffusion) and 1,000 samples in parts that come back."""
    import torch

    from brainfusion.checkpoint import latest_checkpoint
    from brainfusion.config import FAST_SAMPLER, FAST_STEPS
    from brainfusion.images import save_grid
    from brainfusion.diffusion.pipeline import Pipeline

    out, work = Path(args.out), Path(args.work)
    speed = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    for name, batch, extra in (("batch32_eager", 32, []), (f"batch{args.big_batch}_compiled", args.big_batch, ["--compile"])):
        run_dir = work / f"speed_{name}"
        _train(args.data, run_dir, 64, ["--max-steps", str(args.speed_steps), "--batch-size", str(batch), *extra]).wait()
        speed[name] = _rate(run_dir, batch)
        print(f"speed {name}: {speed[name]}", flush=True)
        (out / "speed.json").write_text(json.dumps(speed, indent=2))
    t0 = time.monotonic()
    ae_cmd = [sys.executable, "-m", "brainfusion.cli", "--quiet", "train-autoencoder", "--data", str(args.data), "--out-dir",
              str(work / "ae"), "--image-size", "256", "--crop-size", "0", "--batch-size", "16", "--time-budget-min",
              str(args.ae_minutes), "--checkpoint-every", "1000000", "--sample-every", "0", "--log-every", "50", "--no-rfid",
              "--adv-start", str(args.adv_start), *(["--heldout", str(args.heldout)] if args.heldout else [])]
    if subprocess.run(ae_cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode:
        raise SystemExit("autoencoder training failed")
    ae_s = time.monotonic() - t0
    (out / "ae.json").write_text(json.dumps({"seconds": ae_s, **_rate(work / "ae", 16), **(
        json.loads((work / "ae" / "ae_metrics.json").read_text()) if (work / "ae" / "ae_metrics.json").is_file() else {})}, indent=2))
    run_dir = work / "latent256"
    if _train(args.data, run_dir, 256, ["--autoencoder", str(work / "ae"), "--time-budget-min", str(args.minutes),
                                        "--batch-size", str(args.big_batch)]).wait():
        raise SystemExit("latent training failed")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.monotonic()
    images = Pipeline.from_checkpoint(ckpt, device=device)(args.n, seed=SEED, sampler=FAST_SAMPLER, steps=FAST_STEPS, batch_size=250)
    info = {**_rate(run_dir, args.big_batch), "steps": int(ckpt.stem.split("_")[-1]), "size": 256, "minutes": args.minutes,
            "ae_minutes": ae_s / 60, "sampling_s": time.monotonic() - t0, "sampler": f"{FAST_SAMPLER}-{FAST_STEPS}",
            "batch_size": args.big_batch, **{k: speed[k] for k in ("device", "torch")}}
    for part in range(0, len(images), 250):  # 16 MB a file comes back
        np.savez_compressed(out / f"samples_latent256_part{part // 250}.npz", images=images[part:part + 250], info=json.dumps(info))
    save_grid(images[:16], out / "grid_latent256.png", nrow=4)
    print(f"latent 256: {info}", flush=True)


def conditional(args: argparse.Namespace) -> None:
    """A class-conditional model (labels = class folders) for `--minutes`, then per-class sets for bench_augment.

    cond_g<G>_<part>.npz hold images (classes, n, H, W) and class names (small sets: cond_curve.npz, key g<G>); image i of class c is image i
    of seed derive_seed(seed, c), as bench_augment's checkpoint generator draws them.
    """
    import torch

    from brainfusion.checkpoint import latest_checkpoint
    from brainfusion.images import save_grid
    from brainfusion.diffusion.pipeline import Pipeline
    from brainfusion.seeding import derive_seed

    out, run_dir = Path(args.out), Path(args.work) / "conditional"
    extra = ["--labels", "folders", "--time-budget-min", str(args.minutes), "--precision", args.precision,
             "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    if _train(args.data, run_dir, args.size, extra).wait() != 0:
        raise SystemExit("conditional training failed")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Pipeline.from_checkpoint(ckpt, device=device)
    names = pipe.config.condition.classes["class"]
    info = {**_rate(run_dir, args.batch_size), "steps": int(ckpt.stem.split("_")[-1]), "minutes": args.minutes,
            "batch_size": args.batch_size, "lr": args.lr, "precision": args.precision, "classes": list(names)}
    (out / "conditional.json").write_text(json.dumps(info, indent=2))
    curve = {}
    for spec in args.sets.split(","):
        guidance, n = (float(v) for v in spec.split(":"))
        t0 = time.monotonic()
        images = np.stack([pipe(int(n), seed=derive_seed(SEED, c), condition={"class": name}, guidance=guidance,
                                batch_size=512) for c, name in enumerate(names)])
        print(f"guidance {guidance:g}: {images.shape} in {time.monotonic() - t0:.0f} s", flush=True)
        if n < 512:  # small sets share one file; large ones go two classes a file (16 MB a file comes back)
            curve[f"g{guidance:g}"] = images
            continue
        save_grid(images[:, :8].reshape(-1, *images.shape[2:]), out / f"cond_rows_g{guidance:g}.png", nrow=8)
        for part in range(0, len(names), 2):
            np.savez_compressed(out / f"cond_g{guidance:g}_{part // 2}.npz", images=images[part:part + 2],
                                classes=np.array(names[part:part + 2]), info=json.dumps(info))
    np.savez_compressed(out / "cond_curve.npz", classes=np.array(names), info=json.dumps(info), **curve)


def score(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    from bench_quality import split_blocks

    from brainfusion.config import DataConfig
    from brainfusion.data.slices import load_slices
    from brainfusion.evaluation.evaluate import EvalConfig, evaluate_images
    from brainfusion.fileio import atomic_write_text

    train_dir, held_dir = split_blocks(args.data, Path(args.work) / "data", 0.2)
    path = Path(args.work) / "gpu_results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    parts: dict[str, list[Path]] = {}
    for file in sorted(Path(args.samples).glob("samples_*.npz")):  # samples_<name>[_part<k>].npz: the parts of one set
        parts.setdefault(file.stem.split("_part")[0], []).append(file)
    for name, files in parts.items():
        loaded = [np.load(f) for f in files]
        images, info = np.concatenate([z["images"] for z in loaded]), json.loads(str(loaded[0]["info"]))
        size = info["size"]
        load = lambda d: load_slices(DataConfig(path=str(d), split="train", image_size=size), progress=False).images  # noqa: E731
        real, train = load(held_dir), load(train_dir)
        rng = np.random.default_rng(0)
        real = real[rng.choice(len(real), min(len(images), len(real)), replace=False)]
        cfg = EvalConfig(inception=True, inception_samples=len(real), progress=False)
        if f"floor@{size}" not in results:
            floor = train[rng.choice(len(train), len(real), replace=False)]
            results[f"floor@{size}"] = {**evaluate_images(floor, real, train, cfg)["summary"], "size": size, "n": len(real)}
        key = f"gpu@{size}" if name == f"samples_{size}" else f"{name.removeprefix('samples_')}@{size}"
        results[key] = {**evaluate_images(images, real, train, cfg)["summary"], **info, "n": len(real)}
        atomic_write_text(path, json.dumps(results, indent=2))
    print("| size | run | steps | FID | KID×10³ | FD_domain | spectrum | MS-SSIM | copies |\n|---|---|---|---|---|---|---|---|---|")
    for key, r in sorted(results.items(), key=lambda kv: (kv[1]["size"], kv[0])):
        print(f"| {r['size']} | {key.split('@')[0]} | {r.get('steps', '–')} | {r['FID_inception']:.1f} | {r['KID_inception'] * 1e3:.1f} | "
              f"{r['FD_domain']:.3f} | {r['spectrum_distance']:.3f} | {r['msssim_gen']:.3f} | {r['memorization_share']:.1%} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="on the GPU machine")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, default=Path("/tmp/bench_gpu"))
    r.add_argument("--minutes", type=float, default=5.0)
    r.add_argument("--sizes", default="64,128")
    r.add_argument("--n", type=int, default=1000)
    r.add_argument("--speed-steps", type=int, default=400)
    r.add_argument("--precisions", default="fp32,bf16,fp16")
    c = sub.add_parser("conditional", help="on the GPU machine: a class-conditional model and per-class sets")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--work", type=Path, default=Path("/tmp/bench_gpu"))
    c.add_argument("--minutes", type=float, default=3.0)
    c.add_argument("--size", type=int, default=64)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--lr", type=float, default=5e-4)
    c.add_argument("--precision", default="fp32")
    c.add_argument("--sets", default="2:2048,0:128,1:128,4:128", help="guidance:images per class, comma list")
    lt = sub.add_parser("latent", help="on the GPU machine: the 64² step before/after, then both 256² stages")
    lt.add_argument("--data", type=Path, required=True)
    lt.add_argument("--heldout", type=Path, help="held-out slices the autoencoder scores itself on")
    lt.add_argument("--out", type=Path, required=True)
    lt.add_argument("--work", type=Path, default=Path("/tmp/bench_gpu"))
    lt.add_argument("--ae-minutes", type=float, default=2.5)
    lt.add_argument("--adv-start", type=int, default=1000)
    lt.add_argument("--minutes", type=float, default=3.0)
    lt.add_argument("--big-batch", type=int, default=128)
    lt.add_argument("--speed-steps", type=int, default=300)
    lt.add_argument("--n", type=int, default=1000)
    s = sub.add_parser("score", help="anywhere: FID etc. of the returned samples against held-out slices")
    s.add_argument("--samples", type=Path, required=True)
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--work", type=Path, default=Path("runs/bench_quality"))
    args = p.parse_args(argv)
    if args.command in ("run", "conditional", "latent"):
        args.out.mkdir(parents=True, exist_ok=True)
        {"run": run, "conditional": conditional, "latent": latent}[args.command](args)
    else:
        score(args)


if __name__ == "__main__":
    main()
