"""Training the autoencoder of latent diffusion: L1 + SSIM + a small KL, then a patch adversarial loss.

The loop has the guarantees of diffusion training (train.py): every batch, crop, flip and posterior
draw is keyed by (seed, step), checkpoints are safetensors + JSON written atomically (SIGKILL-safe),
SIGINT/SIGTERM write a last checkpoint, and a resumed run retraces the uninterrupted one bitwise.
The losses follow MONAI's 2D brain LDM tutorial (L1, KL weight 1e-6, least-squares PatchGAN loss
at weight 0.01 after a warm-up), with SSIM in place of the perceptual network, which would need a
download; the Inception network of FID is never used as a loss (it would game the ruler).

At the end the run scores held-out slices and writes `ae_metrics.json`: PSNR and SSIM inside the
brain and rFID (Inception FID of reconstructions against their originals).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import AUTOENCODER, latest_checkpoint, load_checkpoint, load_weights, save_checkpoint, tidy_run_folder
from ..config import AutoencoderRunConfig, DataConfig, config_differences
from ..data.channels import to_model_range, to_uint8
from ..data.slices import BatchStream, is_oasis_layout, load_slices
from ..errors import BrainfusionError
from ..evaluation.metrics.distances import ssim_maps
from ..fileio import atomic_write_text, lock_folder
from ..images import make_grid, save_png
from ..models.autoencoder import build_autoencoder, build_discriminator, encode_sample, encoder_modules, kl_divergence, start_from
from ..runtime import choose_channels_last, choose_precision
from ..seeding import seeded_generator
from .runlog import RunLog
from .train import TrainResult, _count_nonfinite, _StopSignal, checkpoint_to_resume, lr_at, optimizer_to

log = logging.getLogger(__name__)



@dataclass
class AutoencoderSession:
    config: AutoencoderRunConfig
    stream: BatchStream
    ae: torch.nn.Module
    disc: torch.nn.Module
    optimizer: torch.optim.Optimizer  # one Adam, two parameter groups: the autoencoder's and the discriminator's
    device: torch.device
    dtype: torch.dtype | None
    memory_format: torch.memory_format
    start_step: int
    max_steps: int | None
    deadline: float | None
    preview: torch.Tensor  # fixed training slices the previews reconstruct


def _resume(config: AutoencoderRunConfig, resume: bool):
    newest = checkpoint_to_resume(config.train.out_dir, resume)
    if newest is None:
        return None
    state = load_checkpoint(newest, kind=AUTOENCODER)
    if config.autoencoder.decoder_of:  # recorded at the start of the fine-tune; its source need not exist any more
        config.autoencoder.decoder_of_sha256 = state.config.autoencoder.decoder_of_sha256
    if state.config.autoencoder != config.autoencoder or state.config.data.image_size != config.data.image_size:
        differ = config_differences(*({"autoencoder": c.autoencoder, "data.image_size": c.data.image_size}
                                      for c in (state.config, config)))
        raise BrainfusionError(f"{newest} was trained with {differ}; resume with the same config (see "
                               f"{newest.with_suffix('.json')}).")
    return state


def set_up(config: AutoencoderRunConfig, resume: bool, progress: bool) -> AutoencoderSession:
    tcfg = config.train
    state = _resume(config, resume)
    tidy_run_folder(Path(tcfg.out_dir), tcfg.keep_checkpoints)
    slices = load_slices(config.data, progress=progress)
    stream = BatchStream(slices.images, tcfg.batch_size, tcfg.seed, config.data.hflip)
    torch.manual_seed(tcfg.seed)
    ae, disc = build_autoencoder(config.autoencoder), build_discriminator(config.autoencoder)
    if config.autoencoder.decoder_of:
        if state is None:
            start_from(ae, config.autoencoder, config.data.image_size)
        for part in encoder_modules(ae):
            part.requires_grad_(False)
    trainable = [p for p in ae.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": trainable}, {"params": disc.parameters()}], lr=tcfg.lr, betas=(0.5, 0.9))
    if state is not None:
        load_weights(ae, {k[4:]: v for k, v in state.model.items() if k.startswith("vae.")}, state.path)
        load_weights(disc, {k[5:]: v for k, v in state.model.items() if k.startswith("disc.")}, state.path)
        optimizer.load_state_dict(state.optimizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = choose_precision(tcfg.precision, device)
    if dtype == torch.float16:  # no loss scaler for two optimisers here: fp16 GPUs train this stage in fp32
        dtype = None
    memory_format = torch.channels_last if choose_channels_last(tcfg.channels_last, device, dtype) else torch.contiguous_format
    ae.to(device, memory_format=memory_format)
    disc.to(device, memory_format=memory_format)
    optimizer_to(optimizer, device)
    budget = [s for s in (tcfg.max_steps, math.ceil(tcfg.epochs * stream.steps_per_epoch) if tcfg.epochs else 0) if s]
    n_params = sum(p.numel() for p in trainable)
    log.info("autoencoder: %.2f M parameters trained%s, %dx compression per side, %d latent channels; %d slices of %d², crops of %s, on %s (%s)",
             n_params / 1e6, f" (the decoder of {config.autoencoder.decoder_of}; its encoder frozen)" if config.autoencoder.decoder_of else "",
             config.autoencoder.factor, config.autoencoder.latent_channels, len(slices), config.data.image_size,
             config.autoencoder.crop_size or "whole slices", device, f"{str(dtype).removeprefix('torch.')} autocast" if dtype else "fp32")
    Path(tcfg.out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(tcfg.out_dir) / "config.json", config.to_json())
    preview = torch.from_numpy(slices.images[:: max(1, len(slices) // 8)][:8].copy())
    return AutoencoderSession(config, stream, ae, disc, optimizer, device, dtype, memory_format,
                              state.step if state is not None else 0, min(budget) if budget else None,
                              time.monotonic() + tcfg.time_budget_min * 60 if tcfg.time_budget_min else None, preview)


def random_crops(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One size×size crop of each image, its corner drawn from `generator`."""
    if not size or size >= x.shape[-1]:
        return x
    corners = torch.randint(0, x.shape[-1] - size + 1, (len(x), 2), generator=generator).tolist()
    return torch.stack([img[:, r : r + size, c : c + size] for img, (r, c) in zip(x, corners)])


