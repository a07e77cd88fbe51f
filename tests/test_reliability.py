"""Fault injection: training survives kills and bad data, loses nothing, trusts no file.

  * SIGKILL a real `brainfusion train` process (forked with its imports done: forked_cli.py) at
    random moments (seeded), including inside a checkpoint write, resume it each time, and check
    after every kill that the newest checkpoint loads and that at most one checkpoint interval was
    lost; at the end the weights, EMA and Adam state equal an uninterrupted run's bit for bit and
    so does the loss logged for every step;
  * SIGTERM / SIGINT → exit status 130 with a final checkpoint at the current step, then --resume;
  * disk faults (ENOSPC / EROFS on the write or the rename) → one-sentence error naming the intact
    previous checkpoint, no temporary or orphaned files, rotation keeps exactly K;
  * NaN losses → skipped and counted, fatal after --max-nonfinite in a row, no checkpoint from then on;
  * untrusted files (pickles, tampered sidecars, foreign or truncated safetensors) → refused
    through the command line with status 2 and one line, and nothing is ever unpickled.

The counts the kill test reaches are printed (run with -s to see them) and quoted in docs/concepts/reliability.md.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from forked_cli import ForkedCLI
from safetensors.torch import save_file

from brainfusion.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

STEPS, EVERY, SEED = 30, 2, 3
TRAIN = [
    "--image-size", "16", "--patch-size", "1", "--base-channels", "8", "--batch-size", "4", "--checkpoint-every", str(EVERY),
    "--log-every", "1", "--seed", str(SEED), "--sample-every", "0",
]
# SIGKILLs in the kill test, by where they are aimed: during start-up (data cache, log truncation, set-up),
# at a random moment once the process is training, and at fault-injection points where the process waits to
# be killed (checkpoint.fault_injection_point): temporary file written, sidecar written, inside rotation, and
# after the final checkpoint. Those land exactly where aimed on every run, however loaded the machine.
KILL_PLAN = {"startup": 4, "training": 5, "written": 3, "sidecar": 3, "rotation": 2, "final": 1}
KILLS = sum(KILL_PLAN.values())
KILL_SEED = 20240611
WAIT_S = 300.0  # a child that has not reached its point by then is hung, not slow
DEAD_PID = 2**22 + 1  # above Linux's largest possible process id: a writer certainly dead
TMP = re.compile(r"^\.ckpt_\d{8}\.(safetensors|json)\.(\d+)\.tmp$")


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slices_dir(tmp_path_factory):
    from conftest import brain_slice, write_png

    root = tmp_path_factory.mktemp("slices")
    for i in range(24):
        write_png(root / f"slice_{i:02d}.png", brain_slice(i, 16, 16))
    return root


@pytest.fixture(scope="module")
def reference(slices_dir, tmp_path_factory):
    """The uninterrupted run (in-process, one checkpoint at the end): its final state and its log."""
    from brainfusion.cli import main

    run = tmp_path_factory.mktemp("reference") / "run"
    status = main(["--quiet", "train", "--data", str(slices_dir), "--out-dir", str(run), "--max-steps", str(STEPS),
                   *TRAIN, "--checkpoint-every", str(STEPS)])
    assert status == 0
    return load_checkpoint(run / "checkpoints" / f"ckpt_{STEPS:08d}.safetensors"), _log_rows(run)


def _log_rows(run: Path) -> dict[int, dict]:
    """The last row logged for each step (a resumed run logs the steps after its checkpoint again)."""
    rows: dict[int, dict] = {}
    path = run / "train_log.csv"
    if path.is_file():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                rows[int(row["step"])] = row
    return rows


def _row_count(run: Path) -> int:
    path = run / "train_log.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0


def _spawn(data: Path, run: Path, log: Path, *extra: str, env: dict | None = None) -> ForkedCLI:
    """`brainfusion train` as a real child process (forked with torch already imported), one torch thread like this test process."""
    command = ["--quiet", "train", "--data", str(data), "--out-dir", str(run), "--max-steps", str(STEPS), *TRAIN, *extra]
    return ForkedCLI(command, log, env, threads=torch.get_num_threads())


def _pause_at(phase: str, marker: Path) -> dict:
    """Environment that makes a child wait at `phase` after writing `marker` (see fault_injection_point)."""
    return {"BRAINFUSION_PAUSE_AT": phase, "BRAINFUSION_PAUSE_MARKER": str(marker)}


def _release(marker: Path) -> None:
    marker.with_name(marker.name + ".go").write_text("")


def _wait_for(condition, proc: ForkedCLI, timeout: float = WAIT_S) -> bool:
    """Poll until condition() holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out waiting for the training process")


