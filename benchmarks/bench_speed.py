#!/usr/bin/env python
"""Speed benchmark: brainfusion's U-Net against a FLOP-matched diffusers UNet2DModel.

    python benchmarks/bench_speed.py [--quick] [--checkpoint RUN_DIR] [--real-data PATH] [--out results.json]

Sections (all printed as markdown tables, everything also written to --out as JSON):

  A  roofline: achieved FLOP/s of one 3x3 Conv2d forward+backward (128->128 channels, 32x32,
     channels_last) in fp32 and bf16 autocast (and on CUDA if present) -- the reference that the
     training rows are compared against, measured in the same run on the same machine state.
  B  training throughput on the CPU: brainfusion's default model (ModelConfig() defaults, read at
     run time) and a diffusers UNet2DModel searched so its training FLOPs per image are within
     +-10 % of brainfusion's (both counted with FlopCounterMode by brainfusion's own
     `training_flops_per_image`). By default the diffusers U-Net gets the same pixel-unshuffle in
     front as brainfusion's patch_size (--diffusers-patch-size 1: a plain full-resolution one).
     Full step = forward, smooth-L1 noise loss, backward, Adam step.
     Every measurement runs in a fresh subprocess (peak resident memory from getrusage).
  C  sampling speed and quality from --checkpoint: DDPM-1000, DDIM-50, DPM-Solver++ 10/20/25, SDE-DPM-Solver++ 20/25;
     quality via brainfusion.evaluation.evaluate.quick_metrics against --real-data (skipped if missing).
  D  CUDA only: the training table at 64x64 and 256x256 with bf16, channels_last, torch.compile
     and fused Adam.
  E  256² (issue 18): seconds to sample 64 slices (SDE-DPM-Solver++ 25, one batch, in a fresh subprocess
     each, with its peak memory) through --latent-run (latents + one decoder pass) and --pixel-run (the
     4×4 patch stem at 256²), against 64 slices at 64² from --checkpoint; training img/s of each run (and
     of the latent run's autoencoder) as its train_log.csv recorded them.
  F  volumes: from --volume-run (train --volumes), seconds to sample one volume and 4 volumes in one batch,
     each in a fresh subprocess with its peak memory, and training volumes/s of a copy of the run trained
     afresh for a few steps in its own process, beside the run's own logged rate.

bf16 on a CPU without native bf16 (no AVX-512 BF16 / AMX) is emulated and very slow; those rows
are still measured -- it is the honest finding -- but with very few iterations (see the settings
printed with each table). --quick shrinks every section so the whole run takes a few minutes; its
numbers are for checking that the script works, not for reporting.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# settings


@dataclasses.dataclass
class Settings:
    roof_batch_cpu: int = 32
    roof_batch_cuda: int = 256  # a 32-image conv is too small to load a large GPU; the shape is printed
    roof_warmup: int = 3
    roof_iters: int = 10
    slow_bf16_warmup: int = 1  # CPU bf16 without native support: very few iterations
    slow_bf16_iters: int = 2
    slow_bf16_batch: int = 0  # 0: the normal batch; --quick shrinks it so emulated bf16 stays quick
    train_batch: int = 32
    train_size: int = 64
    train_warmup: int = 3
    train_iters: int = 10
    train_budget_s: float = 120.0  # stop timing a configuration after this long (at least min_iters)
    min_iters: int = 2
    search_per_tier: int = 8
    search_refine_rounds: int = 2  # then nudge single widths by +-norm_groups towards a ratio of 1
    n_images: int = 64
    sample_plan: tuple = (("ddpm", 1000), ("ddim", 50), ("dpm++", 10), ("dpm++", 20), ("dpm++", 25), ("dpm++sde", 20), ("dpm++sde", 25))
    cuda_sizes: tuple = (64, 256)
    cuda_batch: int = 32
    cuda_warmup: int = 5  # the first iterations include torch.compile
    cuda_iters: int = 30
    worker_timeout_s: float = 1800.0


QUICK = dict(  # a smoke test: every code path, minimal work (about 3 minutes on a busy 2-core CPU)
    roof_batch_cpu=4, roof_batch_cuda=64, roof_warmup=1, roof_iters=3, slow_bf16_iters=1, slow_bf16_batch=1,
    train_batch=2, train_warmup=1, train_iters=1, slow_bf16_warmup=0, train_budget_s=15.0, min_iters=1,
    search_per_tier=4, search_refine_rounds=0,
    n_images=2, sample_plan=(("ddpm", 10), ("ddim", 5), ("dpm++", 3), ("dpm++", 4), ("dpm++", 5), ("dpm++sde", 5)),
    cuda_sizes=(64,), cuda_batch=8, cuda_warmup=3, cuda_iters=5, worker_timeout_s=600.0,
)

FLOP_TOLERANCE = 0.10  # diffusers' training FLOPs per image must be within +-10 % of brainfusion's


# --------------------------------------------------------------------------------------------------
# small helpers


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            if v == 0 or math.isnan(v):
                return f"{v:g}"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def timed_loop(step, warmup: int, iters: int, budget_s: float, min_iters: int, sync=lambda: None) -> list[float]:
    """Per-iteration seconds of `step` after `warmup` untimed calls; stops early once over budget."""
    t0 = time.perf_counter()
    for i in range(warmup):
        step()
        sync()
        if time.perf_counter() - t0 > budget_s / 2:
            break  # the first warm-up always runs
    times: list[float] = []
    t1 = time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
        if len(times) >= min_iters and time.perf_counter() - t1 > budget_s:
            break
    return times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    from brainfusion.runtime import cpu_has_fast_bf16

    return bool(cpu_has_fast_bf16())


def sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# --------------------------------------------------------------------------------------------------
# models: brainfusion's default U-Net and the diffusers UNet2DModel baseline


class DiffusersNet(torch.nn.Module):
    """UNet2DModel with brainfusion's (x_t, t) -> tensor calling convention and, like brainfusion's
    patch_size, an optional pixel-unshuffle in front (pixel-shuffle behind)."""

    def __init__(self, unet, patch_size: int = 1):
        super().__init__()
        self.unet = unet
        self.patch_size = patch_size

    def forward(self, x, t):
        p = self.patch_size
        out = self.unet(F.pixel_unshuffle(x, p) if p > 1 else x, t).sample
        return F.pixel_shuffle(out, p) if p > 1 else out


def brainfusion_config(image_size: int):
    from brainfusion.config import ModelConfig

    return dataclasses.replace(ModelConfig(), image_size=image_size)  # every other field: the defaults


def attention_levels(mc, image_size: int, rule: str, patch: int, n_levels: int) -> list[int]:
    """diffusers levels that get attention. 'mirror': those whose token grid ((image_size / patch) >> level)
    is one of brainfusion's attention_resolutions, i.e. attention over as many tokens as brainfusion's."""
    if rule == "none":
        return []
    return [i for i in range(n_levels) if ((image_size // patch) >> i) in mc.attention_resolutions]


def diffusers_kwargs(widths, layers: int, rule: str, mid_attention: bool, mc, image_size: int, patch: int) -> dict:
    n = len(widths)
    levels = attention_levels(mc, image_size, rule, patch, n)
    down = tuple("AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(n)))
    return dict(
        sample_size=image_size // patch, in_channels=mc.in_channels * patch**2, out_channels=mc.in_channels * patch**2,
        block_out_channels=tuple(int(w) for w in widths), layers_per_block=layers,
        down_block_types=down, up_block_types=up, add_attention=mid_attention,
        norm_num_groups=mc.norm_groups, attention_head_dim=int(widths[-1]) // mc.attention_heads, dropout=mc.dropout,
    )


def brainfusion_spec(mc) -> dict:
    return {"model": "brainfusion", "model_config": dataclasses.asdict(mc), "patch_size": mc.patch_size, "in_channels": mc.in_channels}


def diffusers_spec(kwargs: dict, patch: int, mc) -> dict:
    return {"model": "diffusers", "model_config": kwargs, "patch_size": patch, "in_channels": mc.in_channels}


def build_model(spec: dict) -> torch.nn.Module:
    if spec["model"] == "brainfusion":
        from brainfusion.config import ModelConfig
        from brainfusion.models.unet import UNet

        cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["model_config"].items()})
        return UNet(cfg)
    from diffusers import UNet2DModel

    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["model_config"].items()}
    return DiffusersNet(UNet2DModel(**kwargs), spec.get("patch_size", 1))


def count_flops(spec: dict, image_size: int) -> float:
    """Training FLOPs per image by brainfusion's own `training_flops_per_image`, on meta tensors (no compute)."""
    from brainfusion.models.unet import training_flops_per_image

    with torch.device("meta"):
        model = build_model(spec)
        return float(training_flops_per_image(model, image_size, spec["in_channels"]))


