"""Deterministic demo training set of realistic axial brain-MRI slices.

The set is cut from the MNI ICBM152 2009a nonlinear symmetric T1 template (with its grey- and
white-matter probability maps) that the nilearn wheel ships, so no download is needed. Every
synthetic subject is the template pushed through its own random deformation (affine + smooth
elastic field + ventricle enlargement + cortical atrophy) and intensity model (tissue contrast,
bias field, gamma, contrast/brightness, sharpening, Rician-like noise), so subjects differ in
anatomy and appearance, not just by noise.

The output mirrors the OASIS "keras_png_slices" layout::

    out_dir/
      README.txt
      keras_png_slices_train/      case_001_slice_0.nii.png ...   (skull-stripped T1, uint8)
      keras_png_slices_validate/
      keras_png_slices_test/
      keras_png_slices_seg_train/  seg_001_slice_0.nii.png ...    (0 bg, 85 CSF, 170 GM, 255 WM)
      keras_png_slices_seg_validate/
      keras_png_slices_seg_test/
      labels.csv                   file,subject,split,ventricles,ventricle_gain,atrophy,slice_level

Subject ``i`` uses ``numpy.random.default_rng([seed, i])`` only, so a subject's slices do not
depend on how many other subjects are built or in which order.

Template copyright (ICBM 2009a): Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging
Centre, Montreal Neurological Institute, McGill University; redistributed here in derived form
under its permissive licence (see the README.txt written with each dataset).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import BrainfusionError

__all__ = ["DemoDataConfig", "build_demo_dataset", "SPLITS"]

SPLITS = ("train", "validate", "test")

# Template file names inside <nilearn>/datasets/data/.
_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Typical template T1 values (uint8 scale) of pure CSF, GM and WM, measured on the template.
_T1_CSF, _T1_GM, _T1_WM = 68.0, 166.0, 222.0

# Area (fraction of the square field of view) a slice's brain must cover to be kept.
_MIN_BRAIN_FRACTION = 0.15
# labels.csv's "ventricles" class: the terciles of the ventricle gain's distribution (0.4 · Beta(1.3, 3)),
# so the three classes are about equally common and a subject's class does not depend on the others.
_VENTRICLE_CLASSES = ((0.0726, "low"), (0.1492, "mid"), (math.inf, "high"))
LABELS_FILE = "labels.csv"
# Coarse grid used to find each subject's axial brain extent.
_SCOUT_SIZE = 32
_SCOUT_STEP_MM = 2.0


@dataclass
class DemoDataConfig:
    n_subjects: int = 48  # synthetic subjects (deformed copies of the template)
    slices_per_subject: int = 50  # axial slices kept per subject
    image_size: int = 128  # PNG side written (square), grayscale uint8
    seed: int = 0
    validate_fraction: float = 0.1  # share of subjects in keras_png_slices_validate
    test_fraction: float = 0.2  # share in keras_png_slices_test; rest train


# --------------------------------------------------------------------------------------------
# Template loading
# --------------------------------------------------------------------------------------------


def _nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise BrainfusionError(
            "The demo data set is cut from the MNI152 template shipped with nilearn, which is "
            "not installed; run `pip install nilearn` and try again."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


@dataclass(frozen=True)
class _Template:
    # Volumes are stored with axes (z, y, x) so that x, the fastest axis of the output raster, is
    # contiguous in memory (much better cache use when resampling).
    t1: np.ndarray  # uint8, template T1 (already skull-stripped: 0 outside the brain)
    gm: np.ndarray  # uint8, GM probability * 255
    wm: np.ndarray  # uint8, WM probability * 255
    loss: np.ndarray  # uint8, GM that atrophy turns into CSF first (GM next to CSF) * 255
    mask: np.ndarray  # uint8, 255 inside the brain
    origin: np.ndarray  # mm coordinate of voxel (0, 0, 0); voxels are 1 mm, axes RAS
    brain_lo: np.ndarray  # mm bounding box of the brain
    brain_hi: np.ndarray
    ventricle_center: np.ndarray  # mm


@lru_cache(maxsize=1)
def _load_template() -> _Template:
    import nibabel as nib
    from scipy import ndimage as ndi

    data_dir = _nilearn_data_dir()
    arrays = {}
    affine = None
    for key, name in _TEMPLATE_FILES.items():
        path = data_dir / name
        if not path.is_file():
            raise BrainfusionError(
                f"The nilearn install lacks the MNI152 template file {path}; reinstall it "
                "with `pip install --force-reinstall nilearn` and try again."
            )
        img = nib.load(str(path))
        arrays[key] = np.asarray(img.dataobj, dtype=np.uint8)
        affine = img.affine
    assert affine is not None
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise BrainfusionError(
            "The nilearn MNI152 template is not the expected 1 mm RAS volume; reinstall nilearn "
            "with `pip install --force-reinstall nilearn`."
        )
    origin = affine[:3, 3].astype(np.float64)

    t1, gm, wm = arrays["t1"], arrays["gm"], arrays["wm"]
    inside = t1 > 0
    gm_p = gm.astype(np.float32) / 255.0
    wm_p = wm.astype(np.float32) / 255.0
    csf_p = np.clip(1.0 - gm_p - wm_p, 0.0, 1.0) * inside
    # GM adjacent to CSF (sulci, outer surface, around ventricles): what atrophy eats first.
    near_csf = np.clip(ndi.gaussian_filter(csf_p, 1.5) / 0.2, 0.0, 1.0)
    loss = np.round(gm_p * near_csf * 255.0).astype(np.uint8)

    idx = np.argwhere(inside)
    brain_lo = idx.min(0) + origin
    brain_hi = idx.max(0) + origin
    # Lateral ventricles: CSF in a central box around the midline.
    vox = np.argwhere(csf_p > 0.5)
    mm = vox + origin
    central = (
        (np.abs(mm[:, 0]) < 30) & (mm[:, 1] > -50) & (mm[:, 1] < 30) & (mm[:, 2] > -10) & (mm[:, 2] < 40)
    )
    center = mm[central].mean(0) if central.any() else np.array([0.0, -18.0, 11.0])

    def zyx(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.transpose(2, 1, 0))

    return _Template(
        t1=zyx(t1),
        gm=zyx(gm),
        wm=zyx(wm),
        loss=zyx(loss),
        mask=zyx((inside * np.uint8(255)).astype(np.uint8)),
        origin=origin,
        brain_lo=brain_lo.astype(np.float64),
        brain_hi=brain_hi.astype(np.float64),
        ventricle_center=center.astype(np.float64),
    )


# --------------------------------------------------------------------------------------------
# Per-subject random anatomy and appearance
# --------------------------------------------------------------------------------------------


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class _Subject:
    """All random draws of one subject (made first, in a fixed order, from its own generator)."""

    matrix: np.ndarray  # 3x3 linear part, subject mm -> template mm (about the brain centre)
    translation: np.ndarray
    elastic_coef: np.ndarray  # (3, nx, ny, nz) cubic B-spline coefficients (mm), 20 mm spacing
    ventricle_gain: float
    ventricle_sigma: np.ndarray
    atrophy: float
    knots: np.ndarray  # target brightness of CSF, GM, WM
    sulcal: float  # brightness of half-CSF/half-GM voxels, as a fraction of the CSF..GM step
    sharpen: float
    bias_coef: np.ndarray  # 10 coefficients of a quadratic polynomial
    bias_amp: float
    gamma: float
    contrast: float
    brightness: float
    noise: float
    noise_seed: int


@dataclass(frozen=True)
class _Frame:
    """The subject-space box that is imaged: a square in-plane FOV and an axial range (mm)."""

    center_xy: np.ndarray
    half: float
    z_lo: float
    z_hi: float


_COARSE_SPACING = 40.0
_FINE_SPACING = 20.0


def _frame(tpl: _Template) -> _Frame:
    center = (tpl.brain_lo + tpl.brain_hi) / 2.0
    extent = (tpl.brain_hi - tpl.brain_lo)[:2].max()
    return _Frame(
        center_xy=center[:2],
        half=0.5 * extent * 1.2,
        z_lo=float(tpl.brain_lo[2]) - 12.0,
        z_hi=float(tpl.brain_hi[2]) + 12.0,
    )


def _coef_shape(frame: _Frame, spacing: float) -> tuple[int, int, int]:
    side = 2 * frame.half
    return (
        int(math.ceil(side / spacing)) + 3,
        int(math.ceil(side / spacing)) + 3,
        int(math.ceil((frame.z_hi - frame.z_lo) / spacing)) + 3,
    )


def _resample_spline(coef: np.ndarray, spacing: float, shape: tuple, new_spacing: float) -> np.ndarray:
    """B-spline coefficients on a grid of ``new_spacing`` (same origin convention) that
    interpolate the cubic B-spline ``coef`` of control spacing ``spacing``."""
    from scipy import ndimage as ndi

    # Control point j of a grid sits at lo + (j - 1) * spacing (see _bspline_matrix).
    pos = [(np.arange(n) - 1.0) * new_spacing / spacing + 1.0 for n in shape]
    grid = np.stack(np.meshgrid(*pos, indexing="ij"))
    out = np.empty((coef.shape[0],) + tuple(shape))
    for c in range(coef.shape[0]):
        values = ndi.map_coordinates(coef[c], grid, order=3, prefilter=False, mode="nearest")
        out[c] = ndi.spline_filter(values, order=3, mode="mirror")
    return out


def _draw_subject(rng: np.random.Generator, frame: _Frame) -> _Subject:
    deg = math.pi / 180.0
    # Rotation: mostly in-plane (about z), a little pitch/roll.
    rot = _rotation(rng.normal(0, 1.5) * deg, rng.normal(0, 1.5) * deg, rng.uniform(-6, 6) * deg)
    scale = rng.uniform(0.92, 1.08, size=3)
    translation = np.array([rng.uniform(-3, 3), rng.uniform(-4, 4), rng.uniform(-3, 3)])
    # A cubic B-spline with iid coefficients of std s has a field std of about 0.35 s.
    # Elastic field = a smooth large-scale part (40 mm control spacing, ~2 mm rms per axis) plus a
    # finer one (20 mm, ~0.6 mm). The coarse spline is resampled onto the fine control grid (and
    # spline-prefiltered) so the sum is one B-spline, evaluated in a single pass.
    coarse = rng.normal(0, 2.0 / 0.35, size=(3,) + _coef_shape(frame, _COARSE_SPACING))
    fine = rng.normal(0, 0.6 / 0.35, size=(3,) + _coef_shape(frame, _FINE_SPACING))
    elastic_coef = fine + _resample_spline(coarse, _COARSE_SPACING, fine.shape[1:], _FINE_SPACING)
    # Ventricle enlargement (gain 0 = template, 0.3+ = clearly enlarged) and cortical atrophy.
    ventricle_gain = float(rng.beta(1.3, 3.0) * 0.4)
    ventricle_sigma = np.array([20.0, 28.0, 18.0]) * rng.uniform(0.9, 1.15, size=3)
    atrophy = float(0.1 + rng.beta(1.3, 3.0) * 0.7)
    knots = np.array([rng.uniform(0.03, 0.12), rng.uniform(0.42, 0.56), rng.uniform(0.78, 0.90)])
    sulcal = float(rng.uniform(0.2, 0.45))
    sharpen = float(rng.uniform(0.4, 1.0))
    bias_coef = rng.normal(0, 1, size=10)  # [0] unused (constant term)
    bias_amp = float(rng.uniform(0.05, 0.15))
    gamma = float(math.exp(rng.uniform(math.log(0.7), math.log(1.4))))
    contrast = float(rng.uniform(0.9, 1.1))
    brightness = float(rng.uniform(-0.05, 0.05))
    noise = float(rng.uniform(0.005, 0.03))
    noise_seed = int(rng.integers(2**63))
    return _Subject(
        matrix=rot @ np.diag(1.0 / scale),
        translation=translation,
        elastic_coef=elastic_coef,
        ventricle_gain=ventricle_gain,
        ventricle_sigma=ventricle_sigma,
        atrophy=atrophy,
        knots=knots,
        sulcal=sulcal,
        sharpen=sharpen,
        bias_coef=bias_coef,
        bias_amp=bias_amp,
        gamma=gamma,
        contrast=contrast,
        brightness=brightness,
        noise=noise,
        noise_seed=noise_seed,
    )


def _pixel_axes(frame: _Frame, zs: np.ndarray, size: int):
    """Subject-space mm positions of the pixel columns (x), rows (y) and slices (z).

    Rows run anterior -> posterior (nose up) and columns patient right -> left (radiological),
    so the grid of slice ``k`` is ``(x[col], y[row], zs[k])``.
    """
    step = 2 * frame.half / size
    offs = frame.half - (np.arange(size) + 0.5) * step
    x = frame.center_xy[0] + offs  # column c: patient right (+x) first
    y = frame.center_xy[1] + offs  # row r: anterior (+y) first
    return x, y, np.asarray(zs, dtype=np.float64)


def _bspline_matrix(pos: np.ndarray, lo: float, spacing: float, n_coef: int) -> np.ndarray:
    """Cubic B-spline weights (len(pos), n_coef) of control points spaced ``spacing`` from ``lo``."""
    u = np.abs((pos[:, None] - lo) / spacing + 1.0 - np.arange(n_coef)[None, :])
    w = np.where(u < 1.0, 2.0 / 3.0 - u**2 + 0.5 * u**3, np.where(u < 2.0, (2.0 - u) ** 3 / 6.0, 0.0))
    return w.astype(np.float32)


def _template_voxels(subject: _Subject, tpl: _Template, frame: _Frame, zs: np.ndarray, size: int):
    """Template voxel coordinates, (3, n, size, size) float32 in (z, y, x) order, that each pixel
    of the subject's slices at levels ``zs`` samples.

    Subject point p maps to template point V(M (p + d(p) - c) + c + t): d is the elastic field
    (two cubic B-splines, control spacing 40 and 20 mm), M and t the affine about the frame
    centre c, and V the ventricle enlargement. On the regular pixel grid everything separates:
    M p is a sum of per-axis terms and M d is the B-spline with coefficients M applied to d's.
    """
    x, y, z = _pixel_axes(frame, zs, size)
    center = np.array([frame.center_xy[0], frame.center_xy[1], 0.5 * (frame.z_lo + frame.z_hi)])
    m = subject.matrix
    shift = (center + subject.translation - m @ center).astype(np.float32)
    q = np.empty((3, len(z), size, size), dtype=np.float32)
    for i in range(3):
        q[i] = (m[i, 0] * x).astype(np.float32)[None, None, :]
        q[i] += (m[i, 1] * y + shift[i]).astype(np.float32)[None, :, None]
        q[i] += (m[i, 2] * z).astype(np.float32)[:, None, None]
    lo = (frame.center_xy[0] - frame.half, frame.center_xy[1] - frame.half, frame.z_lo)
    coef = np.tensordot(m, subject.elastic_coef, axes=([1], [0])).astype(np.float32)  # M d
    bx = _bspline_matrix(x, lo[0], _FINE_SPACING, coef.shape[1])
    by = _bspline_matrix(y, lo[1], _FINE_SPACING, coef.shape[2])
    bz = _bspline_matrix(z, lo[2], _FINE_SPACING, coef.shape[3])
    a = np.tensordot(coef, bz, axes=([3], [1]))  # (3, nx, ny, Z)
    a = np.tensordot(a, by, axes=([2], [1]))  # (3, nx, Z, Y)
    q += np.tensordot(a, bx, axes=([1], [1]))  # (3, Z, Y, X)
    # Ventricle enlargement: pull sample points towards the ventricle centre. The radial map
    # r -> r (1 - g exp(-r^2 / 2)) is monotone for g < 1, so nothing folds.
    if subject.ventricle_gain > 0:
        vc = tpl.ventricle_center.astype(np.float32)
        d = q - vc[:, None, None, None]
        r2 = np.zeros(q.shape[1:], dtype=np.float32)
        for i in range(3):
            r2 += (d[i] * np.float32(1.0 / subject.ventricle_sigma[i])) ** 2
        factor = np.float32(1.0) - np.float32(subject.ventricle_gain) * np.exp(np.float32(-0.5) * r2)
        q = vc[:, None, None, None] + d * factor
    q -= tpl.origin.astype(np.float32)[:, None, None, None]
    return q[::-1]


def _sample(vol: np.ndarray, vox: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.map_coordinates(vol, vox, order=1, mode="constant", cval=0.0, output=np.float32)


def _pick_slices(subject: _Subject, tpl: _Template, frame: _Frame, n: int) -> np.ndarray:
    """``n`` axial levels (mm) spread over the levels where the brain fills >= 15 % of the FOV."""
    zs = np.arange(frame.z_lo, frame.z_hi + 1e-6, _SCOUT_STEP_MM)
    vox = _template_voxels(subject, tpl, frame, zs, _SCOUT_SIZE)
    area = (_sample(tpl.mask, vox) > 127.5).mean(axis=(1, 2))
    keep = np.flatnonzero(area >= _MIN_BRAIN_FRACTION)
    if keep.size == 0:  # cannot happen with the shipped template; keep the fullest level
        keep = np.array([int(area.argmax())])
    lo, hi = zs[keep[0]], zs[keep[-1]]
    # Stay a little inside the extreme kept levels so the end slices are not borderline.
    margin = min(2.0, 0.25 * (hi - lo))
    return np.linspace(lo + margin, hi - margin, n)


def _render_subject(subject: _Subject, tpl: _Template, frame: _Frame, zs: np.ndarray, size: int):
    """Images and label maps (uint8, (n, size, size)) of one subject's slices at levels ``zs``."""
    from scipy import ndimage as ndi

    vox = _template_voxels(subject, tpl, frame, zs, size)
    mask_p = _sample(tpl.mask, vox)
    mask = mask_p > 127.5
    # Everything else only where the brain is within one voxel (the T1 is 0 beyond it anyway).
    near = mask_p > 0
    pts = vox[:, near]

    def sample_near(vol: np.ndarray, scale: float = 1.0) -> np.ndarray:
        out = np.zeros(near.shape, dtype=np.float32)
        out[near] = _sample(vol, pts) * np.float32(scale)
        return out

    t1 = sample_near(tpl.t1)
    gm = sample_near(tpl.gm, 1 / 255.0)
    wm = sample_near(tpl.wm, 1 / 255.0)
    loss = sample_near(tpl.loss, subject.atrophy / 255.0)

    # Cortical atrophy: GM bordering CSF becomes CSF (sulci and ventricles widen, cortex thins).
    gm = gm - loss
    t1 = t1 - loss * np.float32(_T1_GM - _T1_CSF)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)

    # Labels: most probable tissue inside the brain mask.
    seg = np.where(gm > csf, np.uint8(170), np.uint8(85))
    seg = np.where(wm > np.maximum(gm, csf), np.uint8(255), seg)
    seg[~mask] = 0  # stored like OASIS seg PNGs: 0 background, 85 CSF, 170 GM, 255 WM

    # Tissue contrast: piecewise-linear remap of template CSF/GM/WM levels to this subject's.
    c, g, w = subject.knots
    # Partial-volume CSF/GM voxels are darkened (sulcal knot below the straight line) because an
    # average template smears thin sulci that a single scan shows as dark lines.
    xp = [0.0, _T1_CSF, 0.5 * (_T1_CSF + _T1_GM), _T1_GM, _T1_WM, 255.0]
    fp = [0.0, c, c + subject.sulcal * (g - c), g, w, w + (w - g) * (255.0 - _T1_WM) / (_T1_WM - _T1_GM)]
    img = np.interp(t1, xp, fp).astype(np.float32)
    # The template is an average of many brains, hence blurrier than one scan: sharpen in-plane.
    img = img + np.float32(subject.sharpen) * (img - ndi.gaussian_filter(img, (0, 1.0, 1.0)))
    img = np.clip(img, 0.0, None)

    # Smooth multiplicative bias field: quadratic polynomial over the brain box, +-bias_amp.
    axes = _pixel_axes(frame, zs, size)
    u = [
        ((axes[i] - (tpl.brain_lo[i] + tpl.brain_hi[i]) / 2) / ((tpl.brain_hi[i] - tpl.brain_lo[i]) / 2)).astype(
            np.float32
        )
        for i in range(3)
    ]
    ux, uy, uz = u[0][None, None, :], u[1][None, :, None], u[2][:, None, None]
    bc = subject.bias_coef.astype(np.float32)
    # Quadratic polynomial, grouped so that the full-size arrays are built only a few times.
    field = (bc[1] * ux + bc[4] * ux * uy + bc[7] * ux**2) + (bc[2] * uy + bc[8] * uy**2)
    field = field + (bc[3] * uz + bc[9] * uz**2) + (bc[5] * uz) * ux + (bc[6] * uz) * uy
    field = field - field[mask].mean() if mask.any() else field
    peak = np.abs(field[mask]).max() if mask.any() else 1.0
    img = img * (1.0 + subject.bias_amp * field / max(peak, 1e-6)).astype(np.float32)

    img = np.clip(img, 0.0, 1.0) ** np.float32(subject.gamma)
    img = img * np.float32(subject.contrast) + np.float32(subject.brightness)
    # Rician-like noise: magnitude of a complex signal with Gaussian noise on both channels.
    rng = np.random.default_rng(subject.noise_seed)
    sigma = np.float32(subject.noise)
    n1 = rng.standard_normal(size=img.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(size=img.shape, dtype=np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2**2)
    img[~mask] = 0.0  # skull-stripped: brain on a black background
    img = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return img, seg


# --------------------------------------------------------------------------------------------
# Dataset assembly
# --------------------------------------------------------------------------------------------


def _validate(config: DemoDataConfig) -> None:
    def bad(msg: str) -> BrainfusionError:
        return BrainfusionError(msg)

    if not isinstance(config.n_subjects, int) or config.n_subjects < 1:
        raise bad(f"n_subjects must be a positive integer, got {config.n_subjects!r}; set it to 1 or more.")
    if not isinstance(config.slices_per_subject, int) or config.slices_per_subject < 1:
        raise bad(
            f"slices_per_subject must be a positive integer, got {config.slices_per_subject!r}; set it to 1 or more."
        )
    if not isinstance(config.image_size, int) or not 16 <= config.image_size <= 1024:
        raise bad(f"image_size must be an integer from 16 to 1024, got {config.image_size!r}; pick e.g. 128.")
    for name in ("validate_fraction", "test_fraction"):
        v = getattr(config, name)
        if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise bad(f"{name} must be a number in [0, 1), got {v!r}; pick e.g. 0.1.")
    if config.validate_fraction + config.test_fraction >= 1.0:
        raise bad("validate_fraction + test_fraction must be below 1 so that some subjects are left to train on.")


def _split_subjects(config: DemoDataConfig) -> dict[str, list[int]]:
    """Subject indices per split (whole subjects only), deterministic in ``seed``."""
    n = config.n_subjects
    n_val = int(round(n * config.validate_fraction))
    n_test = int(round(n * config.test_fraction))
    if n >= 3:  # a requested split gets at least one subject when there are enough
        n_val = max(n_val, 1) if config.validate_fraction > 0 else 0
        n_test = max(n_test, 1) if config.test_fraction > 0 else 0
    while n - n_val - n_test < 1:  # keep at least one training subject
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    order = np.random.default_rng([config.seed, n, 7]).permutation(n)
    split = {
        "train": sorted(order[: n - n_val - n_test].tolist()),
        "validate": sorted(order[n - n_val - n_test : n - n_test].tolist()),
        "test": sorted(order[n - n_test :].tolist()),
    }
    return split


def _image_dir(split: str) -> str:
    return f"keras_png_slices_{split}"


def _seg_dir(split: str) -> str:
    return f"keras_png_slices_seg_{split}"


def _readme(config: DemoDataConfig, subjects: dict[str, list[int]], counts: dict[str, int]) -> str:
    cfg = "\n".join(f"  {k} = {v!r}" for k, v in asdict(config).items())
    split_lines = "\n".join(
        f"  {s:<8s} {len(subjects[s]):4d} subjects, {counts[s]:6d} slices  ({_image_dir(s)}/, {_seg_dir(s)}/)"
        for s in SPLITS
    )
    return f"""brainfusion demo data set (synthetic, for trying the pipeline without downloading OASIS)

What it is
  Skull-stripped axial T1-weighted brain MRI slices in the OASIS "keras_png_slices" layout,
  cut from the MNI ICBM152 2009a nonlinear symmetric template shipped with nilearn. Each
  "subject" is the template under its own random deformation (affine, smooth elastic field,
  ventricle enlargement, cortical atrophy) and intensity model (tissue contrast, bias field,
  gamma, contrast/brightness, sharpening, Rician-like noise). These are NOT real patients:
  all subjects share one underlying anatomy, so do not use this set to report results.

Files
  case_NNN_slice_K.nii.png  grayscale uint8 image, {config.image_size}x{config.image_size}, nose up,
                            radiological orientation (patient right on image left),
                            K = 0 (inferior) .. {config.slices_per_subject - 1} (superior)
  seg_NNN_slice_K.nii.png   tissue labels of the same slice: 0 background, 85 CSF, 170 grey
                            matter, 255 white matter
  labels.csv                one row per slice: file (relative path), subject, split, ventricles
                            (low/mid/high ventricle enlargement), ventricle_gain, atrophy (the
                            subject's drawn deformation) and slice_level (K scaled to 0..1), for
                            conditional training (train --labels <this folder>/labels.csv
                            --label-columns ventricles --continuous-columns atrophy)
  Subjects are split whole: no subject appears in two splits.

Splits
{split_lines}

Config
{cfg}

Template licence
  ICBM 2009a Nonlinear Symmetric template. Copyright (C) 1993-2009 Louis Collins, McConnell
  Brain Imaging Centre, Montreal Neurological Institute, McGill University. Permission to use,
  copy, modify, and distribute this software and its documentation for any purpose and without
  fee is hereby granted, provided that the above copyright notice appear in all copies. The
  authors and McGill University make no representations about the suitability of this software
  for any purpose. It is provided "as is" without express or implied warranty. The authors are
  not responsible for any data loss, equipment damage, property loss, or injury to subjects or
  patients resulting from the use or misuse of this software package.
  Reference: V. Fonov et al., NeuroImage 54(1), 2011; NeuroImage 47 S102, 2009.
"""


def _label_rows(split: str, case: str, subject: _Subject, n: int) -> list[str]:
    """labels.csv rows of one subject's slices: what its deformation drew, as labels to condition on
    (issue 12): ventricle-enlargement class and gain, cortical atrophy, and the slice level k/(n−1)."""
    ventricles = next(name for limit, name in _VENTRICLE_CLASSES if subject.ventricle_gain < limit)
    return [
        f"{_image_dir(split)}/case_{case}_slice_{k}.nii.png,case_{case},{split},{ventricles},"
        f"{subject.ventricle_gain:.6f},{subject.atrophy:.6f},{k / (n - 1) if n > 1 else 0.5:.6f}"
        for k in range(n)
    ]


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise BrainfusionError(f"{out_dir} exists and is not a folder; delete it or pick another output path.")
        if any(out_dir.iterdir()):
            raise BrainfusionError(
                f"{out_dir} already exists and is not empty; delete it or pick another output path."
            )


def start_build(out_dir: Path, config: DemoDataConfig) -> tuple[Path, _Template, _Frame]:
    """The absolute output folder (checked to be free) and the template and frame every subject is drawn in."""
    # Absolute and normalised, so that "." or "a/.." still have a name to put ".tmp-<pid>" on.
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    _validate(config)
    _check_out_dir(out_dir)
    tpl = _load_template()
    return out_dir, tpl, _frame(tpl)


@contextlib.contextmanager
def built_beside(out_dir: Path) -> Iterator[Path]:
    """A folder `<out_dir>.tmp-<pid>` to build into, renamed onto `out_dir` when the block ends well and removed when
    it does not, so an interrupted build never leaves a half-written `out_dir`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left over from an earlier run that had our pid
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        yield tmp
        _check_out_dir(out_dir)  # someone may have filled it meanwhile
        if out_dir.exists():
            out_dir.rmdir()  # empty folder: replace it
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_demo_dataset(out_dir: Path, config: DemoDataConfig = DemoDataConfig(), progress: bool = True) -> dict:
    """Build the demo set into ``out_dir`` (which must not exist, or be empty).

    The set is built in ``<out_dir>.tmp-<pid>`` next to it and renamed into place at the end, so an
    interrupted build never leaves a half-written ``out_dir``.

    Returns a summary dict: ``out_dir``; ``counts`` (slices per split); ``subjects`` (subjects
    per split); ``paths`` (split -> image folder, ``seg_<split>`` -> label folder, ``readme``);
    ``seconds`` (wall time of the build); ``config`` (the config as a dict).
    """
    from PIL import Image
    from tqdm import tqdm

    start = time.perf_counter()
    out_dir, tpl, frame = start_build(out_dir, config)
    subjects = _split_subjects(config)
    split_of = {i: s for s, idx in subjects.items() for i in idx}

    with built_beside(out_dir) as tmp:
        for s in SPLITS:
            (tmp / _image_dir(s)).mkdir(parents=True)
            (tmp / _seg_dir(s)).mkdir(parents=True)
        counts = {s: 0 for s in SPLITS}
        labels = ["file,subject,split,ventricles,ventricle_gain,atrophy,slice_level"]
        with tqdm(total=config.n_subjects, desc="demo data", unit="subject", disable=not progress) as bar:
            for i in range(config.n_subjects):
                rng = np.random.default_rng([config.seed, i])
                subject = _draw_subject(rng, frame)
                zs = _pick_slices(subject, tpl, frame, config.slices_per_subject)
                images, segs = _render_subject(subject, tpl, frame, zs, config.image_size)
                split = split_of[i]
                case = f"{i + 1:03d}"
                for k in range(len(zs)):
                    Image.fromarray(images[k]).save(
                        tmp / _image_dir(split) / f"case_{case}_slice_{k}.nii.png"
                    )
                    Image.fromarray(segs[k]).save(tmp / _seg_dir(split) / f"seg_{case}_slice_{k}.nii.png")
                counts[split] += len(zs)
                labels += _label_rows(split, case, subject, len(zs))
                bar.update(1)
        (tmp / "README.txt").write_text(_readme(config, subjects, counts), encoding="utf-8")
        (tmp / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")

    paths: dict[str, str] = {}
    for s in SPLITS:
        paths[s] = str(out_dir / _image_dir(s))
        paths[f"seg_{s}"] = str(out_dir / _seg_dir(s))
    paths["readme"] = str(out_dir / "README.txt")
    paths["labels"] = str(out_dir / LABELS_FILE)
    return {
        "out_dir": str(out_dir),
        "counts": counts,
        "subjects": {s: len(v) for s, v in subjects.items()},
        "paths": paths,
        "seconds": round(time.perf_counter() - start, 3),
        "config": asdict(config),
    }