def _own_temp_files(ckpts: Path, pid: int) -> list[Path]:
    return [p for p in ckpts.glob(".ckpt_*.tmp") if TMP.match(p.name) and TMP.match(p.name).group(2) == str(pid)]


def _assert_same_state(got, want) -> None:
    """Model, EMA and optimizer tensors equal bit for bit; same optimizer hyper-parameters."""
    for part in ("model", "ema"):
        a, b = getattr(got, part), getattr(want, part)
        assert a.keys() == b.keys()
        for key in b:
            assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype, f"{part}.{key} differs"
    assert got.optimizer["param_groups"] == want.optimizer["param_groups"]
    assert got.optimizer["state"].keys() == want.optimizer["state"].keys()
    for index, slots in want.optimizer["state"].items():
        for slot, value in slots.items():
            mine = got.optimizer["state"][index][slot]
            assert torch.equal(mine, value) and mine.dtype == value.dtype, f"optimizer.{index}.{slot} differs"


def _assert_same_log(run: Path, reference_rows: dict[int, dict]) -> None:
    rows = _log_rows(run)
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step, want in reference_rows.items():
        for column in ("loss", "lr", "nonfinite_skipped", "epoch"):
            assert rows[step][column] == want[column], f"step {step}: {column} {rows[step][column]} != {want[column]}"


def _assert_tidy(ckpts: Path, keep: int = 3) -> None:
    """Exactly the newest `keep` checkpoint pairs, no temporary files, no sidecar without its checkpoint."""
    names = sorted(p.name for p in ckpts.iterdir() if p.name != "guide")
    steps = [int(p.stem[5:]) for p in list_checkpoints(ckpts)]
    assert steps == sorted(steps)[-keep:] and len(steps) == keep, names
    assert names == sorted([f"ckpt_{s:08d}.json" for s in steps] + [f"ckpt_{s:08d}.safetensors" for s in steps]), names
    guide = sorted(p.suffix for p in (ckpts / "guide").iterdir()) if (ckpts / "guide").is_dir() else []
    assert guide in ([], [".json", ".safetensors"]), guide  # the autoguidance guide: one pair, outside the rotation


