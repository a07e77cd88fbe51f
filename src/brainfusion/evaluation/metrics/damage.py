"""Controlled damage to uint8 image stacks, for checking that the metrics respond (sanity checks).

Each function keeps the array shape and dtype and is deterministic given `seed`; `strength`
grows with the damage.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each image with `sigma` pixels (at the images' own resolution)."""
    x = images.astype(np.float32)
    out = gaussian_filter(x, sigma=(0, sigma, sigma), mode="nearest")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def noise(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    """Additive Gaussian noise with standard deviation `sigma` as a fraction of 255 (clipped)."""
    rng = np.random.default_rng(seed)
    x = images.astype(np.float32) + rng.standard_normal(images.shape, dtype=np.float32) * (sigma * 255.0)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def patch_shuffle(images: np.ndarray, fraction: float, patch: int | None = None, seed: int = 2) -> np.ndarray:
    """Permute a `fraction` of the non-overlapping square patches of each image among themselves.

    `patch` defaults to 1/8 of the image side (an 8x8 grid of patches). Pixels outside a whole
    number of patches are left in place.
    """
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    p = patch or max(1, min(h, w) // 8)
    gh, gw = h // p, w // p
    out = images.copy()
    core = out[:, : gh * p, : gw * p].reshape(n, gh, p, gw, p).transpose(0, 1, 3, 2, 4).reshape(n, gh * gw, p, p)
    k = int(round(fraction * gh * gw))
    if k >= 2:
        for i in range(n):
            sel = rng.choice(gh * gw, k, replace=False)
            core[i, sel] = core[i, rng.permutation(sel)]
    out[:, : gh * p, : gw * p] = core.reshape(n, gh, gw, p, p).transpose(0, 1, 3, 2, 4).reshape(n, gh * p, gw * p)
    return out


DAMAGES = {
    "blur": (blur, (0.5, 1.0, 2.0)),  # sigma in pixels at 64x64
    "noise": (noise, (0.02, 0.05, 0.10)),  # sigma as a fraction of the grey range
    "shuffle": (patch_shuffle, (0.1, 0.3, 1.0)),  # fraction of the 8x8 grid of patches permuted
}
