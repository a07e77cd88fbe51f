"""Atomic file writes and the folder lock: the two mechanisms behind every file brainfusion writes.

A file is written under a temporary name in its own folder (`.NAME.PID.tmp`), flushed to disk and
renamed over its target, so a reader (or a resumed run) sees the old file or the new one, never
half of one; a failed write removes its temporary. The one name pattern lets a run folder's tidy
recognise what a killed writer left behind. A folder has one writing process at a time (`lock_folder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import BrainfusionError

TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """Where a write of `path` by this process goes before the rename."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_output(path: Path | str, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 4 MiB blocks (weights files can be large)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


LOCK_NAME = ".brainfusion.lock"


def _holder(lock: Path) -> str:
    """Who holds `lock`, as its holder wrote it: "process 123 on host (command)"."""
    try:
        text = lock.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def lock_folder(folder: Path | str, setting: str = "output folder", beside: bool = False) -> Iterator[Path]:
    """Hold `folder` for this process's writes: a second writer is refused before it reads, tidies or writes anything.

    The lock is `fcntl.flock` on `folder/.brainfusion.lock` (`beside`: `.NAME.lock` next to the folder, for one
    that is replaced whole or handed on as it is, such as samples or an export), so the kernel drops it when the holder exits in any way, SIGKILL included: a resume after a
    kill starts at once, with nothing stale to clear. The lock file is never deleted (deleting it would let two
    processes lock two different files). Where the filesystem has no flock (some NFS and SMB mounts) the folder
    is used unlocked, with a warning. `setting` names what to change in the refusal, e.g. "train.out_dir".
    """
    folder = Path(folder)
    lock = folder.with_name(f".{folder.name}.lock") if beside else folder / LOCK_NAME
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BrainfusionError(f"{folder} is in use by {_holder(lock)}; wait for it to finish, or choose another {setting}.") from None
        except OSError as exc:
            logging.getLogger(__name__).warning("%s: the filesystem refuses file locks (%s); a second writer would not be "
                                                "refused, so run one command into this folder at a time", folder, exc.strerror)
        fh.truncate(0)
        command = [Path(sys.argv[0]).name, *[a for a in sys.argv[1:] if not a.startswith("-")][:1]]
        fh.write(f"process {os.getpid()} on {socket.gethostname()} ({' '.join(command)})\n")
        fh.flush()
        try:
            yield lock
        finally:
            fh.truncate(0)  # the kernel releases the lock when the file closes
