"""Generate slices (or, for a volume run, volumes) in memory from a trained network, as diffusers' `DDPMPipeline` does.

Load a checkpoint once, then call the pipeline for any number of images: it returns uint8 arrays
(N, H, W) (`pairs`: with their tissue labels, for a model trained with masks) and never touches the disk; files are the caller's business (`sample.generate`). Image
i of a seed gets its own noise generator, so it comes out the same in any batch size or process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import guide_checkpoint, load_checkpoint, load_weights
from ..config import FAST_SAMPLER, FAST_STEPS, RunConfig
from ..data.conditions import Request, encode_guided_request
from ..data.channels import given_mask_channels, labels_from_channels, to_model_range, to_uint8
from ..data.volumes import tissue_in_one_piece
from ..errors import BrainfusionError
from ..models.latent import LatentDecoder, use_decoder
from ..models.unet import UNet
from ..runtime import choose_channels_last, choose_precision, memory_format, network_fn
from ..seeding import derive_seed, image_generators
from .process import autoguidance, sample
from .slabs import run_background, slab_volumes
from .upsample import check_cascade, sampling_level, upscale_images
from .wavelet import from_coefficients


def load_model(checkpoint: Path, use_ema: bool = True, device: torch.device | None = None):
    """The checkpoint's network (EMA weights by default) in eval mode, and its checkpoint state."""
    state = load_checkpoint(checkpoint, with_optimizer=False)
    model = UNet(state.config.model)
    load_weights(model, state.ema if use_ema and state.ema else state.model, state.path)
    model.eval().to(device or torch.device("cpu"))
    return model, state


class Cancelled(Exception):
    """Raised inside a pipeline call when its `cancel` hook returns True."""


def _ticker(progress: Callable[[int], None] | None, cancel: Callable[[], bool] | None) -> Callable[[int], None]:
    """The per-step hook of a pipeline call: stop with `Cancelled` when `cancel()` says so, else report `progress`."""

    def tick(step: int) -> None:
        if cancel is not None and cancel():
            raise Cancelled("sampling was cancelled")
        if progress is not None:
            progress(step)

    return tick


