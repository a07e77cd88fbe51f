"""Write docs/reference/cli.md and docs/reference/python.md from the code, so that neither can drift.

    .venv/bin/python docs/reference/generate.py          # rewrite both files
    .venv/bin/python docs/reference/generate.py --check  # exit 1 if either is out of date

cli.md walks `brainfusion.cli.make_parser()`: every command and sub-command, its help, a usage line and a table
of its options (flags, default, help). python.md holds the signatures and docstrings of the public Python API:
the names of `brainfusion.__all__` where the package defines it, else a fixed list. The output depends on the
code alone (no dates, no terminal width, no memory addresses), so two runs write the same bytes; tests/test_docs.py
checks that the files in the repository are what this script writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI_MD = HERE / "cli.md"
PYTHON_MD = HERE / "python.md"
REGENERATE = ".venv/bin/python docs/reference/generate.py"
USAGE_WIDTH = 100

# The public API until `brainfusion/__init__.py` defines `__all__`: (module, name)
FALLBACK_API = (
    ("brainfusion.diffusion.pipeline", "Pipeline"),
    ("brainfusion.config", "RunConfig"),
    ("brainfusion.training.train", "train"),
    ("brainfusion.diffusion.sample", "generate"),
    ("brainfusion.diffusion.sample", "SampleConfig"),
    ("brainfusion.export.hub", "export_run"),
    ("brainfusion.export.hub_pipeline", "BrainfusionPipeline"),
)


def _cell(text: str) -> str:
    """Text for one markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _escape_html(text: str) -> str:
    """Help text as markdown prose: `<run>` would otherwise be read as an HTML tag and vanish."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _no_addresses(text: str) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def _config_defaults() -> dict[str, dict[str, object]]:
    """For the commands whose flags map onto config keys: {command: {dest: (key, default)}}."""
    try:
        from brainfusion import cli
        from brainfusion.config import AutoencoderRunConfig, RunConfig
    except ImportError:  # pragma: no cover - the generator still writes the parser's own defaults
        return {}

    def resolve(flags: dict, config) -> dict:
        raw = config.to_dict()
        out = {}
        for dest, (key, _kind, _help) in flags.items():
            section, field = key.split(".")
            if section in raw and field in raw[section]:
                out[dest] = (key, raw[section][field])
            else:
                out[dest] = (key, None)
        return out

    return {"train": resolve(getattr(cli, "TRAIN_FLAGS", {}), RunConfig()),
            "train-autoencoder": resolve(getattr(cli, "AUTOENCODER_FLAGS", {}), AutoencoderRunConfig())}


def _format_default(value) -> str:
    if value is None or value is argparse.SUPPRESS or value == "" or value is False:
        return "–"
    if value is True:
        return "on"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "–"
    return f"`{value}`"


def _subcommands(parser: argparse.ArgumentParser):
    """(name, help, subparser) of each sub-command, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name) or "", sub


def _option_usage(action: argparse.Action) -> str:
    flag = action.option_strings[-1] if action.option_strings else (action.metavar or action.dest)
    if not action.option_strings:
        return flag
    if action.nargs == 0:
        return flag
    metavar = action.metavar or action.dest.upper()
    if action.nargs == "?":
        return f"{flag} [{metavar}]"
    if action.nargs in ("+", "*"):
        return f"{flag} {metavar} [{metavar} ...]"
    return f"{flag} {metavar}"


def _usage(prog: str, parser: argparse.ArgumentParser) -> str:
    parts = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or isinstance(action, argparse._SubParsersAction):
            continue
        text = _option_usage(action)
        parts.append(text if action.required or not action.option_strings else f"[{text}]")
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        parts.append("{" + ",".join(name for name, _h, _s in _subcommands(parser)) + "} ...")
    lines, line = [], prog
    for part in parts:
        if len(line) + 1 + len(part) > USAGE_WIDTH and line.strip():
            lines.append(line)
            line = " " * (len(prog)) + " " + part
        else:
            line = f"{line} {part}"
    lines.append(line)
    return "\n".join(lines)


