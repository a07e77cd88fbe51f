"""Noise schedule, forward process, targets and loss (checked against diffusers), and the samplers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from brainfusion.config import DiffusionConfig
from brainfusion.diffusion.process import SAMPLERS, NoiseSchedule, make_scheduler, sample
from brainfusion.errors import BrainfusionError

# diffusers' DPM-Solver builds a numpy array from a tensor the old way; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v")


def _diffusers_ddpm(schedule: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
        beta_schedule="linear" if schedule == "linear" else "squaredcos_cap_v2",
    )


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_bar_strictly_decreasing_inside_unit_interval(schedule):
    abar = NoiseSchedule(DiffusionConfig(schedule=schedule)).alphas_cumprod
    assert abar.shape == (1000,)
    assert (abar > 0).all() and (abar < 1).all()
    assert (abar[1:] < abar[:-1]).all()
    assert abar[0] > 0.99 and abar[-1] < 1e-3  # from almost clean to almost pure noise


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_bar_equals_diffusers(schedule):
    ours = NoiseSchedule(DiffusionConfig(schedule=schedule)).alphas_cumprod
    theirs = _diffusers_ddpm(schedule).alphas_cumprod.double()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_samplers_use_the_training_schedule(schedule, sampler):
    cfg = DiffusionConfig(schedule=schedule, prediction="v")
    scheduler = make_scheduler(cfg, sampler)
    assert scheduler.config.prediction_type == "v_prediction"
    assert torch.allclose(NoiseSchedule(cfg).alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_unknown_sampler_and_bad_step_counts_are_user_errors():
    cfg = DiffusionConfig(timesteps=50)
    zeros = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(BrainfusionError, match="sampler="):
        make_scheduler(cfg, "euler")
    with pytest.raises(BrainfusionError, match="steps=51"):
        sample(zeros, cfg, (1, 1, 16, 16), "ddim", steps=51)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_q_sample_mean_and_variance(schedule):
    ns = NoiseSchedule(DiffusionConfig(schedule=schedule))
    gen = torch.Generator().manual_seed(0)
    n = 4096
    x0 = torch.full((n, 1, 4, 4), 0.7)
    x0[:, :, :, 2:] = -0.4
    for t_value in (0, 100, 500, 900):
        t = torch.full((n,), t_value)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = ns.q_sample(x0, t, noise)
        abar = float(ns.alphas_cumprod[t_value])
        # 16 pixels × 4096 draws per pixel value: standard errors are ~0.01
        assert torch.allclose(x_t.mean(0), abar**0.5 * x0[0], atol=0.05), t_value
        assert torch.allclose(x_t.var(0), torch.full_like(x_t[0], 1 - abar), atol=0.06 * max(1 - abar, 0.05)), t_value


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_q_sample_and_v_target_equal_diffusers(schedule):
    ns = NoiseSchedule(DiffusionConfig(schedule=schedule, prediction="v"))
    ref = _diffusers_ddpm(schedule)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand((6, 1, 8, 8), generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    assert torch.allclose(ns.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(ns.target(x0, t, noise), ref.get_velocity(x0, noise, t), atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_target_round_trips_through_predict_x0(schedule, prediction):
    ns = NoiseSchedule(DiffusionConfig(schedule=schedule, prediction=prediction))
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand((6, 1, 8, 8), generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 10, 250, 500, 750, 900])
    x_t = ns.q_sample(x0, t, noise)
    target = ns.target(x0, t, noise)
    if prediction == "epsilon":
        assert torch.equal(target, noise)
    else:
        a = ns.alphas_cumprod[t].float().sqrt().view(-1, 1, 1, 1)
        assert torch.allclose(target, a * noise - (1 - a**2).sqrt() * x0, atol=1e-5)
    assert torch.allclose(ns.predict_x0(target, x_t, t), x0, atol=1e-4)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("loss", ["smooth_l1", "mse"])
def test_loss_is_the_configured_one(loss, prediction):
    ns = NoiseSchedule(DiffusionConfig(loss=loss, prediction=prediction))
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand((4, 1, 8, 8), generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([5, 50, 500, 950])
    const = lambda x_t, t: torch.full_like(x_t, 1.5)  # noqa: E731  (errors both above and below 1)
    target = ns.target(x0, t, noise)
    expected = {"smooth_l1": F.smooth_l1_loss, "mse": F.mse_loss}
    value = ns.loss(const, x0, t, noise)
    assert value.ndim == 0
    assert torch.allclose(value, expected[loss](torch.full_like(x0, 1.5), target))
    other = "mse" if loss == "smooth_l1" else "smooth_l1"
    assert not torch.allclose(value, expected[other](torch.full_like(x0, 1.5), target))
    # a perfect predictor has zero loss
    oracle = lambda x_t, t_: target  # noqa: E731
    assert ns.loss(oracle, x0, t, noise) == 0


def _run(sampler, seed, steps=4, frames=0, shape=(3, 1, 16, 16), calls=None, prediction="epsilon"):
    def zeros(x, t):
        if calls is not None:
            calls.append(t.clone())
        return torch.zeros_like(x)

    gen = torch.Generator().manual_seed(seed)
    return sample(zeros, DiffusionConfig(formulation="vp", prediction=prediction), shape, sampler, steps, gen, frames=frames)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_shape_range_and_determinism(sampler):
    calls: list[torch.Tensor] = []
    x, frames = _run(sampler, seed=0, calls=calls)
    assert x.shape == (3, 1, 16, 16)
    assert frames == []
    assert x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.05  # not collapsed to a constant
    # one network call per step (Heun: two, Euler on the last), on a batch of timesteps, from noisy to clean
    assert len(calls) == (2 * 4 - 1 if sampler == "heun" else 4)
    assert all(c.shape == (3,) and c.dtype == torch.long for c in calls)
    firsts = [int(c[0]) for c in calls]
    assert firsts == sorted(firsts, reverse=True) and 0 <= firsts[-1] < firsts[0] < 1000
    again, _ = _run(sampler, seed=0)
    other, _ = _run(sampler, seed=1)
    assert torch.equal(x, again)
    assert not torch.allclose(x, other)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_with_v_prediction_stays_in_range(sampler):
    x, _ = _run(sampler, seed=0, prediction="v", shape=(2, 1, 16, 16))
    assert x.shape == (2, 1, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_reverse_process_frames():
    ticks = []
    gen = torch.Generator().manual_seed(5)
    x, frames = sample(lambda x, t: torch.zeros_like(x), DiffusionConfig(formulation="vp"), (2, 1, 16, 16), "ddim", 6, gen,
                       frames=3, progress=ticks.append)
    # the starting noise, then `frames` snapshots spread over the steps, the last being the result
    assert len(frames) == 4
    assert all(f.shape == (2, 1, 16, 16) for f in frames)
    assert torch.equal(frames[0], torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(5)))
    assert torch.equal(frames[-1].clamp(-1, 1), x)
    assert ticks == [1] * 6
    # asking for more frames than steps gives one per step
    _, many = _run("ddim", seed=0, steps=5, frames=60)
    assert len(many) == 6


@pytest.mark.parametrize("formulation,sampler", [("edm", "dpm++sde"), ("edm", "heun"), ("vp", "dpm++"), ("vp", "ddim")])
def test_denoised_frames_are_the_estimates_not_the_noisy_states(formulation, sampler):
    """Latent runs' GIF frames: x̂₀ of the step just taken (no starting noise); the last is the result."""
    cfg, shape = DiffusionConfig(formulation=formulation), (2, 1, 8, 8)
    target = torch.linspace(-0.5, 0.5, 64).view(1, 1, 8, 8)

    def network(x, t):  # a denoiser that knows the answer: D(x) = target at every level
        if formulation == "edm":  # F such that c_skip·x + c_out·F = target; the input is c_in·x
            sigma = torch.exp(t.float()[:, None, None, None] / 1000 * (torch.tensor(80.0).log() - torch.tensor(0.002).log())
                              + torch.tensor(0.002).log())
            c_in, c_skip, c_out = 1 / (sigma**2 + 0.25).sqrt(), 0.25 / (sigma**2 + 0.25), sigma * 0.5 / (sigma**2 + 0.25).sqrt()
            return (target - c_skip * x / c_in) / c_out
        schedule = NoiseSchedule(cfg)  # v = √ᾱ ε − √(1−ᾱ) x₀ with ε from x_t
        a, s = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1), (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        return (a * (x - a * target) / s - s * target).float()

    args = (network, cfg, shape, sampler, 5, torch.Generator().manual_seed(0))
    x, noisy = sample(*args, frames=3, clamp=False)
    _, denoised = sample(*args[:-1], torch.Generator().manual_seed(0), frames=3, clamp=False, frames_denoised=True)
    assert len(noisy) == 4 and len(denoised) == 3
    assert noisy[0].std() > 1  # x_T: noise
    for frame in denoised:
        torch.testing.assert_close(frame.float(), target.expand(shape), atol=1e-3, rtol=0)
    torch.testing.assert_close(denoised[-1], x, atol=1e-3, rtol=0)
