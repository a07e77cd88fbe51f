"""Data sources → one cached uint8 array of square grayscale slices → training batches.

The sources behind `load_slices`:
  * the OASIS "keras_png_slices" layout the seed uses (train+test merged for training, validate
    held out, `*_seg_*` mask folders never mixed in);
  * any folder of PNG/JPEG/TIFF slices, searched recursively;
  * 3-D NIfTI (.nii/.nii.gz) and Analyze (.hdr/.img) volumes, reoriented to RAS+ with nibabel,
    robustly normalised per volume and cut into axial slices, near-empty slices dropped;
  * DICOM series, assembled into volumes by dicom.py and then cut like NIfTI volumes.
Decoded, resized slices are cached once as an .npz (uint8) in the user's cache folder (cache.py), so
epochs and later runs never re-decode files and nothing is written into a data folder; with
`data.masks`, each slice's tissue labels (masks.py) are read, aligned and cached beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from ..errors import BrainfusionError
from ..fileio import atomic_output
from ..seeding import seeded_generator
from ..images import fit_square
from .cache import SOURCE_KEY, cache_dir, source_of
from .dicom import Series, group_series, is_dicom_file, series_image
from .layouts import bids_t1w_files, is_bids_layout, is_oasis1_layout, oasis1_files, subject_of
from .channels import label_channels, to_model_range
from .masks import MASK_LAYOUT, check_mask_config, default_mask_values, find_mask, mask_candidates, read_mask_slice, read_mask_volume

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".hdr")
OASIS_SPLITS = {
    "train": ("keras_png_slices_train", "keras_png_slices_test"),
    "validate": ("keras_png_slices_validate",),
    "all": ("keras_png_slices_train", "keras_png_slices_test", "keras_png_slices_validate"),
}
MAX_SIDE = 8192  # larger "slices" are refused before decoding (decompression bombs, wrong files)
MAX_VOXELS = 512**3  # larger volumes are refused before their voxels are read (corrupt headers, memory bombs)
BRAIN_LEVEL = 12  # uint8 grey level above which a pixel or voxel counts as brain
CACHE_VERSION = 4  # 2: the cache holds the volume slices' levels; 3: and each slice's subject; 4: and the masks' labels


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_oasis_layout(root: Path) -> bool:
    return root.is_dir() and (root / "keras_png_slices_train").is_dir()


def discover_files(config: DataConfig) -> list[Path]:
    """List the slice and volume files a DataConfig points at, in a stable order."""
    root = Path(config.path)
    if not root.exists():
        raise BrainfusionError(
            f"data path {root} does not exist; point data.path at a folder of slices or volumes "
            f"(or build the demo set there with `brainfusion data demo`)."
        )
    if root.is_file():
        if _suffix(root) not in IMAGE_SUFFIXES + VOLUME_SUFFIXES + (".img",) and not is_dicom_file(root):
            raise BrainfusionError(
                f"{root} is not a supported file; give a PNG/JPEG/TIFF slice, a NIfTI or an Analyze volume, or a DICOM file."
            )
        return [root.with_suffix(".hdr") if _suffix(root) == ".img" else root]
    if is_oasis_layout(root):
        folders = [root / name for name in OASIS_SPLITS[config.split] if (root / name).is_dir()]
    elif is_bids_layout(root):
        return bids_t1w_files(root)
    elif is_oasis1_layout(root):
        return oasis1_files(root)
    else:
        folders = [root]
    files = []
    skip_dir = Path(config.masks).resolve() if config.masks and config.masks != MASK_LAYOUT else None
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (Path(dirpath) / d).resolve() != skip_dir)
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith("."):
                    continue
                if _suffix(path) in IMAGE_SUFFIXES + VOLUME_SUFFIXES or (_suffix(path) != ".img" and is_dicom_file(path)):
                    files.append(path)
    if not files:
        raise BrainfusionError(
            f"no PNG/JPEG/TIFF slices, NIfTI/Analyze volumes or DICOM series found under {root}; "
            "check the path or add images to it."
        )
    return files


def read_slice(path: Path, size: int) -> np.ndarray:
    """Decode one 2-D image file into a size×size uint8 array (raises on any defect)."""
    return fit_square(decode_slice(path), size)


def decode_slice(path: Path) -> np.ndarray:
    """One 2-D image file as a uint8 array at its own size; 16-bit and float images are scaled from their own range."""
    with Image.open(path) as img:
        if max(img.size) > MAX_SIDE or min(img.size) < 1:
            raise ValueError(f"its size {img.size[0]}x{img.size[1]} is outside 1..{MAX_SIDE} pixels")
        img.load()
        if img.mode.startswith("I") or img.mode == "F":  # I;16, I;16B, I;16L, I, F: never through convert("L"), which clips
            arr = _robust_uint8(np.asarray(img, dtype=np.float32), own_range=True)
        else:
            arr = np.asarray(img.convert("L"), dtype=np.uint8)
    if arr.ndim != 2:
        raise ValueError(f"it decodes to shape {arr.shape}, not a 2-D image")
    return arr


def _robust_uint8(values: np.ndarray, own_range: bool = False) -> np.ndarray:
    """Scale intensities to 0..255 up to the 99.5th percentile of the foreground.

    A volume's floor is 0 for non-negative data (MRI magnitudes: zero is "no signal", so tissue keeps
    its level relative to air) and the foreground's 0.5th percentile otherwise. A 16-bit or float 2-D
    image is often stored with an offset (values only in 1000..4000, say), so `own_range` takes the
    floor from the image's own 0.5th percentile: the slice spans 0..255 whatever its offset.
    """
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError("it holds no finite values")
    values = np.where(finite, values, 0.0)
    foreground = values[values > values.min()]
    if foreground.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = np.percentile(foreground, [0.5, 99.5])
    if own_range:
        lo = float(np.percentile(values, 0.5))
    elif values.min() >= 0:
        lo = min(lo, 0.0)
    scaled = (values - lo) / max(hi - lo, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def read_volume_slices(path: Path, size: int, min_brain_fraction: float) -> np.ndarray:
    """Load a NIfTI/Analyze volume, reorient to RAS+, normalise, and cut axial slices."""
    return _volume_slices(path, size, min_brain_fraction)[0]


def _volume_slices(path: Path, size: int, min_brain_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """The axial slices of a volume, their levels k/(n−1) in the RAS+ volume (0 inferior, 1 superior),
    which slice-level conditioning needs (the dropped near-empty slices leave gaps in k), the kept k
    and the RAS+ shape (a label volume is cut at the same k)."""
    import nibabel as nib

    image = nib.load(str(path))
    _check_volume_header(image)
    return _axial_slices(image, size, min_brain_fraction)


def _axial_slices(image, size: int, min_brain_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """A nibabel image (a file's, or a DICOM series built in memory) → its kept axial slices, their levels,
    the kept k and the RAS+ shape."""
    import nibabel as nib

    if len(image.shape) == 4 and image.shape[3] == 1:
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise ValueError(f"it has shape {tuple(image.shape)}; a 3-D volume (or 4-D with one frame) is needed")
    if max(image.shape) > MAX_SIDE or min(image.shape) < 1:
        raise ValueError(f"its shape {tuple(image.shape)} is outside 1..{MAX_SIDE} voxels per axis")
    image = nib.as_closest_canonical(image)
    volume = _robust_uint8(np.asarray(image.get_fdata(dtype=np.float32)))
    slices, kept = [], []
    for k in range(volume.shape[2]):
        axial = np.rot90(volume[:, :, k])  # rows: anterior at the top; columns: left→right
        if (axial > BRAIN_LEVEL).mean() >= min_brain_fraction:
            slices.append(fit_square(np.ascontiguousarray(axial), size))
            kept.append(k)
    if not slices:
        raise ValueError("none of its axial slices has enough non-background voxels")
    kept = np.array(kept)
    return np.stack(slices), (kept / max(volume.shape[2] - 1, 1)).astype(np.float32), kept, tuple(volume.shape)


def _check_volume_header(image) -> None:
    """Refuse what a header promises before nibabel allocates it: too many voxels, non-intensity voxel
    types, or fewer data bytes in the file than the header claims (a truncated or lying file)."""
    shape = tuple(int(n) for n in image.shape)
    voxels = 1
    for n in shape:
        voxels *= max(n, 0)
    if voxels > MAX_VOXELS:
        raise ValueError(f"its header claims {'x'.join(map(str, shape))} voxels, more than the {MAX_VOXELS} a volume may have")
    dtype = image.get_data_dtype()
    if dtype.kind not in "biuf":
        raise ValueError(f"its voxels are {dtype} values, not real-valued intensities (save the magnitude image)")
    needed = int(getattr(image.dataobj, "offset", 0) or 0) + voxels * dtype.itemsize
    data_file = str(image.file_map["image"].filename or "")
    if data_file.endswith(".gz"):  # stream through it (constant memory) rather than let nibabel allocate the claim
        import gzip

        got = 0
        with gzip.open(data_file, "rb") as fh:
            while got < needed and (chunk := fh.read(min(1 << 22, needed - got))):
                got += len(chunk)
    elif data_file and not data_file.endswith((".bz2", ".zst")):
        got = os.path.getsize(data_file)
    else:
        return
    if got < needed:
        raise ValueError(f"it is truncated: its header promises {needed} bytes of data but {Path(data_file).name} holds {got}")


@dataclass
class SliceSet:
    """Decoded slices (uint8, N×S×S) and what they came from."""

    images: np.ndarray
    sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    levels: np.ndarray | None = None  # axial level of each volume slice (NaN for 2-D files), for conditioning
    subjects: list[str] = field(default_factory=list)  # each slice's subject ID (layouts.subject_of), for subject hold-outs
    labels: np.ndarray | None = None  # tissue label index per pixel (uint8, N×S×S), with data.masks
    mask_values: tuple[int, ...] = ()  # the label values the indices point into

    def __len__(self) -> int:
        return len(self.images)


def _cache_key(files: list[Path], config: DataConfig) -> str:
    """A digest of the settings and of every file's path, size and mtime: one shared cache folder serves every
    data source, so the resolved data path is in it too (a relative path means another folder elsewhere)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, config.image_size, config.min_brain_fraction, config.on_bad_file,
                              source_of(config), config.masks, list(config.mask_values)]).encode())
    stamped = []
    for path in files:
        # an Analyze .hdr keeps its voxels in the .img beside it: a changed .img must invalidate the cache too
        stamped += [path, path.with_suffix(".img")] if _suffix(path) == ".hdr" else [path]
        if config.masks:
            stamped += [next((m for m in mask_candidates(path, Path(config.path), config.masks) if m.is_file()), Path("-"))]
    if config.masks and config.masks != MASK_LAYOUT:  # a DICOM series' label volume is named by its folder, not by a file
        stamped += sorted(m for m in Path(config.masks).rglob("*") if m.is_file())
    for part in stamped:
        stat = part.stat() if part.exists() else None
        digest.update(f"{part}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_slices(config: DataConfig, progress: bool = True) -> SliceSet:
    """Discover, decode, resize and cache every slice of a data source (and its mask, with data.masks)."""
    from tqdm.auto import tqdm

    config.validate()
    check_mask_config(config)
    files = discover_files(config)
    cache = cache_dir(config) / f"slices_{config.split}_{_cache_key(files, config)}.npz"
    cached = _read_cache(cache, config)
    if cached is not None:
        _warn_skipped(cached.skipped, len(files), config)  # the per-file warnings were logged when it was built
        return cached
    skipped: list[str] = []
    images, sources, levels, subjects, labels = [], [], [], [], []
    values = (tuple(config.mask_values) or None) if config.masks else ()
    root = Path(config.path)
    for unit in tqdm(_units(files, config, skipped), desc="decoding slices", unit="file", disable=not progress, leave=False):
        try:
            stack, level, label, values = _decode(unit, config, values)
        except BrainfusionError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
            _bad_file(unit.path, exc, config, skipped)
            continue
        images.append(stack)
        levels.append(level)
        labels.append(label)
        sources.extend([unit.source] * len(stack))
        subjects.extend([_subject(unit, root)] * len(stack))
    if not images:
        raise BrainfusionError(f"none of the {len(files)} files under {config.path} could be read; check the data.")
    _warn_skipped(skipped, len(files), config)
    result = SliceSet(np.concatenate(images), sources, skipped, np.concatenate(levels), subjects,
                      np.concatenate(labels) if config.masks else None, tuple(values or ()))
    _write_cache(cache, result, source_of(config))
    return result


@dataclass
class _Unit:
    """What is decoded in one go: one image or volume file, or one DICOM series (many files)."""

    path: Path  # what a bad-file message names: the file, or the folder of a series
    source: str  # what SliceSet.sources records for its slices
    series: Series | None = None


def _units(files: list[Path], config: DataConfig, skipped: list[str]) -> list[_Unit]:
    """Image and volume files one by one, then the DICOM files grouped into series (headers read here)."""
    known = IMAGE_SUFFIXES + VOLUME_SUFFIXES
    units = [_Unit(path, str(path)) for path in files if _suffix(path) in known]
    dicom = [path for path in files if _suffix(path) not in known]
    if dicom:
        grouping = group_series(dicom)
        for path, exc in grouping.unreadable:
            _bad_file(path, exc, config, skipped)
        units += [_Unit(Path(series.source), series.source, series) for series in grouping.series]
    return units


def _decode(unit: _Unit, config: DataConfig, values):
    """One unit's slices, their axial levels (NaN for 2-D files) and, with data.masks, their label indices;
    `values` are the label values so far (None: not known yet, read from the first label volume), returned
    as they stand after this unit. Raises on any defect."""
    size, label = config.image_size, None
    if unit.series is not None:
        image = series_image(unit.series, MAX_SIDE, MAX_VOXELS)
        stack, level, kept, shape = _axial_slices(image, size, config.min_brain_fraction)
        if config.masks:
            import nibabel as nib

            label, values = read_mask_volume(find_mask(unit.path, config), shape, kept, values, size,
                                             affine=nib.as_closest_canonical(image).affine)
        return stack, level, label, values
    if not unit.path.is_file():  # a FIFO or device would block or stream forever; a dangling link has no data
        raise ValueError("it is not a regular file")
    if _suffix(unit.path) in VOLUME_SUFFIXES:
        stack, level, kept, shape = _volume_slices(unit.path, size, config.min_brain_fraction)
        if config.masks:
            label, values = read_mask_volume(find_mask(unit.path, config), shape, kept, values, size)
        return stack, level, label, values
    raw = decode_slice(unit.path)
    if config.masks:
        values = values or default_mask_values(config)
        label = read_mask_slice(find_mask(unit.path, config), raw.shape, values, size)[None]
    return fit_square(raw, size)[None], np.full(1, np.nan, np.float32), label, values


def _subject(unit: _Unit, root: Path) -> str:
    if unit.series is None:
        return subject_of(unit.source, root)
    return subject_of(str(unit.series.files[0].parent), root, unit.series.patient, folder=True)


def _bad_file(path: Path, exc: Exception, config: DataConfig, skipped: list[str]) -> None:
    """Refuse an unreadable file (data.on_bad_file=fail) or log it and note it among the skipped."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if config.on_bad_file == "fail":
        raise BrainfusionError(
            f"{path} could not be read ({reason}); delete or replace it, or skip such files (data.on_bad_file=skip)."
        ) from None
    log.warning("skipping %s: %s", path, reason)
    skipped.append(f"{path}: {reason}")


def _read_cache(cache: Path, config: DataConfig) -> SliceSet | None:
    """The cached SliceSet, or None if there is none or it does not fit this data source (then it is rebuilt)."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            labels = stored["labels"] if config.masks else None
            cached = SliceSet(stored["images"], [str(s) for s in stored["sources"]], [str(s) for s in stored["skipped"]], stored["levels"],
                              [str(s) for s in stored["subjects"]], labels, tuple(int(v) for v in stored["mask_values"]))
        if cached.images.dtype != np.uint8 or cached.images.shape[1:] != (config.image_size,) * 2 or not (
                len(cached.sources) == len(cached.images) == len(cached.levels) == len(cached.subjects)) or (
                labels is not None and labels.shape != cached.images.shape):
            raise ValueError("its contents do not fit this data source")
        return cached
    except (OSError, ValueError, KeyError):
        log.warning("cache %s is unreadable; rebuilding it", cache)
        return None


def load_set(path: str | Path, split: str, image_size: int, on_bad_file: str = "fail") -> SliceSet:
    """A set to evaluate or judge with: `split` picks an OASIS layout's split; any other source is read whole."""
    split = split if is_oasis_layout(Path(path)) else "train"
    return load_slices(DataConfig(path=str(path), image_size=image_size, split=split, on_bad_file=on_bad_file), progress=False)


def _warn_skipped(skipped: list[str], total: int, config: DataConfig, listed: int = 20) -> None:
    """One summary naming every skipped file (the first `listed`, then a count) and why."""
    if not skipped:
        return
    names = "; ".join(str(s) for s in skipped[:listed]) + (f"; and {len(skipped) - listed} more" if len(skipped) > listed else "")
    log.warning("skipped %d unreadable file(s) of %d under %s: %s", len(skipped), total, config.path, names)


def _write_cache(path: Path, slices: SliceSet, source: str) -> None:
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, images=slices.images, sources=np.array(slices.sources), skipped=np.array(slices.skipped, dtype=str),
                     levels=slices.levels, subjects=np.array(slices.subjects, dtype=str), **{SOURCE_KEY: np.array(source)},
                     mask_values=np.array(slices.mask_values, dtype=np.int64), **({} if slices.labels is None else {"labels": slices.labels}))
    except OSError as exc:  # no half-written cache is left behind (a full disk stays as full as it was)
        log.warning("could not write the slice cache %s (%s); continuing without it", path, exc)


