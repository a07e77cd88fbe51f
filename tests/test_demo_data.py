"""Tests of the MNI152-based demo data generator (tiny sets, a few seconds in all)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainfusion.data import demo as demo_data
from brainfusion.data.demo import DemoDataConfig, build_demo_dataset
from brainfusion.errors import BrainfusionError

needs_nilearn = pytest.mark.skipif(
    importlib.util.find_spec("nilearn") is None, reason="the MNI152 template ships with nilearn"
)

TINY = DemoDataConfig(n_subjects=4, slices_per_subject=5, image_size=32, seed=0)
SPLITS = ("train", "validate", "test")
NAME = re.compile(r"case_(\d{3})_slice_(\d+)\.nii\.png")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _find(root: Path, case: int, k: int) -> Path:
    (hit,) = list(root.glob(f"keras_png_slices_*/case_{case:03d}_slice_{k}.nii.png"))
    return hit


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "set"
    summary = build_demo_dataset(out, TINY, progress=False)
    return out, summary


@needs_nilearn
def test_layout_and_counts(built):
    out, summary = built
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.txt", "labels.csv"] + [f"keras_png_slices_{s}" for s in SPLITS] + [f"keras_png_slices_seg_{s}" for s in SPLITS]
    )
    assert not list(out.parent.glob("*.tmp-*")), "temporary build folder left behind"
    cases: dict[str, set[str]] = {}
    for s in SPLITS:
        images = sorted(p.name for p in (out / f"keras_png_slices_{s}").iterdir())
        segs = sorted(p.name for p in (out / f"keras_png_slices_seg_{s}").iterdir())
        assert all(NAME.fullmatch(n) for n in images), images
        assert segs == [n.replace("case_", "seg_") for n in images]
        assert summary["counts"][s] == len(images) == TINY.slices_per_subject * summary["subjects"][s]
        assert summary["paths"][s] == str(out / f"keras_png_slices_{s}")
        cases[s] = {NAME.fullmatch(n).group(1) for n in images}
        for c in cases[s]:
            assert {int(NAME.fullmatch(n).group(2)) for n in images if n[5:8] == c} == set(range(5))
    # 4 subjects: at least one in each split, and no subject in two splits.
    assert all(summary["subjects"][s] >= 1 for s in SPLITS)
    assert sum(summary["subjects"].values()) == TINY.n_subjects
    assert set().union(*cases.values()) == {"001", "002", "003", "004"}
    assert sum(len(v) for v in cases.values()) == TINY.n_subjects
    assert summary["seconds"] > 0
    readme = (out / "README.txt").read_text()
    assert "MNI ICBM152" in readme and "n_subjects = 4" in readme


@needs_nilearn
def test_images_are_skull_stripped_brains_with_matching_labels(built):
    out, _ = built
    seg_values: set[int] = set()
    for img_path in sorted(out.glob("keras_png_slices_[tv]*/case_*.png")):
        img = _load(img_path)
        seg = _load(img_path.parent.with_name(img_path.parent.name.replace("slices_", "slices_seg_"))
                     / img_path.name.replace("case_", "seg_"))
        assert img.shape == seg.shape == (32, 32) and img.dtype == np.uint8
        brain = seg > 0
        assert brain.mean() >= 0.12, f"{img_path.name}: brain covers only {brain.mean():.0%}"
        assert not img[~brain].any(), "brain must sit on a black background"
        assert img[brain].mean() > 60
        assert not (img[0].any() or img[-1].any() or img[:, 0].any() or img[:, -1].any())
        seg_values |= set(np.unique(seg).tolist())
    assert seg_values == {0, 85, 170, 255}


@needs_nilearn
def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    again.mkdir()  # an existing empty folder is fine
    build_demo_dataset(again, TINY, progress=False)
    assert _files(again) == _files(out)

    other = tmp_path / "other"
    build_demo_dataset(other, DemoDataConfig(**{**TINY.__dict__, "seed": 1}), progress=False)
    a, b = _load(_find(out, 1, 2)).astype(float), _load(_find(other, 1, 2)).astype(float)
    assert np.abs(a - b).mean() > 5


@needs_nilearn
def test_subject_does_not_depend_on_the_others(built, tmp_path):
    out, _ = built
    more = tmp_path / "more"
    build_demo_dataset(more, DemoDataConfig(**{**TINY.__dict__, "n_subjects": 5}), progress=False)
    for k in range(TINY.slices_per_subject):
        assert _find(more, 3, k).read_bytes() == _find(out, 3, k).read_bytes()


@needs_nilearn
def test_subjects_differ(built):
    out, _ = built
    mid = TINY.slices_per_subject // 2
    slices = [_load(_find(out, c, mid)).astype(float) for c in range(1, 5)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(slices[i] - slices[j]).mean() > 8, (i + 1, j + 1)


@needs_nilearn
def test_non_empty_out_dir_is_refused(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BrainfusionError, match="delete it or pick another"):
        build_demo_dataset(out, TINY, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@needs_nilearn
def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    real = demo_data._render_subject
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_data, "_render_subject", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_demo_dataset(tmp_path / "set", TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change",
    [
        {"n_subjects": 0},
        {"slices_per_subject": 0},
        {"image_size": 4},
        {"validate_fraction": -0.1},
        {"validate_fraction": 0.5, "test_fraction": 0.5},
    ],
)
def test_bad_config_is_a_user_error(tmp_path, change):
    with pytest.raises(BrainfusionError):
        build_demo_dataset(tmp_path / "x", DemoDataConfig(**{**TINY.__dict__, **change}), progress=False)
    assert not (tmp_path / "x").exists()


def test_missing_nilearn_is_a_user_error(monkeypatch):
    real = demo_data.importlib.util.find_spec
    monkeypatch.setattr(
        demo_data.importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a)
    )
    with pytest.raises(BrainfusionError, match="pip install nilearn"):
        demo_data._nilearn_data_dir()


@needs_nilearn
def test_labels_csv_describes_every_slice_and_trains_a_conditional_run(built):
    import csv

    from brainfusion.data.conditions import label_slices
    from brainfusion.config import RunConfig
    from brainfusion.data.slices import load_slices

    out, summary = built
    with open(summary["paths"]["labels"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["file"] for r in rows) == sorted(str(p.relative_to(out)) for p in out.glob("keras_png_slices_[tv]*/case_*.png"))
    for row in rows:
        assert row["ventricles"] in ("low", "mid", "high") and 0 <= float(row["ventricle_gain"]) <= 0.4
        assert float(row["slice_level"]) == int(NAME.search(row["file"]).group(2)) / (TINY.slices_per_subject - 1)
        assert len({(r["ventricles"], r["atrophy"]) for r in rows if r["subject"] == row["subject"]}) == 1
    config = RunConfig()
    config.data.path, config.data.image_size, config.train.max_steps = str(out), 32, 1
    config.condition.labels, config.condition.label_columns = summary["paths"]["labels"], ("ventricles",)
    config.condition.continuous_columns, config.condition.slice_level = ("atrophy",), True
    config.validate()
    images, cond = label_slices(config, load_slices(config.data, progress=False))
    assert cond.shape == (len(images), 3) and not np.isnan(cond).any()
    assert config.condition.names() == (("ventricles",), ("atrophy", "level"))


@needs_nilearn
def test_demo_masks_line_up_with_their_images_at_every_slice_level(built):
    """Through the loader (masks from the seg folders, at the images' 32²): at each slice level K the
    masks' brain is the images' brain, and the tissues are ordered in brightness as in a T1 image."""
    from brainfusion.config import DataConfig
    from brainfusion.data.slices import load_slices

    out, _ = built
    slices = load_slices(DataConfig(path=str(out), image_size=32, split="all", masks="layout"), progress=False)
    levels = np.array([int(NAME.search(s).group(2)) for s in slices.sources])
    assert sorted(set(levels.tolist())) == list(range(TINY.slices_per_subject))
    for k in range(TINY.slices_per_subject):
        images, labels = slices.images[levels == k], slices.labels[levels == k]
        brain, tissue = images > 0, labels > 0
        assert 2 * (brain & tissue).sum() / (brain.sum() + tissue.sum()) > 0.9, f"slice level {k}"
        means = [images[labels == t].mean() for t in (1, 2, 3)]
        assert means[0] < means[1] < means[2], f"slice level {k}: CSF, grey, white means {means}"