# --------------------------------------------------------------------------------------------
# a. SIGKILL at random moments, resume, and compare with the uninterrupted run
# --------------------------------------------------------------------------------------------


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(slices_dir, reference, tmp_path):
    ref_state, ref_rows = reference
    rng = random.Random(KILL_SEED)
    plan = [mode for mode, n in KILL_PLAN.items() for _ in range(n)]
    rng.shuffle(plan)
    stats = Counter()
    max_lost = 0
    runs_done = 0
    t0 = time.monotonic()
    while stats["kills"] < KILLS:
        run = tmp_path / f"run{runs_done}"
        ckpts = run / "checkpoints"
        log = tmp_path / f"run{runs_done}.out"
        while True:
            newest = latest_checkpoint(ckpts)
            start = load_checkpoint(newest).step if newest else 0
            if start == STEPS:
                if f"trained to step {STEPS}" not in log.read_text():  # killed after its final checkpoint landed:
                    stats["resumes"] += 1  # a resume finds the run complete and says so
                    proc = _spawn(slices_dir, run, log, "--resume")
                    assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
                break
            resume = ["--resume"] if newest else []
            stats["resumes"] += bool(newest)
            if stats["kills"] >= KILLS:  # enough kills: let it finish
                proc = _spawn(slices_dir, run, log, *resume)
                assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
                continue
            mode = plan[stats["kills"]]
            marker = tmp_path / f"paused{stats['kills']}"
            # "training": its first step finished (it says so by a marker, not through the log's mtime)
            env = {"startup": None, "training": _pause_at(f"step:{start + 1}", marker)}.get(mode, _pause_at(mode, marker))
            proc = _spawn(slices_dir, run, log, *resume, env=env)
            if mode == "startup":  # anywhere from the fork to the first steps
                time.sleep(rng.uniform(0.0, 0.6))
                alive = proc.poll() is None
            elif mode == "training":  # at a random moment once this process is stepping
                alive = _wait_for(marker.exists, proc)
                _release(marker)
                time.sleep(rng.uniform(0.0, 0.8))
                alive = alive and proc.poll() is None
            else:  # waiting at its fault-injection point (or finished without reaching it)
                alive = _wait_for(marker.exists, proc)
            if not alive:  # it finished before the kill was due
                assert proc.wait() == 0, log.read_text()[-3000:]
                continue
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stats["kills"] += 1
            stats[f"kills_{mode}"] += 1
            torn = _own_temp_files(ckpts, proc.pid)
            if torn:
                stats["kills_inside_a_checkpoint_write"] += 1
                # past the sidecar: ckpt_N.json written, ckpt_N.safetensors not yet renamed into place
                stats["of_which_after_the_sidecar"] += any(
                    p.name.endswith(".safetensors." + str(proc.pid) + ".tmp") and (ckpts / p.name[1:].split(".safetensors")[0]).with_suffix(".json").exists()
                    for p in torn
                )
            # every checkpoint left behind loads (the sidecar matches, nothing is truncated) ...
            for path in list_checkpoints(ckpts):
                assert load_checkpoint(path).step == int(path.stem[5:])
            # ... and the newest is at most one interval behind the last step the process logged
            newest = latest_checkpoint(ckpts)
            saved = load_checkpoint(newest).step if newest else 0
            progressed = max(_log_rows(run), default=0)
            lost = progressed - saved
            assert 0 <= lost <= EVERY, f"kill {stats['kills']} ({mode}): logged step {progressed}, newest checkpoint {saved}"
            max_lost = max(max_lost, lost)
        out = log.read_text()
        assert f"trained to step {STEPS}" in out
        for step in re.findall(r"from step (\d+)", out)[1:]:  # each resumed process started at a checkpoint step
            assert int(step) % EVERY == 0
        _assert_same_state(load_checkpoint(ckpts / f"ckpt_{STEPS:08d}.safetensors"), ref_state)
        _assert_same_log(run, ref_rows)
        _assert_tidy(ckpts)
        runs_done += 1
    print(
        f"\nkill test: {stats['kills']} SIGKILLs ({stats['kills_startup']} at start-up, {stats['kills_training']} while "
        f"training, {stats['kills_inside_a_checkpoint_write']} inside a checkpoint write, {stats['of_which_after_the_sidecar']} "
        f"of them after the sidecar, {stats['kills_rotation']} inside rotation, {stats['kills_final']} after the final "
        f"checkpoint), {stats['resumes']} resumes, {runs_done} run(s) of {STEPS} steps, max steps lost {max_lost} "
        f"(interval {EVERY}); final model+EMA+Adam state and per-step loss bitwise equal to the uninterrupted run; "
        f"{time.monotonic() - t0:.0f} s"
    )
    assert stats["kills_inside_a_checkpoint_write"] >= 3


def test_a_kill_inside_the_last_rotation_is_tidied_by_the_resume_that_finds_the_run_complete(slices_dir, reference, tmp_path):
    """The window of issue 9: SIGKILL after rotation deleted an old checkpoint's weights and before its
    sidecar, at the final checkpoint; the resume has nothing to train and must still sweep the orphan."""
    from brainfusion.cli import main

    run, log, marker = tmp_path / "run", tmp_path / "train.out", tmp_path / "paused"
    ckpts = run / "checkpoints"
    assert main(["--quiet", "train", "--data", str(slices_dir), "--out-dir", str(run), *TRAIN, "--max-steps", str(STEPS - EVERY)]) == 0
    proc = _spawn(slices_dir, run, log, "--resume", env=_pause_at("rotation", marker))
    assert _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphan = ckpts / f"ckpt_{STEPS - 3 * EVERY:08d}.json"
    assert orphan.exists() and not orphan.with_suffix(".safetensors").exists()
    assert load_checkpoint(latest_checkpoint(ckpts)).step == STEPS
    (run / f".loss.png.{DEAD_PID}.tmp").write_bytes(b"half a picture")  # and a dead writer's file beside the log
    assert main(["--quiet", "train", "--data", str(slices_dir), "--out-dir", str(run), "--max-steps", str(STEPS), *TRAIN, "--resume"]) == 0
    _assert_tidy(ckpts)
    assert not list(run.glob("*.tmp"))
    _assert_same_state(load_checkpoint(ckpts / f"ckpt_{STEPS:08d}.safetensors"), reference[0])


