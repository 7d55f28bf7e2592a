"""docs/commands.md is generated from the Typer app (scripts/gen_commands.py) and must match it."""

import importlib.util
from pathlib import Path

import typer

from qimg.cli.app import app

ROOT = Path(__file__).resolve().parents[2]


def generator():
    spec = importlib.util.spec_from_file_location("gen_commands", ROOT / "scripts" / "gen_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_commands_reference_is_current():
    page = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    assert page == generator().render(), "run python scripts/gen_commands.py to update docs/commands.md"


def test_every_command_and_option_has_its_row():
    gen = generator()
    page = gen.render()
    for path, command in gen.walk(["qimg"], typer.main.get_command(app)):
        heading = f"## {' '.join(path)}\n"
        assert heading in page
        section = page.split(heading, 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            assert f"| {gen.names(param)} |" in section, (path, param.name)
