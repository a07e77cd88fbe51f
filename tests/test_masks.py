"""Tissue masks: matching, refusals, alignment, joint training, sampling pairs and given masks, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainfusion.checkpoint import load_checkpoint
from brainfusion.config import MASK_SCALES, DataConfig
from brainfusion.data.channels import labels_from_channels, one_hot, ordinal
from brainfusion.data.masks import fit_square_labels, mask_candidates
from brainfusion.data.slices import BatchStream, load_slices
from brainfusion.diffusion.pipeline import Pipeline
from brainfusion.errors import BrainfusionError
from brainfusion.evaluation.segmenter import dice_per_label, segment, train_segmenter
from conftest import write_png

TRAIN = ["--image-size", "16", "--base-channels", "8", "--batch-size", "4", "--checkpoint-every", "2", "--log-every", "1",
         "--sample-every", "0", "--seed", "5"]
VALUES = (0, 85, 170, 255)


def tissue_pair(seed: int, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """An image and its OASIS seg: concentric CSF / grey / white rings whose intensity follows the label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - size / 2 + rng.uniform(-1, 1), xx - size / 2 + rng.uniform(-1, 1)) / (size * rng.uniform(0.38, 0.45))
    labels = np.select([r < 0.45, r < 0.75, r < 1.0], [3, 2, 1], 0).astype(np.uint8)
    image = np.array([0, 60, 140, 220], np.uint8)[labels] + (labels > 0) * rng.integers(0, 20, labels.shape).astype(np.uint8)
    return image.astype(np.uint8), np.array(VALUES, np.uint8)[labels]


def make_pairs(root: Path, counts=(("train", 10), ("test", 2), ("validate", 4)), size: int = 24) -> Path:
    case = 0
    for split, n in counts:
        for k in range(n):
            case += 1
            image, seg = tissue_pair(case, size)
            write_png(root / f"keras_png_slices_{split}" / f"case_{case:03d}_slice_{k}.nii.png", image)
            write_png(root / f"keras_png_slices_seg_{split}" / f"seg_{case:03d}_slice_{k}.nii.png", seg)
    return root


@pytest.fixture
def pairs(tmp_path) -> Path:
    return make_pairs(tmp_path / "pairs")


def test_layout_masks_are_matched_by_case_and_slice_and_aligned(pairs):
    slices = load_slices(DataConfig(path=str(pairs), image_size=16, masks="layout"), progress=False)
    assert slices.mask_values == VALUES and slices.labels.shape == slices.images.shape == (12, 16, 16)
    for image, labels, source in zip(slices.images, slices.labels, slices.sources):
        case = int(re.search(r"case_(\d+)", source).group(1))
        raw_image, raw_seg = tissue_pair(case)
        expected = fit_square_labels(np.searchsorted(VALUES, raw_seg).astype(np.uint8), 4, 16)
        assert np.array_equal(labels, expected), source
        # labels and intensities agree: each tissue is brighter than the one outside it
        means = [image[labels == k].mean() for k in range(4) if (labels == k).any()]
        assert means == sorted(means)
    assert mask_candidates(Path(slices.sources[0]), pairs, "layout")[0].name.startswith("seg_")


def test_majority_vote_resize_keeps_labels_whole():
    labels = np.zeros((8, 8), np.uint8)
    labels[:, 4:] = 2
    labels[0:2, 0:2] = 1  # one of the four 4×4 blocks: label 1 holds 1/4 of it, label 0 the rest
    small = fit_square_labels(labels, 3, 2)
    assert small.tolist() == [[0, 2], [0, 2]]
    assert set(np.unique(fit_square_labels(labels, 3, 32)).tolist()) <= {0, 1, 2}


def test_volume_masks_from_a_folder_follow_the_kept_slices(tmp_path, phantom):
    nib = pytest.importorskip("nibabel")
    volume = phantom()
    labels = (volume > 0).astype(np.int16) + (volume >= 400).astype(np.int16)  # 0 outside, 1 blob, 2 marker
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "images" / "sub01_T1w.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "labels" / "sub01_T1w_dseg.nii.gz")
    slices = load_slices(DataConfig(path=str(tmp_path / "images"), image_size=16, masks=str(tmp_path / "labels")), progress=False)
    assert slices.mask_values == (0, 1, 2)
    assert len(slices) == 6  # the empty axial slices are dropped from images and masks alike
    for image, label in zip(slices.images, slices.labels):
        assert ((image > 0) == (label > 0)).mean() > 0.9  # edge pixels: a box-filtered image against a majority vote
        assert image[label == 2].mean() > image[label == 1].mean()


def _seg_path(pairs: Path, name: str) -> Path:
    return next(pairs.glob(f"keras_png_slices_seg_*/{name}"))


