"""Print the memory each device needs under --devices for the real models, computed from the module shapes.

    python scripts/split_memory.py            # the Markdown tables of docs/parallel.md

Nothing is downloaded or loaded: the modules are built on the meta device from qimg's default configs, which
are Qwen-Image's (and the Edit models': the same transformer, Edit-2511 only adds a flag), and the blocks are
split as `qimg --devices` splits devices of equal free memory (engine/placement.py). Weights in bfloat16;
`--quantize fp8` packs the block linears as fp8 (1 byte a weight); GGUF Q8_0 and Q4_K as such a file packs
them (the small layers around the blocks kept in bfloat16 either way).
"""

from pathlib import Path

import torch

from qimg.engine.memory import activation_bytes
from qimg.engine.placement import balanced_ranges, by_block, module_bytes, weights_of
from qimg.model.quant import packed_size
from qimg.model.qwen2 import Qwen2Config, Qwen2Model
from qimg.model.transformer import QwenImageTransformer, TransformerConfig
from qimg.model.vae import QwenImageVAE, VAEConfig
from qimg.model.vision import VisionConfig, VisionTower
from qimg.weights.transformer import Source, tensor_sizes

GB = 2**30  # as qimg's messages count (and nvidia-smi, in MiB)
FORMATS = {"bf16": None, "fp8 (--quantize fp8)": "F8_E4M3", "GGUF Q8_0": "Q8_0", "GGUF Q4_K": "Q4_K"}


def transformer_sizes(cfg: TransformerConfig, packed: str | None) -> dict[str, int]:
    """Bytes per weight in bfloat16, the blocks' linear weights packed as `packed` (None: dense)."""
    sizes = tensor_sizes(cfg, Path("."), Source(), torch.bfloat16, torch.device("cuda"))
    if packed is None:
        return sizes
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in QwenImageTransformer(cfg).state_dict().items()}
    return {k: packed_size(packed, shapes[k]) if k.startswith("transformer_blocks.") and k.endswith(".weight")
            and len(shapes[k]) == 2 else n for k, n in sizes.items()}


def per_device(sizes: dict[str, int], devices: int) -> tuple[list[int], list[int]]:
    """(blocks per device, weight bytes per device) for `devices` devices of equal free memory."""
    blocks, rest = by_block(sizes)
    ranges = balanced_ranges(blocks, [1.0] * devices, rest)
    return [b - a for a, b in ranges], list(weights_of(blocks, rest, ranges))


def main() -> None:
    cfg = TransformerConfig()
    with torch.device("meta"):
        language = module_bytes(Qwen2Model(Qwen2Config()), 2)
        vision = module_bytes(VisionTower(VisionConfig()), 2)
        vae = module_bytes(QwenImageVAE(VAEConfig()), 2)
    working = activation_bytes(1024, 1024, cfg, VAEConfig(), 2)
    print("| transformer weights | devices | blocks per device | GB per device (largest) |")
    print("|---|---|---|---|")
    for name, packed in FORMATS.items():
        sizes = transformer_sizes(cfg, packed)
        for n in (1, 2, 3, 4):
            counts, held = per_device(sizes, n)
            print(f"| {name} | {n} | {','.join(map(str, counts))} | {max(held) / GB:.1f} |")
    print()
    print("| component | GB (bfloat16) |")
    print("|---|---|")
    print("| text encoder, Qwen-Image (Qwen2.5-VL-7B language model as qimg loads it: no output head) | "
          f"{language / GB:.1f} |")
    print(f"| text encoder, Edit models (language model and vision tower) | {(language + vision) / GB:.1f} |")
    print(f"| VAE (encoder and decoder) | {vae / GB:.2f} |")
    print(f"| working memory per device at 1024x1024 (engine/memory.py's estimate) | {working / GB:.1f} |")


if __name__ == "__main__":
    main()
