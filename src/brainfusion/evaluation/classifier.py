"""A small, fast CNN trained on real slices, used as a judge of generated ones.

    model = train_classifier(images, labels, num_classes=4, seed=0)        # uint8 (N,H,W), int labels
    probs = predict(model, other_images)                                    # (N, 4) float32
    reg = train_regressor(images, targets_in_0_1, seed=0); predict(reg, x)  # (N,) in [0, 1]

Why it exists: a conditional generator is only as good as its slices are recognisably of the class
asked for, and whether generated slices help a downstream classifier is the use case people want
them for (`conditional_checks`, `benchmarks/bench_augment.py`). The network is deliberately small
(four conv-BN-ReLU stages of 16/32/64/128 channels, max-pooling, global average, dropout, one
linear layer; 98 k weights, 15 M multiply-adds per 64x64 slice) so one training of the default 600
steps of 64 takes 40-45 s on one core of the development CPU at 64x64 and several seeds fit in a
benchmark. On the development slices split by subject blocks (4,098 training, 1,023 held-out; one
seed each, and one held-out ModerateDemented slice moves balanced accuracy by 0.025) the defaults
reached held-out balanced accuracy 0.45 and 0.47 (seeds 0, 1; chance 0.25); loss weights instead of
balanced sampling 0.40, no balancing 0.33, 1,200 steps 0.46, channels x1.5 0.43 in twice the time,
no augmentation 0.48 (kept on all the same: generated slices differ from real ones in position and
gain, and an un-augmented judge fits its training slices to a loss of 0.01).

Every input is padded to a square and resized to `ClassifierConfig.resolution` with the evaluation
code's own `to_eval_tensor`, so real and generated slices of any size are seen on the same grid.

Training length is counted in optimiser steps, not epochs, so training sets of different sizes (real
only, real plus thousands of generated slices) get the same compute. Class imbalance (the development
slices are 2,560 NonDemented to 52 ModerateDemented) is handled by **class-balanced sampling** by
default: each batch draws every class with equal probability (with replacement), so rare classes are
seen often, with fresh augmentations each time, and the loss stays an unweighted mean;
`balance="loss"` instead samples uniformly and weights the cross-entropy by N / (K * count), and
`balance="none"` does neither (the benchmark uses it on sets it has already balanced itself).

Determinism: weights, dropout, batches and augmentations are drawn from generators keyed by the seed
(`seeding.derive_seed`), inside a forked torch RNG, so the same seed, data and thread count give
bitwise the same model, and the caller's global RNG is left untouched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BrainfusionError
from ..fileio import atomic_output
from ..runtime import choose_precision
from ..seeding import derive_seed, seeded_generator
from .metrics.features import check_images, to_eval_tensor

BALANCE_MODES = ("sampler", "loss", "none")


@dataclass
class ClassifierConfig:
    resolution: int = 64  # every image is padded to square and resized to this
    channels: tuple[int, ...] = (16, 32, 64, 128)  # one conv-BN-ReLU stage each; all but the last are max-pooled
    steps: int = 600  # optimiser steps (not epochs): equal compute whatever the training-set size
    batch_size: int = 64
    lr: float = 3e-3  # AdamW peak; 5 % linear warm-up, then cosine to zero
    weight_decay: float = 5e-4
    dropout: float = 0.2
    balance: str = "sampler"  # classification only: "sampler", "loss" or "none" (module docstring)
    augment: bool = True  # random left-right flip, shift up to `max_shift` of the side, gain 0.9..1.1
    max_shift: float = 0.0625
    device: str = "cpu"
    precision: str = "auto"  # "auto" (bf16 only where the device computes it natively), "bf16" or "fp32"

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.balance not in BALANCE_MODES:
            raise BrainfusionError(f"ClassifierConfig.balance must be one of {', '.join(BALANCE_MODES)}, not {self.balance!r}.")
        if self.resolution < 2 ** len(self.channels) or self.steps < 1 or self.batch_size < 1:
            raise BrainfusionError(
                f"ClassifierConfig needs resolution >= {2 ** len(self.channels)} and positive steps and batch size, "
                f"not resolution {self.resolution}, steps {self.steps}, batch {self.batch_size}."
            )
        if not self.channels or min(self.channels) < 1:
            raise BrainfusionError(f"ClassifierConfig.channels must be a non-empty list of positive widths, not {self.channels}.")


class SliceCNN(nn.Module):
    """Conv-BN-ReLU stages, global average pool, dropout, linear; input [0, 1] images (N,1,R,R)."""

    def __init__(self, outputs: int, config: ClassifierConfig):
        super().__init__()
        layers, cin = [], 1
        for i, c in enumerate(config.channels):
            layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i + 1 < len(config.channels):
                layers.append(nn.MaxPool2d(2))
            cin = c
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(cin, outputs)
        self.config = config
        self.task = "classification" if outputs > 1 else "regression"
        self.info: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x * 2.0 - 1.0).mean(dim=(2, 3))
        return self.head(self.dropout(h))


def prepare(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 (N,H,W) → float32 (N,1,R,R) in [0, 1], padded to square and resized as the metrics do."""
    images = check_images(images, "classifier input", min_count=1)
    return to_eval_tensor(images, resolution)


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random left-right flip, integer shift (zero fill: the background is black) and gain, per image."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if max_shift > 0:
        padded = F.pad(x, (max_shift,) * 4)
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    gain = 0.9 + 0.2 * torch.rand(n, generator=gen)
    return (x * gain[:, None, None, None]).clamp_(0.0, 1.0)


