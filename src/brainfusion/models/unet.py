"""The seed's U-Net: ResNet encoder blocks with skip outputs, a ResNet bottleneck, decoder blocks
that fuse the skips, sinusoidal time embeddings through an MLP, and a normalised 1×1-conv output.

One level per `channel_mults` entry, each halving the resolution (the default four at patch size 2:
32 → 16 → 8 → 4 → bottleneck at 2 for 64×64 input).
Attention runs only at the low resolutions named in the config, where it is cheap.

`ModelConfig.spatial_dims` 3 builds the same network from 3-D convolutions, for volumes (a volume run's
Haar wavelet coefficients, diffusion/wavelet.py): one code path, so conditions, guidance and checkpoints
work alike, and a 2-D network keeps its parameter names.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import BrainfusionError


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def make_norm(kind: str, channels: int, groups: int, dims: int = 2) -> nn.Module:
    return nn.GroupNorm(groups, channels) if kind == "group" else (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)


def _spatial(t: torch.Tensor, dims: int) -> torch.Tensor:
    """(N, C) → (N, C, 1, …, 1) with one axis per spatial dimension, to broadcast over an image or a volume."""
    return t.view(t.shape + (1,) * dims)


class ResBlock(nn.Module):
    """Pre-activation ResNet unit; the time embedding shifts and scales the second norm."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, cfg: ModelConfig):
        super().__init__()
        conv, self.dims = CONV[cfg.spatial_dims], cfg.spatial_dims
        self.norm1 = make_norm(cfg.norm, c_in, cfg.norm_groups, self.dims)
        self.conv1 = conv(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, 2 * c_out)
        self.norm2 = make_norm(cfg.norm, c_out, cfg.norm_groups, self.dims)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = conv(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = _spatial(self.time(t_emb), self.dims).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels (or voxels), used at low resolutions only."""

    def __init__(self, channels: int, heads: int, cfg: ModelConfig):
        super().__init__()
        self.heads = heads
        self.norm = make_norm(cfg.norm, channels, cfg.norm_groups, cfg.spatial_dims)
        self.qkv = CONV[cfg.spatial_dims](channels, 3 * channels, 1)
        self.out = CONV[cfg.spatial_dims](channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *space = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1).transpose(-1, -2).unbind(1)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, *space))


class EncoderBlock(nn.Module):
    """ResNet units at one resolution; returns the skip output and the downsampled features."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, use_attention: bool, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(c_in if i == 0 else c_out, c_out, t_dim, cfg) for i in range(cfg.blocks_per_level)
        )
        self.attention = SelfAttention(c_out, cfg.attention_heads, cfg) if use_attention else nn.Identity()
        self.down = CONV[cfg.spatial_dims](c_out, c_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x = block(x, t_emb)
        skip = self.attention(x)
        return skip, self.down(skip)


class DecoderBlock(nn.Module):
    """Upsample, concatenate the encoder's skip output, then ResNet units."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, t_dim: int, use_attention: bool, cfg: ModelConfig):
        super().__init__()
        self.up = CONV[cfg.spatial_dims](c_in, c_in, 3, padding=1)
        self.blocks = nn.ModuleList(
            ResBlock(c_in + c_skip if i == 0 else c_out, c_out, t_dim, cfg) for i in range(cfg.blocks_per_level)
        )
        self.attention = SelfAttention(c_out, cfg.attention_heads, cfg) if use_attention else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = torch.cat([x, skip], dim=1)
        for block in self.blocks:
            x = block(x, t_emb)
        return self.attention(x)


class ConditionEmbedding(nn.Module):
    """Conditions → one vector added to the time embedding, as class labels enter ADM's U-Net.

    `cond` is (N, K) float: the first len(class_counts) columns hold class indices, the rest
    normalised continuous values; NaN means unknown or dropped (conditions.NULL). A categorical
    condition is an `nn.Embedding(n + 1)` whose last row is its null token; a continuous one a
    small MLP of the value, with a learned null vector in its place. Classifier-free guidance (Ho &
    Salimans 2022) needs exactly this: the same network, with every condition null, is the
    unconditional model. Last layers start at zero, so a new conditional network starts unconditional.
    """

    def __init__(self, class_counts: tuple[int, ...], continuous: int, dim: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n + 1, dim) for n in class_counts)
        for table in self.tables:
            nn.init.zeros_(table.weight)
        self.values = nn.ModuleList(nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim)) for _ in range(continuous))
        for mlp in self.values:
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
        self.value_null = nn.Parameter(torch.zeros(continuous, dim))
        self.width = len(class_counts) + continuous

    def forward(self, cond: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        if cond is None:  # no condition given: the unconditional model
            cond = torch.full((n, self.width), float("nan"), device=device)
        if cond.dim() != 2 or cond.shape[1] != self.width:
            raise BrainfusionError(
                f"the condition tensor has shape {tuple(cond.shape)}; this network takes (N, {self.width}), "
                "encode conditions with conditions.encode_request."
            )
        cond = cond.to(device, torch.float32)
        known = ~cond.isnan()
        values = torch.where(known, cond, 0.0)  # no NaN reaches a layer, so none reaches a gradient
        out = 0.0
        for j, table in enumerate(self.tables):
            null = table.num_embeddings - 1
            out = out + table(torch.where(known[:, j], values[:, j].long(), null))
        offset = len(self.tables)
        for j, mlp in enumerate(self.values):
            embedded = mlp(values[:, offset + j, None])
            out = out + torch.where(known[:, offset + j, None], embedded, self.value_null[j])
        return out


class UNet(nn.Module):
    """Noise (or v, or EDM's F) predictor of (x_t, t, cond) for slices of `in_channels` channels.

    A self-conditioned network (config.self_condition) reads x_t with its previous estimate stacked behind
    it (`input_channels`) and still predicts `in_channels`.

    `cond` carries the conditions (labels, slice level; `ConditionEmbedding`) of a network whose
    config has `class_counts` or `continuous_inputs`; an unconditional network takes none.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        c0 = cfg.base_channels
        widths = [c0 * m for m in cfg.channel_mults]
        t_dim = 4 * c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        conv = CONV[cfg.spatial_dims]
        k = cfg.pixel_channels if cfg.patch_size > 1 else 0
        pixels = (k or cfg.in_channels) * cfg.patch_size**2
        self.pixel_in = nn.Conv2d(cfg.input_channels, k, 3, padding=1) if k else nn.Identity()
        self.pixel_out = nn.Sequential(nn.SiLU(), nn.Conv2d(k, cfg.in_channels, 3, padding=1)) if k else nn.Identity()
        self.stem = conv((k or cfg.input_channels) * cfg.patch_size**2, c0, 3, padding=1)
        resolutions = [cfg.image_size // cfg.patch_size >> i for i in range(len(widths))]
        self.encoder = nn.ModuleList()
        c_prev = c0
        for width, res in zip(widths, resolutions):
            self.encoder.append(EncoderBlock(c_prev, width, t_dim, res in cfg.attention_resolutions, cfg))
            c_prev = width
        self.bottleneck = nn.ModuleList([ResBlock(c_prev, c_prev, t_dim, cfg), ResBlock(c_prev, c_prev, t_dim, cfg)])
        use_attention = bool(cfg.attention_resolutions)  # the bottleneck is the lowest resolution of all
        self.bottleneck_attention = SelfAttention(c_prev, cfg.attention_heads, cfg) if use_attention else nn.Identity()
        self.decoder = nn.ModuleList()
        for width, res in zip(reversed(widths), reversed(resolutions)):
            self.decoder.append(DecoderBlock(c_prev, width, width, t_dim, res in cfg.attention_resolutions, cfg))
            c_prev = width
        self.out_norm = make_norm(cfg.norm, c_prev, cfg.norm_groups, cfg.spatial_dims)
        self.out = conv(c_prev, pixels, 1)
        # built last, and only for a conditional config: an unconditional network keeps its parameters and outputs
        conditional = bool(cfg.class_counts or cfg.continuous_inputs)
        self.condition = ConditionEmbedding(cfg.class_counts, cfg.continuous_inputs, t_dim) if conditional else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None and self.condition is None:
            raise BrainfusionError("this network was built without condition inputs; sample it with no condition.")
        t_emb = self.time_mlp(sinusoidal_embedding(t, self.config.base_channels))
        if self.condition is not None:
            t_emb = t_emb + self.condition(cond, x.shape[0], x.device)
        p = self.config.patch_size
        h = self.stem(F.pixel_unshuffle(self.pixel_in(x), p) if p > 1 else x)
        skips = []
        for block in self.encoder:
            skip, h = block(h, t_emb)
            skips.append(skip)
        h = self.bottleneck[0](h, t_emb)
        h = self.bottleneck_attention(h)
        h = self.bottleneck[1](h, t_emb)
        for block in self.decoder:
            h = block(h, skips.pop(), t_emb)
        out = self.out(F.silu(self.out_norm(h)))
        return self.pixel_out(F.pixel_shuffle(out, p)) if p > 1 else out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops_per_image(model: nn.Module, image_size: int, in_channels: int = 1) -> float:
    """Forward+backward FLOPs for one image (a volume, for a 3-D network), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    # a copy on the meta device: shapes only, so it costs no compute and leaves BatchNorm statistics alone
    probe = copy.deepcopy(model).to("meta").train()
    x = torch.randn((2, in_channels) + (image_size,) * getattr(model, "config", ModelConfig()).spatial_dims, device="meta")
    t = torch.tensor([10, 500], device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        probe(x, t).square().mean().backward()
    return counter.get_total_flops() / 2
