"""Generate slices in memory from a trained network, as diffusers' `DDPMPipeline` does.

Load a checkpoint once, then call the pipeline for any number of images: it returns uint8 arrays
(N, H, W) and never touches the disk; files are the caller's business (`sample.generate`). Image
i of a seed gets its own noise generator, so it comes out the same in any batch size or process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint, load_weights
from ..config import FAST_SAMPLER, FAST_STEPS, RunConfig
from ..data.conditions import Request, encode_guided_request
from ..data.slices import to_uint8
from ..errors import BrainfusionError
from ..models.latent import LatentDecoder
from ..models.unet import UNet
from ..runtime import choose_channels_last, choose_precision, network_fn
from ..seeding import image_generators
from .process import sample


def load_model(checkpoint: Path, use_ema: bool = True, device: torch.device | None = None):
    """The checkpoint's network (EMA weights by default) in eval mode, and its checkpoint state."""
    state = load_checkpoint(checkpoint, with_optimizer=False)
    model = UNet(state.config.model)
    load_weights(model, state.ema if use_ema and state.ema else state.model, state.path)
    model.eval().to(device or torch.device("cpu"))
    return model, state


class Cancelled(Exception):
    """Raised inside a pipeline call when its `cancel` hook returns True."""


class Pipeline:
    """A trained network with its run config, ready to sample on its device."""

    def __init__(self, model: torch.nn.Module, config: RunConfig, device: torch.device | None = None,
                 precision: str = "auto", channels_last: str = "auto", decoder: LatentDecoder | None = None):
        self.device = device or torch.device("cpu")
        self.dtype = choose_precision(precision, self.device)
        use_cl = choose_channels_last(channels_last, self.device, self.dtype)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last if use_cl else torch.contiguous_format)
        self.config = config
        # (x_t, t[, cond]) → float32 output on the CPU: what samplers and diagnostics call
        self.network = network_fn(self.model, self.device, self.dtype, channels_last)
        # latent runs: the autoencoder's decoder, checked against the SHA-256 the run recorded
        self.decoder = decoder or (LatentDecoder.load(config, self.device, self.dtype) if config.latent.active else None)

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | str, use_ema: bool = True, device: torch.device | None = None,
                        precision: str = "auto") -> "Pipeline":
        model, state = load_model(Path(checkpoint), use_ema, device)
        pipe = cls(model, state.config, device, precision)
        pipe.checkpoint = state.path
        return pipe

    def __call__(self, n: int, seed: int = 0, sampler: str = FAST_SAMPLER, steps: int = FAST_STEPS,
                 batch_size: int = 64, first_index: int = 0, frames: int = 0,
                 on_frames: Callable[[int, list[np.ndarray]], None] | None = None,
                 progress: Callable[[int], None] | None = None, cancel: Callable[[], bool] | None = None,
                 condition: Request | None = None, guidance: float = 1.0) -> np.ndarray:
        """Images first_index .. first_index+n-1 of `seed` as uint8 (n, H, W).

        `condition` (a conditional model only): {name: value} for all n images, e.g.
        {"class": "ModerateDemented", "level": 0.6}, a list of n such dicts, or an encoded (n, K)
        tensor; names left out are not conditioned on, and no condition samples the unconditional
        model. `guidance` is the classifier-free guidance scale s (process.classifier_free_guidance):
        1 plain conditional, 0 unconditional, > 1 stronger. Image i of a seed gets the same noise
        whatever the condition, so a condition's effect can be seen image by image.
        `on_frames(batch_start, frames)` receives `frames` uint8 snapshots of each batch's reverse
        process; `progress(k)` is called after every network step; `cancel()` returning True stops
        the call with `Cancelled`.
        """
        if n <= 0 or batch_size <= 0:
            raise BrainfusionError(f"the image count ({n}) and batch size ({batch_size}) must be positive.")
        cond = encode_guided_request(self.config.condition, condition, n, guidance)
        size, channels = self.config.model.image_size, self.config.model.in_channels

        def tick(k: int) -> None:
            if cancel is not None and cancel():
                raise Cancelled("sampling was cancelled")
            if progress is not None:
                progress(k)

        out = []
        for start in range(first_index, first_index + n, batch_size):
            count = min(batch_size, first_index + n - start)
            gens = image_generators(seed, range(start, start + count))
            rows = None if cond is None else cond[start - first_index : start - first_index + count]
            x, snaps = sample(self.network, self.config.diffusion, (count, channels, size, size), sampler, steps, gens,
                              frames=frames if on_frames else 0, progress=tick, cond=rows, guidance=guidance,
                              clamp=self.decoder is None)
            if self.decoder is not None:
                x, snaps = self.decoder(x), [self.decoder(f) for f in snaps]
            if on_frames is not None:
                on_frames(start, [to_uint8(f.clamp(-1, 1)) for f in snaps])
            out.append(to_uint8(x))
        return np.concatenate(out)
