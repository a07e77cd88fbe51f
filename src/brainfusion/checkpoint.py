"""Checkpoints: one safetensors file (weights, EMA, optimizer state) plus a JSON config beside it.

Nothing is ever unpickled. The run config and step are embedded in the safetensors metadata
(the source of truth) and copied to a readable `.json`; a JSON that disagrees with the embedded
copy marks a tampered checkpoint and is refused. Files are written to a temporary name and
renamed, so a kill at any moment leaves the previous checkpoint whole; what such a kill leaves
behind (temporary files, a sidecar without its weights) is removed by the next process that takes
the run over (`tidy_run_folder`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import AutoencoderRunConfig, RunConfig
from .errors import BrainfusionError
from .fileio import TEMP_SUFFIX, atomic_write_text, temp_path

log = logging.getLogger(__name__)

FORMAT = "brainfusion-checkpoint-v1"
DIFFUSION, AUTOENCODER = "diffusion", "autoencoder"  # header "kind"; absent = diffusion (every checkpoint before the autoencoder)
NAME = re.compile(r"^ckpt_(\d{8})\.safetensors$")
GUIDE_FOLDER = "guide"  # checkpoints/guide/: the run's autoguidance guide, outside the rotation
TEMP = re.compile(r"^\..+\.(\d+)" + re.escape(TEMP_SUFFIX) + "$")  # fileio.temp_path: .NAME.PID.tmp


@dataclass
class Checkpoint:
    path: Path
    step: int
    config: RunConfig | AutoencoderRunConfig
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict | None
    extra: dict


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer.{index}.{slot}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, slot = key.split(".", 2)
        state.setdefault(int(index), {})[slot] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    out_dir: Path,
    step: int,
    config: RunConfig | AutoencoderRunConfig,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict | None,
    extra: dict | None = None,
    keep: int = 3,
) -> Path:
    """Write ckpt_<step>.safetensors + .json atomically, then drop all but the newest `keep`.

    safetensors writes through a randomly named temporary file beside its target (`.tmpXXXXXX`),
    which a kill would strand under a name no tidy can tell from someone else's; so its target is
    inside a staging folder of this process, `.ckpt_<step>.safetensors.<pid>.tmp/`, one stray as a
    whole. The sidecar lands before the weights are renamed in: weights never lack their sidecar.
    """
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt_{step:08d}.safetensors"
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    groups: list = []
    if optimizer is not None:
        opt_tensors, groups = _optimizer_tensors(optimizer)
        tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    header = {"format": FORMAT, "step": step, "config": config.to_dict(), "optimizer_groups": groups, "extra": extra or {}}
    if isinstance(config, AutoencoderRunConfig):
        header["kind"] = AUTOENCODER
    metadata = {"brainfusion": json.dumps(header, sort_keys=True)}
    staging = temp_path(path)
    staged = staging / path.name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging.mkdir(exist_ok=True)
        save_file(tensors, str(staged), metadata=metadata)
        with open(staged, "rb") as fh:
            os.fsync(fh.fileno())
        fault_injection_point("written")
        atomic_write_text(path.with_suffix(".json"), json.dumps(header, indent=2, sort_keys=True))
        fault_injection_point("sidecar")
        os.replace(staged, path)
    except OSError as exc:
        if not path.exists():  # a sidecar already written must not outlive the failed write
            path.with_suffix(".json").unlink(missing_ok=True)
        previous = latest_checkpoint(out_dir)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise BrainfusionError(
            f"could not write checkpoint {path} ({exc.strerror or exc}); free disk space or choose a writable train.out_dir{kept}."
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tidy_checkpoints(out_dir, keep)
    return path


_PAUSED: set[str] = set()


def fault_injection_point(phase: str) -> None:
    """Test hook, so kill tests land exactly where they aim instead of racing a timer.

    With BRAINFUSION_PAUSE_AT=<phase> and BRAINFUSION_PAUSE_MARKER=<file>, the first time this
    process reaches `phase` it writes <file> and waits (up to 10 minutes) until <file>.go exists.
    Phases: "written" (temporary checkpoint written, sidecar not), "sidecar" (sidecar written, not
    renamed), "rotation" (an old checkpoint's weights deleted, its sidecar not yet), "final" (the
    final checkpoint written, the process not yet done), "step:<n>" (step n finished) and, in
    `brainfusion sample`, "sample:<b>" (batch b written).
    """
    if os.environ.get("BRAINFUSION_PAUSE_AT") != phase or phase in _PAUSED:
        return
    _PAUSED.add(phase)
    marker = Path(os.environ["BRAINFUSION_PAUSE_MARKER"])
    atomic_write_text(marker, str(os.getpid()))
    release, deadline = marker.with_name(marker.name + ".go"), time.monotonic() + 600
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _is_stray(path: Path) -> bool:
    """A killed writer's temporary file or staging folder, or a sidecar whose checkpoint is gone (or never landed)."""
    if path.name.startswith(".ckpt_") and path.name.endswith(TEMP_SUFFIX):
        return True
    weights = path.with_suffix(".safetensors")
    return path.suffix == ".json" and bool(NAME.match(weights.name)) and not weights.exists()


