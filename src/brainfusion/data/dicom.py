"""DICOM series → one 3-D volume, which slices.py then cuts into axial slices like a NIfTI volume.

A scanner writes one file per slice, and file names or InstanceNumbers do not reliably follow the
anatomy, so the files of a folder are grouped by SeriesInstanceUID and each series is ordered by
ImagePositionPatient projected on the slice normal (the cross product of ImageOrientationPatient's
row and column directions). A series whose geometry cannot be trusted is refused rather than cut
into a stack with a gap, a doubled slice or slices at angles: a missing slice (uneven spacing), two
slices at one position, or more than one orientation. RescaleSlope/Intercept are applied so that
intensities are the scanner's real values before the volume path normalises them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
MAGIC_OFFSET, MAGIC = 128, b"DICM"
POSITION_TOLERANCE_MM = 1e-3  # two slices closer than this along the normal are one position twice
SPACING_TOLERANCE = 0.2  # a gap more than 20 % off the median spacing is not a regular stack
ORIENTATION_TOLERANCE = 1e-3


def has_dicom_magic(path: Path) -> bool:
    """Whether a file carries the DICOM preamble's 'DICM' (files exported without a .dcm suffix often do).
    Only regular files are opened: a FIFO or device would block."""
    try:
        if not path.is_file() or path.stat().st_size < MAGIC_OFFSET + len(MAGIC):
            return False
        with open(path, "rb") as fh:
            fh.seek(MAGIC_OFFSET)
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def is_dicom_file(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or has_dicom_magic(path)


@dataclass
class Series:
    """The files of one DICOM series in one folder; `source` names it in SliceSet.sources."""

    source: str
    files: list[Path]
    patient: str = ""
    uid: str = ""


@dataclass
class Grouping:
    series: list[Series] = field(default_factory=list)
    unreadable: list[tuple[Path, Exception]] = field(default_factory=list)


def group_series(files: list[Path]) -> Grouping:
    """Group DICOM files by folder and SeriesInstanceUID, reading headers only; a folder with one series
    is named by the folder, one with several by `<folder>/<SeriesInstanceUID>`."""
    import pydicom

    out = Grouping()
    groups: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    patients: dict[tuple[Path, str], str] = {}
    for path in files:
        try:
            if not path.is_file():  # a FIFO or device would block; a dangling link has no data
                raise ValueError("it is not a regular file")
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
            if "Rows" not in header:  # a DICOMDIR index, a report or a presentation state: no image to read
                log.info("ignoring %s: a DICOM file without an image", path)
                continue
            uid = str(header.SeriesInstanceUID)
        except Exception as exc:  # noqa: BLE001 - any header failure is a bad file
            out.unreadable.append((path, exc if str(exc).strip() else ValueError("its DICOM header is unreadable")))
            continue
        groups[(path.parent, uid)].append(path)
        patients.setdefault((path.parent, uid), str(header.get("PatientID", "") or "").strip())
    per_folder = defaultdict(int)
    for folder, _uid in groups:
        per_folder[folder] += 1
    for (folder, uid), members in sorted(groups.items(), key=lambda item: (str(item[0][0]), item[0][1])):
        source = str(folder) if per_folder[folder] == 1 else str(folder / uid)
        out.series.append(Series(source, sorted(members), patients[(folder, uid)], uid))
    return out


def _geometry(ds, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(orientation 6-vector, position 3-vector) of one slice; refuses files without them."""
    try:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        position = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{path.name} has no ImageOrientationPatient/ImagePositionPatient, so its slice cannot be placed") from None
    if orientation.shape != (6,) or position.shape != (3,):
        raise ValueError(f"{path.name} has a malformed ImageOrientationPatient or ImagePositionPatient")
    return orientation, position


def _check_spacing(depths: np.ndarray, names: list[str]) -> float:
    """The slice spacing along the normal; refuses a doubled position or a gap (a missing slice)."""
    if len(depths) < 2:
        return 1.0
    steps = np.diff(depths)
    for k, step in enumerate(steps):
        if step < POSITION_TOLERANCE_MM:
            raise ValueError(f"{names[k]} and {names[k + 1]} lie at the same position ({depths[k]:.2f} mm along the slice normal): "
                             "a slice is duplicated, remove one of them")
    spacing = float(np.median(steps))
    for k, step in enumerate(steps):
        if abs(step - spacing) > SPACING_TOLERANCE * spacing:
            raise ValueError(f"its slices jump {step:.2f} mm between {names[k]} and {names[k + 1]} where the others are "
                             f"{spacing:.2f} mm apart: a slice is missing, add it back or export the whole series")
    return spacing


def _pixels(ds, path: Path) -> np.ndarray:
    """A slice's real intensities (RescaleSlope/Intercept applied), shape (columns, rows) like a NIfTI slice."""
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{path.name} is a multi-frame DICOM, which is not read; convert the series to NIfTI (e.g. dcm2niix)")
    pixels = np.asarray(ds.pixel_array, dtype=np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"{path.name} holds pixels of shape {pixels.shape}, not one greyscale slice")
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return (pixels * slope + intercept).T


def series_image(series: Series, max_side: int, max_voxels: int):
    """The series as a nibabel image in RAS+ world coordinates (DICOM's are LPS), ready for the volume path."""
    import nibabel as nib
    import pydicom

    datasets, names = [], []
    for path in series.files:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if not (1 <= rows <= max_side and 1 <= cols <= max_side) or rows * cols * len(series.files) > max_voxels:
            raise ValueError(f"{path.name} promises {cols}x{rows} pixels per slice, outside 1..{max_side} or too many for "
                             f"{len(series.files)} slices")
        datasets.append((path, ds))
    geometry = [_geometry(ds, path) for path, ds in datasets]
    orientations = np.stack([g[0] for g in geometry])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        odd = next(i for i, o in enumerate(orientations) if np.abs(o - orientations[0]).max() > ORIENTATION_TOLERANCE)
        raise ValueError(f"{datasets[odd][0].name} is oriented differently from {datasets[0][0].name} (ImageOrientationPatient): "
                         "the series mixes orientations, keep one orientation per folder")
    row_dir, col_dir = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_dir, col_dir)
    depths = np.array([g[1] @ normal for g in geometry])
    order = np.argsort(depths, kind="stable")
    names = [datasets[i][0].name for i in order]
    spacing = _check_spacing(depths[order], names)
    planes = [_pixels(pydicom.dcmread(str(datasets[i][0])), datasets[i][0]) for i in order]
    if len({plane.shape for plane in planes}) != 1:
        raise ValueError("its slices differ in size (Rows/Columns), so they do not stack into one volume")
    volume = np.stack(planes, axis=-1)
    row_spacing, col_spacing = (float(v) for v in datasets[0][1].get("PixelSpacing", [1.0, 1.0]))
    first, last = geometry[order[0]][1], geometry[order[-1]][1]
    step = (last - first) / (len(order) - 1) if len(order) > 1 else normal * spacing
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * col_spacing, col_dir * row_spacing, step, first
    return nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
