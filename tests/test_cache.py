"""The slice cache lives in the user's cache folder (XDG_CACHE_HOME, set per test by conftest.py), never in
a data folder; `brainfusion cache list` and `cache clear` show and remove brainfusion's files only."""

from __future__ import annotations

import os
import stat

from brainfusion.config import DataConfig
from brainfusion.data.cache import default_cache_dir, list_cache
from brainfusion.data.slices import load_slices

TINY = ["--image-size", "16", "--base-channels", "8", "--patch-size", "1", "--batch-size", "4", "--max-steps", "2",
        "--sample-every", "0", "--checkpoint-every", "2"]


def _slices(root, png_writer, brain_png, n=8):
    for i in range(n):
        png_writer(root / f"s_{i}.png", brain_png(i, 16, 16))
    return root


def _tree(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_default_cache_is_the_user_cache_folder(user_cache_home):
    assert default_cache_dir() == user_cache_home / "brainfusion" / "slices"


def test_a_read_only_data_folder_trains_and_is_left_untouched(cli, tmp_path, png_writer, brain_png, user_cache_home):
    data = _slices(tmp_path / "data", png_writer, brain_png)
    before = _tree(data)
    modes = [(p, p.stat().st_mode) for p in [data, *data.rglob("*")]]
    for path, mode in modes:
        os.chmod(path, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        status, out, err = cli("train", "--data", data, "--out-dir", tmp_path / "run", *TINY)
    finally:
        for path, mode in modes:
            os.chmod(path, mode)
    assert status == 0, err
    assert _tree(data) == before  # (root ignores chmod: the listing is what proves nothing was written)
    assert len(list((user_cache_home / "brainfusion" / "slices").glob("slices_train_*.npz"))) == 1


def test_cache_list_names_each_file_and_its_data(cli, tmp_path, png_writer, brain_png):
    a = _slices(tmp_path / "a", png_writer, brain_png)
    b = _slices(tmp_path / "b", png_writer, brain_png, n=5)
    for root in (a, b):
        load_slices(DataConfig(path=str(root), image_size=16), progress=False)
    entries = list_cache()
    assert sorted(e.source for e in entries) == [str(a.resolve()), str(b.resolve())]
    status, out, _ = cli("cache", "list")
    assert status == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("2 cache file(s)")
    for e in entries:
        assert any(e.path.name in line and e.source in line and "KiB" in line for line in lines[:2])


def test_cache_clear_removes_only_brainfusions_files(cli, tmp_path, png_writer, brain_png):
    data = _slices(tmp_path / "data", png_writer, brain_png)
    load_slices(DataConfig(path=str(data), image_size=16), progress=False)
    folder = default_cache_dir()
    (folder / "notes.txt").write_text("not ours")
    size = sum(p.stat().st_size for p in folder.glob("slices_*.npz"))
    status, out, _ = cli("cache", "clear")
    assert status == 0
    assert "removed 1 cache file(s)" in out and f"{size / 1024:.1f} KiB" in out
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert cli("cache", "list")[1].strip().endswith(f"0 cache file(s), 0 B in {folder}")


def test_cache_commands_take_another_folder(cli, tmp_path, png_writer, brain_png):
    data = _slices(tmp_path / "data", png_writer, brain_png)
    other = tmp_path / "other_cache"
    status, _, err = cli("data", "inspect", "--data", data, "--image-size", "16", "--cache-dir", other, "--montage", tmp_path / "m.png")
    assert status == 0, err
    assert "1 cache file(s)" in cli("cache", "list", "--cache-dir", other)[1]
    assert "0 cache file(s)" in cli("cache", "list")[1]
    assert "removed 1 cache file(s)" in cli("cache", "clear", "--cache-dir", other)[1]
