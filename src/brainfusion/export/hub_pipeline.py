"""The diffusers classes of an export: the pipeline, brainfusion's U-Net and, for a latent run, its autoencoder.

This module is the one definition of what an export runs. `brainfusion export` ships its source, together
with the brainfusion modules it imports (models/unet.py's U-Net among them), as the folder's `pipeline.py` and as
each custom component's module, so plain diffusers loads the folder without brainfusion installed
(`hub.shipped_source` says how the file is made). Here, inside brainfusion, `BrainfusionPipeline.from_pretrained`
builds every component from these classes and never runs the folder's copy.

The pipeline samples with brainfusion's own samplers (`diffusion.process.sample`, shipped with it), so a call draws
bitwise the slices `brainfusion sample` writes for the same sampler, steps and seeds: by default SDE-DPM-Solver++
for FAST_STEPS steps, as every brainfusion entry point. The `scheduler` component stays diffusers' own and holds the
run's noise process, which the samplers read from its config: `EDMEulerScheduler` for the EDM formulation (EDM's
σ range, σ_data and ρ), `DDIMScheduler` for VP (the β schedule and the network's target). The U-Net's `forward`
keeps diffusers' timestep convention for anyone who drives it with that scheduler by hand.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 - diffusers finds loadable bases here
from diffusers.utils import BaseOutput

from ..config import FAST_SAMPLER, FAST_STEPS, DiffusionConfig, RunConfig, UpsampleConfig, mask_channel_count
from ..data.conditions import Request, encode_guided_request
from ..data.channels import given_mask_channels, label_image, labels_from_channels, to_uint8
from ..diffusion.process import autoguidance, sample
from ..errors import BrainfusionError
from ..models.unet import UNet
from ..runtime import network_fn
from ..diffusion.upsample import upscale_images
from ..seeding import derive_seed, image_generators

MANIFEST = "brainfusion_export.json"
OUTPUT_TYPES = ("pil", "np", "pt", "uint8")  # diffusers' three, and brainfusion's uint8 array (what `Pipeline` returns)
SHIPPED_MODULE = "brainfusion_hub"  # model_index.json's library of the custom components: <component>/brainfusion_hub.py


class BrainfusionUNet(ModelMixin, ConfigMixin):
    """brainfusion's U-Net as a diffusers model; `timestep` follows the scheduler's convention. `condition` is
    the run's condition section (config.ConditionConfig, vocabulary included) for a conditional network. `masks`
    ({"values": [...], "names": [...], "scale": s, "encoding": "one-hot" | "ordinal", "given": "clean" | "replace" | "only"}) marks a
    network trained with tissue masks: its last channels are the labels (K one-hot at ±s, or one ordinal channel), read
    from the config by the properties below, and the pipeline needs the label values to write masks as `brainfusion sample`
    does, and how to hold a given mask: handed to the network clean (trained with given_mask_share; "only": every mask
    was given, so it makes images for given masks only) or by replacement. `upsample` (the run's upsample section
    and its "diffusion" section) marks a cascade's upsampler, which reads a low-resolution slice."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, model: dict | None = None, formulation: str = "edm", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 condition: dict | None = None, masks: dict | None = None, upsample: dict | None = None):
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
    """diffusers' ImagePipelineOutput with a mask model's masks beside the images, each in the call's output_type."""

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    masks: Optional[Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]] = None  # None, and absent from keys(), without masks


