"""The model card of an export: Hugging Face YAML metadata, then what a reader needs to use the model well.

Published brain-MRI generators are criticised in their trackers for weights without a card; this one
says where the data came from, how long it trained on what, what the evaluation measured against
which reference set (with n), whether it copies training slices, and what it must not be used for.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..checkpoint import run_folder
from ..config import FAST_STEPS, FOLDER_LABELS, LEVEL_COLUMN, RunConfig
from ..data.channels import ordinal_level
from ..data.masks import MASK_LAYOUT, mask_names

LOAD = """With plain diffusers, no brainfusion needed{needs}: the folder ships its code (`pipeline.py`, and `brainfusion_hub.py`
in each custom component's folder), which diffusers runs only with `trust_remote_code=True`. A call follows diffusers'
convention for unconditional pipelines (`DDPMPipeline`):

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{folder}", custom_pipeline="{folder}", trust_remote_code=True)
images = pipe(batch_size=16{request}).images   # 16 PIL images, {size}×{size}
pipe(batch_size=16, num_inference_steps=50, output_type="np").images   # float (16, {size}, {size}, 1) in [0, 1]
```

By default a call draws with SDE-DPM-Solver++ in {steps} steps from seed 0: the slices `brainfusion sample --n 16` writes.
`seed=S` gives those of `--seed S` (each image has its own noise, so image i is the same in any batch);
`generator=torch.Generator().manual_seed(1)` draws the seed from the generator instead. `sampler="ddim"` (or `"dpm++"`,
`"heun"`, `"ddpm"`) picks another of brainfusion's samplers; `return_dict=False` returns a tuple.

With brainfusion, which checks every file against the export's SHA-256 manifest and runs its own code:

```python
from brainfusion import BrainfusionPipeline   # pip install brainfusion

pipe = BrainfusionPipeline.from_pretrained("{folder}")
images = pipe(batch_size=16{request}).images
```"""


def _training(run_dir: Path, step: int) -> str:
    log_csv = run_dir / "train_log.csv"
    rows = list(csv.DictReader(log_csv.read_text().splitlines())) if log_csv.is_file() else []
    if not rows:
        return f"{step:,} optimizer steps."
    last = rows[-1]
    return (f"{step:,} optimizer steps; the log's last window ran at {float(last['images_per_s']):.0f} images/s "
            f"({float(last['elapsed_s']) / 60:.1f} minutes in the last session of the run).")


def _evaluation(metrics_path: Path | None) -> str:
    if metrics_path is None or not metrics_path.is_file():
        return "Not evaluated: run `brainfusion evaluate --checkpoint RUN --real HELD_OUT --train TRAIN --out EVAL` and export with `--metrics EVAL/metrics.json`."
    m = json.loads(metrics_path.read_text())
    s, counts, mem = m["summary"], m["counts"], m.get("memorization", {})
    lines = [f"From `{metrics_path}`: {counts['generated']:,} generated slices against {counts['real']:,} real held-out slices "
             f"at {m['resolution']}×{m['resolution']} (Inception on {counts.get('inception_per_set', '?')} per set).", "",
             "| metric | value |", "|---|---|"]
    for key, label in (("FID_inception", "Inception FID"), ("KID_inception", "Inception KID"), ("FD_domain", "FD_domain (download-free)"),
                       ("spectrum_distance", "power-spectrum distance"), ("msssim_gen", "MS-SSIM within generated"),
                       ("msssim_real", "MS-SSIM within real")):
        if s.get(key) is not None:
            lines.append(f"| {label} | {s[key]:.4g} |")
    if "share_near_copies" in mem:
        lines += ["", f"Memorisation: {mem['share_near_copies']:.1%} of generated slices are near-copies of a training slice "
                      f"({mem.get('expected_share_without_copying', 0):.1%} expected without copying; {mem.get('n_train', '?')} training slices checked)."]
    return "\n".join(lines)


def _conditional_evaluation(metrics_path: Path | None) -> str:
    """The tables of `brainfusion evaluate --conditional` (conditional.md beside the metrics), if that ran."""
    checks = None if metrics_path is None else Path(metrics_path).parent / "conditional.md"
    if checks is None or not checks.is_file():
        return ""
    return f"\n\n### Does it make what it is asked for?\nFrom `{checks}`: {checks.read_text().strip()}"


def _autoencoder(config: RunConfig) -> str:
    """The card's section on a latent run's autoencoder, with its held-out reconstruction scores from the
    `ae_metrics.json` of the autoencoder's run folder, if there; empty for a pixel-space model."""
    latent = config.latent
    if not latent.active:
        return ""
    side = latent.image_size // latent.factor
    lines = ["## Autoencoder", (
        f"Latent diffusion (Rombach et al. 2022): the U-Net denoises {latent.channels}×{side}×{side} latents of the "
        f"autoencoder `{latent.autoencoder}` (MONAI AutoencoderKL, {latent.factor}× smaller per side, weights SHA-256 "
        f"`{latent.sha256[:16]}…`), which this export ships as its `vae` component. Each latent channel was scaled to std 0.5 "
        "for the diffusion model, and is scaled back before decoding."), ""]
    if latent.decoder:
        lines[1] = lines[1].replace("which this export ships", f"with the decoder of `{latent.decoder}` (a fine-tune of that "
                                    f"decoder, its encoder and so its latents unchanged; SHA-256 `{latent.decoder_sha256[:16]}…`), "
                                    "which this export ships")
    path = Path(latent.decoder or latent.autoencoder)
    metrics_path = (path if path.is_dir() else run_folder(path)) / "ae_metrics.json"
    if not metrics_path.is_file():
        return "\n".join([*lines, f"Its reconstruction quality is not stated: `{metrics_path}` was not found.", "", ""])
    m = json.loads(metrics_path.read_text())
    rfid = "not computed" if m.get("rfid") is None else f"{m['rfid']:.4g}"
    lines += [f"Reconstruction of {m.get('n', '?')} held-out slices of `{m.get('heldout', '?')}` (from `{metrics_path}`, "
              f"autoencoder step {m.get('step', '?')}):", "", "| metric | value |", "|---|---|",
              f"| PSNR inside the brain | {m['psnr_brain']:.2f} dB |", f"| SSIM inside the brain | {m['ssim_brain']:.4f} |",
              f"| rFID (reconstructions against the originals) | {rfid} |", "", ""]
    return "\n".join(lines)


def _masks(config: RunConfig) -> str:
    """The card's section on a mask model's image–mask pairs: the channel layout, the tissue labels and how to get
    the masks (and give one); empty for an image-only model. A reader who only sees `.images` would never know the
    masks are there."""
    if not config.mask_labels:
        return ""
    values, size, k = config.data.mask_values, config.data.image_size, config.mask_labels
    source = "the layout's seg folders" if config.data.masks == MASK_LAYOUT else f"the masks folder `{config.data.masks}`"
    c, scale, ordinal = config.mask_channels, config.diffusion.mask_scale, config.diffusion.mask_encoding == "ordinal"
    first = config.model.in_channels - c
    image = "channel 0 the slice" if first == 1 else f"channels 0..{first - 1} the slice's latent"
    what = "mean level" if ordinal else "share of each label"
    where = "" if first == 1 else (f" on the latent grid, each block holding its {what}; the pipeline resizes them "
                                   "bilinearly to the slice before reading the labels")
    if ordinal:
        layout = f"channel {first} its {k} tissue labels as evenly spaced levels from −{scale:g} to +{scale:g} in the order below{where}"
        reading = "Each pixel's label is the nearest level."
        rows = [f"| {first}, level {ordinal_level(i, k, scale):+.3g} | {v} | {name} |"
                for i, (v, name) in enumerate(zip(values, mask_names(values)))]
    else:
        layout = f"channels {first}..{first + k - 1} a one-hot map of its {k} tissue labels (−{scale:g} absent, +{scale:g} present){where}"
        reading = "Each pixel's label is the channel that comes out largest."
        rows = [f"| {first + i} | {v} | {name} |" for i, (v, name) in enumerate(zip(values, mask_names(values)))]
    if config.images_for_masks_only:
        intro = (f"The model makes images for given tissue masks: the U-Net denoises {image}, and reads the mask, given "
                 f"clean in every training step, in {layout}, taken from {source}.")
    else:
        intro = (f"The model generates image–mask pairs: the U-Net denoises a {first + c}-channel picture, {image} and "
                 f"{layout}, learnt together from {source}. {reading}")
    lines = ["## Tissue masks", intro, "", "| channel | label value | tissue |", "|---|---|---|", *rows]
    if config.images_for_masks_only:
        lines += ["", "It never learnt to draw masks, so every call needs one: `pipe(batch_size=N, mask=labels)`, `labels` "
                  f"label indices 0..{k - 1} of shape (N, {size}, {size}) (a joint model's masks, or your own).", ""]
        return "\n".join(lines) + "\n"
    held = values if 0 <= min(values) and max(values) <= 255 else range(k)  # label_image writes indices where values exceed 8 bits
    lines += ["", ("Every call of the pipeline (loaded as under *How to load it*) returns the masks beside the images, "
                   "in the label values above (as `brainfusion sample` writes its `seg_*.png`):"), "", "```python",
              "out = pipe(batch_size=16)",
              f"images, masks = out.images, out.masks   # 16 PIL images each, {size}×{size}; masks hold {', '.join(map(str, held))}",
              f'out = pipe(batch_size=16, output_type="np")   # masks: uint8 (16, {size}, {size}), the same values',
              "```", ""]
    if config.diffusion.formulation == "edm":
        lines += ["A given mask is held fixed and the images are generated to fit it: `pipe(batch_size=N, mask=labels)`, "
                  f"`labels` label indices 0..{k - 1} of shape (N, {size}, {size}).", ""]
    return "\n".join(lines) + "\n"


