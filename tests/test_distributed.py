"""Multi-process training and sampling through torchrun + DDP (gloo on CPU), against one process.

The design makes every batch, flip, timestep and noise draw a pure function of (seed, step), with
`train.batch_size` the global batch split over the ranks, and sample batch b seeded by (seed, b)
and made by rank b mod W. So two processes must reproduce one process: the same logged losses,
the same weights, a checkpoint that resumes under another number of processes, and the same
sample images. One torchrun launch trains and then samples in the same workers (torchrun_commands.py); the
one-process references run in this pytest process to spare a PyTorch import each.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from brainfusion import cli

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="torchrun process groups are tested on POSIX only"),
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="this PyTorch build has no gloo backend",
    ),
]

LAUNCH_TIMEOUT_S = 180  # per torchrun launch; the whole process group is killed past it
# base_channels 16 with the default 8 norm groups puts 2 channels in every GroupNorm group; with 1
# channel per group the bias feeding the last norm has an exactly-zero gradient whose rounding noise
# Adam blows up to ±lr per step, and those (meaningless) weights would differ between runs.
MODEL = ["--image-size", "32", "--patch-size", "2", "--base-channels", "16", "--attention-resolutions", "8"]
TRAIN = [
    "--batch-size", "8", "--log-every", "1", "--checkpoint-every", "3", "--keep-checkpoints", "10",
    "--sample-every", "0", "--precision", "fp32", "--channels-last", "off", "--warmup-steps", "2", "--lr", "1e-3",
    "--seed", "3",
]
SAMPLE_N = 6  # three batches of 2: rank 0 makes batches 0 and 2, rank 1 batch 1
SAMPLE = ["sample", "--n-images", str(SAMPLE_N), "--batch-size", "2", "--sampler", "ddim", "--steps", "4", "--seed", "5",
          "--precision", "fp32"]


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun gives each worker anyway; the references use one thread too
    env["PYTHONUNBUFFERED"] = "1"
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # hosts whose name resolves to an unroutable address
    return env


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line), from `ps`."""
    try:
        table = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,command="], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in table.splitlines():
        pid, ppid, *command = line.split(None, 2)
        found[int(pid)] = (int(ppid), command[0] if command else "")
    return found


def _stop(proc: subprocess.Popen) -> None:
    """End a torchrun launch and every worker it started.

    torchrun puts each worker in a session of its own, so killing the launcher's process group
    would miss them: they are listed (as the launcher's descendants) before anything is signalled.
    """
    table = _processes()
    workers, todo = {}, [proc.pid]
    while todo:
        parent = todo.pop()
        for pid, (ppid, command) in table.items():
            if ppid == parent:
                workers[pid] = command
                todo.append(pid)
    proc.terminate()  # torchrun passes SIGTERM on to its workers and reaps them
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    still = _processes()
    for pid, command in workers.items():
        if pid in still and still[pid][1] == command:  # the same process, not a reused id
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def torchrun(target: list[str], label: str, nproc: int = 2) -> str:
    """Run `torchrun --standalone --nproc_per_node nproc <target>`; on timeout, kill it and its workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_child_env())
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(proc)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            out = ""
        pytest.fail(f"{label}: torchrun did not finish in {LAUNCH_TIMEOUT_S} s (killed with its workers); output:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C) while waiting
            _stop(proc)
    assert proc.returncode == 0, f"{label}: torchrun exited with {proc.returncode}; output:\n{out[-4000:]}"
    return out


def one_process(argv: list[str], label: str) -> None:
    """The same CLI in this process (world of one), on one thread like each torchrun worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(argv) == 0, f"{label} failed"
    finally:
        torch.set_num_threads(threads)


