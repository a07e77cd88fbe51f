"""The diffusers classes of an export: the pipeline, brainfusion's U-Net and, for a latent run, its autoencoder.

This module is the one definition of what an export runs. `brainfusion export` ships its source, together
with the brainfusion modules it imports (models/unet.py's U-Net among them), as the folder's `pipeline.py` and as
each custom component's module, so plain diffusers loads the folder without brainfusion installed
(`hub.shipped_source` says how the file is made). Here, inside brainfusion, `BrainfusionPipeline.from_pretrained`
builds every component from these classes and never runs the folder's copy.

The scheduler is diffusers' own: `EDMEulerScheduler` for the EDM formulation (its preconditioning is EDM's
Table 1, the same as `edm.EDMProcess`; only the noise input differs, 0.25·ln σ there and ln σ scaled onto
0..1000 here, which the U-Net maps), `DDIMScheduler` with v-prediction for VP. Both are the deterministic
"ddim" sampler of `brainfusion sample`, and the tests check the two give the same images for a seed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 - diffusers finds loadable bases here
from diffusers.utils import BaseOutput

from ..config import RunConfig, mask_channel_count
from ..data.conditions import Request, encode_guided_request
from ..data.channels import given_mask_channels, label_image, labels_from_channels, to_uint8
from ..diffusion.process import autoguidance, classifier_free_guidance
from ..errors import BrainfusionError
from ..models.unet import UNet
from ..seeding import image_generators, randn

MANIFEST = "brainfusion_export.json"
SHIPPED_MODULE = "brainfusion_hub"  # model_index.json's library of the custom components: <component>/brainfusion_hub.py


class BrainfusionUNet(ModelMixin, ConfigMixin):
    """brainfusion's U-Net as a diffusers model; `timestep` follows the scheduler's convention. `condition` is
    the run's condition section (config.ConditionConfig, vocabulary included) for a conditional network. `masks`
    ({"values": [...], "names": [...], "scale": s, "encoding": "one-hot" | "ordinal", "given": "clean" | "replace" | "only"}) marks a
    network trained with tissue masks: its last channels are the labels (K one-hot at ±s, or one ordinal channel), read
    from the config by the properties below, and the pipeline needs the label values to write masks as `brainfusion sample`
    does, and how to hold a given mask: handed to the network clean (trained with given_mask_share; "only": every mask
    was given, so it makes images for given masks only) or by replacement."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, model: dict | None = None, formulation: str = "edm", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 condition: dict | None = None, masks: dict | None = None):
        super().__init__()
        run = RunConfig.from_dict({"model": model or {}, "condition": condition or {}}, source="unet/config.json")
        run.condition.validate()
        self.net = UNet(run.model)
        self.conditions = run.condition  # what encode_request maps {"class": "Mild"} with

    @property
    def mask_values(self) -> tuple[int, ...]:
        return tuple((self.config.masks or {}).get("values", ()))  # () for an image-only network

    @property
    def mask_scale(self) -> float:
        return (self.config.masks or {}).get("scale", 1.0)

    @property
    def mask_encoding(self) -> str:
        return (self.config.masks or {}).get("encoding", "one-hot")

    @property
    def mask_given_clean(self) -> bool:
        """Trained with given_mask_share: a given mask is handed to the network clean, not held by replacement."""
        return (self.config.masks or {}).get("given") in ("clean", "only")

    @property
    def mask_required(self) -> bool:
        """Trained with every mask given: it never learnt to draw masks, so every call needs one."""
        return (self.config.masks or {}).get("given") == "only"

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(sample.shape[0])
        if self.config.formulation == "edm":  # diffusers' c_noise = 0.25 ln σ → ours, ln σ mapped onto 0..1000
            lo, hi = math.log(self.config.sigma_min), math.log(self.config.sigma_max)
            t = (4 * t - lo) / (hi - lo) * 1000
        return self.net(sample, t, cond)


