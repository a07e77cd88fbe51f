"""Data sources → whole brain volumes on one grid, for volume runs (data.volumes).

Every source the slice path reads as volumes is read here by the same code (slices.py's discovery, BIDS
and OASIS-1 layouts, DICOM series grouping, header checks, bad-file handling and subject IDs); only
what a volume run does differently lives here:
  * each volume is reoriented to RAS+ (nibabel's `as_closest_canonical`) and normalised as the slice path
    normalises it (`slices._robust_uint8`, per volume);
  * it is resampled by trilinear interpolation, after a Gaussian against aliasing where the grid is coarser,
    onto `grid`³ voxels of `spacing` mm whose centre is the centre of the brain's bounding box, so every
    subject sits in the middle of the same field of view whatever its scanner coordinates;
  * the result is held as uint8 (n, D, H, W) in (inferior→superior, posterior→anterior, left→right) voxel
    order, the transpose of the RAS+ voxel array: `volume[k]` is an axial slice and the last axis flips
    left and right, as a slice's does. `grid_affine` is the voxel-to-world map of that order's transpose.
Resampled volumes are cached once as an .npz in the user's cache folder (cache.py), as slices are.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import BrainfusionError
from ..fileio import atomic_output
from .cache import SOURCE_KEY, cache_dir, source_of
from .dicom import series_image
from .slices import (IMAGE_SUFFIXES, MAX_SIDE, MAX_VOXELS, _bad_file, _cache_key, _check_volume_header, _robust_uint8,
                     _subject, _suffix, _Unit, _units, _warn_skipped, discover_files)

log = logging.getLogger(__name__)

CACHE_VERSION = 1
FOREGROUND = 12  # uint8 level above which a voxel counts as brain (the slice path's threshold)


@dataclass
class VolumeSet:
    """Resampled volumes (uint8, N×G×G×G) and what they came from; the per-item fields are SliceSet's, so
    subject hold-outs (subjects.py) and conditions (conditions.py) take either."""

    images: np.ndarray
    sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    levels: np.ndarray | None = None  # volumes have no slice level

    def __len__(self) -> int:
        return len(self.images)


def grid_affine(grid: int, spacing: float, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """The RAS+ voxel-to-world map (mm) of a grid³ volume of `spacing` mm centred on `centre`, in (x, y, z) voxel
    order: what generated volumes are written with, centred on the world origin."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(centre, dtype=np.float64) - spacing * (grid - 1) / 2
    return affine


def to_ras_voxels(volume: np.ndarray) -> np.ndarray:
    """A volume in this module's (z, y, x) order → the (x, y, z) voxel array a NIfTI file stores; its own inverse."""
    return np.ascontiguousarray(volume.transpose(2, 1, 0))


def _check_affine(affine: np.ndarray) -> None:
    linear = affine[:3, :3]
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(linear)) < 1e-6 * max(np.abs(linear).max(), 1e-12) ** 3:
        raise ValueError("its affine does not place its voxels in space (singular or not finite), so it cannot be "
                         "resampled; fix the header's sform/qform")


def resample_to_grid(image, grid: int, spacing: float) -> np.ndarray:
    """A nibabel image → uint8 (grid, grid, grid) in (z, y, x) order: RAS+, normalised, brain-centred, resampled."""
    import nibabel as nib
    from scipy import ndimage as ndi

    if len(image.shape) == 4 and image.shape[3] == 1:
        image = image.slicer[..., 0]
    _check_affine(np.asarray(image.affine, dtype=np.float64))
    image = nib.as_closest_canonical(image)
    voxels = _robust_uint8(np.asarray(image.get_fdata(dtype=np.float32))).astype(np.float32)
    brain = np.argwhere(voxels > FOREGROUND)
    if brain.size == 0:
        raise ValueError("it holds no voxels brighter than its background")
    centre = image.affine @ np.append((brain.min(0) + brain.max(0)) / 2, 1.0)
    sizes = np.sqrt((image.affine[:3, :3] ** 2).sum(0))  # mm per voxel along each axis
    sigma = np.maximum(0.0, (spacing / sizes - 1) / 2)  # skimage's anti-aliasing rule for a downscale by spacing/size
    if sigma.any():
        voxels = ndi.gaussian_filter(voxels, sigma)
    to_source = np.linalg.inv(image.affine) @ grid_affine(grid, spacing, centre[:3])
    out = ndi.affine_transform(voxels, to_source[:3, :3], to_source[:3, 3], output_shape=(grid,) * 3, order=1, cval=0.0)
    return np.ascontiguousarray(np.clip(out.round(), 0, 255).astype(np.uint8).transpose(2, 1, 0))


