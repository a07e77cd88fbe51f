"""The diffusers export: a trained run → diffusers folder → diffusers' own from_pretrained → the same images,
unconditional and conditional (a class request under classifier-free guidance), in pixels and through a latent
run's autoencoder, and with their tissue masks for a mask model; and plain diffusers loads every export from its
shipped code with brainfusion unimportable."""

from __future__ import annotations

import inspect
import json
import re
import sys
import numpy as np
import PIL.Image
import pytest
import torch

from brainfusion.config import FAST_SAMPLER, FAST_STEPS, MASK_SCALES
from brainfusion.data.conditions import encode_request
from brainfusion.diffusion.process import autoguidance, sample
from brainfusion.errors import BrainfusionError
from brainfusion.export.hub import MANIFEST, BrainfusionPipeline, export_run
from brainfusion.models.unet import UNet
from brainfusion.diffusion.pipeline import Pipeline
from brainfusion.seeding import image_generators
from diffusers import DDPMScheduler
from plain_diffusers import PlainDiffusers

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


def pixels(images) -> np.ndarray:
    """A call's PIL images (the default output_type) as one uint8 array, to compare with brainfusion's."""
    assert all(isinstance(image, PIL.Image.Image) and image.mode == "L" for image in images)
    return np.stack([np.asarray(image) for image in images])


def assert_same_floats(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    """Float outputs of the export and of brainfusion agree to float rounding: bitwise on an Intel Xeon with AMX, up
    to 1.5e-7 apart on an AMD EPYC with AVX-512 BF16, whose fp32 kernels round the two calls' sums apart. The uint8
    slices a user sees are compared bitwise everywhere."""
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


def test_the_exports_default_call_is_brainfusion_samples_default_draw(exported):
    """diffusers' convention (PIL `.images`, "np", "pt", return_dict), drawing by default what `brainfusion sample`
    draws by default (dpm++sde, 25 steps, seed 0), and with an explicit sampler the same as brainfusion's."""
    run, folder = exported
    pipe = BrainfusionPipeline.from_pretrained(folder)  # brainfusion's classes, the folder's configs and weights
    pipe.set_progress_bar_config(disable=True)
    ours = Pipeline.from_checkpoint(run, precision="fp32")
    default = inspect.signature(BrainfusionPipeline.__call__).parameters
    assert (default["sampler"].default, default["num_inference_steps"].default) == (FAST_SAMPLER, FAST_STEPS)
    assert np.array_equal(pixels(pipe(batch_size=5).images), ours(5))  # both defaults: FAST_SAMPLER, FAST_STEPS, seed 0
    theirs = pipe(batch_size=5, num_inference_steps=6, output_type="pt", sampler="ddim", seed=7).images
    with torch.no_grad():
        expected, _ = sample(ours.network, ours.config.diffusion, (5, 1, 16, 16), "ddim", 6, image_generators(7, range(5)))
    assert expected.abs().max() > 0.05  # a trained network, not zeros
    assert_same_floats(theirs, (expected / 2 + 0.5).clamp(0, 1))  # brainfusion's own sampler
    as_np = pipe(batch_size=5, num_inference_steps=6, output_type="np", sampler="ddim", seed=7, return_dict=False)
    assert len(as_np) == 1 and as_np[0].shape == (5, 16, 16, 1) and as_np[0].dtype == np.float32
    assert np.array_equal(as_np[0], theirs.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(pipe(batch_size=5, num_inference_steps=6, sampler="ddim", seed=7, output_type="uint8").images,
                          ours(5, seed=7, sampler="ddim", steps=6))
    # a generator stands for the seed drawn from it; image i depends on its seed and index alone
    drawn = pipe(batch_size=2, generator=torch.Generator().manual_seed(11), num_inference_steps=3).images
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(11)))
    assert np.array_equal(pixels(drawn), ours(2, seed=seed, steps=3))
    assert np.array_equal(pixels(pipe(batch_size=1, seed=seed, first_index=1, num_inference_steps=3).images), pixels(drawn)[1:])
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} <= {".json", ".safetensors", ".md", ".py"}  # no pickle; .py: the shipped code