def count_params(spec: dict) -> int:
    from brainfusion.models.unet import count_parameters

    with torch.device("meta"):
        return int(count_parameters(build_model(spec)))


def match_diffusers(mc, target: float, per_tier: int, refine_rounds: int, patch: int) -> tuple[dict, list[dict]]:
    """Search block_out_channels x layers_per_block x attention placement for a UNet2DModel whose
    training FLOPs per image are within FLOP_TOLERANCE of `target`.

    Tiers are tried in order of structural closeness to brainfusion (same blocks per level and
    attention where brainfusion has it; then without level attention; then one more block per
    level); within a tier all widths are scaled by a common factor and rounded to multiples of
    norm_groups, and the scalings predicted closest to the target are counted exactly. The first
    tier's closest candidate then gets up to `refine_rounds` rounds (at least one if it is still
    outside the tolerance) of moving one width at a time by +-norm_groups where that brings the
    ratio closer to 1; the first tier within tolerance wins.
    """
    size = mc.image_size
    base = [mc.base_channels * m for m in mc.channel_mults]
    g = mc.norm_groups
    mid = bool(mc.attention_resolutions)
    tiers = [(mc.blocks_per_level, "mirror"), (mc.blocks_per_level, "none"), (mc.blocks_per_level + 1, "mirror")]
    log: list[dict] = []
    seen: set = set()

    def evaluate(widths, layers, rule):
        key = (tuple(widths), layers, rule)
        if key in seen:
            return None
        seen.add(key)
        kwargs = diffusers_kwargs(widths, layers, rule, mid, mc, size, patch)
        flops = count_flops(diffusers_spec(kwargs, patch, mc), size)
        entry = dict(block_out_channels=list(widths), layers_per_block=layers, attention=rule, patch_size=patch,
                     attention_levels=attention_levels(mc, size, rule, patch, len(widths)), mid_attention=mid,
                     gflops=flops / 1e9, ratio=flops / target, kwargs=kwargs)
        log.append(entry)
        return entry

    for layers, rule in tiers:
        if rule == "none" and not attention_levels(mc, size, "mirror", patch, len(base)):
            continue  # identical to the mirror tier
        first = evaluate(base, layers, rule)
        if first is None:
            continue
        s_target = 1 / math.sqrt(first["ratio"])  # FLOPs grow roughly with the square of the widths
        candidates = {}
        for k in range(121):
            scale = s_target * (0.6 + 0.01 * k)
            widths = tuple(max(g, int(round(w * scale / g)) * g) for w in base)
            if widths[-1] % mc.attention_heads or tuple(base) == widths:
                continue
            est = first["ratio"] * scale * scale
            if widths not in candidates or abs(math.log(est)) < abs(math.log(candidates[widths])):
                candidates[widths] = est
        ordered = sorted(candidates, key=lambda w: abs(math.log(candidates[w])))[:per_tier]
        tier_entries = [first] + [e for e in (evaluate(w, layers, rule) for w in ordered) if e is not None]
        best = min(tier_entries, key=lambda e: abs(e["ratio"] - 1))
        rounds = refine_rounds if abs(best["ratio"] - 1) <= FLOP_TOLERANCE else max(refine_rounds, 1)
        for _ in range(rounds):
            improved = False
            for i in range(len(base)):
                for step in (-g, g):
                    widths = list(best["block_out_channels"])
                    widths[i] += step
                    if widths[i] < g or widths[-1] % mc.attention_heads:
                        continue
                    e = evaluate(widths, layers, rule)
                    if e is not None and abs(e["ratio"] - 1) < abs(best["ratio"] - 1):
                        best, improved = e, True
            if not improved or abs(best["ratio"] - 1) < 0.01:
                break
        if abs(best["ratio"] - 1) <= FLOP_TOLERANCE:
            return best, log
    best = min(log, key=lambda e: abs(e["ratio"] - 1))
    return best, log


