"""One level of the orthonormal 3-D Haar wavelet transform, the space a volume run diffuses in.

WDM (Friedrich et al. 2024, "WDM: 3D Wavelet Diffusion Models for High-Resolution Medical Image Synthesis")
runs the diffusion model on wavelet coefficients instead of voxels: one level turns a D×H×W volume into 8
bands of (D/2)×(H/2)×(W/2), so the network works at half the side (an eighth of the positions) while the
transform loses nothing, and the low band already holds the brain's layout. The orthonormal transform
keeps white noise white: Gaussian noise on the coefficients is Gaussian noise of the same σ on the voxels.

`haar3d` and `inverse_haar3d` are that transform and its exact inverse (orthonormal: the inverse is the
transpose). `to_coefficients` and `from_coefficients` add one fixed scale: the low band is divided by 2√2,
which makes it the 2×2×2 block mean, in [-1, 1] like the voxels, so EDM's σ_data = 0.5 and the pixel
recipe's noise levels suit it; the seven detail bands are left as they are (differences, near 0).
"""

from __future__ import annotations

import math

import torch

LOW_BAND_SCALE = 2 * math.sqrt(2)  # the low band of a constant volume v is 2√2·v


def _haar_matrix(like: torch.Tensor) -> torch.Tensor:
    """The 2-point orthonormal Haar matrix [[1, 1], [1, −1]]/√2: symmetric and its own inverse."""
    return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=like.dtype, device=like.device) / math.sqrt(2)


def haar3d(x: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) with even sides → (N, 8·C, D/2, H/2, W/2). Channel b·C + c is band b of channel c, with
    b = 4·(depth band) + 2·(height band) + (width band), 0 the low-pass and 1 the high-pass half: band 0 is the low band."""
    n, c, d, h, w = x.shape
    if d % 2 or h % 2 or w % 2:
        raise ValueError(f"the volume's sides {d}×{h}×{w} must be even for one Haar level")
    m = _haar_matrix(x)
    blocks = x.reshape(n, c, d // 2, 2, h // 2, 2, w // 2, 2)
    y = torch.einsum("ncdihjwk,ai,bj,ek->nabecdhw", blocks, m, m, m)
    return y.reshape(n, 8 * c, d // 2, h // 2, w // 2)


def inverse_haar3d(y: torch.Tensor) -> torch.Tensor:
    """The exact inverse of `haar3d` (the same matrix, which is its own inverse): (N, 8·C, d, h, w) → (N, C, 2d, 2h, 2w)."""
    n, bc, d, h, w = y.shape
    if bc % 8:
        raise ValueError(f"{bc} channels are not 8 Haar bands per channel")
    m = _haar_matrix(y)
    bands = y.reshape(n, 2, 2, 2, bc // 8, d, h, w)
    x = torch.einsum("nabecdhw,ai,bj,ek->ncdihjwk", bands, m, m, m)
    return x.reshape(n, bc // 8, 2 * d, 2 * h, 2 * w)


def to_coefficients(volumes: torch.Tensor, detail_scale: float = 1.0) -> torch.Tensor:
    """Volumes in [-1, 1] (N, 1, D, H, W) → the network's channels: the Haar bands, the low band as block means, the
    detail bands times `detail_scale` (diffusion.wavelet_detail_scale)."""
    y = haar3d(volumes)
    return torch.cat([y[:, :1] / LOW_BAND_SCALE, y[:, 1:] * detail_scale], 1)


def from_coefficients(coefficients: torch.Tensor, detail_scale: float = 1.0) -> torch.Tensor:
    """The inverse of `to_coefficients`: the network's 8 channels → volumes (N, 1, D, H, W)."""
    return inverse_haar3d(torch.cat([coefficients[:, :1] * LOW_BAND_SCALE, coefficients[:, 1:] / detail_scale], 1))
