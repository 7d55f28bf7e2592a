"""The layer split (--devices): ranges of transformer blocks on different devices in one process.

Each range's blocks live on their device; the hidden states move to the next range's device between them,
with the step's shared inputs (timestep embeddings, rope tables, the attention plan) copied once per device.
The same operations run in the same order as on one device, so two names of the same device give the
single-device numbers exactly.
"""

import torch
from torch import Tensor, nn

from qimg.model.transformer import AttentionPlan


def moved(x, device: torch.device):
    """A tensor, or a tuple of them (None and numbers kept), on `device`."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, AttentionPlan):
        return AttentionPlan(*(moved(part, device) for part in x))
    if isinstance(x, tuple):
        return tuple(moved(part, device) for part in x)
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


def place_split(transformer: nn.Module, stages: list[tuple[torch.device, int, int]], home: torch.device) -> None:
    """Move each stage's blocks to its device and everything else to `home`; the transformer then runs split."""
    for name, child in transformer.named_children():
        if name != "transformer_blocks":
            child.to(home)
    for device, start, stop in stages:
        for block in transformer.transformer_blocks[start:stop]:
            block.to(device)
    transformer.run_blocks = BlockSplit(transformer.transformer_blocks, stages, home)