class BrainfusionVAE(ModelMixin, ConfigMixin):
    """A latent run's autoencoder: MONAI's AutoencoderKL built from its constructor arguments (`autoencoder`), and
    the per-channel latent `mean` and `std` with which the run scaled latents to std `latent_std` (latent.py).
    Decoding undoes that scaling first, z = x / latent_std · std + mean, as `latent.LatentDecoder` does; with
    `patch` p > 1 the network's p² output channels are p×p pixel blocks (models/autoencoder.PixelBlocks)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, autoencoder: dict | None = None, mean: tuple[float, ...] = (), std: tuple[float, ...] = (),
                 factor: int = 4, latent_std: float = 0.5, patch: int = 1):
        super().__init__()
        try:  # by name: diffusers imports every package an import line of this file names (and refused a missing one before 0.36)
            networks = importlib.import_module("monai.networks.nets")
        except ImportError:
            raise BrainfusionError("this export decodes latents with MONAI's AutoencoderKL; install it with `pip install monai`.") from None
        self.ae = networks.AutoencoderKL(**(autoencoder or {}))

    def decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents (N, C, h, w) → slices (N, 1, h·factor, w·factor) in [-1, 1]."""
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.config.mean, dtype=torch.float32, device=x.device).view(shape)
        std = torch.tensor(self.config.std, dtype=torch.float32, device=x.device).view(shape)
        z = x.float() / self.config.latent_std * std + mean
        blocks = self.ae.decode(z.to(self.device)).float()
        return torch.nn.functional.pixel_shuffle(blocks, self.config.patch).clamp(-1, 1)


@dataclass
class BrainfusionOutput(BaseOutput):
    images: np.ndarray  # uint8 (N, H, W) or (N, C, H, W)
    masks: Optional[np.ndarray] = None  # a mask model's uint8 (N, H, W) in its label values; None, and absent from keys(), otherwise