# --------------------------------------------------------------------------------------------------
# A: roofline


def roofline(device: torch.device, dtype: torch.dtype | None, batch: int, warmup: int, iters: int, budget_s: float,
             min_iters: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 128, 32, 32, device=device).to(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(batch, 128, 32, 32, device=device).to(memory_format=torch.channels_last)
    grads = {}

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            y = conv(x)
        if y.dtype not in grads:
            grads[y.dtype] = grad.to(y.dtype)
        y.backward(grads[y.dtype])
        conv.weight.grad = conv.bias.grad = x.grad = None

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    times = timed_loop(step, warmup, iters, budget_s, min_iters, sync_for(device))
    median = statistics.median(times)
    return dict(device=device.type, precision="bf16" if dtype else "fp32", shape=f"{batch}x128x32x32, 3x3, 128->128, channels_last",
                gflop_per_iter=flops / 1e9, iters=len(times), median_s=median, tflops=flops / median / 1e12)


# --------------------------------------------------------------------------------------------------
# the training-step worker (run in a fresh subprocess per measurement)


def worker_train(spec: dict) -> dict:
    import diffusers  # noqa: F401  -- both workers import the same modules so their baselines match

    from brainfusion.config import DiffusionConfig, TrainConfig
    from brainfusion.diffusion.process import NoiseSchedule

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else None
    memory_format = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    rss_before = rss_bytes()
    torch.manual_seed(0)
    model = build_model(spec).to(device, memory_format=memory_format).train()
    if spec["fused"]:
        optimizer = torch.optim.Adam(model.parameters(), lr=TrainConfig().lr, fused=True)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=TrainConfig().lr)
    forward = torch.compile(model) if spec["compile"] else model
    dcfg = DiffusionConfig()
    schedule = NoiseSchedule(dcfg)
    b, s, c = spec["batch"], spec["image_size"], spec["in_channels"]
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(b, c, s, s, generator=gen) * 2 - 1).to(device, memory_format=memory_format)
    noise = torch.randn(b, c, s, s, generator=gen).to(device, memory_format=memory_format)
    t = torch.randint(0, dcfg.timesteps, (b,), generator=gen).to(device)
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = schedule.loss(forward, x0, t, noise)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed_loop(step, spec["warmup"], spec["iters"], spec["budget_s"], spec["min_iters"], sync_for(device))
    median = statistics.median(times)
    result = dict(
        iters=len(times), median_s=median, min_s=min(times), max_s=max(times), images_per_s=b / median,
        peak_rss_mib=peak_rss_bytes() / 2**20, rss_before_model_mib=rss_before / 2**20,
        loss_finite=bool(all(torch.isfinite(v).item() for v in losses)), threads=torch.get_num_threads(),
    )
    result["train_mem_mib"] = result["peak_rss_mib"] - result["rss_before_model_mib"]
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def worker_sample(spec: dict) -> dict:
    """Sample spec["n"] images from a checkpoint in one batch; seconds (after loading) and peak memory."""
    from brainfusion.diffusion.pipeline import Pipeline

    torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    rss_before = rss_bytes()
    pipe = Pipeline.from_checkpoint(spec["checkpoint"])
    if spec.get("upsampler"):  # a cascade: the base's slices brought up through the upsampler
        pipe.use_upsampler(Pipeline.from_checkpoint(spec["upsampler"]))
    t0 = time.perf_counter()
    images = pipe(spec["n"], seed=0, sampler="dpm++sde", steps=25, batch_size=spec["n"])
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, size=int(images.shape[-1]), n=len(images), peak_rss_mib=peak_rss_bytes() / 2**20,
                rss_before_mib=rss_before / 2**20, threads=torch.get_num_threads())


def worker_train_run(spec: dict) -> dict:
    """Train a copy of a run's config for spec["steps"] steps from scratch in this process: img/s and peak memory."""
    import tempfile

    from brainfusion.checkpoint import load_checkpoint, resolve_checkpoint
    from brainfusion.training.train import train

    torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    config = load_checkpoint(resolve_checkpoint(Path(spec["run"]) / "checkpoints"), with_optimizer=False).config
    with tempfile.TemporaryDirectory() as out:
        config.train.out_dir, config.train.max_steps, config.train.time_budget_min = out, spec["steps"], 0
        config.train.sample_every, config.train.checkpoint_every, config.train.log_every = 0, spec["steps"], 5
        result = train(config, progress=False)
    return dict(images_per_s=result.images_per_s, batch=config.train.batch_size, steps=spec["steps"],
                peak_rss_mib=peak_rss_bytes() / 2**20, threads=torch.get_num_threads())


