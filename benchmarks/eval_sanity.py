"""Sanity check of brainfusion.evaluation.evaluate on real T1 slices: do the metrics respond to damage?

Loads ~2,000 real slices (zero-padded to square, resized to 64x64), splits them into two disjoint
halves A and B, and compares A with B (real vs real: the noise floor) and with damaged copies of B
(blur, noise, patch shuffle at three increasing strengths). Prints a Markdown table.

    python benchmarks/eval_sanity.py                       # domain metrics only (~1-2 min)
    python benchmarks/eval_sanity.py --inception           # + Inception FID/KID, 500 vs 500 (slow on CPU)
    python benchmarks/eval_sanity.py --timing              # full evaluation 2000 vs 2000 (+2000 train)

The --timing run uses every image: 2,000 train, 2,000 held-out "real", and a "generated" set of the
remaining 1,121 unseen slices plus 879 lightly noised copies of training slices, so the
memorisation check should flag about 44 % near-copies.

Caveat: the Kaggle folders hold many adjacent slices of the same subjects and file names carry no
subject IDs, so the halves share subjects; real-vs-real is therefore a little optimistic.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from brainfusion.evaluation.evaluate import EvalConfig, evaluate_images, nearest_pairs
from brainfusion.evaluation.report import write_report
from brainfusion.evaluation.metrics.damage import DAMAGES, noise

DEFAULT_DATA = Path("/work/shared/data/kaggle-alzheimer-mri-train")


def list_images(root: Path) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png"}
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in exts)


def load_slices(paths: list[Path], size: int) -> np.ndarray:
    out = np.empty((len(paths), size, size), np.uint8)
    for i, p in enumerate(paths):
        a = np.asarray(Image.open(p).convert("L"))
        h, w = a.shape
        s = max(h, w)
        sq = np.zeros((s, s), np.uint8)
        sq[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = a
        out[i] = np.asarray(Image.fromarray(sq).resize((size, size), Image.BILINEAR))  # PIL antialiases when shrinking
    return out


def fmt(v, scale=1.0, digits=4):
    return "—" if v is None else f"{v * scale:.{digits}g}"


def sanity_table(images: np.ndarray, args) -> list[dict]:
    half = len(images) // 2
    a, b = images[:half], images[half : 2 * half]
    cfg = EvalConfig(
        progress=False,
        inception=args.inception,
        inception_samples=args.inception_n,
        seed=args.seed,
    )
    conditions = [("real vs real (A vs B)", "—", b)]
    for name, (fn, strengths) in DAMAGES.items():
        for s in strengths:
            conditions.append((f"real vs {name}", s, fn(b, s)))
    rows = []
    header = (
        "| condition | strength | FD_domain | KID_domain ×1e3 | FID_inception | KID_inception ×1e3 "
        "| spectrum dist | hist W1 | MS-SSIM (damaged B) |"
    )
    inc = f"Inception on {args.inception_n} vs {args.inception_n}" if args.inception else "Inception not run"
    print(f"\nA = {len(a)} real, B = {len(b)} real at {cfg.resolution}x{cfg.resolution}; {inc}", flush=True)
    print(header)
    print("|" + "---|" * 9, flush=True)
    for label, strength, gen in conditions:
        t0 = time.perf_counter()
        r = evaluate_images(gen, a, None, cfg)
        s = r["summary"]
        row = dict(condition=label, strength=strength, seconds=time.perf_counter() - t0, **s)
        rows.append(row)
        print(
            f"| {label} | {strength} | {fmt(s['FD_domain'])} | {fmt(s['KID_domain'], 1e3)} | {fmt(s['FID_inception'])} "
            f"| {fmt(s['KID_inception'], 1e3)} | {fmt(s['spectrum_distance'])} | {fmt(s['histogram_w1'])} | {fmt(s['msssim_gen'])} |",
            flush=True,
        )
    print(f"(MS-SSIM among real A: {fmt(rows[0]['msssim_real'])})")
    return rows


def timing_run(paths: list[Path], args) -> dict:
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(paths))
    t0 = time.perf_counter()
    all_images = load_slices([paths[i] for i in order], 64)
    print(f"loaded {len(all_images)} slices in {time.perf_counter() - t0:.1f} s", flush=True)
    train, real, unseen = all_images[:2000], all_images[2000:4000], all_images[4000:]
    n_copies = 2000 - len(unseen)
    copies = noise(train[:n_copies], 0.01, seed=5)
    generated = np.concatenate([unseen, copies])
    cfg = EvalConfig(progress=True, seed=args.seed)
    t0 = time.perf_counter()
    res = evaluate_images(generated, real, train, cfg)
    wall = time.perf_counter() - t0
    m = res["memorization"]
    print(f"\nfull evaluation (no Inception) of {len(generated)} generated vs {len(real)} real, {len(train)} train: {wall:.1f} s")
    print("per part (s):", res["timing_s"])
    print("summary:", json.dumps(res["summary"], indent=1))
    print(
        f"memorisation: {100 * m['share_near_copies']:.1f} % near-copies (correlation rule, threshold r >= {m['threshold_correlation']:.5f}), "
        f"{100 * m['share_near_copies_ssim']:.1f} % by the SSIM rule (threshold {m['threshold_ssim']:.4f}); planted copies: {n_copies} of {len(generated)} = "
        f"{100 * n_copies / len(generated):.1f} %; flagged among planted copies: "
        f"{100 * np.mean(m['per_generated']['near_copy'][len(unseen):]):.1f} %, among unseen slices: "
        f"{100 * np.mean(m['per_generated']['near_copy'][: len(unseen)]):.1f} %"
    )
    if args.out:
        out = write_report(res, generated, real, nearest_pairs(res, generated, train), Path(args.out))
        print("report:", out)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=2000, help="images for the sanity table (two halves)")
    ap.add_argument("--inception", action="store_true", help="add Inception FID/KID (CPU: ~0.25 s per image)")
    ap.add_argument("--inception-n", type=int, default=500)
    ap.add_argument("--timing", action="store_true", help="time a full evaluation, 2000 vs 2000 (+2000 train)")
    ap.add_argument("--out", type=str, default=None, help="write a report of the --timing run here")
    ap.add_argument("--json", type=str, default=None, help="save the table rows as JSON")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not args.data.is_dir():
        print(f"data folder {args.data} not found", file=sys.stderr)
        return 2
    paths = list_images(args.data)
    print(f"{len(paths)} images in {args.data}; {os.cpu_count()} CPUs", flush=True)
    if args.timing:
        timing_run(paths, args)
        return 0
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(paths), min(args.n, len(paths)), replace=False)
    t0 = time.perf_counter()
    images = load_slices([paths[i] for i in pick], 64)
    print(f"loaded {len(images)} slices in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = sanity_table(images, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
