"""DICOM series written by pydicom itself: grouped by SeriesInstanceUID, ordered by position along the slice
normal, rescaled, cut like the same voxels saved as NIfTI; gaps, doubled slices and mixed orientations refused."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from brainfusion.config import DataConfig
from brainfusion.data.slices import load_slices
from brainfusion.errors import BrainfusionError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SLOPE, INTERCEPT = 0.5, -1024.0  # stored = (value - intercept) / slope: the loader must undo it
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
ORIGIN, SPACING = np.array([-12.0, -10.0, -5.0]), 2.0  # LPS mm of the first slice, slice spacing


def write_dicom(path, pixels: np.ndarray, position, orientation=AXIAL, series_uid="1.2.3.4", patient="P01", instance=1,
                spacing=(1.0, 1.0)):
    """One single-frame MR slice (rows × columns uint16) in the DICOM file format."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MR_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", patient, series_uid, "1.2.3"
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:g}" for v in position]
    ds.PixelSpacing = [f"{v:g}" for v in spacing]  # between rows, between columns
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{SLOPE:g}", f"{INTERCEPT:g}"
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.save_as(path, write_like_original=False)  # pydicom 2.x
    return path


def write_series(folder, volume: np.ndarray, names=None, **kw) -> list:
    """volume[i, j, k] (i: columns toward patient left, j: rows toward posterior, k: slices upward) as one file
    per slice; names default to a shuffled order so that only the positions can order them."""
    nz = volume.shape[2]
    names = names or [f"IM{(7 * k) % nz:04d}" for k in range(nz)]  # no suffix: found by the DICM magic
    stored = np.round((volume - INTERCEPT) / SLOPE)
    return [write_dicom(folder / names[k], stored[:, :, k].T, ORIGIN + [0, 0, SPACING * k], instance=nz - k, **kw)
            for k in range(nz)]


def _load(path, **kw):
    return load_slices(DataConfig(path=str(path), image_size=16, **kw), progress=False)


def save_as_nifti(volume: np.ndarray, path):
    """The voxels write_series writes, in RAS world coordinates: DICOM's LPS x and y point the other way."""
    affine = np.diag([-1.0, -1.0, SPACING, 1.0])
    affine[:3, 3] = ORIGIN * [-1, -1, 1]
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


def test_a_series_reads_like_the_same_voxels_saved_as_nifti(tmp_path, phantom):
    volume = phantom()
    write_series(tmp_path / "dicom" / "subject1", volume)
    save_as_nifti(volume, tmp_path / "same.nii.gz")
    from_dicom, from_nifti = _load(tmp_path / "dicom"), _load(tmp_path / "same.nii.gz")
    assert len(from_dicom) == 6  # 10 slices, 4 empty ones dropped
    assert np.array_equal(from_dicom.images, from_nifti.images)
    np.testing.assert_allclose(from_dicom.levels, from_nifti.levels)
    assert set(from_dicom.sources) == {str(tmp_path / "dicom" / "subject1")}
    assert set(from_dicom.subjects) == {"P01"}  # the PatientID


def test_a_sagittal_series_gives_the_same_axial_slices(tmp_path, phantom):
    """The same anatomy acquired sagittally (rows run inferior, columns posterior, slices toward the patient's
    right): the affine built from ImageOrientationPatient and PixelSpacing puts every voxel where the axial one was."""
    volume = phantom()
    nx, _ny, nz = volume.shape
    stored = np.round((volume - INTERCEPT) / SLOPE)
    top = ORIGIN[2] + SPACING * (nz - 1)
    for i in range(nx):  # LPS x of voxel column i is ORIGIN[0] + i
        write_dicom(tmp_path / "sag" / f"s{(5 * i) % nx:03d}.dcm", stored[i, :, ::-1].T, [ORIGIN[0] + i, ORIGIN[1], top],
                    orientation=[0, 1, 0, 0, 0, -1], spacing=(SPACING, 1.0))
    sagittal = _load(tmp_path / "sag")
    axial = _load(save_as_nifti(volume, tmp_path / "same.nii.gz"))
    assert np.array_equal(sagittal.images, axial.images)


def test_a_series_without_patient_id_is_its_folders_subject(tmp_path, phantom):
    write_series(tmp_path / "dicom" / "anon7", phantom(), patient="")
    assert set(_load(tmp_path / "dicom").subjects) == {"anon7"}


def test_files_without_an_image_are_ignored(tmp_path, phantom):
    """A DICOMDIR index (DICM magic, no suffix, no pixels) beside the series is not a bad file."""
    write_series(tmp_path / "cd" / "series", phantom())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index = Dataset()
    index.file_meta = meta
    index.FileSetID = "CD"
    try:
        index.save_as(tmp_path / "cd" / "DICOMDIR", enforce_file_format=True)
    except TypeError:
        index.save_as(tmp_path / "cd" / "DICOMDIR", write_like_original=False)
    assert len(_load(tmp_path / "cd")) == 6