def test_tidy_run_folder_removes_strays_orphans_and_extra_checkpoints(tmp_path):
    from brainfusion.checkpoint import tidy_run_folder
    from conftest import write_tiny_checkpoint

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for step in (4, 6, 8):
        write_tiny_checkpoint(ckpts, step=step)
    staging = ckpts / ".ckpt_00000010.safetensors.4242.tmp"  # a writer killed inside safetensors' own write
    staging.mkdir()
    (ckpts / "ckpt_00000008.safetensors").rename(staging / ".tmpqir2fZ")
    (ckpts / ".ckpt_00000010.json.4242.tmp").write_text("{")  # ... or inside the sidecar's
    (ckpts / "ckpt_00000002.json").write_text((ckpts / "ckpt_00000004.json").read_text())  # a kill inside rotation
    (ckpts / "notes.txt").write_text("mine")  # not ours: left alone
    (ckpts / "guide" / ".ckpt_00000005.safetensors.4242.tmp").mkdir(parents=True)  # killed writing the autoguidance guide
    (run / "samples").mkdir()
    for folder, name in ((run, "loss.png"), (run, "train_log.csv"), (run / "samples", "step_00000008.png")):
        (folder / f".{name}.{DEAD_PID}.tmp").write_bytes(b"half")  # dead writers' files beside the checkpoints
    (run / "samples" / f".grid.png.{os.getpid()}.tmp").write_bytes(b"half")  # a live writer's: left alone
    removed = tidy_run_folder(run, keep=1)
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_00000006.json", "ckpt_00000006.safetensors", "guide", "notes.txt"]
    assert not any((ckpts / "guide").iterdir())
    assert sorted(removed) == sorted([
        "checkpoints/.ckpt_00000010.json.4242.tmp", "checkpoints/.ckpt_00000010.safetensors.4242.tmp",
        "checkpoints/ckpt_00000002.json", "checkpoints/ckpt_00000008.json",
        "checkpoints/ckpt_00000004.json", "checkpoints/ckpt_00000004.safetensors", "checkpoints/guide/.ckpt_00000005.safetensors.4242.tmp",
        f".loss.png.{DEAD_PID}.tmp", f".train_log.csv.{DEAD_PID}.tmp", f"samples/.step_00000008.png.{DEAD_PID}.tmp",
    ])
    assert [p.name for p in run.rglob("*.tmp")] == [f".grid.png.{os.getpid()}.tmp"]
    assert tidy_run_folder(run, keep=1) == []  # nothing left to do
    assert tidy_run_folder(tmp_path / "no such run", keep=1) == []


def test_a_kill_inside_the_safetensors_write_leaves_only_what_the_tidy_removes(tmp_path):
    """safetensors writes through a `.tmpXXXXXX` file beside its target and renames it, so a SIGKILL in
    between strands that file. The child does the same up to that point, then SIGKILLs itself."""
    from brainfusion.checkpoint import tidy_run_folder
    from conftest import write_tiny_checkpoint

    run = tmp_path / "run"
    write_tiny_checkpoint(run / "checkpoints", step=2)
    child = f"""if True:
        import os, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import brainfusion.checkpoint as checkpoint
        from conftest import write_tiny_checkpoint

        def killed_inside_save_file(tensors, filename, metadata=None):
            Path(filename).with_name(".tmpqir2fZ").write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.save_file = killed_inside_save_file
        write_tiny_checkpoint(Path({str(run / "checkpoints")!r}), step=4)
    """
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").rglob(".tmpqir2fZ")], "the child did not get as far as save_file"
    assert tidy_run_folder(run, keep=3)
    _assert_tidy(run / "checkpoints", keep=1)


