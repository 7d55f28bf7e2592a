"""An install carries every package of the tree: pyproject.toml lists its packages by hand (presets are mapped from
the top level), so a new package that is not listed works in an editable install and is missing from a wheel."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_tree_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "qimg").rglob("__init__.py")}
    assert tree - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - tree == {"qimg.presets"}  # the bundled presets, mapped from presets/ (package-dir)
