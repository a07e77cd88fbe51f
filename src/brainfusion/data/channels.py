"""The model's channels and the arrays people keep: image intensities and tissue label maps, both ways.

A slice is one channel in [-1, 1] (`to_model_range`, `to_uint8`); its tissue labels join it as mask channels
(`label_channels`: K one-hot ones at ±scale, or one ordinal), read back by `labels_from_channels`. Pure tensor
code with no file I/O, shared by training, brainfusion's sampling pipeline and the code an export ships: that
code must load with torch, numpy and diffusers alone, and diffusers imports every package a shipped file names.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BrainfusionError


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 (N,H,W) or (N,C,H,W) → float in [-1, 1] with a channel axis."""
    x = images.float().div(127.5).sub(1.0)
    return x.unsqueeze(1) if x.dim() == 3 else x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-range tensor (N,C,H,W) → uint8 array: (N,H,W) for one channel, else (N,C,H,W)."""
    images = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return images[:, 0] if images.shape[1] == 1 else images


def _on_grid(x: torch.Tensor, grid: int | None) -> torch.Tensor:
    """Label channels average-pooled onto a coarser `grid` (a latent's), each block holding its label shares or mean level."""
    return x if grid is None or grid == x.shape[-1] else torch.nn.functional.avg_pool2d(x, x.shape[-1] // grid)


def one_hot(labels, n_labels: int, scale: float = 1.0, grid: int | None = None):
    """Label indices (N, H, W) → channels (N, K, grid, grid) in the model's range: −scale absent, +scale present;
    label volumes (N, D, H, W) → (N, K, D, H, W) alike.

    A latent run's network works on a coarser grid than its slices (256² slices, 64² latents); there
    each channel is the label's area share of each block (average pooling of the one-hot picture), so
    a tissue boundary inside a block survives as a fraction, which `labels_from_channels` reads back
    sub-block sharp."""
    x = torch.nn.functional.one_hot(labels.long(), n_labels).movedim(-1, 1).float().mul(2).sub(1).mul(scale)
    return _on_grid(x, grid)


def ordinal_level(label, n_labels: int, scale: float = 1.0):
    """Label index k of K (a number or a tensor of them) → its level in the ordinal channel, scale·(2k/(K−1) − 1)."""
    return (label * (2 / (n_labels - 1)) - 1) * scale


def ordinal(labels, n_labels: int, scale: float = 1.0, grid: int | None = None):
    """Label indices (N, H, W) → one channel (N, 1, grid, grid): label k at scale·(2k/(K−1) − 1), evenly from −scale to +scale.

    OASIS's order background < CSF < grey < white matter is the T1 intensity order and the anatomical
    nesting, so this channel is a cartoon of the image itself, where one-hot spreads it over K binary
    channels. On a latent's grid each block holds its mean level, read back sub-block by `labels_from_channels`."""
    x = ordinal_level(labels.float(), n_labels, scale).unsqueeze(1)
    return _on_grid(x, grid)


def label_channels(labels, n_labels: int, scale: float = 1.0, grid: int | None = None, encoding: str = "one-hot"):
    """Label indices → the model's mask channels in `encoding` (`one_hot` or `ordinal`)."""
    return (ordinal if encoding == "ordinal" else one_hot)(labels, n_labels, scale, grid)


def labels_from_channels(channels, size: int, n_labels: int = 0, scale: float = 1.0, encoding: str = "one-hot"):
    """The inverse of `label_channels`: mask channels (N, C, g, g) → uint8 label indices (N, size, size), the channels
    resized bilinearly first where the grid is coarser than the slices (latent runs); one-hot by the largest channel,
    ordinal by the nearest level."""
    if channels.shape[-1] != size:
        channels = torch.nn.functional.interpolate(channels.float(), size=(size, size), mode="bilinear", align_corners=False)
    if encoding == "ordinal":
        level = (channels[:, 0].float() / scale + 1) * (n_labels - 1) / 2
        return level.round().clamp(0, n_labels - 1).to(torch.uint8)
    return channels.argmax(1).to(torch.uint8)


def _fits_uint8(values: tuple[int, ...]) -> bool:
    """Whether label values can be written as themselves in a uint8 mask image (else their indices are)."""
    return min(values) >= 0 and max(values) <= 255


def label_image(labels: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """Label indices → the run's label values as a uint8 image (OASIS: 0/85/170/255), indices where they do not fit 8 bits:
    one function writes `sample`'s seg files and an export's masks."""
    lookup = np.asarray(values if _fits_uint8(values) else range(len(values)), dtype=np.uint8)
    return lookup[labels]


def label_indices(image: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """The inverse of `label_image`: a written mask back to label indices."""
    lookup = np.zeros(256, np.uint8)
    lookup[list(values) if _fits_uint8(values) else list(range(len(values)))] = np.arange(len(values))
    return lookup[image]


def given_mask_channels(mask, n: int, size: int, n_labels: int, scale: float = 1.0, grid: int | None = None,
                        encoding: str = "one-hot"):
    """A given mask (label indices (n, size, size)) as the model's mask channels on its `grid`, after checking it fits the model.
    Shared by brainfusion's sampling pipeline and the exported one, so both refuse the same masks in the same words."""
    if not n_labels:
        raise BrainfusionError("this model was trained without masks; sample it without a given mask.")
    mask = torch.as_tensor(np.asarray(mask)).long()
    if tuple(mask.shape) != (n, size, size) or int(mask.min()) < 0 or int(mask.max()) >= n_labels:
        raise BrainfusionError(
            f"the given masks have shape {tuple(mask.shape)} and labels {int(mask.min())}..{int(mask.max())}; "
            f"this model needs ({n}, {size}, {size}) label indices in 0..{n_labels - 1}."
        )
    return label_channels(mask, n_labels, scale, grid, encoding)