def _read_image(unit: _Unit):
    """The nibabel image of one unit: a volume file (its header checked first) or a DICOM series; a 2-D file is refused."""
    import nibabel as nib

    if unit.series is not None:
        return series_image(unit.series, MAX_SIDE, MAX_VOXELS)
    if not unit.path.is_file():  # a FIFO or device would block or stream forever; a dangling link has no data
        raise ValueError("it is not a regular file")
    image = nib.load(str(unit.path))
    _check_volume_header(image)
    shape = tuple(image.shape) + (1,) * (3 - len(image.shape))
    if len(shape) > 4 or (len(shape) == 4 and shape[3] != 1):
        raise ValueError(f"it has shape {tuple(image.shape)}; a 3-D volume (or 4-D with one frame) is needed")
    if sorted(shape[:3])[0] == 1:
        raise BrainfusionError(f"{unit.path} holds a 2-D image (shape {tuple(image.shape)}), but volume runs read 3-D volumes; "
                               "point data.path at whole volumes, or leave out data.volumes to train on slices.")
    return image


def _refuse_slices(files: list[Path]) -> None:
    """2-D image files have no third dimension to generate: one sentence naming the first."""
    flat = [f for f in files if _suffix(f) in IMAGE_SUFFIXES]
    if flat:
        raise BrainfusionError(f"{flat[0]} is a 2-D image, but volume runs read 3-D volumes only (NIfTI, Analyze, DICOM series); "
                               "point data.path at whole volumes, or leave out data.volumes to train on slices.")


def load_volumes(config: DataConfig, progress: bool = True) -> VolumeSet:
    """Discover, read, reorient, normalise, resample and cache every volume of a data source."""
    from tqdm.auto import tqdm

    config.validate()
    files = discover_files(config)
    _refuse_slices(files)
    key = hashlib.sha256(f"{CACHE_VERSION}|{config.grid}|{config.spacing!r}|{_cache_key(files, config)}".encode()).hexdigest()[:16]
    cache = cache_dir(config) / f"volumes_{key}.npz"
    cached = _read_cache(cache, config.grid)
    if cached is not None:
        _warn_skipped(cached.skipped, len(files), config)
        return cached
    skipped: list[str] = []
    volumes, sources, subjects = [], [], []
    root = Path(config.path)
    for unit in tqdm(_units(files, config, skipped), desc="resampling volumes", unit="volume", disable=not progress, leave=False):
        try:
            volumes.append(resample_to_grid(_read_image(unit), config.grid, config.spacing))
        except BrainfusionError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
            _bad_file(unit.path, exc, config, skipped)
            continue
        sources.append(unit.source)
        subjects.append(_subject(unit, root))
    if not volumes:
        raise BrainfusionError(f"none of the {len(files)} files under {config.path} could be read as a volume; check the data.")
    _warn_skipped(skipped, len(files), config)
    result = VolumeSet(np.stack(volumes), sources, skipped, subjects)
    _write_cache(cache, result, source_of(config))
    return result


def _read_cache(cache: Path, grid: int) -> VolumeSet | None:
    """The cached VolumeSet, or None if there is none or it does not fit (then it is rebuilt)."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            cached = VolumeSet(stored["images"], [str(s) for s in stored["sources"]], [str(s) for s in stored["skipped"]],
                               [str(s) for s in stored["subjects"]])
        if cached.images.dtype != np.uint8 or cached.images.shape[1:] != (grid,) * 3 or not (
                len(cached.sources) == len(cached.images) == len(cached.subjects)):
            raise ValueError("its contents do not fit this data source")
        return cached
    except (OSError, ValueError, KeyError):
        log.warning("cache %s is unreadable; rebuilding it", cache)
        return None


def _write_cache(path: Path, volumes: VolumeSet, source: str) -> None:
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, images=volumes.images, sources=np.array(volumes.sources), skipped=np.array(volumes.skipped, dtype=str),
                     subjects=np.array(volumes.subjects, dtype=str), **{SOURCE_KEY: np.array(source)})
    except OSError as exc:
        log.warning("could not write the volume cache %s (%s); continuing without it", path, exc)