class Pipeline:
    """A trained network with its run config, ready to sample on its device."""

    def __init__(self, model: torch.nn.Module, config: RunConfig, device: torch.device | None = None,
                 precision: str = "auto", channels_last: str = "auto", decoder: LatentDecoder | None = None):
        self.device = device or torch.device("cpu")
        self.dtype = choose_precision(precision, self.device)
        use_cl = choose_channels_last(channels_last, self.device, self.dtype)
        self.model = model.eval().to(self.device, memory_format=memory_format(use_cl, config.model.spatial_dims))
        self.config = config
        # (x_t, t[, cond]) → float32 output on the CPU: what samplers and diagnostics call
        self.network = network_fn(self.model, self.device, self.dtype, channels_last)
        # latent runs: the autoencoder's decoder, checked against the SHA-256 the run recorded
        self.decoder = decoder or (LatentDecoder.load(config, self.device, self.dtype) if config.latent.active else None)
        self.mask_source: Pipeline | None = None
        self.image_source: Pipeline | None = None
        self.guide: tuple[Pipeline, float] | None = None
        self.upsampler: Pipeline | None = None
        self.upsample_augment: float | None = None
        self.checkpoint: Path | None = None

    def use_mask_source(self, source: "Pipeline") -> "Pipeline":
        """Draw the masks of `pairs` from another pipeline, then this model's images for them: labels first, then
        an image made for them, the order of brainSPADE (Fernandez et al. 2022). Meant for an image model trained
        with every mask given (diffusion.given_mask_share 1) and a joint run as the source."""
        mine, theirs = self.config, source.config
        name = source.checkpoint or "the mask source"
        if not theirs.mask_labels or theirs.images_for_masks_only:
            raise BrainfusionError(f"{name} does not draw masks; a mask source must be a run trained with masks and without "
                                   "every mask given (given_mask_share below 1).")
        if not mine.mask_labels:
            raise BrainfusionError(f"{self.checkpoint or 'this model'} was trained without masks, so it cannot make images "
                                   "for a mask source's masks.")
        if theirs.data.mask_values != mine.data.mask_values or theirs.data.image_size != mine.data.image_size:
            raise BrainfusionError(f"{name} draws {theirs.data.image_size}² masks with values {list(theirs.data.mask_values)}, "
                                   f"but this model was trained on {mine.data.image_size}² masks with values "
                                   f"{list(mine.data.mask_values)}; use a mask source trained on the same labels and size.")
        self.mask_source = source
        return self

    def use_image_source(self, source: "Pipeline") -> "Pipeline":
        """Draw the images of `pairs` from another pipeline, then this model's labels for them: the image first, as an
        image-only model makes it, then its tissue labels, p(image)·p(labels | image). Meant for a label model trained
        with every image given (diffusion.given_image_share 1) and an image-only run of the same size as the source;
        diffusion segmentation (Wolleb et al. 2022) hands a network the image beside the noisy labels alike."""
        mine, theirs = self.config, source.config
        name = source.checkpoint or "the image source"
        if not mine.masks_for_images_only:
            raise BrainfusionError(f"{self.checkpoint or 'this model'} was not trained with every image given "
                                   "(given_image_share 1), so it draws no labels for another model's images.")
        if mine.data.volumes:
            grid = (mine.data.grid, mine.data.spacing)
            if not theirs.data.volumes or theirs.mask_labels or (theirs.data.grid, theirs.data.spacing) != grid:
                raise BrainfusionError(f"{name} must be an image-only volume run on {grid[0]}³ voxels of {grid[1]:g} mm to "
                                       "serve as the image source; use a run trained with --volumes, without --masks, on that grid.")
        elif theirs.mask_labels or theirs.latent.active or theirs.data.image_size != mine.data.image_size:
            raise BrainfusionError(f"{name} must be an image-only pixel run at {mine.data.image_size}² to serve as the image "
                                   "source; use a run trained without --masks and without --autoencoder at that size.")
        self.image_source = source
        return self

    def use_upsampler(self, upsampler: "Pipeline", augment: float | None = None) -> "Pipeline":
        """Bring every image this pipeline makes to the upsampler's size through it: a cascade (Ho et al. 2022), this
        model's realism at its own size, the upsampler's learnt detail above it. The upsampler must be trained from
        this model's image size (upsample.from_size), and this model must make pixel slices. `augment`: the noise
        level its low-resolution slices are given at (`upscale`; default the upsampler's upsample.augment)."""
        check_cascade(self.config, upsampler.config, str(self.checkpoint or "this model"), str(upsampler.checkpoint or "the upsampler"))
        sampling_level(upsampler.config.upsample, augment)
        self.upsampler, self.upsample_augment = upsampler, augment
        return self

    def upscale(self, low: np.ndarray, seed: int = 0, sampler: str = FAST_SAMPLER, steps: int = FAST_STEPS,
                batch_size: int = 64, first_index: int = 0, augment: float | None = None,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
        """An upsampler's slices for low-resolution ones (uint8 (n, h, w) at upsample.from_size): uint8 (n, H, W).

        `augment` is the noise level the low-resolution slices are given at (default upsample.augment): higher
        trusts them less, so a base model's slightly-off slices are not copied up. Image i of `seed` gets its own
        noise, as in `__call__`, and its augmentation noise from a second stream of its own."""
        up = self.config.upsample
        small, size = up.from_size, self.config.data.image_size
        if not up.active:
            raise BrainfusionError(f"{self.checkpoint or 'this model'} is not an upsampler (upsample.from_size is 0).")
        if np.ndim(low) != 3 or np.shape(low)[1:] != (small, small):
            raise BrainfusionError(f"the slices to upscale have shape {np.shape(low)}; this upsampler takes {small}×{small} "
                                   f"slices, (n, {small}, {small}) uint8, and makes {size}×{size} ones.")
        level = sampling_level(up, augment)
        network = self._guided_network()
        out = []
        for start in range(first_index, first_index + len(low), batch_size):
            rows = slice(start - first_index, min(start - first_index + batch_size, len(low)))
            indices = range(start, start + rows.stop - rows.start)
            out.append(to_uint8(upscale_images(network, self.config.diffusion, up, low[rows], level, size, seed, indices, sampler,
                                               steps, progress)))
        return np.concatenate(out)

    def use_guide(self, guide: "Pipeline", weight: float) -> "Pipeline":
        """Sample with autoguidance (process.autoguidance): `guide` is a worse version of this model, usually an
        earlier checkpoint of the same run, and `weight` w > 1 moves each step away from its errors. The guide
        must read and write the same channels at the same noise levels: same diffusion settings, size,
        channels, conditions, labels and autoencoder; its widths and depth may differ."""
        if weight < 0:
            raise BrainfusionError(f"the autoguidance weight must be 0 or more (1: none, 2: typical), got {weight}.")
        mine, theirs = self.config, guide.config
        for key, a, b in (("model.image_size", mine.model.image_size, theirs.model.image_size),
                          ("model.in_channels", mine.model.in_channels, theirs.model.in_channels),
                          ("model.class_counts", mine.model.class_counts, theirs.model.class_counts),
                          ("model.continuous_inputs", mine.model.continuous_inputs, theirs.model.continuous_inputs),
                          ("data.mask_values", mine.data.mask_values, theirs.data.mask_values),
                          ("latent.sha256", mine.latent.sha256, theirs.latent.sha256),
                          ("diffusion", mine.diffusion, theirs.diffusion)):
            if a != b:
                raise BrainfusionError(f"the guide {guide.checkpoint or 'model'} has {key} {b}, but {self.checkpoint or 'this model'} "
                                       f"has {a}; guide with an earlier checkpoint of the same run.")
        self.guide = (guide, weight)
        return self

    def use_kept_guide(self, weight: float, guide: Path | str | None = None, use_ema: bool = True,
                       precision: str = "auto") -> "Pipeline":
        """`use_guide` with a checkpoint loaded onto this pipeline's device: `guide`, or by default the one this
        model's run kept at train.guide_at of its budget (checkpoint.guide_checkpoint)."""
        if self.checkpoint is None and guide is None:
            raise BrainfusionError("this model was not loaded from a run, so it has no kept guide; give the guide's checkpoint.")
        path = Path(guide) if guide else guide_checkpoint(self.checkpoint)
        return self.use_guide(Pipeline.from_checkpoint(path, use_ema, self.device, precision), weight)

    def use_kept_guides(self, weight: float, guide: Path | str | None = None, use_ema: bool = True,
                        precision: str = "auto") -> "Pipeline":
        """`use_kept_guide` on this model (by `guide` if given) and on every stage that draws anatomy for it (its mask
        and image sources), each by its own run's kept guide, as `sample --autoguidance` guides. A cascade's upsampler
        stays unguided, as the export leaves it: guiding it cost 3.9 FID at 256² where guiding the 64² model gained
        6.8 (docs/results.md)."""
        self.use_kept_guide(weight, guide, use_ema, precision)
        for source in (self.mask_source, self.image_source):
            if source is not None:
                source.use_kept_guide(weight, None, use_ema, precision)
        return self

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | str, use_ema: bool = True, device: torch.device | None = None,
                        precision: str = "auto", decoder: Path | str | None = None) -> "Pipeline":
        """A run's network; a latent run decodes through its autoencoder or `decoder`, a decoder fine-tune of it."""
        model, state = load_model(Path(checkpoint), use_ema, device)
        if decoder:
            use_decoder(state.config, decoder)
        pipe = cls(model, state.config, device, precision)
        pipe.checkpoint = state.path
        return pipe

    def __call__(self, n: int, seed: int = 0, sampler: str = FAST_SAMPLER, steps: int = FAST_STEPS,
                 batch_size: int = 64, first_index: int = 0, frames: int = 0,
                 on_frames: Callable[[int, list[np.ndarray]], None] | None = None,
                 progress: Callable[[int], None] | None = None, cancel: Callable[[], bool] | None = None,
                 condition: Request | None = None, guidance: float = 1.0, mask: np.ndarray | None = None) -> np.ndarray:
        """Images first_index .. first_index+n-1 of `seed` as uint8 (n, H, W); a volume run's volumes as uint8 (n, D, H, W)
        (`volumes`).

        `condition` (a conditional model only): {name: value} for all n images, e.g.
        {"class": "ModerateDemented", "level": 0.6}, a list of n such dicts, or an encoded (n, K)
        tensor; names left out are not conditioned on, and no condition samples the unconditional
        model. `guidance` is the classifier-free guidance scale s (process.classifier_free_guidance):
        1 plain conditional, 0 unconditional, > 1 stronger. Image i of a seed gets the same noise
        whatever the condition, so a condition's effect can be seen image by image.
        `mask` (a model trained with masks): label indices (n, H, W) the images are generated to fit; they
        come back as the images' labels.
        `on_frames(batch_start, frames)` receives `frames` uint8 snapshots of each batch's reverse
        process (x_t from the starting noise on; latent runs: the decoded denoised estimate);
        `progress(k)` is called after every network step; `cancel()` returning True stops the call
        with `Cancelled`.
        """
        if self.config.data.volumes:
            if frames or mask is not None:
                raise BrainfusionError(f"{self.checkpoint or 'this model'} makes volumes, which take no frames or masks.")
            return self.volumes(n, seed, sampler, steps, batch_size, first_index, progress, cancel, condition, guidance)
        return self.pairs(n, seed, sampler, steps, batch_size, first_index, frames, on_frames, progress, cancel,
                          condition, guidance, mask)[0]

    def volumes(self, n: int, seed: int = 0, sampler: str = FAST_SAMPLER, steps: int = FAST_STEPS, batch_size: int = 4,
                first_index: int = 0, progress: Callable[[int], None] | None = None, cancel: Callable[[], bool] | None = None,
                condition: Request | None = None, guidance: float = 1.0) -> np.ndarray:
        """Volumes first_index .. first_index+n-1 of `seed` of a volume run (data.volumes) as uint8 (n, D, H, W), in
        (inferior→superior, posterior→anterior, left→right) voxel order on the run's grid (data/volumes.py: its
        `grid_affine` places them in mm). A slab run (config.SlabConfig, the default) draws them with the slice U-Net
        a slab at a time, bottom up (diffusion/slabs.py); a wavelet run draws their Haar coefficients
        (diffusion/wavelet.py) with the EDM samplers unchanged. Volume i of a seed gets its own noise, and
        `condition`, `guidance`, `progress` and `cancel` mean what they mean for `__call__`. With the default sampler
        (dpm++sde, 25 steps) on 2 cores of an Intel Xeon with AMX (bf16, one thread, the cores shared), a 64³ volume
        took 5.6 s from the volume-slabs recipe (16 slabs) and 1.5 s from volume-wavelet.
        """
        return self.volume_pairs(n, seed, sampler, steps, batch_size, first_index, progress, cancel, condition, guidance)[0]

    def volume_pairs(self, n: int, seed: int = 0, sampler: str = FAST_SAMPLER, steps: int = FAST_STEPS, batch_size: int = 4,
                     first_index: int = 0, progress: Callable[[int], None] | None = None, cancel: Callable[[], bool] | None = None,
                     condition: Request | None = None, guidance: float = 1.0,
                     images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """As `volumes`, and each volume's tissue labels (uint8 (n, D, H, W) indices into the run's data.mask_values,
        made with it slab by slab; None for a run trained without masks), as `pairs` is to `__call__`. A label model
        (recipe volume-labels) labels `images` (uint8 (n, D, H, W) on its grid) or its image source's volumes."""
        if not self.config.data.volumes:
            raise BrainfusionError(f"{self.checkpoint or 'this model'} makes slices, not volumes; call the pipeline instead.")
        if n <= 0 or batch_size <= 0:
            raise BrainfusionError(f"the volume count ({n}) and batch size ({batch_size}) must be positive.")
        if self.config.masks_for_images_only:
            return self._label_volumes(n, seed, sampler, steps, batch_size, first_index, progress, cancel, condition, guidance, images)
        cond = encode_guided_request(self.config.condition, condition, n, guidance)
        network, tick = self._guided_network(), _ticker(progress, cancel)
        shape = (self.config.model.in_channels,) + (self.config.model.image_size,) * 3
        out, labels = [], []
        for start in range(first_index, first_index + n, batch_size):
            count = min(batch_size, first_index + n - start)
            rows, indices = slice(start - first_index, start - first_index + count), range(start, start + count)
            part = None if cond is None else cond[rows]
            if self.config.slab.active:  # the slice U-Net, a slab at a time (diffusion/slabs.py)
                x = slab_volumes(network, self.config.diffusion, self.config.slab, self.config.data.grid, seed, indices, sampler,
                                 steps, part, guidance, tick, run_background(self.config))
                out.append(to_uint8(x[:, :1]))
                labels.append(self._volume_labels(x[:, 1:]))
                continue
            x, _ = sample(network, self.config.diffusion, (count,) + shape, sampler, steps, image_generators(seed, indices),
                          progress=tick, cond=part, guidance=guidance, clamp=False)
            out.append(to_uint8(from_coefficients(x, self.config.diffusion.wavelet_detail_scale)))
        return np.concatenate(out), np.concatenate(labels) if self.config.mask_labels else None

    def _label_volumes(self, n: int, seed: int, sampler: str, steps: int, batch_size: int, first_index: int,
                       progress: Callable[[int], None] | None, cancel: Callable[[], bool] | None, condition: Request | None,
                       guidance: float, images: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Image first, labels after, for volumes: the given volumes (or the image source's, drawn with `condition`
        and `guidance`), then this label model's labels for them slab by slab, from noise streams of their own."""
        name, grid = self.checkpoint or "this model", self.config.data.grid
        if images is None and self.image_source is None:
            raise BrainfusionError(f"{name} draws labels for given volumes only (recipe volume-labels); give it volumes, or an "
                                   "image-only volume run to draw them from as its image source (sample --image-model).")
        if images is None:
            images = self.image_source.volumes(n, seed, sampler, steps, batch_size, first_index, progress, cancel, condition, guidance)
        if np.shape(images) != (n, grid, grid, grid) or np.asarray(images).dtype != np.uint8:
            raise BrainfusionError(f"the given volumes have shape {np.shape(images)}; {name} labels uint8 volumes of shape "
                                   f"({n}, {grid}, {grid}, {grid}), on its own grid.")
        network, tick, labels = self._guided_network(), _ticker(progress, cancel), []
        for start in range(first_index, first_index + n, batch_size):
            rows = slice(start - first_index, min(start + batch_size, first_index + n) - first_index)
            given = to_model_range(torch.as_tensor(np.asarray(images[rows])))
            x = slab_volumes(network, self.config.diffusion, self.config.slab, grid, derive_seed(seed, 1),
                             range(start, start + len(given)), sampler, steps, None, 1.0, tick, run_background(self.config), given)
            labels.append(self._volume_labels(x[:, 1:]))
        return np.asarray(images), np.concatenate(labels)

    def _volume_labels(self, channels: torch.Tensor) -> np.ndarray | None:
        """A slab run's label channels (N, C, D, H, W) → uint8 label indices (N, D, H, W), tissue kept in one piece
        (data/volumes.py); None without masks."""
        if not self.config.mask_labels:
            return None
        n, c, d, h, w = channels.shape
        flat = channels.transpose(1, 2).reshape(n * d, c, h, w)
        d_cfg = self.config.diffusion
        indices = labels_from_channels(flat, w, self.config.mask_labels, d_cfg.mask_scale, d_cfg.mask_encoding)
        return tissue_in_one_piece(indices.reshape(n, d, h, w).numpy())

    def pairs(self, n: int, seed: int = 0, sampler: str = FAST_SAMPLER, steps: int = FAST_STEPS,
              batch_size: int = 64, first_index: int = 0, frames: int = 0,
              on_frames: Callable[[int, list[np.ndarray]], None] | None = None,
              progress: Callable[[int], None] | None = None, cancel: Callable[[], bool] | None = None,
              condition: Request | None = None, guidance: float = 1.0,
              mask: np.ndarray | None = None, mask_clean: bool | None = None,
              image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """As `__call__`, and each image's tissue labels (uint8 (n, H, W) indices into the run's
        data.mask_values; None for a model trained without masks). A given `mask` is handed to the network
        clean when the model was trained so (diffusion.given_mask_share), else held by replacement;
        `mask_clean` overrides that choice (the benchmark measures both). A given `image` (uint8 (n, H, W)), for a
        model trained with diffusion.given_image_share, comes back with the labels the model draws for it."""
        if n <= 0 or batch_size <= 0:
            raise BrainfusionError(f"the image count ({n}) and batch size ({batch_size}) must be positive.")
        if self.config.data.volumes:
            raise BrainfusionError(f"{self.checkpoint or 'this model'} makes volumes, which have no tissue labels; call the "
                                   "pipeline (or Pipeline.volumes) instead.")
        if self.config.upsample.active:
            raise BrainfusionError(f"{self.checkpoint or 'this model'} is an upsampler: it makes slices from low-resolution "
                                   "ones (Pipeline.upscale), or serves a base run as its second stage (use_upsampler).")
        cond = encode_guided_request(self.config.condition, condition, n, guidance)
        if mask is None and self.mask_source is not None:  # stage one; the images get their own noise streams
            conditional = self.mask_source.config.condition.active
            mask = self.mask_source.pairs(n, seed, sampler, steps, batch_size, first_index, progress=progress, cancel=cancel,
                                          condition=condition if conditional else None,
                                          guidance=guidance if conditional else 1.0)[1]
            seed = derive_seed(seed, 1)
        if image is None and self.image_source is not None:  # stage one; the labels get their own noise streams
            image = self.image_source(n, seed, sampler, steps, batch_size, first_index, progress=progress, cancel=cancel)
            seed = derive_seed(seed, 1)
        if image is not None and mask is not None:
            raise BrainfusionError("give a model either an image to label or a mask to make an image for, not both.")
        if image is None and self.config.masks_for_images_only:
            raise BrainfusionError(f"{self.checkpoint or 'this model'} draws labels for given images only (trained with every "
                                   "image given); give it images, or an image-only run to draw them from as its image source.")
        if mask is None and self.config.images_for_masks_only:
            raise BrainfusionError(f"{self.checkpoint or 'this model'} makes images for given masks only (trained with every "
                                   "mask given); give it masks, or a joint run to draw them from as its mask source.")
        known = self._known(mask, n) if image is None else self._known_image(image, n)
        if image is not None:  # a label model takes its image clean, as trained; anything else holds it by replacement
            clean = self.config.diffusion.given_image_share > 0
        else:
            clean = self.config.diffusion.given_mask_share > 0 if mask_clean is None else mask_clean
        size, channels, k = self.config.model.image_size, self.config.model.in_channels, self.config.mask_channels

        network, tick = self._guided_network(), _ticker(progress, cancel)
        images, labels = [], []
        for start in range(first_index, first_index + n, batch_size):
            count = min(batch_size, first_index + n - start)
            gens = image_generators(seed, range(start, start + count))
            rows = slice(start - first_index, start - first_index + count)
            x, snaps = sample(network, self.config.diffusion, (count, channels, size, size), sampler, steps, gens,
                              frames=frames if on_frames else 0, progress=tick, cond=None if cond is None else cond[rows],
                              guidance=guidance, clamp=self.decoder is None, known=None if known is None else known[rows],
                              known_clean=clean, frames_denoised=self.decoder is not None, known_first=image is not None)
            if on_frames is not None:
                on_frames(start, [to_uint8(self._decode(f[:, : channels - k]).clamp(-1, 1)) for f in snaps])
            images.append(np.asarray(image)[rows].astype(np.uint8) if image is not None else to_uint8(self._decode(x[:, : channels - k])))
            if k:  # a given mask is what the image was made for; a latent run's label shares come back at full size
                labels.append(np.asarray(mask)[rows].astype(np.uint8) if mask is not None else
                              labels_from_channels(x[:, channels - k :], self.config.data.image_size, self.config.mask_labels,
                                                   self.config.diffusion.mask_scale, self.config.diffusion.mask_encoding).numpy())
        images = np.concatenate(images)
        if self.upsampler is not None:  # the cascade's second stage, on noise streams of its own
            images = self.upsampler.upscale(images, derive_seed(seed, 3), sampler, steps, batch_size, first_index,
                                            self.upsample_augment, progress=tick)
        return images, np.concatenate(labels) if k else None

    def _guided_network(self) -> Callable:
        """The network as the samplers call it, autoguided when a guide is set (use_guide)."""
        return self.network if self.guide is None else autoguidance(self.network, self.guide[0].network, self.guide[1])

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """The image channels as slices: a latent run's through its autoencoder."""
        return x if self.decoder is None else self.decoder(x)

    def _known_image(self, image: np.ndarray, n: int) -> torch.Tensor:
        """Given images (uint8 (n, H, W)) as the model's image channel, after checking they fit the model."""
        size = self.config.data.image_size
        if not self.config.mask_labels or np.shape(image) != (n, size, size):
            raise BrainfusionError(f"the given images have shape {np.shape(image)}; this model labels {size}² images, "
                                   f"({n}, {size}, {size}) uint8, and must be trained with --masks.")
        return to_model_range(torch.as_tensor(np.asarray(image, dtype=np.uint8)))

    def _known(self, mask: np.ndarray | torch.Tensor | None, n: int) -> torch.Tensor | None:
        """A given mask as the model's mask channels, after checking it fits the model."""
        if mask is None:
            return None
        d = self.config.diffusion
        return given_mask_channels(mask, n, self.config.data.image_size, self.config.mask_labels, d.mask_scale,
                                   self.config.model.image_size, d.mask_encoding)
