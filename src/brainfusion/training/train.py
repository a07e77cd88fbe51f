"""Training: set-up first, then a short loop of named phases around one `training_step`.

The objective is passed in, as in EDM's training_loop.py: `make_process(config.diffusion)` draws
the noise levels and computes the loss, VP or EDM alike. Every batch, noise draw and noise level is
a pure function of (seed, step) (`seeding.seeded_generator`), so a run resumed from a checkpoint
retraces the uninterrupted run exactly, and N processes (torchrun + DDP) each take their slice of
the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..checkpoint import GUIDE_FOLDER, fault_injection_point, latest_checkpoint, load_checkpoint, load_weights, save_checkpoint, tidy_run_folder
from ..config import RunConfig, config_differences
from ..data.channels import label_image, to_model_range, to_uint8
from ..data.conditions import drop_labels, inherit_vocabulary, label_slices, labelled_subset
from ..data.slices import BatchStream, load_slices
from ..data.volumes import load_volumes
from ..data.subjects import split_subjects
from ..diffusion.loss import channel_weights
from ..diffusion.pipeline import Pipeline
from ..diffusion.process import make_process
from ..diffusion.slabs import run_background, training_slabs
from ..diffusion.upsample import shrink, training_pair
from ..diffusion.wavelet import to_coefficients
from ..errors import BrainfusionError
from ..fileio import atomic_write_text, lock_folder
from ..images import make_grid, overlay_labels, save_png, volume_montage
from ..models.latent import LatentDecoder, attach_autoencoder, cached_latents, fit_statistics, normalise
from ..models.unet import UNet, count_parameters, training_flops_per_image
from ..runtime import choose_channels_last, choose_precision, make_grad_scaler
from ..runtime import memory_format as runtime_memory_format
from ..seeding import derive_seed, seeded_generator
from .runlog import RunLog

log = logging.getLogger(__name__)


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.shadow.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.shadow.buffers(), model.buffers()):
            ema_b.copy_(b)


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    checkpoint: Path | None
    interrupted: bool
    images_per_s: float


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag so the loop can write a final checkpoint and exit."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then constant, or a decay to 0 at max_steps: "cosine", a half cosine (Loshchilov & Hutter
    2017), or "wsd", constant until the last lr_decay_share of the steps, then linear (warmup-stable-decay, Hägele
    et al. 2024: the constant phase is the constant schedule's, so a run can be cooled down from its checkpoints)."""
    lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / cfg.max_steps)))
    elif cfg.lr_schedule == "wsd":
        lr *= min(1.0, max(0.0, (cfg.max_steps - step) / (cfg.lr_decay_share * cfg.max_steps)))
    return lr


@dataclass
class Session:
    """Everything the loop needs, decided once by `set_up`."""

    config: RunConfig
    ctx: dist.Context
    stream: BatchStream
    process: object  # NoiseSchedule or EDMProcess: draw_levels(n, generator), loss(net, x0, levels, noise, cond)
    model: torch.nn.Module
    forward: torch.nn.Module  # the model as the step calls it: DDP-wrapped and/or compiled
    ema: EMA
    optimizer: torch.optim.Optimizer
    dtype: torch.dtype | None
    memory_format: torch.memory_format
    start_step: int
    max_steps: int | None
    deadline: float | None
    skipped_total: int
    real_for_eval: np.ndarray
    scaler: torch.amp.GradScaler | None = None  # fp16 only; its state is checkpointed so resume stays exact
    decoder: LatentDecoder | None = None  # latent runs: turns previews' latents into slices
    preview_masks: np.ndarray | None = None  # a run given every mask: training masks its previews are made for
    preview_images: np.ndarray | None = None  # a run given every image: training images its previews label
    guide_kept: bool = False  # a time-budget run's guide (checkpoints/guide/) is written; read once, not every step


def checkpoint_to_resume(out_dir: str, resume: bool) -> Path | None:
    """The newest checkpoint of a run folder to continue from (None for a fresh run), refusing accidental
    reuse of a folder with checkpoints and a resume with none; every rank refuses, so none is left waiting."""
    ckpt_dir = Path(out_dir) / "checkpoints"
    newest = latest_checkpoint(ckpt_dir)
    if not resume:
        if newest is not None:
            raise BrainfusionError(f"{out_dir} already holds checkpoints; continue it (resume=True) or choose another train.out_dir.")
        return None
    if newest is None:
        raise BrainfusionError(f"{ckpt_dir} holds no checkpoint to resume from; start fresh (resume=False).")
    return newest


def optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move a (resumed) optimizer's moment tensors to the device; Adam keeps its step counters on the CPU."""
    for slot in optimizer.state.values():
        for key, value in slot.items():
            if torch.is_tensor(value) and key != "step":
                slot[key] = value.to(device)


def _resume_state(config: RunConfig, resume: bool):
    """The checkpoint to continue from (None for a fresh run), refusing mismatched or accidental reuse."""
    newest = checkpoint_to_resume(config.train.out_dir, resume)
    if newest is None:
        return None
    state = load_checkpoint(newest)
    inherit_vocabulary(config, state.config, newest)  # a resumed run keeps the condition vocabulary it was trained with
    if config.data.holdout_subjects == state.config.data.holdout_subjects:  # and its held-out subjects, even if data was added
        config.data.heldout_subjects = state.config.data.heldout_subjects
    return state


EVAL_SAMPLES = 64  # images the in-training evaluation draws (train.eval_every)
VOLUME_PREVIEWS = 4  # volumes a volume run's preview montage shows (train.sample_every)
_MASK_FIELDS = {"mask_loss_share": 0.0, "given_mask_share": 0.0, "given_image_share": 0.0, "mask_scale": 1.0, "mask_encoding": "one-hot"}


def _process(config: RunConfig):
    """The diffusion config that shapes training; the mask fields only where there are masks (a run from before
    mask_scale existed still resumes without naming it)."""
    return config.diffusion if config.mask_labels else dataclasses.replace(config.diffusion, **_MASK_FIELDS)


def _check_resumable(config: RunConfig, state) -> None:
    """Once the data has fixed the network's channels (masks): the checkpoint must be of this model and process."""
    if state is not None and (state.config.model != config.model or _process(state.config) != _process(config)):
        differ = config_differences(*({"model": c.model, "diffusion": _process(c)} for c in (state.config, config)))
        raise BrainfusionError(
            f"{state.path} was trained with a different model or diffusion config ({differ}); resume with the same config "
            f"(see {state.path.with_suffix('.json')})."
        )


def _place(model, ema, optimizer, state, device, memory_format) -> None:
    """Load a checkpoint's weights and optimizer state, then move everything to the device."""
    if state is not None:
        load_weights(model, state.model, state.path)
        load_weights(ema.shadow, state.ema, state.path)
        if state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
    model.to(device, memory_format=memory_format)
    ema.shadow.to(device, memory_format=memory_format)
    optimizer_to(optimizer, device)


