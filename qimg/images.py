"""Image files: reading any input Pillow knows as plain pixels (and a mask file, or an input's transparency, as
mask values), checking an output can be written (and clobbers nothing), atomic saves. What outputs are called
is jobs/names.py's."""

import errno
import os
import re
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from qimg.errors import OutputExists, QimgError, QimgWarning, UsageError
from qimg.option_values import MAX_INPUT_PIXELS, check_pixels

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
PREVIEW_CHUNK = "qimg-preview"  # the PNG text chunk marking a --preview file: "step/steps", or "result"
TEMP_PREFIX = ".qimg-"  # temporary outputs: `.qimg-<name>.<pid>-<random>.tmp` beside the final file
STALE_TEMP_SECONDS = 15 * 60  # a temp file this old is stale even if its pid is alive (a reused pid)
# The largest side each format can hold; PNG's (2**31 - 1) is far beyond MAX_INPUT_PIXELS.
MAX_SIDE = {"JPEG": 65500, "WEBP": 16383}


@contextmanager
def text_chunks_up_to(limit: int):
    """Let Pillow decompress PNG text chunks up to `limit` bytes each while inside: an input's 1.5 MB XMP
    packet is no reason to refuse its pixels (Pillow's own limit is 1 MB)."""
    before = PngImagePlugin.MAX_TEXT_CHUNK
    PngImagePlugin.MAX_TEXT_CHUNK = limit
    try:
        yield
    finally:
        PngImagePlugin.MAX_TEXT_CHUNK = before


def read_image(path: Path, what: str = "image") -> Image.Image:
    """The first frame of an image file, upright (EXIF orientation applied), fully decoded; any failure is
    a UsageError naming the file as `what` (image, mask)."""
    try:
        with warnings.catch_warnings(record=True) as caught:  # Pillow warns about damaged files: one line each
            warnings.simplefilter("always")
            with Image.open(path) as img:
                check_pixels(img.size, f"{what} {path}")
                animated = getattr(img, "is_animated", False)
                upright = ImageOps.exif_transpose(_rounded_16_bit(img, path))
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


# Pillow reads a 16-bit RGB(A) PNG as 8-bit by keeping each sample's high byte; read little-endian, the same
# samples give their low bytes.
LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


