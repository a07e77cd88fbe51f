"""The documentation: links resolve, the README stays short, user pages stay free of the lab notebook's words,
the generated references match the code, the defaults quoted match the parser's, and the "your own data" guide's
commands run as written (on tiny data, with small budgets)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import unicodedata
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
GENERATOR = DOCS / "reference" / "generate.py"

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_TARGET = re.compile(r"""<(?:img|a)\s[^>]*(?:src|href)=["']([^"']+)["']""")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def user_pages() -> list[Path]:
    """The manual: everything but the lab notebook (docs/research/) and the generated reference."""
    pages = [README, DOCS / "results.md", *sorted(DOCS.glob("*.md"))]
    for folder in ("guides", "concepts"):
        pages += sorted((DOCS / folder).rglob("*.md"))
    generated = {DOCS / "demo_model_card.md"}  # an example of the card `brainfusion export` writes
    return sorted(set(p for p in pages if p.is_file() and p not in generated))


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def without_code_spans(line: str) -> str:
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation and symbols dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading anchors by its text
    kept = [c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN"]
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for _number, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", line))
    return found


def links(path: Path):
    """(line number, target) of every link and image in `path`'s prose."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        bare = without_code_spans(line)
        for target in LINK.findall(bare) + HTML_TARGET.findall(bare):
            yield number, target


def test_every_relative_link_and_anchor_resolves():
    broken = []
    anchor_cache: dict[Path, set[str]] = {}
    for page in markdown_files():
        for number, target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(ROOT)}:{number}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
                continue
            if anchor and dest.suffix == ".md":
                if dest not in anchor_cache:
                    anchor_cache[dest] = anchors(dest)
                if anchor not in anchor_cache[dest]:
                    broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_short_and_its_lines_are_readable():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150, f"README.md has {len(text.splitlines())} lines; keep it to 150"
    long = [f"README.md:{n}: {len(line)} characters" for n, line in prose_lines(text) if len(line) > 200]
    assert not long, "lines over 200 characters outside code blocks:\n" + "\n".join(long)


PROCESS_WORDS = [
    (re.compile(r"\b20\d\d-\d\d-\d\d\b"), "a date (the lab notebook, docs/research/, keeps dates)"),
    (re.compile(r"\bissues?\s*#?\d+", re.I), "an issue number"),
    (re.compile(r"\bthe issue('s)?\b", re.I), "the issue"),
    (re.compile(r"\btargets?\b[^.\n]{0,40}\b(met|missed|reached)\b", re.I), "a development target"),
    # a working session, not an MR session (OASIS-1's OAS1_xxxx_MRn, BIDS's ses-)
    (re.compile(r"\b(this|that|in one|an? earlier|an? later|the last|the next|same) sessions?\b|\bsessions? of\b", re.I),
     "a working session"),
    (re.compile(r"\b(the|this) (GPU|AMX|AVX-512|development|fastest development) machine\b", re.I), "a machine nickname"),
]


@pytest.mark.parametrize("page", user_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_user_pages_hold_no_lab_notebook_words(page):
    found = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for pattern, what in PROCESS_WORDS:
            m = pattern.search(line)
            if m:
                found.append(f"{page.relative_to(ROOT)}:{number}: {what}: {m.group(0)!r}")
    assert not found, "move these to docs/research/ or reword them:\n" + "\n".join(found)


def _generator():
    spec = importlib.util.spec_from_file_location("brainfusion_docs_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["cli.md", "python.md"])
def test_generated_reference_is_current(name):
    generator = _generator()
    text = {"cli.md": generator.cli_markdown, "python.md": generator.python_markdown}[name]()
    assert text == (DOCS / "reference" / name).read_text(encoding="utf-8"), (
        f"docs/reference/{name} is out of date with the code; run {generator.REGENERATE}")
    assert text == {"cli.md": generator.cli_markdown, "python.md": generator.python_markdown}[name](), "not deterministic"


def _parser_defaults(command: str) -> tuple[str, int]:
    """The sampler and steps `brainfusion COMMAND` draws with when given neither (--steps 0: the sampler's own count)."""
    import argparse

    from brainfusion.cli import make_parser
    from brainfusion.config import DiffusionConfig
    from brainfusion.diffusion.process import default_steps

    for action in make_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            values = {a.dest: a.default for a in action.choices[command]._actions}
            sampler = values["sampler"]
            return sampler, values["steps"] or default_steps(DiffusionConfig(), sampler)
    raise AssertionError("no sub-commands")


QUOTED_DEFAULT = re.compile(r"default[^.\n]{0,60}?`(?P<sampler>[a-z+]+)`,\s*(?P<steps>\d+)\s+steps", re.I)


def test_the_defaults_quoted_in_the_docs_are_the_parsers():
    import inspect

    from brainfusion.diffusion.pipeline import Pipeline

    sample, evaluate = _parser_defaults("sample"), _parser_defaults("evaluate")
    assert sample == evaluate, f"sample draws {sample} by default, evaluate {evaluate}: one set of defaults"
    call = inspect.signature(Pipeline.__call__).parameters
    assert (call["sampler"].default, call["steps"].default) == sample, "Pipeline's defaults differ from the CLI's"
    quotes = {}
    for page in user_pages():
        for number, line in prose_lines(page.read_text(encoding="utf-8")):
            for m in QUOTED_DEFAULT.finditer(line):
                quotes[f"{page.relative_to(ROOT)}:{number}"] = (m.group("sampler"), int(m.group("steps")))
    assert any(k.startswith("README.md") for k in quotes), "the README should quote the default sampler (`name`, N steps)"
    assert any(k.startswith("docs/") for k in quotes), "docs/ should quote the default sampler (`name`, N steps)"
    wrong = {where: quoted for where, quoted in quotes.items() if quoted != sample}
    assert not wrong, f"the parser's default is {sample}; these pages quote another: {wrong}"


# --------------------------------------------------------------------------------------------
# The "your own data" guide, run as written
# --------------------------------------------------------------------------------------------

TINY = ["--image-size", "32", "--base-channels", "8", "--batch-size", "4", "--checkpoint-every", "2", "--log-every", "1"]


def marked_block(page: Path, mark: str) -> str:
    """The fenced block right after `<!-- test: MARK -->` in `page`."""
    text = page.read_text(encoding="utf-8")
    m = re.search(rf"<!--\s*test:\s*{re.escape(mark)}\s*-->\s*\n```[a-z]*\n(.*?)\n```", text, re.S)
    assert m, f"{page.relative_to(ROOT)} has no fenced block marked <!-- test: {mark} -->"
    return m.group(1)


def shell_commands(block: str) -> list[list[str]]:
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def tiny_volumes(folder: Path, n: int = 3) -> Path:
    """`n` NIfTI volumes of 32×40×24 voxels: a noisy ellipsoid 'brain' with darker 'ventricles' in each."""
    import nibabel as nib

    folder.mkdir(parents=True)
    zz, yy, xx = np.meshgrid(np.arange(24), np.arange(40), np.arange(32), indexing="ij")
    for k in range(n):
        rng = np.random.default_rng(k)
        r = ((xx - 16) / (11 + k)) ** 2 + ((yy - 20) / 15) ** 2 + ((zz - 12) / 10) ** 2
        vol = np.where(r <= 1, 400 + 100 * rng.random((24, 40, 32)), 0.0)
        vol[(r <= 0.15) & (np.abs(xx - 16) > 2)] *= 0.4
        nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0).astype(np.float32), np.eye(4)), folder / f"subject{k}.nii.gz")
    return folder


