"""Typed configuration for every stage, saved as JSON beside each checkpoint.

A run is fully described by a `RunConfig` (data, conditions, model, diffusion, training). The CLI and
config files (JSON or TOML) map onto these dataclasses; unknown keys and wrong types are user
errors, reported with the file, the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import BrainfusionError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` package, which pyproject installs there
    import tomli as tomllib


OASIS_MASK_VALUES = (0, 85, 170, 255)  # the seg PNGs' values, in label order
OASIS_MASK_NAMES = ("background", "CSF", "grey matter", "white matter")


@dataclass
class DataConfig:
    """Where slices come from and how they are preprocessed."""

    path: str = "data/demo"
    image_size: int = 64
    hflip: bool = True
    split: str = "train"  # OASIS layout: "train" merges train+test (as the seed does); "validate" is held out
    cache_dir: str = ""  # default: the per-user cache folder (data/cache.py), never the data folder
    min_brain_fraction: float = 0.05  # volume slices with less foreground than this are dropped
    on_bad_file: str = "fail"  # "fail" stops on the first unreadable file; "skip" logs it and goes on
    masks: str = ""  # tissue masks beside the images (data/masks.py): "" none, "layout" the OASIS seg folders, or a folder
    mask_values: tuple[int, ...] = ()  # label values in label order; () = OASIS's 0/85/170/255, or read from label volumes
    # whole subjects kept out of training (data/subjects.py): a count (>= 1) or a share (< 1); 0 holds out none
    holdout_subjects: float = 0.0
    heldout_subjects: tuple[str, ...] = ()  # the subjects held out, drawn from train.seed when the run starts
    # whole 3-D volumes instead of slices (data/volumes.py): each is reoriented to RAS+ and resampled, brain-centred,
    # onto one grid of `grid`³ voxels of `spacing` mm; 64 × 3 mm spans 192 mm, an adult brain with room to spare
    volumes: bool = False
    grid: int = 64
    spacing: float = 3.0

    def validate(self) -> None:
        if self.volumes and (self.grid < 8 or self.grid % 2 or self.grid > 256):
            raise BrainfusionError(f"data.grid is {self.grid}; give an even number of voxels per side from 8 to 256, e.g. 64.")
        if self.volumes and not (math.isfinite(self.spacing) and 0 < self.spacing <= 50):
            raise BrainfusionError(f"data.spacing is {self.spacing:g} mm; give the grid's voxel size in millimetres, e.g. 3.")
        if self.image_size <= 0 or self.image_size % 16:
            raise BrainfusionError(
                f"image_size {self.image_size} is not a positive multiple of 16; use e.g. 64, 128 or 256."
            )
        _check_choice("data.split", self.split, ("train", "validate", "all"))
        _check_choice("data.on_bad_file", self.on_bad_file, ("fail", "skip"))
        values = list(self.mask_values)
        if values and (len(values) < 2 or values != sorted(set(values)) or len(values) > 16):
            raise BrainfusionError(
                f"data.mask_values {values} must be 2 to 16 different label values in increasing order, e.g. 0,85,170,255."
            )
        if self.holdout_subjects < 0 or (self.holdout_subjects >= 1 and not float(self.holdout_subjects).is_integer()):
            raise BrainfusionError(
                f"data.holdout_subjects is {self.holdout_subjects:g}; give a number of subjects (e.g. 2) or a share below 1 (e.g. 0.2)."
            )


@dataclass
class ModelConfig:
    """The seed's U-Net: ResNet encoder levels with skips, a ResNet bottleneck, decoder levels.

    One level per `channel_mults` entry (the seed's four by default); each halves the resolution.
    """

    image_size: int = 64
    in_channels: int = 1
    # 1 (default, the seed's): the U-Net sees every pixel. 2: pixel-unshuffle 2×2 first, 3.2× cheaper a step on CPUs but
    # worse per CPU minute on held-out real slices (FID 66.2 against 84.4 at 20 minutes, README "Quality per CPU-minute")
    patch_size: int = 1
    # channels of a full-resolution 3×3 conv on each side of the pixel-(un)shuffle (0: none, the first
    # patch-2 model): lets neighbouring output pixels of different 2×2 cells talk, against a grid pattern
    pixel_channels: int = 0
    base_channels: int = 48
    channel_mults: tuple[int, ...] = (1, 2, 2, 4)
    blocks_per_level: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    attention_heads: int = 4
    dropout: float = 0.0
    norm: str = "group"  # "group" (default) or "batch" (the seed's)
    norm_groups: int = 8
    # condition inputs (conditions.py): classes per categorical condition and the number of continuous
    # ones; () and 0 build the unconditional network. A run's are set from its condition vocabulary.
    class_counts: tuple[int, ...] = ()
    continuous_inputs: int = 0
    # set from diffusion.self_condition: in_channels more input channels, for the network's previous estimate
    self_condition: bool = False
    # 2: slices; 3: volumes (set from data.volumes), the same U-Net of 3-D convolutions on image_size³ inputs
    spatial_dims: int = 2

    @property
    def input_channels(self) -> int:
        """Channels the network reads: the slice's, and as many again for its previous estimate when self-conditioned."""
        return self.in_channels * (2 if self.self_condition else 1)

    def validate(self) -> None:
        if not 1 <= len(self.channel_mults) <= 6:
            raise BrainfusionError(
                f"model.channel_mults has {len(self.channel_mults)} entries; give one per U-Net level, 1 to 6 (e.g. 1,2,2,4)."
            )
        if self.patch_size not in (1, 2, 4):
            raise BrainfusionError(f"model.patch_size is {self.patch_size}; choose 1, 2 or 4.")
        _check_choice("model.spatial_dims", self.spatial_dims, (2, 3))
        if self.spatial_dims == 3 and self.patch_size != 1:
            raise BrainfusionError(f"model.patch_size is {self.patch_size}, but a 3-D network sees every voxel; use patch_size 1.")
        factor = self.patch_size << len(self.channel_mults)
        if self.image_size % factor:
            raise BrainfusionError(
                f"model.image_size {self.image_size} is not a multiple of patch_size x 2^levels ({factor}); "
                "use e.g. 64, 128 or 256, a smaller patch_size or fewer channel_mults."
            )
        _check_choice("model.norm", self.norm, ("group", "batch"))
        if self.pixel_channels < 0:
            raise BrainfusionError(f"model.pixel_channels is {self.pixel_channels}; use 0 (none) or a small count such as 16.")
        if self.base_channels <= 0 or self.base_channels % 2:
            raise BrainfusionError(
                f"model.base_channels is {self.base_channels}; it must be a positive even number (the time embedding "
                "splits it into sine and cosine halves), e.g. 32."
            )
        if any(m <= 0 for m in self.channel_mults):
            raise BrainfusionError(f"model.channel_mults {self.channel_mults} must all be positive, e.g. 1,2,3,4.")
        if self.blocks_per_level < 1:
            raise BrainfusionError(f"model.blocks_per_level is {self.blocks_per_level}; it must be 1 or more.")
        if any(n < 1 for n in self.class_counts) or self.continuous_inputs < 0:
            raise BrainfusionError(
                f"model.class_counts {self.class_counts} and continuous_inputs {self.continuous_inputs} must be positive "
                "class counts and a count of 0 or more; they come from the condition vocabulary, leave them to it."
            )
        widths = [self.base_channels * m for m in self.channel_mults]
        if self.norm == "group" and any(w % self.norm_groups for w in widths):
            raise BrainfusionError(
                f"model widths {widths} are not divisible by norm_groups={self.norm_groups}; change base_channels or norm_groups."
            )
        # attention runs at the listed resolutions and, if any are listed, at the bottleneck (the last width)
        levels = [self.image_size // self.patch_size >> i for i in range(len(widths))]
        attended = [w for w, r in zip(widths, levels) if r in self.attention_resolutions]
        attended += widths[-1:] if self.attention_resolutions else []
        if self.attention_heads < 1 or any(w % self.attention_heads for w in attended):
            raise BrainfusionError(
                f"model widths with attention {sorted(set(attended))} are not divisible by attention_heads={self.attention_heads}; "
                "change base_channels, attention_heads or attention_resolutions."
            )


FOLDER_LABELS = "folders"  # condition.labels value: the class is the first folder under the data path
FOLDER_COLUMN = "class"  # the name of that categorical condition
LEVEL_COLUMN = "level"  # the name of the slice-level condition


@dataclass
class ConditionConfig:
    """What the network is conditioned on, and the vocabulary that maps user values to its inputs.

    `labels`: "" (no labels), "folders" (the class is each file's first folder under the data
    path) or a CSV/TSV table with one row per file or subject (conditions.py says how rows are
    matched). `classes` and `stats` are filled from the training data when a run starts and saved in
    every checkpoint, so sampling maps `class=ModerateDemented` or `Age=75` to the same inputs.
    """

    labels: str = ""
    label_columns: tuple[str, ...] = ()  # categorical columns of the table, e.g. CDR,M/F
    continuous_columns: tuple[str, ...] = ()  # numeric columns of the table, e.g. Age,MMSE
    key_column: str = ""  # the table column naming the file or subject; "" = its first column
    slice_level: bool = False  # also condition on the normalised axial level (0 inferior .. 1 superior)
    on_missing_label: str = "fail"  # "fail" stops at the first file without a label; "skip" leaves such files out
    label_dropout: float = 0.1  # share of training conditions replaced by the null token (Ho & Salimans 2022)
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # categorical name → class names (index order)
    stats: dict[str, tuple[float, ...]] = field(default_factory=dict)  # continuous name → (mean, std) of the training data

    @property
    def active(self) -> bool:
        return bool(self.labels or self.slice_level)

    def names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The categorical and the continuous condition names, in the order of the network's inputs."""
        categorical = (FOLDER_COLUMN,) if self.labels == FOLDER_LABELS else self.label_columns
        return categorical, self.continuous_columns + ((LEVEL_COLUMN,) if self.slice_level else ())

    @property
    def fitted(self) -> bool:
        return bool(self.classes or self.stats)

    def validate(self) -> None:
        _check_choice("condition.on_missing_label", self.on_missing_label, ("fail", "skip"))
        if not 0 <= self.label_dropout < 1:
            raise BrainfusionError(f"condition.label_dropout is {self.label_dropout}; use a probability in [0, 1), e.g. 0.1.")
        if (self.label_columns or self.continuous_columns) and self.labels in ("", FOLDER_LABELS):
            raise BrainfusionError(
                f"condition.label_columns {self.label_columns} and continuous_columns {self.continuous_columns} name table "
                "columns, but condition.labels names no table; set it to a CSV/TSV file."
            )
        if self.labels not in ("", FOLDER_LABELS) and not (self.label_columns or self.continuous_columns):
            raise BrainfusionError(
                f"condition.labels is the table {self.labels} but no column of it is chosen; set condition.label_columns "
                "and/or condition.continuous_columns."
            )
        categorical, continuous = self.names()
        names = categorical + continuous
        if len(set(names)) != len(names) or not all(names):
            raise BrainfusionError(f"the condition names {names} must be distinct and non-empty; rename or drop a column.")
        if self.fitted and (set(self.classes) != set(categorical) or set(self.stats) != set(continuous)
                            or not all(self.classes.values()) or any(len(v) != 2 or v[1] <= 0 for v in self.stats.values())):
            raise BrainfusionError(
                f"the condition vocabulary (classes for {sorted(self.classes)}, stats for {sorted(self.stats)}) does not fit "
                f"the conditions {names}; clear condition.classes and condition.stats to fit them from the data again."
            )


# EDM's training levels σ ~ exp(N(P_mean, 1.2²)): Karras et al.'s (2022) −1.2 on pixels; on latents EDM2's (2024)
# −0.4, more weight on high noise, where a latent's coarse layout is decided. At 256² through the 15-minute
# autoencoder, 60 CPU minutes: FID 153.3 against 167.0 with −1.2 (n = 500; docs/research/latent.md)
P_MEAN_PIXELS, P_MEAN_LATENTS = -1.2, -0.4
WAVELET_BANDS = 8  # a volume run's channels: the 2×2×2 Haar bands of one level (diffusion/wavelet.py)
MASK_ENCODINGS = ("one-hot", "ordinal")  # diffusion.mask_encoding: how tissue labels become the model's mask channels
MASK_SCALES = {"one-hot": 0.25, "ordinal": 1.0}  # diffusion.mask_scale when not given: one-hot's best of 1 / 0.5 / 0.25 / 0.1, ordinal's only measured scale


def mask_channel_count(n_labels: int, encoding: str) -> int:
    """The model's mask channels for K labels: K one-hot channels, or one ordinal channel (0 without masks)."""
    return 0 if not n_labels else 1 if encoding == "ordinal" else n_labels


SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde", "heun")  # reverse processes `diffusion.process.make_scheduler` builds
# every entry point's default draw (sample, evaluate, Pipeline, the diffusers export, demo, training previews): DDPM-1000's quality
FAST_SAMPLER, FAST_STEPS = "dpm++sde", 25


@dataclass
class DiffusionConfig:
    """The forward process and what the network predicts.

    formulation "vp" is the seed's discrete DDPM process (β schedule, t in 0..T-1, ε or v target);
    "edm" is Karras et al.'s (2022) continuous σ with preconditioning and log-normal training levels.
    """

    # "edm" (default): at equal CPU time it beat the VP recipe on held-out real slices at every budget
    # measured (README, "Quality per CPU-minute"); recipe "vp" keeps the earlier default
    formulation: str = "edm"
    timesteps: int = 1000
    schedule: str = "linear"  # "linear" (DDPM) or "cosine" (Nichol & Dhariwal)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # "v" (default): v = √ᾱ ε − √(1−ᾱ) x₀ keeps the x₀ estimate sound at high noise, so DDIM and DPM-Solver++
    # give clean slices in 20–50 steps; with the seed's "epsilon" they came out noisy after a short training
    prediction: str = "v"
    loss: str = "mse"  # "mse" (EDM's) or "smooth_l1" (the seed's, kept by recipe "vp")
    # EDM (formulation "edm"): data std, log-normal training levels, sampling range and step spacing, EDM's values
    sigma_data: float = 0.5
    # the log-normal training levels' mean: None resolves to P_MEAN_PIXELS, or P_MEAN_LATENTS in a latent run
    p_mean: float | None = None
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    # joint image+mask runs: the share of the loss the K label channels carry together; 0: every channel
    # alike, i.e. K/(K+1) of it on the labels
    mask_loss_share: float = 0.0
    # joint image+mask runs (EDM): the share of training images whose mask channels the network is given clean
    # instead of noised, so the same model also learns to make an image for a mask a user brings
    given_mask_share: float = 0.0
    # image+mask runs (EDM): the share of training images handed to the network clean, their labels drawn for them;
    # 1 makes a label model for given images only (masks for the images of an image-only run: `sample --image-model`)
    given_image_share: float = 0.0
    # joint image+mask runs: the label channels' scale; None resolves by encoding (MASK_SCALES). Binary ±1 channels
    # sit far above σ_data = 0.5 and came out as blobs: at 520 steps on the demo set, Inception FID 283 / 269 / 257
    # and mask fidelity 0.73 / 0.75 / 0.76 at one-hot scale 1 / 0.5 / 0.25, but given-mask fidelity 0.82 / 0.79 / 0.63;
    # at 1,040 steps 0.25 against 0.5: fidelity 0.830 / 0.811, FID 192 / 215; 0.1 at 520 steps: 0.724, FID 261. Given
    # masks go to a --given-mask-share 1 model (docs/research/masks.md). The ordinal channel was measured at scale 1 only, so it keeps 1
    mask_scale: float | None = None
    # joint image+mask runs: "one-hot" (K channels) or "ordinal" (one channel, the labels as evenly spaced levels
    # from −mask_scale to +mask_scale in their order; OASIS's is the T1 intensity order)
    mask_encoding: str = "one-hot"
    # self-conditioning (Chen et al. 2022, "Analog Bits", made for discrete data diffused as real numbers): the
    # network also reads its own previous denoised estimate (zeros at the first sampling step; in training, half
    # the batches, from a first pass without gradients). EDM runs only. Off: on the demo set at equal minutes
    # (1,500 steps against 1,720) a joint run's mask fidelity 0.846 / FID 145 against 0.8505 / 121 without it
    self_condition: bool = False
    # volume runs: the seven Haar detail bands are multiplied by this before diffusion and divided after (diffusion/
    # wavelet.py), so bands far smaller than sigma_data come back with the network's error divided by it
    wavelet_detail_scale: float = 1.0

    def validate(self) -> None:
        if self.p_mean is None:  # a diffusion config alone is a pixel one; RunConfig.validate resolves latent runs first
            self.p_mean = P_MEAN_PIXELS
        _check_choice("diffusion.formulation", self.formulation, ("vp", "edm"))
        _check_choice("diffusion.mask_encoding", self.mask_encoding, MASK_ENCODINGS)
        if self.mask_scale is None:
            self.mask_scale = MASK_SCALES[self.mask_encoding]
        if not 0 < self.sigma_min < self.sigma_max or self.sigma_data <= 0 or self.p_std <= 0 or self.rho <= 0:
            raise BrainfusionError(
                f"diffusion.sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, sigma_data={self.sigma_data}, "
                f"p_std={self.p_std} and rho={self.rho} must satisfy 0 < sigma_min < sigma_max and be positive."
            )
        if self.timesteps < 1:
            raise BrainfusionError(f"diffusion.timesteps is {self.timesteps}; it must be 1 or more, e.g. 1000.")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise BrainfusionError(
                f"diffusion.beta_start={self.beta_start} and beta_end={self.beta_end} must satisfy 0 < beta_start < beta_end < 1."
            )
        _check_choice("diffusion.schedule", self.schedule, ("linear", "cosine"))
        _check_choice("diffusion.prediction", self.prediction, ("epsilon", "v"))
        _check_choice("diffusion.loss", self.loss, ("smooth_l1", "mse"))
        if not 0 <= self.mask_loss_share < 1:
            raise BrainfusionError(f"diffusion.mask_loss_share is {self.mask_loss_share}; it must be in [0, 1), e.g. 0.5 (0: off).")
        if not 0 <= self.given_mask_share <= 1:
            raise BrainfusionError(f"diffusion.given_mask_share is {self.given_mask_share}; it must be in [0, 1], e.g. 0.2 "
                                   "(0: off; 1: an image model for given masks only).")
        if not (0 <= self.given_image_share <= 1 and self.given_image_share + self.given_mask_share <= 1 + 1e-9):
            raise BrainfusionError(f"diffusion.given_image_share is {self.given_image_share}; it must be in [0, 1] and leave "
                                   f"room for given_mask_share ({self.given_mask_share}): the two shares add up to 1 at most.")
        if self.mask_scale <= 0:
            raise BrainfusionError(f"diffusion.mask_scale is {self.mask_scale}; it must be positive, e.g. 1 or 0.5.")
        if not (math.isfinite(self.wavelet_detail_scale) and 0 < self.wavelet_detail_scale <= 100):
            raise BrainfusionError(f"diffusion.wavelet_detail_scale is {self.wavelet_detail_scale}; give a positive factor up "
                                   "to 100, e.g. 1 (off) or 4.")
        if self.self_condition and self.formulation != "edm":
            raise BrainfusionError("diffusion.self_condition needs the EDM formulation (the default recipe); leave it off for VP runs.")
        for key, share in (("given_mask_share", self.given_mask_share), ("given_image_share", self.given_image_share)):
            if share and self.formulation != "edm":
                raise BrainfusionError(f"diffusion.{key} needs the EDM formulation (the default recipe); leave it at 0 for VP runs.")


@dataclass
class TrainConfig:
    """Optimisation, budgets, checkpoints and logging."""

    out_dir: str = "runs/demo"
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    # "constant" (default) after the warm-up; for a step budget known in advance, "cosine": decay to 0 at
    # train.max_steps, or "wsd": constant, then linear to 0 over the last train.lr_decay_share of train.max_steps
    lr_schedule: str = "constant"
    lr_decay_share: float = 0.2
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    epochs: float = 0.0  # 0 = not used; the first budget reached ends training
    max_steps: int = 0
    time_budget_min: float = 0.0
    precision: str = "auto"  # "auto": bf16 where the hardware has it, else fp16 on GPUs (with a loss scaler), fp32 on CPUs
    channels_last: str = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # share of the run (of max_steps, else of the time budget) at which the weights are also kept in
    # checkpoints/guide/, the guide of autoguidance (process.autoguidance); 0: none
    guide_at: float = 0.5
    sample_every: int = 1000
    eval_every: int = 0
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    compile: bool = False
    logger: str = "csv"  # "tensorboard": also TensorBoard events in <out_dir>/tensorboard (pip install brainfusion[tensorboard])

    def validate(self) -> None:
        _check_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check_choice("train.channels_last", self.channels_last, ("auto", "on", "off"))
        _check_choice("train.logger", self.logger, ("csv", "tensorboard"))
        _check_choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine", "wsd"))
        if self.lr_schedule != "constant" and self.max_steps < 1:
            raise BrainfusionError(f"train.lr_schedule={self.lr_schedule} decays to the end of train.max_steps; set train.max_steps too.")
        if not 0 < self.lr_decay_share <= 1:
            raise BrainfusionError(f"train.lr_decay_share is {self.lr_decay_share}; it must be in (0, 1], e.g. 0.2.")
        if self.batch_size <= 0:
            raise BrainfusionError(f"train.batch_size must be positive, got {self.batch_size}.")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise BrainfusionError(f"train.{name} must be 1 or more, got {getattr(self, name)}.")
        if not 0 <= self.guide_at < 1:
            raise BrainfusionError(f"train.guide_at is a share of the run, 0 (none) up to below 1, got {self.guide_at}.")
        for name in ("epochs", "max_steps", "time_budget_min"):
            if getattr(self, name) < 0:
                raise BrainfusionError(f"train.{name} must not be negative, got {getattr(self, name)}.")
        if not (self.epochs or self.max_steps or self.time_budget_min):
            raise BrainfusionError(
                "no training budget set; give train.epochs, train.max_steps or train.time_budget_min."
            )


@dataclass
class AutoencoderConfig:
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), MONAI's `AutoencoderKL`.

    One level per `channels` entry; each level after the first halves the resolution, so three levels
    compress 4x per side (MONAI's 2D brain LDM and the seed's 256² slices → 64×64 latents). With `patch`
    p > 1 the network sees each p×p pixel block as p² channels (models/autoencoder.PixelBlocks), so the
    compression is p · 2^(levels − 1).
    """

    latent_channels: int = 4
    # 4×4 pixel blocks into one level of 64: 11.3 img/s at 256² in training on 2 CPU cores, where three levels
    # (16, 32, 64) on the pixels train 3.4; after 7 CPU minutes it reconstructs held-out slices at 26.2 dB
    patch: int = 4
    channels: tuple[int, ...] = (64,)
    res_blocks: int = 1
    norm_groups: int = 16
    # 0 (default): whole slices. Crops are cheaper a step, but GroupNorm then learns crop statistics: after 30 CPU
    # minutes on 128² crops, whole held-out slices came back on a grey background (PSNR 20.4 dB inside the brain)
    crop_size: int = 0
    l1_weight: float = 1.0
    ssim_weight: float = 0.5
    kl_weight: float = 1e-6  # MONAI's brain LDM tutorial's weight: enough to keep latents bounded, not to blur them
    # weight of the scale-equivariance loss (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders"):
    # the 2×-average-pooled latent must decode to the 2×-average-pooled slice, which keeps high frequencies the
    # slice lacks out of the latent, where a diffusion model has to learn them. 0 (default): off
    scale_equivariance: float = 0.0
    adv_weight: float = 0.01
    adv_start: int = 2000  # steps of reconstruction alone before the patch discriminator joins (Esser et al. 2021)
    disc_channels: int = 32
    disc_layers: int = 3
    # 1: the discriminator sees pixels. p > 1: p×p pixel blocks as p² channels, so its convolutions run at 1/p of
    # the resolution: 14.1 img/s in the adversarial phase at 256² against 7.1 on pixels (2 CPU cores), and two 30-CPU-
    # minute runs reached rFID 71.1 and 54.7 against 82.2 on pixels. None (default): 2 where the slices allow, else 1
    disc_patch: int | None = None
    # a decoder fine-tune, as Stable Diffusion's ft-EMA and ft-MSE decoders were made: start from this autoencoder
    # run's weights and train the decoder alone, so every latent stays bitwise the same and a latent run trained on
    # that autoencoder decodes through this one (latent.decoder). "": train encoder and decoder
    decoder_of: str = ""
    decoder_of_sha256: str = ""  # of its weights file, recorded when the fine-tune starts

    @property
    def factor(self) -> int:
        return self.patch * 2 ** (len(self.channels) - 1)

    def validate(self, image_size: int) -> None:
        if not 1 <= len(self.channels) <= 5 or any(c <= 0 or c % self.norm_groups for c in self.channels):
            raise BrainfusionError(
                f"autoencoder.channels {self.channels} must be 1 to 5 positive widths divisible by autoencoder.norm_groups="
                f"{self.norm_groups}, e.g. 64 with patch 4, or 16,32,64 with patch 1 (4x compression per side)."
            )
        if self.patch < 1 or self.factor < 2:
            raise BrainfusionError(
                f"autoencoder.patch {self.patch} with {len(self.channels)} level(s) compresses {self.factor}x; give a patch of "
                "1 or more and at least 2x compression (e.g. patch 4 with one level, or patch 1 with three)."
            )
        if self.latent_channels < 1 or self.res_blocks < 1:
            raise BrainfusionError("autoencoder.latent_channels and autoencoder.res_blocks must be 1 or more.")
        if image_size % self.factor:
            raise BrainfusionError(f"image_size {image_size} is not divisible by the autoencoder's compression {self.factor}.")
        if self.crop_size and (self.crop_size > image_size or self.crop_size % self.factor):
            raise BrainfusionError(
                f"autoencoder.crop_size {self.crop_size} must be 0 (whole slices) or at most image_size {image_size} and "
                f"divisible by {self.factor}."
            )
        seen, per_patch = self.crop_size or image_size, 2 ** (self.disc_layers + 2)
        if self.disc_patch is None:
            self.disc_patch = 2 if seen >= 2 * per_patch and seen % 2 == 0 else 1
        need = self.disc_patch * per_patch
        if self.scale_equivariance and (seen // self.factor) % 2:
            raise BrainfusionError(
                f"autoencoder.scale_equivariance pools the latent 2×, but slices (or crops) of {seen} make latents of odd side "
                f"{seen // self.factor}; use a size divisible by {2 * self.factor} or set autoencoder.scale_equivariance=0."
            )
        if self.adv_weight and (self.disc_layers < 1 or self.disc_patch < 1 or seen < need or seen % self.disc_patch):
            raise BrainfusionError(
                f"the patch discriminator's {self.disc_layers} layers on {self.disc_patch}×{self.disc_patch} pixel blocks need "
                f"training crops of at least {need} pixels, divisible by {self.disc_patch}, not {seen}; raise "
                "autoencoder.crop_size, lower autoencoder.disc_layers or autoencoder.disc_patch, or set autoencoder.adv_weight=0."
            )
        if min(self.l1_weight, self.ssim_weight, self.kl_weight, self.adv_weight, self.scale_equivariance) < 0 or self.adv_start < 0:
            raise BrainfusionError("the autoencoder's loss weights and autoencoder.adv_start must not be negative.")


@dataclass
class ScoreConfig:
    """How an autoencoder run scores itself at the end (ae_metrics.json): on held-out slices, never its own."""

    heldout: str = ""  # a data source of held-out slices; "" = the OASIS layout's validate split, if the data has one
    n: int = 500  # slices scored (PSNR and SSIM inside the brain; rFID on min(n, all) of them)
    inception: bool = True  # rFID needs the Inception network, ~0.25 s an image on a 2-core CPU


class _Serialised:
    """JSON in and out for a run's top-level config (saved in every checkpoint); unknown keys are errors."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config"):
        return _build(cls, raw, source, "")


@dataclass
class AutoencoderRunConfig(_Serialised):
    """Everything needed to reproduce an autoencoder run (`brainfusion train-autoencoder`)."""

    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=256))
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/autoencoder", batch_size=8, lr=2e-4,
                                                                   warmup_steps=100, sample_every=500))

    def validate(self) -> None:
        self.data.validate()
        self.autoencoder.validate(self.data.image_size)
        self.train.validate()