def _remove(path: Path) -> bool:
    """Delete a file or a staging folder. A failure (a read-only folder) is logged, not raised: the
    files are harmless, and the write that follows reports an unwritable folder in its own words."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return True
    except OSError as exc:
        log.warning("could not remove %s (%s)", path, exc.strerror or exc)
        return False


def _rotate(out_dir: Path, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints: weights first, then the sidecar, so a kill in
    between leaves at worst a sidecar without weights (a stray the next takeover removes), never
    weights without their sidecar."""
    if keep <= 0:
        return
    for old in list_checkpoints(out_dir)[:-keep]:
        if _remove(old):
            fault_injection_point("rotation")
            _remove(old.with_suffix(".json"))


def tidy_checkpoints(out_dir: Path, keep: int) -> list[str]:
    """Remove what killed writers left in a checkpoint folder: temporary files and staging folders,
    sidecars without their checkpoint, checkpoints beyond `keep`. One writer per folder, so at a
    takeover or after this process's own write every such file is stale. Returns the names removed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = [stray.name for stray in sorted(out_dir.iterdir()) if _is_stray(stray) and _remove(stray)]
    before = {p.name for p in out_dir.iterdir()}
    _rotate(out_dir, keep)
    return removed + sorted(before - {p.name for p in out_dir.iterdir()})


def _alive(pid: int) -> bool:
    """Whether process `pid` runs; an id owned by another user counts, and so does any id where
    there is no harmless probe (os.kill(pid, 0) terminates the process on Windows)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True
    return True


def tidy_run_folder(run_dir: Path, keep: int) -> list[str]:
    """Tidy a run folder when a process takes it over (start, --resume, and a resume that finds the
    run complete, which writes no checkpoint and so never reaches the tidy after a write): all that
    tidy_checkpoints removes from checkpoints/, plus the temporary files (`.NAME.PID.tmp`) that dead
    writers left beside the log, config and previews. Other programs may write there at the same
    time (`brainfusion sample` into samples/), so only files of processes no longer running go.
    Returns the paths removed, relative to `run_dir`."""
    run_dir = Path(run_dir)
    removed = [f"checkpoints/{name}" for name in tidy_checkpoints(run_dir / "checkpoints", keep)]
    removed += [f"checkpoints/{GUIDE_FOLDER}/{name}" for name in tidy_checkpoints(run_dir / "checkpoints" / GUIDE_FOLDER, 1)]
    for folder in (run_dir, run_dir / "samples"):
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            match = TEMP.match(path.name)
            if match and path.is_file() and not _alive(int(match.group(1))) and _remove(path):
                removed.append(path.relative_to(run_dir).as_posix())
    if removed:
        log.info("tidied %s: removed what killed processes left, %s", run_dir, ", ".join(removed))
    return removed


def list_checkpoints(out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if NAME.match(p.name))


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def kept_guide(checkpoint: Path) -> Path | None:
    """The weights a run kept at train.guide_at of its budget (checkpoints/guide/), the guide of autoguidance; None if none."""
    return latest_checkpoint(run_folder(Path(checkpoint)) / "checkpoints" / GUIDE_FOLDER)


