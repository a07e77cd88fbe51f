"""Generate slices from a checkpoint: a grid PNG, the individual PNGs, and a GIF of the reverse process.

The images come from `pipeline.Pipeline` (in memory); this module only writes them. Image i of a
seed is the same in any batch size or process count (per-image noise); under torchrun, global
batch b is handled by rank b mod W, and names (sample_<index>.png) never clash.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..checkpoint import fault_injection_point, run_folder
from ..config import FAST_SAMPLER, DataConfig
from ..data.channels import label_image, label_indices
from ..data.masks import fit_square_labels, to_label_index
from ..data.slices import IMAGE_SUFFIXES, decode_slice, discover_files, load_set, load_slices, read_slice
from ..errors import BrainfusionError
from ..fileio import atomic_write_text, lock_folder
from ..images import make_grid, overlay_labels, save_gif, save_grid, save_nifti_slice, save_png
from ..models.latent import use_decoder
from .pipeline import Pipeline, load_model
from .process import default_steps
from .sample_volumes import draw_volumes

log = logging.getLogger(__name__)

GRID_MAX = 256  # the grid shows the first 256 images (a 10,000-image FID run needs no 10,000-tile picture)


def sample_path(images_dir: Path, index: int) -> Path:
    """Where image `index` of a run goes: one name per global index, so ranks never clash."""
    return images_dir / f"sample_{index:05d}.png"


def mask_path(images_dir: Path, index: int) -> Path:
    """Where the tissue mask of image `index` goes (OASIS's seg_* naming), beside it."""
    return images_dir / f"seg_{index:05d}.png"


def _write_pair(images_dir: Path, index: int, image: np.ndarray, mask: np.ndarray | None, nifti_mm: float) -> None:
    """Image `index` (and its mask) as PNG, and as NIfTI too when `nifti_mm` > 0."""
    for picture, path in ((image, sample_path(images_dir, index)), (mask, mask_path(images_dir, index))):
        if picture is not None:
            save_png(picture, path)
            if nifti_mm > 0:
                save_nifti_slice(picture, path.with_suffix(".nii.gz"), nifti_mm)


def read_generated(folder: str | Path, image_size: int, on_bad_file: str = "fail") -> np.ndarray:
    """The images of a generated folder: `sample`'s sample_*.png when it has them (never the seg_*.png masks
    beside them), else every slice the folder holds."""
    root = Path(folder)
    samples = sorted(root.glob("sample_*.png")) if root.is_dir() else []
    if not samples:
        return load_set(root, "all", image_size, on_bad_file).images
    return np.stack([read_slice(path, image_size) for path in samples])


def read_given_masks(path: str, values: tuple[int, ...], size: int) -> np.ndarray:
    """Label indices (M, size, size) of a mask PNG, or of every mask image in a folder (sorted by name); a folder
    `sample` wrote, which holds images beside their masks, gives its seg_*.png."""
    root = Path(path)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else [root]
    files = [f for f in files if f.name.startswith("seg_")] or files
    if not files or not all(f.is_file() for f in files):
        raise BrainfusionError(f"{path} is neither a mask image nor a folder holding some; give a seg PNG or a folder of them.")
    from PIL import Image

    masks = []
    for f in files:
        try:
            with Image.open(f) as img:
                mask = np.asarray(img.convert("L") if img.mode in ("RGB", "RGBA", "LA") else img).astype(np.int64)
            masks.append(fit_square_labels(to_label_index(mask, values, f), len(values), size))
        except ValueError as exc:
            raise BrainfusionError(f"{f}: {str(exc).removeprefix('its ')}.") from None
        except OSError as exc:
            raise BrainfusionError(f"{f} could not be read as a mask image ({exc}); give seg PNGs.") from None
    return np.stack(masks)


@dataclass
class SampleConfig:
    checkpoint: str = "runs/demo"
    out_dir: str = ""  # default: <run>/samples/<sampler>-<steps>
    n_images: int = 64
    batch_size: int = 64
    seed: int = 0
    sampler: str = FAST_SAMPLER  # as the Python Pipeline, `evaluate` and the export draw; "ddpm": the seed's full chain
    steps: int = 0  # 0: process.default_steps, FAST_STEPS (25), or the whole chain (1,000) for DDPM
    gif: bool = True
    gif_frames: int = 60
    use_ema: bool = True
    precision: str = "auto"
    condition: dict[str, str] | None = None  # conditional models: {name: value}, see Pipeline.__call__
    guidance: float = 1.0  # classifier-free guidance scale
    autoguidance: float = 1.0  # autoguidance weight (Pipeline.use_guide) of every stage but a cascade's upsampler; 1: none
    guide: str = ""  # the guide's checkpoint; default: the one the run kept at train.guide_at
    decoder: str = ""  # latent runs: decode through this decoder fine-tune of the run's autoencoder (models.latent.use_decoder)
    given_mask: str = ""  # models trained with masks: a seg PNG or a folder of them; image i gets mask i mod M
    mask_model: str = ""  # or: a joint run whose drawn masks this model makes its images for (Pipeline.use_mask_source)
    image_model: str = ""  # label models: an image-only run whose images this model draws labels for (Pipeline.use_image_source)
    nifti_mm: float = 0.0  # > 0: each image (and mask) also as a .nii.gz of this pixel size in mm, beside the PNGs
    upsampler: str = ""  # a cascade: an upsampler run every image is brought up through (Pipeline.use_upsampler)
    upsample_augment: float | None = None  # its low-resolution slices' noise level; None: the upsampler's upsample.augment


def generate(cfg: SampleConfig, progress: bool = True) -> dict:
    """Sample cfg.n_images images (a volume run: volumes) into files; returns where the grid, PNGs and GIF went
    (a volume run: the NIfTI files, the three-plane montage and the axial GIF, sample_volumes.py)."""
    if cfg.n_images <= 0 or cfg.batch_size <= 0:
        raise BrainfusionError(f"n_images={cfg.n_images} and batch_size={cfg.batch_size} must both be positive.")
    torch.set_flush_denormal(True)
    ctx = dist.init()
    pipe, steps, given = _prepare(cfg, ctx.device)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_folder(pipe.checkpoint) / "samples" / (f"{cfg.sampler}-{steps}" + _condition_suffix(cfg))
    # rank 0 holds the folder for every rank; the lock lies beside it, so the folder holds the samples alone
    with lock_folder(out_dir, beside=True) if ctx.is_main else contextlib.nullcontext():
        if pipe.config.data.volumes:  # NIfTI volumes and their pictures
            result = draw_volumes(cfg, pipe, steps, out_dir, ctx, progress)
        else:
            result = _draw(cfg, pipe, steps, given, out_dir, ctx, progress)
    dist.shutdown(ctx)
    return result


def _prepare(cfg: SampleConfig, device: torch.device) -> tuple[Pipeline, int, np.ndarray | None]:
    """The checkpoint's pipeline with every source and guide the request names, its step count and any given masks."""
    model, state = load_model(Path(cfg.checkpoint), cfg.use_ema, device)
    if cfg.decoder:
        use_decoder(state.config, cfg.decoder)
    pipe = Pipeline(model, state.config, device, cfg.precision)
    pipe.checkpoint = state.path
    steps = cfg.steps or default_steps(state.config.diffusion, cfg.sampler)
    given = None
    if cfg.given_mask and cfg.mask_model:
        raise BrainfusionError("give the masks either as files (given_mask) or as a joint run to draw them from (mask_model), not both.")
    if cfg.image_model and (cfg.given_mask or cfg.mask_model):
        raise BrainfusionError("a label model takes its images from an image model (image_model); it makes no images for "
                               "masks, so leave out given_mask and mask_model.")
    if cfg.mask_model:
        pipe.use_mask_source(Pipeline.from_checkpoint(cfg.mask_model, cfg.use_ema, device, cfg.precision))
    if cfg.image_model:
        pipe.use_image_source(Pipeline.from_checkpoint(cfg.image_model, cfg.use_ema, device, cfg.precision))
    if cfg.upsampler:
        pipe.use_upsampler(Pipeline.from_checkpoint(cfg.upsampler, cfg.use_ema, device, cfg.precision), cfg.upsample_augment)
    if cfg.autoguidance != 1:
        pipe.use_kept_guides(cfg.autoguidance, cfg.guide or None, cfg.use_ema, cfg.precision)
    if cfg.given_mask:
        if not state.config.mask_labels:
            raise BrainfusionError(f"{state.path} was trained without masks; sample it without a given mask, or train with masks.")
        given = read_given_masks(cfg.given_mask, state.config.data.mask_values, state.config.data.image_size)
    return pipe, steps, given


def _draw(cfg: SampleConfig, pipe: Pipeline, steps: int, given: np.ndarray | None, out_dir: Path, ctx: dist.Context,
          progress: bool) -> dict:
    """This process's batches into out_dir/images; rank 0 then checks every process's files and writes the grid."""
    config = pipe.config
    images_dir = out_dir / "images"
    n_batches = -(-cfg.n_images // cfg.batch_size)
    mine = list(range(ctx.rank, n_batches, ctx.world))
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine) * steps * (2 if pipe.upsampler else 1), unit="step", desc=f"sampling {cfg.sampler}-{steps}", dynamic_ncols=True)
    t0 = time.monotonic()
    gif_path = None

    def write_gif(start: int, frames: list[np.ndarray]) -> None:
        nonlocal gif_path
        gif_path = save_gif([make_grid(f[:16]) for f in frames], out_dir / "reverse_process.gif")

    for b in mine:
        start = b * cfg.batch_size
        count = min(cfg.batch_size, cfg.n_images - start)
        want_gif = cfg.gif and b == 0
        mask = None if given is None else given[np.arange(start, start + count) % len(given)]
        images, labels = pipe.pairs(count, cfg.seed, cfg.sampler, steps, batch_size=count, first_index=start,
                                    frames=cfg.gif_frames if want_gif else 0, on_frames=write_gif if want_gif else None,
                                    progress=bar.update if bar else None, condition=cfg.condition, guidance=cfg.guidance,
                                    mask=mask)
        for i, image in enumerate(images):
            _write_pair(images_dir, start + i, image, None if labels is None else label_image(labels[i], config.data.mask_values),
                        cfg.nifti_mm)
        fault_injection_point(f"sample:{b}")
    if bar is not None:
        bar.close()
    seconds = time.monotonic() - t0
    dist.barrier(ctx)
    done = sum(min(cfg.batch_size, cfg.n_images - b * cfg.batch_size) for b in mine)
    result = {"out_dir": str(out_dir), "images": str(images_dir), "seconds": seconds, "seconds_per_image": seconds / max(1, done)}
    if ctx.is_main:
        result.update(_collect(cfg, images_dir, out_dir, gif_path, config.data.mask_values if config.mask_labels else ()))
    return result