@pytest.mark.parametrize("defect", ["missing", "size", "value"])
def test_bad_masks_are_refused_in_one_sentence_or_skipped(pairs, defect, assert_user_error, cli):
    seg = _seg_path(pairs, "seg_003_slice_2.nii.png")
    if defect == "missing":
        seg.unlink()
        words = ["case_003_slice_2.nii.png", "no mask", "seg_003_slice_2.nii.png"]
    elif defect == "size":
        write_png(seg, np.zeros((20, 24), np.uint8))
        words = [seg.name, "24x20", "size"]
    else:
        bad = np.asarray(Image.open(seg)).copy()
        bad[0, 0] = 7
        write_png(seg, bad)
        words = [seg.name, "7", "--mask-values"]
    assert_user_error(["train", "--data", pairs, "--masks", "--out-dir", "run", "--max-steps", "1", *TRAIN], *words)
    status, out, err = cli("train", "--data", pairs, "--masks", "--on-bad-file", "skip", "--out-dir", "run2", "--max-steps", "1", *TRAIN)
    assert status == 0, err
    assert "11 slices" not in out and load_checkpoint(next((Path("run2") / "checkpoints").glob("*.safetensors"))).step == 1


def test_masks_folder_and_layout_refusals(tmp_path, pairs, assert_user_error, png_writer, brain_png):
    folder = tmp_path / "plain"
    png_writer(folder / "a.png", brain_png(0, 16, 16))
    assert_user_error(["train", "--data", folder, "--masks", "--out-dir", "r", "--max-steps", "1", *TRAIN], "keras_png_slices_seg_", "--masks")
    assert_user_error(["train", "--data", pairs, "--masks", tmp_path / "nowhere", "--out-dir", "r", "--max-steps", "1", *TRAIN], "nowhere")
    assert_user_error(["train", "--data", pairs, "--masks", "--mask-values", "0,85,85", "--out-dir", "r", "--max-steps", "1", *TRAIN], "--mask-values")


def test_batches_carry_image_and_one_hot_labels_flipped_together(pairs):
    slices = load_slices(DataConfig(path=str(pairs), image_size=16, masks="layout"), progress=False)
    # make every image left-right asymmetric, so a flip of one channel and not the other would show
    slices.images[:, :, :8] //= 2
    stream = BatchStream(slices.images, 4, seed=0, hflip=True, labels=slices.labels, n_labels=4)
    flips = 0
    for step in range(6):
        x = stream.batch(step)
        assert x.shape == (4, 5, 16, 16)
        assert torch.equal(x[:, 1:].sum(1), torch.full((4, 16, 16), -2.0))  # exactly one label on (+1), three off (−1)
        for row, index in zip(x, stream._indices(step)):
            image = torch.from_numpy(slices.images[index]).float() / 127.5 - 1
            labels = torch.from_numpy(slices.labels[index]).long()
            flipped = not torch.equal(row[0], image)
            assert torch.equal(row[0], image.flip(-1) if flipped else image)
            assert torch.equal(row[1:].argmax(0), labels.flip(-1) if flipped else labels)
            flips += flipped
    assert 0 < flips < 24
    scaled = BatchStream(slices.images, 4, seed=0, hflip=True, labels=slices.labels, n_labels=4, label_scale=0.5)
    assert torch.equal(scaled.batch(5)[:, 1:], stream.batch(5)[:, 1:] / 2)  # diffusion.mask_scale


