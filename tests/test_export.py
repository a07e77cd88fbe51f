"""The diffusers export: a trained run → diffusers folder → diffusers' own from_pretrained → the same images,
unconditional and conditional (a class request under classifier-free guidance), in pixels and through a latent
run's autoencoder; and plain diffusers loads every export from its shipped code with brainfusion unimportable."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from brainfusion.data.conditions import encode_request
from brainfusion.diffusion.process import sample
from brainfusion.errors import BrainfusionError
from brainfusion.export.hub import MANIFEST, BrainfusionPipeline, export_run
from brainfusion.models.unet import UNet
from brainfusion.diffusion.pipeline import Pipeline
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
    pipe = BrainfusionPipeline.from_pretrained(folder)  # brainfusion's classes, the folder's configs and weights
    pipe.set_progress_bar_config(disable=True)
    ours = Pipeline.from_checkpoint(run, precision="fp32")
    theirs = pipe(num_images=5, seed=7, num_inference_steps=6, output_type="pt").images
    with torch.no_grad():
        expected, _ = sample(ours.network, ours.config.diffusion, (5, 1, 16, 16), "ddim", 6, image_generators(7, range(5)))
    assert expected.abs().max() > 0.05  # a trained network, not zeros
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)
    assert np.array_equal(pipe(num_images=5, seed=7, num_inference_steps=6).images, ours(5, seed=7, sampler="ddim", steps=6))
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} <= {".json", ".safetensors", ".md", ".py"}  # no pickle; .py: the shipped code
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
    edited = shutil.copytree(folder, tmp_path / "edited")
    (edited / "pipeline.py").write_text((edited / "pipeline.py").read_text() + "\nprint('hello')\n")
    with pytest.raises(BrainfusionError, match="pipeline.py was changed after export"):
        BrainfusionPipeline.from_pretrained(edited)
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


# A fresh interpreter in which `import brainfusion` fails, as on a machine without it: it loads the export with
# diffusers alone (custom_pipeline=FOLDER runs FOLDER/pipeline.py), draws each requested call and saves the images.
WITHOUT_BRAINFUSION = """
import importlib.abc, json, sys