def _condition_suffix(cfg: SampleConfig) -> str:
    """Default folder name part of a conditional request (`-class=ModerateDemented-g2`), so samples of
    different conditions and guidance scales do not overwrite each other."""
    parts = [f"{k}={v}" for k, v in (cfg.condition or {}).items()] + ([f"g{cfg.guidance:g}"] if cfg.guidance != 1 else [])
    parts += [f"given-{Path(cfg.given_mask).stem}"] if cfg.given_mask else []
    parts += [f"masks-{Path(cfg.mask_model).name}"] if cfg.mask_model else []
    parts += [f"images-{Path(cfg.image_model).name}"] if cfg.image_model else []
    parts += [f"ag{cfg.autoguidance:g}"] if cfg.autoguidance != 1 else []
    parts += [f"up-{Path(cfg.upsampler).name}"] if cfg.upsampler else []
    return "".join("-" + re.sub(r"[^A-Za-z0-9._=+-]", "_", part) for part in parts)


def _collect(cfg: SampleConfig, images_dir: Path, out_dir: Path, gif_path: Path | None, mask_values: tuple[int, ...]) -> dict:
    """Check every process's images (and masks) are there, and tile the first GRID_MAX into the grid,
    masks as coloured overlays."""
    files = [sample_path(images_dir, i) for i in range(cfg.n_images)]
    files += [mask_path(images_dir, i) for i in range(cfg.n_images)] if mask_values else []
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise BrainfusionError(
            f"{len(missing)} of the {cfg.n_images} images (e.g. {missing[0]}) are missing after every process finished; "
            "with several nodes, the output folder must be on a filesystem all of them share."
        )
    from PIL import Image

    shown = min(cfg.n_images, GRID_MAX)
    stack = np.stack([np.asarray(Image.open(f).convert("L")) for f in files[:shown]])
    if mask_values:
        labels = np.stack([label_indices(np.asarray(Image.open(mask_path(images_dir, i))), mask_values) for i in range(shown)])
        stack = overlay_labels(stack, labels)
    result = {"grid": str(save_grid(stack, out_dir / "grid.png"))}
    if gif_path:
        result["gif"] = str(gif_path)
    return result