def test_joint_train_sample_pairs_given_mask_and_bitwise_resume(pairs, cli, tmp_path):
    share = ("--mask-loss-share", "0.5", "--given-mask-share", "0.5", "--mask-scale", "0.5")
    status, _, err = cli("train", "--data", pairs, "--masks", "--out-dir", "straight", "--max-steps", "4", *share, *TRAIN)
    assert status == 0, err
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["data"]["masks"] == "layout" and config["data"]["mask_values"] == list(VALUES)
    assert config["model"]["in_channels"] == 5 and config["diffusion"]["mask_loss_share"] == 0.5
    assert config["diffusion"]["given_mask_share"] == 0.5 and config["diffusion"]["mask_scale"] == 0.5

    for args in (("--max-steps", "2"), ("--max-steps", "4", "--resume")):
        status, _, err = cli("train", "--data", pairs, "--masks", "--out-dir", "resumed", *args, *share, *TRAIN)
        assert status == 0, err
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "ckpt_00000004.safetensors")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "ckpt_00000004.safetensors")
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]) and torch.equal(a.ema[key], b.ema[key]), key

    status, out, err = cli("sample", "--checkpoint", "straight", "--n", "3", "--sampler", "dpm++", "--steps", "3", "--out", "s")
    assert status == 0, err
    images = tmp_path / "s" / "images"
    for i in range(3):
        assert np.asarray(Image.open(images / f"sample_{i:05d}.png")).shape == (16, 16)
        assert set(np.unique(np.asarray(Image.open(images / f"seg_{i:05d}.png"))).tolist()) <= set(VALUES)
    assert np.asarray(Image.open(tmp_path / "s" / "grid.png")).ndim == 3  # masks shown as colour overlays

    given = pairs / "keras_png_slices_seg_validate"
    mask = np.searchsorted(VALUES, np.asarray(Image.open(sorted(given.iterdir())[0]))).astype(np.uint8)
    fitted = np.stack([fit_square_labels(mask, 4, 16)] * 2)
    pipe = Pipeline.from_checkpoint(tmp_path / "straight", precision="fp32")
    clean, replaced = (pipe.pairs(2, seed=1, sampler="dpm++sde", steps=3, mask=fitted, mask_clean=c) for c in (None, False))
    assert np.array_equal(clean[1], fitted) and np.array_equal(replaced[1], fitted)  # the mask comes back, either way
    assert not np.array_equal(clean[0], replaced[0])  # the model trained with given_mask_share sees the mask clean
    status, out, err = cli("sample", "--checkpoint", "straight", "--n", "5", "--sampler", "heun", "--steps", "3",
                           "--given-mask", given, "--out", "g")
    assert status == 0, err
    wanted = sorted(given.iterdir())
    for i in range(5):  # the masks come back exactly as given, resized to the model (image i gets mask i mod 4)
        seg = np.asarray(Image.open(wanted[i % 4]))
        expected = np.array(VALUES, np.uint8)[fit_square_labels(np.searchsorted(VALUES, seg).astype(np.uint8), 4, 16)]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "g" / "images" / f"seg_{i:05d}.png")), expected)

    # NIfTI out: the same pictures, RAS+ with the pixel size given, the right way up for ITK-SNAP / FSLeyes
    nib = pytest.importorskip("nibabel")
    status, out, err = cli("sample", "--checkpoint", "straight", "--n", "2", "--sampler", "dpm++", "--steps", "2", "--out", "n",
                           "--no-gif", "--format", "nifti", "--spacing", "2.5")
    assert status == 0, err
    for name in ("sample_00001", "seg_00001"):
        volume = nib.load(tmp_path / "n" / "images" / f"{name}.nii.gz")
        assert volume.shape == (16, 16, 1) and volume.header.get_zooms() == (2.5, 2.5, 2.5)
        assert nib.aff2axcodes(volume.affine) == ("R", "A", "S") and int(volume.header["sform_code"]) == 1
        png = np.asarray(Image.open(tmp_path / "n" / "images" / f"{name}.png"))
        assert np.array_equal(np.rot90(np.asarray(volume.dataobj)[:, :, 0]), png)  # what the loader does to an axial slice


def test_given_masks_are_checked(pairs, cli, tmp_path, tiny_checkpoint, assert_user_error):
    status, _, err = cli("train", "--data", pairs, "--masks", "--out-dir", "joint", "--max-steps", "1", *TRAIN)
    assert status == 0, err
    pipe = Pipeline.from_checkpoint(tmp_path / "joint")
    with pytest.raises(BrainfusionError, match="label indices in 0..3"):
        pipe.pairs(2, mask=np.full((2, 16, 16), 4), steps=2, sampler="ddim")
    with pytest.raises(BrainfusionError, match=r"\(2, 16, 16\)"):
        pipe.pairs(2, mask=np.zeros((2, 8, 8)), steps=2, sampler="ddim")
    images, labels = pipe.pairs(2, steps=2, sampler="ddim")
    assert images.shape == labels.shape == (2, 16, 16) and labels.max() <= 3
    assert np.array_equal(pipe(2, steps=2, sampler="ddim"), images)  # __call__ gives the images of pairs
    assert_user_error(["sample", "--checkpoint", tiny_checkpoint, "--n", "1", "--given-mask", pairs / "keras_png_slices_seg_validate"],
                      "without masks")
    assert_user_error(["sample", "--checkpoint", "joint", "--n", "1", "--given-mask", pairs / "keras_png_slices_validate"],
                      "case_", "outside the label set")


