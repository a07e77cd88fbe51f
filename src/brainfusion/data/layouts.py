"""Folder layouts that say more than "a tree of images": BIDS, OASIS-1, and whose scan each file is.

BIDS (https://bids.neuroimaging.io) keeps each subject's T1-weighted volumes at
`sub-<label>/[ses-<label>/]anat/*_T1w.nii[.gz]`, beside other modalities and `derivatives/` that must
not be mixed into a T1 training set, so a BIDS root is read by those paths alone. A nibabel + glob
reader is enough for that; pybids would index every sidecar of a large dataset first. The OASIS-1
download likewise holds raw scans, label maps and several processed copies of each session; only
its skull-stripped, atlas-registered `*_masked_gfc` volume is read.

Subject IDs let a run hold whole subjects out (slices of one brain are near-duplicates, so a random
slice split leaks). They come from what each layout names: BIDS `sub-*`, the DICOM PatientID,
OASIS-1 `OAS1_xxxx`, `case_NNN` of the OASIS PNG slices, else the file's folder below the data root,
else its name without suffixes.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import BrainfusionError

BIDS_SUBJECT = re.compile(r"^sub-[A-Za-z0-9]+$")
OASIS1_SUBJECT = re.compile(r"(OAS1_\d{4})")
OASIS_PNG_CASE = re.compile(r"^(?:case|seg)_(\d+)_slice_\d+")
SLICE_SUBJECT = re.compile(r"^(?P<subject>.+?)_slice_\d+")  # `<subject>_slice_<k>` names (conditions.py reads them too)
T1W_PATTERNS = ("sub-*/anat/*_T1w.nii", "sub-*/anat/*_T1w.nii.gz", "sub-*/ses-*/anat/*_T1w.nii", "sub-*/ses-*/anat/*_T1w.nii.gz")


def is_bids_layout(root: Path) -> bool:
    """A BIDS root announces itself with dataset_description.json; a bare tree counts when its `sub-*`
    folders hold `anat` folders (a folder of slices merely named `sub-01/` stays a folder of slices)."""
    if not root.is_dir():
        return False
    return (root / "dataset_description.json").is_file() or any(
        p.is_dir() and BIDS_SUBJECT.match(p.relative_to(root).parts[0])
        for pattern in ("sub-*/anat", "sub-*/ses-*/anat") for p in root.glob(pattern))


def bids_t1w_files(root: Path) -> list[Path]:
    """The T1-weighted volumes of a BIDS dataset in a stable order; refuses a dataset that has none."""
    files = sorted({p for pattern in T1W_PATTERNS for p in root.glob(pattern)
                    if p.is_file() and BIDS_SUBJECT.match(p.relative_to(root).parts[0])})
    if not files:
        raise BrainfusionError(
            f"{root} is a BIDS dataset without T1-weighted images (sub-*/[ses-*/]anat/*_T1w.nii[.gz]); "
            "add them, or point data.path at the folder that holds the volumes to read."
        )
    return files


OASIS1_SESSION = re.compile(r"^OAS1_\d{4}_MR\d+$")
OASIS1_VOLUME = "PROCESSED/MPRAGE/T88_111/*_masked_gfc.hdr"  # atlas-registered, bias-corrected, skull-stripped


def _oasis1_sessions(root: Path) -> list[Path]:
    """OAS1_xxxx_MRn session folders: the root itself, its children, or its children's (the disc1..disc12 of the download)."""
    if OASIS1_SESSION.match(root.name):
        return [root]
    found = [p for pattern in ("OAS1_*_MR*", "*/OAS1_*_MR*") for p in root.glob(pattern)]
    return sorted(p for p in found if p.is_dir() and OASIS1_SESSION.match(p.name))


def is_oasis1_layout(root: Path) -> bool:
    return root.is_dir() and bool(_oasis1_sessions(root))


def oasis1_files(root: Path) -> list[Path]:
    """The one processed volume per OASIS-1 session worth training on (`*_masked_gfc`); the RAW scans, the
    unmasked and native-space copies and the FSL_SEG label maps beside it would mix skulls and labels in."""
    files = sorted(p for session in _oasis1_sessions(root) for p in session.glob(OASIS1_VOLUME) if p.is_file())
    if not files:
        raise BrainfusionError(
            f"{root} holds OASIS-1 session folders (OAS1_xxxx_MRn) but no {OASIS1_VOLUME.replace('.hdr', '.hdr/.img')} volumes; "
            "download the processed images too, or point data.path at a folder of the volumes to read."
        )
    return files


def _strip_suffixes(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".hdr", ".img", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def subject_of(source: str, root: Path, patient: str = "", folder: bool = False) -> str:
    """The subject a slice's source belongs to: a file, or (`folder`) the folder of a DICOM series whose
    PatientID is `patient`; without one, such a series is named by its folder."""
    path = Path(source)
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(path.name)
    parts = rel.parts or (path.name,)
    bids = [p for p in parts if BIDS_SUBJECT.match(p)]
    if bids:
        return bids[0]
    if patient:
        return patient
    oasis1 = OASIS1_SUBJECT.search(rel.as_posix())
    if oasis1:
        return oasis1.group(1)
    case = OASIS_PNG_CASE.match(path.name)
    if case:
        return f"case_{case.group(1)}"
    named = SLICE_SUBJECT.match(path.name)
    if named:
        return named["subject"]
    if folder:
        return path.name
    return parts[-2] if len(parts) > 1 else _strip_suffixes(path.name)