def _rounded_16_bit(img: Image.Image, path: Path) -> Image.Image:
    """A 16-bit RGB(A) PNG as 8 bits rounded, round(v / 257) as for 16-bit greyscale, instead of Pillow's
    high byte (v >> 8): its low bytes are decoded a second time and combined. Any other image as it is."""
    tile = img.tile[0] if img.format == "PNG" and len(img.tile) == 1 else None
    if tile is None or not isinstance(tile.args, str) or tile.args not in LOW_BYTES:
        return img
    with Image.open(path) as low:
        low.tile = [tile._replace(args=LOW_BYTES[tile.args])]
        v = np.asarray(img).astype(np.uint32) * 256 + np.asarray(low)
    rounded = Image.fromarray(((v + 128) // 257).astype(np.uint8), img.mode)
    rounded.info = dict(img.info)  # its EXIF orientation and text chunks
    return rounded


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
    the caller to read as a mask). CMYK, palette, greyscale, 16-bit and float images are converted. Its text
    chunks may be as large as Pillow allows all of them together (`qimg info` keeps the 1 MB limit)."""
    with text_chunks_up_to(PngImagePlugin.MAX_TEXT_MEMORY):
        upright = read_image(path)
    grey = grey_fraction(upright)
    if grey is not None:
        return np.repeat(np.round(grey * 255).astype(np.uint8)[..., None], 3, axis=2), upright
    try:
        return np.asarray(upright.convert("RGB")), upright
    except ValueError:
        raise UsageError(f"image {path} has colour mode {upright.mode}, which qimg cannot convert; "
                         "save it as RGB") from None


def read_mask(path: Path) -> np.ndarray:
    """A mask file's values, float32 (H, W) in [0, 1]: white regenerates, black keeps, grey blends.

    A mask with real transparency uses its alpha instead, transparent = regenerate (OpenAI's image-edit
    convention); an alpha channel that is opaque everywhere is ignored, because people save black-and-white
    masks as RGBA. The EXIF orientation is applied, as it must be for the image, so both are compared upright.
    """
    img = read_image(path, "mask")
    alpha = _alpha(img)
    if alpha is not None and alpha.min() < 255:
        return 1 - alpha.astype(np.float32) / 255
    grey = grey_fraction(img)
    if grey is not None:
        return grey
    return np.asarray(img.convert("L"), dtype=np.float32) / 255  # Pillow's luma: ITU-R 601


def alpha_mask(image: Image.Image) -> np.ndarray | None:
    """For an input image with transparent pixels, the mask 1 - alpha (transparent = regenerate); else None."""
    alpha = _alpha(image)
    if alpha is None or alpha.min() == 255:
        return None
    return 1 - alpha.astype(np.float32) / 255


def _alpha(img: Image.Image) -> np.ndarray | None:
    """The alpha channel as uint8 (H, W), or None when the image has none (palette transparency counts)."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        return np.asarray(img.convert("RGBA").getchannel("A"))
    return None


def check_output(path: Path, overwrite: bool = False, inputs: tuple[Path, ...] = (),
                 read_only: tuple[Path, ...] = (), what: str = "--out", size: tuple[int, int] | None = None) -> None:
    """Refuse, before any work is done, an output that could not be written, or that exists and may not be
    replaced: without `overwrite`, qimg never replaces a file (an input least of all); files in `read_only`
    (masks, chain files) are never replaced at all; a symlink that leads nowhere is never written through.
    `size` (width, height), when known, must fit the format. `what` names the output in messages."""
    check_writable(path, what, size)
    if not path.exists():
        return
    if _same_file(path, read_only):
        raise UsageError(f"{what} {path} is a file this run reads (a mask, a --ref picture or a chain file), "
                         "which qimg never replaces; choose another name")
    if overwrite:
        return
    if _same_file(path, inputs):
        raise UsageError(f"{what} {path} is the input image; pass --overwrite to replace it")
    raise UsageError(f"{what} {path} exists; pass --overwrite to replace it, or choose another name")


def check_writable(path: Path, what: str, size: tuple[int, int] | None = None) -> None:
    """Refuse an image file that could not be written: an unknown format, a size it cannot hold, a folder,
    a symlink that leads nowhere, a folder that cannot be."""
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"{what} {path}: unknown image format {path.suffix or '(none)'}; use {', '.join(FORMATS)}")
    if size is not None:
        check_format_size(path, size, what)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{what} {path} is a symlink to {os.readlink(path)}, which does not exist or loops; "
                         "remove the link or choose another name")
    check_folder(path.parent, f"{what} {path}: folder")


def check_preview(path: Path, taken: dict, overwrite: bool = False, what: str = "--preview") -> None:
    """Refuse, before any work is done, a preview file that could not be written, that names a file the run
    reads or writes otherwise (`taken` maps those paths, None: none, to how messages name them: "the output"),
    or that exists and was not written as a preview (PREVIEW_CHUNK), unless `overwrite`. Previews are PNGs:
    they keep the pixels exactly and carry the mark, so an earlier run's preview is replaced without asking."""
    if path.suffix.lower() != ".png":
        raise UsageError(f"{what} {path}: previews are PNG files; name it .png")
    check_writable(path, what)
    for other, name in taken.items():
        if other is not None and os.path.realpath(other) == os.path.realpath(path):
            raise UsageError(f"{what} {path} is {name}; name the preview another file")
    if not overwrite and os.path.lexists(path) and not is_preview(path):
        raise UsageError(f"{what} {path} exists and is not a qimg preview; pass --overwrite to replace it, or "
                         "choose another name")


def is_preview(path: Path) -> bool:
    """Whether `path` is a PNG qimg wrote as a --preview (its mark is read from the header, no pixel decoded)."""
    if not path.is_file():  # a FIFO or a device would block or never end
        return False
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and PREVIEW_CHUNK in image.info
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def check_format_size(path: Path, size: tuple[int, int], what: str = "--out") -> None:
    """Refuse an output larger than its format can hold, before the work that would make it."""
    limit = MAX_SIDE.get(FORMATS[path.suffix.lower()])
    if limit is not None and max(size) > limit:
        raise UsageError(f"{what} {path}: {size[0]}x{size[1]} is over the {limit} pixels a side "
                         f"{path.suffix.lower()} can hold; write a .png")


def check_alpha_format(path: Path, background, what: str = "--out") -> None:
    """Refuse a JPEG output of a transparent (RGBA) result unless --background flattens it, before any work."""
    if background is None and FORMATS[path.suffix.lower()] == "JPEG":
        raise UsageError(f"{what} {path}: JPEG has no transparency and this model makes RGBA images; give "
                         "--background COLOR (e.g. white) to flatten them, or write a .png or .webp")