def run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            result["wall_s"] = time.perf_counter() - t0
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited {proc.returncode}: " + " / ".join(tail)}


def train_spec(model_spec: dict, precision: str, channels_last: bool, device: str, batch: int, size: int,
               warmup: int, iters: int, budget_s: float, min_iters: int, threads: int, compile_: bool = False,
               fused: bool = False) -> dict:
    return dict(kind="train", **model_spec, precision=precision, channels_last=channels_last,
                device=device, batch=batch, image_size=size, warmup=warmup, iters=iters, budget_s=budget_s,
                min_iters=min_iters, threads=threads, compile=compile_, fused=fused)


# --------------------------------------------------------------------------------------------------
# sections


def section_header(args, st: Settings) -> dict:
    import diffusers

    flags = cpu_flags()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    info = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        host=platform.node(), cpu=cpu_model(), logical_cores=os.cpu_count(), physical_cores=physical,
        torch_threads=args.threads or torch.get_num_threads(), torch=torch.__version__, diffusers=diffusers.__version__,
        python=platform.python_version(), native_bf16=native_bf16(),
        cpu_bf16_flags=sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"}),
        load_average_start=list(os.getloadavg()), cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        quick=args.quick, settings=dataclasses.asdict(st),
    )
    print("# brainfusion speed benchmark" + (" (--quick: smoke-test sizes, numbers not for reporting)" if args.quick else ""))
    print()
    rows = [
        ["date", info["date"]], ["CPU", info["cpu"]],
        ["cores", f"{info['logical_cores']} logical, {physical or '?'} physical, torch threads {info['torch_threads']}"],
        ["native CPU bf16 (AVX-512 BF16 / AMX)", "yes" if info["native_bf16"] else "no (bf16 is emulated: slow, few iterations)"],
        ["CPU flags", ", ".join(info["cpu_bf16_flags"]) or "–"],
        ["torch / diffusers / python", f"{info['torch']} / {info['diffusers']} / {info['python']}"],
        ["CUDA", info["cuda"] or "none"],
        ["load average at start (1/5/15 min)", " / ".join(f"{v:.2f}" for v in info["load_average_start"])],
    ]
    print(md_table(["", ""], rows))
    print()
    return info


def section_roofline(st: Settings, fast_bf16: bool) -> list[dict]:
    print("## A. Roofline: one 3x3 Conv2d forward+backward\n")
    rows = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        batch = st.roof_batch_cuda if device.type == "cuda" else st.roof_batch_cpu
        for dtype in (None, torch.bfloat16):
            slow = device.type == "cpu" and dtype is not None and not fast_bf16
            warmup, iters = (st.slow_bf16_warmup, st.slow_bf16_iters) if slow else (st.roof_warmup, st.roof_iters)
            r = roofline(device, dtype, batch, warmup, iters, budget_s=60.0, min_iters=1)
            r["emulated_bf16"] = slow
            rows.append(r)
    if torch.cuda.is_available():
        print(f"(CUDA fp32 runs with cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, the PyTorch default.)\n")
    print(md_table(
        ["device", "precision", "shape", "GFLOP/iter", "timed iters", "median s", "TFLOP/s"],
        [[r["device"], r["precision"] + (" (emulated)" if r["emulated_bf16"] else ""), r["shape"], r["gflop_per_iter"],
          r["iters"], r["median_s"], r["tflops"]] for r in rows]))
    print()
    return rows


def roof_for(roof: list[dict], device: str, precision: str) -> float | None:
    for r in roof:
        if r["device"] == device and r["precision"] == precision:
            return r["tflops"] * 1e12
    return None


def section_models(st: Settings, diffusers_patch: int | None) -> dict:
    print("## FLOP-matched diffusers baseline\n")
    mc = brainfusion_config(st.train_size)
    patch = mc.patch_size if diffusers_patch is None else diffusers_patch
    bf_spec = brainfusion_spec(mc)
    target = count_flops(bf_spec, mc.image_size)
    best, log = match_diffusers(mc, target, st.search_per_tier, st.search_refine_rounds, patch)
    df_spec = diffusers_spec(best["kwargs"], patch, mc)
    print(f"brainfusion ModelConfig() defaults: base_channels={mc.base_channels}, channel_mults={mc.channel_mults}, "
          f"blocks_per_level={mc.blocks_per_level}, attention_resolutions={mc.attention_resolutions}, "
          f"norm={mc.norm}, patch_size={mc.patch_size}\n")
    print(f"diffusers UNet2DModel patch size: {patch} "
          + ("(the same pixel-unshuffle in front as brainfusion, so both U-Nets see the same token grid; "
             "--diffusers-patch-size 1 gives a plain full-resolution UNet2DModel)" if patch == mc.patch_size and patch > 1
             else "(plain UNet2DModel at full resolution)" if patch == 1 else "") + "\n")
    print("Search log (training FLOPs per image, forward+backward, FlopCounterMode via brainfusion.models.unet.training_flops_per_image):\n")
    if st.search_refine_rounds == 0:
        print("(--quick: coarser search, no refinement; the full run usually lands closer to a ratio of 1.)\n")
    print(md_table(["block_out_channels", "layers_per_block", "attention levels", "mid attention", "GFLOP/img", "ratio to brainfusion"],
                   [[str(tuple(e["block_out_channels"])), e["layers_per_block"], str(e["attention_levels"]),
                     e["mid_attention"], e["gflops"], f"{e['ratio']:.3f}"] for e in log]))
    print()
    within = abs(best["ratio"] - 1) <= FLOP_TOLERANCE
    chosen = {k: v for k, v in best["kwargs"].items()}
    print(md_table(["model", "parameters (M)", "GFLOP per training image", "ratio diffusers/brainfusion"], [
        ["brainfusion UNet (defaults)", count_params(bf_spec) / 1e6, target / 1e9, None],
        [f"diffusers UNet2DModel (matched, patch {patch})", count_params(df_spec) / 1e6, best["gflops"], f"{best['ratio']:.3f}" + ("" if within else " (OUTSIDE +-10 %)")],
    ]))
    print(f"\nmatched UNet2DModel config: {json.dumps(chosen)}\n")
    return dict(brainfusion=dict(spec=bf_spec, model_config=bf_spec["model_config"], gflops=target / 1e9, params=count_params(bf_spec)),
                diffusers=dict(spec=df_spec, model_config=chosen, gflops=best["gflops"], ratio=best["ratio"], within_tolerance=within,
                               params=count_params(df_spec), layers_per_block=best["layers_per_block"],
                               attention=best["attention"]),
                search_log=[{k: v for k, v in e.items() if k != "kwargs"} for e in log])