def test_two_stage_pairs_a_joint_runs_masks_and_an_image_model_for_given_masks(pairs, cli, tmp_path, tiny_checkpoint,
                                                                               assert_user_error):
    from brainfusion.export.modelcard import _masks as model_card_masks
    from brainfusion.seeding import derive_seed

    for out, extra in (("joint", ()), ("images", ("--given-mask-share", "1", "--sample-every", "1"))):
        status, _, err = cli("train", "--data", pairs, "--masks", "--out-dir", out, "--max-steps", "2", "--lr", "1e-2",
                             "--warmup-steps", "1", *TRAIN, *extra)  # steps 1 and 2 differ, so autoguidance shows
        assert status == 0, err
    assert (tmp_path / "images" / "samples" / "step_00000001.png").is_file()  # previews made for training masks
    joint = Pipeline.from_checkpoint(tmp_path / "joint", precision="fp32")
    images = Pipeline.from_checkpoint(tmp_path / "images", precision="fp32")
    assert images.config.images_for_masks_only and not joint.config.images_for_masks_only
    assert "every call needs one" in model_card_masks(images.config) and "returns the masks" in model_card_masks(joint.config)
    with pytest.raises(BrainfusionError, match="given masks only"):
        images.pairs(2, steps=2, sampler="dpm++sde")
    with pytest.raises(BrainfusionError, match="does not draw masks"):
        Pipeline.from_checkpoint(tmp_path / "joint").use_mask_source(images)
    with pytest.raises(BrainfusionError, match="without masks"):
        Pipeline.from_checkpoint(tiny_checkpoint).use_mask_source(joint)

    masks = joint.pairs(3, seed=2, sampler="dpm++sde", steps=3)[1]
    drawn, labels = images.use_mask_source(joint).pairs(3, seed=2, sampler="dpm++sde", steps=3, batch_size=2)
    assert np.array_equal(labels, masks)  # stage one: the joint run's own draw
    made_for = images.pairs(3, seed=derive_seed(2, 1), sampler="dpm++sde", steps=3, mask=masks)[0]
    assert np.array_equal(drawn, made_for)  # stage two: images for those masks, on noise of their own

    assert_user_error(["sample", "--checkpoint", "images", "--n", "1", "--steps", "2"], "given masks only")
    status, _, err = cli("sample", "--checkpoint", "joint", "--n", "2", "--sampler", "dpm++", "--steps", "2", "--out", "j", "--no-gif")
    assert status == 0, err
    status, _, err = cli("sample", "--checkpoint", "images", "--mask-model", "joint", "--n", "2", "--sampler", "dpm++",
                         "--steps", "2", "--out", "two", "--no-gif")
    assert status == 0, err
    status, _, err = cli("sample", "--checkpoint", "images", "--given-mask", tmp_path / "j" / "images", "--n", "2",
                         "--sampler", "dpm++", "--steps", "2", "--out", "given", "--no-gif")
    assert status == 0, err  # a folder `sample` wrote gives its seg_*.png as the masks
    for i in range(2):
        seg = np.asarray(Image.open(tmp_path / "j" / "images" / f"seg_{i:05d}.png"))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "images" / f"seg_{i:05d}.png")), seg)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "given" / "images" / f"seg_{i:05d}.png")), seg)
    # --autoguidance guides both stages, each by the weights its own run kept at step 1
    status, _, err = cli("sample", "--checkpoint", "images", "--mask-model", "joint", "--n", "2", "--sampler", "dpm++",
                         "--steps", "2", "--out", "two_ag", "--no-gif", "--autoguidance", "2", "--precision", "fp32")
    assert status == 0, err
    load = lambda run: Pipeline.from_checkpoint(tmp_path / run, precision="fp32")  # noqa: E731
    want = load("images").use_kept_guide(2.0, precision="fp32").use_mask_source(load("joint").use_kept_guide(2.0, precision="fp32"))
    want_images, want_labels = want.pairs(2, sampler="dpm++", steps=2)
    values = np.asarray(want.config.data.mask_values)
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "two_ag" / "images" / f"sample_{i:05d}.png")), want_images[i])
        assert np.array_equal(np.asarray(Image.open(tmp_path / "two_ag" / "images" / f"seg_{i:05d}.png")), values[want_labels[i]])
    second_only = load("images").use_kept_guide(2.0, precision="fp32").use_mask_source(load("joint")).pairs(2, sampler="dpm++", steps=2)
    assert not (np.array_equal(second_only[0], want_images) and np.array_equal(second_only[1], want_labels))
    assert_user_error(["sample", "--checkpoint", "images", "--mask-model", "joint", "--given-mask", tmp_path / "j" / "images",
                       "--n", "1"], "not both")
    assert_user_error(["train", "--data", pairs, "--masks", "--given-mask-share", "1.5", "--out-dir", "x", *TRAIN],
                      "diffusion.given_mask_share", "[0, 1]")