def _example_request(config: RunConfig) -> str:
    """The load snippet's condition: the first class of the first categorical condition, else mid-range values."""
    cc = config.condition
    if not cc.fitted:
        return ""
    categorical, continuous = cc.names()
    request = {categorical[0]: cc.classes[categorical[0]][0]} if categorical else {
        name: 0.5 if name == LEVEL_COLUMN else round(cc.stats[name][0], 3) for name in continuous}
    return f",\n              condition={request!r}, guidance_scale=2.0"


def _conditions(config: RunConfig) -> str:
    """The card's section on what the model can be asked for and how guidance works; empty for an unconditional model."""
    cc = config.condition
    if not cc.fitted:
        return ""
    categorical, continuous = cc.names()
    source = "class folders under the data path" if cc.labels == FOLDER_LABELS else f"the label table `{cc.labels}`"
    lines = ["## Conditions", f"Conditional on {len(categorical) + len(continuous)} condition(s), labels from {source}:", ""]
    lines += [f"- `{name}` (categorical): {', '.join(f'`{c}`' for c in cc.classes[name])}" for name in categorical]
    for name in continuous:
        what = "axial slice level, 0 at the lowest slice and 1 at the highest" if name == LEVEL_COLUMN else "numeric"
        mean, std = cc.stats[name]
        lines.append(f"- `{name}` ({what}; training mean {mean:.4g}, s.d. {std:.4g})")
    lines += ["", ("Pass `condition={name: value}` (any subset; names left out are not conditioned on) and `guidance_scale`: "
                   "classifier-free guidance (Ho & Salimans 2022), 1 the plain conditional model, 0 the unconditional one, above 1 "
                   f"stronger (e.g. 2). Training dropped each slice's conditions with probability {cc.label_dropout} so one "
                   "network learned both."), ""]
    return "\n".join(lines) + "\n"