@dataclass
class LatentConfig:
    """The autoencoder a latent-diffusion run works through, recorded so sampling decodes with the same one.

    `mean` and `std` (per latent channel, from the training latents) map latents to std σ_data, as
    EDM2 (Karras et al. 2024) does; they are fitted when the run starts and saved in every checkpoint.
    """

    autoencoder: str = ""  # an autoencoder run folder or checkpoint; "" = pixel diffusion
    sha256: str = ""  # of the autoencoder's weights file, checked at every load
    decoder: str = ""  # a decoder fine-tune of `autoencoder` (autoencoder.decoder_of) to decode with; "" = its own decoder
    decoder_sha256: str = ""
    image_size: int = 0  # the pixel size the autoencoder decodes to
    channels: int = 0
    factor: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.autoencoder)


@dataclass
class SlabConfig:
    """A volume run's default route: the slice U-Net makes each volume a slab of axial slices at a time.

    Slabs of `size` slices go inferior to superior, each given the `context` slices made just before it (clean, as
    input channels in front, as an upsampler reads its low-resolution slice) and its place in the volume (one
    continuous input, 0 at the bottom, 1 at the top), as cDPM (Peng et al. 2023) makes brain volumes with a 2-D
    model. Below the volume's first slice the context is background. `size` 1 with `context` 0 is the stack of
    independent slices, each knowing only its place: the baseline a volume model must beat. `size` 0: the wavelet
    route (diffusion/wavelet.py)."""

    size: int = 0
    context: int = 0
    # Gaussian noise of this std (the [-1, 1] units of slices) on the context, in training and in sampling alike, so
    # the network draws a slab's fine detail itself instead of copying its neighbours' (the noise conditioning
    # augmentation of cascades, CDM, Ho et al. 2022, at one fixed level). Off: at 0.1 and 0.3 every plane's FID was
    # worse after 2,173 steps on the demo volumes (axial 158.6 and 163.0 against 144.9; research/volumes.md)
    context_noise: float = 0.0

    @property
    def active(self) -> bool:
        return self.size > 0

    def rounds(self, grid: int) -> int:
        """Sampling passes one volume takes: a slab at a time, or the whole volume at once (the wavelet route)."""
        return grid // self.size if self.active else 1

    def validate(self, grid: int) -> None:
        if not 0 <= self.context_noise <= 1:
            raise BrainfusionError(f"slab.context_noise is {self.context_noise:g}; give a noise std from 0 (none) to 1, e.g. 0.1.")
        if self.size < 0 or self.context < 0 or (self.active and grid % self.size) or (self.context and not self.active):
            raise BrainfusionError(f"slab.size {self.size} and slab.context {self.context} do not fit data.grid {grid}: the size "
                                   f"must divide the grid (e.g. 4 for {grid}), the context be 0 or more (e.g. 4), and both 0 for "
                                   "the wavelet route.")


