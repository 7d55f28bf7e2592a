"""A content-addressed store of tensors on disk: latents keyed by the pixels they decode to, prompt
embeddings keyed by their text, each together with the identity of the model part that made it.

An entry is one safetensors file, `<folder>/<kind>/<key[:2]>/<key>.safetensors`, whose header metadata
holds a small JSON record (what made it, when, and a hash of its tensor bytes). Writes go to a temporary
file beside the entry and are renamed into place, so readers, other processes and a crash see a whole
entry or none. A corrupt or truncated entry, or one that is not what the caller expects (tensor names,
dtypes, shapes, finite values, format), is reported through `warn`, removed and treated as missing, so the
caller rebuilds it. Above `max_bytes` the least recently used entries go; a hit refreshes an entry's
modification time. The cache is best effort: a folder it cannot write to costs a warning, never a run.

The store deletes only what it can tell it wrote: entries and temporary files of its own names, in its own
layout, inside a folder marked with its CACHEDIR.TAG (see cache_folder.py), never through a symbolic link.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import tempfile
import time
import warnings
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np  # torch loads lazily: the CLI checks --cache-size before anything imports it

from qimg.cache_folder import NOFOLLOW, claim, real_dir, remove
from qimg.option_values import MAX_DIGITS
from qimg.small_files import NONBLOCK

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_BYTES = 2 * 1000**3
MAX_BYTES = 1000**5  # 1 PB: the largest --cache-size taken
HARD_CAP = 4 * 1000**3  # no entry (a latent, a prompt's embeddings, a chain's canvas) is larger
FORMAT = 1  # the entry layout; an entry of another format is never read
KINDS = ("prompt", "latent", "chain", "mask")
SUFFIX = ".safetensors"
STALE_TMP_SECONDS = 24 * 3600  # temporary files this old were left by a crash
ENTRY = re.compile(r"([0-9a-f]{64})\.safetensors")
TEMP = re.compile(r"\.[0-9a-f]{16}\.[a-z0-9_]+\.tmp")  # mkstemp's names in put


def default_cache_dir() -> Path:
    """$QIMG_CACHE_DIR, else $XDG_CACHE_HOME/qimg, else the platform's user cache folder."""
    if os.environ.get("QIMG_CACHE_DIR"):
        return Path(os.environ["QIMG_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "qimg"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "qimg"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "qimg" / "Cache"
    return Path.home() / ".cache" / "qimg"


_NUMBER = rf"\d{{1,{MAX_DIGITS}}}"
_BYTES = re.compile(rf"\s*({_NUMBER}(?:\.{_NUMBER})?)\s*([kmgt]?)b?\s*", re.IGNORECASE | re.ASCII)


def parse_bytes(text: str) -> int:
    """`2GB`, `500M`, `1.5G`, `123456` (bytes) -> bytes; K/M/G/T are powers of 1000; 0 turns the cache off.
    ValueError if not a size, or above MAX_BYTES (1PB)."""
    match = _BYTES.fullmatch(text)
    if not match:
        raise ValueError(f"{text[:40]!r} is not a size like 2GB, 500MB or 123456")
    size = int(Decimal(match[1]) * 1000 ** " kmgt".index(match[2].lower() or " "))
    if size > MAX_BYTES:
        raise ValueError(f"{text[:40]!r} is more than the largest size taken, 1000TB")
    return size


def size_option(text: str) -> int:
    """--cache-size in bytes, or a UsageError naming it (or $QIMG_CACHE_SIZE, when that is where it came from)."""
    from qimg.errors import UsageError

    try:
        return parse_bytes(text)
    except ValueError as e:
        named = "QIMG_CACHE_SIZE" if os.environ.get("QIMG_CACHE_SIZE") == text else "--cache-size"
        raise UsageError(f"{named} {e}") from None


# --- Keys: a hash of exactly what determines the tensor ----------------------------------------------------


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed, so ("ab", "c") != ("a", "bc")
        h.update(data)
    return h.hexdigest()


def array_hash(array: np.ndarray) -> str:
    """The content of an array: dtype, shape and bytes (an image's pixels, a mask's values)."""
    array = np.ascontiguousarray(array)
    return _digest(array.dtype.str, str(array.shape), array.tobytes())


def pixel_key(image: np.ndarray, vae_fingerprint: str) -> str:
    """Key of the latent of uint8 RGB pixels (H, W, 3) under one VAE."""
    if image.dtype != np.uint8:
        raise ValueError(f"pixel_key takes uint8 pixels, not {image.dtype}")
    return _digest("latent", array_hash(image), vae_fingerprint)


def prompt_key(text: str, encoder_fingerprint: str, pictures: tuple[np.ndarray, ...] = ()) -> str:
    """Key of a prompt's embedding under one text encoder (whose fingerprint should include the dtype and
    device it ran in, so a cached embedding gives the same image as a freshly computed one). An instruction
    for an Edit model is keyed by its text in the template and the pixels of the pictures it is encoded with."""
    return _digest("prompt", text, encoder_fingerprint, *map(array_hash, pictures))


def mask_key(image: np.ndarray, phrases: tuple[str, ...], model_fingerprint: str, threshold: float) -> str:
    """Key of a mask made from words: the image's pixels, the phrases in order, the segmentation model, the
    threshold (before --invert-mask, --grow and --feather, which are cheap)."""
    return _digest("mask", array_hash(image), json.dumps(list(phrases)), model_fingerprint, repr(float(threshold)))


def _tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    import torch

    return _digest(*(part for name in sorted(tensors) for part in (
        name, str(tensors[name].dtype), str(tuple(tensors[name].shape)),
        tensors[name].flatten().view(torch.uint8).numpy().tobytes(),
    )))


# --- The store ---------------------------------------------------------------------------------------------

Spec = dict[str, tuple[str, tuple]]  # tensor name -> (dtype name, shape; None for a side of any size)


def mismatch(tensors: dict[str, torch.Tensor], spec: Spec) -> str | None:
    """Why tensors are not what spec says (names, dtypes, shapes, finite values), or None when they are."""
    import torch

    if tensors.keys() != spec.keys():
        return f"it holds {sorted(tensors)}, not {sorted(spec)}"
    for name, (dtype, shape) in spec.items():
        t = tensors[name]
        if str(t.dtype).removeprefix("torch.") != dtype:
            return f"{name} is {t.dtype}, not {dtype}"
        if len(t.shape) != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            return f"{name} has shape {tuple(t.shape)}, not {shape}"
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"{name} holds non-finite values"
    return None


class Store:
    """Entries live under `claim(folder)`; only names of its own layout there are ever read, replaced or
    deleted, and never through a symbolic link."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_BYTES, warn: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        self.root: Path | None = None  # claimed on first use
        self.broken = False  # a write failed: warned once, writes stop for this run
        self.unusable = set()  # kinds whose folder is no folder (a file): warned once, a miss and never written

    def path(self, kind: str, key: str) -> Path:
        if kind not in KINDS or not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ValueError(f"bad cache kind {kind!r} or key {key!r}")
        return (self.root or self.folder) / kind / key[:2] / f"{key}{SUFFIX}"

    def _usable(self, kind: str) -> bool:
        """Whether the kind's folder can hold entries; a file there is said once per store (a link: get's and
        put's to remove)."""
        where = self.root / kind
        usable = real_dir(where) or os.path.islink(where) or not os.path.lexists(where)
        if not usable and kind not in self.unusable:
            self.unusable.add(kind)
            self.warn(f"{where} is not a folder: no {kind} entries are cached; remove it to cache them again")
        return usable

    def _damaged(self, path: Path, why: str) -> None:
        self.warn(f"cache entry {path} is damaged ({why[:120]}); {remove(path)}, recomputing")

    def _read(self, path: Path) -> bytes | None:
        """The entry's bytes; None when missing; ValueError when it is no regular file of a sane size."""
        try:
            fd = os.open(path, os.O_RDONLY | NOFOLLOW | NONBLOCK)  # a FIFO opens without waiting for a writer
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ValueError("it is a symbolic link" if os.path.islink(path) else e.strerror or str(e)) from None
        cap = min(self.max_bytes, HARD_CAP)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("it is not a regular file")
            if info.st_size > cap:
                raise ValueError(f"it is {info.st_size} bytes, more than the cache takes ({cap})")
            os.set_blocking(fd, True)
            data = f.read(cap + 1)
        if len(data) > cap:
            raise ValueError("it grew past the cache's size while read")
        return data

    def get(self, kind: str, key: str, expect: Spec | list[Spec]) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The entry's tensors (on the CPU) and record, or None when it is missing or was damaged. expect: what
        the caller can use (one spec, or a list of alternatives); an entry that is not that is damage."""
        from safetensors.torch import load

        if self.root is None:
            self.root = claim(self.folder, create=False)
            if self.root is None:
                return None
        if not self._usable(kind):
            return None
        path = self.path(kind, key)
        for parent in (path.parent.parent, path.parent):
            if os.path.islink(parent):  # where the store keeps a folder: the link goes, never what it points to
                self._damaged(parent, "a symbolic link")
                return None
        try:
            data = self._read(path)
            if data is None:
                return None
            header_len = int.from_bytes(data[:8], "little")
            record = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["qimg"])
            if (record.get("format"), record.get("kind"), record.get("key")) != (FORMAT, kind, key):
                raise ValueError(f"it is not a format {FORMAT} {kind} entry for its key")
            tensors = load(data)
            if record.get("sha256") != _tensor_hash(tensors):
                raise ValueError("its tensors do not match their recorded hash")
            why = [mismatch(tensors, spec) for spec in (expect if isinstance(expect, list) else [expect])]
            if all(why):
                raise ValueError(why[0])
        except Exception as e:  # any damage at all, down to a header that is not JSON: rebuild the entry
            self._damaged(path, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
            return None
        try:
            os.utime(path, follow_symlinks=False)  # recently used: last in line for eviction
        except OSError:
            pass
        return tensors, record

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor], record: dict | None = None) -> None:
        """Store tensors with a JSON-serialisable record; replaces an existing entry. Never raises on I/O;
        refuses (with a warning) tensors holding NaN or infinity."""
        import torch
        from safetensors.torch import save

        if self.broken:
            return
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors.values()):
            self.warn(f"not caching a {kind} holding non-finite values")
            return
        record = {**(record or {}), "format": FORMAT, "kind": kind, "key": key,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sha256": _tensor_hash(tensors)}
        data = save(tensors, metadata={"qimg": json.dumps(record, ensure_ascii=False)})
        if len(data) > min(self.max_bytes, HARD_CAP):
            return
        try:
            if self.root is None:
                self.root = claim(self.folder, create=True)
            if self.root is None:
                self.broken = True
                self.warn(f"not using {self.folder} as the cache: it holds files qimg did not write, and so does "
                          f"{self.folder / 'qimg'}; continuing without the cache")
                return
            if not self._usable(kind):
                return
            path = self.path(kind, key)
            for parent in (path.parent.parent, path.parent):
                if os.path.islink(parent):
                    os.unlink(parent)  # as in get
                parent.mkdir(exist_ok=True)
            if real_dir(path) and remove(path) != "removed":
                return  # a folder of someone else's files where this entry goes: get has said so; not this entry
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.evict(keep=path)
        except OSError as e:
            self.broken = True
            self.warn(f"cannot write to the cache {self.folder}: {e.strerror or e}; continuing without it")

    def _walk(self):
        """(path, lstat) of every file in the store's own layout: kind/xx/ folders, entries and temporary files
        by their names; nothing else is looked at, and no link followed."""
        if self.root is None:
            return
        for kind in KINDS:
            if not real_dir(self.root / kind):
                continue
            for sub in os.scandir(self.root / kind):
                if not re.fullmatch(r"[0-9a-f]{2}", sub.name) or not sub.is_dir(follow_symlinks=False):
                    continue
                for item in os.scandir(sub.path):
                    entry = ENTRY.fullmatch(item.name)
                    if (entry and entry[1][:2] == sub.name) or TEMP.fullmatch(item.name):
                        try:
                            yield Path(item.path), item.stat(follow_symlinks=False)
                        except OSError:
                            continue  # removed meanwhile by another process

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used entries until the store fits in max_bytes, stale temporary files, and
        anything of an entry's name that is no regular file (a link: the link only)."""
        entries, now = [], time.time()
        for path, info in self._walk():
            regular = stat.S_ISREG(info.st_mode)
            if path.name.endswith(SUFFIX) and regular:
                entries.append((info.st_mtime, info.st_size, path))
            elif not regular or now - info.st_mtime > STALE_TMP_SECONDS:
                try:
                    os.unlink(path)
                except OSError:
                    pass  # gone meanwhile, or a folder of that name: the store never removes folders
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size

    def size(self) -> int:
        """Bytes in entries now."""
        return sum(count for _, count in self.usage().values())

    def _entries(self):
        """(kind, path, lstat) of every regular entry file of the store."""
        if self.root is None:
            self.root = claim(self.folder, create=False)
        for path, info in self._walk():
            if path.name.endswith(SUFFIX) and stat.S_ISREG(info.st_mode):
                yield path.parent.parent.name, path, info

    def usage(self) -> dict[str, tuple[int, int]]:
        """(entries, bytes) by kind, now."""
        found = {kind: (0, 0) for kind in KINDS}
        for kind, _, info in self._entries():
            entries, size = found[kind]
            found[kind] = entries + 1, size + info.st_size
        return found

    def clear(self, kinds: tuple[str, ...] = KINDS) -> tuple[int, int]:
        """Remove every entry of `kinds`: (entries, bytes) removed. Safe while other processes use the store:
        a reader holding an entry open reads it whole, one that looks it up next finds it missing and
        recomputes it; temporary files of writes in progress are left to them."""
        removed, freed = 0, 0
        for kind, path, info in list(self._entries()):
            if kind in kinds:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue  # removed meanwhile (evicted by another process)
                removed, freed = removed + 1, freed + info.st_size
        return removed, freed