class BatchStream:
    """Deterministic training batches drawn from an in-memory uint8 tensor.

    Batch `step` depends only on (seed, step): the epoch permutation is seeded by the epoch and
    the flips by the step, so a resumed run sees exactly the batches an uninterrupted one would,
    and rank r of W processes takes its own slice of the same global batch. `labels` (N×S×S tissue
    label indices) join each image as its mask channels (channels.label_channels: K one-hot ones at ±label_scale, or
    one ordinal; on a latent's grid, each block's label shares). Latents (float, N×C×h×w)
    come with `flipped`, the latents of the mirrored slices, since a flipped latent is not the latent
    of a flipped slice. `cond` (N, K) holds
    each slice's encoded conditions (conditions.py), drawn with the same indices as the images.
    """

    def __init__(self, images: np.ndarray, global_batch: int, seed: int, hflip: bool, rank: int = 0, world: int = 1,
                 cond: np.ndarray | torch.Tensor | None = None, flipped: np.ndarray | None = None,
                 labels: np.ndarray | None = None, n_labels: int = 0, label_scale: float = 1.0, label_encoding: str = "one-hot"):
        if len(images) < global_batch:
            raise BrainfusionError(
                f"the data holds {len(images)} slices, fewer than one global batch of {global_batch}; lower train.batch_size or add data."
            )
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.flipped = None if flipped is None else torch.from_numpy(np.ascontiguousarray(flipped))
        self.labels = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels))
        self.n_labels, self.label_scale, self.label_encoding = n_labels, label_scale, label_encoding
        self.cond = None if cond is None else torch.as_tensor(cond, dtype=torch.float32)
        if self.cond is not None and (self.cond.dim() != 2 or len(self.cond) != len(images)):
            raise BrainfusionError(f"the conditions have shape {tuple(self.cond.shape)}; give one row per slice ({len(images)}).")
        self.global_batch, self.seed, self.hflip = global_batch, seed, hflip
        self.rank, self.world = rank, world
        self.per_rank = global_batch // world
        self.steps_per_epoch = len(images) // global_batch
        self._perm_epoch, self._perm = -1, None

    def _indices(self, step: int) -> torch.Tensor:
        """The slice indices of this rank's part of global batch `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            gen = seeded_generator(self.seed, 0, epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.images), generator=gen), epoch
        start = position * self.global_batch + self.rank * self.per_rank
        return self._perm[start : start + self.per_rank]

    def batch(self, step: int) -> torch.Tensor:
        """uint8 slices in the model's range, or float latents as they are (their flips are encoded copies)."""
        indices = self._indices(step)
        x = to_model_range(self.images[indices]) if self.images.dtype == torch.uint8 else self.images[indices].float()
        image_channels = x.shape[1]
        if self.labels is not None:  # image (or latent) and tissue labels as one picture, flipped together
            x = torch.cat([x, label_channels(self.labels[indices], self.n_labels, self.label_scale, x.shape[-1], self.label_encoding)], 1)
        if self.hflip:
            gen = seeded_generator(self.seed, 1, step)
            flip = torch.rand(self.global_batch, generator=gen)[self.rank * self.per_rank :][: self.per_rank] < 0.5
            mirrored = x.flip(-1)
            if self.flipped is not None:
                mirrored = torch.cat([self.flipped[indices].float(), mirrored[:, image_channels:]], 1)
            x = torch.where(flip.view((-1,) + (1,) * (x.dim() - 1)), mirrored, x)  # slices (N,C,H,W) or volumes (N,C,D,H,W)
        return x

    def batch_with_cond(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Batch `step` and the conditions of the same slices (None: this stream carries no labels).
        A horizontal flip keeps a slice's conditions: class and level do not depend on it."""
        images = self.batch(step)
        return images, None if self.cond is None else self.cond[self._indices(step)]
