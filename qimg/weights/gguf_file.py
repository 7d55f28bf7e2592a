"""Read GGUF files (llama.cpp's format, as city96 and QuantStack publish Qwen-Image) without the gguf package.

Layout (GGUF v2/v3, little-endian): magic `GGUF`, version u32, tensor count u64, metadata count u64; the
metadata as (key string, type u32, value); per tensor its name, dimension count u32, dimensions u64 (ggml
order: the fastest-varying first), type u32 and offset u64 from the data section, which starts at the next
multiple of `general.alignment` (default 32). Every count, length and offset is checked against the file's
size before anything is read or allocated, so a damaged or hostile file is one error, never a huge allocation;
each tensor's offset must be a multiple of the alignment, and no two tensors may share a byte.
"""

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qimg.errors import UsageError
from qimg.model.quant import BLOCKS
from qimg.small_files import GGUF_MAGIC as MAGIC

DENSE = {0: ("F32", torch.float32), 1: ("F16", torch.float16), 30: ("BF16", torch.bfloat16)}  # ggml type ids
PACKED = {8: "Q8_0", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
          14: "Q6_K"}
REFUSED = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
           22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
           34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4"}
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
ARCHITECTURE = "qwen_image"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    kind: str  # F32, F16, BF16 or a block type (Q4_K)
    shape: tuple[int, ...]  # torch order: (out, in) for a linear weight
    start: int  # absolute byte offset in the file
    nbytes: int


class Reader:
    """Bounded reads from a file object: asking past the end is a 'truncated' error naming the file."""

    def __init__(self, f, path: Path, size: int, option: str = "--transformer"):
        self.f, self.path, self.size, self.option = f, path, size, option

    def take(self, n: int) -> bytes:
        if n > self.size - self.f.tell():
            raise UsageError(f"{self.option} {self.path}: the file is truncated (its header runs past its "
                             f"{self.size} bytes); download it again")
        return self.f.read(n)

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", "replace")

    def value(self, kind: int):
        if kind in SCALARS:
            return self.scalar(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if count > self.size:  # every item takes at least a byte
                raise UsageError(f"{self.option} {self.path}: a metadata array claims {count} items; the file is "
                                 "damaged")
            return [self.value(item) for _ in range(count)]
        raise UsageError(f"{self.option} {self.path}: metadata of unknown type {kind}; not a GGUF file qimg can read")


ARCHITECTURES = {ARCHITECTURE: "Qwen-Image"}  # general.architecture -> what a message calls it


def read_header(path: Path, option: str = "--transformer",
                architectures: dict[str, str] = ARCHITECTURES) -> tuple[dict, list[TensorInfo]]:
    """The file's metadata and tensors. Refuses an architecture not in `architectures`, tensor types qimg cannot
    unpack (named), and a file shorter than its tensors. option: the option that named the file, for messages.
    Parsed once per version of the file: a text encoder's header holds its whole vocabulary (about a second to
    parse), and a run reads it to check, size, load and describe the file."""
    stat = path.stat()
    return _read_header(path, stat.st_size, stat.st_mtime_ns, option, tuple(architectures.items()))


@functools.lru_cache(maxsize=4)
def _read_header(path: Path, size: int, mtime: int, option: str,
                 architectures: tuple) -> tuple[dict, list[TensorInfo]]:
    architectures = dict(architectures)
    with open(path, "rb") as f:
        r = Reader(f, path, size, option)
        if r.take(4) != MAGIC:
            raise UsageError(f"{option} {path} is not a GGUF file")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise UsageError(f"{option} {path}: GGUF version {version} is not supported (2 or 3; a big-endian "
                             "file reads as a huge version)")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        for count, what in ((n_tensors, "tensors"), (n_kv, "metadata entries")):
            if count > size:  # every one takes at least a byte
                raise UsageError(f"{option} {path}: the header claims {count} {what}; the file is damaged")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.scalar("<I"))
        raw = []
        for _ in range(n_tensors):
            name, n_dims = r.string(), r.scalar("<I")
            if n_dims > 4:
                raise UsageError(f"{option} {path}: tensor {name} has {n_dims} dimensions; the file is damaged")
            dims = [r.scalar("<Q") for _ in range(n_dims)]
            raw.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
        alignment = meta.get("general.alignment", 32)
        if not isinstance(alignment, int) or not 0 < alignment <= 2**20:
            raise UsageError(f"{option} {path}: general.alignment {alignment!r} is not a sane alignment")
        data = -(-f.tell() // alignment) * alignment
    arch = meta.get("general.architecture")
    if arch not in architectures:
        wanted = " or ".join(f"{name} (architecture {key})" for key, name in architectures.items())
        what = repr(arch)[:40] if arch is not None else "none (no general.architecture)"
        takes = option or "qimg (--transformer, --text-encoder, --vision)"
        raise UsageError(f"{option + ' ' if option else ''}{path}: a GGUF file of architecture {what}; {takes} "
                         f"takes {wanted}")
    infos = [_tensor(path, size, data, alignment, *t, option=option) for t in raw]
    end, last = data, None
    for info in sorted(infos, key=lambda t: t.start):
        if info.start < end:
            raise UsageError(f"{option} {path}: tensor {info.name} overlaps tensor {last.name} (bytes "
                             f"{info.start} to {info.start + info.nbytes}); the file is damaged: download it again")
        end, last = info.start + info.nbytes, info
    return meta, infos


def _tensor(path: Path, size: int, data: int, alignment: int, name: str, dims: list[int], kind: int,
            offset: int, option: str = "--transformer") -> TensorInfo:
    if kind in REFUSED or (kind not in DENSE and kind not in PACKED):
        type_name = REFUSED.get(kind, f"type {kind}")
        raise UsageError(f"{option} {path}: tensor {name} is {type_name}, which qimg does not read (it reads "
                         f"F32, F16, BF16, {', '.join(PACKED.values())}); pick another quantization of the model")
    numel = 1
    for d in dims:
        numel *= d
    if kind in DENSE:
        type_name, nbytes = DENSE[kind][0], numel * DENSE[kind][1].itemsize
    else:
        type_name = PACKED[kind]
        block, block_bytes = BLOCKS[type_name]
        if not dims or dims[0] % block:
            raise UsageError(f"{option} {path}: tensor {name} ({type_name}) has rows of {dims[:1]} values, not a "
                             f"multiple of its block of {block}; the file is damaged")
        nbytes = numel // block * block_bytes
    if offset % alignment:
        raise UsageError(f"{option} {path}: tensor {name} starts at offset {offset}, not a multiple of the "
                         f"file's alignment {alignment}; the file is damaged: download it again")
    start = data + offset
    if start + nbytes > size:
        raise UsageError(f"{option} {path} is truncated: tensor {name} ends at byte {start + nbytes} but the "
                         f"file has {size}; download it again")
    return TensorInfo(name, type_name, tuple(reversed(dims)), start, nbytes)


def read_tensor(path: Path, info: TensorInfo, option: str = "--transformer") -> torch.Tensor:
    """F32/F16/BF16 tensors in their dtype and shape; block types as uint8 (rows, bytes per row)."""
    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    view, done = memoryview(buffer.numpy()), 0
    with open(path, "rb") as f:
        f.seek(info.start)
        while done < info.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise UsageError(f"{option} {path} is truncated at tensor {info.name}; download it again")
            done += n
    dense = {name: dtype for name, dtype in DENSE.values()}
    if info.kind in dense:
        return buffer.view(dense[info.kind]).reshape(info.shape)
    rows = info.shape[0] if len(info.shape) > 1 else 1
    return buffer.reshape(rows, -1)
