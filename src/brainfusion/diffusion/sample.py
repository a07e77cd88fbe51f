"""Generate slices from a checkpoint: a grid PNG, the individual PNGs, and a GIF of the reverse process.

The images come from `pipeline.Pipeline` (in memory); this module only writes them. Image i of a
seed is the same in any batch size or process count (per-image noise); under torchrun, global
batch b is handled by rank b mod W, and names (sample_<index>.png) never clash.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..checkpoint import run_folder
from ..errors import BrainfusionError
from ..images import make_grid, save_gif, save_grid, save_png
from .pipeline import Pipeline, load_model
from .process import default_steps

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
    condition: dict[str, str] | None = None  # conditional models: {name: value}, see Pipeline.__call__
    guidance: float = 1.0  # classifier-free guidance scale


def generate(cfg: SampleConfig, progress: bool = True) -> dict:
    """Sample cfg.n_images images into files; returns where the grid, PNGs and GIF went."""
    if cfg.n_images <= 0 or cfg.batch_size <= 0:
        raise BrainfusionError(f"n_images={cfg.n_images} and batch_size={cfg.batch_size} must both be positive.")
    torch.set_flush_denormal(True)
    ctx = dist.init()
    model, state = load_model(Path(cfg.checkpoint), cfg.use_ema, ctx.device)
    pipe = Pipeline(model, state.config, ctx.device, cfg.precision)
    steps = cfg.steps or default_steps(state.config.diffusion, cfg.sampler)
    run_dir = run_folder(state.path)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "samples" / (f"{cfg.sampler}-{steps}" + _condition_suffix(cfg))
    images_dir = out_dir / "images"
    n_batches = -(-cfg.n_images // cfg.batch_size)
    mine = list(range(ctx.rank, n_batches, ctx.world))
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine) * steps, unit="step", desc=f"sampling {cfg.sampler}-{steps}", dynamic_ncols=True)
    t0 = time.monotonic()
    gif_path = None

    def write_gif(start: int, frames: list[np.ndarray]) -> None:
        nonlocal gif_path
        gif_path = save_gif([make_grid(f[:16]) for f in frames], out_dir / "reverse_process.gif")

    for b in mine:
        start = b * cfg.batch_size
        count = min(cfg.batch_size, cfg.n_images - start)
        want_gif = cfg.gif and b == 0
        images = pipe(count, cfg.seed, cfg.sampler, steps, batch_size=count, first_index=start,
                      frames=cfg.gif_frames if want_gif else 0, on_frames=write_gif if want_gif else None,
                      progress=bar.update if bar else None, condition=cfg.condition, guidance=cfg.guidance)
        for i, image in enumerate(images):
            save_png(image, sample_path(images_dir, start + i))
    if bar is not None:
        bar.close()
    seconds = time.monotonic() - t0
    dist.barrier(ctx)
    done = sum(min(cfg.batch_size, cfg.n_images - b * cfg.batch_size) for b in mine)
    result = {"out_dir": str(out_dir), "images": str(images_dir), "seconds": seconds, "seconds_per_image": seconds / max(1, done)}
    if ctx.is_main:
        result.update(_collect(cfg, images_dir, out_dir, gif_path))
    dist.shutdown(ctx)
    return result


def _condition_suffix(cfg: SampleConfig) -> str:
    """Default folder name part of a conditional request (`-class=ModerateDemented-g2`), so samples of
    different conditions and guidance scales do not overwrite each other."""
    parts = [f"{k}={v}" for k, v in (cfg.condition or {}).items()] + ([f"g{cfg.guidance:g}"] if cfg.guidance != 1 else [])
    return "".join("-" + re.sub(r"[^A-Za-z0-9._=+-]", "_", part) for part in parts)


def _collect(cfg: SampleConfig, images_dir: Path, out_dir: Path, gif_path: Path | None) -> dict:
    """Check every process's images are there, and tile the first GRID_MAX into the grid."""
    files = [sample_path(images_dir, i) for i in range(cfg.n_images)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise BrainfusionError(
            f"{len(missing)} of the {cfg.n_images} images (e.g. {missing[0]}) are missing after every process finished; "
            "with several nodes, the output folder must be on a filesystem all of them share."
        )
    from PIL import Image

    stack = np.stack([np.asarray(Image.open(f).convert("L")) for f in files[:GRID_MAX]])
    result = {"grid": str(save_grid(stack, out_dir / "grid.png"))}
    if gif_path:
        result["gif"] = str(gif_path)
    return result