def test_image_first_pairs_an_image_only_runs_images_and_a_label_model_for_given_images(pairs, cli, tmp_path, assert_user_error):
    from brainfusion.diffusion.edm import EDMProcess
    from brainfusion.seeding import derive_seed
    from brainfusion.training.train import _given_channels

    for out, extra in (("image", ()), ("labels", ("--masks", "--recipe", "edm-labels", "--sample-every", "1"))):
        status, _, err = cli("train", "--data", pairs, "--out-dir", out, "--max-steps", "2", "--lr", "1e-2",
                             "--warmup-steps", "1", *TRAIN, *extra)  # steps 1 and 2 differ, so autoguidance shows
        assert status == 0, err
    assert (tmp_path / "labels" / "samples" / "step_00000001.png").is_file()  # previews label training images
    image = Pipeline.from_checkpoint(tmp_path / "image", precision="fp32")
    labels = Pipeline.from_checkpoint(tmp_path / "labels", precision="fp32")
    assert labels.config.masks_for_images_only and not labels.config.images_for_masks_only
    assert (labels.config.diffusion.p_mean, labels.config.diffusion.mask_scale, labels.config.model.channel_mults) == (2.0, 1.0, (1, 2, 4, 4))
    given = _given_channels(labels.config, 0, labels.config.model.in_channels)  # every image given, no label channel
    assert given[:, 0].all() and not given[:, 1:].any()
    x0, noise, out = torch.randn(2, 5, 16, 16), torch.randn(2, 5, 16, 16), torch.randn(4, 5, 16, 16)
    process, sigma = EDMProcess(labels.config.diffusion), torch.tensor([0.5, 2.0])
    loss = lambda image_out, label_out: process.loss(lambda x, t: torch.cat([image_out, label_out], 1), x0, sigma, noise,  # noqa: E731
                                                     given=given[:2])
    assert loss(out[:2, :1], out[:2, 1:]) == loss(out[2:, :1], out[:2, 1:])  # the given image carries no loss
    assert loss(out[:2, :1], out[:2, 1:]) != loss(out[:2, :1], out[2:, 1:])  # the labels carry it all

    with pytest.raises(BrainfusionError, match="given images only"):
        labels.pairs(2, steps=2, sampler="dpm++sde")
    with pytest.raises(BrainfusionError, match="image-only pixel run"):
        Pipeline.from_checkpoint(tmp_path / "labels").use_image_source(labels)
    with pytest.raises(BrainfusionError, match="draws no labels"):
        image.use_image_source(image)

    drawn = image(3, seed=2, sampler="dpm++sde", steps=3)
    got_images, got_labels = labels.use_image_source(image).pairs(3, seed=2, sampler="dpm++sde", steps=3, batch_size=2)
    assert np.array_equal(got_images, drawn)  # stage one: the image-only run's own draw, untouched
    again = Pipeline.from_checkpoint(tmp_path / "labels", precision="fp32").pairs(3, seed=derive_seed(2, 1), sampler="dpm++sde",
                                                                                  steps=3, image=drawn)
    assert np.array_equal(again[0], drawn) and np.array_equal(again[1], got_labels)  # stage two: labels on noise of their own
    assert got_labels.shape == (3, 16, 16) and got_labels.max() < 4

    status, _, err = cli("sample", "--checkpoint", "labels", "--image-model", "image", "--n", "2", "--sampler", "dpm++",
                         "--steps", "2", "--out", "two", "--no-gif", "--autoguidance", "2", "--precision", "fp32")
    assert status == 0, err  # --autoguidance guides both stages, each by the weights its own run kept
    load = lambda run: Pipeline.from_checkpoint(tmp_path / run, precision="fp32")  # noqa: E731
    want = load("labels").use_kept_guide(2.0, precision="fp32").use_image_source(load("image").use_kept_guide(2.0, precision="fp32"))
    want_images, want_labels = want.pairs(2, sampler="dpm++", steps=2)
    values = np.asarray(VALUES)
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "images" / f"sample_{i:05d}.png")), want_images[i])
        assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "images" / f"seg_{i:05d}.png")), values[want_labels[i]])
    assert_user_error(["sample", "--checkpoint", "labels", "--n", "1", "--steps", "2"], "given images only")
    assert_user_error(["sample", "--checkpoint", "labels", "--image-model", "image", "--mask-model", "labels", "--n", "1"],
                      "leave out given_mask and mask_model")
    assert_user_error(["export", "labels", "--out", "x"], "label model for given images")
    assert not (tmp_path / "x").exists()
    assert_user_error(["train", "--data", pairs, "--masks", "--given-image-share", "0.6", "--given-mask-share", "0.6",
                       "--out-dir", "y", *TRAIN], "diffusion.given_image_share", "add up to 1")
    assert_user_error(["train", "--data", pairs, "--given-image-share", "1", "--out-dir", "y", *TRAIN], "needs masks", "--masks")
    assert not (tmp_path / "y").exists()


def test_dice_matches_torchmetrics_and_a_segmenter_learns_the_rings():
    from torchmetrics.functional.segmentation import dice_score

    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 4, (6, 16, 16)), rng.integers(0, 4, (6, 16, 16))
    ours = dice_per_label(pred, truth, 4)
    theirs = dice_score(torch.from_numpy(pred).reshape(1, -1, 16), torch.from_numpy(truth).reshape(1, -1, 16), num_classes=4,
                        include_background=False, average="none", input_format="index")
    assert np.allclose(ours, theirs.numpy().ravel(), atol=1e-6)

    pairs_ = [tissue_pair(s, 16) for s in range(24)]
    images = np.stack([p[0] for p in pairs_])
    labels = np.searchsorted(VALUES, np.stack([p[1] for p in pairs_])).astype(np.uint8)
    net = train_segmenter(images[:20], labels[:20], 4, steps=40, batch_size=8, seed=0)
    assert np.nanmean(dice_per_label(segment(net, images[20:]), labels[20:], 4)) > 0.6
    again = train_segmenter(images[:20], labels[:20], 4, steps=40, batch_size=8, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_mask_loss_share_weights_the_label_channels_together():
    from brainfusion.diffusion.loss import channel_weights, denoising_loss

    assert channel_weights(1, 4, 0.0) is None and channel_weights(1, 0, 0.5) is None
    prediction, target = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 5, 3, 3)
    weight = channel_weights(1, 4, 0.3)
    assert torch.isclose(weight.mean(), torch.tensor(1.0))
    expected = 0.7 * prediction[:, :1].square().mean() + 0.3 * prediction[:, 1:].square().mean()
    assert torch.isclose(denoising_loss(prediction, target, "mse", weight), expected)
    assert torch.isclose(denoising_loss(prediction, target, "mse", torch.ones(1, 5, 1, 1)), denoising_loss(prediction, target, "mse"))


