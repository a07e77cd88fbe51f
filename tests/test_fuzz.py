"""Fuzzing the data loaders (hypothesis, bounded and derandomized so CI is repeatable).

Every data source `load_slices` accepts — one PNG/JPEG/TIFF, one NIfTI (.nii/.nii.gz) or Analyze
(.hdr/.img) volume, a folder, the OASIS layout — is fed good files mixed with truncated, empty,
wrong-format, misnamed, huge-header, wrong-rank, NaN/Inf-filled, complex-valued and random-byte
files. The property, for every example:

  * on_bad_file="skip": the result holds only uint8 slices of the configured size, exactly as many
    as the good files make; every bad file is named in its own warning and in the summary, and a
    truncated file is either skipped or decodes to exactly what the intact file gives;
  * on_bad_file="fail": a BrainfusionError naming a bad file;
  * never another exception, never a hang (a timer per example), never a silent wrong image
    (an all-NaN or all-Inf volume yields no slices, a huge header is refused before allocation).

The number of files tried is printed at the end (run with -s) and quoted in docs/concepts/reliability.md.
"""

from __future__ import annotations

import faulthandler
import gzip
import io
import logging
import os
import signal
import struct
import tempfile
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from brainfusion.config import DataConfig
from brainfusion.data.slices import load_slices, read_slice, read_volume_slices
from brainfusion.errors import BrainfusionError

SIZE = 16
EXAMPLE_TIMEOUT_S = 20
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED = Counter()  # files by fault, over the whole module

SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "nii": ".nii", "nii.gz": ".nii.gz", "analyze": ".hdr"}
IMAGE_FAULTS = ["good", "good-16bit", "upper-suffix", "truncated", "zero-byte", "random-bytes", "nifti-bytes", "huge-header"]
FLOAT_FAULTS = ["nan", "inf"]  # TIFF (mode F) and volumes
VOLUME_FAULTS = ["good", "partial-nan", "truncated", "zero-byte", "random-bytes", "png-bytes", "huge-header",
                 "rank-1", "rank-2", "rank-5", "two-frames", "nan", "inf", "complex"]
IGNORED = ["notes.txt", ".hidden.png", "orphan.img", "scan.nii.bak"]  # never read from a folder


def faults_for(kind: str) -> list[str]:
    if kind in ("png", "jpeg"):
        return IMAGE_FAULTS
    if kind == "tiff":
        return IMAGE_FAULTS + FLOAT_FAULTS
    return VOLUME_FAULTS if kind != "analyze" else [f for f in VOLUME_FAULTS if f != "upper-suffix"]


specs = st.sampled_from(list(SUFFIX)).flatmap(
    lambda kind: st.tuples(st.just(kind), st.sampled_from(faults_for(kind)), st.integers(0, 2**20))
)


# --------------------------------------------------------------------------------------------
# Crafting files
# --------------------------------------------------------------------------------------------


