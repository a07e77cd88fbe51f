"""Quality per CPU-minute: train recipes for fixed CPU budgets, evaluate each against held-out real slices.

    python benchmarks/bench_quality.py --data ../shared/data/kaggle-alzheimer-mri-train \
        --work runs/bench_quality --recipes edm-p2,edm --budgets 5,20,60

1. Split: in every class folder the files are ordered by the number in their name and the last
   `--holdout` share is held out as one contiguous block (neighbouring numbers are likely the same
   subject, so interleaved hold-outs would leak subjects into training). Symlink folders
   `<work>/data/train` and `<work>/data/heldout`.
2. Budgets are CPU minutes of this machine, turned into step counts by a timed calibration of each
   recipe (`--steps-per-min` pins them instead, for a loaded machine). A recipe's budgets are one run
   resumed from budget to budget (resume is bitwise exact, and no recipe here depends on the budget).
3. Each checkpoint samples `--n` images (its recipe's fast sampler) and is scored against `--n`
   held-out slices: Inception FID/KID, FD_domain, spectrum distance, MS-SSIM, near-copies of training
   slices. The floor row is `--n` training slices scored the same way.

At `--image-size 256` (issue 18) two more kinds of recipe compete at equal total CPU minutes:
`latent` trains one autoencoder for `--ae-minutes` (`brainfusion train-autoencoder`), counted in every
latent budget, and the default U-Net on its latents for the rest (`train --autoencoder`), one run
resumed from budget to budget as the others are (a user trains the autoencoder once, too);
`up64:RECIPE` trains RECIPE at 64² and upsamples its samples bicubically to the image size (what a
user had before the latent route). `latent:RECIPE` puts RECIPE's config on the latents, e.g. a noise level
distribution screened for them (`--recipes latent:pm04=pm04.json`, a file of overrides on the defaults). The
floor is training slices at the image size.

    python benchmarks/bench_quality.py --data ../shared/data/kaggle-alzheimer-mri-train --image-size 256 \
        --work runs/bench_quality_256 --recipes latent,edm-p4-shift,up64:edm --budgets 20

`cascade` trains the base model (`up64:edm`'s run, so the two share its steps) for 1 − `--upsampler-share` of a
budget and the upsampler (`train --upsample-from 64`, recipe `upsampler`) for the rest, and samples the base's
64² slices through it. With `cascade` in the recipes the upsampler is also scored alone: held-out slices shrunk to
64² and brought back, against the originals, beside the same slices enlarged bicubically (`--alone-n` scores
only the first of the `--n` held-out slices, with a floor of its own at that n).

    python benchmarks/bench_quality.py --data ../shared/data/kaggle-alzheimer-mri-train --image-size 256 \
        --work runs/bench_cascade --recipes cascade,up64:edm --budgets 30 --steps-per-min up64:edm=86

Outputs in --work: results.json (filled as it goes; a rerun skips what is done), quality.md (the
table) and fid_vs_minutes.png (one line per recipe, the floor dashed).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from brainfusion.checkpoint import latest_checkpoint
from brainfusion.fileio import atomic_write_text
from brainfusion.config import FAST_SAMPLER, FAST_STEPS, RECIPES, AutoencoderConfig, DataConfig, recipe_config
from brainfusion.data.slices import load_slices
from brainfusion.evaluation.evaluate import EvalConfig, evaluate_images
from brainfusion.images import save_grid
from brainfusion.diffusion.pipeline import Pipeline

METRICS = [("FID_inception", "FID", ".1f"), ("KID_inception", "KID×10³", ".1f"), ("FD_domain", "FD_domain", ".3f"),
           ("spectrum_distance", "spectrum", ".3f"), ("msssim_gen", "MS-SSIM", ".3f"), ("memorization_share", "copies", ".1%")]


def split_blocks(source: Path, out: Path, holdout: float) -> tuple[Path, Path]:
    """Symlink the last `holdout` share of each class folder (by file number) into heldout/, the rest into train/."""
    if (out / "train").is_dir() and (out / "heldout").is_dir():
        return out / "train", out / "heldout"
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted((f for f in folder.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png")),
                       key=lambda f: (int(re.findall(r"\d+", f.stem)[-1]) if re.findall(r"\d+", f.stem) else -1, f.name))
        cut = len(files) - round(len(files) * holdout)
        for split, part in (("train", files[:cut]), ("heldout", files[cut:])):
            (out / split / folder.name).mkdir(parents=True, exist_ok=True)
            for f in part:
                (out / split / folder.name / f.name).symlink_to(f.resolve())
    return out / "train", out / "heldout"


def _train(config_path: Path | None, data: Path, run: Path, steps: int, extra: list[str] = (), command: str = "train") -> None:
    if config_path is None and command == "train" and (run / "config.json").is_file():  # a run resumes with its own config,
        config_path = run / "config.json"  # whatever today's defaults are (a latent run from before P_mean −0.4)
    config = ["--config", str(config_path)] if config_path else []
    cmd = [sys.executable, "-m", "brainfusion.cli", "--quiet", command, *config, "--data", str(data),
           "--out-dir", str(run), "--max-steps", str(steps), "--sample-every", "0", "--keep-checkpoints", "20", *extra]
    if latest_checkpoint(run / "checkpoints") is not None:
        cmd.append("--resume")
    subprocess.run(cmd, check=True)


def calibrate(name: str, config_path: Path | None, data: Path, work: Path, steps: int = 60, extra: list[str] = (),
              command: str = "train") -> float:
    """Training steps per minute of a recipe, timed between its 20th and last logged step."""
    run = work / "calibration" / name
    if not (run / "train_log.csv").is_file():
        _train(config_path, data, run, steps, ["--log-every", "10", "--checkpoint-every", str(steps), *extra], command)
    rows = [line.split(",") for line in (run / "train_log.csv").read_text().splitlines()[1:]]
    by_step = {int(r[0]): float(r[5]) for r in rows}
    return (steps - 20) / (by_step[steps] - by_step[20]) * 60


def _checkpoint_at(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"ckpt_{step:08d}.safetensors"


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 slices resized bicubically to size×size (PIL's filter, as a user's image viewer would)."""
    from PIL import Image

    resized = [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in images]
    return np.stack(resized)