def test_an_autoguided_export_draws_brainfusions_autoguided_images(exported):
    run, folder = exported
    pipe = BrainfusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: mit") and "Not for diagnosis" in card and "from_pretrained" in card
    assert "images = pipe(batch_size=16).images   # 16 PIL images, 16×16" in card and f"SDE-DPM-Solver++ in {FAST_STEPS} steps" in card
    # the run kept its step-2 weights (train.guide_at): they travel as guide_unet, and autoguidance matches brainfusion's
    assert "## Autoguidance" in card and "weights at step 2" in card
    ours = Pipeline.from_checkpoint(run, precision="fp32").use_kept_guide(2.0, precision="fp32")
    call = {"batch_size": 5, "seed": 7, "num_inference_steps": 6, "sampler": "ddim", "output_type": "pt"}
    guided = pipe(**call, autoguidance=2.0).images
    with torch.no_grad():
        expected, _ = sample(autoguidance(ours.network, ours.guide[0].network, 2.0), ours.config.diffusion, (5, 1, 16, 16),
                             "ddim", 6, image_generators(7, range(5)))
    assert (guided - pipe(**call).images).abs().max() > 1e-3
    assert_same_floats(guided, (expected / 2 + 0.5).clamp(0, 1))
    assert np.array_equal(pixels(pipe(batch_size=5, autoguidance=2.0).images), ours(5))  # `sample --autoguidance 2`'s defaults


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
    theirs = pipe(batch_size=5, seed=7, num_inference_steps=6, sampler="ddim", output_type="pt", condition=wanted,
                  guidance_scale=2.0).images
    cond = encode_request(ours.config.condition, wanted, 5)
    with torch.no_grad():
        expected, _ = sample(ours.network, ours.config.diffusion, (5, 1, 16, 16), "ddim", 6, image_generators(7, range(5)),
                             cond=cond, guidance=2.0)
        plain, _ = sample(ours.network, ours.config.diffusion, (5, 1, 16, 16), "ddim", 6, image_generators(7, range(5)))
    assert (expected - plain).abs().max() > 1e-3  # the condition and its guidance change the images
    assert_same_floats(theirs, (expected / 2 + 0.5).clamp(0, 1))
    assert np.array_equal(pixels(pipe(batch_size=5, condition=wanted, guidance_scale=2.0).images),
                          ours(5, condition=wanted, guidance=2.0))  # the defaults of both
    assert pipe.unet.conditions == ours.config.condition  # the vocabulary travelled in unet/config.json
    with pytest.raises(BrainfusionError, match="'Severe' is not a class of condition 'class'; choose one of Bright, Dark"):
        pipe(batch_size=1, condition={"class": "Severe"})
    with pytest.raises(BrainfusionError, match="needs a condition to guide towards"):
        pipe(batch_size=1, guidance_scale=2.0)
    card = (folder / "README.md").read_text()
    assert "## Conditions" in card and "`class` (categorical): `Bright`, `Dark`" in card and "`level` (axial slice level" in card
    assert "condition={'class': 'Bright'}, guidance_scale=2.0" in card


