"""Write docs/commands.md, the commands reference, from the Typer app itself.

    python scripts/gen_commands.py          # rewrite docs/commands.md
    python scripts/gen_commands.py --check  # exit 1 if docs/commands.md is out of date

For every command and sub-command: its usage, its help text, and a table of its arguments and options (names,
type or choices, default, help), grouped by the help panels `--help` shows. Everything is read from the click
parameter objects (`typer.main.get_command`), never from the rendered `--help`, so the page does not depend on
the terminal's width or colours. tests/cli/test_commands_reference.py fails when the page is out of date.
"""

import inspect
import re
import sys
import typing
from pathlib import Path

import typer
from rich.text import Text
from typer.core import TyperArgument

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "commands.md"
COMMAND = "python scripts/gen_commands.py"

TYPE_NAMES = {str: "text", int: "integer", float: "number", Path: "path", bool: "flag"}


def plain(help_text: str) -> str:
    """A help string as `--help` shows it (indentation removed, Rich markup such as `\\[` resolved), one line
    per paragraph."""
    text = Text.from_markup(inspect.cleandoc(help_text)).plain
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))


def escape(text: str) -> str:
    """Markdown-safe text: `<stem>` is not taken for an HTML tag, `|` does not end a table cell, and a `_` or
    `*` does not start emphasis; spans in backticks are left as they are."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        part = parts[i].replace("\\", "\\\\").replace("<", "\\<").replace(">", "\\>").replace("*", "\\*")
        parts[i] = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", part)
    return "".join(parts).replace("|", "\\|")


def code(text: str) -> str:
    return f"`{text}`"


def usage(path: list[str], command) -> str:
    pieces = [*path, "[OPTIONS]"]
    for param in command.params:
        if isinstance(param, TyperArgument):
            name = param.name.upper() + ("..." if param.nargs == -1 else "")
            pieces.append(name if param.required else f"[{name}]")
    if isinstance(command, typer.core.TyperGroup):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def names(param) -> str:
    if isinstance(param, TyperArgument):
        return code(param.name.upper() + ("..." if param.nargs == -1 else ""))
    return ", ".join(code(opt) for opt in [*param.opts, *param.secondary_opts])


def type_of(param) -> str:
    """What the parameter takes: its choices, or its type with its range; repeatable when it is."""
    annotation = param.type_descriptor.annotation
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        described = "one of " + ", ".join(code(choice) for choice in typing.get_args(annotation))
    elif param.metavar:
        described = code(param.metavar)
    else:
        described = TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    if param.min is not None and param.max is not None:
        described += f", {param.min} to {param.max}"
    elif param.min is not None:
        described += f", at least {param.min}"
    elif param.max is not None:
        described += f", at most {param.max}"
    if param.nargs == -1:
        described += ", one or more"
    elif getattr(param, "multiple", False):
        described += ", repeatable"
    return described


def default_of(param) -> str:
    """The default as `--help` states it: a described default in words, a literal value in backticks."""
    if param.required:
        return "required"
    if isinstance(param.show_default, str):
        return escape(param.show_default)
    default = param.default
    if getattr(param, "is_flag", False):
        if param.secondary_opts:
            return code(param.opts[0] if default else param.secondary_opts[0])
        return "on" if default else "off"
    if default is None or not param.show_default:
        return ""
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return code(str(default))


def meaning(param) -> str:
    text = escape(plain(param.help or "")).replace("\n\n", " ")
    if param.envvar and getattr(param, "show_envvar", False):
        text += f" Environment variable: {code(param.envvar)}."
    return text.strip()


def panels(command) -> list[tuple[str, list]]:
    """The parameters grouped by their help panel, in the order `--help` shows them: arguments, the
    panel-less options, then each named panel in the order of its first parameter."""
    groups: dict[str, list] = {"Arguments": [], "Options": []}
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        panel = param.rich_help_panel or ("Arguments" if isinstance(param, TyperArgument) else "Options")
        groups.setdefault(panel, []).append(param)
    return [(name, params) for name, params in groups.items() if params]


def anchor(path: list[str]) -> str:
    return "-".join(path)


def section(path: list[str], command) -> list[str]:
    lines = [f"## {' '.join(path)}", "", f"Usage: {code(usage(path, command))}", ""]
    for paragraph in plain(command.help or "").split("\n\n"):
        lines += [escape(paragraph), ""]
    if isinstance(command, typer.core.TyperGroup):
        lines += ["| command | what it does |", "|---|---|"]
        for name, sub in command.commands.items():
            first = plain(sub.help or "").split("\n\n")[0]
            lines.append(f"| [{code(' '.join([*path, name]))}](#{anchor([*path, name])}) | {escape(first)} |")
        lines.append("")
    for panel, params in panels(command):
        kind = "argument" if all(isinstance(p, TyperArgument) for p in params) else "option"
        lines += [f"**{panel}**", "", f"| {kind} | takes | default | meaning |", "|---|---|---|---|"]
        lines += [f"| {names(p)} | {type_of(p)} | {default_of(p)} | {meaning(p)} |" for p in params]
        lines.append("")
    return lines


def walk(path: list[str], command):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk([*path, name], sub)


def render() -> str:
    """The whole page, as a string; the same on every machine and terminal."""
    from qimg.cli.app import app

    root = typer.main.get_command(app)
    commands = list(walk(["qimg"], root))
    lines = [
        "# Commands reference",
        "",
        f"<!-- Generated from the Typer app by `{COMMAND}`; do not edit by hand. -->",
        "",
        "What each command's `--help` prints, on one page. Options are grouped as `--help` groups them, and every",
        "command also takes `--help`. The options the model commands share are explained with their",
        "topic: [generating and editing](editing.md), [models and weight files](models.md), [LoRAs](loras.md),",
        "[scaling out](scaling.md), [performance](performance.md), [exit codes](exit-codes.md).",
        "",
    ]
    lines += [f"- [{code(' '.join(path))}](#{anchor(path)})" for path, _ in commands]
    lines.append("")
    for path, command in commands:
        lines += section(path, command)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    page = render()
    if argv == ["--check"]:
        if PAGE.exists() and PAGE.read_text(encoding="utf-8") == page:
            return 0
        print(f"{PAGE.relative_to(ROOT)} is out of date: run {COMMAND} to update it", file=sys.stderr)
        return 1
    if argv:
        print(f"usage: {COMMAND} [--check]", file=sys.stderr)
        return 2
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