AUGMENT_LEVEL = 0.1  # an upsampler's default sampling level of noise conditioning augmentation


@dataclass
class UpsampleConfig:
    """The super-resolution stage of a cascade (Ho et al. 2022, "Cascaded Diffusion Models"; SR3, Saharia et al. 2021).

    The network generates a data.image_size slice given the same slice at `from_size`, upsampled bicubically and
    stacked in front as a channel it reads clean (SR3's concatenation). With `residual_scale` it generates only what
    bicubic enlargement misses. Noise conditioning augmentation (CDM, Imagen) is there but off by default: with
    augment_max > 0 the low-resolution slice gets Gaussian noise of a level σ ~ U(0, augment_max) in training, which
    the network is told as a continuous input, so at sampling it can be told to trust a base model's slightly-off
    slices less; `augment` is that fixed level at sampling.
    """

    from_size: int = 0  # 0: not an upsampler
    # 0: no noise conditioning augmentation. After 20 CPU minutes (1,455 steps of 32 at 256² from 64²) an upsampler
    # trained without it beat one trained with levels up to 0.5 on real slices (FID 72.3 against 89.3, n = 300, floor
    # 85.0) and on the base model's own (cascade at 60 minutes 131.3 against 145.9, n = 1,000, floor 77.1; bicubic
    # 139.6): with the residual target the base's coarse structure is kept whatever the level, and the noisy levels
    # cost the network its training steps
    augment_max: float = 0.0
    # > 0: the network generates the residual, the slice minus its enlarged low-resolution version, times this
    # (SRDiff, Li et al. 2022), so it starts from bicubic upsampling and learns the detail alone. On the development
    # slices at 256² from 64² that residual has std 0.071 (the slices 0.63): ×7 brings it to σ_data 0.5. 0: the slice
    # itself (SR3's target): FID 403.5 after 10 CPU minutes against a floor of 77.1, its samples speckled (n = 1,000)
    residual_scale: float = 7.0
    # the sampling level, in the [-1, 1] units of a slice; None resolves to AUGMENT_LEVEL, or augment_max if lower
    augment: float | None = None
    # > 0: each level also blurs the low-resolution slice before its noise, by a Gaussian of this many from_size
    # pixels per unit of level (CDM's blur augmentation, Ho et al. 2022), and a residual is taken from the blurred slice.
    # Off: with 4 after 1,455 steps the upsampler alone scored FID 159.8 against the plain one's 93.1 on real slices,
    # and the cascade 219.7 against 155.9 (n = 300, research/cascade.md)
    blur: float = 0.0

    @property
    def active(self) -> bool:
        return self.from_size > 0

    def validate(self, image_size: int) -> None:
        if self.augment is None:
            self.augment = min(AUGMENT_LEVEL, self.augment_max)
        if self.from_size < 0 or (self.active and (image_size % self.from_size or image_size <= self.from_size)):
            raise BrainfusionError(f"upsample.from_size {self.from_size} must divide data.image_size {image_size} and be smaller, "
                                   f"e.g. 64 for 256 or 16 for 64.")
        if self.residual_scale < 0:
            raise BrainfusionError(f"upsample.residual_scale is {self.residual_scale:g}; use 0 (the slice itself) or a positive scale.")
        if self.blur < 0:
            raise BrainfusionError(f"upsample.blur is {self.blur:g}; use 0 (no blur) or a positive width per unit of level.")
        if not 0 <= self.augment <= self.augment_max or self.augment_max < 0:
            raise BrainfusionError(f"upsample.augment {self.augment} must lie in [0, upsample.augment_max {self.augment_max}], "
                                   "the levels the network was trained on.")