def test_an_unconditional_export_refuses_a_condition(exported):
    _, folder = exported
    pipe = BrainfusionPipeline.from_pretrained(folder)
    with pytest.raises(BrainfusionError, match="trained without conditions"):
        pipe(batch_size=1, condition={"class": "Dark"})
    with pytest.raises(BrainfusionError, match="0 or more"):
        pipe(batch_size=1, autoguidance=-1.0)
    with pytest.raises(BrainfusionError, match="has no guide_unet"):
        BrainfusionPipeline(unet=pipe.unet, scheduler=pipe.scheduler)(batch_size=1, autoguidance=2.0)
    with pytest.raises(BrainfusionError, match="output_type='latent' is unknown; choose one of 'pil', 'np', 'pt', 'uint8'"):
        pipe(output_type="latent")
    with pytest.raises(BrainfusionError, match="batch_size=0 draws nothing"):
        pipe(batch_size=0)
    with pytest.raises(BrainfusionError, match="either seed=.*or generator=, not both"):
        pipe(seed=1, generator=torch.Generator())
    with pytest.raises(BrainfusionError, match="one torch.Generator, not a list"):
        pipe(batch_size=2, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(BrainfusionError, match="sampler='euler' is unknown"):
        pipe(sampler="euler")
    with pytest.raises(BrainfusionError, match="not the one it shipped with"):
        BrainfusionPipeline(unet=pipe.unet, scheduler=DDPMScheduler())(batch_size=1)
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


@pytest.fixture(scope="module")
def plain_diffusers(tmp_path_factory):
    """diffusers without brainfusion (plain_diffusers.py): one server for the module's draws."""
    server = PlainDiffusers(tmp_path_factory.mktemp("plain_diffusers"))
    yield server
    server.close()


def test_the_export_ships_code_generated_from_brainfusions_own(exported):
    _, folder = exported
    shipped = (folder / "pipeline.py").read_text()
    assert shipped == (folder / "unet" / "brainfusion_hub.py").read_text()
    assert shipped.count("class UNet(nn.Module)") == 1 and inspect.getsource(UNet) in shipped  # models/unet.py's, verbatim
    assert "from ." not in shipped  # self-contained: diffusers copies no sibling modules
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["brainfusion_hub", "BrainfusionUNet"] and index["_class_name"] == ["pipeline", "BrainfusionPipeline"]
    assert {"pipeline.py", "unet/brainfusion_hub.py"} <= set(json.loads((folder / MANIFEST).read_text())["sha256"])


def test_the_shipped_code_names_no_package_beyond_torch_numpy_and_diffusers(exported):
    """diffusers imports every package that an import line of a shipped file names, guarded or not
    (dynamic_modules_utils.check_imports; before 0.36 a missing one refused the load), so the shipped closure
    of hub_pipeline holds no data reading, plotting or caching code that would name nibabel, matplotlib & co.
    PIL (Pillow, which diffusers itself requires) makes the PIL images diffusers' pipelines return."""
    _, folder = exported
    code = (folder / "pipeline.py").read_text()
    named = re.findall(r"^\s*import\s+(\S+)\s*$", code, flags=re.M) + re.findall(r"^\s*from\s+(\S+)\s+import", code, flags=re.M)
    packages = {name.split(".")[0] for name in named if not name.startswith(".")} - set(sys.stdlib_module_names)
    assert packages <= {"torch", "numpy", "diffusers", "huggingface_hub", "PIL"}, packages
    assert "monai" in code  # a latent export's vae still finds it, by name


def test_plain_diffusers_draws_the_same_images_without_brainfusion(exported_conditional, plain_diffusers):
    """Pixel exports of both formulations (the latent test covers an unconditional network): guided, several
    conditions, an autoguided one, unconditional draws and another sampler equal brainfusion's BrainfusionPipeline's,
    bitwise in uint8, and come back as diffusers' pipelines return them."""
    _, folder = exported_conditional
    calls = [{"batch_size": 4, "num_inference_steps": 5, "condition": {"class": "Dark"}, "guidance_scale": 2.0},
             {"batch_size": 4, "seed": 3, "num_inference_steps": 5, "condition": {"class": "Bright", "level": 0.8}},
             {"batch_size": 2, "num_inference_steps": 4},
             {"batch_size": 4, "num_inference_steps": 5, "condition": {"class": "Dark"}, "guidance_scale": 2.0, "autoguidance": 2.0},
             {"batch_size": 4, "seed": 3, "num_inference_steps": 5, "sampler": "ddim", "output_type": "np"}]
    reference = BrainfusionPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    drawn = plain_diffusers.draw(folder, *calls)
    assert plain_diffusers.kinds == ["PIL.Image.Image"] * 4 + ["numpy.ndarray"]
    for plain, call in zip(drawn, calls):
        expected = reference(**call).images
        assert np.array_equal(plain, expected if call.get("output_type") else pixels(expected))
    assert not np.array_equal(drawn[3], drawn[0])  # autoguided by the shipped guide_unet


def test_plain_diffusers_draws_pil_images_from_a_64_pixel_export(tmp_path, plain_diffusers):
    """The call a diffusers user writes for DDPMPipeline, on an export at brainfusion's default size, 64²."""
    from brainfusion.cli import main
    from conftest import make_oasis

    data = make_oasis(tmp_path / "oasis", n_train=4, n_test=1, n_validate=1, size=64)
    run, folder = tmp_path / "run", tmp_path / "export"
    assert main(["--quiet", "train", "--data", str(data), "--out-dir", str(run), *TRAIN, "--image-size", "64", "--max-steps", "1",
                 "--checkpoint-every", "1"]) == 0
    assert main(["--quiet", "export", str(run), "--out", str(folder)]) == 0
    (drawn,) = plain_diffusers.draw(folder, {"batch_size": 2, "num_inference_steps": 4})
    assert plain_diffusers.kinds == ["PIL.Image.Image"] and drawn.shape == (2, 64, 64)
    assert np.array_equal(drawn, Pipeline.from_checkpoint(run, precision="fp32")(2, steps=4))  # `sample --n 2 --steps 4`'s


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


def test_a_latent_export_decodes_through_its_vae_with_and_without_brainfusion(exported_latent, plain_diffusers):
    ae, run, folder = exported_latent
    ours = Pipeline.from_checkpoint(run, precision="fp32")
    expected = ours(3, seed=7, sampler="ddim", steps=3)  # `brainfusion sample --sampler ddim --steps 3`'s images
    assert expected.shape == (3, 32, 32) and expected.std() > 0
    pipe = BrainfusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert np.array_equal(pipe(batch_size=3, seed=7, num_inference_steps=3, sampler="ddim", output_type="uint8").images, expected)
    calls = [{"batch_size": 3, "seed": 7, "num_inference_steps": 3, "sampler": "ddim"}, {"batch_size": 2, "num_inference_steps": 4}]
    plain, default = plain_diffusers.draw(folder, *calls, custom_pipeline=False)  # model_index.json names pipeline.py
    assert plain_diffusers.kinds == ["PIL.Image.Image"] * 2  # `.images[0]` is a PIL image
    assert np.array_equal(plain, expected) and np.array_equal(default, ours(2, steps=4))  # bitwise, uint8

    vae = json.loads((folder / "vae" / "config.json").read_text())
    latent = ours.config.latent
    assert vae["autoencoder"]["channels"] == [16, 16] and vae["autoencoder"]["latent_channels"] == 2 and vae["patch"] == 2
    assert vae["autoencoder"]["in_channels"] == vae["autoencoder"]["out_channels"] == 4
    assert (vae["mean"], vae["std"], vae["factor"], vae["latent_std"]) == (list(latent.mean), list(latent.std), 4, 0.5)
    assert json.loads((folder / "model_index.json").read_text())["vae"] == ["brainfusion_hub", "BrainfusionVAE"]
    assert {"vae/brainfusion_hub.py", "vae/diffusion_pytorch_model.safetensors"} <= set(json.loads((folder / MANIFEST).read_text())["sha256"])
    card = (folder / "README.md").read_text()
    metrics = json.loads((ae / "ae_metrics.json").read_text())
    assert "## Autoencoder" in card and f"| PSNR inside the brain | {metrics['psnr_brain']:.2f} dB |" in card
    assert f"| SSIM inside the brain | {metrics['ssim_brain']:.4f} |" in card and "| rFID (reconstructions against the originals) | not computed |" in card
    assert "synthetic 32×32" in card and "custom_pipeline=" in card and "pip install monai" in card


@pytest.fixture(scope="module")
def exported_masks(tmp_path_factory):
    """A run trained on image–mask pairs (test_masks.py's tissue rings), exported, and what `brainfusion sample
    --n 3` wrote for it with its default sampler, steps and seed: sample_*.png and seg_*.png."""
    from brainfusion.cli import main
    from test_masks import make_pairs

    tmp = tmp_path_factory.mktemp("masks")
    data = make_pairs(tmp / "pairs", counts=(("train", 8), ("test", 1), ("validate", 2)), size=16)
    run = tmp / "run"
    assert main(["--quiet", "train", "--data", str(data), "--masks", "--out-dir", str(run), *TRAIN]) == 0
    assert main(["--quiet", "export", str(run), "--out", str(tmp / "export")]) == 0
    assert main(["--quiet", "sample", "--checkpoint", str(run), "--n", "3", "--precision", "fp32", "--no-gif",
                 "--out", str(tmp / "samples")]) == 0
    return run, tmp / "export", tmp / "samples" / "images", data


def read_pngs(folder, pattern: str) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob(pattern))])


