"""The diffusion process: noise schedule, forward process q(x_t | x_0), training loss, samplers.

The schedule and loss are ours (a few lines, and the tests check them against diffusers). The
reverse-process samplers are diffusers' schedulers — DDPM (the seed's ancestral sampler), DDIM,
DPM-Solver++(2M) and its stochastic form SDE-DPM-Solver++(2M) — configured from the same
`DiffusionConfig`, so one trained network can be sampled with any of them.

The fast samplers run without x₀ clipping or dynamic thresholding: on the demo model both made
the Fréchet distance worse (DPM-Solver++-20: 0.22 with thresholding, 0.16 without; DDIM-50 three
times worse with clipping). "dpm++sde" injects fresh noise at every step like DDPM does, which
corrects the network's errors instead of integrating them, and spaces its steps by Karras et
al.'s σ rule; it reaches DDPM-1000's quality in 20–25 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import FAST_STEPS, SAMPLERS, DiffusionConfig
from ..data.conditions import NULL
from ..errors import BrainfusionError
from ..seeding import randn
from .edm import EDM_SAMPLERS, EDMProcess, replace_channels, with_known_channels
from .loss import denoising_loss


class NoiseSchedule:
    """β_t and ᾱ_t for t = 0..T-1, and the forward process built on them."""

    def __init__(self, cfg: DiffusionConfig):
        cfg.validate()
        self.config = cfg
        self.channel_weight: torch.Tensor | None = None
        T = cfg.timesteps
        if cfg.schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
        else:  # cosine, Nichol & Dhariwal (2021), β capped at 0.999 as diffusers does
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def draw_levels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The timesteps of one training batch, uniform over 0..T-1."""
        return torch.randint(0, self.config.timesteps, (n,), generator=generator)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(like.device)[t].to(torch.float32)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: ε, or v = √ᾱ_t ε - √(1-ᾱ_t) x_0."""
        if self.config.prediction == "epsilon":
            return noise
        a, s = self._coefficients(t, x0)
        return a * noise - s * x0

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x_t)
        if self.config.prediction == "epsilon":
            return (x_t - s * model_output) / a
        return a * x_t - s * model_output

    def sigmas(self) -> torch.Tensor:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t): x_t/√ᾱ_t is x₀ plus noise of this σ, the EDM view of step t."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def denoiser(self, model: Callable):
        """D(x, σ) = x̂₀ for x = x₀ + σ·n, at the timestep whose σ_t is nearest σ (for diagnostics)."""
        sigmas = self.sigmas()

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            t = int((sigmas - sigma).abs().argmin())
            x_t = x / math.sqrt(1 + float(sigmas[t]) ** 2)
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long)
            return self.predict_x0(model(x_t, t_batch), x_t, t_batch)

        return denoise

    def loss(self, model: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond=None) -> torch.Tensor:
        """The seed's loss: smooth-L1 (or MSE) between the target and the network's output."""
        x_t = self.q_sample(x0, t, noise)
        prediction = (model(x_t, t) if cond is None else model(x_t, t, cond)).float()
        return denoising_loss(prediction, self.target(x0, t, noise), self.config.loss, self.channel_weight)


def make_process(cfg: DiffusionConfig, channel_weight: torch.Tensor | None = None):
    """The training process of a config: `NoiseSchedule` (VP) or `EDMProcess`; both draw noise levels
    and compute the loss with the same signatures, so the training step does not care which."""
    process = EDMProcess(cfg) if cfg.formulation == "edm" else NoiseSchedule(cfg)
    process.channel_weight = channel_weight
    return process


def make_scheduler(cfg: DiffusionConfig, sampler: str):
    """A diffusers scheduler for `sampler`, matching the training schedule exactly."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler

    common = dict(
        num_train_timesteps=cfg.timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear" if cfg.schedule == "linear" else "squaredcos_cap_v2",
        prediction_type="epsilon" if cfg.prediction == "epsilon" else "v_prediction",
    )
    if sampler == "ddpm":
        return DDPMScheduler(**common, clip_sample=True, variance_type="fixed_small")
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing")
    if sampler == "dpm++sde":
        return DPMSolverMultistepScheduler(
            **common, algorithm_type="sde-dpmsolver++", solver_order=2, timestep_spacing="trailing", use_karras_sigmas=True
        )
    if sampler == "heun":
        return HeunDiscreteScheduler(**common, timestep_spacing="trailing", use_karras_sigmas=True)
    raise BrainfusionError(f"sampler={sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}.")


