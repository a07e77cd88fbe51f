"""Volumes a slab at a time from the slice U-Net (config.SlabConfig), the default volume route.

cDPM (Peng et al. 2023) makes brain MRI volumes with a 2-D diffusion model that generates a few slices at a time,
given the slices made before them. Here a slab is `size` axial slices; the network reads the `context` slices below
it clean, as channels in front (the way an upsampler reads its low-resolution slice, diffusion/upsample.py), and the
slab's place in the volume as one continuous input after any condition's values. Below the first slice the context
is background; with `context_noise` it is noised, in training and sampling alike. A training batch takes one
slab from each volume, at a start drawn for the global batch from the step's own generator; sampling climbs the
volume inferior to superior, each slab on noise of its own. Where the run has tissue masks, each slice carries its
label channels after its image (data/channels.py), in the context and the slab alike, so a volume and its labels
are made together (as a slice and its mask are) and each slab's labels continue the ones below. A label model
(diffusion.given_image_share 1, recipe volume-labels) is handed every image slice of its slabs clean as well, and
draws only the labels of volumes another run made: image first, labels after, as for slices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import DiffusionConfig, RunConfig, SlabConfig
from ..data.channels import label_channels
from ..seeding import derive_seed, image_generators, randn
from .process import sample


def slab_position(start: torch.Tensor | float, grid: int, size: int) -> torch.Tensor:
    """A slab's place in the volume (N, 1): 0 for the bottom slab, 1 for the top one."""
    return (torch.as_tensor(start, dtype=torch.float32) / max(grid - size, 1)).reshape(-1, 1)


def background(n_labels: int = 0, scale: float = 1.0, encoding: str = "one-hot") -> torch.Tensor:
    """A volume slice's channels outside the brain (C,): the image at -1 and, with K labels, label 0's channels."""
    labels = label_channels(torch.zeros(1, 1, 1, dtype=torch.long), n_labels, scale, None, encoding).flatten() if n_labels else torch.zeros(0)
    return torch.cat([torch.tensor([-1.0]), labels])


def run_background(config: RunConfig) -> torch.Tensor:
    """`background()` for a run's slices: its image, and its tissue labels where it has masks."""
    return background(config.mask_labels if config.data.volumes else 0, config.diffusion.mask_scale or 1.0, config.diffusion.mask_encoding)


def with_position(cond: torch.Tensor | None, position: torch.Tensor) -> torch.Tensor:
    """The network's condition row: any condition's columns, then the slab's place."""
    position = position.expand(len(cond) if cond is not None else len(position), 1)
    return position if cond is None else torch.cat([cond.float(), position.to(cond.device)], 1)


def training_slabs(volumes: torch.Tensor, cond: torch.Tensor | None, cfg: SlabConfig, generator: torch.Generator,
                   rows: slice, batch: int, outside: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's `rows` of a global batch of `batch` volumes (N, C, D, H, W) as slabs with their context in
    front (N, (context + size)·C, H, W, slice by slice), and the condition rows with each slab's place; `outside` (C,)
    is a slice's channels below the volume (default `background()`). The starts are drawn for the global batch from
    `generator`, so the slabs are the same in any process count and on resume."""
    n, channels, grid, shape = len(volumes), volumes.shape[1], volumes.shape[2], tuple(volumes.shape[-2:])
    starts = torch.randint(0, grid - cfg.size + 1, (batch,), generator=generator)[rows]
    noise = torch.randn((batch, cfg.context * channels) + shape, generator=generator)[rows] if cfg.context_noise else None
    below = (background() if outside is None else outside).view(1, channels, 1, 1, 1).expand(n, channels, cfg.context, *shape)
    padded = torch.cat([below, volumes.float()], 2).transpose(1, 2)  # (N, D + context, C, H, W)
    depth = starts.view(-1, 1) + torch.arange(cfg.context + cfg.size).view(1, -1)
    slabs = padded[torch.arange(n).view(-1, 1), depth].reshape(n, -1, *shape)
    if noise is not None:
        slabs[:, : cfg.context * channels] += cfg.context_noise * noise
    return slabs.to(volumes.dtype), with_position(cond, slab_position(starts, grid, cfg.size))


def images_first(context: int, size: int, channels: int) -> torch.Tensor:
    """A slab's slice-major channels (context + size slices of `channels`) in the order a label model is sampled in:
    the context, the slab's images, then the slab's labels, so every given channel is in front, where `sample`
    fixes them."""
    slab = torch.arange(context * channels, (context + size) * channels).view(size, channels)
    return torch.cat([torch.arange(context * channels), slab[:, 0], slab[:, 1:].flatten()])


def _in_order(network: Callable, order: torch.Tensor) -> Callable:
    """`network` (slice-major channels in and out) as a function of its channels in `order`."""
    back = torch.argsort(order)

    def reordered(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return network(x[:, back], *args, **kwargs)[:, order]

    return reordered


def slab_volumes(network: Callable, diffusion: DiffusionConfig, cfg: SlabConfig, grid: int, seed: int, indices: range,
                 sampler: str, steps: int, cond: torch.Tensor | None = None, guidance: float = 1.0,
                 progress: Callable | None = None, outside: torch.Tensor | None = None,
                 images: torch.Tensor | None = None) -> torch.Tensor:
    """Volumes `indices` of `seed` (N, C, grid, grid, grid) in the model's range, made slab by slab from the bottom
    up, C the channels of a slice (`outside`, default `background()`); slab j of volume i is drawn from
    image_generators(derive_seed(seed, 4, j), [i]), so a volume is the same in any batch. `images` (N, grid, grid,
    grid, model range): a label model's given volumes, each slab's labels drawn for its image slices."""
    outside = background() if outside is None else outside
    n, channels, context, size = len(indices), len(outside), cfg.context, cfg.size
    order = images_first(context, size, channels) if images is not None else None
    net, back = (network, None) if order is None else (_in_order(network, order), torch.argsort(order))
    volumes = outside.view(1, 1, channels, 1, 1).repeat(n, context + grid, 1, grid, grid)  # (N, context + D, C, H, W)
    for j, start in enumerate(range(0, grid, size)):
        known = volumes[:, start : start + context].reshape(n, context * channels, grid, grid) if context else None
        if known is not None and cfg.context_noise:  # the context noised as in training, from each volume's own stream
            known = known + cfg.context_noise * randn(tuple(known.shape), image_generators(derive_seed(seed, 5, j), indices))
        if images is not None:
            given = images[:, start : start + size].float()
            known = given if known is None else torch.cat([known, given], 1)
        x, _ = sample(net, diffusion, (n, (context + size) * channels, grid, grid), sampler, steps,
                      image_generators(derive_seed(seed, 4, j), indices), progress=progress,
                      cond=with_position(cond, slab_position(start, grid, size)), guidance=guidance, clamp=True,
                      known=known, known_clean=True, known_first=True)
        x = x if back is None else x[:, back]
        volumes[:, context + start : context + start + size] = x[:, context * channels :].reshape(n, size, channels, grid, grid)
    return volumes[:, context:].transpose(1, 2)
