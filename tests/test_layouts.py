"""BIDS datasets (sub-*/[ses-*/]anat/*_T1w.nii[.gz], participants.tsv as the label table) and the subject
ID every slice gets (BIDS, DICOM PatientID, OASIS-1, the OASIS PNG cases, else folder or name)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainfusion.config import ConditionConfig, DataConfig
from brainfusion.data.conditions import read_labels
from brainfusion.data.layouts import subject_of
from brainfusion.data.slices import load_slices
from brainfusion.errors import BrainfusionError

RAS = np.diag([1.0, 1.0, 1.0, 1.0])


def _load(path, **kw):
    return load_slices(DataConfig(path=str(path), image_size=16, **kw), progress=False)


def make_bids(root: Path, phantom, description: bool = True) -> Path:
    """Two subjects (one with two sessions), other modalities and derivatives beside the T1w volumes."""
    t1 = nib.Nifti1Image(phantom(), RAS)
    for rel in ("sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-a/anat/sub-02_ses-a_T1w.nii.gz",
                "sub-02/ses-b/anat/sub-02_ses-b_T1w.nii", "sub-01/anat/sub-01_T2w.nii.gz", "sub-01/func/sub-01_task-rest_bold.nii.gz",
                "derivatives/prep/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(t1, root / rel)
    if description:
        (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text("participant_id\tgroup\tage\nsub-01\tcontrol\t71\nsub-02\tpatient\t78\n")
    return root


@pytest.mark.parametrize("description", [True, False])
def test_bids_reads_the_t1w_volumes_only(tmp_path, phantom, description):
    root = make_bids(tmp_path / "bids", phantom, description)
    slices = _load(root)
    rel = sorted({Path(s).relative_to(root).as_posix() for s in slices.sources})
    assert rel == ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-a/anat/sub-02_ses-a_T1w.nii.gz",
                   "sub-02/ses-b/anat/sub-02_ses-b_T1w.nii"]
    assert len(slices) == 3 * 6
    assert sorted(set(slices.subjects)) == ["sub-01", "sub-02"] and slices.subjects.count("sub-02") == 12


def test_slices_in_sub_folders_without_anat_are_a_plain_folder(tmp_path, png_writer, brain_png):
    for name in ("sub-01/a.png", "sub-02/b.png"):
        png_writer(tmp_path / "slices" / name, brain_png(1, 16, 16))
    slices = _load(tmp_path / "slices")
    assert len(slices) == 2 and slices.subjects == ["sub-01", "sub-02"]


def test_participants_tsv_labels_the_slices_by_subject(tmp_path, phantom):
    root = make_bids(tmp_path / "bids", phantom)
    slices = _load(root)
    cc = ConditionConfig(labels=str(root / "participants.tsv"), label_columns=("group",), continuous_columns=("age",))
    labels = read_labels(cc, root, slices.sources, slices.levels, slices.subjects)
    assert all(p is None for p in labels.problems)
    by_subject = {s: (g, a) for s, g, a in zip(slices.subjects, labels.categorical["group"], labels.continuous["age"])}
    assert by_subject == {"sub-01": ("control", 71.0), "sub-02": ("patient", 78.0)}


def test_a_bids_dataset_without_t1w_is_refused_in_one_sentence(tmp_path, phantom, assert_user_error):
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(phantom(), RAS), root / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    (root / "dataset_description.json").write_text("{}")
    with pytest.raises(BrainfusionError, match="without T1-weighted images"):
        _load(root)
    assert_user_error(["data", "inspect", "--data", root, "--image-size", "16"], str(root), "_T1w.nii", "--data")


@pytest.mark.parametrize("source, patient, subject", [
    ("sub-07/ses-1/anat/sub-07_ses-1_T1w.nii.gz", "", "sub-07"),
    ("export/series1", "PAT42", "PAT42"),
    ("export/series1", "", "series1"),  # a DICOM series without a PatientID: its folder
    ("OAS1_0031_MR1/PROCESSED/MPRAGE/T88_111/OAS1_0031_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr", "", "OAS1_0031"),
    ("OAS1_0031_MR2/RAW/OAS1_0031_MR2_mpr-1_anon.hdr", "", "OAS1_0031"),
    ("keras_png_slices_train/case_012_slice_3.nii.png", "", "case_012"),
    ("Bright/subj3_slice_1.png", "", "subj3"),
    ("patient_a/scan.nii.gz", "", "patient_a"),
    ("scan_b.nii.gz", "", "scan_b"),
])
def test_subject_ids_by_layout(tmp_path, source, patient, subject):
    assert subject_of(str(tmp_path / source), tmp_path, patient, folder=source.startswith("export")) == subject


def test_subjects_are_cached_with_the_slices(tmp_path, make_oasis_root, monkeypatch):
    from brainfusion.data import slices as slices_mod

    root = make_oasis_root(tmp_path / "oasis", n_train=3, n_test=2, n_validate=1, size=16)
    first = _load(root)
    assert sorted(first.subjects) == ["case_001", "case_002", "case_003", "case_004", "case_005"]
    monkeypatch.setattr(slices_mod, "read_slice", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    assert _load(root).subjects == first.subjects


def test_oasis1_reads_the_masked_gfc_volume_of_each_session(tmp_path, phantom, assert_user_error):
    root = tmp_path / "oasis1"
    volume = nib.AnalyzeImage(phantom(), RAS)
    for session in ("disc1/OAS1_0001_MR1", "disc1/OAS1_0002_MR1", "disc2/OAS1_0002_MR2"):
        name = session.split("/")[-1]
        for rel in (f"PROCESSED/MPRAGE/T88_111/{name}_mpr_n4_anon_111_t88_masked_gfc.hdr",
                    f"PROCESSED/MPRAGE/T88_111/{name}_mpr_n4_anon_111_t88_gfc.hdr",  # not skull-stripped
                    f"RAW/{name}_mpr-1_anon.hdr", f"FSL_SEG/{name}_mpr_n4_anon_111_t88_masked_gfc_fseg.hdr"):
            (root / session / rel).parent.mkdir(parents=True, exist_ok=True)
            nib.save(volume, root / session / rel)
    slices = _load(root)
    assert sorted({Path(s).name for s in slices.sources}) == [
        "OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr", "OAS1_0002_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr",
        "OAS1_0002_MR2_mpr_n4_anon_111_t88_masked_gfc.hdr"]
    assert slices.subjects.count("OAS1_0001") == 6 and slices.subjects.count("OAS1_0002") == 12  # MR2 is a rescan
    assert len(_load(root / "disc1" / "OAS1_0001_MR1")) == 6  # one session folder works too
    for path in (root / "disc1").rglob("*masked_gfc.*"):
        path.unlink()
    assert_user_error(["data", "inspect", "--data", root / "disc1", "--image-size", "16"], "OAS1_xxxx_MRn", "_masked_gfc", "--data")


def _oasis1(root: Path, phantom) -> Path:
    volume = nib.AnalyzeImage(phantom(), RAS)
    for name in ("OAS1_0001_MR1", "OAS1_0002_MR1"):
        path = root / name / f"PROCESSED/MPRAGE/T88_111/{name}_mpr_n4_anon_111_t88_masked_gfc.hdr"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(volume, path)
    return root


def _sixteen_bit(root: Path, phantom) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    for k in range(6):
        pixels = (1000 + 3000 * phantom()[:, :, 2 + k % 6] / 500).astype(np.uint16)
        Image.fromarray(pixels).save(root / f"slice_{k}.png")
    return root


@pytest.mark.parametrize("layout", ["bids", "oasis1", "dicom", "16-bit"])
def test_every_layout_trains_a_few_steps(layout, tmp_path, phantom, cli):
    root = tmp_path / layout
    if layout == "bids":
        make_bids(root, phantom)
    elif layout == "oasis1":
        _oasis1(root, phantom)
    elif layout == "dicom":
        from test_dicom import write_series

        root.mkdir()
        write_series(root, phantom())
    else:
        _sixteen_bit(root, phantom)
    status, out, err = cli("train", "--data", root, "--out-dir", tmp_path / "run", "--max-steps", "2", "--image-size", "16",
                           "--base-channels", "8", "--batch-size", "4", "--sample-every", "0", "--holdout-subjects", "1"
                           if layout in ("bids", "oasis1") else "0")
    assert status == 0, err
    assert "trained to step 2" in out
