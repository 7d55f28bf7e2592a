"""Running a model larger than the device's memory: transformer blocks streamed from CPU memory.

The blocks' weights stay in (pinned) CPU memory; each block is copied to the device just before its turn,
on a side CUDA stream while the previous block computes, and dropped after. Only the block being run and
the next one are ever resident. On the CPU the copies are no-ops and the numbers are unchanged.
"""

from contextlib import nullcontext

import torch
from torch import nn
from torch.func import functional_call


class BlockStream:
    """Stands in for QwenImageTransformer.run_blocks: same signature, weights fetched ahead of use."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device):
        self.blocks, self.device = blocks, device
        self.copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self.copies is not None:  # pinned memory makes the host-to-device copies asynchronous
            for t in [*blocks.parameters(), *blocks.buffers()]:
                t.data = t.data.pin_memory()

    def fetch(self, block: nn.Module) -> tuple[dict, torch.cuda.Event | None]:
        """The block's tensors on the device, and the event that marks their copy done."""
        with torch.cuda.stream(self.copies) if self.copies is not None else nullcontext():
            state = {name: t.to(self.device, non_blocking=True) for name, t in block.state_dict().items()}
            done = torch.cuda.Event() if self.copies is not None else None
            if done is not None:
                done.record(self.copies)
        return state, done

    def __call__(self, img, txt, vec, rope, plan):
        ahead = self.fetch(self.blocks[0])
        for i, block in enumerate(self.blocks):
            state, done = ahead
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)
                for t in state.values():  # memory from the copy stream is now used on this one too
                    t.record_stream(torch.cuda.current_stream(self.device))
            if i + 1 < len(self.blocks):
                ahead = self.fetch(self.blocks[i + 1])  # overlaps with this block's compute
            img, txt = functional_call(block, state, (img, txt, vec, rope, plan))
            del state
        return img, txt


def place_for_streaming(transformer: nn.Module, device: torch.device) -> None:
    """Everything but the blocks to the device; the blocks stay on the CPU and are streamed."""
    for name, child in transformer.named_children():
        if name != "transformer_blocks":
            child.to(device)
    transformer.run_blocks = BlockStream(transformer.transformer_blocks, device)