@dataclass
class RunConfig(_Serialised):
    """Everything needed to reproduce a training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    upsample: UpsampleConfig = field(default_factory=UpsampleConfig)
    slab: SlabConfig = field(default_factory=SlabConfig)

    @property
    def mask_labels(self) -> int:
        """Tissue labels generated with each image (0: images only): the network's last K channels (the first
        are the image, or its latent's channels)."""
        return len(self.data.mask_values) if self.data.masks else 0

    @property
    def slab_channels(self) -> int:
        """A volume slice's channels in a slab run: its image and, with masks, its tissue label channels."""
        return 1 + (self.mask_channels if self.data.volumes else 0)

    @property
    def mask_channels(self) -> int:
        """The network's last channels, which carry the labels: K one-hot ones, or one ordinal (0: images only)."""
        return mask_channel_count(self.mask_labels, self.diffusion.mask_encoding)

    @property
    def images_for_masks_only(self) -> bool:
        """Trained with every mask given (diffusion.given_mask_share 1): an image model for given masks, which
        never learnt to draw masks itself; its pairs need masks from elsewhere (a joint run's)."""
        return bool(self.mask_labels) and self.diffusion.given_mask_share >= 1

    @property
    def masks_for_images_only(self) -> bool:
        """Trained with every image given (diffusion.given_image_share 1): a label model, which draws the tissue labels
        of images it is handed and never learnt to draw an image; its pairs need images from elsewhere."""
        return bool(self.mask_labels) and self.diffusion.given_image_share >= 1

    def validate(self) -> None:
        self.model.image_size, self.model.spatial_dims = self.data.image_size, 2
        if self.latent.active and self.latent.factor:  # the U-Net works on the latent grid
            if self.data.image_size != self.latent.image_size:
                raise BrainfusionError(
                    f"data.image_size is {self.data.image_size} but the autoencoder {self.latent.autoencoder} was trained at "
                    f"{self.latent.image_size}; use --image-size {self.latent.image_size} or train an autoencoder at this size."
                )
            self.model.image_size = self.data.image_size // self.latent.factor
            self.model.in_channels = self.latent.channels
        if self.diffusion.p_mean is None:
            self.diffusion.p_mean = P_MEAN_LATENTS if self.latent.active else P_MEAN_PIXELS
        if self.data.masks and self.data.mask_values:  # the image (or its latent) and one channel per tissue label, generated together
            self.model.in_channels = (self.latent.channels if self.latent.active and self.latent.factor else 1) + self.mask_channels
        self.model.self_condition = self.diffusion.self_condition
        if self.diffusion.given_image_share and not self.data.masks:
            raise BrainfusionError("diffusion.given_image_share trains a model to draw the labels of given images, so it "
                                   "needs masks; add --masks (or --masks DIR).")
        if self.diffusion.given_image_share and self.latent.active:
            raise BrainfusionError("diffusion.given_image_share needs a pixel run: a latent run's label model would need the "
                                   "autoencoder's latents of every given image; train it without --autoencoder.")
        self.condition.validate()
        if self.data.volumes:
            self._validate_volumes()
        elif self.slab.active:
            raise BrainfusionError(f"slab.size {self.slab.size} builds volumes a slab at a time; train on volumes (data.volumes) "
                                   "or leave slab.size at 0.")
        self.upsample.validate(self.data.image_size)
        if self.upsample.active:
            self._validate_upsampler()
        if self.condition.fitted:  # the network's condition inputs follow the vocabulary
            categorical, continuous = self.condition.names()
            self.model.class_counts = tuple(len(self.condition.classes[name]) for name in categorical)
            self.model.continuous_inputs = len(continuous)
        if self.data.volumes and self.slab.active:  # a slab's place in the volume, after any condition's values
            self.model.continuous_inputs = (len(self.condition.names()[1]) if self.condition.fitted else 0) + 1
        for part in (self.data, self.model, self.diffusion, self.train):
            part.validate()

    def _validate_volumes(self) -> None:
        """A volume run is a pixel EDM run on the one-level Haar coefficients of its volumes (diffusion/wavelet.py):
        WAVELET_BANDS channels of (grid/2)³, a 3-D U-Net; or with slab.size the slice U-Net a slab at a time
        (diffusion/slabs.py), each slice with its tissue label channels where the run has masks. Latents, upsamplers
        and slice levels are slice things."""
        if self.latent.active or self.upsample.active or self.condition.slice_level:
            raise BrainfusionError("a volume run (data.volumes) takes no latent.autoencoder, upsample.from_size or "
                                   "condition.slice_level; leave them out, or train on slices without data.volumes.")
        d = self.diffusion
        label_model = d.given_image_share == 1 and self.data.masks and self.slab.active  # recipe volume-labels
        if d.formulation != "edm" or d.self_condition or d.given_mask_share or (d.given_image_share and not label_model) or d.mask_loss_share:
            raise BrainfusionError("a volume run (data.volumes) is an EDM run (diffusion.formulation=edm) without "
                                   "diffusion.self_condition, given_mask_share or mask_loss_share, and given_image_share is 0 or "
                                   "(a label model with data.masks) 1; use the volume-slabs or volume-labels recipe.")
        if self.data.masks and not self.slab.active:
            raise BrainfusionError("volumes with tissue masks (data.masks) are made a slab at a time; use the volume-slabs "
                                   "recipe (slab.size > 0) instead of the wavelet route.")
        if self.train.eval_every:
            raise BrainfusionError("train.eval_every scores slices during training; set it to 0 for a volume run (data.volumes).")
        self.data.validate()
        self.slab.validate(self.data.grid)
        levels = len(self.model.channel_mults)
        if self.slab.active:  # the slice U-Net on the grid's axial slices, the context and the slab as channels
            if self.data.grid % (1 << levels):
                raise BrainfusionError(f"data.grid {self.data.grid} cannot be halved by the U-Net's {levels} levels "
                                       f"(model.channel_mults); use a multiple of {1 << levels}, or fewer levels.")
            self.model.image_size = self.data.grid
            self.model.in_channels = (self.slab.context + self.slab.size) * self.slab_channels
            return
        if (self.data.grid // 2) % (1 << levels):
            raise BrainfusionError(f"data.grid {self.data.grid} makes {self.data.grid // 2}³ wavelet coefficients, which the U-Net's "
                                   f"{levels} levels (model.channel_mults) cannot halve {levels} times; use a grid that is a multiple "
                                   f"of {2 << levels}, or fewer levels.")
        self.model.spatial_dims, self.model.image_size, self.model.in_channels = 3, self.data.grid // 2, WAVELET_BANDS

    def _validate_upsampler(self) -> None:
        """An upsampler reads the low-resolution slice as its first channel and the augmentation level as its one
        continuous input; the slice it is given carries everything else, so it takes no labels, masks or latents."""
        if self.latent.active or self.data.masks or self.condition.active or self.diffusion.formulation != "edm":
            raise BrainfusionError("an upsampler (upsample.from_size) is a pixel EDM run without masks or conditions; leave "
                                   "out latent.autoencoder, data.masks and condition.labels / slice_level.")
        if self.diffusion.self_condition:
            raise BrainfusionError("an upsampler (upsample.from_size) does not take diffusion.self_condition; leave it off.")
        self.model.in_channels, self.model.continuous_inputs = 2, 1



# Named training recipes, as overrides of the dataclass defaults. "edm" is the default: Karras et al.'s
# (2022) formulation with the U-Net on the full-resolution grid. "edm-p2" is the previous default (a 2×2
# patch stem, 3.2× cheaper a step, FID 84.4 against 66.2 at 20 CPU minutes); "vp" the one before it (the
# seed's DDPM process with v-prediction and smooth-L1). README "Quality per CPU-minute" has the measurements.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "edm": {"diffusion": {"formulation": "edm", "loss": "mse"}, "model": {"pixel_channels": 0, "patch_size": 1}},
    "edm-p2": {"diffusion": {"formulation": "edm", "loss": "mse"}, "model": {"pixel_channels": 0, "patch_size": 2}},
    "vp": {"diffusion": {"formulation": "vp", "prediction": "v", "loss": "smooth_l1"},
           "model": {"pixel_channels": 0, "patch_size": 2}},
    # the pixel route at 256²: a 4×4 patch stem, and the noise levels of simple diffusion (Hoogeboom et al. 2023)
    # shifted to the resolution, log-SNR by 2·ln(64/256), i.e. σ × 4: P_mean −1.2 + ln 4
    "edm-p4-shift": {"diffusion": {"formulation": "edm", "loss": "mse", "p_mean": -1.2 + math.log(4)},
                     "model": {"pixel_channels": 0, "patch_size": 4}},
    # a label model for given images (train --masks --recipe edm-labels; sample --image-model): every image given
    # clean, so the labels must be read from it, which happens at high noise, where P_mean 2.0 puts the training;
    # ±1 label channels, a small U-Net (2.8× the default's img/s) and the segmenter's lr. On the demo set, 400 steps
    # of 32, labels drawn for 50 unseen real slices against their own: Dice 0.58 with the defaults (0.59 at ±1), 0.73
    # with ±1 and P_mean 0.4, 0.81 with lr 2e-3 too, 0.84 with P_mean 1.2, 0.85 with P_mean 2.0; batches of 16 keep
    # 0.85 in half the minutes, which go to the image model instead (docs/research/masks.md)
    # the upsampler of a cascade (train --upsample-from 64 --image-size 256): a 4×4 patch stem, so at 256² its levels
    # run at 64, 32, 16 and 8 as the default U-Net's do at 64², with full-resolution 3×3 convs on each side against a
    # block pattern, and a narrower width: adding detail to a given slice is a local task
    "upsampler": {"diffusion": {"formulation": "edm", "loss": "mse"},
                  "model": {"pixel_channels": 16, "patch_size": 4, "base_channels": 32}},
    # a volume run (train --volumes): EDM on one level of 3-D Haar coefficients (WDM, Friedrich et al. 2024), 8 bands
    # of 32³ for a 64³ grid, through a 7.4 M-parameter 3-D U-Net of four levels (32, 16, 8, 4; attention at 4³ and the
    # bottleneck), 76.7 GFLOP per training volume (the slice U-Net: 10.9 per slice). Batches of 4 volumes: 0.9 s a step on
    # 2 cores of an Intel Xeon with AMX (bf16, one thread, the cores shared with other jobs); checkpoints every 100 steps
    "volume-wavelet": {"diffusion": {"formulation": "edm", "loss": "mse"},
                       "model": {"pixel_channels": 0, "patch_size": 1, "base_channels": 32, "channel_mults": (1, 2, 2, 4),
                                 "attention_resolutions": (4,)},
                       "data": {"volumes": True},
                       "train": {"batch_size": 4, "lr": 2e-4, "warmup_steps": 100, "checkpoint_every": 100, "sample_every": 500}},
    # the default volume route (slab.size; diffusion/slabs.py): the default slice U-Net makes 4 axial slices at a time,
    # given the 4 made before them, 16 slabs a 64³ volume; and the baseline a volume route must beat, the stack of
    # independent slices that know only their place in the volume. 60 minutes of one thread on the demo volumes, FID
    # axial / coronal / sagittal: slabs 144.9 / 138.1 / 90.8, independent slices 107.7 / 213.7 / 298.1, wavelets
    # 264.7 / 247.9 / 223.5 (research/volumes.md)
    # With --masks its slices carry one ordinal label channel each: at 1,500 steps on the demo volumes FID 240.6 /
    # 232.1 / 200.1 and labels against their image's intensity classes Dice 0.69, against one-hot's 271.3 / 271.6 /
    # 254.2 and 0.57 (four channels a slice, 4/5 of the loss)
    "volume-slabs": {"diffusion": {"formulation": "edm", "loss": "mse", "mask_encoding": "ordinal"},
                     "model": {"pixel_channels": 0, "patch_size": 1},
                     "data": {"volumes": True}, "slab": {"size": 4, "context": 4}, "train": {"sample_every": 500}},
    "volume-slices": {"diffusion": {"formulation": "edm", "loss": "mse"}, "model": {"pixel_channels": 0, "patch_size": 1},
                      "data": {"volumes": True}, "slab": {"size": 1, "context": 0}, "train": {"sample_every": 500}},
    # the label model of volumes (train --volumes --masks --recipe volume-labels; sample --image-model): edm-labels'
    # settings on slabs, every image slice given, so a volume run's images get their labels slab by slab. On the demo
    # volumes, 2,000 steps: held-out real volumes labelled at Dice 0.59 / 0.83 / 0.88 (CSF / grey / white); P_mean 1.2
    # halved its ~1 % stray background labels but lost grey and white matter (0.76 / 0.83 at 1,000 steps against 0.81 / 0.85);
    # keeping the drawn tissue in one piece (data/volumes.tissue_in_one_piece) clears them instead
    "volume-labels": {"diffusion": {"formulation": "edm", "loss": "mse", "given_image_share": 1.0, "mask_scale": 1.0, "p_mean": 2.0},
                      "model": {"pixel_channels": 0, "patch_size": 1, "base_channels": 16, "channel_mults": (1, 2, 4, 4)},
                      "data": {"volumes": True}, "slab": {"size": 4, "context": 4},
                      "train": {"lr": 2e-3, "warmup_steps": 50, "batch_size": 16, "sample_every": 500}},
    "edm-labels": {"diffusion": {"formulation": "edm", "loss": "mse", "given_image_share": 1.0, "mask_scale": 1.0, "p_mean": 2.0},
                   "model": {"pixel_channels": 0, "patch_size": 1, "base_channels": 16, "channel_mults": (1, 2, 4, 4)},
                   "train": {"lr": 2e-3, "warmup_steps": 50, "batch_size": 16}},
}