def diffusers_spec_at(models: dict, image_size: int) -> dict:
    """The matched diffusers model re-derived for another image size (attention placed by the same rule)."""
    mc = brainfusion_config(image_size)
    d = models["diffusers"]
    cfg = d["model_config"]
    kwargs = diffusers_kwargs(cfg["block_out_channels"], cfg["layers_per_block"], d["attention"], cfg["add_attention"],
                              mc, image_size, d["spec"]["patch_size"])
    return diffusers_spec(kwargs, d["spec"]["patch_size"], mc)


def training_rows(specs: list[tuple[str, dict]], flops: dict, roof: list[dict], timeout: float) -> list[dict]:
    rows = []
    for label, spec in specs:
        print(f"  measuring {label} ...", file=sys.stderr, flush=True)
        r = run_worker(spec, timeout)
        r.update(label=label, model=spec["model"], precision=spec["precision"], channels_last=spec["channels_last"],
                 device=spec["device"], batch=spec["batch"], image_size=spec["image_size"], compile=spec["compile"], fused=spec["fused"])
        if "images_per_s" in r:
            achieved = flops[(spec["model"], spec["image_size"])] * r["images_per_s"]
            r["achieved_tflops"] = achieved / 1e12
            ref = roof_for(roof, spec["device"], spec["precision"])
            r["roofline_pct"] = 100 * achieved / ref if ref else None
        rows.append(r)
    return rows


def print_training_table(rows: list[dict], cuda: bool) -> list[dict]:
    """Prints one line per model x precision (diffusers: its best memory format); returns the summary."""
    summary = []
    keys = []
    for r in rows:
        key = (r["image_size"], r["precision"])
        if key not in keys:
            keys.append(key)
    table = []
    for size, precision in keys:
        group = [r for r in rows if r["image_size"] == size and r["precision"] == precision]
        best = {}
        for model in ("brainfusion", "diffusers"):
            ok = [r for r in group if r["model"] == model and "images_per_s" in r]
            failed = [r for r in group if r["model"] == model and "error" in r]
            best[model] = max(ok, key=lambda r: r["images_per_s"]) if ok else (failed[0] if failed else None)
        bf, df = best["brainfusion"], best["diffusers"]
        ratio = bf["images_per_s"] / df["images_per_s"] if bf and df and "images_per_s" in bf and "images_per_s" in df else None
        for model, r in (("brainfusion", bf), ("diffusers", df)):
            if r is None:
                continue
            if "error" in r:
                table.append([model, size, precision, r["batch"], "–", None, None, None, None, None, None, None, r["error"][:80]])
                continue
            others = [o for o in group if o["model"] == model and o is not r and "images_per_s" in o]
            note = "; ".join(f"{'channels_last' if o['channels_last'] else 'contiguous'}: {o['images_per_s']:.3g} img/s" for o in others)
            mem = r.get("cuda_peak_mib") if cuda else r["peak_rss_mib"]
            table.append([model, size, precision, r["batch"], "channels_last" if r["channels_last"] else "contiguous", r["iters"],
                          r["images_per_s"], f"{ratio:.2f}" if (ratio and model == "brainfusion") else None, mem,
                          None if cuda else r["train_mem_mib"], r["achieved_tflops"], r["roofline_pct"], note])
            summary.append(dict(model=model, image_size=size, precision=precision, batch=r["batch"], images_per_s=r["images_per_s"],
                                ratio_brainfusion_over_diffusers=ratio, channels_last=r["channels_last"],
                                peak_mib=mem, achieved_tflops=r["achieved_tflops"], roofline_pct=r["roofline_pct"]))
    mem_head = "peak GPU MiB" if cuda else "peak RSS MiB"
    print(md_table(["model", "size", "precision", "batch", "memory format", "timed iters", "img/s", "brainfusion/diffusers", mem_head,
                    "model+training MiB", "achieved TFLOP/s", "% of roofline", "note"], table))
    print()
    return summary