def set_up(config: RunConfig, resume: bool, progress: bool) -> Session:
    """Resume checks, data, model, optimizer, device, precision and budgets: every decision before step one."""
    tcfg = config.train
    ctx = dist.init()
    ae = attach_autoencoder(config, resume, ctx.device) if config.latent.active else None
    state = _resume_state(config, resume)
    if ctx.is_main:  # what killed processes left behind goes before anything is written
        tidy_run_folder(Path(tcfg.out_dir), tcfg.keep_checkpoints)
    slices, heldout = split_subjects(config.data, _load_data(config, progress and ctx.is_main), tcfg.seed)
    if config.data.masks:  # the label values read with the masks fix the network's channels
        config.data.mask_values = slices.mask_values
        config.validate()
    _check_resumable(config, state)
    if tcfg.batch_size % ctx.world:
        raise BrainfusionError(f"train.batch_size={tcfg.batch_size} is the global batch and must divide by the {ctx.world} processes.")
    images, cond = label_slices(config, slices)  # (images, None) for an unconditional run; fits the vocabulary
    masks = getattr(slices, "labels", None)
    if config.data.volumes:  # (N, D, H, W) volumes get their one channel, as slices get theirs in the stream
        images = images[:, None]
    if masks is not None and len(masks) != len(images):  # unlabelled slices were left out: their masks go too
        masks = masks[labelled_subset(config.condition, config.data.path, slices)[0]]
    flipped, dtype = None, choose_precision(tcfg.precision, ctx.device)
    if ae is not None:  # latent diffusion: the stream carries normalised latents of the slices and of their mirror images
        images, flipped = cached_latents(config, images, ae, ctx.device, dtype, progress and ctx.is_main)
        fit_statistics(config, images)
        images, flipped = normalise(config, images), normalise(config, flipped)
    stream = BatchStream(images, tcfg.batch_size, tcfg.seed, config.data.hflip, ctx.rank, ctx.world, cond=cond, flipped=flipped,
                         labels=masks, n_labels=config.mask_labels, label_scale=config.diffusion.mask_scale,
                         label_encoding=config.diffusion.mask_encoding)
    torch.manual_seed(tcfg.seed)
    model = UNet(config.model)
    preview = np.arange(EVAL_SAMPLES) * len(images) // EVAL_SAMPLES  # the training pairs a run given masks or images previews
    if ctx.is_main and progress:  # the count costs ~1.2 s of start-up: interactive runs only
        flops = training_flops_per_image(model, config.model.image_size, config.model.input_channels)
        log.info("model: %.2f M parameters, %.2f GFLOP per training image (forward+backward)", count_parameters(model) / 1e6, flops / 1e9)
    ema = EMA(model, tcfg.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    channels_last = choose_channels_last(tcfg.channels_last, ctx.device, dtype)
    memory_format = runtime_memory_format(channels_last, config.model.spatial_dims)
    _place(model, ema, optimizer, state, ctx.device, memory_format)
    scaler = make_grad_scaler(dtype, ctx.device)
    if scaler is not None and state is not None and "grad_scaler" in state.extra:
        scaler.load_state_dict(state.extra["grad_scaler"])
    net = dist.wrap(model, ctx)
    budget_steps = [s for s in (tcfg.max_steps, math.ceil(tcfg.epochs * stream.steps_per_epoch) if tcfg.epochs else 0) if s]
    start_step = state.step if state is not None else 0
    if ctx.is_main:
        log.info(
            "training on %s (%s, %s), %d %s, global batch %d (%d per process × %d), lr %.1e, from step %d",
            ctx.device, f"{str(dtype).removeprefix('torch.')} autocast" if dtype else "fp32", "channels_last" if channels_last else "contiguous",
            len(slices), _items(config), tcfg.batch_size, stream.per_rank, ctx.world, tcfg.lr, start_step,
        )
        Path(tcfg.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(tcfg.out_dir) / "config.json", config.to_json())
    if heldout is not None and ctx.is_main:
        log.info("holding out %d subject(s), %d %s: %s", len(config.data.heldout_subjects), len(heldout), _items(config),
                 ", ".join(config.data.heldout_subjects))
    if slices.skipped and ctx.is_main:
        log.warning("%d bad file(s) were skipped; see the warnings above", len(slices.skipped))
    return Session(
        config, ctx, stream, make_process(config.diffusion, _channel_weight(config, ctx.device)), model, torch.compile(net) if tcfg.compile else net, ema, optimizer,
        dtype, memory_format, start_step, min(budget_steps) if budget_steps else None,
        time.monotonic() + tcfg.time_budget_min * 60 if tcfg.time_budget_min else None,
        int(state.extra.get("nonfinite_skipped", 0)) if state is not None else 0,  # the CSV column carries over a resume
        slices.images, scaler, None if ae is None else LatentDecoder(ae, config, ctx.device, dtype),
        masks[preview] if config.images_for_masks_only else None,
        np.asarray(images)[preview] if config.masks_for_images_only else None,
        latest_checkpoint(Path(tcfg.out_dir) / "checkpoints" / GUIDE_FOLDER) is not None,
    )


def _load_data(config: RunConfig, progress: bool):
    """The run's training data: a SliceSet, or for a volume run a VolumeSet (same per-item fields)."""
    return load_volumes(config.data, progress=progress) if config.data.volumes else load_slices(config.data, progress=progress)


def _items(config: RunConfig) -> str:
    return "volumes" if config.data.volumes else "slices"


def _channel_weight(config: RunConfig, device: torch.device) -> torch.Tensor | None:
    images = config.model.in_channels - config.mask_channels
    weight = channel_weights(images, config.mask_channels, config.diffusion.mask_loss_share)
    return None if weight is None else weight.to(device)


def _given_channels(config: RunConfig, step: int, channels: int) -> torch.Tensor | None:
    """Which channels of global batch `step` go to the network clean, as a condition: (batch, C, 1, 1) bool, drawn
    from its own key (None when the run has neither share). One draw u per image: u < diffusion.given_mask_share
    gives the image its mask channels; the next given_image_share of [0, 1) gives the labels their image."""
    d, k, batch = config.diffusion, config.mask_channels, config.train.batch_size
    first = 1 if config.upsample.active else config.slab.context * config.slab_channels  # an upsampler's low-resolution slice, a slab's context
    label_slabs = config.slab.active and config.masks_for_images_only  # a volume label model: every slab slice's image too
    if first or label_slabs:  # handed over clean at every step, in front of (or between) the channels generated
        given = torch.zeros(batch, channels, 1, 1, dtype=torch.bool)
        given[:, :first] = True
        if label_slabs:
            given[:, first :: config.slab_channels] = True
        return given
    if not ((d.given_mask_share or d.given_image_share) and k) or config.data.volumes:
        return None
    u = torch.rand(batch, generator=seeded_generator(config.train.seed, 4, step))
    given = torch.zeros(batch, channels, 1, 1, dtype=torch.bool)
    given[u < d.given_mask_share, channels - k :] = True
    given[(u >= d.given_mask_share) & (u < d.given_mask_share + d.given_image_share), : channels - k] = True
    return given


def training_step(s: Session, step: int) -> torch.Tensor:
    """One optimizer step on global batch `step`; returns the global batch's mean loss (non-finite: skipped)."""
    tcfg, ctx, device = s.config.train, s.ctx, s.ctx.device
    torch.manual_seed(derive_seed(tcfg.seed, 3, step))  # dropout
    images, cond = s.stream.batch_with_cond(step)
    lo, hi = ctx.rank * s.stream.per_rank, (ctx.rank + 1) * s.stream.per_rank
    if s.config.slab.active:  # one slab of each volume, its context in front; its place in the volume as a condition
        images, cond = training_slabs(images, cond, s.config.slab, seeded_generator(tcfg.seed, 7, step), slice(lo, hi), tcfg.batch_size,
                                      run_background(s.config))
    x0 = images.to(device, memory_format=s.memory_format)
    if s.config.upsample.active:  # the low-resolution slice in front, given clean; its augmentation level as the condition
        x0, cond = training_pair(x0, s.config.upsample, seeded_generator(tcfg.seed, 6, step), slice(lo, hi), tcfg.batch_size)
        x0 = x0.contiguous(memory_format=s.memory_format)
    if s.config.data.volumes and not s.config.slab.active:  # the wavelet route diffuses Haar coefficients (WDM)
        x0 = to_coefficients(x0, s.config.diffusion.wavelet_detail_scale).contiguous(memory_format=s.memory_format)
    gen = seeded_generator(tcfg.seed, 2, step)
    levels = s.process.draw_levels(tcfg.batch_size, gen)
    noise = torch.randn((tcfg.batch_size,) + tuple(x0.shape[1:]), generator=gen)
    levels, noise = levels[lo:hi].to(device), noise[lo:hi].to(device, memory_format=s.memory_format)
    if cond is not None and s.config.condition.active:  # label dropout, from its own key, never the network's dropout's
        cond = drop_labels(cond, s.config.condition.label_dropout, seeded_generator(tcfg.seed, 3, step, 1), tcfg.batch_size, lo).to(device)
    given = _given_channels(s.config, step, x0.shape[1])
    for group in s.optimizer.param_groups:
        group["lr"] = lr_at(step, tcfg)
    with torch.autocast(device.type, dtype=s.dtype or torch.float32, enabled=s.dtype is not None):
        extra = {} if given is None else {"given": given[lo:hi].to(device)}
        if s.config.diffusion.self_condition:  # Analog Bits' coin: half the batches see a first estimate
            extra["estimate_first"] = bool(torch.rand(1, generator=seeded_generator(tcfg.seed, 5, step)) < 0.5)
        loss = s.process.loss(s.forward, x0, levels, noise, cond, **extra)
    loss_mean = dist.mean(loss, ctx)  # the global batch's loss on every rank; non-finite if any rank's is
    s.optimizer.zero_grad(set_to_none=True)
    if torch.isfinite(loss_mean):
        if s.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), tcfg.grad_clip)
            s.optimizer.step()
        else:  # the scaler skips the step (and lowers its scale) when a gradient overflowed
            s.scaler.scale(loss).backward()
            s.scaler.unscale_(s.optimizer)
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), tcfg.grad_clip)
            s.scaler.step(s.optimizer)
            s.scaler.update()
        s.ema.update(s.model, step)
    return loss_mean


