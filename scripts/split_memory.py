"""Print the memory each device needs under --devices for the real models, computed from the module shapes.

    python scripts/split_memory.py            # the Markdown tables of docs/parallel.md

Nothing is downloaded or loaded: the modules are built on the meta device from qimg's default configs, which
are Qwen-Image's (and the Edit models': the same transformer, Edit-2511 only adds a flag), and the blocks are
split as `qimg --devices` splits devices of equal free memory (engine/placement.py). Weights in bfloat16;
`--quantize fp8` packs the block linears as fp8 (1 byte a weight); GGUF Q8_0 and Q4_K as such a file packs
them (the small layers around the blocks kept in bfloat16 either way). Qwen-Image-2.1's tables follow, from its
own default (real) configs: the 32-block transformer, the Qwen3-VL-8B text encoder with its vision tower, the
RGBA VAE.
"""

from pathlib import Path

import torch

from qimg.engine.memory import activation_bytes, qwen21_activation_bytes
from qimg.engine.placement import balanced_ranges, by_block, module_bytes, weights_of
from qimg.model.quant import packed_size
from qimg.model.qwen2 import Qwen2Config, Qwen2Model
from qimg.model.qwen3vl import Qwen3VLTextConfig, Qwen3VLTextModel
from qimg.model.qwen3vl_vision import Qwen3VLVisionConfig, Qwen3VLVisionTower
from qimg.model.transformer import QwenImageTransformer, TransformerConfig
from qimg.model.transformer21 import QwenImage21Transformer, Transformer21Config
from qimg.model.vae import QwenImageVAE, VAEConfig
from qimg.model.vae21 import QwenImage21VAE, VAE21Config
from qimg.model.vision import VisionConfig, VisionTower
from qimg.weights.transformer import Source, tensor_sizes

GB = 2**30  # as qimg's messages count (and nvidia-smi, in MiB)
FORMATS = {"bf16": None, "fp8 (--quantize fp8)": "F8_E4M3", "GGUF Q8_0": "Q8_0", "GGUF Q4_K": "Q4_K"}


def transformer_sizes(cfg: TransformerConfig | Transformer21Config, packed: str | None) -> dict[str, int]:
    """Bytes per weight in bfloat16, the blocks' linear weights packed as `packed` (None: dense)."""
    sizes = tensor_sizes(cfg, Path("."), Source(), torch.bfloat16, torch.device("cuda"))
    if packed is None:
        return sizes
    with torch.device("meta"):
        model = QwenImage21Transformer(cfg) if isinstance(cfg, Transformer21Config) else QwenImageTransformer(cfg)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {k: packed_size(packed, shapes[k]) if k.startswith("transformer_blocks.") and k.endswith(".weight")
            and len(shapes[k]) == 2 else n for k, n in sizes.items()}


def per_device(sizes: dict[str, int], devices: int) -> tuple[list[int], list[int]]:
    """(blocks per device, weight bytes per device) for `devices` devices of equal free memory."""
    blocks, rest = by_block(sizes)
    ranges = balanced_ranges(blocks, [1.0] * devices, rest)
    return [b - a for a, b in ranges], list(weights_of(blocks, rest, ranges))


def weights_table(cfg, model: str) -> None:
    print(f"| {model}transformer weights | devices | blocks per device | GB per device (largest) |")
    print("|---|---|---|---|")
    for name, packed in FORMATS.items():
        sizes = transformer_sizes(cfg, packed)
        for n in (1, 2, 3, 4):
            counts, held = per_device(sizes, n)
            print(f"| {name} | {n} | {','.join(map(str, counts))} | {max(held) / GB:.1f} |")


def qwen21() -> None:
    """Qwen-Image-2.1's tables."""
    cfg, vae_cfg = Transformer21Config(), VAE21Config()
    with torch.device("meta"):
        text = module_bytes(Qwen3VLTextModel(Qwen3VLTextConfig()), 2)
        text += module_bytes(Qwen3VLVisionTower(Qwen3VLVisionConfig()), 2)
        vae = module_bytes(QwenImage21VAE(vae_cfg), 2)
    working = qwen21_activation_bytes((1024, 1024), [], cfg.dim, vae_cfg.decoder_base_dim or vae_cfg.base_dim, 2)
    weights_table(cfg, "Qwen-Image-2.1 ")
    print()
    print("| Qwen-Image-2.1 component | GB (bfloat16) |")
    print("|---|---|")
    print(f"| text encoder (Qwen3-VL-8B language model and vision tower, as qimg loads them) | {text / GB:.1f} |")
    print(f"| VAE (encoder and decoder) | {vae / GB:.2f} |")
    print(f"| working memory per device at 1024x1024, no pictures (engine/memory.py's estimate) | {working / GB:.1f} |")


def main() -> None:
    cfg = TransformerConfig()
    with torch.device("meta"):
        language = module_bytes(Qwen2Model(Qwen2Config()), 2)
        vision = module_bytes(VisionTower(VisionConfig()), 2)
        vae = module_bytes(QwenImageVAE(VAEConfig()), 2)
    working = activation_bytes(1024, 1024, cfg, VAEConfig(), 2)
    weights_table(cfg, "")
    print()
    print("| component | GB (bfloat16) |")
    print("|---|---|")
    print("| text encoder, Qwen-Image (Qwen2.5-VL-7B language model as qimg loads it: no output head) | "
          f"{language / GB:.1f} |")
    print(f"| text encoder, Edit models (language model and vision tower) | {(language + vision) / GB:.1f} |")
    print(f"| VAE (encoder and decoder) | {vae / GB:.2f} |")
    print(f"| working memory per device at 1024x1024 (engine/memory.py's estimate) | {working / GB:.1f} |")
    print()
    qwen21()


if __name__ == "__main__":
    main()
