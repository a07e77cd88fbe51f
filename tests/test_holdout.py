"""`train --holdout-subjects`: whole subjects drawn from the seed, recorded in the run's config, kept on resume,
and never seen in a training batch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainfusion.config import DataConfig
from brainfusion.data import slices as slices_mod
from brainfusion.data.channels import to_uint8
from brainfusion.data.slices import load_slices
from brainfusion.data.subjects import choose_heldout, split_subjects
from brainfusion.errors import BrainfusionError

TINY = ["--image-size", "16", "--base-channels", "8", "--patch-size", "1", "--batch-size", "4", "--sample-every", "0",
        "--no-flip", "--log-every", "1"]


def test_the_draw_depends_on_the_seed_and_the_subjects_only():
    subjects = [f"s{i:02d}" for i in range(20) for _ in range(3)]
    first = choose_heldout(subjects, 4, seed=0)
    assert len(first) == 4 and list(first) == sorted(first)
    assert choose_heldout(list(reversed(subjects)), 4, seed=0) == first  # file order does not matter
    assert choose_heldout(subjects, 0.2, seed=0) == first  # a share: 20 % of 20 subjects
    assert choose_heldout(subjects, 0.01, seed=0)  # a share rounds up to one subject
    assert any(choose_heldout(subjects, 4, seed=s) != first for s in (1, 2, 3))
    with pytest.raises(BrainfusionError, match="leaving none"):
        choose_heldout(subjects, 20, seed=0)


def test_split_keeps_every_per_slice_field_together(make_oasis_root, tmp_path):
    root = make_oasis_root(tmp_path / "oasis", n_train=6, n_test=2, n_validate=1, size=16)
    data = DataConfig(path=str(root), image_size=16, holdout_subjects=2)
    whole = load_slices(data, progress=False)
    train, held = split_subjects(data, whole, seed=0)
    assert len(data.heldout_subjects) == 2 and set(held.subjects) == set(data.heldout_subjects)
    assert not set(train.subjects) & set(held.subjects) and len(train) + len(held) == len(whole)
    for part in (train, held):
        for image, source, subject in zip(part.images, part.sources, part.subjects):
            i = whole.sources.index(source)
            assert np.array_equal(image, whole.images[i]) and whole.subjects[i] == subject


def test_held_out_subjects_never_reach_a_training_batch(cli, tmp_path, make_oasis_root, monkeypatch):
    root = make_oasis_root(tmp_path / "oasis", n_train=8, n_test=4, n_validate=1, size=16)
    seen = []
    original = slices_mod.BatchStream.batch

    def recording(self, step):
        x = original(self, step)
        seen.extend(to_uint8(x))
        return x

    monkeypatch.setattr(slices_mod.BatchStream, "batch", recording)
    run = tmp_path / "run"
    status, _, err = cli("train", "--data", root, "--out-dir", run, "--max-steps", "6", "--holdout-subjects", "0.25", *TINY)
    assert status == 0, err
    heldout = json.loads((run / "config.json").read_text())["data"]["heldout_subjects"]
    assert len(heldout) == 3  # a quarter of the 12 training subjects (case_001..case_012)
    whole = load_slices(DataConfig(path=str(root), image_size=16), progress=False)
    held = {whole.images[i].tobytes() for i, s in enumerate(whole.subjects) if s in heldout}
    kept = {whole.images[i].tobytes() for i, s in enumerate(whole.subjects) if s not in heldout}
    assert len(seen) == 6 * 4 and all(image.tobytes() in kept for image in seen)  # 9 training slices, 3 epochs of 2 batches
    assert not {image.tobytes() for image in seen} & held
    # a resumed run keeps the subjects it held out
    status, _, err = cli("train", "--data", root, "--out-dir", run, "--max-steps", "8", "--holdout-subjects", "0.25", "--resume", *TINY)
    assert status == 0, err
    assert json.loads((run / "config.json").read_text())["data"]["heldout_subjects"] == heldout


def test_bad_holdout_amounts_are_refused_in_cli_terms(tmp_path, make_oasis_root, assert_user_error):
    root = make_oasis_root(tmp_path / "oasis", n_train=3, n_test=1, n_validate=1, size=16)
    assert_user_error(["train", "--data", root, "--out-dir", tmp_path / "r1", "--max-steps", "1", "--holdout-subjects", "1.5", *TINY],
                      "--holdout-subjects", "1.5")
    assert_user_error(["train", "--data", root, "--out-dir", tmp_path / "r2", "--max-steps", "1", "--holdout-subjects", "4", *TINY],
                      "--holdout-subjects 4", "4 of the 4 subjects")


def test_data_inspect_prints_the_subjects(cli, tmp_path, make_oasis_root):
    root = make_oasis_root(tmp_path / "oasis", n_train=3, n_test=1, n_validate=1, size=16)
    status, out, err = cli("data", "inspect", "--data", root, "--image-size", "16", "--montage", tmp_path / "m.png")
    assert status == 0, err
    assert "4 slices" in out and "4 subjects" in out
    assert "subjects (slices): case_001 (1), case_002 (1), case_003 (1), case_004 (1)" in out


def test_evaluate_a_run_against_its_held_out_subjects(cli, tmp_path, make_oasis_root):
    root = make_oasis_root(tmp_path / "oasis", n_train=6, n_test=2, n_validate=1, size=16)
    run = tmp_path / "run"
    status, _, err = cli("train", "--data", root, "--out-dir", run, "--max-steps", "2", "--holdout-subjects", "3", *TINY)
    assert status == 0, err
    status, out, err = cli("evaluate", "--checkpoint", run, "--out", tmp_path / "eval", "--n", "8", "--batch-size", "8",
                           "--sampler", "dpm++sde", "--steps", "2", "--image-size", "32", "--precision", "fp32")
    assert status == 0, err
    assert "evaluated 8 generated vs 3 real slices" in out  # one slice per held-out subject
    plain = tmp_path / "plain"
    assert cli("train", "--data", root, "--out-dir", plain, "--max-steps", "1", *TINY)[0] == 0
    status, _, err = cli("evaluate", "--checkpoint", plain, "--out", tmp_path / "eval2", "--n", "8")
    assert status == 2 and "without --holdout-subjects" in err and "--real" in err