def _upsampler(state) -> str:
    """The card's section on a cascade's second stage; empty for a single model."""
    if state is None:
        return ""
    c = state.config
    noised = f"noised to level {c.upsample.augment:g} and " if c.upsample.augment_max else ""
    levels = (f"with noise levels up to {c.upsample.augment_max:g} on that input, told to the network" if c.upsample.augment_max
              else "with that input clean (no noise conditioning augmentation)")
    return f"""## Second stage: the upsampler
`upsampler_unet/` brings each {c.upsample.from_size}² slice of the first stage to {c.data.image_size}² (a cascade: Ho et al.
2022; SR3's concatenation, Saharia et al. 2021): the slice, {noised}enlarged bicubically, is
an input channel of a U-Net (base width {c.model.base_channels}, patch size {c.model.patch_size}) that adds the detail.
Trained on `{c.data.path}` {levels}.
{_training(run_folder(state.path), state.step)}

"""


def _autoguidance(guide_step: int | None, cascade: bool = False) -> str:
    if guide_step is None:
        return ""
    stage = " of the first stage (the upsampler is not guided)" if cascade else ""
    return f"""## Autoguidance
`guide_unet/` holds this run's own weights at step {guide_step} (`train.guide_at`). `pipe(..., autoguidance=2.0)` steers each
step{stage} away from that weaker network (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"):
no more training, twice the network passes; 1.0 (the default) samples the network alone.

"""


