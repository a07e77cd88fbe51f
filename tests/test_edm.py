"""The EDM formulation, the σ-space samplers, the in-memory pipeline and the named recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainfusion.config import SAMPLERS, DiffusionConfig, ModelConfig, RunConfig, recipe_config
from brainfusion.diffusion.process import make_process, sample
from brainfusion.diffusion.edm import EDM_SAMPLERS, EDMProcess, karras_sigmas
from brainfusion.errors import BrainfusionError
from brainfusion.models.unet import UNet
from brainfusion.diffusion.pipeline import Cancelled, Pipeline
from brainfusion.seeding import image_generators, seeded_generator


def test_karras_sigmas_span_the_range_and_end_at_zero():
    s = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert len(s) == 19 and s[-1] == 0
    assert torch.isclose(s[0], torch.tensor(80.0, dtype=s.dtype)) and torch.isclose(s[-2], torch.tensor(0.002, dtype=s.dtype))
    assert (s[:-1].diff() < 0).all()


@pytest.mark.parametrize("name", sorted(EDM_SAMPLERS))
def test_every_sampler_lands_on_the_data_point_of_an_exact_denoiser(name):
    # a one-point data set has the denoiser D(x, σ) = x*; every consistent sampler must end on x*
    target = torch.rand(3, 1, 8, 8) * 2 - 1
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 80
    for x in EDM_SAMPLERS[name](lambda x, s: target, x, karras_sigmas(6, 0.002, 80.0), generator=torch.Generator().manual_seed(1)):
        pass
    assert torch.allclose(x, target, atol=1e-5)


def test_edm_loss_is_the_papers_weighted_denoiser_loss():
    cfg = DiffusionConfig(formulation="edm", loss="mse")
    process = EDMProcess(cfg)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = process.draw_levels(4, torch.Generator().manual_seed(3))
    net = lambda x, c: torch.sin(3 * x) + 0.001 * c.view(-1, 1, 1, 1)  # noqa: E731 - any function of both inputs
    ours = process.loss(net, x0, sigma, noise)
    # Karras et al. eq. 8 with λ(σ) = (σ² + σ_d²) / (σ σ_d)²: E[λ(σ) ‖D(x₀ + σn, σ) − x₀‖²]
    sd, s = cfg.sigma_data, sigma.view(-1, 1, 1, 1)
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (s**2 + sd**2).sqrt(), process.coefficients(sigma)[3]
    x = x0 + s * noise
    denoised = c_skip * x + c_out * net(c_in * x, c_noise)
    weight = (s**2 + sd**2) / (s * sd) ** 2
    assert torch.allclose(ours, (weight * (denoised - x0) ** 2).mean(), rtol=1e-5)
    assert ours.ndim == 0


def test_training_noise_levels_are_log_normal():
    cfg = DiffusionConfig(formulation="edm")
    logs = EDMProcess(cfg).draw_levels(20_000, torch.Generator().manual_seed(0)).log()
    assert abs(logs.mean().item() - cfg.p_mean) < 0.05 and abs(logs.std().item() - cfg.p_std) < 0.05


@pytest.mark.parametrize("formulation", ["vp", "edm"])
def test_denoiser_of_an_oracle_network_recovers_x0(formulation):
    # the network that outputs its exact target makes D(x, σ) = x₀ in both formulations
    cfg = DiffusionConfig(formulation=formulation, prediction="v")
    process = make_process(cfg)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    if formulation == "edm":
        sigma = 0.7
        c_skip, c_out, c_in, _ = process.coefficients(torch.tensor([sigma]))
        oracle = lambda x_in, c: (x0 - c_skip * x_in / c_in) / c_out  # noqa: E731
    else:
        t = 400
        sigma = float(process.sigmas()[t])
        oracle = lambda x_t, t_: process.target(x0, t_, noise)  # noqa: E731
    assert torch.allclose(process.denoiser(oracle)(x0 + sigma * noise, sigma), x0, atol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_edm_sampling_is_seeded_and_in_range(sampler):
    cfg = DiffusionConfig(formulation="edm")
    net = lambda x, c: torch.zeros_like(x)  # noqa: E731
    a, _ = sample(net, cfg, (2, 1, 8, 8), sampler, 4, torch.Generator().manual_seed(0))
    b, _ = sample(net, cfg, (2, 1, 8, 8), sampler, 4, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1


def _tiny_pipeline(formulation: str, channels: int = 1) -> Pipeline:
    config = RunConfig()
    config.data.image_size = 32
    config.model = ModelConfig(image_size=32, in_channels=channels, base_channels=8, attention_resolutions=())
    config.diffusion.formulation = formulation
    torch.manual_seed(0)
    return Pipeline(UNet(config.model), config, precision="fp32")


@pytest.mark.parametrize("formulation", ["vp", "edm"])
def test_image_i_of_a_seed_is_the_same_in_any_batch_size(formulation, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe = _tiny_pipeline(formulation)
    whole = pipe(9, seed=5, sampler="dpm++sde", steps=3, batch_size=64)
    ones = np.concatenate([pipe(1, seed=5, sampler="dpm++sde", steps=3, first_index=i) for i in range(9)])
    sevens = pipe(9, seed=5, sampler="dpm++sde", steps=3, batch_size=7)
    assert whole.shape == (9, 32, 32) and whole.dtype == np.uint8
    assert np.array_equal(whole, ones) and np.array_equal(whole, sevens)
    assert not np.array_equal(whole, pipe(9, seed=6, sampler="dpm++sde", steps=3))
    assert list(tmp_path.iterdir()) == []  # in memory only: nothing written


def test_pipeline_reports_progress_frames_and_stops_when_cancelled():
    pipe = _tiny_pipeline("edm")
    ticks, seen = [], []
    pipe(2, steps=3, frames=2, on_frames=lambda start, frames: seen.append((start, len(frames))), progress=ticks.append)
    assert ticks == [1, 1, 1] and seen == [(0, 3)]
    with pytest.raises(Cancelled):
        pipe(2, steps=3, cancel=lambda: True)


def test_seeded_generators_depend_on_every_part_of_the_key():
    draw = lambda g: torch.randn(4, generator=g)  # noqa: E731
    assert torch.equal(draw(seeded_generator(1, 2)), draw(seeded_generator(1, 2)))
    assert not torch.equal(draw(seeded_generator(1, 2)), draw(seeded_generator(2, 1)))
    a, b = image_generators(0, [0, 1])
    assert not torch.equal(draw(a), draw(b))


def test_recipes_apply_over_a_config_and_unknown_ones_are_refused():
    assert recipe_config("vp").diffusion.formulation == "vp"
    assert recipe_config("edm").diffusion.formulation == "edm"
    assert recipe_config("edm").model == RunConfig().model  # the default recipe
    assert recipe_config("edm-p2").model.patch_size == recipe_config("vp").model.patch_size == 2  # earlier defaults
    base = RunConfig().to_dict()
    base["train"]["lr"] = 1e-3
    assert recipe_config("vp", base).train.lr == 1e-3
    with pytest.raises(BrainfusionError, match="recipe 'nope' is unknown"):
        recipe_config("nope")


@pytest.mark.parametrize("formulation", ["vp", "edm"])
def test_a_two_channel_model_trains_and_samples(formulation):
    from brainfusion import distributed as dist
    from brainfusion.data.slices import BatchStream
    from brainfusion.diffusion.process import make_process
    from brainfusion.training.train import EMA, Session, training_step

    config = RunConfig()
    config.data.image_size = 16
    config.model = ModelConfig(image_size=16, in_channels=2, base_channels=8, patch_size=1, attention_resolutions=())
    config.diffusion.formulation = formulation
    config.train.precision = "fp32"
    images = np.random.default_rng(0).integers(0, 256, (12, 2, 16, 16), dtype=np.uint8)
    torch.manual_seed(0)
    model = UNet(config.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = BatchStream(images, 4, seed=0, hflip=True)
    session = Session(config, dist.init(), stream, make_process(config.diffusion), model, model, EMA(model, 0.9), optimizer,
                      None, torch.contiguous_format, 0, 3, None, 0, images)
    before = [p.clone() for p in model.parameters()]
    losses = [float(training_step(session, step)) for step in range(3)]
    assert all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    out = Pipeline(session.ema.shadow, config, precision="fp32")(3, steps=2, sampler="dpm++")
    assert out.shape == (3, 2, 16, 16) and out.dtype == np.uint8


def test_a_checkpoint_from_before_the_edm_formulation_or_mask_scale_loads_as_trained(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from brainfusion.checkpoint import load_checkpoint
    from conftest import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "ckpts")
    header = json.loads(path.with_suffix(".json").read_text())
    del header["config"]["diffusion"]["formulation"]  # what every checkpoint written before EDM looks like
    del header["config"]["diffusion"]["mask_scale"]  # ... and before the label channels' scale could be chosen
    save_file(load_file(str(path)), str(path), metadata={"brainfusion": json.dumps(header, sort_keys=True)})
    path.with_suffix(".json").write_text(json.dumps(header, indent=2, sort_keys=True))
    loaded = load_checkpoint(path).config.diffusion
    assert loaded.formulation == "vp" and loaded.mask_scale == 1.0
    assert RunConfig().diffusion.formulation == "edm"


@pytest.mark.parametrize("formulation", ["vp", "edm"])
def test_sampling_builds_no_autograd_graph(formulation):
    """Sampling under autograd would keep every step's activations (a patch-1 model ran out of 24 GB that way)."""
    from brainfusion.diffusion.process import sample

    pipe = _tiny_pipeline(formulation)
    x, _ = sample(pipe.network, pipe.config.diffusion, (2, 1, 32, 32), "dpm++sde", 3, torch.Generator().manual_seed(0))
    assert not x.requires_grad and x.grad_fn is None


def test_training_levels_default_to_edm2s_on_latents():
    """P_mean left unset resolves by the run's space: −1.2 on pixels (EDM), −0.4 on latents (EDM2); a given value stays."""
    def resolved(**sections):
        config = RunConfig.from_dict({"train": {"max_steps": 1}, **sections})
        config.validate()
        return config.diffusion.p_mean

    assert RunConfig().diffusion.p_mean is None and RunConfig().to_dict()["diffusion"]["p_mean"] is None
    assert resolved() == -1.2 and resolved(latent={"autoencoder": "runs/ae"}) == -0.4
    assert resolved(latent={"autoencoder": "runs/ae"}, diffusion={"p_mean": -1.2}) == -1.2
    assert resolved(diffusion={"p_mean": None}) == -1.2
