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
With data.masks each volume's tissue label volume (masks.py finds it as it does for slices) comes onto the same
grid by the same map, each label's share resampled as the image is and the largest kept: a majority vote, never a
blend of label values. Resampled volumes are cached once as an .npz in the user's cache folder (cache.py), as
slices are.
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
from .masks import (AFFINE_TOLERANCE_MM, MAX_LABELS, check_mask_config, find_mask, label_volume_values, labels_beside_images,
                    to_label_index)
from .slices import (BRAIN_LEVEL, IMAGE_SUFFIXES, MAX_SIDE, MAX_VOXELS, _bad_file, _cache_key, _check_volume_header, _robust_uint8,
                     _subject, _suffix, _Unit, _units, _warn_skipped, discover_files)

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: label volumes with data.masks


@dataclass
class VolumeSet:
    """Resampled volumes (uint8, N×G×G×G) and what they came from; the per-item fields are SliceSet's, so
    subject hold-outs (subjects.py) and conditions (conditions.py) take either."""

    images: np.ndarray
    sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    levels: np.ndarray | None = None  # volumes have no slice level
    labels: np.ndarray | None = None  # tissue label index per voxel (uint8, N×G×G×G), with data.masks
    mask_values: tuple[int, ...] = ()  # the label values the indices point into

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


def tissue_in_one_piece(labels: np.ndarray) -> np.ndarray:
    """Label volumes (uint8 (N, D, H, W), 0 the background) with every labelled voxel outside its volume's largest
    26-connected piece of tissue set to background. A brain's tissue is one piece (every one of the 96 demo subjects'
    label volumes is, on the 64³ grid), so detached labels are specks: about 1 % of what the volume-labels recipe's
    model draws for held-out real volumes, 0.08 % with this, Dice up a little in every tissue."""
    from scipy import ndimage as ndi

    out, touching = np.array(labels, dtype=np.uint8, copy=True), ndi.generate_binary_structure(3, 3)
    for volume in out:
        pieces, count = ndi.label(volume > 0, touching)
        if count > 1:
            volume[pieces != np.argmax(np.bincount(pieces.ravel())[1:]) + 1] = 0
    return out


def _check_affine(affine: np.ndarray) -> None:
    linear = affine[:3, :3]
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(linear)) < 1e-6 * max(np.abs(linear).max(), 1e-12) ** 3:
        raise ValueError("its affine does not place its voxels in space (singular or not finite), so it cannot be "
                         "resampled; fix the header's sform/qform")


def _grid_map(image, grid: int, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A RAS+ nibabel image's normalised voxels (float32), the map from the brain-centred grid's voxels to its own, and
    the anti-aliasing Gaussian's widths (its voxels) for that grid."""
    voxels = _robust_uint8(np.asarray(image.get_fdata(dtype=np.float32))).astype(np.float32)
    brain = np.argwhere(voxels > BRAIN_LEVEL)
    if brain.size == 0:
        raise ValueError("it holds no voxels brighter than its background")
    centre = image.affine @ np.append((brain.min(0) + brain.max(0)) / 2, 1.0)
    sizes = np.sqrt((image.affine[:3, :3] ** 2).sum(0))  # mm per voxel along each axis
    sigma = np.maximum(0.0, (spacing / sizes - 1) / 2)  # skimage's anti-aliasing rule for a downscale by spacing/size
    return voxels, np.linalg.inv(image.affine) @ grid_affine(grid, spacing, centre[:3]), sigma


def _onto_grid(voxels: np.ndarray, to_source: np.ndarray, sigma: np.ndarray, grid: int) -> np.ndarray:
    """Float voxels smoothed against aliasing and resampled trilinearly onto the grid, in (z, y, x) order."""
    from scipy import ndimage as ndi

    if sigma.any():
        voxels = ndi.gaussian_filter(voxels, sigma)
    out = ndi.affine_transform(voxels, to_source[:3, :3], to_source[:3, 3], output_shape=(grid,) * 3, order=1, cval=0.0)
    return out.transpose(2, 1, 0)


def _canonical(image):
    if len(image.shape) == 4 and image.shape[3] == 1:
        image = image.slicer[..., 0]
    _check_affine(np.asarray(image.affine, dtype=np.float64))
    import nibabel as nib

    return nib.as_closest_canonical(image)


def resample_to_grid(image, grid: int, spacing: float, labels=None, values: tuple[int, ...] | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]]:
    """A nibabel image → uint8 (grid, grid, grid) in (z, y, x) order: RAS+, normalised, brain-centred, resampled; with
    its label volume `labels` (a nibabel image on the image's voxels), their label indices into `values` (read from
    these labels when None) on the same grid by majority vote, and the values."""
    image = _canonical(image)
    voxels, to_source, sigma = _grid_map(image, grid, spacing)
    out = np.ascontiguousarray(np.clip(_onto_grid(voxels, to_source, sigma, grid).round(), 0, 255).astype(np.uint8))
    if labels is None:
        return out, None, ()
    indices, values = _label_indices(_canonical(labels), image, values)
    shares = [_onto_grid((indices == k).astype(np.float32), to_source, sigma, grid) for k in range(len(values))]
    return out, np.ascontiguousarray(np.argmax(shares, 0).astype(np.uint8)), values


