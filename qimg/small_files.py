"""Reading a file that is meant to be small (a preset, a chain, a prompts file) without trusting its size. Light
on purpose, unlike images.py (numpy, Pillow): cli/presets.py reads through it, and `qimg presets` stays quick."""

from pathlib import Path

from qimg.errors import UsageError


def read_small(path: Path, what: str, limit: int, folder_fix: str = "", over_fix: str = ", the limit") -> bytes:
    """The bytes of `path`, reading at most `limit` + 1 of them so a path to /dev/zero or a huge file cannot
    exhaust memory. Any problem is one UsageError naming the file as `what`; `folder_fix` and `over_fix` end
    the folder's and the size's lines (what to give instead)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a folder{folder_fix}") from None
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is over {limit} bytes{over_fix}")
    return data
