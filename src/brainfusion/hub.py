"""brainfusion models in diffusers' own format: `save_pretrained` / `from_pretrained`, a pipeline, a model card.

An export folder is what diffusers writes for a pipeline: `model_index.json`, `unet/` (config.json and
diffusion_pytorch_model.safetensors) and `scheduler/` (scheduler_config.json), plus this module's
`brainfusion_export.json` (a SHA-256 of every file, so a changed or missing file is refused before
anything loads) and a model card `README.md`. The network is brainfusion's own U-Net made native
(`BrainfusionUNet`, a diffusers ModelMixin + ConfigMixin), not converted to another architecture.
The scheduler is diffusers' own: `EDMEulerScheduler` for the EDM formulation (its preconditioning
is EDM's Table 1, the same as `edm.EDMProcess`; only the noise input differs, 0.25·ln σ there and
ln σ scaled onto 0..1000 here, which the model maps), `DDIMScheduler` with v-prediction for VP.
Both are the deterministic "ddim" sampler of `brainfusion sample`, and a test checks the two give
the same images for the same seed.

A conditional model keeps its condition vocabulary (class names, each continuous condition's
training mean and std: the run's `ConditionConfig`) in `unet/config.json`, so a request is encoded
by `conditions.encode_request` as in brainfusion, and guided by `diffusion.classifier_free_guidance`.

    from brainfusion.hub import BrainfusionPipeline
    pipe = BrainfusionPipeline.from_pretrained("runs/demo/export")
    images = pipe(num_images=16, seed=0, num_inference_steps=50).images   # uint8 (16, 64, 64)
    pipe(num_images=16, condition={"class": "ModerateDemented"}, guidance_scale=2.0)  # a conditional export
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 - diffusers finds loadable bases here
from diffusers.utils import BaseOutput

from .conditions import Request, encode_guided_request
from .config import RunConfig
from .data import to_uint8
from .diffusion import classifier_free_guidance, make_scheduler
from .errors import BrainfusionError
from .model import UNet
from .seeding import image_generators, randn

MANIFEST = "brainfusion_export.json"


class BrainfusionUNet(ModelMixin, ConfigMixin):
    """brainfusion's U-Net as a diffusers model; `timestep` follows the scheduler's convention. `condition` is
    the run's condition section (config.ConditionConfig, vocabulary included) for a conditional network."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, model: dict | None = None, formulation: str = "edm", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 condition: dict | None = None):
        super().__init__()
        run = RunConfig.from_dict({"model": model or {}, "condition": condition or {}}, source="unet/config.json")
        run.condition.validate()
        self.net = UNet(run.model)
        self.conditions = run.condition  # what encode_request maps {"class": "Mild"} with

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(sample.shape[0])
        if self.config.formulation == "edm":  # diffusers' c_noise = 0.25 ln σ → ours, ln σ mapped onto 0..1000
            lo, hi = math.log(self.config.sigma_min), math.log(self.config.sigma_max)
            t = (4 * t - lo) / (hi - lo) * 1000
        return self.net(sample, t, cond)


@dataclass
class BrainfusionOutput(BaseOutput):
    images: np.ndarray  # uint8 (N, H, W) or (N, C, H, W)


class BrainfusionPipeline(DiffusionPipeline):
    """Sampling of an exported model, conditional or not; image i of a seed matches `brainfusion sample`'s."""

    def __init__(self, unet: BrainfusionUNet, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "BrainfusionPipeline":
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():
            verify_export(folder)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @torch.no_grad()
    def __call__(self, num_images: int = 16, seed: int = 0, num_inference_steps: int = 50, first_index: int = 0,
                 output_type: str = "uint8", condition: Request | None = None, guidance_scale: float = 1.0) -> BrainfusionOutput:
        """`output_type` "uint8" (default) or "pt" (float tensor in [-1, 1], before quantisation).

        `condition` (a conditional export) is what brainfusion's `Pipeline` takes: {name: value} for every image,
        e.g. {"class": "ModerateDemented", "level": 0.6}, a list of one per image, or an encoded tensor; names
        left out are not conditioned on. `guidance_scale`: classifier-free guidance, 1 the plain conditional
        model, 0 the unconditional one, above 1 stronger.
        """
        cond = encode_guided_request(self.unet.conditions, condition, num_images, guidance_scale)
        network = self.unet if cond is None else classifier_free_guidance(self.unet, cond.to(self.unet.device), guidance_scale)
        model = self.unet.config.model
        shape = (num_images, model["in_channels"], model["image_size"], model["image_size"])
        x = randn(shape, image_generators(seed, range(first_index, first_index + num_images))).to(self.unet.device)
        self.scheduler.set_timesteps(num_inference_steps)
        # EDM starts at σ_max, not diffusers' init_noise_sigma √(σ_max² + 1)
        x = x * (float(self.scheduler.sigmas[0]) if isinstance(self.scheduler, EDMEulerScheduler) else self.scheduler.init_noise_sigma)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = network(self.scheduler.scale_model_input(x, t), t.reshape(1).expand(num_images))
            x = self.scheduler.step(out, t, x).prev_sample
        x = x.clamp(-1, 1).cpu()
        return BrainfusionOutput(images=x if output_type == "pt" else to_uint8(x))


def make_export_pipeline(model: UNet, config: RunConfig) -> BrainfusionPipeline:
    """The diffusers pipeline of a trained network and its run config (the condition vocabulary travels in the unet's)."""
    d, raw = config.diffusion, config.to_dict()
    unet = BrainfusionUNet(model=raw["model"], formulation=d.formulation, sigma_min=d.sigma_min, sigma_max=d.sigma_max,
                           condition=raw["condition"] if config.condition.fitted else None)
    unet.net.load_state_dict(model.state_dict())
    if d.formulation == "edm":
        scheduler = EDMEulerScheduler(sigma_min=d.sigma_min, sigma_max=d.sigma_max, sigma_data=d.sigma_data, rho=d.rho,
                                      prediction_type="epsilon", sigma_schedule="karras", final_sigmas_type="zero")
    else:
        scheduler = make_scheduler(d, "ddim")
    return BrainfusionPipeline(unet=unet.eval(), scheduler=scheduler)


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


def export_run(checkpoint: Path | str, out: Path | str, metrics: Path | None = None) -> Path:
    """Write `checkpoint`'s EMA network as a diffusers folder at `out` (replaced whole, atomically), with its model card."""
    from .checkpoint import run_folder
    from .modelcard import model_card
    from .pipeline import load_model

    model, state = load_model(Path(checkpoint))  # a run folder resolves to its newest checkpoint
    card = model_card(state.config, state.step, run_folder(state.path), str(out), metrics)
    pipe = make_export_pipeline(model, state.config)
    out = Path(out)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    (staging / MANIFEST).write_text(json.dumps({"checkpoint": str(state.path), "step": state.step, "sha256": _digests(staging)}, indent=2))
    (staging / "README.md").write_text(card)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out