def _lr_factor(step: int, steps: int) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _fit(model: SliceCNN, x: torch.Tensor, targets: torch.Tensor, draw_weights: torch.Tensor, loss_fn, seed: int) -> SliceCNN:
    """Train `model` in place for config.steps steps; batches are drawn with replacement by `draw_weights`."""
    cfg = model.config
    device = torch.device(cfg.device)
    dtype = choose_precision(cfg.precision, device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps))
    shift = round(cfg.max_shift * cfg.resolution) if cfg.augment else 0
    t0, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        idx = torch.multinomial(draw_weights, cfg.batch_size, replacement=True, generator=seeded_generator(seed, 0, step))
        xb = _augment(x[idx], seeded_generator(seed, 1, step), shift) if cfg.augment else x[idx]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(xb.to(device))
        loss = loss_fn(out.float(), targets[idx].to(device))
        if not torch.isfinite(loss):
            raise BrainfusionError(f"the classifier's loss became {loss.item()} at step {step}; lower ClassifierConfig.lr (now {cfg.lr}).")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    model.info.update(steps=cfg.steps, seconds=round(time.perf_counter() - t0, 2), n_train=int(len(x)),
                      final_loss=float(np.mean(losses[-max(1, cfg.steps // 10):])), seed=int(seed))
    return model


def _seeded_model(outputs: int, config: ClassifierConfig, seed: int) -> SliceCNN:
    torch.manual_seed(derive_seed(seed, 2))  # inside fork_rng: initial weights, then dropout masks
    return SliceCNN(outputs, config)


def _forked_rng(config: ClassifierConfig):
    device = torch.device(config.device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _configure(config: ClassifierConfig | None, overrides: dict) -> ClassifierConfig:
    try:
        return dataclasses.replace(config or ClassifierConfig(), **overrides)
    except TypeError:
        fields = ", ".join(f.name for f in dataclasses.fields(ClassifierConfig))
        raise BrainfusionError(f"unknown classifier setting in {sorted(overrides)}; use any of {fields}.") from None


def train_classifier(images: np.ndarray, labels, num_classes: int, seed: int = 0, config: ClassifierConfig | None = None,
                     **overrides) -> SliceCNN:
    """A `num_classes`-way classifier of uint8 slices; `overrides` replace ClassifierConfig fields (e.g. steps=300)."""
    config = _configure(config, overrides)
    labels = np.asarray(labels)
    if num_classes < 2 or labels.dtype.kind not in "iu" or labels.shape != (len(images),):
        raise BrainfusionError(
            f"train_classifier needs num_classes >= 2 and one integer label per image, not num_classes {num_classes} and labels of "
            f"dtype {labels.dtype}, shape {labels.shape} for {len(images)} images."
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise BrainfusionError(f"labels range from {labels.min()} to {labels.max()}, outside 0..{num_classes - 1}; check num_classes.")
    x = prepare(images, config.resolution)
    y = torch.from_numpy(labels.astype(np.int64))
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    inverse = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    draw = torch.from_numpy(inverse[labels] if config.balance == "sampler" else np.ones(len(labels)))
    class_weight = torch.tensor(inverse, dtype=torch.float32) if config.balance == "loss" else None
    with _forked_rng(config):
        model = _seeded_model(num_classes, config, seed)
        loss_fn = nn.CrossEntropyLoss(weight=None if class_weight is None else class_weight.to(config.device))
        model = _fit(model, x, y, draw, loss_fn, seed)
    model.info["class_counts"] = counts.astype(int).tolist()
    return model


def train_regressor(images: np.ndarray, targets, seed: int = 0, config: ClassifierConfig | None = None, **overrides) -> SliceCNN:
    """A network predicting one number in [0, 1] per slice (binary cross-entropy on soft targets, uniform batches)."""
    config = _configure(config, overrides)
    t = np.asarray(targets, dtype=np.float64)
    if t.shape != (len(images),) or not np.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise BrainfusionError(f"train_regressor needs one finite target in [0, 1] per image ({len(images)}), not shape {t.shape}; rescale the targets.")
    x = prepare(images, config.resolution)
    y = torch.from_numpy(t.astype(np.float32))[:, None]
    with _forked_rng(config):
        model = _seeded_model(1, config, seed)
        model = _fit(model, x, y, torch.ones(len(t), dtype=torch.float64), nn.BCEWithLogitsLoss(), seed)
    return model


@torch.inference_mode()
def predict(model: SliceCNN, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, K) float32 for a classifier, values (N,) in [0, 1] for a regressor."""
    cfg = model.config
    device = torch.device(cfg.device)
    dtype = choose_precision(cfg.precision, device)
    x = prepare(images, cfg.resolution)
    model.eval()
    out = []
    for s in range(0, len(x), batch_size):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x[s : s + batch_size].to(device)).float().cpu()
        out.append(torch.softmax(logits, 1) if model.task == "classification" else torch.sigmoid(logits[:, 0]))
    return torch.cat(out).numpy()


def save_classifier(model: SliceCNN, path: Path | str) -> Path:
    """Weights and config as safetensors (never pickle), written atomically."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(dataclasses.asdict(model.config)), "outputs": str(model.head.out_features),
            "info": json.dumps(model.info)}
    with atomic_output(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    return Path(path)


def load_classifier(path: Path | str, device: str | None = None) -> SliceCNN:
    """A classifier written by `save_classifier`, in eval mode."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise BrainfusionError(f"classifier file {path} does not exist; train one and save it with save_classifier first.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            weights = {k: fh.get_tensor(k) for k in fh.keys()}
        config = ClassifierConfig(**json.loads(meta["config"]))
        model = SliceCNN(int(meta["outputs"]), config)
        model.load_state_dict(weights)
        model.info = json.loads(meta.get("info", "{}"))
    except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as exc:
        raise BrainfusionError(f"{path} is not a classifier saved by brainfusion ({type(exc).__name__}); retrain and save it.") from None
    if device is not None:
        model.config.device = device
    return model.to(model.config.device).eval()