def ssim_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 − mean SSIM of slices in [−1, 1]: exactly MONAI's `SSIMLoss(spatial_dims=2, data_range=2)` (11-px Gaussian
    window, σ 1.5), computed in fp32 with separable banded matrix products. At batch 8 of 256² it takes 0.032 s
    forward and backward on the 2-core development CPU against MONAI's 0.41 s (a single-channel 11×11 conv), which
    had been 60 % of the autoencoder's step."""
    return 1 - ssim_maps(recon.float(), x.float(), 11, 1.5, k1=0.01 * 2, k2=0.03 * 2)[0].mean()


def scale_equivariance_loss(ae: torch.nn.Module, z: torch.Tensor, x: torch.Tensor, autocast) -> torch.Tensor:
    """L1 between the decoded 2×-average-pooled latent and the 2×-average-pooled slice (Skorokhodov et al. 2025).

    A latent that decodes correctly when coarsened holds the slice's structure at every scale and no
    high-frequency code the slice lacks; such latents are easier for a diffusion model to learn. At weight
    1 on the 2-core CPU (20.2 img/s against 24.7), the 60-minute latent route's FD_domain fell from 0.384 to
    0.313 and its FID from 188.4 to 181.6, for 0.7 dB of reconstruction; at 120 minutes FD_domain 0.297 but
    FID 148.6 against 143.0 without it, within the noise of n = 500, so it is off by default (docs/research/latent.md)."""
    pool = torch.nn.functional.avg_pool2d
    with autocast:
        coarse = ae.decode(pool(z, 2)).float()
    return (coarse - pool(x.float(), 2)).abs().mean()