def _options_table(command: str, parser: argparse.ArgumentParser, config_defaults: dict) -> list[str]:
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if not actions:
            continue
        title = group.title or ""
        if title not in ("options", "optional arguments", "positional arguments"):
            out += [f"*{title}*", ""]
        out += ["| option | default | description |", "|---|---|---|"]
        for action in actions:
            if action.option_strings:
                suffix = _option_usage(action)[len(action.option_strings[-1]):]
                flags = ", ".join(f"`{s}{suffix}`" for s in action.option_strings)
            else:
                flags = f"`{_option_usage(action)}`"
            default = action.default
            help_text = action.help or ""
            if help_text and "%(" in help_text:
                help_text = help_text % {**vars(action), "prog": parser.prog}
            key_default = config_defaults.get(command, {}).get(action.dest)
            if key_default is not None:
                key, value = key_default
                default = value if default is None else default
                help_text = f"{help_text} (config `{key}`)" if help_text else f"config `{key}`"
            if action.required:
                default_text = "required"
            elif action.nargs == 0:  # a switch: off unless given
                default_text = "–"
            else:
                default_text = _format_default(default)
            if action.choices and not isinstance(action, argparse._SubParsersAction):
                help_text = f"{help_text}; one of {', '.join(f'`{c}`' for c in action.choices)}".lstrip("; ")
            out.append(f"| {_cell(flags)} | {_cell(default_text)} | {_cell(_escape_html(help_text))} |")
        out.append("")
    return out


def cli_markdown() -> str:
    """docs/reference/cli.md as a string."""
    from brainfusion.cli import make_parser

    parser = make_parser()
    config_defaults = _config_defaults()
    lines = [
        "# Command-line reference",
        "",
        f"<!-- generated by docs/reference/generate.py from brainfusion.cli.make_parser(); do not edit: run {REGENERATE} -->",
        "",
        f"`{parser.prog}`: {parser.description or ''} Every command takes `--help`; a flag of `train` or",
        "`train-autoencoder` left out keeps the value of `--config` (or the default shown, the `edm` recipe's).",
        "Bad input exits with status 2 and one sentence naming the file or option.",
        "",
        "```",
        _usage(parser.prog, parser),
        "```",
        "",
    ]
    lines += _options_table("", parser, {})

    def walk(prefix: str, sub_parser: argparse.ArgumentParser, depth: int):
        for name, help_text, child in _subcommands(sub_parser):
            command = f"{prefix} {name}".strip()
            lines.extend([f"{'#' * depth} brainfusion {command}", ""])
            if help_text:
                lines.extend([_escape_html(help_text[0].upper() + help_text[1:] + ("" if help_text.endswith(".") else ".")), ""])
            lines.extend(["```", _usage(f"brainfusion {command}", child), "```", ""])
            if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                rest = [a for a in child._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
                if rest:
                    lines.extend(_options_table(command, child, config_defaults))
                walk(command, child, depth + 1)
            else:
                lines.extend(_options_table(command, child, config_defaults))

    walk("", parser, 2)
    return _no_addresses("\n".join(lines).rstrip() + "\n")


# --------------------------------------------------------------------------------------------
# The Python API
# --------------------------------------------------------------------------------------------


def public_api() -> list[tuple[str, object]]:
    """(import path, object) of every public name, in `__all__`'s order or the fallback list's."""
    try:
        package = importlib.import_module("brainfusion")
    except ImportError:  # pragma: no cover
        package = None
    names = getattr(package, "__all__", None) if package is not None else None
    if names:
        return [(f"brainfusion.{name}", getattr(package, name)) for name in names]
    api = []
    for module, name in FALLBACK_API:
        api.append((f"{module}.{name}", getattr(importlib.import_module(module), name)))
    return api


class _Annotation:
    """An annotation kept as the source wrote it (`from __future__ import annotations` makes them strings)."""

    def __init__(self, text: str):
        self.text = text.strip("'\"")

    def __repr__(self) -> str:
        return self.text


def _signature(obj, method: bool = False) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"

    def plain(annotation):
        return _Annotation(annotation) if isinstance(annotation, str) else annotation

    params = [p.replace(annotation=plain(p.annotation)) for p in sig.parameters.values()]
    if method and params and params[0].name in ("self", "cls"):
        params = params[1:]
    sig = sig.replace(parameters=params, return_annotation=plain(sig.return_annotation))
    return _no_addresses(str(sig))


def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    # a dataclass without a docstring gets its own signature as __doc__: not worth repeating
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "("):
        return ""
    return doc


