"""The cascade: a base run, an upsampler over it, sampling through both, `upscale` on a folder, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from brainfusion.config import UpsampleConfig
from brainfusion.diffusion.upsample import shrink, training_pair
from brainfusion.seeding import seeded_generator

LOW, HIGH = 16, 32
BASE_TINY = ["--image-size", str(LOW), "--base-channels", "8", "--batch-size", "4", "--checkpoint-every", "2", "--sample-every", "0"]
UP_TINY = ["--image-size", str(HIGH), "--upsample-from", str(LOW), "--patch-size", "1", "--base-channels", "8", "--channel-mults", "1,2",
           "--attention-resolutions", "", "--batch-size", "4", "--checkpoint-every", "2", "--sample-every", "0",
           "--augment-max", "0.5"]  # noise conditioning augmentation (off by default) on, so its path is exercised


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    from conftest import brain_slice, write_png

    root = tmp_path_factory.mktemp("slices")
    for i in range(12):
        write_png(root / f"slice_{i:02d}.png", brain_slice(i, HIGH, HIGH))
    return root


@pytest.fixture(scope="module")
def runs(slices, tmp_path_factory):
    """A tiny base run at 16² and a tiny upsampler 16² → 32² trained on the same slices."""
    from brainfusion.cli import main

    root = tmp_path_factory.mktemp("runs")
    assert main(["--quiet", "train", "--data", str(slices), "--out-dir", str(root / "base"), "--max-steps", "2", *BASE_TINY]) == 0
    assert main(["--quiet", "train", "--data", str(slices), "--out-dir", str(root / "up"), "--max-steps", "4", *UP_TINY]) == 0
    return root / "base", root / "up"


def _weights(run: Path) -> dict:
    return load_file(str(sorted((run / "checkpoints").glob("ckpt_*.safetensors"))[-1]))


def test_the_cascade_samples_the_upsamplers_size_from_the_command_line_and_in_memory(cli, runs, tmp_path):
    from brainfusion import Pipeline

    base, up = runs
    config = json.loads((up / "config.json").read_text())
    assert config["upsample"]["from_size"] == LOW and config["model"]["in_channels"] == 2 and config["model"]["continuous_inputs"] == 1
    status, out, err = cli("sample", "--checkpoint", base, "--upsampler", up, "--n", "3", "--batch-size", "2", "--steps", "3",
                           "--out", tmp_path / "cascade")
    assert status == 0, err
    result = json.loads(out)
    files = sorted(Path(result["images"]).glob("sample_*.png"))
    written = np.stack([np.asarray(Image.open(f)) for f in files])
    assert written.shape == (3, HIGH, HIGH) and Path(result["grid"]).is_file() and Path(result["gif"]).is_file()
    pipe = Pipeline.from_checkpoint(base).use_upsampler(Pipeline.from_checkpoint(up))
    in_memory = pipe(3, seed=0, steps=3, batch_size=3)  # another batch size: per-image noise in both stages
    assert np.array_equal(in_memory, written)
    low = Pipeline.from_checkpoint(base)(3, seed=0, steps=3)
    assert not np.array_equal(low, written[:, ::2, ::2])  # the second stage made them, not a copy of the first


def test_the_upsampler_resumes_bitwise(cli, slices, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli("train", "--data", slices, "--out-dir", whole, "--max-steps", "4", *UP_TINY)[0] == 0
    assert cli("train", "--data", slices, "--out-dir", split, "--max-steps", "2", *UP_TINY)[0] == 0
    assert cli("train", "--data", slices, "--out-dir", split, "--max-steps", "4", "--resume", *UP_TINY)[0] == 0
    a, b = _weights(whole), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_upscale_brings_a_folder_up_and_refuses_slices_of_another_size(cli, assert_user_error, runs, tmp_path):
    from conftest import brain_slice, write_png

    _, up = runs
    for i in range(3):
        write_png(tmp_path / "low" / f"l{i}.png", brain_slice(40 + i, LOW, LOW))
    status, out, err = cli("upscale", "--checkpoint", up, "--images", tmp_path / "low", "--out", tmp_path / "up", "--steps", "2")
    assert status == 0, err
    made = sorted((tmp_path / "up" / "images").glob("sample_*.png"))
    assert len(made) == 3 and np.asarray(Image.open(made[0])).shape == (HIGH, HIGH)
    assert (tmp_path / "up" / "sources.csv").read_text().splitlines()[1].endswith("l0.png")
    write_png(tmp_path / "big" / "b.png", brain_slice(1, 20, 20))
    assert_user_error(["upscale", "--checkpoint", up, "--images", tmp_path / "big", "--out", tmp_path / "x"],
                      "b.png", "20×20", f"{LOW}×{LOW}")
    assert not (tmp_path / "x").exists()


def test_cascade_refusals(cli, assert_user_error, runs, slices, tmp_path):
    base, up = runs
    assert_user_error(["sample", "--checkpoint", base, "--upsampler", base, "--out", tmp_path / "a"], "not an upsampler")
    assert_user_error(["sample", "--checkpoint", up, "--upsampler", up, "--out", tmp_path / "b"], "an upsampler run")
    assert_user_error(["sample", "--checkpoint", up, "--out", tmp_path / "c"], "is an upsampler")
    assert_user_error(["sample", "--checkpoint", base, "--upsampler", up, "--augment", "0.9", "--out", tmp_path / "g"],
                      "0.9", "0 to 0.5")
    other = tmp_path / "base32"  # a base whose size the upsampler does not start from
    assert cli("train", "--data", slices, "--out-dir", other, "--max-steps", "1", *BASE_TINY[2:], "--image-size", str(HIGH))[0] == 0
    assert_user_error(["sample", "--checkpoint", other, "--upsampler", up, "--out", tmp_path / "d"], f"{LOW}²", f"{HIGH}²")
    assert_user_error(["train", "--data", slices, "--out-dir", tmp_path / "e", "--max-steps", "1", *UP_TINY[:2],
                       "--upsample-from", "24"], "--upsample-from", "must divide")
    assert_user_error(["train", "--data", slices, "--out-dir", tmp_path / "f", "--max-steps", "1", *UP_TINY, "--slice-level"],
                      "upsampler")


def test_a_latent_base_is_refused(cli, assert_user_error, runs, tmp_path):
    from conftest import make_oasis

    _, up = runs
    data = make_oasis(tmp_path / "oasis", n_train=4, n_test=0, n_validate=2, size=HIGH)
    ae = ["--image-size", str(HIGH), "--ae-patch", "2", "--ae-channels", "16", "--latent-channels", "2", "--adv-weight", "0",
          "--batch-size", "2", "--sample-every", "0", "--no-rfid", "--score-n", "2"]
    assert cli("train-autoencoder", "--data", data, "--out-dir", tmp_path / "ae", "--max-steps", "1", *ae)[0] == 0
    assert cli("train", "--data", data, "--autoencoder", tmp_path / "ae", "--out-dir", tmp_path / "ldm", "--max-steps", "1",
               "--image-size", str(HIGH), "--base-channels", "8", "--batch-size", "2", "--sample-every", "0")[0] == 0
    assert_user_error(["sample", "--checkpoint", tmp_path / "ldm", "--upsampler", up, "--out", tmp_path / "s"], "a latent run")


def test_training_pairs_are_the_shrunk_slice_noised_then_enlarged_and_keyed_by_step():
    cfg = UpsampleConfig(from_size=4, augment_max=0.5)
    x0 = torch.rand(6, 1, 16, 16) * 2 - 1
    full, cond = training_pair(x0, cfg, seeded_generator(0, 6, 3), slice(0, 6), 6)
    assert full.shape == (6, 2, 16, 16) and cond.shape == (6, 1)
    detail = x0 - torch.nn.functional.interpolate(shrink(x0, 4), size=16, mode="bicubic").clamp(-1, 1)
    assert torch.allclose(full[:, 1:], detail * cfg.residual_scale)  # what bicubic enlargement misses, scaled
    plain, _ = training_pair(x0, UpsampleConfig(from_size=4, augment_max=0.5, residual_scale=0), seeded_generator(0, 6, 3), slice(0, 6), 6)
    assert torch.equal(plain[:, 1:], x0) and torch.equal(plain[:, :1], full[:, :1])
    assert ((cond >= 0) & (cond <= 0.5)).all() and len(set(cond.flatten().tolist())) == 6
    again, cond_again = training_pair(x0, cfg, seeded_generator(0, 6, 3), slice(0, 6), 6)
    assert torch.equal(full, again) and torch.equal(cond, cond_again)
    # a process's rows of the global batch get the levels and noise the one-process run gives those rows
    part, cond_part = training_pair(x0[2:4], cfg, seeded_generator(0, 6, 3), slice(2, 4), 6)
    assert torch.equal(cond_part, cond[2:4]) and torch.equal(part, full[2:4])
    small = shrink(x0, 4)
    assert small.shape == (6, 1, 4, 4) and torch.allclose(small, torch.nn.functional.avg_pool2d(x0, 4), atol=1 / 127.5)
    clean, _ = training_pair(x0, UpsampleConfig(from_size=4, augment_max=0.0), seeded_generator(0, 6, 3), slice(0, 6), 6)
    assert torch.allclose(clean[:, :1], torch.nn.functional.interpolate(small, size=16, mode="bicubic").clamp(-1, 1))


def test_an_upsampler_takes_its_slices_clean_unless_trained_with_noise_augmentation():
    from brainfusion.diffusion.upsample import sampling_level
    from brainfusion.errors import BrainfusionError

    plain = UpsampleConfig(from_size=4)
    plain.validate(16)
    assert plain.augment_max == 0 and plain.augment == 0 and sampling_level(plain, None) == 0
    with pytest.raises(BrainfusionError, match="without noise conditioning augmentation.*not 0.1"):
        sampling_level(plain, 0.1)
    noised = UpsampleConfig(from_size=4, augment_max=0.5)
    noised.validate(16)
    assert noised.augment == 0.1 and sampling_level(noised, 0.3) == 0.3


def test_a_cascade_export_draws_brainfusions_cascade_with_plain_diffusers(cli, assert_user_error, runs, tmp_path):
    from plain_diffusers import PlainDiffusers

    from brainfusion import Pipeline

    base, up = runs
    folder = tmp_path / "export"
    assert cli("export", base, "--upsampler", up, "--out", folder)[0] == 0
    card = (folder / "README.md").read_text()
    assert "## Second stage: the upsampler" in card and f"{LOW}² slice of the first stage to {HIGH}²" in card
    assert "each step of the first stage (the upsampler is not guided) away" in " ".join(card.split())
    (tmp_path / "plain").mkdir()
    server = PlainDiffusers(tmp_path / "plain")
    try:
        drawn, guided = server.draw(folder, {"batch_size": 2, "num_inference_steps": 3},
                                    {"batch_size": 2, "num_inference_steps": 3, "autoguidance": 2.0})
    finally:
        server.close()
    assert server.kinds == ["PIL.Image.Image"] * 2 and drawn.shape == (2, HIGH, HIGH)
    cascade = Pipeline.from_checkpoint(base, precision="fp32").use_upsampler(Pipeline.from_checkpoint(up, precision="fp32"))
    assert np.array_equal(drawn, cascade(2, steps=3))  # `sample --upsampler --n 2 --steps 3`'s slices, without brainfusion
    # autoguidance steers the first stage alone, in the export and in `sample` (both runs kept a guide)
    assert (base / "checkpoints" / "guide").is_dir() and (up / "checkpoints" / "guide").is_dir()
    status, out, err = cli("sample", "--checkpoint", base, "--upsampler", up, "--n", "2", "--steps", "3", "--autoguidance", "2",
                           "--precision", "fp32", "--no-gif", "--out", tmp_path / "guided")
    assert status == 0, err
    written = np.stack([np.asarray(Image.open(f)) for f in sorted(Path(json.loads(out)["images"]).glob("sample_*.png"))])
    assert np.array_equal(guided, written) and not np.array_equal(guided, drawn)
    assert_user_error(["export", up, "--out", tmp_path / "x"], "is an upsampler")
    assert_user_error(["export", base, "--upsampler", base, "--out", tmp_path / "y"], "not an upsampler")
def test_blur_augmentation_matches_scipy_and_anchors_the_residual_on_the_blurred_slice():
    from scipy.ndimage import gaussian_filter

    from brainfusion.config import UpsampleConfig
    from brainfusion.diffusion.upsample import conditioning, gaussian_blur, target
    from brainfusion.errors import BrainfusionError

    low = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    widths = torch.tensor([0.0, 0.5, 1.2])
    blurred = gaussian_blur(low, widths)
    assert torch.equal(blurred[0], low[0])
    for i in (1, 2):  # scipy's Gaussian over the same radius, edges replicated
        radius = 4  # ceil(3 × 1.2)
        expected = gaussian_filter(low[i, 0].double().numpy(), float(widths[i]), mode="nearest", truncate=radius / float(widths[i]))
        assert np.allclose(blurred[i, 0].numpy(), expected, atol=1e-6)
    levels = torch.tensor([0.0, 0.25, 0.5])
    given, cond, anchor = conditioning(low, levels, torch.zeros_like(low), 32, blur=2.0)
    assert torch.allclose(anchor, given) and torch.equal(cond[:, 0], levels)  # without noise the given is the anchor
    assert torch.allclose(conditioning(low, levels, torch.zeros_like(low), 32)[2][2], torch.nn.functional.interpolate(
        low[2:], size=(32, 32), mode="bicubic", align_corners=False).clamp(-1, 1)[0])  # blur 0: the plain enlargement
    x0 = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.allclose(target(x0, anchor, UpsampleConfig(from_size=8)), (x0 - anchor) * 7.0)
    with pytest.raises(BrainfusionError, match="upsample.blur"):
        UpsampleConfig(from_size=8, blur=-1.0).validate(32)