def config_differences(trained: dict[str, Any], given: dict[str, Any]) -> str:
    """`section.key OLD (given NEW)` for each field where two sets of config sections differ, so a refused resume
    names what to change; a section is a config dataclass, or a single value under its full key."""
    def flat(sections: dict[str, Any]) -> dict[str, Any]:
        return {key: value for name, part in sections.items()
                for key, value in ({f"{name}.{k}": v for k, v in asdict(part).items()} if dataclasses.is_dataclass(part)
                                   else {name: part}).items()}

    was, now = flat(trained), flat(given)
    return ", ".join(f"{k} {was[k]} (given {now.get(k)})" for k in was if was[k] != now.get(k))


def recipe_config(name: str, base: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig of a named recipe, applied on `base` (a RunConfig dict; default: the defaults)."""
    if name not in RECIPES:
        raise BrainfusionError(f"recipe {name!r} is unknown; choose one of {', '.join(RECIPES)}.")
    raw = base if base is not None else RunConfig().to_dict()
    for section, values in RECIPES[name].items():
        raw[section] = {**raw.get(section, {}), **values}
    return RunConfig.from_dict(raw, source=f"recipe {name}")


def load_config(path: Path) -> RunConfig:
    """Read a JSON or TOML config file into a RunConfig (unknown keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise BrainfusionError(f"config file {path} does not exist; check the path.")
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BrainfusionError(f"config file {path} is not valid {path.suffix[1:].upper() or 'JSON'} ({exc}); fix its syntax.") from None
    if not isinstance(raw, dict):
        raise BrainfusionError(f"config file {path} must hold an object with sections data/model/diffusion/train/condition.")
    return RunConfig.from_dict(raw, source=str(path))


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise BrainfusionError(f"{name} is {value!r}; choose one of {', '.join(map(str, choices))}.")


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise BrainfusionError(f"{prefix or 'the top level'} in {source} must be an object of keys.")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise BrainfusionError(
                f"unknown key '{name}' in {source}; valid keys here are {', '.join(known)}."
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, source, f"{name}.")
        else:
            kwargs[key] = _coerce(hint, value, name, source)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):  # `float | None`: null is None
        return None if value is None else _coerce(next(a for a in typing.get_args(hint) if a is not type(None)), value, name, source)
    try:
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            (_key_type, value_type) = typing.get_args(hint)
            return {str(k): _coerce(value_type, v, f"{name}.{k}", source) for k, v in value.items()}
        if origin is tuple:
            (item_type, _ellipsis) = typing.get_args(hint)
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return tuple(item_type(v) for v in value)
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError(value)
            return bool(value)
        if hint in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # JSON `true` is not a number
        if hint is str and not isinstance(value, str):
            raise ValueError(value)  # e.g. "path": 5 or "split": ["train"]
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError):
        raise BrainfusionError(
            f"'{name}' in {source} has value {value!r}, which is not a valid {getattr(hint, '__name__', hint)}."
        ) from None
