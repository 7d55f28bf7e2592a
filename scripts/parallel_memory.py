"""Print the transformer weights each rank holds under torchrun's one-image modes for the real models, computed
from the module shapes.

    python scripts/parallel_memory.py            # the Markdown table of docs/parallel.md's torchrun section

Nothing is downloaded or loaded: the transformer is built on the meta device from qimg's default config, which
is Qwen-Image's (and the Edit models': the same transformer, Edit-2511 only adds a flag). Weights in bfloat16.
--cfg-parallel and --ulysses keep the whole transformer on every rank; --tp splits every block's linear layers
(qimg/parallel/tensor.py's plan, the modulation layers included) and keeps the small layers around the blocks
whole; --tp with diffusers' plan (modulation whole) is shown for comparison. Qwen-Image-2.1's rows follow, from
its default (real) config: 32 heads; --tp splits its blocks' linear layers, its one shared modulation layer
stays whole.
"""

import torch

from qimg.model.transformer import QwenImageTransformer, TransformerConfig
from qimg.model.transformer21 import QwenImage21Transformer, Transformer21Config
from qimg.parallel import tensor

GB = 2**30  # as qimg's messages count


def main() -> None:
    with torch.device("meta"):
        module = QwenImageTransformer(TransformerConfig())
    whole, half = tensor.rank_bytes(module, 1, 2), tensor.rank_bytes(module, 2, 2)
    print("| mode | ranks | transformer GB per rank (bf16) |")
    print("|---|---|---|")
    print(f"| one process, --cfg-parallel, --ulysses N (2, 3, 4, 6, 8) | 1, 2, N | {whole / GB:.1f} |")
    for n in (2, 4, 8):
        print(f"| --tp {n} | {n} | {tensor.rank_bytes(module, n, 2) / GB:.1f} |")
    for n in (2, 4):
        print(f"| --tp {n} with diffusers' plan (modulation whole), for comparison | {n} | "
              f"{tensor.rank_bytes(module, n, 2, modulation=False) / GB:.1f} |")
    print(f"| --cfg-parallel --tp 2, --ulysses 2 --tp 2 | 4 | {half / GB:.1f} |")
    with torch.device("meta"):
        module = QwenImage21Transformer(Transformer21Config())
    print(f"| Qwen-Image-2.1: one process, --cfg-parallel, --ulysses N (2, 4, 8) | 1, 2, N | "
          f"{tensor.rank_bytes(module, 1, 2) / GB:.1f} |")
    for n in (2, 4, 8):
        print(f"| Qwen-Image-2.1: --tp {n} | {n} | {tensor.rank_bytes(module, n, 2) / GB:.1f} |")


if __name__ == "__main__":
    main()
