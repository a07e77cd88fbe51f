"""Where decoded slices (and encoded latents) are cached, and how they are listed and cleared.

The cache lives in the user's cache directory (platformdirs: `$XDG_CACHE_HOME/brainfusion/slices`,
`~/.cache/brainfusion/slices` on Linux, the OS's own place elsewhere), never in a data folder: a data
folder may be read-only, shared by several users, or under version control. Files are keyed by the
content and settings they were built from (slices.py `_cache_key`), so one cache serves every data
folder, and each file records the data path it came from so that `list_cache` can say what it holds.
Only the names brainfusion writes (`CACHE_PATTERNS`) are ever listed or deleted.
"""

from __future__ import annotations

import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..fileio import TEMP_SUFFIX

log = logging.getLogger(__name__)

CACHE_PATTERNS = ("slices_*.npz", "latents_*.npz", "volumes_*.npz")
SOURCE_KEY = "data_source"  # the npz member holding the resolved data path a cache file was built from


def default_cache_dir() -> Path:
    """The per-user cache folder; read at every call, so XDG_CACHE_HOME set later (tests) is honoured."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("brainfusion", appauthor=False)) / "slices"


def cache_dir(config: DataConfig) -> Path:
    """The folder a DataConfig's caches go to: its own `cache_dir` if set, else the per-user one."""
    return Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()


def source_of(config: DataConfig) -> str:
    """The data path as a cache file records it: absolute, so a listing says which folder it was."""
    return str(Path(config.path).expanduser().resolve())


@dataclass
class CacheEntry:
    path: Path
    size: int
    modified: float
    source: str  # "" for files from before the source was recorded, or unreadable ones


def _recorded_source(path: Path) -> str:
    """The data path stored in a cache file, read without loading its arrays (an npz is a zip)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return str(stored[SOURCE_KEY]) if SOURCE_KEY in stored.files else ""
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return ""


def _own_files(folder: Path) -> list[Path]:
    """brainfusion's cache files in `folder` (and temporaries a killed writer left), nothing else."""
    if not folder.is_dir():
        return []
    found = {p for pattern in CACHE_PATTERNS for p in folder.glob(pattern)}
    found |= {p for pattern in CACHE_PATTERNS for p in folder.glob(f".{pattern}.*{TEMP_SUFFIX}")}
    return sorted(p for p in found if p.is_file() and not p.is_symlink())


def list_cache(folder: Path | None = None) -> list[CacheEntry]:
    """Each cache file in `folder` (default: the per-user cache), oldest first."""
    entries = []
    for path in _own_files(folder or default_cache_dir()):
        stat = path.stat()
        entries.append(CacheEntry(path, stat.st_size, stat.st_mtime, _recorded_source(path)))
    return sorted(entries, key=lambda e: (e.modified, e.path.name))


def clear_cache(folder: Path | None = None) -> tuple[int, int]:
    """Delete brainfusion's cache files in `folder` (default: the per-user cache); (files, bytes) freed."""
    count = freed = 0
    for path in _own_files(folder or default_cache_dir()):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another process cleared it first
            continue
        count, freed = count + 1, freed + size
    return count, freed


def describe_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def describe_time(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))
