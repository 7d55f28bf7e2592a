"""Output files: choosing a name that clobbers nothing, checking a folder is writable, atomic saves."""

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import QimgError, UsageError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def read_image(path: Path, what: str = "image") -> Image.Image:
    """The first frame of an image file, upright (EXIF orientation applied), fully decoded; any failure is
    a UsageError naming the file as `what` (image, mask)."""
    try:
        with Image.open(path) as img:
            upright = ImageOps.exif_transpose(img)
            upright.load()
            return upright
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a folder") from None
    except UnidentifiedImageError:
        raise UsageError(f"{what} {path} is not an image file Pillow can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UsageError(f"{what} {path}: cannot read it as an image ({e})") from None


def load_image(path: Path) -> tuple[np.ndarray, Image.Image]:
    """An input image as uint8 RGB (H, W, 3), and the upright PIL image (which keeps any alpha channel for
    the caller to read as a mask)."""
    upright = read_image(path)
    if upright.mode.startswith("I;16") or upright.mode == "I":  # 16-bit greyscale: keep the top 8 bits
        grey = (np.asarray(upright).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), upright
    return np.asarray(upright.convert("RGB")), upright


def default_output(stem: str, folder: Path = Path(".")) -> Path:
    """`stem.png`, or `stem-2.png`, `stem-3.png`... whichever does not exist yet."""
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.png"
    return path


def check_output(path: Path) -> None:
    """Refuse, before any work is done, an output that could not be written."""
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"--out {path}: unknown image format {path.suffix or '(none)'}; use {', '.join(FORMATS)}")
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file name")
    folder = path.parent
    while not folder.exists():  # missing folders are created at save time, if their parent allows it
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: folder {folder} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"--out {path}: file is not writable")


def save_image(image: Image.Image, path: Path, text: dict[str, str] | None = None) -> None:
    """Write to a temporary file beside `path` and rename it into place: readers (and a crash) see either
    the old file or the complete new one, never a partial image."""
    fmt = FORMATS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if fmt == "PNG":
                info = PngImagePlugin.PngInfo()
                for key, value in (text or {}).items():
                    info.add_itxt(key, value)
                image.save(f, format=fmt, pnginfo=info)
            else:
                image.save(f, format=fmt, quality=95)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise QimgError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
