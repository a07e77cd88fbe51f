"""`brainfusion` command lines as real child processes forked from a server that has already imported torch.

A fresh interpreter spends ~3 s on imports before a training step (torch 1.3 s, torch._dynamo 1.4 s on the
first optimizer); the kill tests start ~30 children, so they fork them instead (multiprocessing's forkserver,
which forks from a single-threaded process: no lock held by a torch thread is copied). Each child is a
separate process with its own pid, signals, environment and log, running `brainfusion.cli.main` as
`python -m brainfusion.cli` does; only the imports are shared.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

PRELOAD = ["torch", "torch._dynamo", "matplotlib.pyplot", "brainfusion.cli", "brainfusion.training.train", "forked_cli"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def _run(argv: list[str], env: dict, log: str, threads: int) -> None:
    """The child: its environment, stdout and stderr appended to `log`, then the command line."""
    import torch

    from brainfusion.cli import main

    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(threads)
    sys.exit(main(argv))


class ForkedCLI:
    """The part of subprocess.Popen's interface the tests use: pid, poll, wait, send_signal."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None, threads: int = 1):
        self._process = _CONTEXT.Process(target=_run, args=(list(argv), dict(env or {}), str(log), threads), daemon=True)
        self._process.start()
        self.pid = self._process.pid

    def poll(self) -> int | None:
        return None if self._process.is_alive() else self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("brainfusion", timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