class NoBrainfusion(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "brainfusion":
            raise ImportError(f"{name} is blocked: the export must load without brainfusion")

sys.meta_path.insert(0, NoBrainfusion())
try:
    import brainfusion
    sys.exit("brainfusion was importable")
except ImportError:
    pass
import numpy as np, torch
from diffusers import DiffusionPipeline

torch.set_num_threads(1)
folder, out, calls, named = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "named"
pipe = DiffusionPipeline.from_pretrained(folder, **({"custom_pipeline": folder} if named else {}), trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
np.savez(out, *[pipe(**call).images for call in calls])
assert not [m for m in sys.modules if m.split(".")[0] == "brainfusion"]
print(type(pipe).__module__, type(pipe.unet).__module__)
"""


def draw_without_brainfusion(folder, tmp_path, *calls: dict, custom_pipeline: bool = True) -> list[np.ndarray]:
    """`calls`' images from `DiffusionPipeline.from_pretrained(folder[, custom_pipeline=folder], trust_remote_code=True)`."""
    out = tmp_path / "plain.npz"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    named = "named" if custom_pipeline else "found"
    done = subprocess.run([sys.executable, "-c", WITHOUT_BRAINFUSION, str(folder), str(out), json.dumps(calls), named],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["diffusers_modules.local.pipeline", "diffusers_modules.local.brainfusion_hub"]
    with np.load(out) as stored:
        return [stored[f"arr_{i}"] for i in range(len(calls))]


def test_the_export_ships_code_generated_from_brainfusions_own(exported):
    _, folder = exported
    shipped = (folder / "pipeline.py").read_text()
    assert shipped == (folder / "unet" / "brainfusion_hub.py").read_text()
    assert shipped.count("class UNet(nn.Module)") == 1 and inspect.getsource(UNet) in shipped  # models/unet.py's, verbatim
    assert "from ." not in shipped  # self-contained: diffusers copies no sibling modules
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["brainfusion_hub", "BrainfusionUNet"] and index["_class_name"] == ["pipeline", "BrainfusionPipeline"]
    assert {"pipeline.py", "unet/brainfusion_hub.py"} <= set(json.loads((folder / MANIFEST).read_text())["sha256"])


def test_plain_diffusers_draws_the_same_images_without_brainfusion(exported_conditional, tmp_path):
    """Pixel exports of both formulations (the latent test covers an unconditional network): guided, several
    conditions, and unconditional draws equal brainfusion's BrainfusionPipeline's, bitwise in uint8."""
    _, folder = exported_conditional
    calls = [{"num_images": 4, "seed": 3, "num_inference_steps": 5, "condition": {"class": "Dark"}, "guidance_scale": 2.0},
             {"num_images": 4, "seed": 3, "num_inference_steps": 5, "condition": {"class": "Bright", "level": 0.8}},
             {"num_images": 4, "seed": 3, "num_inference_steps": 5}]
    reference = BrainfusionPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    for plain, call in zip(draw_without_brainfusion(folder, tmp_path, *calls), calls):
        assert np.array_equal(plain, reference(**call).images)


@pytest.fixture(scope="module")
def exported_latent(tmp_path_factory):
    """A tiny autoencoder, a latent run through it (as test_latent.py builds them) and its export."""
    from brainfusion.cli import main
    from conftest import make_oasis
    from test_latent import AE_TINY, LATENT_TINY, SIZE

    tmp = tmp_path_factory.mktemp("latent")
    data = make_oasis(tmp / "oasis", n_train=6, n_test=2, n_validate=4, size=SIZE)
    ae, run = tmp / "ae", tmp / "ldm"
    assert main(["--quiet", "train-autoencoder", "--data", str(data), "--out-dir", str(ae), "--max-steps", "2", *AE_TINY]) == 0
    assert main(["--quiet", "train", "--data", str(data), "--autoencoder", str(ae), "--out-dir", str(run), "--max-steps", "2",
                 *LATENT_TINY, "--lr", "3e-3"]) == 0
    assert main(["--quiet", "export", str(run), "--out", str(tmp / "export")]) == 0
    return ae, run, tmp / "export"


def test_a_latent_export_decodes_through_its_vae_with_and_without_brainfusion(exported_latent, tmp_path):
    ae, run, folder = exported_latent
    ours = Pipeline.from_checkpoint(run, precision="fp32")
    expected = ours(3, seed=7, sampler="ddim", steps=3)  # `brainfusion sample --sampler ddim --steps 3`'s images
    assert expected.shape == (3, 32, 32) and expected.std() > 0
    pipe = BrainfusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert np.array_equal(pipe(num_images=3, seed=7, num_inference_steps=3).images, expected)  # bitwise, uint8
    call = {"num_images": 3, "seed": 7, "num_inference_steps": 3}
    (plain,) = draw_without_brainfusion(folder, tmp_path, call, custom_pipeline=False)  # model_index.json names pipeline.py
    assert np.array_equal(plain, expected)

    vae = json.loads((folder / "vae" / "config.json").read_text())
    latent = ours.config.latent
    assert vae["autoencoder"]["channels"] == [16, 16, 16] and vae["autoencoder"]["latent_channels"] == 2
    assert (vae["mean"], vae["std"], vae["factor"], vae["latent_std"]) == (list(latent.mean), list(latent.std), 4, 0.5)
    assert json.loads((folder / "model_index.json").read_text())["vae"] == ["brainfusion_hub", "BrainfusionVAE"]
    assert {"vae/brainfusion_hub.py", "vae/diffusion_pytorch_model.safetensors"} <= set(json.loads((folder / MANIFEST).read_text())["sha256"])
    card = (folder / "README.md").read_text()
    metrics = json.loads((ae / "ae_metrics.json").read_text())
    assert "## Autoencoder" in card and f"| PSNR inside the brain | {metrics['psnr_brain']:.2f} dB |" in card
    assert f"| SSIM inside the brain | {metrics['ssim_brain']:.4f} |" in card and "| rFID (reconstructions against the originals) | not computed |" in card
    assert "synthetic 32×32" in card and "custom_pipeline=" in card and "pip install monai" in card