# --------------------------------------------------------------------------------------------
# b. SIGTERM / SIGINT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGTERM-during-checkpoint-write"])
def test_sigterm_and_sigint_write_a_final_checkpoint_and_exit_130(how, slices_dir, reference, tmp_path):
    from brainfusion.cli import main

    run, log = tmp_path / "run", tmp_path / "train.out"
    ckpts = run / "checkpoints"
    during_write = how.endswith("write")
    target = random.Random(how).randint(3, 9)
    marker = tmp_path / "paused"
    proc = _spawn(slices_dir, run, log, env=_pause_at("sidecar" if during_write else f"step:{target}", marker))
    assert _wait_for(marker.exists, proc)  # the child waits there until released
    if during_write:
        writing = int(_own_temp_files(ckpts, proc.pid)[0].name[6:14])
    proc.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGTERM)
    _release(marker)
    assert proc.wait(timeout=WAIT_S) == 130, log.read_text()[-3000:]
    out = log.read_text()
    step = int(re.search(r"trained to step (\d+)", out).group(1))
    assert 0 < step < STEPS
    assert "continue with --resume" in out
    assert max(_log_rows(run)) == step  # the final checkpoint is at the step the loop stopped at
    state = load_checkpoint(latest_checkpoint(ckpts))
    assert state.step == step and state.optimizer is not None
    if during_write:
        assert step == writing  # the write under way was finished, not torn
    else:
        assert step == target
    assert not list(ckpts.glob("*.tmp"))

    assert main(["--quiet", "train", "--data", str(slices_dir), "--out-dir", str(run), "--max-steps", str(STEPS),
                 *TRAIN, "--resume"]) == 0
    ref_state, ref_rows = reference
    _assert_same_state(load_checkpoint(ckpts / f"ckpt_{STEPS:08d}.safetensors"), ref_state)
    _assert_same_log(run, ref_rows)