def autoencoder_step(s: AutoencoderSession, step: int) -> torch.Tensor:
    """One generator step and (once the adversarial loss is on) one discriminator step; returns the generator loss."""
    from monai.losses import PatchAdversarialLoss

    cfg, tcfg = s.config.autoencoder, s.config.train
    x = random_crops(s.stream.batch(step), cfg.crop_size, seeded_generator(tcfg.seed, 4, step))
    x = x.to(s.device, memory_format=s.memory_format)
    adversarial = cfg.adv_weight > 0 and step >= cfg.adv_start
    adv_loss = PatchAdversarialLoss(criterion="least_squares")
    for group in s.optimizer.param_groups:
        group["lr"] = lr_at(step, tcfg)
    autocast = torch.autocast(s.device.type, dtype=s.dtype or torch.float32, enabled=s.dtype is not None)
    with autocast:
        z, mu, sigma = encode_sample(s.ae, x, seeded_generator(tcfg.seed, 2, step))
        recon = s.ae.decode(z).float()
    # the losses in fp32: SSIM's variances (E[x²] − E[x]²) cancel catastrophically in bf16 (a NaN step on the CPU)
    loss = cfg.l1_weight * (recon - x).abs().mean() + cfg.kl_weight * kl_divergence(mu, sigma)
    if cfg.ssim_weight:
        loss = loss + cfg.ssim_weight * ssim_loss(recon, x)
    if cfg.scale_equivariance:
        loss = loss + cfg.scale_equivariance * scale_equivariance_loss(s.ae, z, x, autocast)
    if adversarial:
        with autocast:
            fooled = s.disc(recon.contiguous())[-1].float()
        loss = loss + cfg.adv_weight * adv_loss(fooled, target_is_real=True, for_discriminator=False)
    s.optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return loss.detach()
    loss.backward()
    for p in s.disc.parameters():
        p.grad = None  # the generator step moves the autoencoder alone
    torch.nn.utils.clip_grad_norm_([p for p in s.ae.parameters() if p.requires_grad], tcfg.grad_clip)
    s.optimizer.step()
    if adversarial:
        with autocast:
            fake, real = s.disc(recon.detach().contiguous())[-1].float(), s.disc(x.contiguous())[-1].float()
        d_loss = 0.5 * (adv_loss(fake, target_is_real=False, for_discriminator=True) + adv_loss(real, target_is_real=True, for_discriminator=True))
        s.optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(d_loss):
            (cfg.adv_weight * d_loss).backward()
            torch.nn.utils.clip_grad_norm_(s.disc.parameters(), tcfg.grad_clip)
            s.optimizer.step()
    return loss.detach()


@torch.no_grad()
def reconstruct(ae: torch.nn.Module, images: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype | None,
                batch_size: int = 16) -> np.ndarray:
    """uint8 slices → their uint8 reconstructions through the posterior mean."""

    images = torch.as_tensor(np.asarray(images))
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start : start + batch_size]).to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out.append(to_uint8(ae.decode(ae.encode(x)[0]).float().cpu()))
    return np.concatenate(out)


def _preview(s: AutoencoderSession, path: Path) -> None:
    was = s.ae.training
    s.ae.eval()
    recon = reconstruct(s.ae, s.preview, s.device, s.dtype)
    s.ae.train(was)
    save_png(make_grid(np.concatenate([s.preview.numpy(), recon]), nrow=len(recon)), path)