def test_given_channels_are_seen_clean_and_carry_no_loss():
    from brainfusion.config import DiffusionConfig
    from brainfusion.diffusion.edm import EDMProcess

    process, g = EDMProcess(DiffusionConfig()), torch.Generator().manual_seed(0)
    x0, noise, sigma = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g), torch.tensor([0.5, 20.0])
    given = torch.zeros(2, 3, 1, 1, dtype=torch.bool)
    given[1, 1:] = True
    seen = []

    def network(offset):
        def forward(x_in, c_noise):
            seen.append(x_in)
            return torch.zeros_like(x_in) + offset * given  # differs from the other only where channels are given
        return forward

    losses = [process.loss(network(offset), x0, sigma, noise, given=given) for offset in (0.0, 5.0)]
    assert torch.equal(losses[0], losses[1])
    c_in = 1 / (sigma**2 + 0.25).sqrt()
    assert torch.equal(seen[0][1, 1:], x0[1, 1:])  # clean and unscaled
    assert torch.allclose(seen[0][1, :1], c_in[1] * (x0[1, :1] + 20.0 * noise[1, :1]))
    assert torch.allclose(seen[0][0], c_in[0] * (x0[0] + 0.5 * noise[0]))


def test_one_hot_is_the_model_range():
    labels = torch.tensor([[[0, 2], [1, 0]]])
    x = one_hot(labels, 3)
    assert x.shape == (1, 3, 2, 2) and x[0, :, 0, 1].tolist() == [-1, -1, 1]


def test_ordinal_labels_are_one_channel_of_levels_read_back_exactly(pairs):
    labels = torch.tensor([[[0, 1], [2, 3]]])
    x = ordinal(labels, 4, 0.5)
    assert x.shape == (1, 1, 2, 2) and torch.allclose(x.flatten(), torch.tensor([-0.5, -1 / 6, 1 / 6, 0.5]))
    assert torch.equal(labels_from_channels(x + 0.08, 2, 4, 0.5, "ordinal"), labels.to(torch.uint8))  # the nearest level
    big = torch.randint(0, 4, (3, 8, 8), generator=torch.Generator().manual_seed(0))
    pooled = ordinal(big, 4, 1.0, grid=2)  # a latent's grid: each block's mean level
    # a block whose levels cancel sums to 0 in one order and to ~3e-8 in another: float32 rounding, hence atol
    assert torch.allclose(pooled, ordinal(big, 4).reshape(3, 1, 2, 4, 2, 4).mean((3, 5)), atol=1e-6)
    slices = load_slices(DataConfig(path=str(pairs), image_size=16, masks="layout"), progress=False)
    stream = BatchStream(slices.images, 4, seed=0, hflip=True, labels=slices.labels, n_labels=4, label_encoding="ordinal")
    x = stream.batch(3)
    assert x.shape == (4, 2, 16, 16)
    assert torch.equal(labels_from_channels(x[:, 1:], 16, 4, 1.0, "ordinal"), BatchStream(
        slices.images, 4, seed=0, hflip=True, labels=slices.labels, n_labels=4).batch(3)[:, 1:].argmax(1).to(torch.uint8))


def test_an_ordinal_joint_run_samples_pairs_and_holds_a_given_mask(pairs, cli, tmp_path):
    status, _, err = cli("train", "--data", pairs, "--masks", "--mask-encoding", "ordinal", "--out-dir", "o", "--max-steps", "2", *TRAIN)
    assert status == 0, err
    pipe = Pipeline.from_checkpoint(tmp_path / "o", precision="fp32")
    assert pipe.config.model.in_channels == 2 and pipe.config.diffusion.mask_encoding == "ordinal"
    assert pipe.config.diffusion.mask_scale == MASK_SCALES["ordinal"] != MASK_SCALES["one-hot"]  # each encoding's own default
    images, labels = pipe.pairs(3, seed=0, sampler="dpm++sde", steps=3)
    assert images.shape == labels.shape == (3, 16, 16) and labels.max() <= 3
    given = np.stack([fit_square_labels(np.searchsorted(VALUES, np.asarray(Image.open(f))).astype(np.uint8), 4, 16)
                      for f in sorted((pairs / "keras_png_slices_seg_validate").iterdir())[:2]])
    assert np.array_equal(pipe.pairs(2, seed=1, sampler="heun", steps=3, mask=given)[1], given)


