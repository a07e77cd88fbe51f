"""End to end through the `brainfusion` command line, tiny: data → train → resume → sample, and
the demo data set → inspect."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import re

import pytest
import torch
from PIL import Image

from brainfusion.checkpoint import load_checkpoint

TRAIN = ["--image-size", "32", "--base-channels", "16", "--batch-size", "8", "--checkpoint-every", "2", "--log-every", "1"]


def _logged_steps(run):
    with open(run / "train_log.csv") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh)]


def test_train_resume_sample(cli, caplog, tmp_path, make_oasis_root):
    data = make_oasis_root(tmp_path / "oasis", n_train=16, n_test=8, n_validate=2)
    run = tmp_path / "run"
    caplog.set_level(logging.INFO)

    status, out, err = cli("train", "--data", data, "--out-dir", run, "--max-steps", "4", *TRAIN)
    assert status == 0, err
    assert "trained to step 4" in out
    ckpts = run / "checkpoints"
    for step in (2, 4):
        assert (ckpts / f"ckpt_{step:08d}.safetensors").is_file()
        assert json.loads((ckpts / f"ckpt_{step:08d}.json").read_text())["step"] == step
    assert (run / "config.json").is_file() and (run / "loss.png").is_file()
    assert _logged_steps(run) == [1, 2, 3, 4]
    state = load_checkpoint(ckpts / "ckpt_00000004.safetensors")
    assert state.step == 4 and state.optimizer is not None
    assert state.config.model.base_channels == 16 and state.config.model.image_size == 32
    assert any("24 slices" in r.getMessage() for r in caplog.records)  # train + test merged, validate held out

    caplog.clear()
    status, out, err = cli("train", "--data", data, "--out-dir", run, "--max-steps", "6", "--resume", *TRAIN)
    assert status == 0, err
    assert "trained to step 6" in out
    assert any("from step 4" in r.getMessage() for r in caplog.records)
    assert _logged_steps(run) == [1, 2, 3, 4, 5, 6]  # continued, nothing repeated
    assert sorted(p.name for p in ckpts.glob("*.safetensors")) == [f"ckpt_{s:08d}.safetensors" for s in (2, 4, 6)]

    # resuming retraces the uninterrupted run: 6 steps in one go give the same weights
    straight = tmp_path / "straight"
    status, _, err = cli("train", "--data", data, "--out-dir", straight, "--max-steps", "6", *TRAIN)
    assert status == 0, err
    resumed = load_checkpoint(ckpts / "ckpt_00000006.safetensors")
    uninterrupted = load_checkpoint(straight / "checkpoints" / "ckpt_00000006.safetensors")
    for key, value in uninterrupted.model.items():
        assert torch.equal(resumed.model[key], value), key
    for key, value in uninterrupted.ema.items():
        assert torch.equal(resumed.ema[key], value), key

    status, out, err = cli("sample", "--checkpoint", run, "--sampler", "ddim", "--steps", "5", "--n", "6")
    assert status == 0, err
    result = json.loads(out)
    out_dir = run / "samples" / "ddim-5"
    assert result["grid"] == str(out_dir / "grid.png") and result["gif"] == str(out_dir / "reverse_process.gif")
    pngs = sorted((out_dir / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"sample_{i:05d}.png" for i in range(6)]
    for p in pngs:
        with Image.open(p) as im:
            assert im.size == (32, 32) and im.mode == "L"
    with Image.open(out_dir / "grid.png") as grid:
        assert grid.size == (3 * 34 + 2, 2 * 34 + 2)  # 6 tiles of 32 px, 3 per row, 2 px gaps
    with Image.open(out_dir / "reverse_process.gif") as gif:
        assert gif.n_frames >= 4  # the noise, then snapshots along the 5 steps
        first = gif.convert("L").copy()
        gif.seek(gif.n_frames - 1)
        last = gif.convert("L").copy()
    assert first.tobytes() != last.tobytes()


@pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="the demo set is cut from nilearn's MNI152 template")
def test_demo_data_then_inspect(cli, tmp_path):
    status, out, err = cli("data", "demo", "--out", tmp_path / "demo", "--n-subjects", "3", "--slices-per-subject", "4", "--image-size", "32")
    assert status == 0, err
    summary = json.loads(out)
    assert sum(summary["counts"].values()) == 12
    assert (tmp_path / "demo" / "keras_png_slices_train").is_dir()

    montage = tmp_path / "montage.png"
    status, out, err = cli("data", "inspect", "--data", tmp_path / "demo", "--image-size", "32", "--montage", montage)
    assert status == 0, err
    expected = summary["counts"]["train"] + summary["counts"]["test"]
    match = re.match(r"(\d+) slices of 32x32 from .* \((\d+) files, 0 skipped\)", out)
    assert match, out
    assert int(match.group(1)) == expected and int(match.group(2)) == expected
    with Image.open(montage) as im:
        assert im.mode == "L" and im.size[0] > 32

    status, out, _ = cli("data", "inspect", "--data", tmp_path / "demo", "--image-size", "32", "--split", "validate", "--montage", montage)
    assert status == 0 and out.startswith(f"{summary['counts']['validate']} slices")


def test_fp16_training_scales_the_loss_and_resumes_exactly(cli, tmp_path, make_oasis_root):
    """fp16 runs through torch.amp.GradScaler (the CPU path torch supports); its state rides in the checkpoint."""
    data = make_oasis_root(tmp_path / "oasis", n_train=8, n_test=4, n_validate=2)
    # fp16 is emulated on CPUs (25 s at TRAIN's size): a 16-px, 8-channel network checks the same scaler and resume
    flags = [*TRAIN, "--image-size", "16", "--base-channels", "8", "--batch-size", "4", "--precision", "fp16"]
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert cli("train", "--data", data, "--out-dir", run, "--max-steps", "2", *flags)[0] == 0
    scaler = load_checkpoint(run / "checkpoints" / "ckpt_00000002.safetensors").extra["grad_scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    assert cli("train", "--data", data, "--out-dir", run, "--max-steps", "4", "--resume", *flags)[0] == 0
    assert cli("train", "--data", data, "--out-dir", straight, "--max-steps", "4", *flags)[0] == 0
    resumed = load_checkpoint(run / "checkpoints" / "ckpt_00000004.safetensors")
    uninterrupted = load_checkpoint(straight / "checkpoints" / "ckpt_00000004.safetensors")
    assert resumed.extra["grad_scaler"] == uninterrupted.extra["grad_scaler"]
    for key, value in uninterrupted.model.items():
        assert torch.equal(resumed.model[key], value), key


def test_tensorboard_logger_writes_scalars_and_previews_that_tensorboard_reads(cli, tmp_path, make_oasis_root):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_oasis_root(tmp_path / "oasis", n_train=8, n_test=4, n_validate=2)
    run = tmp_path / "run"
    status, _, err = cli("train", "--data", data, "--out-dir", run, "--max-steps", "4", "--logger", "tensorboard",
                         "--sample-every", "2", "--eval-every", "4", *TRAIN, "--image-size", "16", "--base-channels", "8")
    assert status == 0, err
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    for name in ("loss", "lr", "images_per_s", "nonfinite_skipped"):
        assert [e.step for e in events.Scalars(f"train/{name}")] == [1, 2, 3, 4]
    losses = [float(row["loss"]) for row in csv.DictReader(open(run / "train_log.csv"))]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-5)
    assert [e.step for e in events.Images("samples")] == [2, 4]
    assert any(t.startswith("eval/") for t in tags["scalars"])