def section_training(st: Settings, models: dict, roof: list[dict], fast_bf16: bool, threads: int) -> dict:
    from brainfusion.runtime import choose_channels_last

    print(f"## B. Training throughput on the CPU ({st.train_size}x{st.train_size})\n")
    print("Full step = forward, smooth-L1 noise loss, backward, Adam step; synthetic batch; flush-denormal on for both; "
          "each row a fresh subprocess; img/s from the median step after warm-up. brainfusion uses the memory format "
          "its trainer picks (choose_channels_last('auto')); diffusers is tried both ways and its best is shown.\n")
    flops = {("brainfusion", st.train_size): models["brainfusion"]["gflops"] * 1e9,
             ("diffusers", st.train_size): models["diffusers"]["gflops"] * 1e9}
    specs = []
    cpu = torch.device("cpu")
    for precision in ("fp32", "bf16"):
        slow = precision == "bf16" and not fast_bf16
        warmup, iters = (st.slow_bf16_warmup, st.slow_bf16_iters) if slow else (st.train_warmup, st.train_iters)
        batch = (st.slow_bf16_batch or st.train_batch) if slow else st.train_batch
        common = dict(device="cpu", batch=batch, size=st.train_size, warmup=warmup, iters=iters,
                      budget_s=st.train_budget_s, min_iters=min(st.min_iters, iters), threads=threads)
        bf_cl = choose_channels_last("auto", cpu, torch.bfloat16 if precision == "bf16" else None)
        specs.append((f"brainfusion {precision}", train_spec(models["brainfusion"]["spec"], precision, bf_cl, **common)))
        for cl in (True, False):
            specs.append((f"diffusers {precision} {'channels_last' if cl else 'contiguous'}",
                          train_spec(models["diffusers"]["spec"], precision, cl, **common)))
    rows = training_rows(specs, flops, roof, st.worker_timeout_s)
    if not fast_bf16:
        print(f"bf16 rows: this CPU has no native bf16, so they ran {st.slow_bf16_warmup} warm-up + at most "
              f"{st.slow_bf16_iters} timed step(s) at batch {st.slow_bf16_batch or st.train_batch}.\n")
    summary = print_training_table(rows, cuda=False)
    return dict(rows=rows, summary=summary)


def _sampling_metric(args, size: int) -> tuple:
    """Section C's quality metric: (quick_metrics or None, the real slices it compares against, a note saying which)."""
    import numpy as np

    quick_metrics, real, metric_note = None, None, ""
    try:
        from brainfusion.evaluation.evaluate import quick_metrics
    except (ImportError, AttributeError) as exc:
        metric_note = f"quality metric skipped: brainfusion.evaluation.evaluate.quick_metrics unavailable ({exc})"
    if quick_metrics is not None and not args.real_data:
        quick_metrics, metric_note = None, "quality metric skipped: no --real-data given"
    if quick_metrics is not None:
        from brainfusion.config import DataConfig
        from brainfusion.data.slices import load_slices

        try:
            slices = load_slices(DataConfig(path=args.real_data, image_size=size, split=args.real_split), progress=False)
        except Exception as exc:  # noqa: BLE001 - a bad --real-data must not lose the timings
            quick_metrics, metric_note = None, f"quality metric skipped: could not load --real-data ({exc})"
        else:
            rng = np.random.default_rng(0)
            real = slices.images[rng.choice(len(slices), size=min(512, len(slices)), replace=False)]
            metric_note = f"quality: quick_metrics against {len(real)} real slices from {args.real_data} (split {args.real_split})"
    return quick_metrics, real, metric_note


def _print_sampling_table(st: Settings, rows: list[dict], metric_note: str) -> None:
    """Section C's table; adds each row's FD ratio to the first sampler's."""
    ref_fd = rows[0].get("metrics", {}).get("FD_domain")
    for row in rows:
        fd = row.get("metrics", {}).get("FD_domain")
        row["fd_ratio_to_ddpm"] = fd / ref_fd if fd is not None and ref_fd else None
    headers = ["sampler", "steps", "total s", "s/image", "ms per step per image"]
    have_metrics = any("metrics" in r for r in rows)
    if have_metrics:
        headers += ["FD_domain", "KID_domain", f"FD / FD({st.sample_plan[0][0].upper()}-{st.sample_plan[0][1]})"]
    table = []
    for r in rows:
        line = [r["sampler"], r["steps"], r["total_s"], r["s_per_image"], r["ms_per_step_per_image"]]
        if have_metrics:
            m = r.get("metrics", {})
            line += [m.get("FD_domain"), m.get("KID_domain"), r["fd_ratio_to_ddpm"]]
        table.append(line)
    print(md_table(headers, table))
    errors = [f"{r['sampler']}-{r['steps']}: {r['metrics_error']}" for r in rows if "metrics_error" in r]
    print()
    if metric_note:
        print(metric_note + ("" if not errors else "; errors: " + "; ".join(errors)))
        print()