def test_two_series_in_one_folder_are_two_volumes(tmp_path, phantom):
    write_series(tmp_path / "d", phantom(), names=[f"a{k}.dcm" for k in range(10)], series_uid="1.2.3.4.1")
    write_series(tmp_path / "d", phantom(), names=[f"b{k}.dcm" for k in range(10)], series_uid="1.2.3.4.2")
    slices = _load(tmp_path / "d")
    assert sorted(set(slices.sources)) == [str(tmp_path / "d" / "1.2.3.4.1"), str(tmp_path / "d" / "1.2.3.4.2")]
    assert len(slices) == 12


def test_a_missing_slice_is_refused_naming_the_folder(tmp_path, phantom):
    files = write_series(tmp_path / "gap", phantom())
    files[5].unlink()
    with pytest.raises(BrainfusionError, match=r"gap could not be read \(its slices jump 4\.00 mm .* a slice is missing"):
        _load(tmp_path / "gap")


def test_a_duplicated_position_is_refused(tmp_path, phantom):
    volume = phantom()
    write_series(tmp_path / "dup", volume)
    write_dicom(tmp_path / "dup" / "copy.dcm", np.zeros((20, 24)), ORIGIN + [0, 0, SPACING * 3])
    with pytest.raises(BrainfusionError, match=r"dup could not be read \(.* lie at the same position .* duplicated"):
        _load(tmp_path / "dup")


def test_mixed_orientations_are_refused(tmp_path, phantom):
    files = write_series(tmp_path / "mixed", phantom())
    write_dicom(files[4], np.zeros((20, 24)), ORIGIN + [0, 0, SPACING * 4], orientation=[1, 0, 0, 0, 0, -1])
    with pytest.raises(BrainfusionError, match=r"mixed could not be read \(.* oriented differently .* mixes orientations"):
        _load(tmp_path / "mixed")


def test_a_bad_series_can_be_skipped_and_the_cli_names_it(tmp_path, phantom, assert_user_error):
    write_series(tmp_path / "data" / "good", phantom(), series_uid="1.1")
    bad = write_series(tmp_path / "data" / "gap", phantom(), series_uid="1.2")
    bad[3].unlink()
    slices = _load(tmp_path / "data", on_bad_file="skip")
    assert set(slices.sources) == {str(tmp_path / "data" / "good")}
    assert len(slices.skipped) == 1 and "gap" in slices.skipped[0]
    assert_user_error(["data", "inspect", "--data", tmp_path / "data", "--image-size", "16"], str(tmp_path / "data" / "gap"),
                      "a slice is missing", "--on-bad-file skip")


def _labels(volume: np.ndarray) -> np.ndarray:
    """Tissue-like labels of the phantom: 1 in the blob, 2 on the orientation marker."""
    return ((volume > 0).astype(np.int16) + (volume >= 400)).astype(np.int16)


def test_a_series_takes_its_label_volume_like_the_same_voxels_in_nifti(tmp_path, phantom):
    volume = phantom()
    write_series(tmp_path / "dicom" / "subject1", volume)
    for folder in ("masks", "nifti", "nifti_masks"):
        (tmp_path / folder).mkdir()
    save_as_nifti(_labels(volume), tmp_path / "masks" / "subject1_dseg.nii.gz")  # named by the series' folder
    save_as_nifti(volume, tmp_path / "nifti" / "same.nii.gz")
    save_as_nifti(_labels(volume), tmp_path / "nifti_masks" / "same_dseg.nii.gz")
    from_dicom = _load(tmp_path / "dicom", masks=str(tmp_path / "masks"))
    from_nifti = _load(tmp_path / "nifti", masks=str(tmp_path / "nifti_masks"))
    assert from_dicom.mask_values == from_nifti.mask_values == (0, 1, 2)
    assert np.array_equal(from_dicom.labels, from_nifti.labels) and np.array_equal(from_dicom.images, from_nifti.images)
    assert all(set(np.unique(m[img > 0]).tolist()) - {0} for img, m in zip(from_dicom.images, from_dicom.labels))


def test_a_series_label_volume_off_its_grid_or_missing_is_refused(tmp_path, phantom):
    volume = phantom()
    write_series(tmp_path / "dicom" / "subject1", volume)
    (tmp_path / "masks").mkdir()
    with pytest.raises(BrainfusionError, match=r"no mask \(looked for subject1\.nii\.gz"):  # none there yet
        _load(tmp_path / "dicom", masks=str(tmp_path / "masks"))
    shifted = np.diag([-1.0, -1.0, SPACING, 1.0])
    shifted[:3, 3] = ORIGIN * [-1, -1, 1] + [0, 0, 3.0]  # the same shape, 3 mm higher: another grid
    nib.save(nib.Nifti1Image(_labels(volume), shifted), tmp_path / "masks" / "subject1_seg.nii.gz")
    with pytest.raises(BrainfusionError, match=r"subject1_seg\.nii\.gz lies elsewhere .* 3 mm"):
        _load(tmp_path / "dicom", masks=str(tmp_path / "masks"))