def test_a_mask_export_returns_brainfusions_images_and_masks(exported_masks):
    from test_masks import VALUES

    run, folder, samples, _ = exported_masks
    pipe = BrainfusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=3)  # the default call: PIL images and masks
    assert list(out.keys()) == ["images", "masks"] and len(out.images) == len(out.masks) == 3 and out.images[0].size == (16, 16)
    assert np.array_equal(pixels(out.images), read_pngs(samples, "sample_*.png"))  # bitwise what `sample` wrote
    assert np.array_equal(pixels(out.masks), read_pngs(samples, "seg_*.png"))
    assert set(np.unique(pixels(out.masks)).tolist()) <= set(VALUES)
    as_np = pipe(batch_size=3, output_type="np")
    assert as_np.images.shape == (3, 16, 16, 1) and np.array_equal(as_np.masks, pixels(out.masks))  # masks: uint8 label values
    ours = Pipeline.from_checkpoint(run, precision="fp32")
    raw = pipe(batch_size=3, seed=7, num_inference_steps=3, sampler="ddim", output_type="pt")
    with torch.no_grad():
        expected, _ = sample(ours.network, ours.config.diffusion, (3, 5, 16, 16), "ddim", 3, image_generators(7, range(3)))
    assert_same_floats(raw.images, (expected[:, :1] / 2 + 0.5).clamp(0, 1))
    assert_same_floats(raw.masks, expected[:, 1:])

    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["channels"][0] == {"channel": 0, "holds": "image"}
    assert [(c["channel"], c["value"], c["name"]) for c in manifest["channels"][1:]] == [
        (1, 0, "background"), (2, 85, "CSF"), (3, 170, "grey matter"), (4, 255, "white matter")]
    assert json.loads((folder / "unet" / "config.json").read_text())["masks"]["values"] == list(VALUES)
    card = (folder / "README.md").read_text()
    assert "image–mask pairs" in card and "| 3 | 170 | grey matter |" in card and ".masks" in card