class BrainfusionPipeline(DiffusionPipeline):
    """Sampling of an exported model, conditional or not, in pixels or through a `vae`, autoguided by `guide_unet`
    where the run kept one; image i of a seed matches `brainfusion sample`'s with the "ddim" sampler."""

    _optional_components = ["vae", "guide_unet"]

    # ModelMixin, not our classes: under plain diffusers each component comes from its own copy of this code, and diffusers
    # checks it against these hints (it unpacks typing.Optional, not `X | None`), warning at every load otherwise
    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin, vae: Optional[ModelMixin] = None,
                 guide_unet: Optional[ModelMixin] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, guide_unet=guide_unet)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "BrainfusionPipeline":
        """An export folder (or a Hub repository holding one), checked against its manifest, with every component
        built from this module's classes rather than the folder's code (so no `trust_remote_code`). `kwargs` go to
        each model's `from_pretrained`, e.g. torch_dtype."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(pretrained_model_name_or_path)))
        verify_export(folder)
        index = json.loads((folder / "model_index.json").read_text())
        parts = {name: _load_component(folder, name, *entry, kwargs) for name, entry in index.items()
                 if not name.startswith("_") and entry[0]}  # skips _class_name and the like, and absent optional parts
        pipe = cls(**parts)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    @torch.no_grad()
    def __call__(self, num_images: int = 16, seed: int = 0, num_inference_steps: int = 50, first_index: int = 0,
                 output_type: str = "uint8", condition: Request | None = None, guidance_scale: float = 1.0,
                 mask: np.ndarray | torch.Tensor | None = None, autoguidance: float = 1.0) -> BrainfusionOutput:
        """`output_type` "uint8" (default) or "pt" (float tensor in [-1, 1], before quantisation).

        `condition` (a conditional export) is what brainfusion's `Pipeline` takes: {name: value} for every image,
        e.g. {"class": "ModerateDemented", "level": 0.6}, a list of one per image, or an encoded tensor; names
        left out are not conditioned on. `guidance_scale`: classifier-free guidance, 1 the plain conditional
        model, 0 the unconditional one, above 1 stronger.

        A model trained with tissue masks also returns `masks`: uint8 (N, H, W) in the run's label values, as
        `brainfusion sample` writes its seg files (with "pt", the label channels in [-1, 1], on a latent export's latent grid). `mask` (label
        indices (N, H, W), EDM exports) is a given mask: it is held fixed and the images are generated to fit it.

        `autoguidance` w (an export with a `guide_unet`, the run's own earlier weights): each step is the guide's output
        plus w times the network's departure from it (Karras et al. 2024); 1 is the network alone, 2 typical, and it
        costs a second network pass a step. It composes with `guidance_scale`.
        """
        cond = encode_guided_request(self.unet.conditions, condition, num_images, guidance_scale)
        network = self._autoguided(autoguidance)
        network = network if cond is None else classifier_free_guidance(network, cond.to(self.unet.device), guidance_scale)
        model, values = self.unet.config.model, self.unet.mask_values
        k = mask_channel_count(len(values), self.unet.mask_encoding)
        shape = (num_images, model["in_channels"], model["image_size"], model["image_size"])
        noise = randn(shape, image_generators(seed, range(first_index, first_index + num_images))).to(self.unet.device)
        known = self._given(mask, num_images)
        self.scheduler.set_timesteps(num_inference_steps)
        # EDM starts at σ_max, not diffusers' init_noise_sigma √(σ_max² + 1)
        x = noise * (float(self.scheduler.sigmas[0]) if isinstance(self.scheduler, EDMEulerScheduler) else self.scheduler.init_noise_sigma)
        clean = self.unet.mask_given_clean
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            # edm.with_known_channels's Euler steps, whose denoised mask channels are `known`, keep them at known + σ·noise:
            # written in directly, as the diffusers scheduler has no hook for the denoised estimate
            if known is not None:
                x[:, -k:] = known + float(self.scheduler.sigmas[i]) * noise[:, -k:]
            model_input = self.scheduler.scale_model_input(x, t)
            if known is not None and clean:  # a model trained with given_mask_share sees a given mask clean, unscaled
                model_input[:, -k:] = known
            out = network(model_input, t.reshape(1).expand(num_images))
            x = self.scheduler.step(out, t, x).prev_sample
        if known is not None:
            x[:, -k:] = known  # σ = 0
        images, channels = x[:, : x.shape[1] - k], x[:, x.shape[1] - k :].clamp(-1, 1).cpu()
        images = (images.clamp(-1, 1) if self.vae is None else self.vae.decode_latents(images)).cpu()  # latents have no range to clamp to
        if output_type == "pt":
            return BrainfusionOutput(images=images, masks=channels if values else None)
        if not values:
            return BrainfusionOutput(images=to_uint8(images), masks=None)
        labels = (np.asarray(mask) if mask is not None else
                  labels_from_channels(channels, images.shape[-1], len(values), self.unet.mask_scale, self.unet.mask_encoding).numpy())
        masks = label_image(labels.astype(np.uint8), values)
        return BrainfusionOutput(images=to_uint8(images), masks=masks)

    def _autoguided(self, weight: float):
        """The unet, or with weight w ≠ 1 the unet autoguided by guide_unet (process.autoguidance), as brainfusion's
        Pipeline.use_guide mixes them before any classifier-free guidance."""
        if weight == 1:
            return self.unet
        if weight < 0:
            raise BrainfusionError(f"autoguidance must be 0 or more (1: none, 2: typical), got {weight}.")
        if self.guide_unet is None:
            raise BrainfusionError("this export has no guide_unet (its run kept no guide, train.guide_at); call it with autoguidance=1.")
        return autoguidance(self.unet, self.guide_unet, weight)

    def _given(self, mask: np.ndarray | torch.Tensor | None, n: int) -> torch.Tensor | None:
        """A given mask as the mask channels to hold fixed; only EDM's Euler scheduler steps in σ, where that is exact."""
        if mask is None:
            if self.unet.mask_required:
                raise BrainfusionError("this model makes images for given masks only (trained with every mask given); pass mask=.")
            return None
        grid = self.unet.config.model["image_size"]
        size = grid * (self.vae.config.factor if self.vae is not None else 1)
        known = given_mask_channels(mask, n, size, len(self.unet.mask_values), self.unet.mask_scale, grid, self.unet.mask_encoding)
        if not isinstance(self.scheduler, EDMEulerScheduler):
            raise BrainfusionError("a given mask needs a model of the EDM formulation; this export samples with DDIM (VP).")
        return known.to(self.unet.device)


COMPONENTS = {cls.__name__: cls for cls in (BrainfusionUNet, BrainfusionVAE)}


def _load_component(folder: Path, name: str, library: str, class_name: str, kwargs: dict):
    """Component `name` of an export: ours from this module (exports older than the shipped code name a brainfusion
    module, such as `brainfusion.hub`, the path this code had then), a scheduler from diffusers."""
    if library.split(".")[0] in (SHIPPED_MODULE, "brainfusion") and class_name in COMPONENTS:
        return COMPONENTS[class_name].from_pretrained(folder / name, **kwargs)
    if library == "diffusers":
        import diffusers

        return getattr(diffusers, class_name).from_pretrained(folder / name)
    raise BrainfusionError(f"{folder / 'model_index.json'} names {library}.{class_name} for `{name}`, which brainfusion does not know; export the run again.")


def _digests(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, "README.md"))
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def verify_export(folder: Path) -> None:
    """Refuse an export whose files were changed, removed or added after `export_run` wrote them."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise BrainfusionError(f"{folder} has no {MANIFEST}; it is not a brainfusion export (write one with `brainfusion export`).")
    expected, found = json.loads(manifest.read_text())["sha256"], _digests(folder)
    for name, digest in expected.items():
        if name not in found:
            raise BrainfusionError(f"{folder / name} is missing from the export; export the run again.")
        if found[name] != digest:
            raise BrainfusionError(f"{folder / name} was changed after export (its SHA-256 differs); export the run again.")
    if extra := sorted(set(found) - set(expected)):
        raise BrainfusionError(f"{folder / extra[0]} was added after export; remove it or export the run again.")
