"""The one way qimg opens a file a user hands it: LoRAs, transformer files, presets, chains, prompts files, a model
folder's JSON, the file `qimg info` reads. Only a regular file is opened (a symbolic link is judged by its
target): a FIFO, device, socket or folder is refused by name, and because the file is opened non-blocking and
checked with fstat before anything is read, a FIFO nobody writes cannot block. Reads are bounded (`read_small`),
and a weights file's header is checked (`safetensors_header`, `pickled`) before anything hashes or loads it, so
a path to /dev/zero costs nothing. Also where qimg keeps its own state (`state_dir`: the worker's log, notice
markers). Standard library only, on purpose: cli/presets.py reads through it, and `qimg presets` stays quick."""

import hashlib
import json
import os
import stat
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from qimg.errors import QimgError, UsageError

NONBLOCK = getattr(os, "O_NONBLOCK", 0)
NOT_REGULAR = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
GGUF_MAGIC = b"GGUF"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # never read: loading a pickle can run code
SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors' own limit on a file's JSON header


def _name(what: str, path: Path) -> str:
    return f"{what} {path}" if what else str(path)


def _not_regular(mode: int) -> str:
    return NOT_REGULAR.get(stat.S_IFMT(mode), "a special file")


@contextmanager
def open_regular(path: Path, what: str, folder_fix: str = "", error: type[QimgError] = UsageError) \
        -> Iterator[BinaryIO]:
    """`path` open for reading, once it is known to be a regular file; any problem is one `error` line naming it
    as `what` (an option, "preset"; empty: the path alone). `folder_fix` ends the folder's line."""
    name = _name(what, path)
    try:
        fd = os.open(path, os.O_RDONLY | NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except PermissionError:
        raise error(f"{name}: permission denied") from None
    except OSError as e:
        try:
            mode = os.stat(path).st_mode  # a socket cannot be opened (ENXIO): say what it is
        except OSError:
            mode = stat.S_IFREG
        if stat.S_IFMT(mode) in NOT_REGULAR:
            raise error(f"{name} is {_not_regular(mode)}, not a file; give the file itself") from None
        raise error(f"{name}: cannot read it ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise error(f"{name} is a folder{folder_fix}")
        raise error(f"{name} is {_not_regular(mode)}, not a file; give the file itself")
    if NONBLOCK:
        os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        yield f


def read_small(path: Path, what: str, limit: int, folder_fix: str = "", over_fix: str = ", the limit",
               error: type[QimgError] = UsageError) -> bytes:
    """The bytes of a regular file (open_regular) of at most `limit` bytes, reading no more than `limit` + 1 of
    them even if it grows meanwhile. Any problem is one `error` line naming the file as `what`; `folder_fix` and
    `over_fix` end the folder's and the size's lines (what to give instead)."""
    over = f"{_name(what, path)} is over {limit} bytes{over_fix}"
    with open_regular(path, what, folder_fix, error) as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise error(over)
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{_name(what, path)}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise error(over)
    return data


class _Twice(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _Twice(key)
        seen.add(key)
    return dict(pairs)


def parse_json(text: str | bytes, where: str, error: type[QimgError] = UsageError, unique: bool = False):
    """json.loads, every failure one `error` line starting with `where`: not JSON, nested deeper than Python's
    recursion allows (a raw RecursionError otherwise) and, with `unique`, an object that gives a key twice
    (json.loads keeps the last silently; YAML refuses it, and so does qimg where a user writes the JSON)."""
    try:
        return json.loads(text, object_pairs_hook=_unique if unique else None)
    except RecursionError:
        raise error(f"{where}: nested too deeply") from None
    except _Twice as e:
        raise error(f"{where}: gives the key {e.key[:60]!r} twice") from None
    except ValueError as e:  # UnicodeDecodeError too
        raise error(f"{where}: not valid JSON ({str(e).split(':')[0][:80]})") from None


def safetensors_header(f: BinaryIO, where: str) -> dict | None:
    """The JSON header of the safetensors file open as `f`, read from its start with bounded reads; None when its
    first bytes are no safetensors header (a length within the file and under safetensors' limit, then a JSON
    object). Nesting too deep is a UsageError starting with `where`."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        return None
    (length,) = struct.unpack("<Q", head)
    if not 2 <= length <= min(size - 8, SAFETENSORS_HEADER_LIMIT):
        return None
    text = f.read(length)
    if not text.lstrip().startswith(b"{"):
        return None
    try:
        header = json.loads(text)
    except RecursionError:
        raise UsageError(f"{where}: its header is nested too deeply; the file is damaged or hostile") from None
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def pickled(head: bytes) -> bool:
    """Whether a file starting with `head` is a pickle (the PROTO opcode 0x80, then protocol 2 to 5) or a zip
    archive (torch.save's format); decide it only once the file is known not to be a safetensors file, whose
    header length may start the same way."""
    return head.startswith(b"PK\x03\x04") or len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def sha256_of(f: BinaryIO) -> str:
    """The sha256 of what is left to read of `f`, read in 8 MB pieces (hashlib.file_digest is Python 3.11+)."""
    h = hashlib.sha256()
    while chunk := f.read(8 << 20):
        h.update(chunk)
    return h.hexdigest()


def state_dir() -> Path:
    """qimg's state folder: $XDG_STATE_HOME/qimg, else ~/.local/state/qimg."""
    state = os.environ.get("XDG_STATE_HOME")
    return (Path(state) if state else Path.home() / ".local" / "state") / "qimg"
