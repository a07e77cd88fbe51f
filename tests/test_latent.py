"""The autoencoder stage and latent diffusion: a tiny round trip, bitwise resume of both stages, the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from brainfusion.config import AutoencoderConfig, AutoencoderRunConfig, DataConfig, TrainConfig
from brainfusion.data.slices import BatchStream
from brainfusion.evaluation.metrics.distances import masked_ssim, ssim

SIZE = 32  # slices; the autoencoder (2×2 pixel blocks, then one 2x level) makes 8×8 latents of them
AE_TINY = ["--image-size", str(SIZE), "--ae-patch", "2", "--ae-channels", "16,16", "--latent-channels", "2", "--crop-size", "16",
           "--disc-layers", "2", "--batch-size", "2", "--adv-start", "2", "--checkpoint-every", "2", "--sample-every", "0", "--score-n", "4", "--no-rfid"]
LATENT_TINY = ["--image-size", str(SIZE), "--base-channels", "8", "--channel-mults", "1,2", "--attention-resolutions", "",
               "--batch-size", "2", "--checkpoint-every", "2", "--sample-every", "0"]


@pytest.fixture(scope="module")
def oasis32(tmp_path_factory):
    from conftest import make_oasis

    return make_oasis(tmp_path_factory.mktemp("data") / "oasis", n_train=6, n_test=2, n_validate=4, size=SIZE)


def _weights(run: Path) -> dict:
    newest = sorted((run / "checkpoints").glob("ckpt_*.safetensors"))[-1]
    return load_file(str(newest))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_autoencoder_latent_run_sample_round_trip(cli, oasis32, tmp_path):
    status, out, err = cli("train-autoencoder", "--data", oasis32, "--out-dir", tmp_path / "ae", "--max-steps", "4", *AE_TINY)
    assert status == 0, err
    metrics = json.loads((tmp_path / "ae" / "ae_metrics.json").read_text())
    assert metrics["n"] == 4 and np.isfinite(metrics["psnr_brain"]) and -1 <= metrics["ssim_brain"] <= 1
    assert (tmp_path / "ae" / "reconstructions.png").is_file()

    status, out, err = cli("train", "--data", oasis32, "--autoencoder", tmp_path / "ae", "--out-dir", tmp_path / "ldm",
                           "--max-steps", "2", *LATENT_TINY)
    assert status == 0, err
    config = json.loads((tmp_path / "ldm" / "config.json").read_text())
    latent = config["latent"]
    assert latent["channels"] == 2 and latent["factor"] == 4 and latent["image_size"] == SIZE and len(latent["sha256"]) == 64
    assert config["model"]["image_size"] == SIZE // 4 and config["model"]["in_channels"] == 2 and len(latent["std"]) == 2

    status, out, err = cli("sample", "--checkpoint", tmp_path / "ldm", "--n", "3", "--sampler", "dpm++sde", "--steps", "3",
                           "--out", tmp_path / "samples")
    assert status == 0, err
    result = json.loads(out)
    image = np.asarray(Image.open(Path(result["images"]) / "sample_00002.png"))
    assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8
    assert Path(result["gif"]).is_file()


def test_both_stages_resume_bitwise(cli, oasis32, tmp_path):
    for name, command, tiny in (("ae", "train-autoencoder", AE_TINY), ("ldm", "train", LATENT_TINY)):
        extra = ["--autoencoder", tmp_path / "ae_whole"] if name == "ldm" else []
        whole, split = tmp_path / f"{name}_whole", tmp_path / f"{name}_split"
        assert cli(command, "--data", oasis32, "--out-dir", whole, "--max-steps", "4", *tiny, *extra)[0] == 0
        assert cli(command, "--data", oasis32, "--out-dir", split, "--max-steps", "2", *tiny, *extra)[0] == 0
        assert cli(command, "--data", oasis32, "--out-dir", split, "--max-steps", "4", "--resume", *tiny, *extra)[0] == 0
        assert _same(_weights(whole), _weights(split)), f"{name}: the resumed run differs from the uninterrupted one"


def test_latent_refusals(cli, assert_user_error, oasis32, tmp_path):
    assert cli("train-autoencoder", "--data", oasis32, "--out-dir", tmp_path / "ae", "--max-steps", "1", *AE_TINY)[0] == 0
    base = ["train", "--data", oasis32, "--max-steps", "1", *LATENT_TINY]
    assert_user_error(base[:-len(LATENT_TINY)] + ["--autoencoder", tmp_path / "none", "--out-dir", tmp_path / "r0", *LATENT_TINY],
                      "none", "train-autoencoder")
    assert_user_error([*base, "--image-size", "64", "--autoencoder", tmp_path / "ae", "--out-dir", tmp_path / "r1"], "--image-size 32")
    assert cli(*base, "--autoencoder", tmp_path / "ae", "--out-dir", tmp_path / "r2")[0] == 0
    # an autoencoder checkpoint where a diffusion one belongs, and the other way round
    assert_user_error(["sample", "--checkpoint", tmp_path / "ae" / "checkpoints", "--n", "1"], "autoencoder checkpoint")
    assert_user_error([*base, "--autoencoder", tmp_path / "r2", "--out-dir", tmp_path / "r3"], "diffusion checkpoint")
    # the autoencoder retrained after the latent run: its latents would decode into something else
    assert cli("train-autoencoder", "--data", oasis32, "--out-dir", tmp_path / "ae", "--max-steps", "2", "--resume", *AE_TINY)[0] == 0
    assert_user_error(["sample", "--checkpoint", tmp_path / "r2", "--n", "1"], "has changed", "SHA-256")
    # a resume that would change the autoencoder names what differs
    assert_user_error(["train-autoencoder", "--data", oasis32, "--out-dir", tmp_path / "ae", "--max-steps", "3", "--resume",
                       *AE_TINY, "--kl-weight", "0.5"], "--kl-weight (autoencoder.kl_weight) 1e-06 (given 0.5)", "ckpt_00000002.json")


def test_autoencoder_config_refusals():
    with pytest.raises(Exception, match="autoencoder.channels"):
        AutoencoderRunConfig(data=DataConfig(image_size=32), autoencoder=AutoencoderConfig(channels=(16, 24, 32)),
                             train=TrainConfig(max_steps=1)).validate()
    with pytest.raises(Exception, match="at least 32 pixels"):
        AutoencoderRunConfig(data=DataConfig(image_size=32), autoencoder=AutoencoderConfig(crop_size=16),
                             train=TrainConfig(max_steps=1)).validate()
    with pytest.raises(Exception, match="crop_size"):
        AutoencoderRunConfig(data=DataConfig(image_size=32), autoencoder=AutoencoderConfig(crop_size=20),
                             train=TrainConfig(max_steps=1)).validate()
    for size, crop, resolved in ((256, 0, 2), (64, 0, 2), (32, 0, 1), (256, 48, 1)):  # the default: blocks where they fit
        run = AutoencoderRunConfig(data=DataConfig(image_size=size), autoencoder=AutoencoderConfig(crop_size=crop),
                                   train=TrainConfig(max_steps=1))
        run.validate()
        assert run.autoencoder.disc_patch == resolved
    with pytest.raises(Exception, match="2×2 pixel blocks need training crops of at least 64"):
        AutoencoderRunConfig(data=DataConfig(image_size=32), autoencoder=AutoencoderConfig(disc_patch=2),
                             train=TrainConfig(max_steps=1)).validate()
    with pytest.raises(Exception, match="latents of odd side 3"):
        AutoencoderRunConfig(data=DataConfig(image_size=32), autoencoder=AutoencoderConfig(scale_equivariance=1, adv_weight=0, crop_size=12),
                             train=TrainConfig(max_steps=1)).validate()
    with pytest.raises(Exception, match="autoencoder.patch 1 with 1 level"):
        AutoencoderRunConfig(data=DataConfig(image_size=32), autoencoder=AutoencoderConfig(patch=1, channels=(16,)),
                             train=TrainConfig(max_steps=1)).validate()


def test_pixel_blocks_are_channels_of_the_network_and_old_autoencoders_load_without_them():
    from brainfusion.checkpoint import _upgrade
    from brainfusion.models.autoencoder import PixelBlocks, build_autoencoder, monai_autoencoder

    cfg = AutoencoderConfig(patch=4, channels=(16,), latent_channels=3)
    ae = build_autoencoder(cfg).eval()
    assert isinstance(ae, PixelBlocks) and cfg.factor == 4 and monai_autoencoder(ae).encoder.blocks[0].in_channels == 16
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, _ = ae.encode(x)
        assert mu.shape == (2, 3, 8, 8) and ae.decode(mu).shape == (2, 1, 32, 32)
        # the network's 16 input channels are the 4×4 pixel blocks
        blocks = torch.nn.functional.pixel_unshuffle(x, 4)
        assert torch.equal(monai_autoencoder(ae).encode(blocks)[0], mu)
    raw = AutoencoderRunConfig().to_dict()
    del raw["autoencoder"]["patch"], raw["autoencoder"]["disc_patch"]
    old = AutoencoderRunConfig.from_dict(_upgrade(raw)).autoencoder
    assert (old.patch, old.disc_patch) == (1, 1)


def test_a_discriminator_on_pixel_blocks_sees_every_pixel_at_half_the_resolution():
    from brainfusion.models.autoencoder import PixelBlockDiscriminator, build_discriminator

    torch.manual_seed(0)
    pixels = build_discriminator(AutoencoderConfig(disc_layers=2, disc_patch=1)).eval()
    blocks = build_discriminator(AutoencoderConfig(disc_layers=2, disc_patch=2)).eval()  # BatchNorm: no batch coupling
    assert isinstance(blocks, PixelBlockDiscriminator) and blocks.inner.initial_conv.conv.in_channels == 4
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = blocks(x)[-1]
        assert torch.equal(out, blocks.inner(torch.nn.functional.pixel_unshuffle(x, 2))[-1])
        # the same layers on 2×2 blocks: a patch map of half the side, so a quarter of the convolutions' work
        assert out.shape[-1] < pixels(x)[-1].shape[-1] and out.shape[-1] == pixels(x[..., ::2, ::2])[-1].shape[-1]
    # one pixel changed inside a block changes the verdict: nothing is pooled away
    y = x.clone()
    y[0, 0, 31, 31] += 1
    with torch.no_grad():
        assert not torch.equal(blocks(y)[-1][0], out[0]) and torch.equal(blocks(y)[-1][1], out[1])


def test_latent_stream_flips_by_choosing_the_encoded_mirror():
    latents = np.arange(4 * 2 * 2 * 2, dtype=np.float32).reshape(4, 2, 2, 2)
    mirrored = -latents
    stream = BatchStream(latents, 4, seed=0, hflip=True, flipped=mirrored)
    batch = stream.batch(0)
    rows = stream.images[stream._indices(0)]
    for got, row in zip(batch, rows):
        assert torch.equal(got, row) or torch.equal(got, -row)
    assert any(torch.equal(got, -row) for got, row in zip(batch, rows))

    from brainfusion.data.channels import one_hot

    labels = np.random.default_rng(1).integers(0, 3, (4, 4, 4)).astype(np.uint8)  # slices of 4², latents of 2²
    stream = BatchStream(latents, 4, seed=0, hflip=True, flipped=mirrored, labels=labels, n_labels=3)
    indices = stream._indices(0)
    masks = one_hot(torch.from_numpy(labels[indices.numpy()]), 3, grid=2)
    for got, row, mask in zip(stream.batch(0), stream.images[indices], masks):  # the labels flip with the latent
        assert torch.equal(got, torch.cat([row, mask])) or torch.equal(got, torch.cat([-row, mask.flip(-1)]))


def test_masked_ssim_with_a_full_mask_is_ssim():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 1, 24, 24, generator=gen), torch.rand(3, 1, 24, 24, generator=gen)
    full = torch.ones_like(x, dtype=torch.bool)
    assert torch.allclose(masked_ssim(x, y, full), ssim(x, y), atol=1e-6)
    assert torch.allclose(masked_ssim(x, x, full), torch.ones(3), atol=1e-5)


def test_the_autoencoders_ssim_loss_is_monais_with_its_gradient():
    from monai.losses import SSIMLoss

    from brainfusion.training.train_autoencoder import ssim_loss

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 40, 40, generator=g) * 2 - 1
    ours = (x + 0.2 * torch.randn(x.shape, generator=g)).requires_grad_()
    theirs = ours.detach().clone().requires_grad_()
    a, b = ssim_loss(ours, x), SSIMLoss(spatial_dims=2, data_range=2.0)(theirs, x)
    a.backward()
    b.backward()
    assert 0.05 < b.item() < 0.9 and torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6)


def test_mask_channels_on_a_latent_grid_are_each_blocks_label_shares():
    from brainfusion.data.channels import labels_from_channels, one_hot

    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 3, (2, 8, 8)))
    coarse = one_hot(labels, 3, 0.5, grid=2)
    shares = torch.nn.functional.one_hot(labels, 3).float().reshape(2, 2, 4, 2, 4, 3).mean((2, 4)).permute(0, 3, 1, 2)
    torch.testing.assert_close(coarse, (2 * shares - 1) * 0.5)
    assert torch.equal(labels_from_channels(one_hot(labels, 3, 0.5), 8), labels.to(torch.uint8))  # the pixel grid: exact


def test_a_latent_run_with_masks_makes_full_size_pairs_and_exports_them(cli, oasis32, tmp_path):
    from brainfusion.data.masks import fit_square_labels
    from brainfusion.diffusion.pipeline import Pipeline
    from brainfusion.export.hub import BrainfusionPipeline
    from brainfusion.export.hub_pipeline import MANIFEST

    assert cli("train-autoencoder", "--data", oasis32, "--out-dir", tmp_path / "ae", "--max-steps", "2", *AE_TINY)[0] == 0
    status, _, err = cli("train", "--data", oasis32, "--masks", "--autoencoder", tmp_path / "ae", "--out-dir", tmp_path / "ldm",
                         "--max-steps", "2", *LATENT_TINY, "--lr", "3e-3")
    assert status == 0, err
    config = json.loads((tmp_path / "ldm" / "config.json").read_text())
    assert config["model"]["in_channels"] == 2 + 4 and config["model"]["image_size"] == SIZE // 4

    pipe = Pipeline.from_checkpoint(tmp_path / "ldm", precision="fp32")
    images, labels = pipe.pairs(3, seed=7, sampler="ddim", steps=3)
    assert images.shape == labels.shape == (3, SIZE, SIZE) and labels.max() < 4
    seg = np.asarray(Image.open(sorted((oasis32 / "keras_png_slices_seg_validate").iterdir())[0]))
    given = np.stack([fit_square_labels(np.searchsorted((0, 85, 170, 255), seg).astype(np.uint8), 4, SIZE)] * 2)
    held_images, held = pipe.pairs(2, seed=7, sampler="ddim", steps=3, mask=given)
    assert np.array_equal(held, given) and not np.array_equal(held_images, images[:2])

    assert cli("export", tmp_path / "ldm", "--out", tmp_path / "export")[0] == 0
    hub = BrainfusionPipeline.from_pretrained(tmp_path / "export")
    hub.set_progress_bar_config(disable=True)
    out = hub(batch_size=3, seed=7, num_inference_steps=3, sampler="ddim", output_type="uint8")
    assert np.array_equal(out.images, images) and np.array_equal(out.masks, np.array((0, 85, 170, 255), np.uint8)[labels])
    fitted = hub(batch_size=2, seed=7, num_inference_steps=3, sampler="ddim", output_type="uint8", mask=given)
    assert np.array_equal(fitted.images, held_images) and np.array_equal(fitted.masks, np.array((0, 85, 170, 255), np.uint8)[given])
    manifest = json.loads((tmp_path / "export" / MANIFEST).read_text())
    assert [c["holds"] for c in manifest["channels"][:3]] == ["latent channel 0", "latent channel 1", manifest["channels"][2]["holds"]]
    assert manifest["channels"][2]["channel"] == 2 and "share" in manifest["channels"][2]["holds"]
    card = (tmp_path / "export" / "README.md").read_text()
    assert "channels 0..1 the slice's latent" in card and "| 2 | 0 | background |" in card


def test_scale_equivariance_asks_the_pooled_latent_to_decode_to_the_pooled_slice():
    from brainfusion.training.train_autoencoder import scale_equivariance_loss

    class Upsampler(torch.nn.Module):  # a decoder that commutes with pooling on piecewise-constant slices
        def __init__(self, gain: float = 1.0):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(gain))

        def decode(self, z):
            return self.gain * torch.nn.functional.interpolate(z, scale_factor=4, mode="nearest")

    coarse = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.interpolate(coarse, scale_factor=8, mode="nearest")
    z = torch.nn.functional.avg_pool2d(x, 4)
    off = torch.autocast("cpu", enabled=False)
    assert scale_equivariance_loss(Upsampler(), z, x, off).item() == pytest.approx(0, abs=1e-7)
    wrong = Upsampler(0.5)
    loss = scale_equivariance_loss(wrong, z, x, off)
    assert loss.item() == pytest.approx(0.5 * x.abs().mean().item(), rel=1e-5)
    loss.backward()
    assert wrong.gain.grad < 0  # it pulls the decoder towards the pooled slice


def test_a_decoder_fine_tune_keeps_every_latent_and_decodes_the_latent_run(cli, assert_user_error, oasis32, tmp_path):
    from brainfusion.diffusion.pipeline import Pipeline

    ae, dec, ldm = tmp_path / "ae", tmp_path / "dec", tmp_path / "ldm"
    assert cli("train-autoencoder", "--data", oasis32, "--out-dir", ae, "--max-steps", "2", *AE_TINY)[0] == 0
    assert cli("train", "--data", oasis32, "--autoencoder", ae, "--out-dir", ldm, "--max-steps", "2", *LATENT_TINY)[0] == 0
    status, _, err = cli("train-autoencoder", "--data", oasis32, "--out-dir", dec, "--decoder-of", ae, "--max-steps", "3", *AE_TINY,
                         "--adv-start", "0")
    assert status == 0, err
    before, after = _weights(ae), _weights(dec)
    makes_latents = [k for k in before if k.startswith(("model.vae.inner.encoder.", "model.vae.inner.quant_conv_"))]
    decodes = [k for k in before if k.startswith(("model.vae.inner.decoder.", "model.vae.inner.post_quant_conv"))]
    assert makes_latents and all(torch.equal(before[k], after[k]) for k in makes_latents)
    assert not all(torch.equal(before[k], after[k]) for k in decodes)
    fine_tune = ["--data", oasis32, "--out-dir", tmp_path / "dec_split", "--decoder-of", ae, *AE_TINY, "--adv-start", "0"]
    assert cli("train-autoencoder", *fine_tune, "--max-steps", "1")[0] == 0
    assert cli("train-autoencoder", *fine_tune, "--max-steps", "3", "--resume")[0] == 0
    assert _same(after, _weights(tmp_path / "dec_split")), "the resumed decoder fine-tune differs from the uninterrupted one"

    plain = Pipeline.from_checkpoint(ldm, precision="fp32")(2, seed=3, sampler="ddim", steps=3)
    finetuned = Pipeline.from_checkpoint(ldm, precision="fp32", decoder=dec)
    assert finetuned.config.latent.decoder == str(dec) and len(finetuned.config.latent.decoder_sha256) == 64
    images = finetuned(2, seed=3, sampler="ddim", steps=3)
    assert images.shape == plain.shape and not np.array_equal(images, plain)
    status, out, err = cli("sample", "--checkpoint", ldm, "--decoder", dec, "--n", "2", "--seed", "3", "--sampler", "ddim", "--steps", "3",
                           "--precision", "fp32", "--no-gif", "--out", tmp_path / "samples")
    assert status == 0, err
    assert np.array_equal(np.asarray(Image.open(Path(json.loads(out)["images"]) / "sample_00001.png")), images[1])
    assert cli("export", ldm, "--decoder", dec, "--out", tmp_path / "export")[0] == 0
    assert f"with the decoder of `{dec}`" in (tmp_path / "export" / "README.md").read_text()

    # an autoencoder that is no fine-tune of the run's; a fine-tune with another network
    assert_user_error(["sample", "--checkpoint", ldm, "--decoder", ae, "--n", "1"], str(ae), "not of this run's autoencoder")
    assert_user_error(["train-autoencoder", "--data", oasis32, "--out-dir", tmp_path / "dec2", "--decoder-of", ae, "--max-steps", "1",
                       *AE_TINY, "--latent-channels", "3"], "--latent-channels", str(ae))
