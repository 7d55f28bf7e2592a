"""Image files: reading any input Pillow knows as plain pixels, choosing an output name that clobbers nothing,
checking a folder is writable, atomic saves."""

import errno
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import OutputExists, QimgError, QimgWarning, UsageError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# Inputs larger than this are refused from their header, before a byte is decoded (a decompression bomb
# is a small file claiming a huge size). 128 MP covers 100 MP medium-format photos; the masks and the
# compositing of such an image take ~50 bytes a pixel.
MAX_INPUT_PIXELS = 128 * 2**20
TEMP_PREFIX = ".qimg-"  # temporary outputs: `.qimg-<name>.<random>.tmp` beside the final file


def read_image(path: Path, what: str = "image") -> Image.Image:
    """The first frame of an image file, upright (EXIF orientation applied), fully decoded; any failure is
    a UsageError naming the file as `what` (image, mask)."""
    try:
        with warnings.catch_warnings(record=True) as caught:  # Pillow warns about damaged files: one line each
            warnings.simplefilter("always")
            with Image.open(path) as img:
                check_pixels(img.size, f"{what} {path}")
                animated = getattr(img, "is_animated", False)
                upright = ImageOps.exif_transpose(img)
                upright.load()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a folder") from None
    except PermissionError:
        raise UsageError(f"{what} {path}: permission denied") from None
    except UnidentifiedImageError:
        if path.is_file() and path.stat().st_size == 0:  # a device such as /dev/zero says 0 bytes too
            raise UsageError(f"{what} {path} is empty (0 bytes)") from None
        raise UsageError(f"{what} {path} is not an image file Pillow can read") from None
    except Image.DecompressionBombError:  # over Pillow's own limit, which is above ours: refused unread
        raise UsageError(f"{what} {path} claims a size over {MAX_INPUT_PIXELS / 1e6:.0f} megapixels; "
                         "qimg does not read it (a damaged or hostile file?)") from None
    except (OSError, ValueError, SyntaxError) as e:  # Pillow says SyntaxError for a broken PNG chunk
        raise UsageError(f"{what} {path}: cannot read it as an image ({type(e).__name__}: {e})") from None
    for w in caught:
        if not issubclass(w.category, Image.DecompressionBombWarning):  # check_pixels has said it better
            warnings.warn(f"{what} {path}: {w.message}", QimgWarning, stacklevel=2)
    if animated:
        warnings.warn(f"{what} {path} is animated; using its first frame", QimgWarning, stacklevel=2)
    return upright


def check_pixels(size: tuple[int, int], what: str, fix: str = "downscale it first") -> None:
    """Refuse an image (or a canvas about to be made) over MAX_INPUT_PIXELS, naming its size."""
    width, height = size
    if width * height > MAX_INPUT_PIXELS:
        raise UsageError(f"{what} is {width}x{height} = {width * height / 1e6:,.0f} megapixels; qimg works on "
                         f"images up to {MAX_INPUT_PIXELS / 1e6:.0f} megapixels ({fix})")


def grey_fraction(img: Image.Image) -> np.ndarray | None:
    """A high-depth greyscale image as float32 (H, W) in [0, 1], or None for any other mode (8-bit modes
    convert exactly with Pillow; these do not: Pillow clips 16-bit values to 255)."""
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit PNG/TIFF/PGM greyscale (Pillow may say "I")
        return np.clip(np.asarray(img).astype(np.float32) / 65535, 0, 1)
    if img.mode == "F":  # float images are taken as already in [0, 1]
        return np.clip(np.asarray(img, dtype=np.float32), 0, 1)
    return None


def load_image(path: Path) -> tuple[np.ndarray, Image.Image]:
    """An input image as uint8 RGB (H, W, 3), and the upright PIL image (which keeps any alpha channel for
    the caller to read as a mask). CMYK, palette, greyscale, 16-bit and float images are converted."""
    upright = read_image(path)
    grey = grey_fraction(upright)
    if grey is not None:
        return np.repeat(np.round(grey * 255).astype(np.uint8)[..., None], 3, axis=2), upright
    try:
        return np.asarray(upright.convert("RGB")), upright
    except ValueError:
        raise UsageError(f"image {path} has colour mode {upright.mode}, which qimg cannot convert; "
                         "save it as RGB") from None


def default_output(stem: str, folder: Path = Path("."), numbered: bool = True) -> Path:
    """`stem.png`, or (`numbered`) `stem-2.png`, `stem-3.png`... whichever does not exist yet."""
    path, n = folder / f"{stem}.png", 1
    while numbered and path.exists():
        n += 1
        path = folder / f"{stem}-{n}.png"
    return path


def check_output(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = (),
                 read_only: tuple[Path, ...] = (), what: str = "--out") -> None:
    """Refuse, before any work is done, an output that could not be written, or that exists and may not be
    replaced: without `overwrite`, qimg never replaces a file (an input least of all); files in `read_only`
    (masks, chain files) are never replaced at all. `what` names the output in messages."""
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"{what} {path}: unknown image format {path.suffix or '(none)'}; use {', '.join(FORMATS)}")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    folder = path.parent
    while not folder.exists():  # missing folders are created at save time, if their parent allows it
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: folder {folder} is not writable")
    if not path.exists():
        return
    if _same_file(path, read_only):
        raise UsageError(f"{what} {path} is a file this run reads (a mask or a chain file), which qimg never "
                         "replaces; choose another name")
    if overwrite:
        return
    if _same_file(path, inputs):
        raise UsageError(f"{what} {path} is the input image; pass --overwrite to replace it")
    raise UsageError(f"{what} {path} exists; pass --overwrite to replace it, or choose another name")


def _same_file(path: Path, others) -> bool:
    return any(p is not None and Path(p).exists() and path.samefile(p) for p in others)


def save_image(image: Image.Image, path: Path, text: dict[str, str] | None = None, overwrite: bool = False) -> None:
    """Write to a temporary file beside `path`, fsync it and rename it into place: readers, a crash, a
    signal or a full disk leave either the old file or the complete new one, never a partial image.
    Without `overwrite` a file at `path` is never replaced, even one that appeared while qimg worked."""
    fmt = FORMATS[path.suffix.lower()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise QimgError(write_error(path, e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if fmt == "PNG":
                info = PngImagePlugin.PngInfo()
                for key, value in (text or {}).items():
                    info.add_itxt(key, value)
                image.save(f, format=fmt, pnginfo=info)
            else:
                image.save(f, format=fmt, quality=95)
            os.fchmod(f.fileno(), _mode(path))  # mkstemp makes 0600
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise QimgError(write_error(path, e)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


# errnos of file systems that have no hard links (FAT, some network and FUSE mounts)
NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    """Move the complete temporary file to `path`. Without `overwrite` it is hard-linked there, which fails if
    `path` exists, so no check-then-rename window lets a file that appeared meanwhile be replaced."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno not in NO_LINKS:
            raise
        if not path.exists():  # no hard links here: check, then rename (a window of microseconds)
            os.replace(tmp, path)
            return
    else:
        os.unlink(tmp)
        return
    raise OutputExists(f"{path} appeared while qimg was working; it was kept (pass --overwrite to replace it)")


def write_error(path: Path, e: OSError) -> str:
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"cannot write {path}: {reason}; free some space or choose another --out folder"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {reason}; choose another --out folder"
    return f"cannot write {path}: {reason}"


def _mode(path: Path) -> int:
    """The permissions a saved file gets: those of the file it replaces, else 0666 minus the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mask = os.umask(0o022)
        os.umask(mask)
        return 0o666 & ~mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; best effort (some file systems cannot open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