def png_header_bytes(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height (with valid CRCs) and whose pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def tiff_header_bytes(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF claiming width×height 8-bit pixels, with 16 bytes of data."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, width * height & 0xFFFFFFFF)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 16


def jpeg_header_bytes(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def encode_image(kind: str, array: np.ndarray) -> bytes:
    """uint8 → L, uint16 → I;16, float32 → F."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format={"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}[kind])
    return buf.getvalue()


def nifti_bytes(array: np.ndarray, gz: bool = False) -> bytes:
    raw = nib.Nifti1Image(array, np.eye(4)).to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def with_dims(header: bytes, dims: tuple[int, ...]) -> bytes:
    """A NIfTI-1 / Analyze header (dim[] at byte 40) rewritten to claim `dims`."""
    raw = bytearray(header)
    raw[40:56] = struct.pack("<8h", len(dims), *dims, *([1] * (7 - len(dims))))
    return bytes(raw)


HUGE_IMAGE = [(100000, 100000), (65000, 65000), (9000, 16), (16, 9000), (8192, 8192), (8000, 6000)]
HUGE_VOLUME = [(30000, 30000, 30000), (4000, 4000, 60), (600, 600, 600), (512, 512, 400), (8192, 8192, 1)]


@dataclass
class Made:
    path: Path  # what discovery finds (the .hdr of an Analyze pair)
    expect: str  # "good" (loads, `slices` slices), "bad" (refused), "maybe" (refused, or identical to `reference`)
    slices: int = 1
    reference: np.ndarray | None = None


def make_file(folder: Path, index: int, kind: str, fault: str, seed: int, scratch: Path) -> Made:
    """One file of `kind` with `fault` in `folder`; `scratch` (outside the data) is for intermediate files."""
    rng = np.random.default_rng(seed)
    TRIED[fault] += 1
    folder.mkdir(parents=True, exist_ok=True)
    suffix = SUFFIX[kind]
    path = folder / f"f{index:02d}_{fault}{suffix.upper() if fault == 'upper-suffix' else suffix}"
    image_kind = kind in ("png", "jpeg", "tiff")
    if image_kind:
        h, w = (int(n) for n in rng.integers(1, 40, 2))
        if fault == "good-16bit" and kind != "jpeg":
            good = encode_image(kind, rng.integers(0, 65535, (h, w)).astype(np.uint16))
        else:
            good = encode_image(kind, rng.integers(0, 256, (h, w), dtype=np.uint8))
    else:
        nx, ny, nz = (int(n) for n in rng.integers(3, 12, 3))
        volume = rng.uniform(20, 100, (nx, ny, nz)).astype(np.float32)  # every axial slice is "brain"
        good = nifti_bytes(volume, gz=kind == "nii.gz")
    slices = 1 if image_kind else nz

    def write(data: bytes, img: bytes | None = None) -> None:
        if kind == "analyze":  # data is the whole single-file NIfTI: split it into an Analyze pair
            path.write_bytes(data)
            if img is not None:
                path.with_suffix(".img").write_bytes(img)
        else:
            path.write_bytes(data)

    if kind == "analyze":  # build the pair through nibabel, then take its bytes apart
        scratch.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=scratch))
        array = {"nan": np.full((nx, ny, nz), np.nan, np.float32),
                 "inf": np.where(rng.random((nx, ny, nz)) < 0.5, np.inf, -np.inf).astype(np.float32),
                 "complex": volume.astype(np.complex64), "rank-1": np.ones(7, np.float32), "rank-2": np.ones((6, 5), np.float32),
                 "rank-5": np.ones((4, 4, 3, 2, 2), np.float32), "two-frames": np.ones((5, 5, 3, 2), np.float32)}.get(fault)
        if fault == "partial-nan":
            array = volume.copy()
            array[::2, ::2] = np.nan
            array[1::2, 1::2] = np.nan
        nib.save(nib.AnalyzeImage(volume if array is None else array, np.eye(4)), work / "a.hdr")
        hdr, img = (work / "a.hdr").read_bytes(), (work / "a.img").read_bytes()
        pristine = (hdr, img)
        if fault in ("good", "partial-nan"):
            write(hdr, img)
        elif fault == "truncated":
            if rng.random() < 0.5:
                write(hdr[: int(rng.integers(0, len(hdr)))], img)
            else:
                write(hdr, img[: int(rng.integers(0, len(img)))])
        elif fault == "zero-byte":
            write(b"", img if rng.random() < 0.5 else b"")
        elif fault == "random-bytes":
            write(rng.bytes(int(rng.integers(1, 700))), rng.bytes(int(rng.integers(0, 700))))
        elif fault == "png-bytes":
            write(encode_image("png", rng.integers(0, 256, (8, 8), dtype=np.uint8)), img)
        elif fault == "huge-header":
            write(with_dims(hdr, HUGE_VOLUME[int(rng.integers(len(HUGE_VOLUME)))]), img)
        else:
            write(hdr, img)
    else:
        pristine = good
        if fault in ("good", "good-16bit", "upper-suffix"):
            data = good
        elif fault == "partial-nan":
            volume[::2, ::2] = np.nan
            volume[1::2, 1::2] = np.nan
            data = nifti_bytes(volume, gz=kind == "nii.gz")
        elif fault == "truncated":
            data = good[: int(rng.integers(0, len(good)))]
        elif fault == "zero-byte":
            data = b""
        elif fault == "random-bytes":
            data = rng.bytes(int(rng.integers(1, 2000)))
        elif fault == "nifti-bytes":
            data = nifti_bytes(rng.uniform(0, 1, (4, 4, 2)).astype(np.float32), gz=rng.random() < 0.5)
        elif fault == "png-bytes":
            data = encode_image("png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
        elif fault == "huge-header" and image_kind:
            w, h = HUGE_IMAGE[int(rng.integers(len(HUGE_IMAGE)))]
            data = {"png": png_header_bytes, "tiff": tiff_header_bytes, "jpeg": jpeg_header_bytes}[kind](w, h)
        elif fault == "huge-header":
            raw = nifti_bytes(volume)
            data = with_dims(raw, HUGE_VOLUME[int(rng.integers(len(HUGE_VOLUME)))])
            data = gzip.compress(data, mtime=0) if kind == "nii.gz" else data
        elif fault in ("nan", "inf") and image_kind:  # a float TIFF
            values = np.full((5, 7), np.nan, np.float32) if fault == "nan" else np.where(rng.random((5, 7)) < 0.5, np.inf, -np.inf).astype(np.float32)
            data = encode_image("tiff", values)
        elif fault == "nan":
            data = nifti_bytes(np.full((nx, ny, nz), np.nan, np.float32), gz=kind == "nii.gz")
        elif fault == "inf":
            data = nifti_bytes(np.where(rng.random((nx, ny, nz)) < 0.5, np.inf, -np.inf).astype(np.float32), gz=kind == "nii.gz")
        elif fault == "complex":
            data = nifti_bytes(volume.astype(np.complex64), gz=kind == "nii.gz")
        else:  # wrong rank
            shape = {"rank-1": (7,), "rank-2": (6, 5), "rank-5": (4, 4, 3, 2, 2), "two-frames": (5, 5, 3, 2)}[fault]
            data = nifti_bytes(np.ones(shape, np.float32), gz=kind == "nii.gz")
        write(data)

    if fault in ("good", "good-16bit", "upper-suffix", "partial-nan"):
        return Made(path, "good", slices)
    if fault == "truncated":
        return Made(path, "maybe", slices, _reference(scratch, kind, pristine))
    return Made(path, "bad")


def _reference(scratch: Path, kind: str, pristine) -> np.ndarray:
    """What the intact file decodes to."""
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=scratch))
    path = work / f"intact{SUFFIX[kind]}"
    if kind == "analyze":
        path.write_bytes(pristine[0])
        path.with_suffix(".img").write_bytes(pristine[1])
    else:
        path.write_bytes(pristine)
    if kind in ("png", "jpeg", "tiff"):
        return read_slice(path, SIZE)[None]
    return read_volume_slices(path, SIZE, DataConfig().min_brain_fraction)


# --------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------


@contextmanager
def time_limit(seconds: int):
    """A Python-level timer (TimeoutError), and a hard one that dumps the stacks and exits if C code hangs."""

    def expire(signum, frame):
        raise TimeoutError(f"load_slices did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    faulthandler.dump_traceback_later(seconds * 3, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load(source: Path, mode: str, cache: Path):
    """load_slices under a timer, with the warnings it logged; (result or None, error message or None, warnings)."""
    handler = Records()
    logger = logging.getLogger("brainfusion.data.slices")
    logger.addHandler(handler)
    try:
        with time_limit(EXAMPLE_TIMEOUT_S):
            try:
                return load_slices(DataConfig(path=str(source), image_size=SIZE, on_bad_file=mode, cache_dir=str(cache)), progress=False), None, handler.messages
            except BrainfusionError as exc:
                return None, str(exc), handler.messages
    finally:
        logger.removeHandler(handler)


def check(source: Path, made: list[Made], ignored: list[Path]) -> None:
    scratch = source.parent.parent / "caches"
    bad = [m for m in made if m.expect == "bad"]
    maybe = [m for m in made if m.expect == "maybe"]
    good = [m for m in made if m.expect == "good"]

    # skip: only valid slices, every bad file named
    result, error, warnings = load(source, "skip", scratch / ".cache_skip")
    if not made:
        assert error and "no PNG/JPEG/TIFF" in error, error
        return
    named = lambda m: any(str(m.path) in w for w in warnings if not w.startswith("skipped "))  # noqa: E731
    summary = [w for w in warnings if w.startswith("skipped ")]
    for m in bad:
        assert named(m), f"no warning names {m.path}: {warnings}"
    loaded_maybe = [m for m in maybe if not named(m)]
    assert not any(named(m) for m in good), f"a good file was skipped: {warnings}"
    if result is None:
        assert not good and not loaded_maybe and "could be read" in error, (error, warnings)
        return
    assert result.images.dtype == np.uint8 and result.images.ndim == 3 and result.images.shape[1:] == (SIZE, SIZE)
    assert len(result.sources) == len(result.images)
    expected = sum(m.slices for m in good) + sum(len(m.reference) for m in loaded_maybe)
    assert len(result.images) == expected, (len(result.images), expected, [(m.path.name, m.expect) for m in made])
    assert set(result.sources) == {str(m.path) for m in good + loaded_maybe}
    assert not any(str(p) in " ".join(result.sources + result.skipped) for p in ignored)
    for m in loaded_maybe:  # a truncated file that still decodes must decode to exactly the intact picture
        mine = result.images[[i for i, s in enumerate(result.sources) if s == str(m.path)]]
        assert np.array_equal(mine, m.reference), f"{m.path} decoded to something other than the intact file"
    skipped = bad + [m for m in maybe if named(m)]
    assert len(result.skipped) == len(skipped)
    if skipped:
        assert len(summary) == 1 and all(str(m.path) in summary[0] for m in skipped), summary

    # fail: an error naming a bad file, or (no bad file) the same result
    result, error, _ = load(source, "fail", scratch / ".cache_fail")
    if bad or len(loaded_maybe) < len(maybe):
        assert result is None and error, "on_bad_file=fail loaded a source with a bad file"
        assert any(str(m.path) in error for m in bad + maybe), error
        assert "data.on_bad_file=skip" in error or "not a supported file" in error, error  # library terms (the CLI says --on-bad-file skip)
    else:
        assert result is not None, error
        assert len(result.images) == expected


# --------------------------------------------------------------------------------------------
# The sources
# --------------------------------------------------------------------------------------------


@FUZZ
@given(spec=specs, via_img=st.booleans())
def test_fuzz_single_file(spec, via_img):
    with tempfile.TemporaryDirectory() as tmp:
        made = make_file(Path(tmp) / "data", 0, *spec, scratch=Path(tmp) / "scratch")
        source = made.path.with_suffix(".img") if spec[0] == "analyze" and via_img else made.path
        check(source, [made], [])


@FUZZ
@given(files=st.lists(specs, min_size=0, max_size=5), nested=st.lists(st.booleans(), min_size=5, max_size=5), with_ignored=st.booleans())
def test_fuzz_folder(files, nested, with_ignored):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        made = [make_file(root / "sub" if nested[i] else root, i, *spec, scratch=Path(tmp) / "scratch") for i, spec in enumerate(files)]
        ignored = []
        if with_ignored:
            for name in IGNORED:
                (root / name).write_bytes(b"\x00garbage")
                ignored.append(root / name)
        check(root, made, ignored)


@FUZZ
@given(train=st.lists(specs, min_size=1, max_size=3), test=st.lists(specs, min_size=0, max_size=2))
def test_fuzz_oasis_layout(train, test):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "oasis"
        scratch = Path(tmp) / "scratch"
        made = [make_file(root / "keras_png_slices_train", i, *spec, scratch=scratch) for i, spec in enumerate(train)]
        made += [make_file(root / "keras_png_slices_test", 10 + i, *spec, scratch=scratch) for i, spec in enumerate(test)]
        ignored = []
        for folder in ("keras_png_slices_seg_train", "keras_png_slices_validate"):  # never read for split=train
            (root / folder).mkdir()
            (root / folder / "seg_bad.png").write_bytes(b"not a png")
            ignored.append(root / folder / "seg_bad.png")
        check(root, made, ignored)


@pytest.mark.parametrize("name", ["pipe.png", "pipe.nii", "pipe.nii.gz", "link.png"])
def test_fifo_and_dangling_link_do_not_hang(name, tmp_path):
    """A named pipe would block the decoder forever; a dangling link has no data: both are bad files."""
    root = tmp_path / "data"
    root.mkdir()
    good = make_file(root, 0, "png", "good", 1, scratch=tmp_path / "scratch")
    special = root / name
    if name.startswith("pipe"):
        os.mkfifo(special)
    else:
        special.symlink_to(tmp_path / "nowhere.png")
    check(root, [good, Made(special, "bad")], [])


def test_report_counts():
    """Prints how many files the fuzz tests above fed in (for docs/concepts/reliability.md)."""
    print(f"\nfuzz: {sum(TRIED.values())} files tried, {sum(v for k, v in TRIED.items() if not k.startswith('good') and k not in ('upper-suffix', 'partial-nan'))} "
          f"of them broken: " + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items())))
