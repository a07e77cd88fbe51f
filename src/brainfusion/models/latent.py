"""Latent diffusion's data side: slices → cached, normalised latents, and latents → slices.

Slices are encoded once (posterior means, each slice and its mirror image) and cached beside the
slice cache, keyed by the autoencoder's SHA-256 and the slices themselves. Each latent channel is
then shifted and scaled to std 0.5 = EDM's σ_data, as EDM2 (Karras et al. 2024) does for its latents,
so the diffusion process and its noise levels see data of the scale they were designed for.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import latest_checkpoint, load_checkpoint
from ..config import RunConfig
from ..data.channels import to_model_range
from ..errors import BrainfusionError
from ..fileio import atomic_output
from .autoencoder import encode_mean, load_autoencoder

log = logging.getLogger(__name__)

LATENT_STD = 0.5  # every latent channel is scaled to this std (EDM's σ_data)


def attach_autoencoder(config: RunConfig, resume: bool, device: torch.device):
    """Load a latent run's autoencoder and record it in `config.latent` (path, SHA-256, sizes); returns it.

    A resumed run must find the very autoencoder it was trained with, and keeps its latent statistics.
    """
    recorded = None
    newest = latest_checkpoint(Path(config.train.out_dir) / "checkpoints") if resume else None
    if newest is not None:
        recorded = load_checkpoint(newest, with_optimizer=False).config.latent
        if not recorded.active:
            raise BrainfusionError(f"{newest} is a pixel-diffusion run; resume it without an autoencoder.")
    ae, state, digest = load_autoencoder(config.latent.autoencoder, device, recorded.sha256 if recorded else "")
    latent, ae_cfg = config.latent, state.config
    latent.sha256, latent.image_size = digest, ae_cfg.data.image_size
    latent.channels, latent.factor = ae_cfg.autoencoder.latent_channels, ae_cfg.autoencoder.factor
    if recorded is not None:
        latent.mean, latent.std = recorded.mean, recorded.std
    config.validate()
    return ae


@torch.no_grad()
def encode_slices(ae: torch.nn.Module, images: np.ndarray, device: torch.device, dtype: torch.dtype | None,
                  batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means of uint8 slices (N, H, W) and of their mirror images, as float32 (N, C, h, w) each."""
    from tqdm.auto import tqdm

    plain, mirrored = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding latents", unit="batch", disable=not progress, leave=False):
        x = to_model_range(torch.from_numpy(images[start : start + batch_size])).to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            plain.append(encode_mean(ae, x).float().cpu().numpy())
            mirrored.append(encode_mean(ae, x.flip(-1)).float().cpu().numpy())
    return np.concatenate(plain), np.concatenate(mirrored)


def cached_latents(config: RunConfig, images: np.ndarray, ae: torch.nn.Module, device: torch.device, dtype: torch.dtype | None,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`encode_slices`, cached once per (autoencoder, slices) in the slice cache's folder (data/cache.py)."""
    from ..data.cache import SOURCE_KEY, cache_dir, source_of

    key = hashlib.sha256(config.latent.sha256.encode() + str(images.shape).encode() + images.tobytes()).hexdigest()[:16]
    path = cache_dir(config.data) / f"latents_{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                plain, mirrored = stored["plain"], stored["mirrored"]
            if len(plain) == len(mirrored) == len(images):
                return plain, mirrored
        except (OSError, ValueError, KeyError):
            pass
        log.warning("latent cache %s is unreadable; encoding again", path)
    plain, mirrored = encode_slices(ae, images, device, dtype, progress=progress)
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, plain=plain, mirrored=mirrored, **{SOURCE_KEY: np.array(source_of(config.data))})
    except OSError as exc:
        log.warning("could not write the latent cache %s (%s); continuing without it", path, exc)
    return plain, mirrored


def fit_statistics(config: RunConfig, latents: np.ndarray) -> None:
    """Per-channel mean and std of the training latents into config.latent (kept if already fitted)."""
    if not config.latent.mean:
        config.latent.mean = tuple(float(v) for v in latents.mean(axis=(0, 2, 3)))
        config.latent.std = tuple(float(v) for v in latents.std(axis=(0, 2, 3)))


def _scale(config: RunConfig, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1)
    mean = torch.tensor(config.latent.mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(config.latent.std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


def normalise(config: RunConfig, latents: np.ndarray) -> np.ndarray:
    """Autoencoder latents → the diffusion model's space (std LATENT_STD per channel)."""
    x = torch.from_numpy(latents)
    mean, std = _scale(config, x)
    return ((x - mean) / std * LATENT_STD).numpy()


def decoding_autoencoder(config: RunConfig) -> tuple[str, str]:
    """The autoencoder run a latent run decodes through and the SHA-256 its weights must have: a decoder fine-tune
    of its autoencoder if one was chosen (`use_decoder`), else the autoencoder itself."""
    latent = config.latent
    return (latent.decoder, latent.decoder_sha256) if latent.decoder else (latent.autoencoder, latent.sha256)


def use_decoder(config: RunConfig, decoder: Path | str) -> None:
    """Decode a latent run through `decoder`, a decoder fine-tune of its autoencoder (autoencoder.decoder_of): its
    encoder is the one the run's latents came from, so the run's latents mean the same to it. Recorded in config.latent."""
    if not config.latent.active:
        raise BrainfusionError(f"{decoder} is an autoencoder, but this is a pixel-diffusion run, which decodes nothing; "
                               "leave out the decoder.")
    _, state, digest = load_autoencoder(decoder)
    source = state.config.autoencoder
    if source.decoder_of_sha256 != config.latent.sha256:
        what = f"a decoder fine-tune of {source.decoder_of}" if source.decoder_of else "an autoencoder trained on its own"
        raise BrainfusionError(f"{decoder} is {what}, not of this run's autoencoder {config.latent.autoencoder}, so it would "
                               f"decode this run's latents into something else; fine-tune one with autoencoder.decoder_of="
                               f"{config.latent.autoencoder}.")
    config.latent.decoder, config.latent.decoder_sha256 = str(decoder), digest


class LatentDecoder:
    """The diffusion model's latents → slices in [-1, 1], through the run's autoencoder."""

    def __init__(self, ae: torch.nn.Module, config: RunConfig, device: torch.device, dtype: torch.dtype | None, batch_size: int = 32):
        self.ae, self.config, self.device, self.dtype, self.batch_size = ae.eval(), config, device, dtype, batch_size

    @classmethod
    def load(cls, config: RunConfig, device: torch.device, dtype: torch.dtype | None) -> "LatentDecoder":
        path, sha256 = decoding_autoencoder(config)
        ae, _, _ = load_autoencoder(path, device, sha256)
        return cls(ae, config, device, dtype)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = _scale(self.config, x.float())
        z = x.float() / LATENT_STD * std + mean
        out = []
        for start in range(0, len(z), self.batch_size):
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                out.append(self.ae.decode(z[start : start + self.batch_size].to(self.device)).float().cpu())
        return torch.cat(out).clamp(-1, 1)