def evaluate_checkpoint(checkpoint: Path, real: np.ndarray, train: np.ndarray, n: int, sampler: str, steps: int,
                        autoguidance: float = 1.0, augment: float | None = None) -> dict:
    base, upsampler = checkpoint if isinstance(checkpoint, tuple) else (checkpoint, None)
    pipe = Pipeline.from_checkpoint(base)
    if upsampler is not None:
        pipe.use_upsampler(Pipeline.from_checkpoint(upsampler), augment)
    if autoguidance != 1:  # guided by the weights the run kept at train.guide_at (half its steps), as `sample` guides
        pipe.use_kept_guides(autoguidance)
    t0 = time.monotonic()
    generated = pipe(n, seed=12345, sampler=sampler, steps=steps)
    seconds = time.monotonic() - t0
    size = real.shape[-1]
    if generated.shape[-1] != size:
        generated = upsample(generated, size)
    results = evaluate_images(generated, real, train, EvalConfig(resolution=size, inception=True, inception_samples=n, progress=False))
    return {**results["summary"], "sampling_s": seconds, "images": generated[:64]}


def write_outputs(results: dict, work: Path) -> None:
    """results.json (merged with what another bench process wrote meanwhile), quality.md, fid_vs_minutes.png."""
    on_disk = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
    results.update({k: v for k, v in on_disk.items() if k not in results})
    atomic_write_text(work / "results.json", json.dumps(results, indent=2))
    lines = ["| recipe | CPU min | steps | " + " | ".join(label for _, label, _ in METRICS) + " |",
             "|---" * (3 + len(METRICS)) + "|"]
    for key, r in results.items():
        cells = [format(r[m] * (1000 if m == "KID_inception" else 1), fmt) if r.get(m) is not None else "–" for m, _, fmt in METRICS]
        lines.append(f"| {r['recipe']} | {r.get('minutes', '–')} | {r.get('step', '–')} | " + " | ".join(cells) + " |")
    atomic_write_text(work / "quality.md", "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for recipe in sorted({r["recipe"] for r in results.values() if r["recipe"] != "floor" and "minutes" in r}):
        pts = sorted((r["minutes"], r["FID_inception"]) for r in results.values() if r["recipe"] == recipe)
        ax.plot(*zip(*pts), marker="o", label=recipe)
    if "floor" in results:
        ax.axhline(results["floor"]["FID_inception"], ls="--", c="grey", label="training slices (floor)")
    ax.set_xlabel("training budget, CPU minutes (2 cores)")
    ax.set_ylabel(f"Inception FID vs held-out slices (n = {results['floor']['n']})")
    ax.set_xticks(sorted({r["minutes"] for r in results.values() if "minutes" in r}))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(work / "fid_vs_minutes.png")
    plt.close(fig)


def _load(path: Path, size: int = 64) -> np.ndarray:
    return load_slices(DataConfig(path=str(path), split="train", image_size=size), progress=False).images


LATENT_KINDS = ("autoencoder", "autoencoder-adv", "latent")  # the rates the latent route needs
CASCADE_KINDS = ("up64:edm", "upsampler")  # the rates a cascade needs: its base and its upsampler
UPSAMPLER_SHARE = [1 / 3]  # of each cascade budget, the upsampler's (--upsampler-share)


def is_latent(name: str) -> bool:
    """`latent` (the default U-Net config on latents) or `latent:RECIPE` (a recipe's config on them)."""
    return name == "latent" or name.startswith("latent:")


def recipe_of(name: str) -> str:
    """The recipe whose config a route trains: `up64:edm` and `latent:X` name it, bare `latent` is the default's."""
    return "edm" if name == "latent" else name.partition(":")[2] or name


def autoencoder_steps(minutes: float, rates: dict) -> int:
    """Autoencoder steps in `minutes`: its adversarial phase (from `adv_start`) runs at its own, lower rate.

    On the 2-core development CPU: 185 steps a minute before (24.7 img/s), 59 after (7.9 img/s: the
    discriminator's three passes at full resolution), so 15 minutes are 2,241 steps, not 2,775.
    """
    start, before = AutoencoderConfig().adv_start, rates["autoencoder"]
    if minutes * before <= start:
        return round(minutes * before)
    return round(start + (minutes - start / before) * rates["autoencoder-adv"])


def train_budget(name: str, minutes: float, rates: dict, work: Path, train_dir: Path, size: int, ae_minutes: float) -> tuple[Path, int]:
    """Train recipe `name` for `minutes` CPU minutes (steps from `rates`); returns its checkpoint and step."""
    if name == "cascade":  # the base's minutes and the upsampler's, both counted
        base, _ = train_budget("up64:edm", minutes * (1 - UPSAMPLER_SHARE[0]), rates, work, train_dir, size, ae_minutes)
        run, step = work / "runs" / "upsampler", round(minutes * UPSAMPLER_SHARE[0] * rates["upsampler"])
        if not _checkpoint_at(run, step).is_file():
            _train(work / "recipes" / "upsampler.json", train_dir, run, step,
                   ["--checkpoint-every", str(step), "--image-size", str(size), "--upsample-from", "64"])
        return (base, _checkpoint_at(run, step)), step
    if is_latent(name):  # the autoencoder's minutes count in every budget
        if minutes <= ae_minutes:
            raise SystemExit(f"a latent budget of {minutes:g} minutes leaves nothing after --ae-minutes {ae_minutes:g}.")
        ae_run, ae_steps = work / "runs" / f"ae@{ae_minutes:g}", autoencoder_steps(ae_minutes, rates)
        if not _checkpoint_at(ae_run, ae_steps).is_file():
            _train(None, train_dir, ae_run, ae_steps, ["--image-size", str(size), "--no-rfid", "--checkpoint-every", str(ae_steps)],
                   "train-autoencoder")
        tag = "" if name == "latent" else f"{recipe_of(name)}_"
        run, step = work / "runs" / f"latent_{tag}ae{ae_minutes:g}", round((minutes - ae_minutes) * rates["latent"])
        extra = ["--image-size", str(size), "--autoencoder", str(ae_run)]
        config_path = None if name == "latent" else work / "recipes" / f"{recipe_of(name)}.json"
    else:
        run, step = work / "runs" / name.replace(":", "_"), round(minutes * rates[name])
        extra = ["--image-size", str(64 if name.startswith("up64:") else size)]
        config_path = work / "recipes" / f"{recipe_of(name)}.json"
    if not _checkpoint_at(run, step).is_file():
        _train(config_path, train_dir, run, step, ["--checkpoint-every", str(step), *extra])
    return _checkpoint_at(run, step), step


def calibrate_all(names: list[str], pinned: dict, work: Path, train_dir: Path, size: int) -> dict:
    """Steps per CPU minute of every run kind the recipes need (pinned ones are not timed)."""
    rates = {}
    for name in names:
        for kind in (LATENT_KINDS if is_latent(name) else ("up64:edm", "upsampler") if name == "cascade" else (name,)):
            if kind in pinned:
                rates[kind] = pinned[kind]
            elif kind.startswith("autoencoder"):
                adversarial = ["--adv-start", "0"] if kind == "autoencoder-adv" else []
                rates[kind] = calibrate(kind, None, train_dir, work, 60, ["--image-size", str(size), "--no-rfid", *adversarial],
                                        "train-autoencoder")
            elif kind == "upsampler":
                rates[kind] = calibrate(kind, work / "recipes" / "upsampler.json", train_dir, work, 60,
                                        ["--image-size", str(size), "--upsample-from", "64"])
            elif kind == "latent":  # the default U-Net on the latent grid costs what it costs on pixels of that size
                rates[kind] = calibrate("latent-grid", work / "recipes" / "edm.json", train_dir, work, 60,
                                        ["--image-size", str(size // 4)])
            else:
                rates[kind] = calibrate(kind, work / "recipes" / f"{recipe_of(kind)}.json", train_dir, work, 60,
                                        ["--image-size", str(64 if kind.startswith("up64:") else size)])
            print(f"{kind}: {rates[kind]:.1f} steps per CPU minute", flush=True)
    return rates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder of class folders of numbered slices")
    p.add_argument("--work", type=Path, default=Path("runs/bench_quality"))
    p.add_argument("--recipes", default="edm-p2,edm",
                   help=f"comma list of {', '.join(RECIPES)}, or NAME=FILE.json holding overrides on the defaults")
    p.add_argument("--budgets", default="5,20,60", help="CPU minutes, comma list")
    p.add_argument("--steps-per-min", default="", help="pin calibration, e.g. edm-p2=272,edm=86 (latent: autoencoder=185,"
                   "autoencoder-adv=59,latent=26)")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--n", type=int, default=1000, help="generated and held-out images per evaluation")
    p.add_argument("--sampler", default=FAST_SAMPLER)
    p.add_argument("--steps", type=int, default=FAST_STEPS)
    p.add_argument("--image-size", type=int, default=64, help="train and score at this size (256: the latent and up64: recipes)")
    p.add_argument("--ae-minutes", type=float, default=10, help="CPU minutes of the one autoencoder every latent budget counts")
    p.add_argument("--autoguidance", type=float, default=1.0,
                   help="also score each checkpoint guided by its run's halfway weights at this weight (Karras et al. 2024), "
                        "as recipe 'NAME agW'; 1: plain only")
    p.add_argument("--upsampler-share", type=float, default=1 / 3, help="cascade: the share of each budget the upsampler trains")
    p.add_argument("--no-memorization", action="store_true", help="skip the near-copy search (at 256² it costs more than the "
                                                                  "FID: SSIM of each slice against its 8 nearest training slices)")
    p.add_argument("--alone-n", type=int, default=0, help="cascade: score the upsampler alone on the first N held-out slices "
                                                          "only, beside a floor at that N (default: all --n)")
    p.add_argument("--augment", type=float, default=None, help="cascade: the noise level low-resolution slices are "
                                                              "given at when sampling (default: the upsampler's own)")
    args = p.parse_args(argv)
    UPSAMPLER_SHARE[0] = args.upsampler_share
    budgets = sorted(float(b) for b in args.budgets.split(","))
    pinned = {k: float(v) for k, v in (kv.split("=") for kv in args.steps_per_min.split(",") if kv)}
    train_dir, held_dir = split_blocks(args.data, args.work / "data", args.holdout)
    size = args.image_size
    real, train = _load(held_dir, size), _load(train_dir, size)
    reference = None if args.no_memorization else train  # the training slices the near-copy search runs against
    rng = np.random.default_rng(0)
    real = real[rng.choice(len(real), min(args.n, len(real)), replace=False)]
    save_grid(real[:64], args.work / "grids" / "heldout.png")
    print(f"{len(train)} training slices, {len(real)} held-out slices used (blocks: last {args.holdout:.0%} of each class)")
    done = json.loads((args.work / "results.json").read_text()) if (args.work / "results.json").is_file() else {}
    if "floor" not in done:
        floor = train[rng.choice(len(train), len(real), replace=False)]
        config = EvalConfig(resolution=size, inception=True, inception_samples=len(real), progress=False)
        done["floor"] = {**evaluate_images(floor, real, reference, config)["summary"], "recipe": "floor", "n": len(real)}
        write_outputs(done, args.work)
    names = []
    for spec in args.recipes.split(","):
        name, _, overrides = spec.partition("=")
        if overrides:
            RECIPES[recipe_of(name)] = json.loads(Path(overrides).read_text())
        for recipe in (("edm", "upsampler") if name == "cascade" else (recipe_of(name),)):
            atomic_write_text(args.work / "recipes" / f"{recipe}.json", recipe_config(recipe).to_json())
        names.append(name)
    rates = calibrate_all(names, pinned, args.work, train_dir, size)
    weights = [1.0] + ([args.autoguidance] if args.autoguidance != 1 else [])
    for minutes in budgets:  # budget by budget, so a base run that two routes share only ever trains on
        for name in names:
            for weight in weights:
                label = name if weight == 1 else f"{name} ag{weight:g}"
                label += f" σ{args.augment:g}" if name == "cascade" and args.augment is not None else ""
                key = f"{label}@{minutes:g}"
                if key not in done:
                    checkpoint, step = train_budget(name, minutes, rates, args.work, train_dir, size, args.ae_minutes)
                    scores = evaluate_checkpoint(checkpoint, real, reference, len(real), args.sampler, args.steps, weight,
                                                 args.augment)
                    save_grid(scores.pop("images"), args.work / "grids" / f"{key.replace(':', '_').replace(' ', '_')}.png")
                    done[key] = {**scores, "recipe": label, "minutes": minutes, "step": step, "n": len(real), "size": size,
                                 "steps_per_min": {k: v for k, v in rates.items() if k == name or k in LATENT_KINDS + CASCADE_KINDS}}
                write_outputs(done, args.work)
                print(f"{key}: FID {done[key]['FID_inception']:.1f} (floor {done['floor']['FID_inception']:.1f})", flush=True)
    if "cascade" in names:
        for minutes in budgets:
            score_upsampler_alone(done, minutes, rates, args, train_dir, real, reference)
    print((args.work / "quality.md").read_text())


def score_upsampler_alone(done: dict, minutes: float, rates: dict, args, train_dir: Path, real: np.ndarray, train: np.ndarray) -> None:
    """The cascade's upsampler at `minutes` of the budget on held-out slices shrunk to 64² (as the data loader would
    shrink them), against the originals, beside bicubic enlargement of the same slices: FID and the rest as above,
    and PSNR / SSIM inside the brain against each slice's own original. `--alone-n` scores the first N held-out
    slices only; their floor (N training slices) is scored at that N too, since FID is biased by n."""
    import torch

    from brainfusion.data.channels import to_model_range, to_uint8
    from brainfusion.diffusion.upsample import shrink
    from brainfusion.evaluation.metrics.distances import fidelity_inside_brain

    (_, checkpoint), step = train_budget("cascade", minutes, rates, args.work, train_dir, args.image_size, args.ae_minutes)
    n = min(args.alone_n or len(real), len(real))
    real, tag = real[:n], "" if n == done["floor"]["n"] else f" n{n}"
    config = EvalConfig(resolution=real.shape[-1], inception=True, inception_samples=n, progress=False)
    if tag and f"floor{tag}" not in done:
        floor = _load(train_dir, real.shape[-1])
        floor = floor[np.random.default_rng(1).choice(len(floor), n, replace=False)]
        done[f"floor{tag}"] = {**evaluate_images(floor, real, train, config)["summary"], "recipe": f"floor (n = {n})", "n": n}
    low = to_uint8(shrink(to_model_range(torch.as_tensor(real)), 64))
    level = "" if args.augment is None else f" σ{args.augment:g}"
    for label, make in ((f"upsampler alone{level}", lambda: Pipeline.from_checkpoint(checkpoint).upscale(
                            low, seed=12345, sampler=args.sampler, steps=args.steps, augment=args.augment)),
                        ("bicubic alone", lambda: upsample(low, real.shape[-1]))):
        key = f"{label}@{minutes * UPSAMPLER_SHARE[0]:g}{tag}"
        if key in done:
            continue
        t0 = time.monotonic()
        made = make()
        seconds = time.monotonic() - t0
        scores = evaluate_images(made, real, train, config)["summary"]
        save_grid(np.concatenate([real[:8], made[:8]]), args.work / "grids" / f"{key.replace(' ', '_')}.png")
        done[key] = {**scores, "recipe": label + tag, "minutes": minutes * UPSAMPLER_SHARE[0], "step": step if "upsampler" in label else 0,
                     "n": n, "size": real.shape[-1], **fidelity_inside_brain(made, real), "sampling_s": seconds}
        write_outputs(done, args.work)
        print(f"{key}: FID {scores['FID_inception']:.1f}, PSNR {done[key]['psnr_brain']:.2f} dB, SSIM {done[key]['ssim_brain']:.3f} "
              f"inside the brain (floor FID {done[f'floor{tag}']['FID_inception']:.1f})", flush=True)


if __name__ == "__main__":
    main()
