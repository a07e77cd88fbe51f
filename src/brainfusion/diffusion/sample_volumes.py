"""Write a volume run's samples: NIfTI volumes, a three-plane montage and a GIF through the axial slices.

The volumes come from `Pipeline.volumes` (in memory); this module only writes them, as sample.py does for
slices. Each is a uint8 `volume_<index>.nii.gz` with the run's grid affine (data/volumes.grid_affine: RAS+,
data.spacing mm, centred on the world origin) in qform and sform, so ITK-SNAP and FSLeyes open it the right
way up and to scale. A run trained with tissue masks writes each volume's labels beside it as
`volume_<index>_dseg.nii.gz` (the run's label values, BIDS's name for a segmentation) on the same grid, and their
three planes as labels_montage.png. Volume i of a seed is the same in any batch size or process count; under torchrun,
batch b is drawn by rank b mod W, and rank 0 reads the first volumes back for the pictures.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import distributed as dist
from ..checkpoint import fault_injection_point
from ..data.channels import label_image
from ..data.volumes import grid_affine, to_ras_voxels
from ..errors import BrainfusionError
from ..images import axial_frames, save_gif, save_nifti, save_png, volume_montage
from .pipeline import Pipeline

PICTURED = 4  # volumes shown in the montage and the GIF


def volume_path(out_dir: Path, index: int, labels: bool = False) -> Path:
    """Where volume `index` (or its tissue labels) goes: one name per global index, so ranks never clash."""
    return out_dir / f"volume_{index:04d}{'_dseg' if labels else ''}.nii.gz"


def _check_request(cfg) -> None:
    """Options that belong to slices: one sentence naming them."""
    slice_only = [name for name, value in (("given_mask", cfg.given_mask), ("mask_model", cfg.mask_model),
                                           ("upsampler", cfg.upsampler)) if value]
    if slice_only:
        raise BrainfusionError(f"{cfg.checkpoint} is a volume run, which takes no {', '.join(slice_only)}; leave them out.")


def draw_volumes(cfg, pipe: Pipeline, steps: int, out_dir: Path, ctx: dist.Context, progress: bool) -> dict:
    """This process's batches of volumes into out_dir; rank 0 then checks every volume is there and draws the pictures."""
    _check_request(cfg)
    data = pipe.config.data
    affine = grid_affine(data.grid, data.spacing)
    batch = min(cfg.batch_size, cfg.n_images)
    mine = list(range(ctx.rank, -(-cfg.n_images // batch), ctx.world))
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        rounds = sum(p.config.slab.rounds(data.grid) for p in (pipe, pipe.image_source) if p is not None)
        bar = tqdm(total=len(mine) * steps * rounds, unit="step", desc=f"sampling volumes {cfg.sampler}-{steps}", dynamic_ncols=True)
    t0 = time.monotonic()
    for b in mine:
        start = b * batch
        count = min(batch, cfg.n_images - start)
        volumes, labels = pipe.volume_pairs(count, cfg.seed, cfg.sampler, steps, count, start, progress=bar.update if bar else None,
                                            condition=cfg.condition, guidance=cfg.guidance)
        for i, volume in enumerate(volumes):
            if labels is not None:
                save_nifti(to_ras_voxels(label_image(labels[i], data.mask_values)), affine, volume_path(out_dir, start + i, True))
            save_nifti(to_ras_voxels(volume), affine, volume_path(out_dir, start + i))
        fault_injection_point(f"sample:{b}")
    if bar is not None:
        bar.close()
    seconds = time.monotonic() - t0
    dist.barrier(ctx)
    done = sum(min(batch, cfg.n_images - b * batch) for b in mine)
    result = {"out_dir": str(out_dir), "volumes": str(volume_path(out_dir, 0).parent), "seconds": seconds,
              "seconds_per_volume": seconds / max(1, done)}
    if ctx.is_main:
        result.update(_pictures(cfg, out_dir, bool(pipe.config.mask_labels)))
    return result


def _pictures(cfg, out_dir: Path, labels: bool) -> dict:
    """Check every process's volumes are there; the first PICTURED ones' three planes as montage.png (their labels' as
    labels_montage.png), and a GIF through their axial slices, read back from the files (another process may have
    drawn them)."""
    import nibabel as nib

    files = [volume_path(out_dir, i, kind) for kind in (False, True)[: 1 + labels] for i in range(cfg.n_images)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise BrainfusionError(f"{len(missing)} of the {len(files)} volume files (e.g. {missing[0]}) are missing after every process "
                               "finished; with several nodes, the output folder must be on a filesystem all of them share.")
    def first(kind: bool) -> np.ndarray:  # the first PICTURED volumes (or label volumes), read back
        return np.stack([to_ras_voxels(np.asarray(nib.load(str(volume_path(out_dir, i, kind))).dataobj, dtype=np.uint8))
                         for i in range(min(PICTURED, cfg.n_images))])

    shown = first(False)
    result = {"montage": str(save_png(volume_montage(shown), out_dir / "montage.png"))}
    if labels:
        result["labels_montage"] = str(save_png(volume_montage(first(True)), out_dir / "labels_montage.png"))
    if cfg.gif:
        result["gif"] = str(save_gif(axial_frames(shown), out_dir / "axial.gif"))
    return result
