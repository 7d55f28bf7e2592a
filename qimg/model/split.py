"""The layer split (--devices): ranges of transformer blocks on different devices in one process.

Each range's blocks live on their device; the hidden states move to the next range's device between them,
with the step's shared inputs (timestep embeddings, rope tables, the attention plan; for Qwen-Image-2.1 the
modulation and the Layout) copied once per device. 2.1's prefix cache keeps each block's keys and values on the
block's device.
The same operations run in the same order as on one device, so two names of the same device give the
single-device numbers exactly.
"""

import dataclasses

import torch
from torch import Tensor, nn

from qimg.model.transformer import AttentionPlan
from qimg.model.transformer21 import run_range


def moved(x, device: torch.device):
    """A tensor, or a tuple of them (None and numbers kept), on `device`."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, AttentionPlan):
        return AttentionPlan(*(moved(part, device) for part in x))
    if isinstance(x, tuple):
        return tuple(moved(part, device) for part in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):  # Qwen-Image-2.1's rope21.Layout
        return dataclasses.replace(x, **{f.name: moved(getattr(x, f.name), device) for f in dataclasses.fields(x)})
    return x


class BlockSplit:
    """Stands in for QwenImageTransformer.run_blocks: stages (device, start, stop) run in order; the hidden
    states come back on `home`, where the layers around the blocks are."""

    def __init__(self, blocks: nn.ModuleList, stages: list[tuple[torch.device, int, int]], home: torch.device):
        self.blocks, self.stages, self.home = blocks, stages, home

    def __call__(self, img, txt, vec, rope, plan):
        for device, start, stop in self.stages:
            img, txt = img.to(device), txt.to(device)
            shared = moved((vec, rope, plan), device)
            for block in self.blocks[start:stop]:
                img, txt = block(img, txt, *shared)
        return img.to(self.home), txt.to(self.home)


class BlockSplit21(BlockSplit):
    """Stands in for QwenImage21Transformer.run_blocks: the same stages; the prefix cache's keys and values of a
    block stay on its device (made and read there)."""

    def __call__(self, x, mod, split, layout, past, extract):
        prefix = []
        for device, start, stop in self.stages:
            here, placed = moved((mod, layout), device)
            x, made = run_range(self.blocks[start:stop], start, x.to(device), here, split, placed, past, extract)
            prefix += made
        return x.to(self.home), prefix


def place_split(transformer: nn.Module, stages: list[tuple[torch.device, int, int]], home: torch.device,
                runner: type[BlockSplit] = BlockSplit) -> None:
    """Move each stage's blocks to its device and everything else to `home`; the transformer then runs split."""
    for name, child in transformer.named_children():
        if name != "transformer_blocks":
            child.to(home)
    for device, start, stop in stages:
        for block in transformer.transformer_blocks[start:stop]:
            block.to(device)
    transformer.run_blocks = runner(transformer.transformer_blocks, stages, home)
