"""Evaluation report: metrics.json, report.md and PNG figures, each written atomically.

    write_report(results, generated, real, pairs, out_dir)

`results` is the dict from `brainfusion.evaluation.evaluate.evaluate_images`; `pairs` is a list of
(generated image, nearest training image, SSIM) from `brainfusion.evaluation.evaluate.nearest_pairs` (or
None / [] to leave the nearest-neighbour figure out).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_bytes
from ..images import make_grid, save_figure
from .evaluate import versions

FIGURES = {
    "samples": "samples.png",
    "pairs": "nearest_pairs.png",
    "spectrum": "power_spectrum.png",
    "histogram": "intensity_histogram.png",
}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _squeeze(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        return images[:, 0]
    if images.ndim == 4 and images.shape[3] == 1:
        return images[..., 0]
    return images


def _save_fig(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def _figures(results: dict, generated, real, pairs, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}
    generated, real = _squeeze(generated), _squeeze(real)

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, ims, title in ((axes[0], generated, "Generated"), (axes[1], real, "Real (held-out)")):
        ax.imshow(make_grid(ims[:36], nrow=6), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{title} (first {min(36, len(ims))} of {len(ims)})")
        ax.axis("off")
    made["samples"] = _save_fig(fig, out_dir / FIGURES["samples"]).name

    if pairs:
        k = len(pairs)
        fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.7), squeeze=False)
        for j, pair in enumerate(pairs):
            g, t, s = pair[:3]
            for i, im in enumerate((g, t)):
                ax = axes[i, j]
                ax.imshow(_squeeze(np.asarray(im)[None])[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            label = f"SSIM {s:.3f}" + (f"\nr {pair[3]:.4f}" if len(pair) > 3 else "")
            axes[1, j].set_xlabel(label, fontsize=8)
        axes[0, 0].set_ylabel("generated")
        axes[1, 0].set_ylabel("nearest train")
        fig.suptitle("Closest generated / training pairs (highest correlation r first)")
        made["pairs"] = _save_fig(fig, out_dir / FIGURES["pairs"]).name

    sp = results.get("spectrum")
    if sp:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot(sp["radius_cycles_per_image"], sp["log10_power_real"], label="real", lw=2)
        ax.plot(sp["radius_cycles_per_image"], sp["log10_power_gen"], label="generated", lw=2, ls="--")
        ax.set_xlabel(f"spatial frequency (cycles per {results.get('resolution', '?')}-px image)")
        ax.set_ylabel("log10 mean power")
        ax.set_title(f"Radially averaged power spectrum (distance {sp['distance']:.3f})")
        ax.legend()
        ax.grid(alpha=0.3)
        made["spectrum"] = _save_fig(fig, out_dir / FIGURES["spectrum"]).name

    hist = results.get("histogram")
    if hist and "counts_gen" in hist:
        thr = hist["foreground_threshold"]
        levels = np.arange(256)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for key, label, ls in (("counts_real", "real", "-"), ("counts_gen", "generated", "--")):
            c = np.asarray(hist[key], np.float64)
            c = c[levels > thr] / max(c[levels > thr].sum(), 1.0)
            ax.step(levels[levels > thr], c, where="mid", label=label, ls=ls)
        w1 = hist["wasserstein1"]
        ax.set_title(f"Brain-voxel intensities (> {thr}); W1 = {w1:.2f} grey levels" if w1 is not None and np.isfinite(w1) else "Brain-voxel intensities")
        ax.set_xlabel("grey level")
        ax.set_ylabel("fraction of brain voxels")
        ax.legend()
        ax.grid(alpha=0.3)
        made["histogram"] = _save_fig(fig, out_dir / FIGURES["histogram"]).name
    return made


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        return f"{v:.{digits}g}"
    return str(v)


def _markdown(results: dict, figs: dict[str, str]) -> str:
    s = results.get("summary", {})
    c = results.get("counts", {})
    dom, inc = results.get("domain", {}), results.get("inception", {})
    div, mem = results.get("diversity", {}), results.get("memorization", {})
    hist = results.get("histogram", {})
    R = results.get("resolution")
    whole_set = dom.get("KID_subset_size") == max(c.get("generated") or 0, c.get("real") or 0)
    kid_spread = "" if whole_set else f" ± {_fmt(dom.get('KID_std'), 2)}"  # subsets that are the whole set do not vary
    lines = [
        "# brainfusion evaluation report",
        "",
        f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; all metrics at {R}x{R} px; seed {results.get('seed')}.",
        "",
        "## Sample counts",
        "",
        "| set | images |",
        "|---|---|",
        f"| generated | {_fmt(c.get('generated'))} |",
        f"| real (held-out) | {_fmt(c.get('real'))} |",
        f"| train | {_fmt(c.get('train'))} |",
        f"| Inception FID/KID, per set | {_fmt(c.get('inception_per_set'))} |",
        f"| MS-SSIM pairs, per set | {_fmt(c.get('diversity_pairs_per_set'))} |",
        "",
        "## Metrics",
        "",
        "| metric | value | how to read it |",
        "|---|---|---|",
        f"| FD_domain | {_fmt(s.get('FD_domain'))} | Fréchet distance on {dom.get('feature_dim', '?')}-d `{dom.get('extractor', '?')}` features; lower is better; compare only at equal sample counts |",
        f"| KID_domain | {_fmt(s.get('KID_domain'))}{kid_spread} | unbiased MMD², cubic kernel, {dom.get('KID_subsets', '?')} subsets of {dom.get('KID_subset_size', '?')}; ≈0 for same distribution |",
        f"| FID_inception | {_fmt(s.get('FID_inception'))} | "
        + ("skipped (see notes)" if inc.get("skipped") else f"Inception-v3 pool3 (TF-FID weights) on {_fmt(c.get('inception_per_set'))} images per set; compare only at the same count")
        + " |",
        f"| KID_inception | {_fmt(s.get('KID_inception'))} | as KID_domain on Inception features |",
        f"| MS-SSIM generated | {_fmt(s.get('msssim_gen'))} | mean over random pairs ({div.get('scales', '?')} scales, {div.get('window', '?')}-px window); higher than real = less diverse |",
        f"| MS-SSIM real | {_fmt(s.get('msssim_real'))} | the same among real images |",
        f"| memorisation | {_fmt(None if s.get('memorization_share') is None else 100 * s['memorization_share'], 3)} % | near-copies of training images; ≈{_fmt(100 * mem.get('expected_share_without_copying', 0.01), 2)} % expected by chance |",
        f"| spectrum distance | {_fmt(s.get('spectrum_distance'))} | mean abs. difference of log10 radial power spectra |",
        f"| histogram W1 | {_fmt(s.get('histogram_w1'))} | Wasserstein-1 (grey levels) of brain-voxel intensities (> {hist.get('foreground_threshold', '?')}) |",
        f"| foreground fraction | {_fmt(hist.get('foreground_fraction_gen'))} vs {_fmt(hist.get('foreground_fraction_real'))} | share of brain pixels, generated vs real |",
        "",
    ]
    notes = []
    if inc.get("skipped"):
        notes.append(inc.get("reason", "Inception FID/KID was skipped."))
    if mem.get("skipped"):
        notes.append(mem.get("reason", "Memorisation was not checked."))
    else:
        notes.append(
            f"Memorisation rule: {mem.get('rule')}; threshold r = {_fmt(mem.get('threshold_correlation'))} from "
            f"{mem.get('n_heldout_real')} held-out images against {mem.get('n_train')} training images "
            f"(median nearest-train correlation: generated {_fmt(mem.get('nearest_corr_gen_median'))}, held-out "
            f"{_fmt(mem.get('nearest_corr_real_median'))}). The SSIM version of the rule (threshold "
            f"{_fmt(mem.get('threshold_ssim'))}) flags {_fmt(100 * mem.get('share_near_copies_ssim', float('nan')), 3)} %; "
            f"it is not used for the headline because SSIM drops sharply for copies with faint noise on a black background."
        )
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    captions = {
        "samples": "Generated and real samples",
        "pairs": "Closest generated / nearest training pairs (SSIM and correlation r under each pair)",
        "spectrum": "Radially averaged power spectra",
        "histogram": "Brain-voxel intensity histograms",
    }
    if figs:
        lines += ["## Figures", ""]
        for key, name in figs.items():
            lines += [f"### {captions[key]}", "", f"![{captions[key]}]({name})", ""]
    t = results.get("timing_s", {})
    if t:
        lines += ["## Timing", "", ", ".join(f"{k} {v:.1f} s" for k, v in t.items()), ""]
    v = results.get("versions", {})
    if v:
        lines += ["## Versions", "", ", ".join(f"{k} {val}" for k, val in v.items()), ""]
    return "\n".join(lines)


def write_report(results: dict, generated: np.ndarray, real: np.ndarray, pairs, out_dir: Path) -> Path:
    """Write metrics.json, report.md and the figures into `out_dir`; returns the report.md path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    if "versions" not in results:
        results["versions"] = versions()
    figs = _figures(results, generated, real, pairs, out_dir)
    results["figures"] = figs
    text = json.dumps(_jsonable(results), indent=2, allow_nan=False)
    atomic_write_bytes(out_dir / "metrics.json", (text + "\n").encode())
    return atomic_write_bytes(out_dir / "report.md", _markdown(results, figs).encode())
