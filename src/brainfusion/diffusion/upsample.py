"""What the upsampler of a cascade is given: the low-resolution slice, noised and brought to its size.

The upsampler (config.UpsampleConfig) generates a slice's second channel given its first: the same slice at
`from_size`, noised by a level σ_aug the network is told (noise conditioning augmentation, Ho et al. 2022; off
unless upsample.augment_max is set, config.UpsampleConfig says why), then
upsampled bicubically (SR3's concatenation, Saharia et al. 2021). In training the low-resolution slice is made from
the batch by averaging pixel blocks and rounding to the uint8 grid, as the data loader shrinks slices (PIL's box
filter) and as a base model's slices arrive, as uint8. With `blur` the level also blurs the slice before its noise
(CDM's Gaussian blur augmentation, which Ho et al. found best for their 64² → 256² stage), and a residual upsampler
then adds its detail to the blurred slice, so a base model's wrong fine structure is not kept at sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DiffusionConfig, RunConfig, UpsampleConfig
from ..data.channels import to_model_range
from ..errors import BrainfusionError
from ..seeding import derive_seed, image_generators, randn
from .process import sample


def shrink(x: torch.Tensor, size: int) -> torch.Tensor:
    """Slices in [-1, 1] (N, 1, H, W) at size×size: each pixel block's mean, rounded to the uint8 grid."""
    small = F.interpolate(x.float(), size=(size, size), mode="area")
    return ((small + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def enlarge(x: torch.Tensor, size: int) -> torch.Tensor:
    """Slices in [-1, 1] brought to size×size bicubically (clamped to the range of slices)."""
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def gaussian_blur(x: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Slices (N, 1, h, w) each blurred by a Gaussian of its own standard deviation `widths` (N,) in pixels (0: kept),
    separably, edges replicated."""
    if not bool((widths > 0).any()):
        return x
    radius = max(1, int(math.ceil(3 * float(widths.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / widths.float().clamp_min(1e-6).view(-1, 1)) ** 2)
    kernel = torch.where(widths.view(-1, 1) > 0, kernel, (offsets == 0).float())
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.dtype)
    n, _, h, w = x.shape
    rows = F.conv2d(F.pad(x.reshape(1, n, h, w), (radius, radius, 0, 0), mode="replicate"), kernel.view(n, 1, 1, -1), groups=n)
    both = F.conv2d(F.pad(rows, (0, 0, radius, radius), mode="replicate"), kernel.view(n, 1, -1, 1), groups=n)
    return both.reshape(n, 1, h, w)


def conditioning(low: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor, size: int, blur: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The given channel (N, 1, size, size), the network's continuous input (N, 1) and the anchor a residual upsampler
    adds its detail to (N, 1, size, size): `low` blurred by `blur` pixels per unit of `levels`, enlarged (the anchor),
    and noised by `levels` (the given channel)."""
    blurred = gaussian_blur(low.float(), levels.float() * blur)
    noised = blurred + levels.view(-1, 1, 1, 1) * noise
    return enlarge(noised, size), levels.view(-1, 1).float(), enlarge(blurred, size)


def target(x0: torch.Tensor, anchor: torch.Tensor, cfg: UpsampleConfig) -> torch.Tensor:
    """What the upsampler generates for slices `x0` whose enlarged low-resolution version is `anchor`: the slices,
    or with residual_scale what the anchor misses, scaled."""
    return x0 if not cfg.residual_scale else (x0 - anchor) * cfg.residual_scale


def training_pair(x0: torch.Tensor, cfg: UpsampleConfig, generator: torch.Generator, rows: slice, batch: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch (this process's `rows` of a global batch of `batch`) as the upsampler's input channels and
    its continuous input: σ_aug ~ U(0, augment_max) per image, with its noise, drawn for the global batch from
    `generator`, so the pairs are the same in any process count and on resume."""
    levels = torch.rand(batch, generator=generator) * cfg.augment_max
    noise = torch.randn((batch, 1, cfg.from_size, cfg.from_size), generator=generator)
    low = shrink(x0, cfg.from_size)
    given, cond, anchor = conditioning(low, levels[rows].to(x0.device), noise[rows].to(x0.device), x0.shape[-1], cfg.blur)
    return torch.cat([given, target(x0.float(), anchor, cfg)], 1).to(x0.dtype), cond


def sampling_conditioning(low: torch.Tensor, level: float, generators: list[torch.Generator], size: int, blur: float = 0.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`conditioning` for low-resolution slices (N, 1, h, w) at the fixed level `level`; image i's augmentation
    noise comes from its own generator."""
    noise = randn(tuple(low.shape), generators)
    return conditioning(low.float(), torch.full((low.shape[0],), float(level)), noise, size, blur)


def upscale_images(network: Callable, diffusion: DiffusionConfig, cfg: UpsampleConfig, low: np.ndarray, level: float, size: int,
                   seed: int, indices: range, sampler: str, steps: int, progress: Callable | None = None) -> torch.Tensor:
    """An upsampler network's slices (N, 1, size, size) in [-1, 1] for uint8 low-resolution ones (N, h, w), images
    `indices` of `seed`: the sampler's noise from image_generators(seed, indices), the augmentation noise from a
    second stream per image. brainfusion's Pipeline and the diffusers export both draw a cascade's second stage here."""
    small = to_model_range(torch.as_tensor(np.asarray(low, dtype=np.uint8)))
    given, cond, anchor = sampling_conditioning(small, level, image_generators(derive_seed(seed, 2), indices), size, cfg.blur)
    x, _ = sample(network, diffusion, (len(indices), 2, size, size), sampler, steps, image_generators(seed, indices),
                  progress=progress, cond=cond, clamp=not cfg.residual_scale, known=given, known_clean=True, known_first=True)
    made = x[:, 1:]
    return made if not cfg.residual_scale else (anchor + made / cfg.residual_scale).clamp(-1, 1)


def sampling_level(cfg: UpsampleConfig, augment: float | None) -> float:
    """The augmentation level an upsampler samples at: `augment`, or its run's upsample.augment; only levels it was
    trained on (0 to augment_max) are accepted."""
    if augment is None:
        return cfg.augment
    if augment and not cfg.augment_max:
        raise BrainfusionError(f"this upsampler was trained without noise conditioning augmentation, so it takes its slices "
                               f"at level 0 only, not {augment:g}; train one with upsample.augment_max above {augment:g} for that.")
    if not 0 <= augment <= cfg.augment_max:
        raise BrainfusionError(f"the augmentation level {augment:g} lies outside the levels this upsampler was trained on, "
                               f"0 to {cfg.augment_max:g}; give one in that range.")
    return augment


def check_cascade(base: RunConfig, upsampler: RunConfig, base_name: str, upsampler_name: str) -> None:
    """Refuse a cascade that cannot work: the upsampler must be one, trained from the base's image size, and the base a
    pixel run that makes image-only slices."""
    if not upsampler.upsample.active:
        raise BrainfusionError(f"{upsampler_name} is not an upsampler; train one with upsample.from_size={base.data.image_size}.")
    if base.latent.active or base.upsample.active:
        raise BrainfusionError(f"{base_name} is {'a latent' if base.latent.active else 'an upsampler'} run; a cascade starts "
                               "from a pixel run that generates slices, such as the default 64² model.")
    if base.mask_labels:
        raise BrainfusionError(f"{base_name} draws tissue masks, which the upsampler does not bring up yet; use an image-only run.")
    if upsampler.upsample.from_size != base.data.image_size:
        raise BrainfusionError(f"{upsampler_name} brings {upsampler.upsample.from_size}² slices to {upsampler.data.image_size}², "
                               f"but {base_name} makes {base.data.image_size}² slices; train the upsampler with upsample.from_size "
                               f"{base.data.image_size}, or use a base run of {upsampler.upsample.from_size}².")