# --------------------------------------------------------------------------------------------
# c. Disk faults
# --------------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fault", ["ENOSPC in save_file", "ENOSPC renaming the checkpoint", "EROFS writing the sidecar"])
def test_disk_fault_keeps_the_previous_checkpoint(fault, cli, monkeypatch, slices_dir, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    base = ["train", "--data", slices_dir, "--out-dir", run, *TRAIN, "--keep-checkpoints", "2"]
    status, _, err = cli(*base, "--max-steps", "4")
    assert status == 0, err
    before = {p.name: _sha(p) for p in ckpts.iterdir() if p.is_file()}
    assert sorted(before) == ["ckpt_00000002.json", "ckpt_00000002.safetensors", "ckpt_00000004.json", "ckpt_00000004.safetensors"]

    import brainfusion.checkpoint as checkpoint

    real_replace = os.replace
    if fault == "ENOSPC in save_file":
        def failing_save(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")  # the disk filled up half-way through
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

        monkeypatch.setattr(checkpoint, "save_file", failing_save)
    else:
        suffix = ".safetensors" if "renaming" in fault else ".json"
        code = errno.ENOSPC if "ENOSPC" in fault else errno.EROFS

        def failing_replace(src, dst, *args, **kwargs):
            if Path(dst).parent == ckpts and str(dst).endswith(suffix):
                raise OSError(code, os.strerror(code), str(dst))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", failing_replace)

    line = _user_error(cli, *base, "--max-steps", "8", "--resume")
    assert "ckpt_00000006.safetensors" in line and "ckpt_00000004.safetensors is intact" in line
    assert ("No space left" in line) if "ENOSPC" in fault else ("Read-only" in line)
    after = {p.name: _sha(p) for p in ckpts.iterdir() if p.is_file()}
    assert after == before, "the previous checkpoints changed, or a temporary/orphaned file was left"
    assert load_checkpoint(ckpts / "ckpt_00000004.safetensors").step == 4

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    monkeypatch.setattr(os, "replace", real_replace)
    status, _, err = cli(*base, "--max-steps", "8", "--resume")  # space freed: it carries on from step 4
    assert status == 0, err
    _assert_tidy(ckpts, keep=2)
    assert load_checkpoint(latest_checkpoint(ckpts)).step == 8


def test_slice_cache_write_fault_and_tampered_cache(monkeypatch, caplog, slices_dir, tmp_path):
    """The slice cache is a convenience: a failed write leaves no temporary file, a doctored one is rebuilt."""
    import numpy as np

    import brainfusion.data.slices as data
    from brainfusion.config import DataConfig

    cfg = DataConfig(path=str(slices_dir), image_size=16, cache_dir=str(tmp_path / "cache"))
    real_savez = np.savez

    def full_disk(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data.np, "savez", full_disk)
    assert len(data.load_slices(cfg, progress=False)) == 24
    assert "could not write the slice cache" in caplog.text
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())

    monkeypatch.setattr(data.np, "savez", real_savez)
    good = data.load_slices(cfg, progress=False).images
    (cache,) = (tmp_path / "cache").glob("*.npz")
    with open(cache, "wb") as fh:  # right keys, wrong picture size
        np.savez(fh, images=np.zeros((24, 8, 8), np.uint8), sources=np.array(["x"] * 24), skipped=np.array([], dtype=str))
    caplog.clear()
    assert np.array_equal(data.load_slices(cfg, progress=False).images, good)
    assert "unreadable; rebuilding" in caplog.text


def test_log_left_empty_by_a_kill_gets_its_header(cli, slices_dir, tmp_path):
    """A kill between creating train_log.csv and writing its first line leaves an empty file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.csv").write_text("")
    status, _, err = cli("train", "--data", slices_dir, "--out-dir", run, *TRAIN, "--max-steps", "2")
    assert status == 0, err
    assert sorted(_log_rows(run)) == [1, 2]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the monkeypatched faults cover it")
def test_read_only_run_folder(cli, slices_dir, tmp_path):
    run = tmp_path / "run"
    base = ["train", "--data", slices_dir, "--out-dir", run, *TRAIN]
    assert cli(*base, "--max-steps", "2")[0] == 0
    (run / "checkpoints").chmod(0o555)
    try:
        line = _user_error(cli, *base, "--max-steps", "4", "--resume")
        assert "ckpt_00000002.safetensors is intact" in line
    finally:
        (run / "checkpoints").chmod(0o755)
    assert load_checkpoint(latest_checkpoint(run / "checkpoints")).step == 2


@pytest.mark.parametrize("keep", [1, 3])
def test_rotation_keeps_exactly_k(keep, cli, slices_dir, tmp_path):
    run = tmp_path / "run"
    status, _, err = cli("train", "--data", slices_dir, "--out-dir", run, *TRAIN, "--max-steps", "10",
                         "--keep-checkpoints", str(keep))
    assert status == 0, err
    _assert_tidy(run / "checkpoints", keep=keep)
    assert load_checkpoint(latest_checkpoint(run / "checkpoints")).step == 10


def _user_error(cli, *args) -> str:
    status, _out, err = cli(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("brainfusion: error: "), (status, err)
    return lines[0]


# --------------------------------------------------------------------------------------------
# d. Non-finite losses
# --------------------------------------------------------------------------------------------


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({k, ...}): the k-th loss computed from now on (0-based, per process) is NaN."""
    from brainfusion.config import DiffusionConfig
    from brainfusion.diffusion.process import make_process

    process = type(make_process(DiffusionConfig()))  # the default formulation's loss
    real = process.loss
    calls = Counter()

    def arm(bad):
        calls.clear()

        def loss(self, model, x0, t, noise, cond=None):
            k = calls["n"]
            calls["n"] += 1
            value = real(self, model, x0, t, noise, cond)
            return value * float("nan") if (k in bad if not callable(bad) else bad(k)) else value

        monkeypatch.setattr(process, "loss", loss)

    return arm


def test_nonfinite_steps_are_skipped_counted_and_survive_a_resume(cli, nan_at, slices_dir, tmp_path):
    run = tmp_path / "run"
    base = ["train", "--data", slices_dir, "--out-dir", run, *TRAIN, "--max-nonfinite", "3"]
    nan_at({2, 4, 5})  # steps 3, 5 and 6 (1-based, as logged); two in a row is below the limit
    status, _, err = cli(*base, "--max-steps", "8")
    assert status == 0, err
    rows = _log_rows(run)
    assert [rows[s]["nonfinite_skipped"] for s in range(1, 9)] == ["0", "0", "1", "1", "2", "3", "3", "3"]
    assert [rows[s]["loss"] == "nan" for s in range(1, 9)] == [False, False, True, False, True, True, False, False]
    # the checkpoint due after step 6 came from weights whose last loss was NaN: not written
    assert [load_checkpoint(p).step for p in list_checkpoints(run / "checkpoints")] == [2, 4, 8]
    assert load_checkpoint(run / "checkpoints" / "ckpt_00000008.safetensors").extra["nonfinite_skipped"] == 3

    nan_at(set())
    status, _, err = cli(*base, "--max-steps", "10", "--resume")
    assert status == 0, err
    rows = _log_rows(run)
    assert [rows[s]["nonfinite_skipped"] for s in (9, 10)] == ["3", "3"]  # the count carries over a resume


def test_nonfinite_streak_is_fatal_and_writes_no_checkpoint(cli, nan_at, slices_dir, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    nan_at(lambda k: k >= 3)  # diverges at step 4 (1-based) and never recovers
    line = _user_error(cli, "train", "--data", slices_dir, "--out-dir", run, *TRAIN, "--max-steps", "20", "--max-nonfinite", "4")
    assert "4 steps in a row at step 7" in line and "ckpt_00000002.safetensors" in line
    assert [load_checkpoint(p).step for p in list_checkpoints(ckpts)] == [2]  # nothing after the first NaN (step 4)
    rows = _log_rows(run)
    assert max(rows) == 6 and [rows[s]["nonfinite_skipped"] for s in (3, 4, 5, 6)] == ["0", "1", "2", "3"]
    assert not list(ckpts.glob("*.tmp")) and sorted(p.name for p in ckpts.iterdir()) == ["ckpt_00000002.json", "ckpt_00000002.safetensors"]


# --------------------------------------------------------------------------------------------
# e. Untrusted files
# --------------------------------------------------------------------------------------------


def _tiny_checkpoint(tmp_path: Path) -> Path:
    """A real checkpoint (with optimizer state) of a tiny 16-px model, its config pinned here."""
    from brainfusion.checkpoint import save_checkpoint
    from brainfusion.config import RunConfig
    from brainfusion.models.unet import UNet

    config = RunConfig()
    config.data.image_size, config.model.patch_size, config.model.base_channels, config.train.max_steps = 16, 1, 8, 1
    config.validate()
    model = UNet(config.model)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long)).mean().backward()
    optimizer.step()
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    return save_checkpoint(tmp_path / "run" / "checkpoints", 1, config, model.state_dict(), ema, optimizer.state_dict())


