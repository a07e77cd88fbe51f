"""Bad inputs through the real command line: each must end with status 2 and exactly one
`brainfusion: error:` line that names the file or option — never a traceback."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brainfusion.config import ModelConfig

TINY_TRAIN = ["--image-size", "16", "--patch-size", "1", "--base-channels", "8", "--batch-size", "2", "--max-steps", "1"]


@pytest.fixture
def good_pngs(tmp_path, brain_png, png_writer):
    root = tmp_path / "slices"
    for i in range(4):
        png_writer(root / f"ok_{i}.png", brain_png(i))
    return root


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_missing_data_folder(assert_user_error, tmp_path):
    assert_user_error(["train", "--data", tmp_path / "nowhere", "--max-steps", "1"], "nowhere", "does not exist")
    assert_user_error(["data", "inspect", "--data", tmp_path / "nowhere"], "nowhere")


def test_empty_data_folder(assert_user_error, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert_user_error(["data", "inspect", "--data", tmp_path / "empty"], "empty", "no PNG/JPEG/TIFF")


def test_corrupt_png(assert_user_error, good_pngs):
    (good_pngs / "noise.png").write_bytes(np.random.default_rng(0).bytes(700))
    assert_user_error(["data", "inspect", "--data", good_pngs], "noise.png", "--on-bad-file skip")


def test_truncated_png(assert_user_error, good_pngs, brain_png, png_writer):
    whole = png_writer(good_pngs / "whole.png", brain_png(9, h=64, w=64)).read_bytes()
    (good_pngs / "half.png").write_bytes(whole[: len(whole) // 2])
    (good_pngs / "whole.png").unlink()
    assert_user_error(["data", "inspect", "--data", good_pngs], "half.png", "truncated")


@pytest.mark.parametrize("shape", [(8, 8), (6, 6, 6, 2, 2)], ids=["rank2", "rank5"])
def test_nifti_of_the_wrong_rank(assert_user_error, tmp_path, shape):
    path = tmp_path / f"rank{len(shape)}.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, dtype=np.float32), np.eye(4)), path)
    assert_user_error(["data", "inspect", "--data", path], path.name, str(shape))


def test_image_size_not_a_multiple_of_16(assert_user_error, good_pngs):
    assert_user_error(["train", "--data", good_pngs, "--image-size", "40", "--max-steps", "1"], "image_size", "40")
    assert_user_error(["data", "inspect", "--data", good_pngs, "--image-size", "40"], "image_size", "40")


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--split", "dev"], "data.split"),
        (["--on-bad-file", "maybe"], "data.on_bad_file"),
        (["--norm", "layer"], "model.norm"),
        (["--norm", "batch", "--base-channels", "9"], "model.base_channels"),
        (["--channel-mults", "1,2,2,2,2,2,2"], "model.channel_mults"),  # 7 levels: more than a U-Net here takes
        (["--checkpoint-every", "0"], "train.checkpoint_every"),
        (["--max-steps", "-3"], "train.max_steps"),
        (["--lr", "fast"], None),  # argparse's own error, also status 2
    ],
)
def test_bad_option_values(cli, assert_user_error, good_pngs, flags, named):
    args = ["train", "--data", good_pngs, "--max-steps", "1", *flags]
    if named is None:
        with pytest.raises(SystemExit) as exit_info:
            cli(*args)
        assert exit_info.value.code == 2
        return
    assert_user_error(args, named)


def test_no_training_budget(assert_user_error, good_pngs):
    assert_user_error(["train", "--data", good_pngs], "--max-steps")


# --------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------


def test_unknown_key_in_json_config(assert_user_error, tmp_path, good_pngs):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"data": {"path": str(good_pngs), "image_sise": 32}, "train": {"max_steps": 1}}))
    assert_user_error(["train", "--config", config], "data.image_sise", str(config), "image_size")


def test_unknown_key_in_toml_config(assert_user_error, tmp_path, good_pngs):
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\npath = "{good_pngs}"\n\n[train]\nmax_steps = 1\nwarmup = 10\n')
    assert_user_error(["train", "--config", config], "train.warmup", str(config), "warmup_steps")


def test_unknown_section_and_bad_values_in_config(assert_user_error, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"optimiser": {}}))
    assert_user_error(["train", "--config", config], "optimiser", str(config))
    config.write_text(json.dumps({"train": {"batch_size": "many"}}))
    assert_user_error(["train", "--config", config], "train.batch_size", "many")
    config.write_text(json.dumps({"train": {"batch_size": True}}))
    assert_user_error(["train", "--config", config], "train.batch_size")
    config.write_text(json.dumps({"data": {"path": 5}}))
    assert_user_error(["train", "--config", config], "data.path")
    config.write_text('{"train": {"max_steps": 1,}}')
    assert_user_error(["train", "--config", config], str(config), "JSON")
    toml = tmp_path / "run.toml"
    toml.write_text("[train\nmax_steps = 1\n")
    assert_user_error(["train", "--config", toml], str(toml), "TOML")
    assert_user_error(["train", "--config", tmp_path / "absent.toml"], "absent.toml")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def test_checkpoint_weights_of_another_model(assert_user_error, tmp_path, checkpoint_writer):
    other = ModelConfig(image_size=16, base_channels=16, patch_size=1)  # twice as wide as the config says
    path = checkpoint_writer(tmp_path / "run" / "checkpoints", weights_config=other)
    line = assert_user_error(["sample", "--checkpoint", path, "--n", "1", "--steps", "1"], str(path), "first mismatch")
    assert "stem.weight" in line or "time_mlp" in line


def test_checkpoint_with_a_tampered_sidecar(assert_user_error, tiny_checkpoint):
    sidecar = tiny_checkpoint.with_suffix(".json")
    header = json.loads(sidecar.read_text())
    header["config"]["model"]["base_channels"] = 16
    sidecar.write_text(json.dumps(header))
    assert_user_error(["sample", "--checkpoint", tiny_checkpoint, "--n", "1", "--steps", "1"], str(sidecar), "does not match")
    sidecar.write_text("{ not json")
    assert_user_error(["sample", "--checkpoint", tiny_checkpoint, "--n", "1", "--steps", "1"], str(sidecar))


class _Booby:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_pickle_checkpoint_is_refused_unread(assert_user_error, tmp_path, no_unpickling):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(_Booby(marker)))
    assert_user_error(["sample", "--checkpoint", path, "--n", "1"], str(path), "pickle")
    assert not marker.exists()
    # the same pickle renamed to .safetensors is not a safetensors file either
    disguised = tmp_path / "ckpt_00000001.safetensors"
    disguised.write_bytes(path.read_bytes())
    assert_user_error(["sample", "--checkpoint", disguised, "--n", "1"], str(disguised))
    assert not marker.exists()


def test_truncated_and_missing_checkpoints(assert_user_error, tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    tiny_checkpoint.write_bytes(data[: len(data) // 2])
    assert_user_error(["sample", "--checkpoint", tiny_checkpoint, "--n", "1"], str(tiny_checkpoint))
    assert_user_error(["sample", "--checkpoint", tmp_path / "absent.safetensors", "--n", "1"], "absent.safetensors")
    (tmp_path / "empty_run").mkdir()
    assert_user_error(["sample", "--checkpoint", tmp_path / "empty_run", "--n", "1"], "empty_run")


def test_train_will_not_overwrite_a_run_without_resume(assert_user_error, tmp_path, good_pngs, checkpoint_writer):
    run = tmp_path / "run"
    existing = checkpoint_writer(run / "checkpoints")
    before = existing.read_bytes()
    assert_user_error(["train", "--data", good_pngs, "--out-dir", run, *TINY_TRAIN], str(run), "--resume")
    assert existing.read_bytes() == before
    assert not (run / "train_log.csv").exists()


def test_resume_without_a_checkpoint(assert_user_error, tmp_path, good_pngs):
    assert_user_error(["train", "--data", good_pngs, "--out-dir", tmp_path / "fresh", "--resume", *TINY_TRAIN], "fresh", "--resume")


# --------------------------------------------------------------------------------------------
# --on-bad-file skip
# --------------------------------------------------------------------------------------------


def test_on_bad_file_skip_trains_on_the_rest(cli, caplog, tmp_path, good_pngs):
    (good_pngs / "noise.png").write_bytes(np.random.default_rng(1).bytes(700))
    caplog.set_level(logging.INFO)
    status, out, err = cli("train", "--data", good_pngs, "--out-dir", tmp_path / "run", "--on-bad-file", "skip", *TINY_TRAIN)
    assert status == 0, err
    assert "Traceback" not in err
    assert "trained to step 1" in out
    assert (tmp_path / "run" / "checkpoints" / "ckpt_00000001.safetensors").is_file()
    skips = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "noise.png" in r.getMessage()]
    assert skips, "the corrupt file was not reported"
    assert any("4 slices" in r.getMessage() for r in caplog.records), "expected training on the 4 good slices"
