"""Shared fixtures: tiny synthetic slices and volumes written by the tests themselves, a tiny
checkpoint, and a runner for the `brainfusion` command line.

Everything is small (16–40 px, a few files, a few steps) so the whole suite runs in well under
a few minutes on a busy 2-core laptop.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

# On a small shared CPU, two intra-op threads fighting other jobs are several times slower than
# one; tests are tiny, so one thread is both faster and more repeatable. NumPy's OpenBLAS too: with its
# two threads spinning against the other xdist worker, the Inception test's eigh took 22 s instead of 5.
THREADS = int(os.environ.get("BRAINFUSION_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)
threadpool_limits(THREADS, user_api="blas")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # and the children tests start
    os.environ.setdefault(_var, str(THREADS))


# The modules with the longest tests (tens of seconds: kill-and-resume, torchrun, plain diffusers) go first,
# each kept whole for its module fixtures, so that xdist's workers steal short tests at the end instead of
# one worker finishing a long one alone (the suite took 166 s with them in name order).
SLOW_MODULES = ("test_reliability.py", "test_distributed.py", "test_export.py", "test_classifier.py", "test_evaluate.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))  # stable: each module's order is kept


# --------------------------------------------------------------------------------------------
# The per-user cache: never the real home
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _session_cache_home(tmp_path_factory):
    """Module- and session-scoped fixtures run before the per-test fixture below; they (and the children the
    forkserver of forked_cli.py starts) cache under this session folder, not under ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


@pytest.fixture(autouse=True)
def user_cache_home(tmp_path, monkeypatch) -> Path:
    """Each test gets its own empty user cache folder (a hidden one, which data discovery never walks into)."""
    home = tmp_path / ".xdg_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


# --------------------------------------------------------------------------------------------
# Synthetic images and volumes
# --------------------------------------------------------------------------------------------


def brain_slice(seed: int, h: int = 40, w: int = 36, value: int | None = None) -> np.ndarray:
    """A uint8 axial-slice-like picture: a bright noisy ellipse on a black background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
    ry, rx = h * rng.uniform(0.3, 0.42), w * rng.uniform(0.3, 0.42)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    image = np.zeros((h, w), dtype=np.uint8)
    if value is None:
        image[inside] = rng.integers(60, 250, size=int(inside.sum()))
    else:
        image[inside] = value
    return image


def write_png(path: Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def make_oasis(root: Path, n_train: int = 16, n_test: int = 8, n_validate: int = 4, size: int = 40, seg_value: int = 85) -> Path:
    """The OASIS keras_png_slices layout; seg folders hold flat label maps (value `seg_value`)."""
    counts = {"train": n_train, "test": n_test, "validate": n_validate}
    case = 0
    for split, n in counts.items():
        for k in range(n):
            case += 1
            write_png(root / f"keras_png_slices_{split}" / f"case_{case:03d}_slice_{k}.nii.png", brain_slice(case, size, size))
            write_png(
                root / f"keras_png_slices_seg_{split}" / f"seg_{case:03d}_slice_{k}.nii.png",
                brain_slice(case, size, size, value=seg_value),
            )
    return root


def make_class_slices(root: Path, subjects=(0, 1), classes: dict[str, int] | None = None, size: int = 16) -> Path:
    """Class folders (the Kaggle layout) of `subj<s>_slice_<k>.png` slices, 3 per subject, so each slice has a
    class (its folder) and a slice level (its name); every slice of class c has brightness classes[c]."""
    for name, value in (classes or {"Bright": 220, "Dark": 90}).items():
        for s in subjects:
            for k in range(3):
                write_png(root / name / f"subj{s}_slice_{k}.png", brain_slice(100 * s + k, size, size, value=value))
    return root


def phantom_volume(shape=(24, 20, 10), empty=(0, 1, 8, 9)) -> np.ndarray:
    """A float volume (x, y, z) with a blob in every axial slice except the `empty` ones, and a
    bright marker in the right-anterior corner so orientation mistakes show."""
    nx, ny, nz = shape
    vol = np.zeros(shape, dtype=np.float32)
    xx, yy = np.mgrid[0:nx, 0:ny]
    blob = ((xx - nx / 2) / (nx * 0.35)) ** 2 + ((yy - ny / 2) / (ny * 0.35)) ** 2 <= 1
    for k in range(nz):
        if k in empty:
            continue
        vol[:, :, k][blob] = 100.0 + 5 * k
        vol[nx - 5 : nx - 2, ny - 5 : ny - 2, k] = 400.0  # right (+x), anterior (+y)
    return vol


@pytest.fixture
def oasis_root(tmp_path) -> Path:
    """16 train + 8 test + 4 validate PNG slices (40×40) with seg folders beside them."""
    return make_oasis(tmp_path / "oasis")


@pytest.fixture
def make_oasis_root():
    return make_oasis


@pytest.fixture
def brain_png():
    return brain_slice


@pytest.fixture
def png_writer():
    return write_png


@pytest.fixture
def phantom():
    return phantom_volume


# --------------------------------------------------------------------------------------------
# Configs and checkpoints
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_model_config():
    from brainfusion.config import ModelConfig

    return ModelConfig(image_size=16, base_channels=8, patch_size=1)


def write_tiny_checkpoint(out_dir: Path, weights_config=None, step: int = 1, base_channels: int = 8) -> Path:
    """A real checkpoint of a tiny 16-px model; `weights_config` (a ModelConfig) puts the weights
    of another model under this config, which is what a mixed-up checkpoint looks like."""
    from brainfusion.checkpoint import save_checkpoint
    from brainfusion.config import RunConfig
    from brainfusion.models.unet import UNet

    config = RunConfig()
    config.data.image_size = 16
    config.model.base_channels = base_channels
    config.model.patch_size = 1
    config.train.max_steps = 1
    config.validate()
    torch.manual_seed(0)
    model = UNet(weights_config or config.model)
    state = model.state_dict()
    ema = {k: v.clone() for k, v in state.items()}  # safetensors refuses tensors that share memory
    return save_checkpoint(out_dir, step, config, state, ema, None)


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return write_tiny_checkpoint(tmp_path / "run" / "checkpoints")


@pytest.fixture
def checkpoint_writer():
    return write_tiny_checkpoint


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run `brainfusion --quiet ARGS` in-process from tmp_path; returns (status, stdout, stderr)."""
    from brainfusion.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str):
        status = main(["--quiet", *map(str, args)])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


@pytest.fixture
def assert_user_error(cli):
    """Run the CLI and check it failed with status 2 and exactly one `brainfusion: error:` line
    on stderr that mentions every string in `names`; returns that line."""

    def check(args, *names: str) -> str:
        status, _out, err = cli(*args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2, f"expected exit status 2, got {status}; stderr: {err}"
        assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
        assert lines[0].startswith("brainfusion: error: "), lines[0]
        assert "Traceback" not in err
        for name in names:
            assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
        return lines[0]

    return check