def test_a_mask_export_holds_a_given_mask_with_and_without_brainfusion(exported_masks, plain_diffusers):
    from test_masks import VALUES

    run, folder, _, data = exported_masks
    given = np.searchsorted(VALUES, read_pngs(data / "keras_png_slices_seg_validate", "seg_*.png")).astype(np.uint8)
    pipe = BrainfusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, seed=7, num_inference_steps=3, output_type="uint8", mask=given)
    assert np.array_equal(out.masks, np.array(VALUES, np.uint8)[given])  # the given mask comes back exactly
    ours = Pipeline.from_checkpoint(run, precision="fp32")
    images, labels = ours.pairs(2, seed=7, steps=3, mask=given)
    assert np.array_equal(labels, given) and np.array_equal(out.images, images)  # `sample --given-mask`'s images
    assert pipe.unet.config.masks["given"] == "replace" and pipe.unet.config.masks["scale"] == MASK_SCALES["one-hot"]  # the defaults
    pipe.unet.register_to_config(masks={**pipe.unet.config.masks, "given": "clean"})  # as if trained with it
    clean = pipe(batch_size=2, seed=7, num_inference_steps=3, output_type="uint8", mask=given)
    assert np.array_equal(clean.images, ours.pairs(2, seed=7, steps=3, mask=given, mask_clean=True)[0])
    assert not np.array_equal(clean.images, out.images)
    pipe.unet.register_to_config(masks={**pipe.unet.config.masks, "given": "only"})  # as if every mask had been given
    assert np.array_equal(pipe(batch_size=2, seed=7, num_inference_steps=3, output_type="uint8", mask=given).images, clean.images)
    with pytest.raises(BrainfusionError, match="given masks only"):
        pipe(batch_size=1, seed=7, num_inference_steps=3)
    pipe.unet.register_to_config(masks={**pipe.unet.config.masks, "given": "replace"})
    assert not np.array_equal(out.images, pipe(batch_size=2, seed=7, num_inference_steps=3, output_type="uint8").images)  # the mask steers them
    with pytest.raises(BrainfusionError, match="label indices in 0..3"):
        pipe(batch_size=2, mask=given + 4)

    calls = [{"batch_size": 3, "seed": 7, "num_inference_steps": 3, "output_type": "uint8"},
             {"batch_size": 2, "seed": 7, "num_inference_steps": 3, "mask": given.tolist()}]
    (plain, plain_masks), (fitted, fitted_masks) = plain_diffusers.draw(folder, *calls, masks=True)
    reference = pipe(**calls[0])
    assert np.array_equal(plain, reference.images) and np.array_equal(plain_masks, reference.masks)
    assert np.array_equal(fitted, out.images) and np.array_equal(fitted_masks, out.masks)


