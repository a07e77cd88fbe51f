"""Generate slices from a checkpoint: a grid PNG, the individual PNGs, and a GIF of the reverse process.

Images are made in global batches of `batch_size`; batch b is seeded by (seed, b) and, under
torchrun, handled by rank b mod W. The output therefore does not depend on the number of
processes, and names (sample_<index>.png) never clash.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .checkpoint import load_checkpoint, load_weights
from .data import to_uint8
from .diffusion import sample
from .errors import BrainfusionError
from .images import make_grid, save_gif, save_grid, save_png
from .model import UNet
from .train import choose_precision, network_fn

log = logging.getLogger(__name__)

GRID_MAX = 256  # the grid shows the first 256 images (a 10,000-image FID run needs no 10,000-tile picture)


def sample_path(images_dir: Path, index: int) -> Path:
    """Where image `index` of a run goes: one name per global index, so ranks never clash."""
    return images_dir / f"sample_{index:05d}.png"


@dataclass
class SampleConfig:
    checkpoint: str = "runs/demo"
    out_dir: str = ""  # default: <run>/samples/<sampler>-<steps>
    n_images: int = 64
    batch_size: int = 64
    seed: int = 0
    sampler: str = "ddpm"
    steps: int = 0  # 0: 1000 for DDPM, 50 for DDIM / DPM-Solver++
    gif: bool = True
    gif_frames: int = 60
    use_ema: bool = True
    precision: str = "auto"


def load_model(checkpoint: Path, use_ema: bool = True, device: torch.device | None = None):
    """The checkpoint's network (EMA weights by default) in eval mode, and its run config."""
    state = load_checkpoint(checkpoint, with_optimizer=False)
    model = UNet(state.config.model)
    load_weights(model, state.ema if use_ema and state.ema else state.model, state.path)
    model.eval().to(device or torch.device("cpu"))
    return model, state


def generate(cfg: SampleConfig, progress: bool = True) -> dict:
    """Sample cfg.n_images images; returns where the grid, PNGs and GIF went."""
    if cfg.n_images <= 0 or cfg.batch_size <= 0:
        raise BrainfusionError("--n and --batch-size must be positive.")
    torch.set_flush_denormal(True)
    ctx = dist.init()
    model, state = load_model(Path(cfg.checkpoint), cfg.use_ema, ctx.device)
    dtype = choose_precision(cfg.precision, ctx.device)
    if dtype is not None or ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    steps = cfg.steps or (state.config.diffusion.timesteps if cfg.sampler == "ddpm" else 50)
    run_dir = state.path.parent.parent if state.path.parent.name == "checkpoints" else state.path.parent
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "samples" / f"{cfg.sampler}-{steps}"
    images_dir = out_dir / "images"
    size = state.config.model.image_size
    fn = network_fn(model, ctx.device, dtype)
    n_batches = -(-cfg.n_images // cfg.batch_size)
    mine = list(range(ctx.rank, n_batches, ctx.world))
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine) * steps, unit="step", desc=f"sampling {cfg.sampler}-{steps}", dynamic_ncols=True)
    t0 = time.monotonic()
    gif_path = None
    for b in mine:
        count = min(cfg.batch_size, cfg.n_images - b * cfg.batch_size)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + b)
        want_gif = cfg.gif and b == 0
        x, frames = sample(fn, state.config.diffusion, (count, 1, size, size), cfg.sampler, steps, gen,
                           frames=cfg.gif_frames if want_gif else 0, progress=bar.update if bar else None)
        for i, image in enumerate(to_uint8(x)):
            save_png(image, sample_path(images_dir, b * cfg.batch_size + i))
        if want_gif:
            shown = min(16, count)
            pictures = [make_grid(to_uint8(f[:shown].clamp(-1, 1))) for f in frames]
            gif_path = save_gif(pictures, out_dir / "reverse_process.gif")
    if bar is not None:
        bar.close()
    seconds = time.monotonic() - t0
    dist.barrier(ctx)
    result = {"out_dir": str(out_dir), "images": str(images_dir), "seconds": seconds,
              "seconds_per_image": seconds / max(1, sum(min(cfg.batch_size, cfg.n_images - b * cfg.batch_size) for b in mine))}
    if ctx.is_main:
        files = [sample_path(images_dir, i) for i in range(cfg.n_images)]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise BrainfusionError(
                f"{len(missing)} of the {cfg.n_images} images (e.g. {missing[0]}) are missing after every process finished; "
                "with several nodes, --out must be on a filesystem all of them share."
            )
        from PIL import Image

        stack = np.stack([np.asarray(Image.open(f).convert("L")) for f in files[:GRID_MAX]])
        result["grid"] = str(save_grid(stack, out_dir / "grid.png"))
        if gif_path:
            result["gif"] = str(gif_path)
    dist.shutdown(ctx)
    return result
