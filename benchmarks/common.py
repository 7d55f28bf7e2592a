"""Shared by the benchmark scripts: a model to run when none is given."""

import sys
from pathlib import Path


def build_tiny_model(folder: Path) -> Path:
    """The tests' tiny random-weight checkpoint: it exercises every code path but judges no quality."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(folder)