def _label_indices(labels, image, values: tuple[int, ...] | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """A RAS+ label volume's label indices, checked to lie voxel for voxel on its RAS+ image."""
    path = labels.get_filename() or "its label volume"
    if tuple(labels.shape) != tuple(image.shape) or not np.allclose(labels.affine, image.affine, atol=AFFINE_TOLERANCE_MM):
        raise ValueError(f"its mask {path} has shape {tuple(labels.shape)} and does not lie voxel for voxel on the image "
                         f"(shape {tuple(image.shape)}); write the labels on the image's own grid")
    read = values is None
    data, values = label_volume_values(labels, Path(path), values)
    if read and len(values) < 2:
        raise ValueError(f"its mask {path} holds {len(values)} label value; label volumes hold 2 to {MAX_LABELS} tissue classes")
    return to_label_index(data, values, Path(path)), values


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


def volume_files(files: list[Path]) -> list[Path]:
    """The volumes among a source's files. Pictures beside volumes (`sample`'s montages) and label volumes beside
    their image (`x_dseg.nii.gz` by `x.nii.gz`) are left out, so `sample`'s folder reads as its volumes; 2-D image
    files alone have no third dimension to generate: one sentence naming the first."""
    flat = [f for f in files if _suffix(f) in IMAGE_SUFFIXES]
    volumes = [f for f in files if _suffix(f) not in IMAGE_SUFFIXES]
    if flat and not volumes:
        raise BrainfusionError(f"{flat[0]} is a 2-D image, but volume runs read 3-D volumes only (NIfTI, Analyze, DICOM series); "
                               "point data.path at whole volumes, or leave out data.volumes to train on slices.")
    labels = labels_beside_images(volumes)
    if flat or labels:
        log.info("reading %d volumes; left out %d pictures and %d label volumes beside them", len(volumes) - len(labels),
                 len(flat), len(labels))
    return [f for f in volumes if f not in labels]


def load_volumes(config: DataConfig, progress: bool = True) -> VolumeSet:
    """Discover, read, reorient, normalise, resample and cache every volume of a data source (and its labels)."""
    from tqdm.auto import tqdm

    config.validate()
    check_mask_config(config)
    files = volume_files(discover_files(config))
    key = hashlib.sha256(f"{CACHE_VERSION}|{config.grid}|{config.spacing!r}|{_cache_key(files, config)}".encode()).hexdigest()[:16]
    cache = cache_dir(config) / f"volumes_{key}.npz"
    cached = _read_cache(cache, config.grid, bool(config.masks))
    if cached is not None:
        _warn_skipped(cached.skipped, len(files), config)
        return cached
    skipped: list[str] = []
    volumes, labels, sources, subjects = [], [], [], []
    values = (tuple(config.mask_values) or None) if config.masks else ()
    root = Path(config.path)
    for unit in tqdm(_units(files, config, skipped), desc="resampling volumes", unit="volume", disable=not progress, leave=False):
        try:
            image = _read_image(unit)
            label_image = _read_labels(unit, config) if config.masks else None
            volume, label, values = resample_to_grid(image, config.grid, config.spacing, label_image, values or None)
        except BrainfusionError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
            _bad_file(unit.path, exc, config, skipped)
            continue
        volumes.append(volume)
        labels.append(label)
        sources.append(unit.source)
        subjects.append(_subject(unit, root))
    if not volumes:
        raise BrainfusionError(f"none of the {len(files)} files under {config.path} could be read as a volume; check the data.")
    _warn_skipped(skipped, len(files), config)
    result = VolumeSet(np.stack(volumes), sources, skipped, subjects, None,
                       np.stack(labels) if config.masks else None, tuple(values or ()))
    _write_cache(cache, result, source_of(config))
    return result


def _read_labels(unit: _Unit, config: DataConfig):
    """The nibabel label volume of one unit (masks.py finds it by the image's name)."""
    import nibabel as nib

    return nib.load(str(find_mask(unit.path, config)))


def _read_cache(cache: Path, grid: int, masks: bool) -> VolumeSet | None:
    """The cached VolumeSet, or None if there is none or it does not fit (then it is rebuilt)."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            cached = VolumeSet(stored["images"], [str(s) for s in stored["sources"]], [str(s) for s in stored["skipped"]],
                               [str(s) for s in stored["subjects"]], None, stored["labels"] if masks else None,
                               tuple(int(v) for v in stored["mask_values"]))
        if cached.images.dtype != np.uint8 or cached.images.shape[1:] != (grid,) * 3 or not (
                len(cached.sources) == len(cached.images) == len(cached.subjects)) or (
                masks and cached.labels.shape != cached.images.shape):
            raise ValueError("its contents do not fit this data source")
        return cached
    except (OSError, ValueError, KeyError):
        log.warning("cache %s is unreadable; rebuilding it", cache)
        return None


def _write_cache(path: Path, volumes: VolumeSet, source: str) -> None:
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, images=volumes.images, sources=np.array(volumes.sources), skipped=np.array(volumes.skipped, dtype=str),
                     subjects=np.array(volumes.subjects, dtype=str), mask_values=np.array(volumes.mask_values, dtype=np.int64),
                     **{SOURCE_KEY: np.array(source)}, **({} if volumes.labels is None else {"labels": volumes.labels}))
    except OSError as exc:
        log.warning("could not write the volume cache %s (%s); continuing without it", path, exc)