def section_sampling(st: Settings, args) -> dict:
    import numpy as np

    from brainfusion.data.channels import to_uint8
    from brainfusion.diffusion.pipeline import load_model
    from brainfusion.diffusion.process import sample
    from brainfusion.runtime import choose_precision, network_fn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as `brainfusion sample` picks it
    model, state = load_model(Path(args.checkpoint), use_ema=True, device=device)
    dtype = choose_precision("auto", device)
    if dtype is not None or device.type == "cuda":  # as sample.generate does
        model.to(memory_format=torch.channels_last)
    size = state.config.model.image_size
    n = st.n_images
    print(f"## C. Sampling ({n} images at {size}x{size}, one batch, {device.type}, "
          f"{'bf16' if dtype else 'fp32'}; checkpoint {state.path}, step {state.step})\n")
    fn = network_fn(model, device, dtype)

    quick_metrics, real, metric_note = _sampling_metric(args, size)

    rows = []
    for sampler, steps in st.sample_plan:
        print(f"  sampling {sampler}-{steps} ...", file=sys.stderr, flush=True)
        done = [0]

        def progress(k, steps=steps, done=done):
            done[0] += k
            if steps >= 100 and done[0] % (steps // 10) == 0:
                print(f"    {done[0]}/{steps} steps", file=sys.stderr, flush=True)

        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        images, _ = sample(fn, state.config.diffusion, (n, state.config.model.in_channels, size, size), sampler, steps, gen,
                           progress=progress)
        seconds = time.perf_counter() - t0
        row = dict(sampler=sampler, steps=steps, n_images=n, total_s=seconds, s_per_image=seconds / n,
                   ms_per_step_per_image=1000 * seconds / n / steps)
        if quick_metrics is not None:
            try:
                metrics = quick_metrics(to_uint8(images), real)
                row["metrics"] = {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in metrics.items()}
            except Exception as exc:  # noqa: BLE001 - a metric failure must not lose the timings
                row["metrics_error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    _print_sampling_table(st, rows, metric_note)
    return dict(checkpoint=str(state.path), step=state.step, image_size=size, device=device.type, precision="bf16" if dtype else "fp32",
                metric_note=metric_note, rows=rows)


def _logged_rate(run: Path) -> float | None:
    """Median img/s a run's train_log.csv recorded (None without a log)."""
    import csv

    log = Path(run) / "train_log.csv"
    if not log.is_file():
        return None
    with open(log) as fh:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(fh) if r.get("images_per_s")]
    return statistics.median(rates) if rates else None


def section_256(args, threads: int) -> dict:
    """E: sampling 64 slices at 256² through each route against 64 at 64², and each run's training img/s."""
    from brainfusion.checkpoint import resolve_checkpoint, run_folder
    from brainfusion.diffusion.pipeline import load_model

    routes = [("64² default (reference)", args.checkpoint), ("256² latent", args.latent_run), ("256² pixel, patch 4", args.pixel_run),
              ("256² cascade (64² + upsampler)", args.upsampler_run and args.checkpoint)]
    rows, out = [], {}
    for name, path in routes:
        if not path:
            continue
        checkpoint = resolve_checkpoint(Path(path) / "checkpoints" if (Path(path) / "checkpoints").is_dir() else Path(path))
        _, state = load_model(checkpoint)
        cascade = name.startswith("256² cascade")
        r = run_worker(dict(kind="sample", checkpoint=str(checkpoint), n=64, threads=threads,
                            upsampler=args.upsampler_run if cascade else None), timeout=3600)
        run = Path(args.upsampler_run) if cascade else run_folder(checkpoint)
        r["train_images_per_s"] = _logged_rate(run)
        if cascade:  # the upsampler trained afresh for a few steps in its own process: img/s and peak memory
            r["upsampler_training"] = probe = run_worker(dict(kind="train_run", run=str(run), steps=30, threads=threads), timeout=3600)
            print(f"upsampler training: {probe.get('images_per_s', 0):.1f} img/s, peak RSS {probe.get('peak_rss_mib', 0):.0f} MiB "
                  f"(30 steps of batch {probe.get('batch')})" if "error" not in probe else f"upsampler training: {probe['error']}")
        if state.config.latent.active:
            r["autoencoder_train_images_per_s"] = _logged_rate(Path(state.config.latent.autoencoder))
        out[name] = r
        rows.append([name, r.get("size"), f"{r['seconds']:.1f}" if "seconds" in r else r.get("error"),
                     f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "–",
                     f"{r['train_images_per_s']:.1f}" if r.get("train_images_per_s") else "–",
                     f"{r['autoencoder_train_images_per_s']:.1f}" if r.get("autoencoder_train_images_per_s") else "–"])
    reference = out.get("64² default (reference)", {}).get("seconds")
    for name, r in out.items():
        if reference and "seconds" in r:
            r["sampling_vs_64"] = r["seconds"] / reference
    print("## E. 256² routes (64 slices, SDE-DPM-Solver++ 25, one batch)\n")
    print(md_table(["route", "size", "sampling s", "peak RSS MiB", "train img/s", "autoencoder train img/s"], rows))
    if reference:
        print("\n" + ", ".join(f"{k}: {r['sampling_vs_64']:.2f}× the 64² time" for k, r in out.items() if "sampling_vs_64" in r) + "\n")
    return out


def section_volumes(args, threads: int) -> dict:
    """F: a volume run's seconds per sampled volume (1 and 4 in a batch), training volumes/s and peak memory; a slab
    run's training step takes one slab from each volume, so its volumes/s are slabs/s."""
    from brainfusion.checkpoint import load_checkpoint, resolve_checkpoint

    run = Path(args.volume_run)
    checkpoint = resolve_checkpoint(run / "checkpoints" if (run / "checkpoints").is_dir() else run)
    unit = "slabs/s" if load_checkpoint(checkpoint, with_optimizer=False).config.slab.active else "volumes/s"
    out, rows = {}, []
    for n in (1, 4):
        r = out[f"sample {n}"] = run_worker(dict(kind="sample", checkpoint=str(checkpoint), n=n, threads=threads), timeout=3600)
        rows.append([f"sample {n} (one batch)", f"{r['seconds'] / n:.2f} s a volume" if "seconds" in r else r.get("error"),
                     f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "–"])
    r = out["train"] = run_worker(dict(kind="train_run", run=str(run), steps=20, threads=threads), timeout=3600)
    r["logged_volumes_per_s"] = _logged_rate(run)
    rows.append([f"train (20 steps of batch {r.get('batch')})", f"{r['images_per_s']:.2f} {unit}" if "images_per_s" in r else r.get("error"),
                 f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "–"])
    print(f"## F. volumes ({run}; the run logged {r['logged_volumes_per_s'] or 0:.2f} {unit})\n")
    print(md_table(["what", "speed", "peak RSS MiB"], rows) + "\n")
    return out


def section_cuda(st: Settings, models: dict, roof: list[dict], threads: int) -> dict:
    print("## D. CUDA training throughput (bf16 autocast, channels_last, torch.compile, fused Adam)\n")
    flops, specs = {}, []
    for size in st.cuda_sizes:
        bf_spec = brainfusion_spec(brainfusion_config(size))
        df_spec = diffusers_spec_at(models, size)
        flops[("brainfusion", size)] = count_flops(bf_spec, size)
        flops[("diffusers", size)] = count_flops(df_spec, size)
        # budget: never cut the warm-ups short, they include compilation
        common = dict(device="cuda", batch=st.cuda_batch, size=size, warmup=st.cuda_warmup, iters=st.cuda_iters,
                      budget_s=max(st.train_budget_s, 600.0), min_iters=min(st.min_iters, st.cuda_iters), threads=threads,
                      compile_=True, fused=True)
        specs.append((f"brainfusion cuda {size}", train_spec(bf_spec, "bf16", True, **common)))
        specs.append((f"diffusers cuda {size}", train_spec(df_spec, "bf16", True, **common)))
    print(md_table(["size", "brainfusion GFLOP/img", "diffusers GFLOP/img", "ratio"],
                   [[s, flops[("brainfusion", s)] / 1e9, flops[("diffusers", s)] / 1e9,
                     f"{flops[('diffusers', s)] / flops[('brainfusion', s)]:.3f}"] for s in st.cuda_sizes]))
    print(f"\nbatch {st.cuda_batch}; {st.cuda_warmup} warm-up steps (including compilation), then up to {st.cuda_iters} timed.\n")
    rows = training_rows(specs, flops, roof, st.worker_timeout_s)
    summary = print_training_table(rows, cuda=True)
    return dict(rows=rows, summary=summary, flops={f"{m}@{s}": v / 1e9 for (m, s), v in flops.items()})


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sections: A roofline, B CPU training, C sampling (needs --checkpoint), D CUDA (needs a GPU).")
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script works (a few minutes)")
    p.add_argument("--checkpoint", help="brainfusion run folder or checkpoint file for section C")
    p.add_argument("--real-data", help="folder of real slices for the quality metric in C (e.g. data/demo)")
    p.add_argument("--real-split", default="validate", help="split of an OASIS-layout --real-data (default validate)")
    p.add_argument("--out", help="write every number to this JSON file")
    p.add_argument("--sections", default="ABCD", help="which sections to run, e.g. AB (default ABCD)")
    p.add_argument("--diffusers-patch-size", type=int, choices=(1, 2, 4),
                   help="pixel-unshuffle factor in front of the diffusers U-Net (default: brainfusion's ModelConfig().patch_size)")
    p.add_argument("--n-images", type=int, default=0,
                   help="images per sampler in C (default 64); more gives a steadier quality metric")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every measurement (default: torch's choice)")
    p.add_argument("--latent-run", help="a 256² latent run (train --autoencoder) for section E")
    p.add_argument("--pixel-run", help="a 256² pixel run (recipe edm-p4-shift) for section E")
    p.add_argument("--upsampler-run", help="an upsampler 64² → 256² (train --upsample-from 64) for section E: the cascade "
                                           "--checkpoint → it, and its own training img/s and peak memory")
    p.add_argument("--volume-run", help="a volume run (train --volumes) for section F")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # tables and stderr progress stay in order when piped

    if args.worker:
        spec = json.loads(args.worker)
        worker = {"sample": worker_sample, "train_run": worker_train_run}.get(spec.get("kind"), worker_train)
        print("RESULT " + json.dumps(worker(spec)), flush=True)
        return 0

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    st = Settings(**(QUICK if args.quick else {}))
    if args.n_images:
        st = dataclasses.replace(st, n_images=args.n_images)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    sections = set(args.sections.upper())
    t_start = time.perf_counter()
    results: dict = {"header": section_header(args, st)}
    fast_bf16 = results["header"]["native_bf16"]

    def save():
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2, default=str))

    roof = []
    cuda = torch.cuda.is_available()
    if sections & {"A", "B"} or ("D" in sections and cuda):
        roof = section_roofline(st, fast_bf16)
        results["roofline"] = roof
        save()
    if "B" in sections or ("D" in sections and cuda):
        results["models"] = section_models(st, args.diffusers_patch_size)
        save()
    if "B" in sections:
        results["training_cpu"] = section_training(st, results["models"], roof, fast_bf16, args.threads)
        save()
    if "C" in sections:
        if args.checkpoint:
            results["sampling"] = section_sampling(st, args)
        else:
            print("## C. Sampling\n\nskipped: give --checkpoint RUN_DIR (and --real-data PATH for the quality metric).\n")
        save()
    if "D" in sections:
        if torch.cuda.is_available():
            results["training_cuda"] = section_cuda(st, results["models"], roof, args.threads)
        else:
            print("## D. CUDA\n\nskipped: no CUDA device.\n")
        save()
    if "E" in sections:
        results["routes_256"] = section_256(args, args.threads)
        save()
    if "F" in sections:
        if args.volume_run:
            results["volumes"] = section_volumes(args, args.threads)
        else:
            print("## F. Volumes\n\nskipped: give --volume-run RUN (train --volumes).\n")
        save()
    results["header"]["load_average_end"] = list(os.getloadavg())
    results["header"]["total_s"] = time.perf_counter() - t_start
    print(f"load average at end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}; total {results['header']['total_s']:.0f} s")
    save()
    if args.out:
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
