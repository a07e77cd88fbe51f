"""The autoencoder of latent diffusion: MONAI's `AutoencoderKL` and `PatchDiscriminator`, built from our config.

Why MONAI's and not diffusers' `AutoencoderKL`: at equal widths (32, 64, 64) it trained 1.9 img/s
at 256² on the 2-core development CPU against diffusers' 1.0 (diffusers' decoder has one more
ResNet unit a level and a mid block), and MONAI's 2D brain LDM is the field's reference for this
stage. Both are KL-regularised convolutional autoencoders (Rombach et al. 2022).

Latents are the posterior mean (`encode_mean`); training draws z = μ + σ·n with noise from a
seeded generator, so a resumed run draws what the uninterrupted one did.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import AUTOENCODER, load_checkpoint, load_weights, resolve_checkpoint
from ..config import AutoencoderConfig
from ..errors import BrainfusionError
from ..fileio import file_digest


def autoencoder_arguments(cfg: AutoencoderConfig) -> dict:
    """MONAI AutoencoderKL's constructor arguments for 1-channel slices seen as `patch`² channels, without attention
    (CPU cost; no gain measured at 4x); an export's `vae/config.json` records them, so diffusers rebuilds the network."""
    levels, blocks = len(cfg.channels), cfg.patch**2
    return dict(
        spatial_dims=2, in_channels=blocks, out_channels=blocks, channels=tuple(cfg.channels), latent_channels=cfg.latent_channels,
        num_res_blocks=(cfg.res_blocks,) * levels, norm_num_groups=cfg.norm_groups, attention_levels=(False,) * levels,
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
    )


class PixelBlocks(nn.Module):
    """Space-to-depth around an autoencoder: each p×p block of pixels enters as p² channels and leaves the same way.

    The network then runs at 1/p of the resolution, where a 2-core CPU is fast: with patch 4 and one level of
    64 channels MONAI's AutoencoderKL trains 27 img/s at 256² against 3.6 for three levels (16, 32, 64) on
    the pixels (fwd + bwd, bf16, batch 8); 24.4 img/s in training with its losses (docs/research/latent.md). The idea
    is DC-AE's space-to-channel shortcut (Chen et al. 2024) taken all the way; the blocks are un-shuffled
    exactly, so nothing is lost before the network.
    """

    def __init__(self, inner: nn.Module, patch: int):
        super().__init__()
        self.inner, self.patch = inner, patch

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.encode(F.pixel_unshuffle(x, self.patch))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.inner.decode(z), self.patch)


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    """MONAI AutoencoderKL as `autoencoder_arguments` describes it, inside `PixelBlocks` when it sees pixel blocks."""
    from monai.networks.nets import AutoencoderKL

    ae = AutoencoderKL(**autoencoder_arguments(cfg))
    return PixelBlocks(ae, cfg.patch) if cfg.patch > 1 else ae


def monai_autoencoder(ae: nn.Module) -> nn.Module:
    """The MONAI network inside `ae` (what an export's `vae` holds; it does the pixel blocks itself)."""
    return ae.inner if isinstance(ae, PixelBlocks) else ae


def encoder_modules(ae: nn.Module) -> list[nn.Module]:
    """The parts of an autoencoder that make its latents (posterior mean and σ): frozen in a decoder fine-tune."""
    inner = monai_autoencoder(ae)
    return [inner.encoder, inner.quant_conv_mu, inner.quant_conv_log_sigma]


ARCHITECTURE_KEYS = ("latent_channels", "patch", "channels", "res_blocks", "norm_groups")


def start_from(ae: nn.Module, cfg: AutoencoderConfig, image_size: int, device: torch.device | None = None) -> None:
    """Load the autoencoder run `cfg.decoder_of` into `ae` (a decoder fine-tune's start) and record its SHA-256;
    its network and image size must be this run's."""
    source, state, digest = load_autoencoder(cfg.decoder_of, device)
    theirs = state.config
    for key in ARCHITECTURE_KEYS:
        if getattr(theirs.autoencoder, key) != getattr(cfg, key):
            raise BrainfusionError(f"the autoencoder {cfg.decoder_of} has autoencoder.{key} {getattr(theirs.autoencoder, key)}, but "
                                   f"this decoder fine-tune has {getattr(cfg, key)}; give the same network settings as that run.")
    if theirs.data.image_size != image_size:
        raise BrainfusionError(f"the autoencoder {cfg.decoder_of} was trained at data.image_size {theirs.data.image_size}; "
                               "fine-tune its decoder at that size.")
    ae.load_state_dict(source.state_dict())
    cfg.decoder_of_sha256 = digest


class PixelBlockDiscriminator(nn.Module):
    """A discriminator that sees each p×p pixel block as p² channels (as `PixelBlocks` does for the autoencoder):
    the blocks are un-shuffled exactly, so the pixel-scale detail is all there, at 1/p of the resolution. With
    p = 2 the adversarial phase trains 14.1 img/s at 256² on the 2-core CPU against 7.1 on the pixels."""

    def __init__(self, inner: nn.Module, patch: int):
        super().__init__()
        self.inner, self.patch = inner, patch

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.inner(F.pixel_unshuffle(x, self.patch))


def build_discriminator(cfg: AutoencoderConfig) -> nn.Module:
    """MONAI's PatchGAN discriminator (Isola et al. 2017), as its brain LDM tutorial uses it, on pixels or blocks."""
    from monai.networks.nets import PatchDiscriminator

    disc = PatchDiscriminator(spatial_dims=2, num_layers_d=cfg.disc_layers, channels=cfg.disc_channels,
                              in_channels=cfg.disc_patch**2, out_channels=1)
    return PixelBlockDiscriminator(disc, cfg.disc_patch) if cfg.disc_patch > 1 else disc


def encode_mean(ae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The posterior mean μ(x): the deterministic latent of a slice."""
    return ae.encode(x)[0]


def encode_sample(ae: nn.Module, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z = μ + σ·n with n from `generator` (on the CPU, so every device draws the same), and μ, σ."""
    mu, sigma = ae.encode(x)
    noise = torch.randn(mu.shape, generator=generator).to(mu.device, mu.dtype)
    return mu + sigma * noise, mu, sigma


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over a latent, averaged over the batch."""
    mu, sigma = mu.float(), sigma.float()
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(1).mean()


def load_autoencoder(path: Path | str, device: torch.device | None = None, sha256: str = ""):
    """An autoencoder run's newest checkpoint (or a checkpoint file) in eval mode, its run config and weights digest.

    With `sha256`, the weights must be exactly the ones a latent run recorded: a retrained or swapped
    autoencoder would decode its latents into something else.
    """
    try:
        checkpoint = resolve_checkpoint(Path(path) / "checkpoints" if (Path(path) / "checkpoints").is_dir() else Path(path))
    except BrainfusionError:
        raise BrainfusionError(
            f"the autoencoder {path} has no checkpoint; train one with `brainfusion train-autoencoder` or give its run folder."
        ) from None
    digest = file_digest(checkpoint)
    if sha256 and digest != sha256:
        raise BrainfusionError(
            f"the autoencoder {checkpoint} has changed since this run was trained (SHA-256 {digest[:12]}…, recorded "
            f"{sha256[:12]}…); restore the autoencoder the run was trained with."
        )
    state = load_checkpoint(checkpoint, with_optimizer=False, kind=AUTOENCODER)
    ae = build_autoencoder(state.config.autoencoder)
    load_weights(ae, {k[4:]: v for k, v in state.model.items() if k.startswith("vae.")}, state.path)
    return ae.eval().requires_grad_(False).to(device or torch.device("cpu")), state, digest