def test_evaluate_scores_the_images_of_a_mask_model_not_its_masks(pairs, cli, tmp_path):
    from brainfusion.diffusion.sample import read_generated

    status, _, err = cli("train", "--data", pairs, "--masks", "--out-dir", "joint", "--max-steps", "1", *TRAIN)
    assert status == 0, err
    status, _, err = cli("sample", "--checkpoint", "joint", "--n", "3", "--sampler", "ddim", "--steps", "2", "--out", "s", "--no-gif")
    assert status == 0, err
    images = read_generated(tmp_path / "s" / "images", 16)
    assert images.shape == (3, 16, 16)
    assert np.array_equal(images[1], np.asarray(Image.open(tmp_path / "s" / "images" / "sample_00001.png")))
    status, out, err = cli("evaluate", "--generated", tmp_path / "s" / "images", "--real", pairs, "--real-split", "validate",
                           "--image-size", "32", "--out", "e")
    assert status == 0, err
    assert "evaluated 3 generated" in out


def test_a_run_from_before_mask_scale_resumes_and_a_joint_run_keeps_its_scale(tmp_path):
    """A checkpoint older than diffusion.mask_scale loads at ±1; without masks that field must not block a resume."""
    import dataclasses
    from types import SimpleNamespace

    from brainfusion.config import RunConfig
    from brainfusion.training.train import _check_resumable

    fresh = RunConfig()
    old = SimpleNamespace(config=RunConfig(diffusion=dataclasses.replace(fresh.diffusion, mask_scale=1.0)), path=tmp_path / "c.safetensors")
    _check_resumable(fresh, old)
    joint = RunConfig()
    joint.data.masks, joint.data.mask_values = "layout", (0, 85, 170, 255)
    old.config.data.masks, old.config.data.mask_values = "layout", (0, 85, 170, 255)
    with pytest.raises(BrainfusionError, match="different model or diffusion config"):
        _check_resumable(joint, old)


def test_autoguidance_mixes_outputs_and_passes_conditions():
    from brainfusion.diffusion.process import autoguidance

    model = lambda x, t, *c: x * 3 + t.view(-1, 1, 1, 1) + (c[0].sum() if c else 0)  # noqa: E731
    guide = lambda x, t, *c: x - 1  # noqa: E731
    x, t, cond = torch.randn(2, 1, 4, 4), torch.tensor([1.0, 2.0]), torch.ones(2, 3)
    assert autoguidance(model, guide, 1.0) is model
    for w in (0.0, 2.5):
        assert torch.allclose(autoguidance(model, guide, w)(x, t), guide(x, t) + w * (model(x, t) - guide(x, t)))
    assert torch.allclose(autoguidance(model, guide, 2.0)(x, t, cond), 2 * model(x, t, cond) - guide(x, t, cond))


def test_a_run_keeps_its_halfway_weights_as_the_autoguidance_guide(pairs, cli, tmp_path, tiny_checkpoint, assert_user_error):
    from types import SimpleNamespace

    from brainfusion.training.train import _guide_due

    for out, steps in (("joint", "4"), ("half", "2")):
        status, _, err = cli("train", "--data", pairs, "--masks", "--out-dir", out, "--max-steps", steps, *TRAIN)
        assert status == 0, err
    kept = sorted((tmp_path / "joint" / "checkpoints" / "guide").glob("*.safetensors"))
    assert [p.name for p in kept] == ["ckpt_00000002.safetensors"]  # outside the rotation, and without optimiser state
    a, b = load_checkpoint(kept[0], with_optimizer=False), load_checkpoint(tmp_path / "half", with_optimizer=False)
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)  # the run's own step-2 weights

    pipe = Pipeline.from_checkpoint(tmp_path / "joint", precision="fp32")
    plain = pipe.pairs(2, seed=3, sampler="dpm++sde", steps=3)
    itself = Pipeline.from_checkpoint(tmp_path / "joint", precision="fp32")
    assert all(np.array_equal(u, v) for u, v in zip(pipe.use_guide(itself, 2.0).pairs(2, seed=3, sampler="dpm++sde", steps=3), plain))
    guided = pipe.use_guide(Pipeline.from_checkpoint(kept[0], precision="fp32"), 2.0).pairs(2, seed=3, sampler="dpm++sde", steps=3)
    assert not np.array_equal(guided[0], plain[0])
    kept_guide = Pipeline.from_checkpoint(tmp_path / "joint", precision="fp32").use_kept_guide(2.0, precision="fp32")
    assert kept_guide.guide[0].checkpoint == kept[0].resolve() or kept_guide.guide[0].checkpoint == kept[0]
    status, _, err = cli("sample", "--checkpoint", "joint", "--n", "2", "--sampler", "dpm++sde", "--steps", "3", "--no-gif",
                         "--autoguidance", "2", "--seed", "3", "--precision", "fp32")
    assert status == 0, err
    folder = tmp_path / "joint" / "samples" / "dpm++sde-3-ag2" / "images"
    assert np.array_equal(np.stack([np.asarray(Image.open(folder / f"sample_{i:05d}.png")) for i in range(2)]), guided[0])

    assert_user_error(["sample", "--checkpoint", "joint", "--n", "1", "--autoguidance", "2", "--guide", tiny_checkpoint],
                      "model.in_channels", "earlier checkpoint")
    assert_user_error(["sample", "--checkpoint", "half", "--n", "1", "--autoguidance", "-1"], "0 or more")
    assert_user_error(["train", "--data", pairs, "--masks", "--out-dir", "x", "--guide-at", "1", *TRAIN], "train.guide_at")
    status, _, err = cli("train", "--data", pairs, "--masks", "--out-dir", "none", "--max-steps", "1", "--guide-at", "0", *TRAIN)
    assert status == 0, err
    assert_user_error(["sample", "--checkpoint", "none", "--n", "1", "--autoguidance", "2"], "kept no guide checkpoint")

    timed = lambda share: SimpleNamespace(time_share=lambda: share)  # noqa: E731
    s = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(guide_at=0.5)), max_steps=None, guide_kept=False)
    assert not _guide_due(7, s, timed(0.4)) and _guide_due(7, s, timed(0.6))
    s.guide_kept = True
    assert not _guide_due(8, s, timed(0.7))  # once per run folder