def _check_upscalable(files: list[Path], small: int, size: int) -> None:
    """Refuse 2-D image files that are not small×small: the upsampler adds detail to slices of its own input size,
    and resizing them first would choose for the user what their pixels mean."""
    for f in files:
        if f.suffix.lower() in IMAGE_SUFFIXES:
            try:
                h, w = decode_slice(f).shape
            except (OSError, ValueError) as exc:
                raise BrainfusionError(f"{f} could not be read as a slice ({exc}); remove it or give a folder of readable slices.") from None
            if (h, w) != (small, small):
                raise BrainfusionError(f"{f} is {w}×{h} pixels, but this upsampler takes {small}×{small} slices (and makes "
                                       f"{size}×{size}); resize them to {small}×{small}, or use an upsampler trained from their size.")


def upscale_folder(checkpoint: str | Path, images: str | Path, out_dir: str | Path, seed: int = 0, sampler: str = FAST_SAMPLER,
                   steps: int = 0, batch_size: int = 64, augment: float | None = None, use_ema: bool = True,
                   precision: str = "auto", progress: bool = True) -> dict:
    """Bring a folder of low-resolution slices (any source `load_slices` reads; volumes are resliced at the upsampler's
    input size) up through an upsampler run: out_dir/images/sample_<i>.png, sources.csv (which file each came from)
    and grid.png."""
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Pipeline.from_checkpoint(checkpoint, use_ema, device, precision)
    up, size = pipe.config.upsample, pipe.config.data.image_size
    if not up.active:
        raise BrainfusionError(f"{pipe.checkpoint} is not an upsampler; give a run trained with upsample.from_size.")
    data = DataConfig(path=str(images), image_size=up.from_size, split="all", hflip=False)
    _check_upscalable(discover_files(data), up.from_size, size)
    slices = load_slices(data, progress=progress)
    steps = steps or default_steps(pipe.config.diffusion, sampler)
    out_dir = Path(out_dir)
    with lock_folder(out_dir, beside=True):
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=-(-len(slices) // batch_size) * steps, unit="step", desc=f"upscaling to {size}²", dynamic_ncols=True)
        made = pipe.upscale(slices.images, seed, sampler, steps, batch_size, augment=augment, progress=bar.update if bar else None)
        if bar is not None:
            bar.close()
        for i, image in enumerate(made):
            save_png(image, sample_path(out_dir / "images", i))
        rows = [f"{i},{source}" for i, source in enumerate(slices.sources)]
        atomic_write_text(out_dir / "sources.csv", "\n".join(["index,source", *rows]) + "\n")
        grid = save_grid(made[:GRID_MAX], out_dir / "grid.png")
    return {"out_dir": str(out_dir), "images": str(out_dir / "images"), "n": len(made), "grid": str(grid)}
