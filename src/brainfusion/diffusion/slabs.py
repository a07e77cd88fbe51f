"""Volumes a slab at a time from the slice U-Net (config.SlabConfig), the default volume route.

cDPM (Peng et al. 2023) makes brain MRI volumes with a 2-D diffusion model that generates a few slices at a time,
given the slices made before them. Here a slab is `size` axial slices; the network reads the `context` slices below
it clean, as channels in front (the way an upsampler reads its low-resolution slice, diffusion/upsample.py), and the
slab's place in the volume as one continuous input after any condition's values. Below the first slice the context
is background (-1); with `context_noise` it is noised, in training and sampling alike. A training batch takes one
slab from each volume, at a start drawn for the global batch from the step's own generator; sampling climbs the
volume inferior to superior, each slab on noise of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import DiffusionConfig, SlabConfig
from ..seeding import derive_seed, image_generators, randn
from .process import sample


def slab_position(start: torch.Tensor | float, grid: int, size: int) -> torch.Tensor:
    """A slab's place in the volume (N, 1): 0 for the bottom slab, 1 for the top one."""
    return (torch.as_tensor(start, dtype=torch.float32) / max(grid - size, 1)).reshape(-1, 1)


def with_position(cond: torch.Tensor | None, position: torch.Tensor) -> torch.Tensor:
    """The network's condition row: any condition's columns, then the slab's place."""
    position = position.expand(len(cond) if cond is not None else len(position), 1)
    return position if cond is None else torch.cat([cond.float(), position.to(cond.device)], 1)


def training_slabs(volumes: torch.Tensor, cond: torch.Tensor | None, cfg: SlabConfig, generator: torch.Generator,
                   rows: slice, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's `rows` of a global batch of `batch` volumes (N, 1, D, H, W) as slabs with their context in
    front (N, context + size, H, W), and the condition rows with each slab's place; the starts are drawn for the
    global batch from `generator`, so the slabs are the same in any process count and on resume."""
    grid, shape = volumes.shape[2], volumes.shape[-2:]
    starts = torch.randint(0, grid - cfg.size + 1, (batch,), generator=generator)[rows]
    noise = torch.randn((batch, cfg.context) + tuple(shape), generator=generator)[rows] if cfg.context_noise else None
    padded = F.pad(volumes[:, 0].float(), (0, 0, 0, 0, cfg.context, 0), value=-1.0)
    depth = starts.view(-1, 1) + torch.arange(cfg.context + cfg.size).view(1, -1)
    slabs = padded[torch.arange(len(volumes)).view(-1, 1), depth]
    if noise is not None:
        slabs[:, : cfg.context] += cfg.context_noise * noise
    return slabs.to(volumes.dtype), with_position(cond, slab_position(starts, grid, cfg.size))


def slab_volumes(network: Callable, diffusion: DiffusionConfig, cfg: SlabConfig, grid: int, seed: int, indices: range,
                 sampler: str, steps: int, cond: torch.Tensor | None = None, guidance: float = 1.0,
                 progress: Callable | None = None) -> torch.Tensor:
    """Volumes `indices` of `seed` (N, 1, grid, grid, grid) in [-1, 1], made slab by slab from the bottom up; slab j
    of volume i is drawn from image_generators(derive_seed(seed, 4, j), [i]), so a volume is the same in any batch."""
    n, context, size = len(indices), cfg.context, cfg.size
    volumes = torch.full((n, context + grid, grid, grid), -1.0)
    for j, start in enumerate(range(0, grid, size)):
        known = volumes[:, start : start + context] if context else None
        if known is not None and cfg.context_noise:  # the context noised as in training, from each volume's own stream
            known = known + cfg.context_noise * randn(tuple(known.shape), image_generators(derive_seed(seed, 5, j), indices))
        x, _ = sample(network, diffusion, (n, context + size, grid, grid), sampler, steps,
                      image_generators(derive_seed(seed, 4, j), indices), progress=progress,
                      cond=with_position(cond, slab_position(start, grid, size)), guidance=guidance, clamp=True,
                      known=known, known_clean=True, known_first=True)
        volumes[:, context + start : context + start + size] = x[:, context:]
    return volumes[:, None, context:]
