"""A content-addressed store of tensors on disk: latents keyed by the pixels they decode to, prompt
embeddings keyed by their text, each together with the identity of the model part that made it.

An entry is one safetensors file, `<folder>/<kind>/<key[:2]>/<key>.safetensors`, whose header metadata
holds a small JSON record (what made it, when, and a hash of its tensor bytes). Writes go to a temporary
file beside the entry and are renamed into place, so readers, other processes and a crash see a whole
entry or none. A corrupt or truncated entry is reported through `warn`, removed and treated as missing, so
the caller rebuilds it. Above `max_bytes` the least recently used entries go; a hit refreshes an entry's
modification time. The cache is best effort: a folder it cannot write to costs a warning, never a run.
"""

import hashlib
import json
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

DEFAULT_MAX_BYTES = 2 * 1000**3
SUFFIX = ".safetensors"
STALE_TMP_SECONDS = 24 * 3600  # temporary files this old were left by a crash


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


_BYTES = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """`2GB`, `500M`, `1.5G`, `123456` (bytes) -> bytes; K/M/G/T are powers of 1000. ValueError if not."""
    match = _BYTES.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a size like 2GB, 500MB or 123456")
    return int(float(match[1]) * 1000 ** " kmgt".index(match[2].lower() or " "))


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


def prompt_key(text: str, encoder_fingerprint: str) -> str:
    """Key of a prompt's embedding under one text encoder (whose fingerprint should include the dtype and
    device it ran in, so a cached embedding gives the same image as a freshly computed one)."""
    return _digest("prompt", text, encoder_fingerprint)


def fingerprint(folder: Path, sample: int = 64 * 1024, samples: int = 8, head: int = 256 * 1024) -> str:
    """The identity of a model folder without reading gigabytes: every file's name and size, the whole of
    small files (configs, tokenizer), and of large ones the head (a safetensors header lists every tensor's
    name, dtype, shape and offset) plus `samples` evenly spaced chunks of the weights, which tells two
    fine-tunes of one architecture apart."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= head + samples * sample:
                h.update(f.read())
                continue
            h.update(f.read(head))
            for i in range(samples):
                f.seek(head + (size - head - sample) * i // max(samples - 1, 1))
                h.update(f.read(sample))
    return h.hexdigest()[:32]


def _tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    return _digest(*(part for name in sorted(tensors) for part in (
        name, str(tensors[name].dtype), str(tuple(tensors[name].shape)),
        tensors[name].flatten().view(torch.uint8).numpy().tobytes(),
    )))


# --- The store ---------------------------------------------------------------------------------------------


class Store:
    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_BYTES, warn: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))

    def path(self, kind: str, key: str) -> Path:
        if not re.fullmatch(r"[a-z0-9_-]+", kind) or not re.fullmatch(r"[0-9a-f]{8,}", key):
            raise ValueError(f"bad cache kind {kind!r} or key {key!r}")
        return self.folder / kind / key[:2] / f"{key}{SUFFIX}"

    def get(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The entry's tensors (on the CPU) and record, or None when it is missing or was corrupt."""
        from safetensors.torch import load

        path = self.path(kind, key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            header_len = int.from_bytes(data[:8], "little")
            record = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["qimg"])
            tensors = load(data)
            if record.get("sha256") != _tensor_hash(tensors):
                raise ValueError("its tensors do not match their recorded hash")
        except Exception as e:  # any damage at all, down to a header that is not JSON: rebuild the entry
            self.warn(f"cache entry {path} is damaged ({type(e).__name__}: {str(e)[:100]}); removed, recomputing")
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used: last in line for eviction
        except OSError:
            pass
        return tensors, record

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor], record: dict | None = None) -> None:
        """Store tensors with a JSON-serialisable record; replaces an existing entry. Never raises on I/O."""
        from safetensors.torch import save

        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        record = {**(record or {}), "kind": kind, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "sha256": _tensor_hash(tensors)}
        data = save(tensors, metadata={"qimg": json.dumps(record, ensure_ascii=False)})
        if len(data) > self.max_bytes:
            return
        path = self.path(kind, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
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
            self.warn(f"cannot write to the cache {self.folder}: {e.strerror or e}; continuing without it")

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used entries until the store fits in max_bytes, and stale temporary files."""
        entries, now = [], time.time()
        for path in self.folder.glob("*/*/*"):
            try:
                stat = path.stat()
            except OSError:
                continue  # removed meanwhile by another process
            if path.name.endswith(SUFFIX):
                entries.append((stat.st_mtime, stat.st_size, path))
            elif path.name.endswith(".tmp") and now - stat.st_mtime > STALE_TMP_SECONDS:
                path.unlink(missing_ok=True)
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size

    def size(self) -> int:
        """Bytes in entries now."""
        return sum(p.stat().st_size for p in self.folder.glob(f"*/*/*{SUFFIX}"))