def small_budget(words: list[str], volumes: Path) -> list[str]:
    """A guide command with the tiny data and budgets of a test: same command, same options, fewer steps."""
    assert words[0] == "brainfusion", f"the guide's commands are brainfusion commands: {words}"
    args = [str(volumes) if w == "/path/to/volumes" else w for w in words[1:]]
    command = args[0] if args[0] != "data" else " ".join(args[:2])
    if "--time-budget-min" in args:
        i = args.index("--time-budget-min")
        args[i:i + 2] = ["--max-steps", "4"]
    if command == "train":
        args += TINY
    elif command == "data inspect":
        args += ["--image-size", "32"]
    elif command == "sample":
        args[args.index("--n") + 1] = "4"
    elif command == "evaluate":
        args += ["--n", "8", "--image-size", "32"]
    return args


def test_the_own_data_guide_runs_as_written(tmp_path, monkeypatch, capsys):
    from brainfusion.cli import main

    commands = shell_commands(marked_block(DOCS / "guides" / "own-data.md", "own-data"))
    assert [c[1] for c in commands] == ["data", "train", "sample", "evaluate"], commands
    volumes = tiny_volumes(tmp_path / "volumes")
    monkeypatch.chdir(tmp_path)
    for words in commands:
        args = small_budget(words, volumes)
        status = main(["--quiet", *args])
        err = capsys.readouterr().err
        assert status == 0, f"brainfusion {' '.join(args)} exited {status}: {err}"
    sampler, steps = _parser_defaults("sample")
    grid = tmp_path / "runs" / "mine" / "samples" / f"{sampler}-{steps}" / "grid.png"
    assert grid.is_file(), f"no {grid.relative_to(tmp_path)}: {sorted(p.name for p in grid.parent.parent.iterdir())}"
    assert f"runs/mine/samples/{sampler}-{steps}/grid.png" in (DOCS / "guides" / "own-data.md").read_text(encoding="utf-8")
    assert (tmp_path / "montage.png").is_file()
    assert (tmp_path / "runs" / "mine" / "eval" / "metrics.json").is_file()


def test_the_readme_quickstart_runs(tmp_path, monkeypatch, make_oasis_root):
    """The README's five Python lines, on tiny data with a budget of two steps."""
    import brainfusion

    if not hasattr(brainfusion, "Pipeline"):
        pytest.skip("brainfusion has no top-level API yet")
    code = marked_block(README, "quickstart")
    assert len([line for line in code.splitlines() if line.strip()]) <= 6, "the quick-start is five lines and an import"
    assert "run = train(config)" in code and '"data/demo"' in code, code
    make_oasis_root(tmp_path / "data" / "demo", n_train=8, n_test=0, n_validate=2, size=16)
    monkeypatch.chdir(tmp_path)
    small = ("config.train.time_budget_min, config.train.max_steps, config.train.checkpoint_every = 0, 2, 2\n"
             "config.data.image_size, config.model.base_channels, config.train.batch_size = 16, 8, 4\n")
    namespace: dict = {}
    exec(compile(code.replace("run = train(config)", small + "run = train(config)"), "README.md", "exec"), namespace)  # noqa: S102
    images = namespace["images"]
    assert images.dtype == np.uint8 and images.shape == (16, 16, 16)
