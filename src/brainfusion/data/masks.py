"""Tissue masks beside the slices: find each image's label file, read it, and keep it aligned.

A mask is stored as a label index per pixel (uint8, 0 .. K−1), the index of the pixel's value in
`DataConfig.mask_values` (OASIS seg PNGs: 0 background, 85 CSF, 170 grey matter, 255 white
matter). Masks are matched to images by name:
  * the OASIS layout's own seg folders: `keras_png_slices_train/case_001_slice_0.nii.png` ↔
    `keras_png_slices_seg_train/seg_001_slice_0.nii.png`;
  * a masks folder given with `data.masks`: the image's relative path or name, with `case_` read as
    `seg_`, or with `_seg`, `_dseg`, `_mask` or `_labels` before the suffix (`sub01_T1w.nii.gz` ↔
    `sub01_T1w_dseg.nii.gz`).
Label volumes are cut with the same kept axial slices as their image, so pairs stay aligned. The
model's label channels (one-hot or ordinal) are `channels.py`'s.
Resizing keeps labels whole: each label's area fraction is resampled like an image and the largest
wins (a majority vote over each output pixel's footprint), never a blend of label values.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import OASIS_MASK_NAMES, OASIS_MASK_VALUES, DataConfig
from ..errors import BrainfusionError
from ..images import fit_square

MASK_LAYOUT = "layout"  # data.masks value: the OASIS layout's own keras_png_slices_seg_* folders
MAX_LABELS = 16
AFFINE_TOLERANCE_MM = 0.01  # a DICOM series' label volume and the series agree on where each voxel lies to this
_SUFFIXES = ("_seg", "_dseg", "_mask", "_labels")


def _split_suffix(name: str) -> tuple[str, str]:
    lower = name.lower()
    for suffix in (".nii.gz", ".nii.png", ".nii", ".hdr", ".img", ".png", ".tif", ".tiff", ".jpg", ".jpeg"):
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return name, ""


def mask_candidates(image: Path, root: Path, masks: str) -> list[Path]:
    """Where the mask of `image` (a file under data root `root`) may be, in the order they are tried."""
    if masks == MASK_LAYOUT:
        split_dir = image.parent
        seg_dir = split_dir.parent / split_dir.name.replace("keras_png_slices_", "keras_png_slices_seg_", 1)
        return [seg_dir / re.sub(r"^case_", "seg_", image.name)]
    folder = Path(masks)
    try:
        relative = image.relative_to(root) if root.is_dir() else Path(image.name)
    except ValueError:
        relative = Path(image.name)
    stem, suffix = _split_suffix(relative.name)
    names = [relative.name, re.sub(r"^case_", "seg_", relative.name)] + [stem + s + suffix for s in _SUFFIXES]
    if suffix.lower() in (".nii", ".hdr"):  # a label volume may be compressed where its image is not, or the reverse
        names += [stem + s + ".nii.gz" for s in ("",) + _SUFFIXES]
    elif suffix.lower() == ".nii.gz":
        names += [stem + s + ".nii" for s in ("",) + _SUFFIXES]
    elif not suffix:  # a DICOM series, named by its folder: its label volume (dcm2niix's grid)
        names = [stem + s + ext for s in ("",) + _SUFFIXES for ext in (".nii.gz", ".nii")]
    out = []
    for name in dict.fromkeys(names):
        out += [folder / relative.parent / name, folder / name]
    return list(dict.fromkeys(out))


def labels_beside_images(files: list[Path]) -> set[Path]:
    """The files that are another listed file's label volume by name (`x_dseg.nii.gz` beside `x.nii.gz`, as
    `sample` writes them), so a folder of volumes with their labels is read as its volumes."""
    listed = {(f.parent, f.name.lower()) for f in files}
    found = set()
    for f in files:
        stem, suffix = _split_suffix(f.name)
        for label_suffix in _SUFFIXES:
            if stem.lower().endswith(label_suffix):
                base = stem[: -len(label_suffix)].lower()
                if any((f.parent, base + ext) in listed for ext in (suffix.lower(), ".nii.gz", ".nii")):
                    found.add(f)
    return found


def find_mask(image: Path, config: DataConfig) -> Path:
    """The mask file of an image, or one sentence naming the image and where its mask was looked for."""
    candidates = mask_candidates(image, Path(config.path), config.masks)
    itself = image.resolve()
    for path in candidates:
        if path.is_file() and path.resolve() != itself:  # labels beside their images: not the image itself
            return path
    where = candidates[0].parent if config.masks == MASK_LAYOUT else Path(config.masks)
    raise ValueError(
        f"it has no mask (looked for {candidates[0].name} in {where}); add the mask, or skip such files (data.on_bad_file=skip)"
    )


def default_mask_values(config: DataConfig) -> tuple[int, ...]:
    """The label values a run uses when none are given: OASIS's for 2-D masks; volumes' are read from the files."""
    return tuple(config.mask_values) or OASIS_MASK_VALUES


def mask_names(values: tuple[int, ...]) -> tuple[str, ...]:
    """Tissue names where the values are OASIS's, else `label <value>`."""
    return OASIS_MASK_NAMES if tuple(values) == OASIS_MASK_VALUES else tuple(f"label {v}" for v in values)