def test_an_image_only_export_refuses_a_given_mask(exported):
    _, folder = exported
    pipe = BrainfusionPipeline.from_pretrained(folder)
    with pytest.raises(BrainfusionError, match="trained without masks"):
        pipe(batch_size=1, mask=np.zeros((1, 16, 16), np.uint8))
    assert "channels" not in json.loads((folder / MANIFEST).read_text()) and pipe.unet.config.masks is None


def train_and_export(data, tmp_path, *flags):
    """A mask run on `data` trained with `flags`, exported; its run folder and the export loaded."""
    from brainfusion.cli import main

    run = tmp_path / "run"
    assert main(["--quiet", "train", "--data", str(data), "--masks", *flags, "--out-dir", str(run), *TRAIN]) == 0
    assert main(["--quiet", "export", str(run), "--out", str(tmp_path / "export")]) == 0
    pipe = BrainfusionPipeline.from_pretrained(tmp_path / "export")
    pipe.set_progress_bar_config(disable=True)
    return run, pipe


def test_a_vp_mask_export_returns_masks_and_refuses_a_given_one(exported_masks, tmp_path):
    """The VP samplers: masks are the argmax of the last channels, as brainfusion's; no given mask (as `sample`)."""
    run, pipe = train_and_export(exported_masks[3], tmp_path, "--recipe", "vp")
    out = pipe(batch_size=3, seed=7, num_inference_steps=3, output_type="uint8")
    images, labels = Pipeline.from_checkpoint(run, precision="fp32").pairs(3, seed=7, steps=3)
    assert np.array_equal(out.images, images) and np.array_equal(out.masks, np.array([0, 85, 170, 255], np.uint8)[labels])
    with pytest.raises(BrainfusionError, match="EDM formulation"):
        pipe(batch_size=3, mask=labels)


def test_an_ordinal_mask_export_reads_its_one_label_channel_as_brainfusion_does(exported_masks, tmp_path):
    """One ordinal label channel (diffusion.mask_encoding): the export's masks, given masks, manifest and card follow it."""
    run, pipe = train_and_export(exported_masks[3], tmp_path, "--mask-encoding", "ordinal")
    ours = Pipeline.from_checkpoint(run, precision="fp32")
    images, labels = ours.pairs(3, seed=7, steps=3)
    out = pipe(batch_size=3, seed=7, num_inference_steps=3, output_type="uint8")
    assert np.array_equal(out.images, images) and np.array_equal(out.masks, np.array([0, 85, 170, 255], np.uint8)[labels])
    given = labels[:2]
    held = pipe(batch_size=2, seed=7, num_inference_steps=3, output_type="uint8", mask=given)
    assert np.array_equal(held.masks, out.masks[:2]) and np.array_equal(held.images, ours.pairs(2, seed=7, steps=3, mask=given)[0])
    channels = json.loads((tmp_path / "export" / MANIFEST).read_text())["channels"]
    assert len(channels) == 2 and [(v["value"], v["level"]) for v in channels[1]["levels"]][::3] == [(0, -MASK_SCALES["ordinal"]), (255, MASK_SCALES["ordinal"])]
    assert "nearest level" in (tmp_path / "export" / "README.md").read_text()
