"""Draw from an export with diffusers alone, in a process where `import brainfusion` fails, as on a machine without it.

A fresh interpreter spends ~3.5 s importing torch and diffusers; the export tests draw four times, so one server
process imports them once (with brainfusion blocked) and forks a child for each draw. Each child starts with no
exported code loaded, runs `DiffusionPipeline.from_pretrained(folder[, custom_pipeline=folder], trust_remote_code=True)`
(diffusers copies the folder's pipeline.py into its modules cache and imports it), saves the images (PIL images as
their uint8 pixels) and the type each call's first image came back as, and exits.
Run as a script, this file is that server: one JSON request a line on stdin, one exit status a line on stdout.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path


class _NoBrainfusion(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "brainfusion":
            raise ImportError(f"{name} is blocked: the export must load without brainfusion")


def _array(images):
    """A call's images (or masks) as one array: a list of PIL images (output_type "pil") as their stacked pixels."""
    import numpy as np

    return np.stack([np.asarray(image) for image in images]) if isinstance(images, list) else np.asarray(images)


def _draw(request: dict) -> None:
    import numpy as np
    from diffusers import DiffusionPipeline

    folder = request["folder"]
    pipe = DiffusionPipeline.from_pretrained(folder, **({"custom_pipeline": folder} if request["named"] else {}), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    results = [pipe(**call) for call in request["calls"]]
    kinds = [f"{type(r.images[0]).__module__}.{type(r.images[0]).__name__}" if isinstance(r.images, list) else
             f"{type(r.images).__module__}.{type(r.images).__name__}" for r in results]
    np.savez(request["out"], *[_array(r.images) for r in results], kinds=np.array(kinds),
             **{f"masks_{i}": _array(r.masks) for i, r in enumerate(results) if r.masks is not None})
    assert not [m for m in sys.modules if m.split(".")[0] == "brainfusion"]
    print(type(pipe).__module__, type(pipe.unet).__module__)


def _serve() -> None:
    sys.meta_path.insert(0, _NoBrainfusion())
    sys.dont_write_bytecode = True  # each draw copies another folder's code to the same cache path: never reuse bytecode
    try:
        import brainfusion  # noqa: F401

        sys.exit("brainfusion was importable")
    except ImportError:
        pass
    import numpy  # noqa: F401
    import torch
    from diffusers import DiffusionPipeline  # noqa: F401

    torch.set_num_threads(1)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd, path in ((1, request["log"] + ".out"), (2, request["log"] + ".err")):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                _draw(request)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)


class PlainDiffusers:
    """The test side: one server for the session; `draw` returns each call's images (and masks) as arrays, and
    `kinds` holds what the last draw's calls returned (e.g. "PIL.Image.Image" for a list of PIL images)."""

    def __init__(self, workdir: Path):
        self.workdir, self.count, self.kinds = Path(workdir), 0, []
        env = {**os.environ, "HF_MODULES_CACHE": str(self.workdir / "hf_modules"), "HF_HUB_OFFLINE": "1"}
        self.server = subprocess.Popen([sys.executable, __file__], cwd=self.workdir, env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def draw(self, folder: Path, *calls: dict, custom_pipeline: bool = True, masks: bool = False) -> list:
        """`calls`' images from `DiffusionPipeline.from_pretrained(folder[, custom_pipeline=folder], trust_remote_code=True)`;
        with `masks`, (images, masks) of each call."""
        import numpy as np

        self.count += 1
        out, log = self.workdir / f"draw_{self.count}.npz", self.workdir / f"draw_{self.count}"
        request = {"folder": str(folder), "out": str(out), "log": str(log), "calls": list(calls), "named": custom_pipeline}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        assert reply, "the plain-diffusers server died (it found brainfusion importable, or failed to import diffusers)"
        printed, errors = (Path(f"{log}.{name}").read_text() for name in ("out", "err"))
        assert json.loads(reply) == 0, errors[-4000:]
        assert printed.split() == ["diffusers_modules.local.pipeline", "diffusers_modules.local.brainfusion_hub"], printed + errors[-4000:]
        with np.load(out) as stored:
            self.kinds = stored["kinds"].tolist()
            if masks:
                return [(stored[f"arr_{i}"], stored[f"masks_{i}"]) for i in range(len(calls))]
            assert not [name for name in stored.files if name.startswith("masks_")]  # image-only exports return no masks
            return [stored[f"arr_{i}"] for i in range(len(calls))]

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


if __name__ == "__main__":
    _serve()