def test_self_conditioning_feeds_the_previous_estimate_in_training_and_sampling():
    from brainfusion.config import DiffusionConfig
    from brainfusion.diffusion.edm import EDMProcess

    process, g = EDMProcess(DiffusionConfig(self_condition=True)), torch.Generator().manual_seed(0)
    x0, noise, sigma = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g), torch.tensor([0.5, 3.0])
    seen = []

    def network(x_in, c_noise):  # F reads both halves of its input: x_t and the previous estimate
        seen.append(x_in)
        return x_in[:, :2] * 0.5 + x_in[:, 2:] * 0.1

    plain = process.loss(network, x0, sigma, noise)
    assert len(seen) == 1 and seen[0].shape == (2, 4, 4, 4) and not seen[0][:, 2:].any()  # zeros for "no estimate"
    seen.clear()
    first = process.loss(network, x0, sigma, noise, estimate_first=True)
    c_skip, c_out, c_in, _ = process._broadcast(sigma, x0)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    assert len(seen) == 2 and torch.allclose(seen[1][:, 2:], c_skip * x + c_out * 0.5 * c_in * x)  # D of the first pass
    assert not torch.equal(plain, first)

    seen.clear()
    denoise = process.denoiser(network)
    out = denoise(x, 3.0)
    again = denoise(x, 3.0)
    assert not seen[0][:, 2:].any() and torch.equal(seen[1][:, 2:], out)  # each call hands the network the last output
    assert not torch.equal(out, again)
    assert torch.equal(process.denoiser(network)(x, 3.0), out) and not seen[2][:, 2:].any()  # a new trajectory starts from zeros


def test_a_self_conditioned_joint_run_resumes_bitwise_samples_pairs_and_refuses_export(pairs, cli, tmp_path, assert_user_error):
    sc = ("--self-condition",)
    status, _, err = cli("train", "--data", pairs, "--masks", "--out-dir", "straight", "--max-steps", "4", *sc, *TRAIN)
    assert status == 0, err
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["diffusion"]["self_condition"] and config["model"]["self_condition"] and config["model"]["in_channels"] == 5
    for args in (("--max-steps", "2"), ("--max-steps", "4", "--resume")):
        status, _, err = cli("train", "--data", pairs, "--masks", "--out-dir", "resumed", *args, *sc, *TRAIN)
        assert status == 0, err
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "ckpt_00000004.safetensors")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "ckpt_00000004.safetensors")
    assert a.model["stem.weight"].shape[1] == 10  # image + 4 labels, and as many again for the previous estimate
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]) and torch.equal(a.ema[key], b.ema[key]), key
    pipe = Pipeline.from_checkpoint(tmp_path / "straight", precision="fp32")
    images, labels = pipe.pairs(3, seed=0, sampler="dpm++sde", steps=3)
    assert images.shape == labels.shape == (3, 16, 16) and labels.max() <= 3
    assert np.array_equal(pipe.pairs(3, seed=0, sampler="dpm++sde", steps=3)[0], images)  # no state leaks between calls
    assert_user_error(["export", "straight", "--out", "hub"], "self-conditioned", "--self-condition")
    assert not (tmp_path / "hub").exists()
    assert_user_error(["train", "--data", pairs, "--recipe", "vp", "--patch-size", "1", "--self-condition", "--out-dir", "vp", "--max-steps", "1", *TRAIN],
                      "diffusion.self_condition", "EDM")
