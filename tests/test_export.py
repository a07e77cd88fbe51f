"""The diffusers export: a trained run → diffusers folder → diffusers' own from_pretrained → the same images,
unconditional and conditional (a class request under classifier-free guidance)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brainfusion.conditions import encode_request
from brainfusion.diffusion import sample
from brainfusion.errors import BrainfusionError
from brainfusion.hub import MANIFEST, BrainfusionPipeline, export_run
from brainfusion.pipeline import Pipeline
from brainfusion.seeding import image_generators

TRAIN = ["--image-size", "16", "--patch-size", "1", "--base-channels", "8", "--batch-size", "4", "--max-steps", "4",
         "--checkpoint-every", "4", "--lr", "3e-3"]


@pytest.fixture(scope="module", params=["edm", "vp"])
def exported(request, tmp_path_factory):
    from brainfusion.cli import main
    from conftest import make_oasis

    tmp = tmp_path_factory.mktemp(request.param)
    data = make_oasis(tmp / "oasis", n_train=8, n_test=4, n_validate=2)
    run = tmp / "run"
    assert main(["--quiet", "train", "--data", str(data), "--out-dir", str(run), "--recipe", request.param, *TRAIN]) == 0
    assert main(["--quiet", "export", str(run), "--out", str(tmp / "export")]) == 0
    return run, tmp / "export"


def test_diffusers_loads_the_export_and_draws_brainfusions_images(exported):
    run, folder = exported
    pipe = BrainfusionPipeline.from_pretrained(folder)  # diffusers' DiffusionPipeline.from_pretrained, inherited
    pipe.set_progress_bar_config(disable=True)
    ours = Pipeline.from_checkpoint(run, precision="fp32")
    theirs = pipe(num_images=5, seed=7, num_inference_steps=6, output_type="pt").images
    with torch.no_grad():
        expected, _ = sample(ours.network, ours.config.diffusion, (5, 1, 16, 16), "ddim", 6, image_generators(7, range(5)))
    assert expected.abs().max() > 0.05  # a trained network, not zeros
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)
    assert np.array_equal(pipe(num_images=5, seed=7, num_inference_steps=6).images, ours(5, seed=7, sampler="ddim", steps=6))
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} <= {".json", ".safetensors", ".md"}  # no pickle
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: mit") and "Not for diagnosis" in card and "from_pretrained" in card


@pytest.fixture(scope="module", params=["edm", "vp"])
def exported_conditional(request, tmp_path_factory):
    """A run conditioned on class folders and the slice level, trained and exported like `exported`."""
    from brainfusion.cli import main
    from conftest import make_class_slices

    tmp = tmp_path_factory.mktemp(f"conditional_{request.param}")
    data = make_class_slices(tmp / "classes", subjects=(0, 1))
    run = tmp / "run"
    assert main(["--quiet", "train", "--data", str(data), "--out-dir", str(run), "--recipe", request.param, *TRAIN,
                 "--labels", "folders", "--slice-level", "--lr", "1e-2", "--warmup-steps", "1", "--ema-decay", "0.5"]) == 0
    assert main(["--quiet", "export", str(run), "--out", str(tmp / "export")]) == 0
    return run, tmp / "export"


def test_a_conditional_export_draws_brainfusions_guided_images(exported_conditional):
    run, folder = exported_conditional
    pipe = BrainfusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ours = Pipeline.from_checkpoint(run, precision="fp32")
    wanted = {"class": "Dark"}
    theirs = pipe(num_images=5, seed=7, num_inference_steps=6, output_type="pt", condition=wanted, guidance_scale=2.0).images
    cond = encode_request(ours.config.condition, wanted, 5)
    with torch.no_grad():
        expected, _ = sample(ours.network, ours.config.diffusion, (5, 1, 16, 16), "ddim", 6, image_generators(7, range(5)),
                             cond=cond, guidance=2.0)
        plain, _ = sample(ours.network, ours.config.diffusion, (5, 1, 16, 16), "ddim", 6, image_generators(7, range(5)))
    assert (expected - plain).abs().max() > 1e-3  # the condition and its guidance change the images
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)
    assert np.array_equal(pipe(num_images=5, seed=7, num_inference_steps=6, condition=wanted, guidance_scale=2.0).images,
                          ours(5, seed=7, sampler="ddim", steps=6, condition=wanted, guidance=2.0))
    assert pipe.unet.conditions == ours.config.condition  # the vocabulary travelled in unet/config.json
    with pytest.raises(BrainfusionError, match="'Severe' is not a class of condition 'class'; choose one of Bright, Dark"):
        pipe(num_images=1, condition={"class": "Severe"})
    with pytest.raises(BrainfusionError, match="needs a condition to guide towards"):
        pipe(num_images=1, guidance_scale=2.0)
    card = (folder / "README.md").read_text()
    assert "## Conditions" in card and "`class` (categorical): `Bright`, `Dark`" in card and "`level` (axial slice level" in card
    assert "condition={'class': 'Bright'}, guidance_scale=2.0" in card


def test_an_unconditional_export_refuses_a_condition(exported):
    _, folder = exported
    pipe = BrainfusionPipeline.from_pretrained(folder)
    with pytest.raises(BrainfusionError, match="trained without conditions"):
        pipe(num_images=1, condition={"class": "Dark"})
    assert "## Conditions" not in (folder / "README.md").read_text()


def test_a_tampered_export_is_refused_in_one_sentence(exported, tmp_path):
    import shutil

    _, folder = exported
    changed = shutil.copytree(folder, tmp_path / "changed")
    config = json.loads((changed / "unet" / "config.json").read_text())
    config["model"]["base_channels"] = 16
    (changed / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BrainfusionError, match="was changed after export"):
        BrainfusionPipeline.from_pretrained(changed)
    missing = shutil.copytree(folder, tmp_path / "missing")
    (missing / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BrainfusionError, match="is missing from the export"):
        BrainfusionPipeline.from_pretrained(missing)
    (missing / MANIFEST).unlink()
    with pytest.raises(BrainfusionError, match="not a brainfusion export"):
        BrainfusionPipeline.from_pretrained(missing)


def test_export_of_a_folder_without_checkpoints_is_a_user_error(tmp_path):
    with pytest.raises(BrainfusionError, match=r"no ckpt_\*\.safetensors checkpoint in"):
        export_run(tmp_path, tmp_path / "out")
