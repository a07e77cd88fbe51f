"""Data sources (OASIS PNG layout, generic image folders, NIfTI/Analyze volumes), the slice cache,
preprocessing, and the deterministic BatchStream — all on fixtures written here."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from brainfusion.data import slices as data_mod
from brainfusion.config import DataConfig
from brainfusion.data.channels import to_model_range, to_uint8
from brainfusion.data.slices import BatchStream, load_slices, read_slice, read_volume_slices
from brainfusion.errors import BrainfusionError

RAS = np.diag([1.0, 1.0, 1.0, 1.0])
RAS[:3, 3] = [-12, -10, -5]


def _load(path, size=32, **kw):
    return load_slices(DataConfig(path=str(path), image_size=size, **kw), progress=False)


# --------------------------------------------------------------------------------------------
# OASIS layout
# --------------------------------------------------------------------------------------------


def test_oasis_train_merges_train_and_test_and_never_reads_seg(oasis_root):
    train = _load(oasis_root, split="train")
    assert len(train) == 16 + 8
    assert train.images.shape == (24, 32, 32) and train.images.dtype == np.uint8
    folders = {Path(s).parent.name for s in train.sources}
    assert folders == {"keras_png_slices_train", "keras_png_slices_test"}
    assert not any("seg" in s for s in train.sources)
    # the seg maps are flat (one label value inside the ellipse): none of them was loaded
    assert all(len(np.unique(image)) > 10 for image in train.images)
    # each slice is exactly the decoded file it claims to come from
    for image, source in list(zip(train.images, train.sources))[::7]:
        assert np.array_equal(image, read_slice(Path(source), 32))


def test_oasis_validate_is_held_out(oasis_root):
    validate = _load(oasis_root, split="validate")
    train = _load(oasis_root, split="train")
    everything = _load(oasis_root, split="all")
    assert len(validate) == 4
    assert {Path(s).parent.name for s in validate.sources} == {"keras_png_slices_validate"}
    assert not set(validate.sources) & set(train.sources)
    assert sorted(everything.sources) == sorted(train.sources + validate.sources)


# --------------------------------------------------------------------------------------------
# Generic folders of images
# --------------------------------------------------------------------------------------------


def test_generic_folder_is_searched_recursively_for_png_jpeg_tiff(tmp_path, brain_png, png_writer):
    root = tmp_path / "slices"
    png_writer(root / "a" / "x.png", brain_png(1))
    png_writer(root / "a" / "b" / "y.jpg", brain_png(2))
    png_writer(root / "c" / "z.TIF", brain_png(3))
    Image.fromarray(np.stack([brain_png(4)] * 3, axis=-1)).save(root / "c" / "rgb.png")  # colour → grey
    ramp = (np.arange(30 * 40).reshape(30, 40) * 3).astype(np.uint16)  # 16-bit, 0..3597
    (root / "c" / "d").mkdir()
    Image.fromarray(ramp).save(root / "c" / "d" / "deep16.tiff")
    (root / "notes.txt").write_text("not an image")
    png_writer(root / ".hidden" / "skip.png", brain_png(5))
    slices = _load(root)
    names = sorted(Path(s).name for s in slices.sources)
    assert names == ["deep16.tiff", "rgb.png", "x.png", "y.jpg", "z.TIF"]
    assert slices.images.shape == (5, 32, 32)
    assert all(image.max() > 100 for image in slices.images)  # the 16-bit one is rescaled, not blank or clipped
    deep16 = slices.images[[Path(s).name for s in slices.sources].index("deep16.tiff")]
    assert deep16.max() == 255 and len(np.unique(deep16)) > 100


def test_16_bit_tiff_uses_the_full_8_bit_range(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 3).astype(np.uint16)  # values well above 255
    Image.fromarray(ramp).save(tmp_path / "ramp.tiff")
    with Image.open(tmp_path / "ramp.tiff") as img:
        assert img.mode.startswith("I;16")
    image = read_slice(tmp_path / "ramp.tiff", 32)
    assert image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    flat = image.reshape(-1).astype(int)
    assert (np.diff(flat) >= 0).all()  # the ramp stays a ramp (no wrap-around at 256)
    assert len(np.unique(flat)) > 200


@pytest.mark.parametrize("name, dtype", [("offset.png", "<u2"), ("offset.tiff", "<u2"), ("offset_be.tif", ">u2")])
def test_16_bit_slices_with_an_offset_span_0_to_255_in_order(tmp_path, name, dtype):
    """Values only in 1000..4000 (scanner offset): normalised from the image's own range, not clipped to 8 bits
    first (convert("L") would make every pixel 255) nor floored at 0 (which would leave the darkest at 64)."""
    rng = np.random.default_rng(0)
    values = np.sort(rng.integers(1000, 4001, 32 * 32)).reshape(32, 32).astype(dtype)
    Image.fromarray(values).save(tmp_path / name)
    with Image.open(tmp_path / name) as img:
        assert img.mode.startswith("I;16")
    image = read_slice(tmp_path / name, 32)
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    flat, raw = image.reshape(-1).astype(int), values.reshape(-1).astype(int)
    assert (np.diff(flat) >= 0).all()  # sorted values stay sorted: ordering is preserved
    assert len(np.unique(flat)) > 200  # ... with most of the 8-bit levels in use
    middle = slice(64, -64)  # between the robust percentiles a brighter value is never darker
    assert np.corrcoef(flat[middle], raw[middle])[0, 1] > 0.999


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


def test_volume_is_cut_into_axial_slices_dropping_empty_ones(tmp_path, phantom):
    vol = phantom(empty=(0, 1, 8, 9))
    nib.save(nib.Nifti1Image(vol, RAS), tmp_path / "v.nii.gz")
    slices = read_volume_slices(tmp_path / "v.nii.gz", 32, 0.05)
    assert slices.shape == (6, 32, 32) and slices.dtype == np.uint8
    # a looser threshold keeps nothing more (empty is empty); a stricter one keeps nothing
    assert len(read_volume_slices(tmp_path / "v.nii.gz", 32, 0.0001)) == 6
    with pytest.raises(ValueError, match="axial slices"):
        read_volume_slices(tmp_path / "v.nii.gz", 32, 0.95)
    loaded = _load(tmp_path / "v.nii.gz")
    assert np.array_equal(loaded.images, slices)
    assert loaded.sources == [str(tmp_path / "v.nii.gz")] * 6


def test_slices_are_radiologically_oriented_with_anterior_up(tmp_path, phantom):
    nib.save(nib.Nifti1Image(phantom(), RAS), tmp_path / "v.nii.gz")
    for image in read_volume_slices(tmp_path / "v.nii.gz", 32, 0.05):
        row, col = np.unravel_index(int(np.argmax(image)), image.shape)
        assert image[row, col] == 255
        assert row < 16 and col >= 16  # the right-anterior marker is at the top right


def test_reorientation_makes_flipped_affines_equivalent(tmp_path, phantom):
    vol = phantom()
    nib.save(nib.Nifti1Image(vol, RAS), tmp_path / "ras.nii.gz")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [11, 9, -5]  # same world positions, axes x and y reversed
    flipped = np.ascontiguousarray(vol[::-1, ::-1, :])
    nib.save(nib.Nifti1Image(flipped, lps), tmp_path / "lps.nii")
    assert nib.aff2axcodes(nib.load(tmp_path / "lps.nii").affine) == ("L", "P", "S")
    assert not np.array_equal(flipped, vol)
    assert np.array_equal(read_volume_slices(tmp_path / "lps.nii", 32, 0.05), read_volume_slices(tmp_path / "ras.nii.gz", 32, 0.05))


def test_analyze_and_single_frame_4d_volumes(tmp_path, phantom):
    vol = phantom()
    nib.save(nib.Nifti1Image(vol, RAS), tmp_path / "ras.nii.gz")
    reference = read_volume_slices(tmp_path / "ras.nii.gz", 32, 0.05)
    # Analyze 7.5 has no orientation field; nibabel reads it as radiological (LAS), so store x reversed
    nib.save(nib.AnalyzeImage(np.ascontiguousarray(vol[::-1]), RAS), tmp_path / "an.hdr")
    assert (tmp_path / "an.img").is_file()
    assert np.array_equal(read_volume_slices(tmp_path / "an.hdr", 32, 0.05), reference)
    nib.save(nib.Nifti1Image(vol[..., None], RAS), tmp_path / "frame.nii")
    assert nib.load(tmp_path / "frame.nii").shape == (24, 20, 10, 1)
    assert np.array_equal(read_volume_slices(tmp_path / "frame.nii", 32, 0.05), reference)
    # a folder of volumes: the .img half of the Analyze pair is not a second source
    folder = _load(tmp_path)
    assert sorted(Path(s).name for s in set(folder.sources)) == ["an.hdr", "frame.nii", "ras.nii.gz"]
    assert len(folder) == 3 * 6
    # the .img half given on its own is read through its header
    assert np.array_equal(_load(tmp_path / "an.img").images, reference)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _refuse(*args, **kwargs):
    raise AssertionError("decoded a file although the cache holds it")


def test_cache_is_written_once_and_reused(tmp_path, oasis_root, monkeypatch, user_cache_home):
    before = sorted(p for p in oasis_root.rglob("*"))
    first = _load(oasis_root)
    assert sorted(p for p in oasis_root.rglob("*")) == before  # nothing is written into the data folder
    caches = list((user_cache_home / "brainfusion" / "slices").glob("*.npz"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    monkeypatch.setattr(data_mod, "decode_slice", _refuse)
    second = _load(oasis_root)
    assert np.array_equal(first.images, second.images)
    assert first.sources == second.sources
    assert list((user_cache_home / "brainfusion" / "slices").glob("*.npz")) == caches
    assert caches[0].stat().st_mtime_ns == stamp
    # editing a source file invalidates the cache: the file is decoded again
    victim = oasis_root / "keras_png_slices_train" / "case_001_slice_0.nii.png"
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    with pytest.raises(BrainfusionError, match="case_001_slice_0"):
        _load(oasis_root)


def test_cache_location_can_be_chosen(tmp_path, oasis_root, user_cache_home):
    _load(oasis_root, cache_dir=str(tmp_path / "elsewhere"))
    assert len(list((tmp_path / "elsewhere").glob("slices_train_*.npz"))) == 1
    assert not user_cache_home.exists()


def test_changed_analyze_voxels_invalidate_the_cache(tmp_path, phantom, monkeypatch):
    vol = phantom()
    nib.save(nib.AnalyzeImage(vol, RAS), tmp_path / "an.hdr")
    first = _load(tmp_path)
    img = tmp_path / "an.img"
    stamp = img.stat()
    nib.save(nib.AnalyzeImage(vol[::-1].copy(), RAS), tmp_path / "new.hdr")
    os.replace(tmp_path / "new.img", img)  # same .hdr, other voxels
    (tmp_path / "new.hdr").unlink()
    os.utime(img, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    second = _load(tmp_path)
    assert not np.array_equal(first.images, second.images)
    assert np.array_equal(second.images, first.images[:, :, ::-1])


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128, 256])
def test_training_sizes(tmp_path, brain_png, png_writer, size):
    for i in range(2):
        png_writer(tmp_path / f"s{i}.png", brain_png(i, h=40, w=30))
    slices = _load(tmp_path, size=size)
    assert slices.images.shape == (2, size, size) and slices.images.dtype == np.uint8
    assert slices.images.max() > 100
    # 40×30 is padded by 5 black columns each side; after resizing (bicubic rings ~2 source pixels
    # into the padding) the outer half of that band must still be black
    band = size * 5 // 40 // 2
    assert not slices.images[:, :, :band].any() and not slices.images[:, :, -band:].any()
    assert slices.images[:, :, 2 * band : -2 * band].any()


def test_non_square_images_are_padded_to_a_centred_square(tmp_path, png_writer):
    wide = np.full((20, 40), 255, dtype=np.uint8)
    png_writer(tmp_path / "wide.png", wide)
    png_writer(tmp_path / "tall.png", wide.T.copy())
    a = read_slice(tmp_path / "wide.png", 32)
    b = read_slice(tmp_path / "tall.png", 32)
    assert a.shape == (32, 32)
    assert not a[:8].any() and not a[24:].any() and (a[8:24] == 255).all()
    assert np.array_equal(b, a.T)
    # no resize when the padded square already has the training size
    exact = read_slice(tmp_path / "wide.png", 40)
    assert (exact[10:30] == 255).all() and not exact[:10].any() and not exact[30:].any()


def test_to_model_range_and_back():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    x = to_model_range(values)
    assert x.shape == (1, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert torch.allclose(x.flatten(), torch.linspace(-1, 1, 256), atol=1e-6)
    assert np.array_equal(to_uint8(x), values.numpy())
    assert np.array_equal(to_uint8(torch.tensor([[[[-3.0, 3.0]]]])), np.array([[[0, 255]]], dtype=np.uint8))


def test_bad_files_are_skipped_when_asked(tmp_path, brain_png, png_writer):
    for i in range(3):
        png_writer(tmp_path / f"ok{i}.png", brain_png(i))
    (tmp_path / "broken.png").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(BrainfusionError, match="broken.png"):
        _load(tmp_path)
    slices = _load(tmp_path, on_bad_file="skip")
    assert len(slices) == 3
    assert len(slices.skipped) == 1 and "broken.png" in slices.skipped[0]


def test_invalid_data_config_is_refused(tmp_path, png_writer, brain_png):
    png_writer(tmp_path / "a.png", brain_png(0))
    with pytest.raises(BrainfusionError, match="image_size 40"):
        _load(tmp_path, size=40)
    with pytest.raises(BrainfusionError, match="split"):
        _load(tmp_path, split="dev")


# --------------------------------------------------------------------------------------------
# BatchStream
# --------------------------------------------------------------------------------------------


def _indexed_images(n=20, size=8):
    """Image i is flat with value 10·i, plus a bright left column to show flips."""
    images = np.repeat((np.arange(n, dtype=np.uint8) * 10)[:, None, None], size * size, axis=1).reshape(n, size, size)
    images[:, :, 0] = 255
    return images


def _ids(batch: torch.Tensor) -> list[int]:
    return [int(round((float(v) + 1) * 127.5 / 10)) for v in batch[:, 0, 4, 4]]


def test_batch_stream_is_a_pure_function_of_seed_and_step():
    images = _indexed_images()
    a = BatchStream(images, 8, seed=3, hflip=True)
    b = BatchStream(images, 8, seed=3, hflip=True)
    c = BatchStream(images, 8, seed=4, hflip=True)
    assert a.steps_per_epoch == 2
    later_first = b.batch(5)
    batches = [a.batch(step) for step in range(6)]
    assert torch.equal(batches[5], later_first)
    assert all(torch.equal(x, b.batch(step)) for step, x in enumerate(batches))
    assert not all(torch.equal(x, c.batch(step)) for step, x in enumerate(batches))
    for x in batches:
        assert x.shape == (8, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    # within an epoch no slice repeats; epochs are reshuffled
    for epoch in range(3):
        ids = _ids(batches[2 * epoch]) + _ids(batches[2 * epoch + 1])
        assert len(set(ids)) == 16
    assert _ids(batches[0]) != _ids(batches[2])


def test_horizontal_flips():
    images = _indexed_images()
    flipped_any = flipped_all = False
    stream = BatchStream(images, 8, seed=0, hflip=True)
    for step in range(6):
        x = stream.batch(step)
        left = (x[:, 0, :, 0] == 1).all(dim=1)
        right = (x[:, 0, :, -1] == 1).all(dim=1)
        assert torch.equal(left, ~right)  # each image is either as stored or mirrored
        flipped_any |= bool(right.any())
        flipped_all |= bool(right.all())
    assert flipped_any and not flipped_all
    plain = BatchStream(images, 8, seed=0, hflip=False)
    assert all((plain.batch(step)[:, 0, :, 0] == 1).all() for step in range(6))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_the_global_batch(world):
    images = _indexed_images()
    single = BatchStream(images, 8, seed=7, hflip=True)
    ranks = [BatchStream(images, 8, seed=7, hflip=True, rank=r, world=world) for r in range(world)]
    for step in (0, 1, 2, 5):
        parts = [stream.batch(step) for stream in ranks]
        assert all(p.shape[0] == 8 // world for p in parts)
        assert torch.equal(torch.cat(parts), single.batch(step))


def test_batch_stream_needs_one_global_batch():
    with pytest.raises(BrainfusionError, match="fewer than one global batch"):
        BatchStream(_indexed_images(n=5), 8, seed=0, hflip=False)
