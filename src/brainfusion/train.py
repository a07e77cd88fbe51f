"""Training loop: Adam with warm-up, gradient clipping, EMA, bf16 where the hardware has it.

Every batch, noise draw and timestep is a pure function of (seed, step) — see `BatchStream` —
so a run resumed from a checkpoint retraces the uninterrupted run exactly, and N processes
(torchrun + DDP) each take their slice of the same global batch.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, load_weights, save_checkpoint
from .config import FAST_SAMPLER, FAST_STEPS, RunConfig
from .data import BatchStream, load_slices, to_uint8
from .diffusion import make_process, sample
from .errors import BrainfusionError
from .fileio import atomic_output
from .images import plot_loss_curve, save_grid
from .model import UNet, count_parameters, training_flops_per_image
from .runtime import choose_channels_last, choose_precision, network_fn

log = logging.getLogger(__name__)

LOG_FIELDS = ["step", "epoch", "loss", "lr", "images_per_s", "elapsed_s", "nonfinite_skipped"]


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
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))


def train(config: RunConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train a model as `config` says, writing checkpoints, logs and pictures to train.out_dir."""
    config.validate()
    tcfg = config.train
    torch.set_flush_denormal(True)  # tiny Adam moments / zero-initialised layers otherwise hit slow denormal paths
    ctx = dist.init()
    device = ctx.device
    out_dir = Path(tcfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"

    start_step, state = 0, None
    if resume:
        newest = latest_checkpoint(ckpt_dir)
        if newest is None:
            raise BrainfusionError(f"--resume given but {ckpt_dir} holds no checkpoint; drop --resume to start fresh.")
        state = load_checkpoint(newest)
        if state.config.model != config.model or state.config.diffusion != config.diffusion:
            raise BrainfusionError(
                f"{newest} was trained with a different model or diffusion config; resume with the same config (see {newest.with_suffix('.json')})."
            )
        start_step = state.step
    elif latest_checkpoint(ckpt_dir) is not None:  # every rank refuses, so none is left waiting
        raise BrainfusionError(f"{out_dir} already holds checkpoints; pass --resume to continue, or choose another --out-dir.")

    slices = load_slices(config.data, progress=progress and ctx.is_main)
    if tcfg.batch_size % ctx.world:
        raise BrainfusionError(f"--batch-size {tcfg.batch_size} is the global batch and must divide by the {ctx.world} processes.")
    stream = BatchStream(slices.images, tcfg.batch_size, tcfg.seed, config.data.hflip, ctx.rank, ctx.world)
    process = make_process(config.diffusion)

    torch.manual_seed(tcfg.seed)
    model = UNet(config.model)
    if ctx.is_main:
        flops = training_flops_per_image(model, config.model.image_size, config.model.in_channels)
        log.info("model: %.2f M parameters, %.2f GFLOP per training image (forward+backward)", count_parameters(model) / 1e6, flops / 1e9)
    ema = EMA(model, tcfg.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    if state is not None:
        load_weights(model, state.model, state.path)
        load_weights(ema.shadow, state.ema, state.path)
        if state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
    dtype = choose_precision(tcfg.precision, device)
    channels_last = choose_channels_last(tcfg.channels_last, device, dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    ema.shadow.to(device, memory_format=memory_format)
    for slot in optimizer.state.values():
        for key, value in slot.items():
            if torch.is_tensor(value) and key != "step":
                slot[key] = value.to(device)
    net = dist.wrap(model, ctx)
    forward = torch.compile(net) if tcfg.compile else net

    steps_per_epoch = stream.steps_per_epoch
    budget_steps = [s for s in (tcfg.max_steps, math.ceil(tcfg.epochs * steps_per_epoch) if tcfg.epochs else 0) if s]
    max_steps = min(budget_steps) if budget_steps else None
    deadline = time.monotonic() + tcfg.time_budget_min * 60 if tcfg.time_budget_min else None
    if ctx.is_main:
        log.info(
            "training on %s (%s, %s), %d slices, global batch %d (%d per process × %d), lr %.1e, from step %d",
            device, "bf16 autocast" if dtype else "fp32", "channels_last" if channels_last else "contiguous",
            len(slices), tcfg.batch_size, stream.per_rank, ctx.world, tcfg.lr, start_step,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", config.to_json())

    real_for_eval = slices.images
    log_path = out_dir / "train_log.csv"
    if ctx.is_main:
        _truncate_log(log_path, start_step)
    step, nonfinite_run, skipped_total = start_step, 0, 0
    if state is not None:  # the count of skipped steps carries over a resume, as the CSV column promises
        skipped_total = int(state.extra.get("nonfinite_skipped", 0))
    last_ckpt = latest_checkpoint(ckpt_dir) if resume else None
    window_t, window_images = time.monotonic(), 0
    images_per_s = 0.0
    t_start = time.monotonic()
    bar = None
    if ctx.is_main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)

    def checkpoint_now() -> Path:
        return save_checkpoint(
            ckpt_dir, step, config, model.state_dict(), ema.shadow.state_dict(), optimizer.state_dict(),
            extra={"nonfinite_skipped": skipped_total}, keep=tcfg.keep_checkpoints,
        )

    interrupted = False
    with _StopSignal() as stop:
        while True:
            over_time = deadline is not None and time.monotonic() >= deadline
            if (max_steps is not None and step >= max_steps) or dist.any_flag(over_time, ctx):
                break
            if dist.any_flag(stop.received is not None, ctx):
                interrupted = True
                break
            torch.manual_seed(tcfg.seed * 1_000_003 + step)  # dropout, per step
            x0 = stream.batch(step).to(device, memory_format=memory_format)
            gen = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + 7 * step + 2)
            t_all = process.draw_levels(tcfg.batch_size, gen)
            noise_all = torch.randn((tcfg.batch_size,) + tuple(x0.shape[1:]), generator=gen)
            lo, hi = ctx.rank * stream.per_rank, (ctx.rank + 1) * stream.per_rank
            t, noise = t_all[lo:hi].to(device), noise_all[lo:hi].to(device, memory_format=memory_format)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tcfg)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = process.loss(forward, x0, t, noise)
            loss_mean = dist.mean(loss, ctx)  # the global batch's loss on every rank; non-finite if any rank's is
            finite = bool(torch.isfinite(loss_mean))
            optimizer.zero_grad(set_to_none=True)
            if finite:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                optimizer.step()
                ema.update(model, step)
                nonfinite_run = 0
            else:
                nonfinite_run += 1
                skipped_total += 1
                log.warning("step %d: non-finite loss, step skipped (%d in a row)", step + 1, nonfinite_run)
                if nonfinite_run >= tcfg.max_nonfinite:
                    raise BrainfusionError(
                        f"the loss was NaN/Inf for {nonfinite_run} steps in a row at step {step + 1}; lower --lr or check the data "
                        f"(no checkpoint was written from the diverged weights; the last good one is {last_ckpt})."
                    )
            step += 1
            window_images += tcfg.batch_size
            if ctx.is_main and (step % tcfg.log_every == 0 or step == max_steps):
                now = time.monotonic()
                images_per_s = window_images / max(now - window_t, 1e-9)
                window_t, window_images = now, 0
                loss_value = float(loss_mean) if finite else float("nan")
                _append_log(log_path, dict(
                    step=step, epoch=f"{step / steps_per_epoch:.3f}", loss=f"{loss_value:.6f}", lr=f"{lr_at(step - 1, tcfg):.3e}",
                    images_per_s=f"{images_per_s:.2f}", elapsed_s=f"{now - t_start:.1f}", nonfinite_skipped=skipped_total,
                ))
                if bar is not None:
                    left = _time_left(step, start_step, max_steps, deadline, now, t_start)
                    bar.set_postfix_str(f"loss {loss_value:.4f} | {images_per_s:.1f} img/s | left {left}")
            if bar is not None:
                bar.update(1)
            if step % tcfg.checkpoint_every == 0:
                # weights whose last loss was NaN/Inf may be the diverged ones: no checkpoint until a finite step
                if ctx.is_main and nonfinite_run == 0:
                    last_ckpt = checkpoint_now()
                    plot_loss_curve(log_path, out_dir / "loss.png")
                elif ctx.is_main:
                    log.warning("step %d: checkpoint skipped after a non-finite loss; the last good one is %s", step, last_ckpt)
                dist.barrier(ctx)
            if ctx.is_main and tcfg.sample_every and step % tcfg.sample_every == 0:
                _preview(ema.shadow, config, out_dir / "samples" / f"step_{step:08d}.png", device, dtype)
            if ctx.is_main and tcfg.eval_every and step % tcfg.eval_every == 0:
                _evaluate_during_training(ema.shadow, config, real_for_eval, out_dir, step, device, dtype)
    if bar is not None:
        bar.close()
    if ctx.is_main and nonfinite_run == 0 and (last_ckpt is None or not last_ckpt.name.endswith(f"{step:08d}.safetensors")):
        last_ckpt = checkpoint_now()
    if ctx.is_main:
        plot_loss_curve(log_path, out_dir / "loss.png")
        if slices.skipped:
            log.warning("%d bad file(s) were skipped; see the warnings above", len(slices.skipped))
    dist.barrier(ctx)
    if interrupted and ctx.is_main:
        log.info("interrupted at step %d; newest checkpoint %s — continue with --resume", step, last_ckpt)
    dist.shutdown(ctx)
    return TrainResult(out_dir, step, last_ckpt, interrupted, images_per_s)


def _time_left(step, start_step, max_steps, deadline, now, t_start) -> str:
    rate = (step - start_step) / max(now - t_start, 1e-9)
    left = []
    if max_steps is not None and rate > 0:
        left.append((max_steps - step) / rate)
    if deadline is not None:
        left.append(deadline - now)
    if not left:
        return "?"
    seconds = max(0, int(min(left)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log rows past the checkpoint being resumed (all rows for a fresh run), so no step is logged twice."""
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= last_step]
    if len(kept) == len(rows):
        return
    if not kept:
        path.unlink()
        return
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)


def _append_log(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0  # a kill between creating the file and writing it leaves it empty
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _preview(model, config: RunConfig, path: Path, device, dtype, n: int = 16) -> None:
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(config.train.seed)
    size = config.model.image_size
    images, _ = sample(network_fn(model, device, dtype), config.diffusion, (n, 1, size, size), FAST_SAMPLER, FAST_STEPS, gen)
    model.train(was)
    save_grid(to_uint8(images), path)


def _evaluate_during_training(model, config: RunConfig, real: np.ndarray, out_dir: Path, step: int, device, dtype) -> None:
    from .evaluate import quick_metrics

    model.eval()
    size = config.model.image_size
    gen = torch.Generator().manual_seed(config.train.seed + 1)
    images, _ = sample(network_fn(model, device, dtype), config.diffusion, (64, 1, size, size), FAST_SAMPLER, FAST_STEPS, gen)
    rng = np.random.default_rng(0)
    reference = real[rng.choice(len(real), size=min(512, len(real)), replace=False)]
    metrics = quick_metrics(to_uint8(images), reference)
    row = {"step": step, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in metrics.items()}}
    _append_log(out_dir / "eval_log.csv", row)
    log.info("step %d quality: %s", step, ", ".join(f"{k}={v}" for k, v in row.items() if k != "step"))
    model.train()