def train(config: RunConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train a model as `config` says, writing checkpoints, logs and pictures to train.out_dir, which this process
    holds (fileio.lock_folder) from before anything in it is read until it returns; under torchrun rank 0 holds it."""
    config.validate()
    lock = lock_folder(config.train.out_dir, "train.out_dir") if dist.is_main_process() else contextlib.nullcontext()
    with lock:
        return _train(config, resume, progress)


def _train(config: RunConfig, resume: bool, progress: bool) -> TrainResult:
    tcfg = config.train
    torch.set_flush_denormal(True)  # tiny Adam moments / zero-initialised layers otherwise hit slow denormal paths
    s = set_up(config, resume, progress)
    ctx, out_dir = s.ctx, Path(tcfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    runlog = RunLog(out_dir / "train_log.csv", s.start_step, s.max_steps, s.deadline, s.stream.steps_per_epoch,
                    show=ctx.is_main and progress, write=ctx.is_main,
                    tensorboard=out_dir / "tensorboard" if tcfg.logger == "tensorboard" else None)
    step, nonfinite_run, last_ckpt = s.start_step, 0, latest_checkpoint(ckpt_dir) if resume else None

    def checkpoint_now() -> Path:
        return save_checkpoint(
            ckpt_dir, step, config, s.model.state_dict(), s.ema.shadow.state_dict(), s.optimizer.state_dict(),
            extra={"nonfinite_skipped": s.skipped_total, **({"grad_scaler": s.scaler.state_dict()} if s.scaler else {})},
            keep=tcfg.keep_checkpoints,
        )

    interrupted = False
    with _StopSignal() as stop, contextlib.closing(runlog):  # the TensorBoard writer is closed on every exit
        while True:
            if (s.max_steps is not None and step >= s.max_steps) or dist.any_flag(runlog.over_time(), ctx):
                break
            if dist.any_flag(stop.received is not None, ctx):
                interrupted = True
                break
            loss = training_step(s, step)
            nonfinite_run = _count_nonfinite(loss, nonfinite_run, step, tcfg.max_nonfinite, last_ckpt)
            s.skipped_total += nonfinite_run > 0
            step += 1
            runlog.step(step, float(loss), lr_at(step - 1, tcfg), tcfg.batch_size, s.skipped_total, tcfg.log_every)
            fault_injection_point(f"step:{step}")
            if ctx.is_main and nonfinite_run == 0 and _guide_due(step, s, runlog):
                save_checkpoint(ckpt_dir / GUIDE_FOLDER, step, config, s.model.state_dict(), s.ema.shadow.state_dict(), None, keep=1)
                s.guide_kept = True
            if step % tcfg.checkpoint_every == 0:
                # weights whose last loss was NaN/Inf may be the diverged ones: no checkpoint until a finite step
                if ctx.is_main and nonfinite_run == 0:
                    last_ckpt = checkpoint_now()
                    runlog.plot_loss(out_dir / "loss.png")
                elif ctx.is_main:
                    log.warning("step %d: checkpoint skipped after a non-finite loss; the last good one is %s", step, last_ckpt)
                dist.barrier(ctx)
            if ctx.is_main and tcfg.sample_every and step % tcfg.sample_every == 0:
                _preview(s, out_dir / "samples" / f"step_{step:08d}.png", runlog, step)
            if ctx.is_main and tcfg.eval_every and step % tcfg.eval_every == 0 and not config.masks_for_images_only:
                _evaluate_during_training(s, out_dir, step, runlog)
    if ctx.is_main and nonfinite_run == 0 and (last_ckpt is None or not last_ckpt.name.endswith(f"{step:08d}.safetensors")):
        last_ckpt = checkpoint_now()
    if ctx.is_main:
        fault_injection_point("final")
        runlog.plot_loss(out_dir / "loss.png", force=True)
    dist.barrier(ctx)
    if interrupted and ctx.is_main:
        log.info("interrupted at step %d; newest checkpoint %s — continue with --resume", step, last_ckpt)
    dist.shutdown(ctx)
    return TrainResult(out_dir, step, last_ckpt, interrupted, runlog.images_per_s)


def _guide_due(step: int, s: Session, runlog: RunLog) -> bool:
    """Whether this step's weights become the run's autoguidance guide: the step at train.guide_at of the step
    budget, or else the first step past that share of the time budget (once per run folder: s.guide_kept)."""
    share = s.config.train.guide_at
    if not share:
        return False
    if s.max_steps is not None:
        return step == max(1, round(share * s.max_steps))
    return not s.guide_kept and runlog.time_share() >= share


def _count_nonfinite(loss: torch.Tensor, run: int, step: int, limit: int, last_ckpt: Path | None) -> int:
    """Non-finite losses in a row after this step; stops training after `limit` of them."""
    if torch.isfinite(loss):
        return 0
    run += 1
    log.warning("step %d: non-finite loss, step skipped (%d in a row)", step + 1, run)
    if run >= limit:
        raise BrainfusionError(
            f"the loss was NaN/Inf for {run} steps in a row at step {step + 1}; lower train.lr or check the data "
            f"(no checkpoint was written from the diverged weights; the last good one is {last_ckpt})."
        )
    return run


def _sample_ema(s: Session, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """n preview images of the EMA network (and their masks, for a mask run; a run given every mask makes them for
    training masks, one given every image labels training images): image i of `seed` is the one `brainfusion sample`
    would draw."""
    model = s.ema.shadow
    was = model.training
    pipe = Pipeline(model, s.config, s.ctx.device, s.config.train.precision, s.config.train.channels_last, s.decoder)
    if s.config.upsample.active:  # an upsampler's previews bring training slices, shrunk, back up
        picked = s.real_for_eval[np.arange(n) * len(s.real_for_eval) // n]
        low = to_uint8(shrink(to_model_range(torch.as_tensor(picked)), s.config.upsample.from_size))
        images = pipe.upscale(low, seed=seed)
        model.train(was)
        return images, None
    images, labels = pipe.pairs(n, seed=seed, mask=None if s.preview_masks is None else s.preview_masks[:n],
                                image=None if s.preview_images is None else s.preview_images[:n])
    model.train(was)
    return images, labels


def _preview(s: Session, path: Path, runlog: RunLog, step: int, n: int = 16) -> None:
    if s.config.data.volumes:  # a few volumes' three planes: volume i of the seed is the one `brainfusion sample` draws
        pipe = Pipeline(s.ema.shadow, s.config, s.ctx.device, s.config.train.precision, s.config.train.channels_last)
        if s.config.masks_for_images_only:  # a label model: training volumes' labels, as sample's labels montage shows them
            given = s.preview_images[:VOLUME_PREVIEWS]
            given = given.reshape(len(given), *given.shape[-3:])  # the volume set's (N, 1, D, H, W)
            labels = pipe.volume_pairs(len(given), s.config.train.seed, images=given)[1]
            grid = volume_montage(label_image(labels, s.config.data.mask_values))
        else:
            grid = volume_montage(pipe.volumes(VOLUME_PREVIEWS, s.config.train.seed))
        save_png(grid, path)
        runlog.image(step, "samples", grid)
        return
    images, labels = _sample_ema(s, n, s.config.train.seed)
    grid = make_grid(images if labels is None else overlay_labels(images, labels))
    save_png(grid, path)
    runlog.image(step, "samples", grid)


def _evaluate_during_training(s: Session, out_dir: Path, step: int, runlog: RunLog) -> None:
    from ..evaluation.evaluate import quick_metrics

    images = _sample_ema(s, EVAL_SAMPLES, s.config.train.seed + 1)[0]
    rng = np.random.default_rng(0)
    reference = s.real_for_eval[rng.choice(len(s.real_for_eval), size=min(512, len(s.real_for_eval)), replace=False)]
    metrics = quick_metrics(images, reference)
    row = {"step": step, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in metrics.items()}}
    RunLog.append(out_dir / "eval_log.csv", row)
    runlog.scalars(step, metrics, "eval")
    log.info("step %d quality: %s", step, ", ".join(f"{k}={v}" for k, v in row.items() if k != "step"))