def flatten(image: np.ndarray, background: tuple[int, int, int] | None) -> np.ndarray:
    """An (H, W, 4) uint8 image composited over an opaque `background` colour, (H, W, 3); as it is with none, or
    when it has no alpha."""
    if background is None or image.shape[2] != 4:
        return image
    under = Image.new("RGBA", image.shape[1::-1], (*background, 255))
    return np.asarray(Image.alpha_composite(under, Image.fromarray(image, "RGBA")).convert("RGB"))


def check_folder(folder: Path, what: str) -> None:
    """Refuse an output folder that cannot be: one whose nearest existing part is a symlink that leads
    nowhere (dangling or a loop), a file, or not writable. Missing folders are created at save time."""
    while not os.path.lexists(folder):
        folder = folder.parent
    if folder.is_symlink() and not folder.exists():
        raise UsageError(f"{what} {folder} is a symlink to {os.readlink(folder)}, which does not exist or loops; "
                         "create its target or choose another folder")
    if not folder.is_dir():
        raise UsageError(f"{what} {folder} is a file, not a folder; choose another folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {folder} is not writable")


def _same_file(path: Path, others) -> bool:
    return any(p is not None and Path(p).exists() and path.samefile(p) for p in others)


def save_image(image: Image.Image, path: Path, text: dict[str, str] | None = None, overwrite: bool = False,
               next_free=None, fast: bool = False) -> Path:
    """Write to a temporary file beside `path`, fsync it and rename it into place: readers, a crash, a
    signal or a full disk leave either the old file or the complete new one, never a partial image.
    Without `overwrite` a file at `path` is never replaced, even one that appeared while qimg worked; then
    `next_free()`, if given (a default numbered name), names the file to try instead. Returns where the
    image went. Temporary files a killed qimg left for this name are removed first (`remove_stale_temps`).
    `fast`: the quickest PNG compression (previews: about 5x faster to write a megapixel, 10-15% larger)."""
    fmt = FORMATS[path.suffix.lower()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.{os.getpid()}-", suffix=".tmp",
                                   dir=path.parent)
    except OSError as e:
        raise QimgError(write_error(path, e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if fmt == "PNG":
                info = PngImagePlugin.PngInfo()
                for key, value in (text or {}).items():
                    info.add_itxt(key, value)
                image.save(f, format=fmt, pnginfo=info, **({"compress_level": 1} if fast else {}))
            else:
                image.save(f, format=fmt, quality=95)
            os.fchmod(f.fileno(), _mode(path))  # mkstemp makes 0600
            f.flush()
            os.fsync(f.fileno())
        path = _publish(tmp, path, overwrite, next_free)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise QimgError(write_error(path, e)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def remove_stale_temps(path: Path, now: float | None = None) -> None:
    """Remove the temporary files qimg left beside `path` when it was killed (SIGKILL, a power cut): only
    `.qimg-<path's name>.<pid>-<random>.tmp` files whose process is gone, or that are older than
    STALE_TEMP_SECONDS; a run saving to the same name right now keeps its own."""
    pattern = re.compile(re.escape(f"{TEMP_PREFIX}{path.name}.") + r"(\d+)-[^./]+\.tmp")
    now = time.time() if now is None else now
    for entry in os.scandir(path.parent):
        match = pattern.fullmatch(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if not _alive(int(match[1])) or now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                os.unlink(entry.path)
        except FileNotFoundError:  # another run removed it first
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# errnos of file systems that have no hard links (FAT, some network and FUSE mounts)
NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


def _publish(tmp: str, path: Path, overwrite: bool, next_free=None) -> Path:
    """Move the complete temporary file to `path`, or with `next_free` to the first free name it gives (two
    runs that picked the same default name), and return where. Without `overwrite` it is hard-linked there,
    which fails if `path` exists, so no check-then-rename window lets a file that appeared meanwhile be
    replaced."""
    if overwrite:
        os.replace(tmp, path)
        return path
    while not _claim(tmp, path):
        if next_free is None:
            raise OutputExists(f"{path} appeared while qimg was working; it was kept (pass --overwrite to "
                               "replace it)")
        path = next_free()
    return path


def _claim(tmp: str, path: Path) -> bool:
    """Move `tmp` to `path` unless something is there already (a dangling symlink included)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in NO_LINKS:
            raise
        if os.path.lexists(path):
            return False
        os.replace(tmp, path)  # no hard links here: check, then rename (a window of microseconds)
        return True
    os.unlink(tmp)
    return True


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
