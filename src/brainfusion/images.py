"""Pictures people look at: image grids, GIFs of the reverse process, loss curves, volumes' three planes, NIfTI files.

Every file is written to a temporary name and renamed, so a viewer never sees half a picture.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .fileio import atomic_output


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Pad a 2-D uint8 image to a centred square, then resize it to size×size."""
    h, w = image.shape
    side = max(h, w)
    canvas = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = image
    if side == size:
        return canvas
    resample = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(canvas).resize((size, size), resample), dtype=np.uint8)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N,H,W), or colour ones (N,H,W,3), into one uint8 picture, `nrow` images per row."""
    n, h, w = images.shape[:3]
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad) + images.shape[3:], dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = image
    return grid


# label 1.. colours of mask overlays (OASIS order: CSF blue, grey matter green, white matter orange, then more)
LABEL_COLOURS = np.array([(40, 120, 255), (60, 200, 80), (255, 150, 40), (220, 60, 200), (240, 230, 60), (60, 220, 220)], np.float32)


def overlay_labels(images: np.ndarray, labels: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """Grey images (N,H,W) with their tissue labels (N,H,W; 0 is background, left bare) tinted in
    colour: uint8 (N,H,W,3), so a picture shows each image and its mask together."""
    rgb = np.repeat(images[..., None].astype(np.float32), 3, axis=-1)
    for k in range(1, int(labels.max(initial=0)) + 1):
        where = labels == k
        rgb[where] = (1 - alpha) * rgb[where] + alpha * LABEL_COLOURS[(k - 1) % len(LABEL_COLOURS)]
    return rgb.round().clip(0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: Path) -> Path:
    with atomic_output(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)


def save_nifti_slice(image: np.ndarray, path: Path, spacing_mm: float) -> Path:
    """A slice as a one-slice NIfTI (.nii.gz) that ITK-SNAP and FSLeyes open the right way up: voxels in
    RAS+ (the inverse of the loader's `np.rot90` of an axial slice: anterior at the top, the patient's
    left on the left), `spacing_mm` in plane and through it, the affine saying so (qform and sform)."""
    volume = np.ascontiguousarray(np.rot90(image, -1))[:, :, None]
    return save_nifti(volume, np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0]), path)


def save_nifti(voxels: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Voxels (x, y, z) with their voxel-to-world `affine` (mm) as a gzipped NIfTI, the affine in both qform and sform
    so every viewer places it alike; gzipped without a timestamp, so the same voxels give the same bytes."""
    import gzip

    import nibabel as nib

    nifti = nib.Nifti1Image(voxels, affine)
    nifti.header.set_xyzt_units("mm")
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(gzip.compress(nifti.to_bytes(), mtime=0))
    return Path(path)


def three_planes(volume: np.ndarray) -> list[np.ndarray]:
    """The axial, coronal and sagittal mid-slices of a volume in (inferior→superior, posterior→anterior,
    left→right) voxel order (data/volumes.py), each turned so the top of the picture is anterior or superior."""
    d, h, w = volume.shape
    return [volume[d // 2][::-1], volume[:, h // 2][::-1], volume[:, :, w // 2][::-1]]


def volume_montage(volumes: np.ndarray, pad: int = 2) -> np.ndarray:
    """One row per volume of its axial, coronal and sagittal mid-slices (uint8 (n, D, H, W) → one uint8 picture)."""
    rows = []
    for volume in volumes:
        planes = three_planes(volume)
        height = max(p.shape[0] for p in planes)
        tiles = [np.pad(p, ((0, height - p.shape[0]), (0, pad))) for p in planes]
        rows.append(np.pad(np.concatenate(tiles, 1), ((0, pad), (0, 0))))
    return np.concatenate(rows, 0)


def axial_frames(volumes: np.ndarray) -> list[np.ndarray]:
    """The axial slices of volumes (n, D, H, W), inferior to superior, each frame a grid of the n volumes' slice."""
    return [make_grid(volumes[:, k, ::-1]) for k in range(volumes.shape[1])]


def save_grid(images: np.ndarray, path: Path, nrow: int | None = None) -> Path:
    return save_png(make_grid(images, nrow), path)


def save_gif(frames: list[np.ndarray], path: Path, duration_ms: int = 80, hold_last_ms: int = 1500) -> Path:
    """Animated GIF of uint8 frames; the last frame is held so the result can be seen."""
    pictures = [Image.fromarray(f) for f in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    with atomic_output(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return Path(path)


def plot_loss_curve(log_csv: Path, path: Path) -> Path | None:
    """The seed's training-loss plot, from the CSV log, with a smoothed curve on top."""
    log_csv = Path(log_csv)
    if not log_csv.is_file():
        return None
    with open(log_csv) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("loss") not in (None, "", "nan")]
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    window = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    ax.plot(steps[window - 1 :], smooth, lw=1.6, label=f"moving mean ({window})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path, **savefig) -> Path:
    """Render a matplotlib figure to a PNG file atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", **savefig)
    finally:
        plt.close(fig)
    return Path(path)