def _dataclass_fields(cls, heading: str) -> list[str]:
    out = [heading, "", "| field | type | default |", "|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(value):
                nested.append((f.name, type(value)))
                default = f"`{type(value).__name__}()`"
                out.append(f"| `{f.name}` | {_cell(f.type if isinstance(f.type, str) else getattr(f.type, '__name__', f.type))} | {default} |")
                continue
            default = repr(value)
        else:
            default = "required"
        if not default.startswith("`") and default != "required":
            default = f"`{default}`"
        type_text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(f"| `{f.name}` | {_cell(type_text)} | {_cell(_no_addresses(default))} |")
    out.append("")
    for name, nested_cls in nested:
        doc = _doc(nested_cls)
        out += _dataclass_fields(nested_cls, f"**`{name}`** (`{nested_cls.__name__}`){': ' + doc.splitlines()[0] if doc else ''}")
    return out


def _members(cls) -> list[tuple[str, object]]:
    members = []
    for name, value in cls.__dict__.items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(value, (classmethod, staticmethod)):
            members.append((name, value.__func__))
        elif isinstance(value, property) or inspect.isfunction(value):
            members.append((name, value))
    return members


def python_markdown() -> str:
    """docs/reference/python.md as a string."""
    api = public_api()
    lines = [
        "# Python reference",
        "",
        f"<!-- generated by docs/reference/generate.py from the docstrings; do not edit: run {REGENERATE} -->",
        "",
        "The public Python API, from the code's own docstrings. How to use it: the",
        "[README's quick-start](../../README.md#python) and the [guides](../README.md#guides).",
        "",
    ]
    lines += [f"* [`{path}`](#{path.replace('.', '').lower()})" for path, _obj in api]
    lines.append("")
    for path, obj in api:
        kind = "class" if inspect.isclass(obj) else "function"
        lines += [f"## `{path}`", ""]
        name = path.rsplit(".", 1)[1]
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            header = f"class {name}({', '.join(base.__name__ for base in obj.__bases__)})"
        else:
            header = f"{kind} {name}{_signature(obj)}"
        lines += ["```python", header, "```", ""]
        doc = _doc(obj)
        if doc:
            lines += [doc, ""]
        if inspect.isclass(obj):
            if dataclasses.is_dataclass(obj):
                lines += _dataclass_fields(obj, "Fields:")
            for name, member in _members(obj):
                if isinstance(member, property):
                    lines += [f"### `{path.rsplit('.', 1)[1]}.{name}` (property)", ""]
                    member_doc = inspect.getdoc(member) or ""
                else:
                    lines += [f"### `{path.rsplit('.', 1)[1]}.{name}`", "", "```python", f"{name}{_signature(member, method=True)}", "```", ""]
                    member_doc = inspect.getdoc(member) or ""
                if member_doc:
                    lines += [member_doc, ""]
    return _no_addresses("\n".join(lines).rstrip() + "\n")


# --------------------------------------------------------------------------------------------


def outputs() -> dict[Path, str]:
    return {CLI_MD: cli_markdown(), PYTHON_MD: python_markdown()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/reference/cli.md and python.md from the code.")
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path.relative_to(HERE.parent.parent)}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