def train_autoencoder(config: AutoencoderRunConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train an autoencoder as `config` says; checkpoints, log, previews and ae_metrics.json go to train.out_dir,
    which this process holds until it returns (fileio.lock_folder)."""
    config.validate()
    with lock_folder(config.train.out_dir, "train.out_dir"):
        return _train_autoencoder(config, resume, progress)


def _train_autoencoder(config: AutoencoderRunConfig, resume: bool, progress: bool) -> TrainResult:
    tcfg = config.train
    torch.set_flush_denormal(True)
    s = set_up(config, resume, progress)
    out_dir = Path(tcfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    runlog = RunLog(out_dir / "train_log.csv", s.start_step, s.max_steps, s.deadline, s.stream.steps_per_epoch, show=progress,
                    tensorboard=out_dir / "tensorboard" if tcfg.logger == "tensorboard" else None)
    step, nonfinite_run, last_ckpt = s.start_step, 0, latest_checkpoint(ckpt_dir) if resume else None

    def checkpoint_now() -> Path:
        weights = {**{f"vae.{k}": v for k, v in s.ae.state_dict().items()}, **{f"disc.{k}": v for k, v in s.disc.state_dict().items()}}
        return save_checkpoint(ckpt_dir, step, config, weights, {}, s.optimizer.state_dict(), keep=tcfg.keep_checkpoints)

    interrupted = False
    s.ae.train()
    s.disc.train()
    with _StopSignal() as stop, contextlib.closing(runlog):
        while not ((s.max_steps is not None and step >= s.max_steps) or runlog.over_time()):
            if stop.received is not None:
                interrupted = True
                break
            loss = autoencoder_step(s, step)
            nonfinite_run = _count_nonfinite(loss, nonfinite_run, step, tcfg.max_nonfinite, last_ckpt)
            step += 1
            runlog.step(step, float(loss), lr_at(step - 1, tcfg), tcfg.batch_size, 0, tcfg.log_every)
            if step % tcfg.checkpoint_every == 0 and nonfinite_run == 0:
                last_ckpt = checkpoint_now()
                runlog.plot_loss(out_dir / "loss.png")
            if tcfg.sample_every and step % tcfg.sample_every == 0:
                _preview(s, out_dir / "samples" / f"step_{step:08d}.png")
    if nonfinite_run == 0 and (last_ckpt is None or not last_ckpt.name.endswith(f"{step:08d}.safetensors")):
        last_ckpt = checkpoint_now()
    runlog.plot_loss(out_dir / "loss.png", force=True)
    _preview(s, out_dir / "reconstructions.png")
    if interrupted:
        log.info("interrupted at step %d; newest checkpoint %s — continue with --resume", step, last_ckpt)
    else:
        metrics = score_autoencoder(s.ae.eval(), config, s.device, s.dtype, progress)
        if metrics is not None:
            atomic_write_text(out_dir / "ae_metrics.json", json.dumps({"step": step, **metrics}, indent=2))
            log.info("held-out reconstruction: PSNR %.2f dB, SSIM %.4f inside the brain, rFID %s", metrics["psnr_brain"],
                     metrics["ssim_brain"], f"{metrics['rfid']:.2f}" if metrics.get("rfid") is not None else "skipped")
    return TrainResult(out_dir, step, last_ckpt, interrupted, runlog.images_per_s)


def _heldout(config: AutoencoderRunConfig) -> DataConfig | None:
    if config.score.heldout:
        return DataConfig(path=config.score.heldout, image_size=config.data.image_size, split="all",
                          cache_dir=config.data.cache_dir, on_bad_file=config.data.on_bad_file)
    if is_oasis_layout(Path(config.data.path)) and config.data.split == "train":
        return DataConfig(path=config.data.path, image_size=config.data.image_size, split="validate",
                          cache_dir=config.data.cache_dir, on_bad_file=config.data.on_bad_file)
    return None


def score_autoencoder(ae, config: AutoencoderRunConfig, device: torch.device, dtype, progress: bool = False) -> dict | None:
    """PSNR and SSIM inside the brain, and rFID, of held-out slices' reconstructions (None: no held-out set)."""
    from ..evaluation.evaluate import EvalConfig, inception_distance
    from ..evaluation.metrics.distances import fidelity_inside_brain

    source = _heldout(config)
    if source is None:
        log.warning("no held-out slices to score the autoencoder on (give score.heldout); ae_metrics.json is not written")
        return None
    images = load_slices(source, progress=False).images
    images = images[np.linspace(0, len(images) - 1, min(config.score.n, len(images))).round().astype(int)]
    recon = reconstruct(ae, images, device, dtype)
    l1 = float(np.abs(recon.astype(np.float32) - images.astype(np.float32)).mean() / 255)
    metrics = {"n": len(images), "heldout": source.path, **fidelity_inside_brain(recon, images), "l1": l1, "rfid": None}
    if config.score.inception and len(images) >= 2:
        fid = inception_distance(recon, images, EvalConfig(resolution=config.data.image_size, inception=True, progress=progress,
                                                           inception_samples=len(images), kid_subset_size=min(1000, len(images))))
        metrics["rfid"] = None if fid.get("skipped") else fid["FID"]
    return metrics