def read_log(run: Path) -> list[dict]:
    with open(run / "train_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"ckpt_{step:08d}.safetensors"


def assert_same_tensors(a: Path, b: Path, atol: float) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    worst = 0.0
    for key in ta:
        assert ta[key].shape == tb[key].shape, key
        diff = float((ta[key].double() - tb[key].double()).abs().max()) if ta[key].numel() else 0.0
        assert diff <= atol, f"{key} differs by {diff:.3g} between {a} and {b}"
        worst = max(worst, diff)
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):  # 32 slices of 16–32 px: sizes differ, resized to 32 on load
        side = int(rng.integers(16, 33))
        yy, xx = np.mgrid[:side, :side] / side
        blob = np.exp(-((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - rng.uniform(0.3, 0.7)) ** 2) / rng.uniform(0.02, 0.1))
        image = np.clip(200 * blob + rng.normal(0, 12, (side, side)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(data / f"slice_{i:02d}.png")
    common = ["--quiet", "train", "--data", str(data), *MODEL, *TRAIN]
    one_process([*common, "--max-steps", "8", "--out-dir", str(root / "one")], "train, 1 process, 8 steps")
    sample = ["--quiet", *SAMPLE, "--checkpoint", str(ckpt(root / "two", 6))]
    driver = str(Path(__file__).with_name("torchrun_commands.py"))
    commands = [[*common, "--max-steps", "6", "--out-dir", str(root / "two")], [*sample, "--out", str(root / "samples_two")]]
    torchrun([driver, json.dumps(commands)], "train 6 steps, then sample 6 images, torchrun 2 processes")
    return {"root": root, "common": common, "sample": sample, "one": root / "one", "two": root / "two"}


def test_two_processes_log_the_one_process_losses(runs):
    one, two = read_log(runs["one"]), read_log(runs["two"])
    assert [int(r["step"]) for r in two] == list(range(1, 7)), "rank 0 alone writes one log row per step"
    assert [r["lr"] for r in two] == [r["lr"] for r in one[:6]]
    a = np.array([float(r["loss"]) for r in one[:6]])
    b = np.array([float(r["loss"]) for r in two])
    print(f"\nlosses 1 process  : {a}\nlosses 2 processes: {b}\nmax |diff| {np.abs(a - b).max():.2e}")
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6)  # the log keeps 6 decimals
    assert a[-1] < a[0], "the tiny run should learn something"


def test_two_processes_write_the_one_process_weights(runs):
    names = sorted(p.name for p in (runs["two"] / "checkpoints").iterdir())
    assert names == [f"ckpt_{s:08d}.{ext}" for s in (3, 6) for ext in ("json", "safetensors")] + ["guide"], names
    assert sorted(p.name for p in (runs["two"] / "checkpoints" / "guide").iterdir()) == ["ckpt_00000003.json", "ckpt_00000003.safetensors"]
    for step in (3, 6):
        worst = assert_same_tensors(ckpt(runs["one"], step), ckpt(runs["two"], step), atol=1e-4)
        print(f"\nstep {step}: max |weight diff| (model, EMA, Adam moments) {worst:.2e}")
    assert (runs["two"] / "loss.png").is_file() and (runs["two"] / "config.json").is_file()


def test_resume_under_another_number_of_processes(runs):
    resumed = runs["root"] / "two_resumed_on_one"
    shutil.copytree(runs["two"], resumed)
    one_process([*runs["common"], "--max-steps", "8", "--out-dir", str(resumed), "--resume"], "resume, 1 process, steps 7-8")
    rows = read_log(resumed)
    assert [int(r["step"]) for r in rows] == list(range(1, 9)), "the resumed run continues at step 7"
    ref = read_log(runs["one"])
    np.testing.assert_allclose([float(r["loss"]) for r in rows[6:]], [float(r["loss"]) for r in ref[6:8]], rtol=1e-4, atol=2e-6)
    assert_same_tensors(ckpt(runs["one"], 8), ckpt(resumed, 8), atol=1e-4)


def test_sampling_is_split_across_ranks_and_independent_of_their_number(runs):
    two_dir, one_dir = runs["root"] / "samples_two", runs["root"] / "samples_one"
    one_process([*runs["sample"], "--out", str(one_dir)], "sample 6 images, 1 process")

    expected = [f"sample_{i:05d}.png" for i in range(SAMPLE_N)]
    two = {p.name: np.asarray(Image.open(p)) for p in sorted((two_dir / "images").iterdir())}
    one = {p.name: np.asarray(Image.open(p)) for p in sorted((one_dir / "images").iterdir())}
    assert sorted(two) == expected and sorted(one) == expected
    for i in range(SAMPLE_N):
        for j in range(i + 1, SAMPLE_N):
            assert not np.array_equal(two[expected[i]], two[expected[j]]), f"images {i} and {j} are identical"
    for name in expected:
        assert np.array_equal(two[name], one[name]), f"{name} depends on the number of processes"
    assert (two_dir / "grid.png").is_file() and (two_dir / "reverse_process.gif").is_file()
    assert sorted(p.name for p in two_dir.iterdir()) == ["grid.png", "images", "reverse_process.gif"]

