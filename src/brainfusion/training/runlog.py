"""The training run's log: CSV rows, the progress bar with loss, img/s and time left, and optionally TensorBoard.

One object so the training loop says `runlog.step(...)` once a step; a resumed run first drops
the rows past its checkpoint (and TensorBoard's events, through `purge_step`), so no step is logged twice.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np

from ..errors import BrainfusionError
from ..fileio import atomic_output
from ..images import plot_loss_curve


def tensorboard_writer(folder: Path, start_step: int):
    """A SummaryWriter that first drops events past `start_step` (a resume), flushing every 10 s."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise BrainfusionError(
            f"train.logger is 'tensorboard' but TensorBoard cannot be imported ({exc}); pip install tensorboard, or log to csv."
        ) from None
    return SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None, flush_secs=10)


class RunLog:
    def __init__(self, path: Path, start_step: int, max_steps: int | None, deadline: float | None, steps_per_epoch: int,
                 show: bool = True, write: bool = True, tensorboard: Path | None = None):
        self.path, self.start_step, self.max_steps, self.deadline = Path(path), start_step, max_steps, deadline
        self.steps_per_epoch, self.write = steps_per_epoch, write
        if write:
            truncate_log(self.path, start_step)
        self.t_start = self.window_t = time.monotonic()
        self.window_images, self.images_per_s = 0, 0.0
        self.last_plot = self.t_start
        self.bar = None
        self.tensorboard = tensorboard_writer(tensorboard, start_step) if tensorboard is not None and write else None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)

    def plot_loss(self, path: Path, force: bool = False, min_interval_s: float = 30.0) -> None:
        """Redraw the loss curve: at most every `min_interval_s` (one plot costs ~0.25 s on a 2-core CPU, as
        much as ten small training steps), and always when `force` (the end of a run)."""
        now = time.monotonic()
        if self.write and (force or now - self.last_plot >= min_interval_s):
            plot_loss_curve(self.path, path)
            self.last_plot = now

    def over_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def time_share(self) -> float:
        """The share of the time budget spent so far (0 without one)."""
        if self.deadline is None:
            return 0.0
        return (time.monotonic() - self.t_start) / max(self.deadline - self.t_start, 1e-9)

    def step(self, step: int, loss: float, lr: float, images: int, skipped: int, every: int) -> None:
        """Record that `step` steps are done; every `every` steps (and at the last) a CSV row."""
        self.window_images += images
        if self.write and (step % every == 0 or step == self.max_steps):
            now = time.monotonic()
            self.images_per_s = self.window_images / max(now - self.window_t, 1e-9)
            self.window_t, self.window_images = now, 0
            loss = loss if math.isfinite(loss) else float("nan")
            self.append(self.path, dict(
                step=step, epoch=f"{step / self.steps_per_epoch:.3f}", loss=f"{loss:.6f}", lr=f"{lr:.3e}",
                images_per_s=f"{self.images_per_s:.2f}", elapsed_s=f"{now - self.t_start:.1f}", nonfinite_skipped=skipped,
            ))
            self.scalars(step, {"loss": loss, "lr": lr, "images_per_s": self.images_per_s, "nonfinite_skipped": skipped}, "train")
            if self.bar is not None:
                self.bar.set_postfix_str(f"loss {loss:.4f} | {self.images_per_s:.1f} img/s | left {self.time_left(step, now)}")
        if self.bar is not None:
            self.bar.update(1)

    def time_left(self, step: int, now: float) -> str:
        rate = (step - self.start_step) / max(now - self.t_start, 1e-9)
        left = []
        if self.max_steps is not None and rate > 0:
            left.append((self.max_steps - step) / rate)
        if self.deadline is not None:
            left.append(self.deadline - now)
        if not left:
            return "?"
        seconds = max(0, int(min(left)))
        return f"{seconds // 60}m{seconds % 60:02d}s"

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        """TensorBoard scalars `prefix/name` (numbers only; a no-op without TensorBoard)."""
        if self.tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{prefix}/{name}", value, step)

    def image(self, step: int, tag: str, grid: np.ndarray) -> None:
        """A uint8 grid (H, W), or a colour one (H, W, 3), as a TensorBoard image."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, grid if grid.ndim == 3 else grid[None], step, dataformats="HWC" if grid.ndim == 3 else "CHW")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    @staticmethod
    def append(path: Path, row: dict) -> None:
        new = not path.exists() or path.stat().st_size == 0  # a kill between creating the file and writing it leaves it empty
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def truncate_log(path: Path, last_step: int) -> None:
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