class _Booby:
    """Unpickling this creates `marker`: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _booby_bytes(marker: Path) -> bytes:
    return pickle.dumps(_Booby(marker))


def test_the_booby_trap_works(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(_booby_bytes(marker)).close()
    assert marker.exists()  # so its absence below really means nothing was unpickled


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth", "evil.pkl", "evil.ckpt", "evil.bin", "ckpt_00000009.safetensors", "torch-zip.safetensors"])
def test_pickles_are_refused_unread(name, cli, tmp_path, slices_dir):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    path = run / "checkpoints" / name
    path.parent.mkdir(parents=True)
    if name.startswith("torch-zip"):
        torch.save({"model": _Booby(marker)}, path)  # torch's own zip format, pickle inside
    else:
        path.write_bytes(_booby_bytes(marker))
    line = _user_error(cli, "sample", "--checkpoint", path, "--n", "1", "--steps", "1")
    assert str(path) in line
    if name.startswith("ckpt_"):  # found as the newest checkpoint of a run
        assert str(path) in _user_error(cli, "sample", "--checkpoint", run, "--n", "1", "--steps", "1")
        assert str(path) in _user_error(cli, "train", "--data", slices_dir, "--out-dir", run, *TRAIN, "--max-steps", "4", "--resume")
    assert not marker.exists(), "the pickle was unpickled"


@pytest.mark.parametrize("edit", ["step", "learning rate", "not json", "not utf-8", "empty"])
def test_tampered_sidecar_is_refused(edit, cli, tmp_path):
    tiny_checkpoint = _tiny_checkpoint(tmp_path)
    sidecar = tiny_checkpoint.with_suffix(".json")
    header = json.loads(sidecar.read_text())
    if edit == "step":
        header["step"] += 1
        sidecar.write_text(json.dumps(header))
    elif edit == "learning rate":
        header["config"]["train"]["lr"] *= 10
        sidecar.write_text(json.dumps(header))
    else:
        sidecar.write_bytes({"not json": b"{step: 1", "not utf-8": b"\xff\xfe\x00{", "empty": b""}[edit])
    line = _user_error(cli, "sample", "--checkpoint", tiny_checkpoint, "--n", "1", "--steps", "1")
    assert str(sidecar) in line and "does not match" in line


@pytest.mark.parametrize("metadata", [None, {"producer": "someone else"}, {"brainfusion": "{not json"}, {"brainfusion": json.dumps({"format": "other-v9"})}])
def test_foreign_safetensors_is_refused(metadata, cli, tmp_path):
    path = tmp_path / "ckpt_00000001.safetensors"
    save_file({"weight": torch.ones(2, 3)}, str(path), metadata=metadata)
    line = _user_error(cli, "sample", "--checkpoint", path, "--n", "1", "--steps", "1")
    assert str(path) in line


def test_truncated_safetensors_is_refused_at_any_length(cli, tmp_path):
    tiny_checkpoint = _tiny_checkpoint(tmp_path)
    whole = tiny_checkpoint.read_bytes()
    header_end = 8 + int.from_bytes(whole[:8], "little")
    for cut in sorted({0, 1, 7, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 1, len(whole) // 2, len(whole) - 1}):
        tiny_checkpoint.write_bytes(whole[:cut])
        line = _user_error(cli, "sample", "--checkpoint", tiny_checkpoint, "--n", "1", "--steps", "1")
        assert str(tiny_checkpoint) in line, (cut, line)


# --------------------------------------------------------------------------------------------
# f. One writer a folder (fileio.lock_folder)
# --------------------------------------------------------------------------------------------


def _folder_state(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_train_into_a_live_run_is_refused_and_the_first_run_stays_its_own(slices_dir, reference, tmp_path, capsys):
    from brainfusion.cli import main

    run, log, marker = tmp_path / "run", tmp_path / "train.out", tmp_path / "paused"
    proc = _spawn(slices_dir, run, log, env=_pause_at("step:5", marker))
    assert _wait_for(marker.exists, proc)  # the first run holds the folder, paused after step 5
    before = _folder_state(run)
    for extra in ([], ["--resume"]):  # a second terminal, and a job scheduler's retry
        started = time.monotonic()
        assert main(["--quiet", "train", "--data", str(slices_dir), "--out-dir", str(run), "--max-steps", str(STEPS),
                     *TRAIN, *extra]) == 2
        assert time.monotonic() - started < 10
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err
        assert f"{run} is in use by process {proc.pid} on " in err and "choose another --out-dir" in err, err
        assert _folder_state(run) == before  # nothing read, tidied or written
    _release(marker)
    assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
    steps = [int(row.split(",")[0]) for row in (run / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice
    ref_state, ref_rows = reference
    _assert_same_state(load_checkpoint(run / "checkpoints" / f"ckpt_{STEPS:08d}.safetensors"), ref_state)
    _assert_same_log(run, ref_rows)


def test_resume_after_a_sigkill_of_the_holder_starts_at_once(slices_dir, reference, tmp_path):
    from brainfusion.cli import main

    run, log, marker = tmp_path / "run", tmp_path / "train.out", tmp_path / "paused"
    proc = _spawn(slices_dir, run, log, env=_pause_at("step:4", marker))
    assert _wait_for(marker.exists, proc)
    proc.kill()
    proc.wait(timeout=WAIT_S)
    assert main(["--quiet", "train", "--data", str(slices_dir), "--out-dir", str(run), "--max-steps", str(STEPS),
                 *TRAIN, "--resume"]) == 0  # the kernel dropped the lock with its holder: nothing stale to clear
    _assert_same_state(load_checkpoint(run / "checkpoints" / f"ckpt_{STEPS:08d}.safetensors"), reference[0])


def test_a_second_sample_into_the_same_folder_is_refused(slices_dir, tmp_path, capsys):
    from brainfusion.cli import main

    run, out, log, marker = tmp_path / "run", tmp_path / "samples", tmp_path / "sample.out", tmp_path / "paused"
    assert main(["--quiet", "train", "--data", str(slices_dir), "--out-dir", str(run), "--max-steps", "2", *TRAIN]) == 0
    sample = ["--quiet", "sample", "--checkpoint", str(run), "--out", str(out), "--n", "2", "--batch-size", "1",
              "--sampler", "ddim", "--steps", "2", "--no-gif"]
    proc = ForkedCLI(sample, log, _pause_at("sample:0", marker), threads=torch.get_num_threads())
    assert _wait_for(marker.exists, proc)  # the first batch is written, the second not yet
    before = _folder_state(out)
    assert main(sample) == 2
    err = capsys.readouterr().err
    assert f"{out} is in use by process {proc.pid}" in err and "choose another output folder" in err, err
    assert _folder_state(out) == before
    _release(marker)
    assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
    assert (out / "grid.png").is_file() and len(list((out / "images").glob("*.png"))) == 2
