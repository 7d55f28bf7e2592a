"""Small helpers shared by test modules in several folders: image pixels, hand-made and damaged image files, the
one-line error check, signals and leftover temporary files, and a Lightning-style LoRA. Fixtures (`cli`,
`photo`, the tiny checkpoints) live in conftest.py; the GGUF writers in quant_files.py."""

import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def pixels(path) -> np.ndarray:
    """The RGB pixels of an image file, (height, width, 3) uint8."""
    return np.asarray(Image.open(path).convert("RGB"))


def one_line(err: str, *fragments: str) -> str:
    """Assert that stderr is exactly one line, without a traceback, holding every fragment; return the line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- image files written by hand ------------------------------------------------------------------------------

def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what Pillow cannot write (48-bit RGB) or should never see (a huge header)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def corrupt_files(folder: Path, photo: np.ndarray) -> dict:
    """A good PNG of `photo` in `folder` (good.png) and every kind of bad input image next to it:
    {case: (path, fragment of the error message qimg must give)}."""
    good = folder / "good.png"
    Image.fromarray(photo).save(good)
    raw = good.read_bytes()
    idat = raw.index(b"IDAT")
    flipped = bytearray(raw)
    flipped[idat + 40] ^= 0xFF  # inside the compressed data: the chunk CRC no longer matches
    files = {
        "missing": (folder / "missing.png", "no such file"),
        "folder": (folder, "is a folder"),
        "zero-byte": (folder / "empty.png", "is empty (0 bytes)"),
        "truncated": (folder / "truncated.png", "cannot read it as an image"),
        "corrupt": (folder / "flipped.png", "cannot read it as an image"),
        "not an image": (folder / "notes.png", "is not an image file"),
        "bomb": (folder / "bomb.png", "12000x12000 = 144 megapixels"),
        "huge bomb": (folder / "huge.png", "claims a size over"),
    }
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (folder / "flipped.png").write_bytes(bytes(flipped))
    (folder / "notes.png").write_text("shopping list: eggs")
    # Tiny files claiming huge sizes: decoding them would allocate gigabytes; the header is enough to refuse.
    (folder / "bomb.png").write_bytes(raw_png(12000, 12000, 8, 2, b"\0" * 100))
    (folder / "huge.png").write_bytes(raw_png(60000, 60000, 8, 2, b"\0" * 100))
    return files


# --- stops ----------------------------------------------------------------------------------------------------

def leftovers(folder: Path) -> list[str]:
    """qimg's temporary files (`.qimg-*`) left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".qimg-"))


def signal_self(signum):
    """A stand-in for any function: called, it sends `signum` to this process (whose handler must raise)."""
    def send(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises long before this ends
        pytest.fail("the signal did not stop the run")

    return send


# --- LoRAs ----------------------------------------------------------------------------------------------------

def lora_layers(model_dir: Path) -> dict:
    """{module name: (out, in)} of every linear layer a LoRA can target in the transformer of `model_dir`."""
    from qimg.model.transformer import QwenImageTransformer, TransformerConfig
    from qimg.weights.adapters import targets

    cfg = TransformerConfig.from_dict(json.loads((model_dir / "transformer" / "config.json").read_text()))
    with torch.device("meta"):
        return targets(QwenImageTransformer(cfg))


def lightning_lora(layers, seed=0, std=0.2) -> dict:
    """Bare `<m>.lora_down/lora_up/alpha` keys over every linear layer, as the Lightning files are laid out."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m, (out, inp) in layers.items():
        sd |= {f"{m}.lora_down.weight": std * torch.randn(8, inp, generator=g),
               f"{m}.lora_up.weight": std * torch.randn(out, 8, generator=g), f"{m}.alpha": torch.tensor(4.0)}
    return sd
