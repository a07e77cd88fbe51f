"""Nearest-training-image search for the memorisation check.

Each query image is flattened and normalised to zero mean and unit L2 norm, so the L2 distance
between two images is sqrt(2 - 2 r), with r their Pearson correlation, and the nearest neighbour by
L2 is the one with the largest dot product: one batched matrix multiply against the whole training
set. The top-k of those candidates are then re-ranked by SSIM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .distances import ssim


def normalised_rows(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N,1,H,W] -> [N,H*W], each row zero-mean and unit-norm (a constant image becomes all zeros)."""
    f = x.flatten(1).double()
    f = f - f.mean(1, keepdim=True)
    n = f.norm(dim=1, keepdim=True)
    return (f / n.clamp_min(1e-12)).to(dtype)


@dataclass
class NearestResult:
    l2_index: np.ndarray  # nearest train index by normalised L2 (= highest Pearson correlation)
    l2: np.ndarray  # its normalised L2 distance (0..2); correlation = 1 - l2**2 / 2
    l2_nearest_ssim: np.ndarray  # SSIM between the query and that L2-nearest image
    ssim_index: np.ndarray  # best train index by SSIM among the top-k L2 candidates
    ssim: np.ndarray  # its SSIM


@torch.inference_mode()
def nearest_train(query: torch.Tensor, train: torch.Tensor, top_k: int = 8, chunk: int = 512, train_rows: torch.Tensor | None = None) -> NearestResult:
    t = normalised_rows(train) if train_rows is None else train_rows
    k = min(top_k, len(train))
    l2_idx, l2_val, l2_ssim, s_idx, s_val = [], [], [], [], []
    for s in range(0, len(query), chunk):
        q = query[s : s + chunk]
        cos = normalised_rows(q) @ t.T
        top_cos, top_idx = cos.topk(k, dim=1)
        l2_idx.append(top_idx[:, 0])
        # exact distance to the top-1 candidate in float64 (2 - 2cos in float32 loses ~1e-3 near 0)
        qn = normalised_rows(q, torch.float64)
        l2_val.append((qn - normalised_rows(train[top_idx[:, 0]], torch.float64)).norm(dim=1))
        cand = train[top_idx.flatten()]
        rep = q.repeat_interleave(k, dim=0)
        sv = ssim(rep, cand).view(len(q), k)
        l2_ssim.append(sv[:, 0])
        best = sv.argmax(1)
        s_idx.append(top_idx.gather(1, best[:, None])[:, 0])
        s_val.append(sv.gather(1, best[:, None])[:, 0])
    return NearestResult(
        l2_index=torch.cat(l2_idx).numpy(),
        l2=torch.cat(l2_val).numpy(),
        l2_nearest_ssim=torch.cat(l2_ssim).double().numpy(),
        ssim_index=torch.cat(s_idx).numpy(),
        ssim=torch.cat(s_val).double().numpy(),
    )
