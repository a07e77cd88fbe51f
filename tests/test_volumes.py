"""Whole-brain volumes: the Haar transform, the demo's volumes, volume runs from data to NIfTI samples, resume, and the
user errors of the volume path. Tiny: 16³ grids of 12 mm, 8-channel U-Nets of two levels, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from brainfusion.diffusion.wavelet import from_coefficients, haar3d, inverse_haar3d, to_coefficients

TINY = ("--grid", "16", "--spacing", "12", "--channel-mults", "1,2", "--base-channels", "8", "--batch-size", "2",
        "--checkpoint-every", "2", "--sample-every", "0", "--guide-at", "0")


@pytest.fixture(scope="module")
def demo_volumes(tmp_path_factory) -> Path:
    """Four demo subjects as 16×16×13 volumes (about 13.5 mm voxels), with labels and participants.tsv."""
    from brainfusion.data.demo import DemoDataConfig
    from brainfusion.data.demo_volumes import build_demo_volumes

    out = tmp_path_factory.mktemp("demo") / "volumes"
    build_demo_volumes(out, DemoDataConfig(n_subjects=4, image_size=16), progress=False)
    return out


def test_haar3d_is_orthonormal_and_exactly_inverted():
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = haar3d(x)
    assert y.shape == (2, 24, 2, 3, 4)
    assert torch.equal(inverse_haar3d(y), x) or (inverse_haar3d(y) - x).abs().max() < 1e-14
    assert torch.isclose(y.norm(), x.norm(), rtol=1e-12)  # orthonormal: white noise stays white
    constant = haar3d(torch.full((1, 1, 2, 2, 2), 0.5))[0, :, 0, 0, 0]
    assert constant[0] == pytest.approx(0.5 * 2 * 2**0.5) and not constant[1:].any()  # band 0 is the low band
    volume = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    coefficients = to_coefficients(volume)
    assert (from_coefficients(coefficients) - volume).abs().max() < 1e-6
    assert coefficients[:, 0].abs().max() <= 1.0 + 1e-6  # the low band as block means, in the voxels' range
    scaled = to_coefficients(volume, detail_scale=3.0)
    assert torch.allclose(scaled[:, 1:], 3 * coefficients[:, 1:]) and torch.equal(scaled[:, :1], coefficients[:, :1])
    assert (from_coefficients(scaled, detail_scale=3.0) - volume).abs().max() < 1e-6


def test_demo_volumes_are_ras_nifti_with_labels_and_participants(demo_volumes):
    image = nib.load(str(demo_volumes / "sub-001" / "anat" / "sub-001_T1w.nii.gz"))
    labels = nib.load(str(demo_volumes / "derivatives" / "labels" / "sub-001" / "anat" / "sub-001_T1w_dseg.nii.gz"))
    assert image.shape == labels.shape and image.shape[:2] == (16, 16)
    assert np.allclose(image.affine, labels.affine) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    spacing = image.header.get_zooms()
    assert np.allclose(spacing, spacing[0]) and 10 < spacing[0] < 16  # isotropic, the frame over 16 voxels
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 85, 170, 255}
    rows = (demo_volumes / "participants.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["participant_id", "ventricles", "ventricle_gain", "atrophy"]
    assert [r.split("\t")[0] for r in rows[1:]] == ["sub-001", "sub-002", "sub-003", "sub-004"]


def test_demo_train_sample_writes_aligned_nifti_volumes(cli, tmp_path):
    from PIL import Image

    from brainfusion import Pipeline
    from brainfusion.data.volumes import grid_affine, to_ras_voxels
    from brainfusion.images import volume_montage

    status, out, err = cli("data", "demo", "--volumes", "--out", "vols", "--n-subjects", "4", "--image-size", "16")
    assert status == 0, err
    status, out, err = cli("train", "--volumes", "--data", "vols", "--out-dir", "run", "--max-steps", "2", "--holdout-subjects", "2", *TINY,
                           "--guide-at", "0.5")  # keeps its step-1 weights as the autoguidance guide
    assert status == 0, err
    status, out, err = cli("sample", "--checkpoint", "run", "--n", "2", "--steps", "3", "--out", "samples")
    assert status == 0, err
    samples = tmp_path / "samples"
    assert (samples / "montage.png").is_file() and (samples / "axial.gif").is_file()
    written = nib.load(str(samples / "volume_0001.nii.gz"))
    assert written.shape == (16, 16, 16) and written.get_data_dtype() == np.uint8
    assert np.allclose(written.affine, grid_affine(16, 12.0)) and nib.aff2axcodes(written.affine) == ("R", "A", "S")
    assert int(written.header["qform_code"]) == int(written.header["sform_code"]) == 1
    status, out, err = cli("evaluate", "--checkpoint", "run", "--out", "eval", "--steps", "3")  # as many as were held out
    assert status == 0, err
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    for plane in ("axial", "coronal", "sagittal"):
        figure = results["summary"][f"FD_domain_{plane}"]
        assert np.isfinite(figure["value"]) and np.isfinite(figure["floor"])
    assert (tmp_path / "eval" / "montage.png").is_file() and "FD_domain" in (tmp_path / "eval" / "results.md").read_text()
    status, _out, err = cli("evaluate", "--checkpoint", "run", "--out", "eval2", "--real", "vols")
    assert status == 2 and "volume run" in err and "Traceback" not in err
    # --autoguidance scores the guided volumes, as `sample --autoguidance` draws them (the run kept its step-1 weights)
    status, _out, err = cli("evaluate", "--checkpoint", "run", "--out", "eval_ag", "--steps", "3", "--autoguidance", "2",
                            "--precision", "fp32")
    assert status == 0, err
    pipe = Pipeline.from_checkpoint(tmp_path / "run", precision="fp32")
    plain = pipe.volumes(2, seed=0, steps=3)
    guided = pipe.use_kept_guide(2, precision="fp32").volumes(2, seed=0, steps=3)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "eval_ag" / "montage.png")), volume_montage(guided))
    assert not np.array_equal(guided, plain)
    # the pipeline returns the same volume in memory: volume i of a seed has its own noise, in any batch
    volume = Pipeline.from_checkpoint(tmp_path / "run")(1, seed=0, steps=3, first_index=1)
    assert volume.shape == (1, 16, 16, 16) and volume.dtype == np.uint8
    assert np.array_equal(to_ras_voxels(volume[0]), np.asarray(written.dataobj))


@pytest.mark.parametrize("recipe", ["volume-wavelet", "volume-slabs"])
def test_a_volume_run_resumes_bitwise(demo_volumes, tmp_path, recipe):
    """In fp32: on an AMD EPYC with AVX-512 BF16 oneDNN's bf16 3-D convolutions differ from run to run (two straight
    bf16 runs of the wavelet recipe end apart), so bf16 would test the kernels, not the resume."""
    from brainfusion.config import recipe_config
    from brainfusion.training.train import train

    def config(out: Path, steps: int):
        c = recipe_config(recipe)
        c.data.path, c.data.grid, c.data.spacing = str(demo_volumes), 16, 12.0
        c.model.channel_mults, c.model.base_channels = (1, 2), 8
        c.train.out_dir, c.train.max_steps, c.train.batch_size = str(out), steps, 2
        c.train.checkpoint_every, c.train.sample_every, c.train.guide_at, c.train.precision = 2, 0, 0.0, "fp32"
        return c

    straight = train(config(tmp_path / "straight", 4), progress=False)
    train(config(tmp_path / "parts", 2), progress=False)
    resumed = train(config(tmp_path / "parts", 4), resume=True, progress=False)
    a, b = load_file(str(straight.checkpoint)), load_file(str(resumed.checkpoint))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_slices_given_to_volumes_are_one_sentence(assert_user_error, oasis_root):
    line = assert_user_error(("train", "--volumes", "--data", oasis_root, "--out-dir", "run", "--max-steps", "1", *TINY),
                             ".png", "2-D image", "--volumes")
    assert "--data" in line


def test_a_flat_nifti_given_to_volumes_is_one_sentence(assert_user_error, tmp_path):
    flat = tmp_path / "flat" / "slice.nii.gz"
    flat.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ones((16, 16, 1), np.float32), np.eye(4)), str(flat))
    assert_user_error(("train", "--volumes", "--data", flat.parent, "--out-dir", "run", "--max-steps", "1", *TINY),
                      "slice.nii.gz", "2-D image")


@pytest.mark.parametrize("broken", ["singular", "not-finite"])
def test_a_volume_whose_affine_cannot_be_resampled_is_one_sentence(assert_user_error, tmp_path, broken):
    affine = np.diag([1.0, 1.0, 0.0, 1.0]) if broken == "singular" else np.diag([np.nan, 1.0, 1.0, 1.0])
    bad = tmp_path / "bad" / f"{broken}.nii.gz"
    bad.parent.mkdir()
    image = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), None)
    image.header.set_sform(affine, code=2)  # a header as a broken converter writes it: nibabel reads the sform back as is
    image.header.set_qform(None, code=0)
    nib.save(image, str(bad))
    assert_user_error(("train", "--volumes", "--data", bad.parent, "--out-dir", "run", "--max-steps", "1", *TINY),
                      bad.name, "affine", "--on-bad-file skip")


def test_an_unknown_condition_of_a_conditional_volume_run_is_one_sentence(cli, assert_user_error, demo_volumes):
    status, _out, err = cli("train", "--volumes", "--recipe", "volume-wavelet", "--data", demo_volumes, "--out-dir", "run",
                            "--max-steps", "1", *TINY, "--labels", demo_volumes / "participants.tsv", "--label-columns", "ventricles",
                            "--continuous-columns", "atrophy")
    assert status == 0, err
    status, _out, err = cli("sample", "--checkpoint", "run", "--n", "1", "--steps", "2", "--out", "s", "--no-gif",
                            "--condition", "ventricles=high", "atrophy=0.5", "--guidance", "2")
    assert status == 0, err
    assert_user_error(("sample", "--checkpoint", "run", "--n", "1", "--steps", "2", "--out", "s2", "--condition", "age=70"),
                      "age", "ventricles, atrophy")


def test_a_wavelet_detail_scale_out_of_range_names_the_key():
    from brainfusion.config import DiffusionConfig
    from brainfusion.errors import BrainfusionError

    with pytest.raises(BrainfusionError, match="diffusion.wavelet_detail_scale"):
        DiffusionConfig(wavelet_detail_scale=0.0).validate()


@pytest.mark.parametrize("recipe, extra", [("volume-slabs", ("--slab-context-noise", "0.1")), ("volume-slices", ())])
def test_a_slab_run_trains_and_samples_conditioned_volumes(cli, tmp_path, demo_volumes, recipe, extra):
    from brainfusion import Pipeline
    from brainfusion.data.volumes import to_ras_voxels

    status, _out, err = cli("train", "--recipe", recipe, "--data", demo_volumes, "--out-dir", "run", "--max-steps", "2", *TINY, *extra,
                            "--labels", demo_volumes / "participants.tsv", "--label-columns", "ventricles",
                            "--continuous-columns", "atrophy")
    assert status == 0, err
    status, _out, err = cli("sample", "--checkpoint", "run", "--n", "2", "--steps", "2", "--out", "s", "--no-gif",
                            "--condition", "atrophy=0.5", "--guidance", "2")
    assert status == 0, err
    written = nib.load(str(tmp_path / "s" / "volume_0001.nii.gz"))
    assert written.shape == (16, 16, 16) and (tmp_path / "s" / "montage.png").is_file()
    volume = Pipeline.from_checkpoint(tmp_path / "run").volumes(1, seed=0, steps=2, first_index=1, condition={"atrophy": 0.5},
                                                                   guidance=2.0)
    assert np.array_equal(to_ras_voxels(volume[0]), np.asarray(written.dataobj))


def test_training_slabs_are_consecutive_slices_with_background_below():
    from brainfusion.config import SlabConfig
    from brainfusion.diffusion.slabs import training_slabs

    volumes = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(3, 1, 8, 2, 2) / 10
    slabs, cond = training_slabs(volumes, None, SlabConfig(size=2, context=3), torch.Generator().manual_seed(0), slice(0, 3), 3)
    assert slabs.shape == (3, 5, 2, 2) and cond.shape == (3, 1)
    for slab, place in zip(slabs[:, :, 0, 0], cond[:, 0]):
        start = round(float(place) * 6)  # grid 8, size 2: starts 0..6
        expected = [(k / 10 if k >= 0 else -1.0) for k in range(start - 3, start + 2)]
        assert torch.allclose(slab, torch.tensor(expected))


@pytest.mark.parametrize("slab", [{"size": 3}, {"size": 0, "context": 2}])
def test_a_slab_that_does_not_fit_the_grid_names_the_key(slab):
    from brainfusion.config import recipe_config
    from brainfusion.errors import BrainfusionError

    c = recipe_config("volume-slabs")
    c.slab.size, c.slab.context = slab["size"], slab.get("context", 4)
    with pytest.raises(BrainfusionError, match="slab.size"):
        c.validate()


def test_evaluate_volumes_scores_folders_of_volumes(cli, assert_user_error, tmp_path):
    from brainfusion.data.demo import DemoDataConfig
    from brainfusion.data.demo_volumes import build_demo_volumes

    for name, seed in (("gen", 1), ("held", 2), ("train", 3)):
        build_demo_volumes(tmp_path / name, DemoDataConfig(n_subjects=3, image_size=16, seed=seed), progress=False)
    status, _out, err = cli("evaluate", "--volumes", "--generated", "gen", "--real", "held", "--train", "train", "--out", "ev",
                            "--grid", "16", "--spacing", "12")
    assert status == 0, err
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["counts"]["generated"] == 3 and results["shape"] == [16, 16, 16]
    for plane in ("axial", "coronal", "sagittal"):
        figure = results["summary"][f"FD_domain_{plane}"]
        assert np.isfinite(figure["value"]) and np.isfinite(figure["floor"])
    assert_user_error(("evaluate", "--volumes", "--generated", "gen", "--real", "held", "--out", "ev2"), "--train")


def test_context_noise_touches_the_context_only():
    from brainfusion.config import SlabConfig
    from brainfusion.diffusion.slabs import training_slabs

    volumes = torch.linspace(-1, 1, 16).view(1, 1, 16, 1, 1).expand(64, 1, 16, 8, 8).contiguous()
    clean, _ = training_slabs(volumes, None, SlabConfig(size=4, context=4), torch.Generator().manual_seed(0), slice(0, 64), 64)
    noised, _ = training_slabs(volumes, None, SlabConfig(size=4, context=4, context_noise=0.1), torch.Generator().manual_seed(0),
                               slice(0, 64), 64)
    assert torch.equal(clean[:, 4:], noised[:, 4:])
    assert abs(float((noised[:, :4] - clean[:, :4]).std()) - 0.1) < 0.01


def test_volume_and_mask_pairs_train_and_sample_aligned_label_volumes(cli, tmp_path, demo_volumes):
    from brainfusion import Pipeline
    from brainfusion.config import load_config
    from brainfusion.data.channels import label_image
    from brainfusion.data.volumes import grid_affine, to_ras_voxels

    status, _out, err = cli("train", "--volumes", "--data", demo_volumes, "--masks", demo_volumes / "derivatives" / "labels",
                            "--out-dir", "run", "--max-steps", "2", *TINY, "--mask-encoding", "ordinal", "--holdout-subjects", "2")
    assert status == 0, err
    config = load_config(tmp_path / "run" / "config.json")
    assert config.data.mask_values == (0, 85, 170, 255) and config.model.in_channels == (4 + 4) * 2  # image + ordinal per slice
    status, _out, err = cli("sample", "--checkpoint", "run", "--n", "2", "--steps", "2", "--out", "s", "--no-gif")
    assert status == 0, err
    image, labels = (nib.load(str(tmp_path / "s" / f"volume_0001{suffix}.nii.gz")) for suffix in ("", "_dseg"))
    assert labels.shape == image.shape == (16, 16, 16) and np.allclose(labels.affine, grid_affine(16, 12.0))
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 85, 170, 255}
    assert (tmp_path / "s" / "labels_montage.png").is_file()
    volumes, made = Pipeline.from_checkpoint(tmp_path / "run").volume_pairs(1, seed=0, steps=2, first_index=1)
    assert np.array_equal(to_ras_voxels(volumes[0]), np.asarray(image.dataobj))
    assert np.array_equal(to_ras_voxels(label_image(made[0], config.data.mask_values)), np.asarray(labels.dataobj))
    status, _out, err = cli("evaluate", "--checkpoint", "run", "--out", "ev", "--steps", "2")
    assert status == 0, err
    summary = json.loads((tmp_path / "ev" / "results.json").read_text())["summary"]
    for figure in ("label_w1_CSF", "label_w1_grey_matter", "label_w1_white_matter", "label_image_dice"):
        assert summary[figure]["floor"] is not None and summary[figure]["value"] is not None
    assert 0.3 < summary["label_image_dice"]["floor"] <= 1  # real labels fit their own images
    labels = demo_volumes / "derivatives" / "labels"  # sample's folder, pictures and label volumes beside, read as its volumes
    status, _out, err = cli("evaluate", "--volumes", "--generated", "s", "--generated-masks", "s", "--real", demo_volumes,
                            "--real-masks", labels, "--train", demo_volumes, "--train-masks", labels, "--out", "ev2",
                            "--grid", "16", "--spacing", "12")
    assert status == 0, err
    results = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert results["counts"]["generated"] == 2 and results["summary"]["label_image_dice"]["value"] is not None


def test_label_agreement_is_one_for_labels_that_are_the_intensity_classes():
    from brainfusion.evaluation.volumes import intensity_classes, label_agreement, label_shares

    volumes = np.random.default_rng(0).integers(0, 256, (2, 6, 6, 6)).astype(np.uint8)
    classes = intensity_classes(volumes, (80, 160))
    assert np.all(label_agreement(volumes, classes, (80, 160)) == 1.0)
    assert np.all(label_agreement(volumes, (classes % 3) + 1, (80, 160)) < 0.5)  # shifted labels disagree
    shares = label_shares(classes, 4)
    assert shares.shape == (2, 3) and np.allclose(shares.sum(1), 1)


def test_drawn_tissue_is_kept_in_one_piece():
    from brainfusion.data.volumes import tissue_in_one_piece

    labels = np.zeros((2, 8, 8, 8), dtype=np.uint8)
    labels[0, 1:5, 1:5, 1:5] = 2
    labels[0, 2, 2, 2] = 1  # tissue of another class inside the piece stays
    labels[0, 5, 5, 5] = 3  # touches the piece's corner: 26-connected, so it stays
    labels[0, 7, 0, 7] = 1  # a speck apart from it goes
    kept = tissue_in_one_piece(labels)
    expected = labels.copy()
    expected[0, 7, 0, 7] = 0
    np.testing.assert_array_equal(kept, expected)
    assert labels[0, 7, 0, 7] == 1  # the input is left as it was
    assert not kept[1].any()  # a volume with no tissue stays empty


def test_label_volumes_come_onto_the_grid_by_majority_with_their_image(demo_volumes, assert_user_error, tmp_path):
    import shutil

    from brainfusion.config import DataConfig
    from brainfusion.data.volumes import load_volumes

    config = DataConfig(path=str(demo_volumes), volumes=True, grid=16, spacing=12.0, masks=str(demo_volumes / "derivatives" / "labels"))
    loaded = load_volumes(config, progress=False)
    assert loaded.labels.shape == loaded.images.shape and loaded.mask_values == (0, 85, 170, 255)
    assert set(np.unique(loaded.labels)) == {0, 1, 2, 3}
    inside = loaded.labels > 0  # labelled tissue is where the image is bright, background where it is dark
    assert loaded.images[inside].mean() > 4 * loaded.images[~inside].mean()
    white, csf = loaded.images[loaded.labels == 3].mean(), loaded.images[loaded.labels == 1].mean()
    assert white > csf  # T1: white matter brighter than CSF

    broken = tmp_path / "vols"
    shutil.copytree(demo_volumes, broken)
    label_file = broken / "derivatives" / "labels" / "sub-002" / "anat" / "sub-002_T1w_dseg.nii.gz"
    original = nib.load(str(label_file))
    nib.save(nib.Nifti1Image(np.asarray(original.dataobj)[:8], original.affine), str(label_file))
    assert_user_error(["train", "--volumes", "--data", broken, "--masks", broken / "derivatives" / "labels", "--out-dir", "run",
                       "--max-steps", "1", *TINY], "sub-002_T1w_dseg.nii.gz")


def test_slab_channels_go_slice_by_slice_with_label_background_below():
    from brainfusion.config import SlabConfig
    from brainfusion.diffusion.slabs import background, training_slabs

    outside = background(4, 0.25)
    assert torch.allclose(outside, torch.tensor([-1.0, 0.25, -0.25, -0.25, -0.25]))  # dark image, label 0 one-hot
    image = torch.arange(6.0).view(1, 1, 6, 1, 1) / 10
    volumes = torch.cat([image, image + 1], 1).expand(2, 2, 6, 1, 1)  # two channels per slice: x and x + 1
    slabs, _ = training_slabs(volumes, None, SlabConfig(size=2, context=2), torch.Generator().manual_seed(0), slice(0, 2), 2,
                              torch.tensor([-1.0, -2.0]))
    assert slabs.shape == (2, 8, 1, 1)
    for slab in slabs[:, :, 0, 0].view(2, 4, 2):
        for image_value, label_value in slab:
            assert label_value == (-2.0 if image_value == -1 else image_value + 1)


def test_image_first_labels_after_for_volumes(cli, assert_user_error, tmp_path, demo_volumes):
    """A volume label model (recipe volume-labels) trains with every image slice given, previews its labels, and
    labels an image-only volume run's volumes: `sample --image-model` writes that run's own volumes with labels."""
    from brainfusion import Pipeline

    labels = demo_volumes / "derivatives" / "labels"
    base = ("--volumes", "--data", demo_volumes, "--max-steps", "2", "--holdout-subjects", "2", *TINY)
    status, _out, err = cli("train", *base, "--out-dir", "images")
    assert status == 0, err
    status, _out, err = cli("train", *base, "--masks", labels, "--recipe", "volume-labels", "--out-dir", "labels",
                            "--sample-every", "2", "--channel-mults", "1,2")
    assert status == 0, err
    assert (tmp_path / "labels" / "samples" / "step_00000002.png").is_file()
    status, _out, err = cli("sample", "--checkpoint", "labels", "--image-model", "images", "--n", "2", "--steps", "2",
                            "--out", "pairs", "--no-gif")
    assert status == 0, err
    status, _out, err = cli("sample", "--checkpoint", "images", "--n", "2", "--steps", "2", "--out", "alone", "--no-gif")
    assert status == 0, err
    for i in range(2):
        made, alone = (nib.load(str(tmp_path / d / f"volume_{i:04d}.nii.gz")) for d in ("pairs", "alone"))
        assert np.array_equal(np.asarray(made.dataobj), np.asarray(alone.dataobj))  # the image run's volumes, untouched
        label = np.asarray(nib.load(str(tmp_path / "pairs" / f"volume_{i:04d}_dseg.nii.gz")).dataobj)
        assert label.shape == (16, 16, 16) and set(np.unique(label)) <= {0, 85, 170, 255}
    pipe = Pipeline.from_checkpoint(tmp_path / "labels")
    given = Pipeline.from_checkpoint(tmp_path / "images").volumes(1, seed=3, steps=2)
    volumes, made = pipe.volume_pairs(1, seed=3, steps=2, images=given)
    assert np.array_equal(volumes, given) and made.shape == given.shape
    assert_user_error(("sample", "--checkpoint", "labels", "--n", "1", "--steps", "2", "--out", "none"), "labels", "--image-model")
    status, _out, err = cli("evaluate", "--checkpoint", "labels", "--image-model", "images", "--out", "ev", "--steps", "2")
    assert status == 0, err
    summary = json.loads((tmp_path / "ev" / "results.json").read_text())["summary"]
    assert summary["label_image_dice"]["value"] is not None and summary["FD_domain_axial"]["value"] is not None
    assert_user_error(("sample", "--checkpoint", "images", "--image-model", "labels", "--n", "1", "--steps", "2", "--out", "x"),
                      "given_image_share")


def test_a_volume_label_model_is_given_every_image_slice_and_draws_only_labels():
    from brainfusion.config import recipe_config
    from brainfusion.diffusion.slabs import images_first
    from brainfusion.training.train import _given_channels

    c = recipe_config("volume-labels")
    c.data.path, c.data.masks, c.data.mask_values, c.data.grid, c.train.max_steps = "unused", "unused", (0, 85, 170, 255), 16, 1
    c.validate()
    per_slice = c.slab_channels  # the image and 4 one-hot labels
    given = _given_channels(c, 0, c.model.in_channels)[0, :, 0, 0].view(c.slab.context + c.slab.size, per_slice)
    assert given[: c.slab.context].all() and given[c.slab.context :, 0].all() and not given[c.slab.context :, 1:].any()
    order = images_first(c.slab.context, c.slab.size, per_slice)  # the given channels in front, as `sample` fixes them
    assert sorted(order.tolist()) == list(range(c.model.in_channels))
    assert given.flatten()[order][: c.slab.context * per_slice + c.slab.size].all() and not given.flatten()[order][-16:].any()