class BrainfusionPipeline(DiffusionPipeline):
    """Sampling of an exported model, conditional or not, in pixels or through a `vae`, autoguided by `guide_unet`
    where the run kept one, called as diffusers' DDPMPipeline is; image i of a seed is bitwise `brainfusion sample`'s
    for the same sampler and steps (by default both draw with FAST_SAMPLER for FAST_STEPS steps)."""

    _optional_components = ["vae", "guide_unet", "upsampler_unet"]

    # ModelMixin, not our classes: under plain diffusers each component comes from its own copy of this code, and diffusers
    # checks it against these hints (it unpacks typing.Optional, not `X | None`), warning at every load otherwise
    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin, vae: Optional[ModelMixin] = None,
                 guide_unet: Optional[ModelMixin] = None, upsampler_unet: Optional[ModelMixin] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, guide_unet=guide_unet, upsampler_unet=upsampler_unet)

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
    def __call__(self, batch_size: int = 1, generator: Optional[torch.Generator] = None, num_inference_steps: int = FAST_STEPS,
                 output_type: str = "pil", return_dict: bool = True, *, sampler: str = FAST_SAMPLER, seed: Optional[int] = None,
                 first_index: int = 0, condition: Request | None = None, guidance_scale: float = 1.0,
                 mask: np.ndarray | torch.Tensor | None = None, autoguidance: float = 1.0) -> BrainfusionOutput | tuple:
        """`batch_size` slices in diffusers' convention (as `DDPMPipeline`): `.images` is a list of PIL images (mode "L")
        by default, exactly the uint8 slices `brainfusion sample` writes for the same seeds; `output_type` "np" gives
        floats (N, H, W, 1) in [0, 1], "pt" a tensor (N, 1, H, W) in [0, 1] (both before quantisation), "uint8"
        brainfusion's uint8 array (N, H, W). `return_dict=False` returns the tuple (images,) or (images, masks).

        The default draw is `brainfusion sample`'s: `sampler` "dpm++sde" (SDE-DPM-Solver++) for FAST_STEPS steps;
        "ddim", "dpm++", "heun" and "ddpm" (the seed's chain: give num_inference_steps=1000) are brainfusion's others.

        Noise is brainfusion's, one stream per image, so image i is the same in any batch: image `first_index` + i of
        `seed`. `generator=None` and no seed is seed 0, the same slices as `brainfusion sample --seed 0`; a
        torch.Generator stands for a seed drawn from it, int(torch.randint(2**62, (1,), generator=generator)), so equal
        generator states give equal slices; give `seed` or `generator`, not both.

        `condition` (a conditional export) is what brainfusion's `Pipeline` takes: {name: value} for every image,
        e.g. {"class": "ModerateDemented", "level": 0.6}, a list of one per image, or an encoded tensor; names left
        out are not conditioned on. `guidance_scale`: classifier-free guidance, 1 the plain conditional model, 0 the
        unconditional one, above 1 stronger. `autoguidance` w (an export with a `guide_unet`, the run's earlier
        weights): each step is the guide's output plus w times the network's departure from it (Karras et al. 2024);
        1 the network alone, 2 typical, at a second network pass a step. It composes with `guidance_scale`.

        A model trained with tissue masks also returns `.masks`, in the run's label values as `brainfusion sample`
        writes its seg files: PIL images, or uint8 (N, H, W) for "np" and "uint8", or for "pt" the label channels
        in [-1, 1] (on a latent export's latent grid). `mask` (label indices (N, H, W), EDM exports) is a given mask:
        held fixed, the images generated to fit it.
        """
        if output_type not in OUTPUT_TYPES:
            raise BrainfusionError(f"output_type={output_type!r} is unknown; choose one of {', '.join(map(repr, OUTPUT_TYPES))}.")
        if batch_size < 1:
            raise BrainfusionError(f"batch_size={batch_size} draws nothing; give 1 or more.")
        seed = self._seed(generator, seed)
        cond = encode_guided_request(self.unet.conditions, condition, batch_size, guidance_scale)
        network, known = self._network(autoguidance), self._given(mask, batch_size)
        model, indices = self.unet.config.model, range(first_index, first_index + batch_size)
        shape = (batch_size, model["in_channels"], model["image_size"], model["image_size"])
        stages = 1 if self.upsampler_unet is None else 2
        with self.progress_bar(total=num_inference_steps * stages) as bar:
            x, _ = sample(network, self._diffusion(), shape, sampler, num_inference_steps, image_generators(seed, indices),
                          progress=bar.update, cond=cond, guidance=guidance_scale, clamp=self.vae is None, known=known,
                          known_clean=self.unet.mask_given_clean)
            upscale = None if stages == 1 else (  # a cascade's second stage, on noise streams of its own, as brainfusion's
                lambda low: self._upscaled(low, derive_seed(seed, 3), indices, sampler, num_inference_steps, bar.update))
            out = self._output(x, mask, output_type, upscale)
        return out if return_dict else out.to_tuple()

    @staticmethod
    def _seed(generator: Optional[torch.Generator], seed: Optional[int]) -> int:
        """The seed of the images' noise streams (seeding.image_generators, as `brainfusion sample` draws them, so an
        image depends on its seed and index alone); a diffusers-style generator only picks the seed."""
        if generator is not None and seed is not None:
            raise BrainfusionError("give either seed= (brainfusion's per-image seeds) or generator=, not both.")
        if isinstance(generator, torch.Generator):
            seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        elif generator is not None:
            raise BrainfusionError(f"generator= takes one torch.Generator, not a {type(generator).__name__}: the images' "
                                   "noise streams come from one seed drawn from it; or give seed= instead.")
        return 0 if seed is None else seed

    def _upscaled(self, low: np.ndarray, seed: int, indices: range, sampler: str, steps: int, progress) -> torch.Tensor:
        """The upsampler_unet's slices for the base's uint8 ones, at its own noise process and augmentation level."""
        up = dict(self.upsampler_unet.config.upsample)
        size, diffusion = self.upsampler_unet.config.model["image_size"], DiffusionConfig(**up.pop("diffusion"))
        settings = UpsampleConfig(**up)
        return upscale_images(self._sampled(self.upsampler_unet), diffusion, settings, low, settings.augment, size, seed, indices,
                              sampler, steps, progress)

    def _network(self, weight: float):
        """The unet as brainfusion's samplers call a network ((x, t[, cond]) → float32 on the CPU, in brainfusion's
        noise input: the inner UNet, not the diffusers-convention forward), and with weight w ≠ 1 autoguided by
        guide_unet (process.autoguidance), as brainfusion's Pipeline.use_guide mixes them before classifier-free guidance."""
        if weight == 1:
            return self._sampled(self.unet)
        if weight < 0:
            raise BrainfusionError(f"autoguidance must be 0 or more (1: none, 2: typical), got {weight}.")
        if self.guide_unet is None:
            raise BrainfusionError("this export has no guide_unet (its run kept no guide, train.guide_at); call it with autoguidance=1.")
        return autoguidance(self._sampled(self.unet), self._sampled(self.guide_unet), weight)

    @staticmethod
    def _sampled(unet: ModelMixin):
        """runtime.network_fn of a component's network: on its device, under autocast where it was loaded in half precision."""
        return network_fn(unet.net, unet.device, None if unet.dtype == torch.float32 else unet.dtype)

    def _diffusion(self) -> DiffusionConfig:
        """The run's noise process, read back from the scheduler component that carries it, for brainfusion's samplers."""
        s, name, formulation = self.scheduler.config, type(self.scheduler).__name__, self.unet.config.formulation
        if formulation == "edm" and name == "EDMEulerScheduler":
            return DiffusionConfig(formulation="edm", timesteps=s.num_train_timesteps, sigma_min=s.sigma_min, sigma_max=s.sigma_max,
                                   sigma_data=s.sigma_data, rho=s.rho)
        if formulation == "vp" and name == "DDIMScheduler":
            return DiffusionConfig(formulation="vp", timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                                   schedule="linear" if s.beta_schedule == "linear" else "cosine",
                                   prediction="epsilon" if s.prediction_type == "epsilon" else "v")
        raise BrainfusionError(f"this export's scheduler is a {name}, not the one it shipped with, which holds the run's noise "
                               "process; load the export again and choose the sampler with sampler=.")

    def _given(self, mask: np.ndarray | torch.Tensor | None, n: int) -> torch.Tensor | None:
        """A given mask as the mask channels to hold fixed (process.sample refuses one for a VP model, as for brainfusion's)."""
        if mask is None:
            if self.unet.mask_required:
                raise BrainfusionError("this model makes images for given masks only (trained with every mask given); pass mask=.")
            return None
        grid = self.unet.config.model["image_size"]
        size = grid * (self.vae.config.factor if self.vae is not None else 1)
        return given_mask_channels(mask, n, size, len(self.unet.mask_values), self.unet.mask_scale, grid, self.unet.mask_encoding)

    def _output(self, x: torch.Tensor, mask: np.ndarray | torch.Tensor | None, output_type: str, upscale=None) -> BrainfusionOutput:
        """The sampled channels as `__call__` returns them: slices decoded (a latent export), brought up by `upscale` (a
        cascade) and converted, and a mask model's labels, read from its channels as brainfusion's Pipeline reads them,
        or the given mask itself."""
        values = self.unet.mask_values
        k = mask_channel_count(len(values), self.unet.mask_encoding)
        images, channels = x[:, : x.shape[1] - k], x[:, x.shape[1] - k :].clamp(-1, 1).cpu()
        images = (images if self.vae is None else self.vae.decode_latents(images)).cpu()  # pixels: sample() clamped them
        if upscale is not None:  # from the base's uint8 slices, as brainfusion's cascade takes them
            images = upscale(to_uint8(images)).cpu()
        masks = None
        if values and output_type == "pt":
            masks = channels
        elif values:
            labels = (np.asarray(mask) if mask is not None else
                      labels_from_channels(channels, images.shape[-1], len(values), self.unet.mask_scale, self.unet.mask_encoding).numpy())
            masks = label_image(labels.astype(np.uint8), values)
        if output_type == "pil":
            return BrainfusionOutput(images=[PIL.Image.fromarray(a) for a in to_uint8(images)],
                                     masks=None if masks is None else [PIL.Image.fromarray(m) for m in masks])
        if output_type == "uint8":
            return BrainfusionOutput(images=to_uint8(images), masks=masks)
        unit = (images / 2 + 0.5).clamp(0, 1)  # diffusers' postprocessing of a [-1, 1] image
        return BrainfusionOutput(images=unit.permute(0, 2, 3, 1).numpy() if output_type == "np" else unit, masks=masks)


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
