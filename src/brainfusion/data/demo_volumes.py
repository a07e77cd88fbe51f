"""The demo's synthetic subjects as whole volumes: a BIDS-like folder of NIfTI T1 volumes and tissue labels.

The subjects are demo.py's, drawn by the same per-subject generator (`numpy.random.default_rng([seed, i])`),
so subject i has the same deformation and intensity model as its slices in the slice demo; here it is
rendered on a whole isotropic grid instead of at chosen axial levels. They are synthetic: every subject is
the MNI ICBM152 template nilearn ships, warped, so they share one anatomy and must not be used to report
results. The layout::

    out_dir/
      dataset_description.json, README.txt
      participants.tsv                       participant_id, ventricles, ventricle_gain, atrophy
      sub-001/anat/sub-001_T1w.nii.gz        uint8, skull-stripped, RAS+ affine in mm (qform and sform)
      derivatives/labels/sub-001/anat/sub-001_T1w_dseg.nii.gz   0 background, 85 CSF, 170 GM, 255 WM

`data.path` at out_dir reads it as BIDS (layouts.py); `condition.labels` at participants.tsv conditions on
its columns (conditions.py matches participant_id to the BIDS subject); `data.masks` at derivatives/labels
pairs the slice path's slices with their labels.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..images import save_nifti
from .demo import _VENTRICLE_CLASSES, DemoDataConfig, _draw_subject, _render_subject, built_beside, start_build

PARTICIPANTS = "participants.tsv"
LABELS_FOLDER = "derivatives/labels"


def _grid(frame, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The axial levels (mm) of an isotropic grid over the frame at `size` voxels in plane, its RAS+ affine in (x, y, z)
    voxel order, and the voxel size."""
    step = 2 * frame.half / size
    n_z = max(2, int(round((frame.z_hi - frame.z_lo) / step)))
    zs = frame.z_lo + (np.arange(n_z) + 0.5) * step
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = [frame.center_xy[0] - frame.half + step / 2, frame.center_xy[1] - frame.half + step / 2, zs[0]]
    return zs, affine, step


def _ras(stack: np.ndarray) -> np.ndarray:
    """demo.py's rendered stack (z, row anterior→posterior, column right→left) → (x, y, z) voxels in RAS+ order."""
    return np.ascontiguousarray(stack.transpose(2, 1, 0)[::-1, ::-1, :])


def _participant_row(case: str, subject) -> str:
    ventricles = next(name for limit, name in _VENTRICLE_CLASSES if subject.ventricle_gain < limit)
    return f"sub-{case}\t{ventricles}\t{subject.ventricle_gain:.6f}\t{subject.atrophy:.6f}"


def _readme(config: DemoDataConfig, step: float, shape: tuple[int, ...]) -> str:
    return (
        "brainfusion demo volumes (synthetic, for trying volume runs without downloading data)\n\n"
        "Each subject is the MNI ICBM152 2009a template shipped with nilearn under its own random deformation and\n"
        "intensity model. These are NOT real patients: all subjects share one underlying anatomy, so do not use\n"
        "this set to report results.\n\n"
        f"Volumes: {shape[0]}x{shape[1]}x{shape[2]} voxels of {step:.3f} mm, RAS+, skull-stripped T1-weighted, uint8.\n"
        "Labels (derivatives/labels): 0 background, 85 CSF, 170 grey matter, 255 white matter.\n"
        "participants.tsv: ventricles (low/mid/high ventricle enlargement), ventricle_gain and atrophy, the\n"
        "subject's drawn deformation.\n\n"
        f"Config: {json.dumps(asdict(config))}\n\n"
        "Template licence: ICBM 2009a Nonlinear Symmetric template, Copyright (C) 1993-2009 Louis Collins, McConnell\n"
        "Brain Imaging Centre, Montreal Neurological Institute, McGill University (permissive licence, as in the\n"
        "slice demo's README.txt). Reference: V. Fonov et al., NeuroImage 54(1), 2011.\n"
    )


def build_demo_volumes(out_dir: Path, config: DemoDataConfig = DemoDataConfig(), progress: bool = True) -> dict:
    """Write the demo subjects as volumes into `out_dir` (which must not exist, or be empty); config.image_size is
    the in-plane side, config.slices_per_subject and the split fractions are not used (hold subjects out at training).
    Built beside it and renamed into place, as `build_demo_dataset` does. Returns a summary dict."""
    from tqdm import tqdm

    start = time.perf_counter()
    out_dir, tpl, frame = start_build(out_dir, config)
    zs, affine, step = _grid(frame, config.image_size)
    with built_beside(out_dir) as tmp:
        rows = ["participant_id\tventricles\tventricle_gain\tatrophy"]
        shape: tuple[int, ...] = ()
        for i in tqdm(range(config.n_subjects), desc="demo volumes", unit="subject", disable=not progress):
            subject = _draw_subject(np.random.default_rng([config.seed, i]), frame)
            image, labels = (_ras(a) for a in _render_subject(subject, tpl, frame, zs, config.image_size))
            case, shape = f"{i + 1:03d}", image.shape
            save_nifti(image, affine, tmp / f"sub-{case}" / "anat" / f"sub-{case}_T1w.nii.gz")
            save_nifti(labels, affine, tmp / LABELS_FOLDER / f"sub-{case}" / "anat" / f"sub-{case}_T1w_dseg.nii.gz")
            rows.append(_participant_row(case, subject))
        (tmp / PARTICIPANTS).write_text("\n".join(rows) + "\n", encoding="utf-8")
        description = {"Name": "brainfusion demo volumes (synthetic)", "BIDSVersion": "1.9.0", "DatasetType": "raw"}
        (tmp / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.txt").write_text(_readme(config, step, shape), encoding="utf-8")
    return {"out_dir": str(out_dir), "subjects": config.n_subjects, "shape": list(shape), "spacing_mm": round(float(step), 4),
            "participants": str(out_dir / PARTICIPANTS), "labels": str(out_dir / LABELS_FOLDER),
            "seconds": round(time.perf_counter() - start, 3), "config": asdict(config)}