def model_card(config: RunConfig, step: int, run_dir: Path, folder: str, metrics_path: Path | None = None,
               guide_step: int | None = None, upsampler=None) -> str:
    """The export's README.md; `upsampler` (a checkpoint state) makes it the card of a cascade with that second stage."""
    m, d, data, latent = config.model, config.diffusion, config.data, config.latent
    tags = ["- brainfusion", "- diffusion", "- mri", "- brain", "- medical-imaging", "- synthetic-data"]
    tags += ["- class-conditional"] if config.condition.fitted else []
    tags += ["- latent-diffusion"] if latent.active else []
    tags += ["- segmentation-masks"] if config.mask_labels else []
    tags += ["- cascade", "- super-resolution"] if upsampler is not None else []
    size, kind = data.image_size, "latent diffusion model" if latent.active else "denoising diffusion model"
    if upsampler is not None:
        size, kind = upsampler.config.data.image_size, f"cascade of a {data.image_size}² {kind} and a diffusion upsampler"
    needs = " (only MONAI, `pip install monai`, for the autoencoder)" if latent.active else ""
    yaml = "\n".join(["---", "license: mit", "library_name: diffusers", "pipeline_tag: unconditional-image-generation",
                      "tags:", *tags, "---", ""])
    pairs = " with tissue masks" if config.mask_labels else ""
    return yaml + f"""# brainfusion model: synthetic {size}×{size} axial T1 brain MRI slices{pairs}

A {kind} ({d.formulation.upper()} formulation) trained with brainfusion on `{data.path}`.

## Data and preprocessing
Slices read from `{data.path}` (split `{data.split}`), resized to {size}×{size}, scaled to [−1, 1],
{"flipped left-right at random" if data.hflip else "not flipped"} during training. See the data source's own licence and
consent terms before sharing anything generated from it.

## Training
U-Net of {len(m.channel_mults)} levels (base width {m.base_channels}, multipliers {list(m.channel_mults)}, patch size {m.patch_size}),
batch {config.train.batch_size}, learning rate {config.train.lr}, EMA {config.train.ema_decay}, precision `{config.train.precision}`.
{_training(run_dir, step)}

{_upsampler(upsampler)}{_autoencoder(config)}{_masks(config)}{_conditions(config)}{_autoguidance(guide_step, upsampler is not None)}## Evaluation
{_evaluation(metrics_path)}{_conditional_evaluation(metrics_path)}

## Intended use and limitations
- Synthetic research data: method development, teaching, data augmentation experiments.
- **Not for diagnosis or any clinical decision.** Generated slices are not scans of any person.
- It reproduces its training distribution, biases included: scanner, population and preprocessing of `{data.path}`.
- Quality numbers above hold for the reference set named there, not for other scanners or populations.

## How to load it
{LOAD.format(folder=folder, size=size, request=_example_request(config), needs=needs, steps=FAST_STEPS)}
"""