def classifier_free_guidance(model: Callable, cond: torch.Tensor, scale: float) -> Callable:
    """The network function (x, t) → output of classifier-free guidance (Ho & Salimans 2022), in
    diffusers' convention: out = out_uncond + s·(out_cond − out_uncond), the unconditional output
    being the network's with every condition NULL. s = 1 is the plain conditional model and s = 0
    exactly the unconditional one; each takes one network pass, any other s one pass of the cond
    and uncond halves batched together.

    Guiding the network output guides every sampler of both formulations alike: at fixed x and
    noise level, EDM's D = c_skip·x + c_out·F and the VP x̂₀ from ε or v are affine in the output,
    so mixing outputs is mixing denoised images, D_uncond + s·(D_cond − D_uncond).
    """
    null = torch.full_like(cond, NULL)
    if scale == 1:
        return lambda x, t: model(x, t, cond)
    if scale == 0:
        return lambda x, t: model(x, t, null)
    both = torch.cat([cond, null])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return guided


def autoguidance(model: Callable, guide: Callable, weight: float) -> Callable:
    """The network function (x, t[, cond]) → output guided by a worse version of the same model
    (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"):
    out = out_guide + w·(out_model − out_guide). Where the guide errs more than the model, the step moves
    further from the guide's errors, so samples leave the blurry, ill-formed regions that both share
    without the loss of variety of classifier-free guidance. w = 1 is the model alone. The guide here
    is an earlier checkpoint of the same run (train.guide_at), so it costs no training, only a second
    pass per step; mixing outputs mixes denoised images, as in classifier_free_guidance.

    Measured on the 520-step joint image + mask model of the demo set, with its 260-step checkpoint as the
    guide (250 pairs, SDE-DPM-Solver++ 25 steps): mask fidelity 0.756 → 0.805 at w = 2 (docs/research/masks.md).
    """
    if weight == 1:
        return model

    def guided(x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        weak = guide(x, t, *cond)
        return weak + weight * (model(x, t, *cond) - weak)

    return guided


def default_steps(cfg: DiffusionConfig, sampler: str) -> int:
    """Network steps when none are given: the full chain for DDPM (the seed's sampler, whose quality the others are
    measured against), FAST_STEPS for the others, so every entry point that leaves the count out draws alike."""
    return cfg.timesteps if sampler == "ddpm" else FAST_STEPS


@torch.no_grad()
def sample(
    model: Callable,
    cfg: DiffusionConfig,
    shape: tuple[int, ...],
    sampler: str = "ddpm",
    steps: int = 0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    frames: int = 0,
    progress: Callable | None = None,
    cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    clamp: bool = True,
    known: torch.Tensor | None = None,
    known_clean: bool = False,
    frames_denoised: bool = False,
    known_first: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the reverse process from pure noise; returns the images and `frames` snapshots of x_t.

    `model` maps (x_t, t) — or (x_t, t, cond) when `cond` (N, K, conditions.py) is given — to the
    network output in float32; `guidance` is the classifier-free guidance scale applied with
    `cond`. `steps` defaults to T for DDPM and FAST_STEPS (25) for the fast samplers. `clamp` keeps the result in
    [-1, 1], the range of slices; latents (latent.py) have no such range. `known` (N, k, H, W) fixes
    the last k channels (a given tissue mask) and generates the rest to fit them (EDM runs): by
    replacement, or with `known_clean` by handing them to the network clean, as a model trained with
    diffusion.given_mask_share has learnt them; with `known_first` it fixes the first channels instead (an image
    whose labels a model trained with diffusion.given_image_share draws). With `frames_denoised` the snapshots are the network's
    denoised estimate x̂₀ at those steps instead of x_t (latent runs: a noisy latent decodes to nothing).
    """
    if cond is not None:
        model = classifier_free_guidance(model, cond, guidance)
    steps = steps or default_steps(cfg, sampler)
    if not 1 <= steps <= cfg.timesteps:
        raise BrainfusionError(f"steps={steps} must be between 1 and {cfg.timesteps}.")
    x = randn(shape, generator)
    if cfg.formulation == "edm":
        if sampler not in EDM_SAMPLERS:
            raise BrainfusionError(f"sampler={sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}.")
        process = EDMProcess(cfg)
        sigmas = process.sigmas(steps)
        x = x * sigmas[0].item()
        denoise = process.denoiser(model, given=known if known_clean else None, first=known_first)
        if known is not None:
            denoise = with_known_channels(denoise, known, known_first)
            x = replace_channels(x, known if known_clean else known + _part(x, known.shape[1], known_first), known_first)
        latest = {}
        if frames_denoised:
            denoise = _recording(denoise, latest)
        trajectory = EDM_SAMPLERS[sampler](denoise, x, sigmas, generator=generator)
        return _run(x, trajectory, steps, frames, progress, clamp, (lambda: latest["x0"]) if frames_denoised else None)
    if known is not None:
        raise BrainfusionError("a given mask needs a model of the EDM formulation (the default recipe); retrain with --recipe edm.")
    scheduler = make_scheduler(cfg, sampler)
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    noise = {} if sampler == "heun" else {"generator": generator}  # Heun is deterministic and takes none

    schedule, latest = NoiseSchedule(cfg) if frames_denoised else None, {}

    def trajectory():
        nonlocal x
        for t in scheduler.timesteps:
            t_batch = torch.full((shape[0],), int(t), dtype=torch.long)
            output = model(scheduler.scale_model_input(x, t), t_batch)
            step = scheduler.step(output, t, x, **noise)
            if frames_denoised:  # DPM-Solver's step output has no x̂₀: from the VP x_t it was given
                x0 = getattr(step, "pred_original_sample", None)
                latest["x0"] = schedule.predict_x0(output, x, t_batch) if x0 is None else x0
            x = step.prev_sample
            yield x

    return _run(x, trajectory(), len(scheduler.timesteps), frames, progress, clamp, (lambda: latest["x0"]) if frames_denoised else None)


def _part(x: torch.Tensor, k: int, first: bool) -> torch.Tensor:
    """x's first (or last) k channels."""
    return x[:, :k] if first else x[:, -k:]


def _recording(denoise: Callable, latest: dict) -> Callable:
    """`denoise`, keeping its newest output in latest["x0"]: the denoised frames' source."""

    def recorded(x: torch.Tensor, sigma: float) -> torch.Tensor:
        latest["x0"] = denoise(x, sigma)
        return latest["x0"]

    return recorded


def _run(x: torch.Tensor, trajectory, n: int, frames: int, progress: Callable | None, clamp: bool = True,
         estimate: Callable[[], torch.Tensor] | None = None):
    """Drain a sampler's trajectory of n states, keeping `frames` evenly spaced snapshots: of x (the start
    too), or of `estimate()` (the denoised estimate of the step just taken)."""
    keep = set(torch.linspace(0, n - 1, frames).round().long().tolist()) if frames else set()
    snapshots = [x.clone()] if frames and estimate is None else []
    for i, x in enumerate(trajectory):
        if i in keep:
            snapshots.append((x if estimate is None else estimate()).clone())
        if progress is not None:
            progress(1)
    return (x.clamp(-1, 1) if clamp else x), snapshots