def to_label_index(mask: np.ndarray, values: tuple[int, ...], path: Path) -> np.ndarray:
    """Pixel values → indices into `values`; a value outside them is one sentence naming the file."""
    lookup = np.asarray(values)
    found = np.unique(mask)
    outside = np.setdiff1d(found, lookup)
    if outside.size:
        shown = ", ".join(str(int(v)) if float(v).is_integer() else f"{float(v):g}" for v in outside[:5])
        raise ValueError(
            f"its mask {path} holds value(s) {shown} outside the label set {list(values)}; "
            "fix the mask or give the run's label values (data.mask_values)"
        )
    return np.searchsorted(lookup, mask).astype(np.uint8)


def fit_square_labels(labels: np.ndarray, n_labels: int, size: int) -> np.ndarray:
    """Pad a label-index image to a centred square (with label 0) and resize it to size×size by
    resampling each label's indicator and keeping the largest: a majority vote, never a blend."""
    h, w = labels.shape
    if max(h, w) == size:
        return fit_square(labels, size)
    fractions = np.stack([fit_square((labels == k).astype(np.uint8) * 255, size) for k in range(n_labels)])
    return fractions.argmax(0).astype(np.uint8)


def read_mask_slice(path: Path, image_shape: tuple[int, int], values: tuple[int, ...], size: int) -> np.ndarray:
    """A 2-D mask file → size×size label indices; it must have its image's size and only label values."""
    with Image.open(path) as img:
        if (img.size[1], img.size[0]) != tuple(image_shape):
            raise ValueError(
                f"its mask {path} is {img.size[0]}x{img.size[1]}, its image {image_shape[1]}x{image_shape[0]}; "
                "masks must have their image's size"
            )
        if img.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"its mask {path} is a {img.mode} image; save masks as 8- or 16-bit single-channel label images")
        mask = np.asarray(img)
    return fit_square_labels(to_label_index(mask.astype(np.int64), values, path), len(values), size)


def label_volume_values(volume, path: Path, values: tuple[int, ...] | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """A nibabel label volume's voxels as whole label numbers (int64), and the label values (read from this volume
    when the run has none yet); non-integer voxels, or more than MAX_LABELS labels, are one sentence naming `path`."""
    data = np.asarray(volume.dataobj)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise ValueError(f"its mask {path} holds non-integer values; label volumes hold whole label numbers")
    data = data.astype(np.int64)
    if values is None:
        values = tuple(int(v) for v in np.unique(data))
        if len(values) > MAX_LABELS:
            raise ValueError(f"its mask {path} holds {len(values)} labels, more than {MAX_LABELS}; merge them into tissue classes first")
    return data, values


def read_mask_volume(path: Path, image_shape: tuple[int, ...], kept: np.ndarray, values: tuple[int, ...] | None,
                     size: int, affine: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """A label volume → the label indices of the image's kept axial slices (RAS+, like the image),
    and the label values (read from this volume when the run has none yet). With the image's RAS+ `affine`
    (a DICOM series, whose labels come from another tool), the label voxels must lie where the image's do."""
    import nibabel as nib

    volume = nib.as_closest_canonical(nib.load(str(path)))
    if len(volume.shape) == 4 and volume.shape[3] == 1:
        volume = volume.slicer[..., 0]
    if tuple(volume.shape) != tuple(image_shape):
        raise ValueError(f"its mask {path} has shape {tuple(volume.shape)}, its image {tuple(image_shape)}; masks must match their image voxel for voxel")
    if affine is not None and not np.allclose(volume.affine, affine, atol=AFFINE_TOLERANCE_MM):
        raise ValueError(f"its mask {path} lies elsewhere in the scanner's space than the series (the affines differ by up to "
                         f"{np.abs(volume.affine - affine).max():.3g} mm); write the labels on the series' own grid, e.g. from its dcm2niix NIfTI")
    data, values = label_volume_values(volume, path, values)
    labels = [np.rot90(to_label_index(data[:, :, k], values, path)) for k in kept]
    return np.stack([fit_square_labels(np.ascontiguousarray(m), len(values), size) for m in labels]), values


def check_mask_config(config: DataConfig) -> None:
    """A masks folder that does not exist, or masks asked of a layout without seg folders: one sentence."""
    if not config.masks:
        return
    if config.masks == MASK_LAYOUT:
        root = Path(config.path)
        if not (root.is_dir() and any(root.glob("keras_png_slices_seg_*"))):
            raise BrainfusionError(
                f"data.masks={MASK_LAYOUT} reads the OASIS layout's keras_png_slices_seg_* folders, and {root} has none; "
                "give the folder of mask files (data.masks=DIR)."
            )
    elif not Path(config.masks).is_dir():
        raise BrainfusionError(f"the masks folder {config.masks} does not exist; give the folder that holds the mask files (data.masks).")