def guide_checkpoint(checkpoint: Path) -> Path:
    """`kept_guide`, refusing a run that kept none in one sentence."""
    found = kept_guide(checkpoint)
    if found is None:
        run = run_folder(Path(checkpoint))
        raise BrainfusionError(f"{run} kept no guide checkpoint (checkpoints/{GUIDE_FOLDER}/, written at train.guide_at of a run); "
                               "give an earlier checkpoint of the run as the guide.")
    return found


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to: the parent of its `checkpoints/` folder, else its own folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint file or a run folder (→ its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        newest = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
        if newest is None:
            raise BrainfusionError(f"no ckpt_*.safetensors checkpoint in {path}; train first or give a checkpoint file.")
        return newest
    if path.suffix in (".pt", ".pth", ".pkl", ".ckpt", ".bin"):
        raise BrainfusionError(
            f"{path} is a pickle-format file, which brainfusion never loads because unpickling can run code; give a .safetensors checkpoint."
        )
    if not path.is_file():
        raise BrainfusionError(f"checkpoint {path} does not exist; check the path.")
    return path


# fields added after checkpoints were written without them → the value those runs were trained with,
# whatever today's default is: the VP process before EDM; ±1 label channels before diffusion.mask_scale;
# autoencoders on the pixels before autoencoder.patch, discriminators on the pixels before autoencoder.disc_patch
_TRAINED_BEFORE = {"diffusion": {"formulation": "vp", "mask_scale": 1.0}, "autoencoder": {"patch": 1, "disc_patch": 1}}


def _upgrade(raw: dict) -> dict:
    """A checkpoint stores every config field; one missing a field of _TRAINED_BEFORE predates it."""
    if not isinstance(raw, dict):
        return raw
    for section, fields in _TRAINED_BEFORE.items():
        if isinstance(raw.get(section), dict):
            raw = {**raw, section: {**fields, **raw[section]}}
    return raw


def load_checkpoint(path: Path, with_optimizer: bool = True, kind: str = DIFFUSION) -> Checkpoint:
    """Read a checkpoint of `kind` (diffusion or autoencoder) without unpickling; refuse foreign or tampered files."""
    path = resolve_checkpoint(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BrainfusionError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or not a checkpoint.") from None
    if "brainfusion" not in metadata:
        raise BrainfusionError(f"{path} is a safetensors file but not a brainfusion checkpoint (no brainfusion metadata); give a checkpoint written by `brainfusion train`.")
    try:
        header = json.loads(metadata["brainfusion"])
    except json.JSONDecodeError:
        raise BrainfusionError(f"{path} has corrupt brainfusion metadata; use an earlier checkpoint.") from None
    if header.get("format") != FORMAT:
        raise BrainfusionError(f"{path} has format {header.get('format')!r}, not {FORMAT}; it was written by another version or program.")
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()) != header:
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise BrainfusionError(
                f"{sidecar} does not match the config embedded in {path.name}; the checkpoint was edited or mixed up, restore the original pair."
            ) from None
    found = header.get("kind", DIFFUSION)
    if found != kind:
        use = "give it as the autoencoder of a latent run (autoencoder=...)" if found == AUTOENCODER else "give an autoencoder run"
        raise BrainfusionError(f"{path} is a {found} checkpoint, not a {kind} one; {use}.")
    config_type = AutoencoderRunConfig if kind == AUTOENCODER else RunConfig
    config = config_type.from_dict(_upgrade(header["config"]), source=f"{path} (embedded config)")
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    optimizer = None
    if with_optimizer and header.get("optimizer_groups"):
        opt = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        optimizer = _optimizer_state(opt, header["optimizer_groups"])
    return Checkpoint(path, int(header["step"]), config, model, ema, optimizer, header.get("extra", {}))


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """load_state_dict with a one-sentence error when the checkpoint is from another model."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (missing or unexpected or wrong)[0]
        raise BrainfusionError(
            f"the weights in {path} do not fit the model its config describes (first mismatch: {detail}); "
            "the checkpoint was made for a different model, use the config it was trained with."
        )
    module.load_state_dict(weights)
