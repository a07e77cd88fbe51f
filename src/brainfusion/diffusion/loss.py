"""The denoising loss both formulations reduce to, and the per-channel weights of joint image+mask runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_weights(image_channels: int, mask_channels: int, mask_share: float) -> torch.Tensor | None:
    """Weights (1, C, 1, 1) over the channels (mean 1) giving the label channels together `mask_share` of the loss.

    None for 0 (or no masks): every channel alike, so K one-hot channels carry K/(K+1) of it."""
    if not mask_channels or not mask_share:
        return None
    image = torch.full((image_channels,), (1 - mask_share) / image_channels)
    labels = torch.full((mask_channels,), mask_share / mask_channels)
    weights = torch.cat([image, labels])
    return (weights * len(weights)).view(1, -1, 1, 1)


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE or smooth-L1 over every element; with `weight` (broadcastable to the prediction, e.g. (1, C, 1, 1)
    per channel), each error counts `weight` times."""
    if weight is None:
        return F.smooth_l1_loss(prediction, target) if kind == "smooth_l1" else F.mse_loss(prediction, target)
    error = F.smooth_l1_loss(prediction, target, reduction="none") if kind == "smooth_l1" else (prediction - target).square()
    return (error * weight.to(error.device)).mean()
