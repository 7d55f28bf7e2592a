"""The cache's folder and what in it the store may touch: a folder is the store's only when it carries qimg's
CACHEDIR.TAG (`claim` marks one it creates), and what stands at an entry's path is removed never through a
symbolic link and never as a folder with files in it. cache.py's Store works through these alone.
"""

import os
import stat
from pathlib import Path

from qimg.small_files import NONBLOCK

TAG = "CACHEDIR.TAG"
SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
TAG_TEXT = f"{SIGNATURE}\n# This file marks a cache folder created by qimg; qimg only ever deletes its own entries.\n"
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def owned(folder: Path) -> bool:
    """Whether folder holds qimg's CACHEDIR.TAG (a regular file, not a link to one)."""
    try:
        fd = os.open(folder / TAG, os.O_RDONLY | NOFOLLOW | NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        text = f.read(512) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    return text.startswith(SIGNATURE.encode()) and b"qimg" in text


def claim(folder: Path, create: bool) -> Path | None:
    """The folder entries live in: `folder` when it carries qimg's CACHEDIR.TAG, else `folder/qimg` when that
    does; with create, else the first of them that is missing or empty, created and marked. None when
    neither is qimg's (a folder of other files is never used as is: its files are not the store's to delete)."""
    for root in (folder, folder / "qimg"):
        if owned(root):
            return root
        empty_dir = root.is_dir() and not root.is_symlink() and not any(root.iterdir())
        if create and (not os.path.lexists(root) or empty_dir):
            root.mkdir(parents=True, exist_ok=True)
            (root / TAG).write_text(TAG_TEXT)
            return root
    return None


def remove(path: Path) -> str:
    """Remove what stands at an entry's path, never through a link (a link: the link only) and never a folder
    with anything in it; says what happened."""
    try:
        os.unlink(path)
    except IsADirectoryError:
        try:
            os.rmdir(path)
        except OSError:
            return "left alone (a folder with files in it)"
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"not removed ({e.strerror})"
    return "removed"


def real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
