"""Running a model larger than the device's memory: transformer blocks streamed from CPU memory.

The blocks' weights stay in (pinned) CPU memory; each block is copied to the device just before its turn,
on a side CUDA stream while the previous block computes, and dropped after. Only the block being run and
the next one are ever resident. On the CPU the copies are no-ops and the numbers are unchanged.
"""

from contextlib import nullcontext
from functools import partial

import torch
from torch import nn
from torch.func import functional_call


class BlockStream:
    """The blocks with their weights fetched ahead of use. Called, it stands in for QwenImageTransformer.run_blocks
    (same signature); iterated, it gives each block in turn as a callable on the device copy of its weights, for a
    stack that threads more than the hidden states (Qwen-Image-2.1's, with its per-block prefix cache)."""

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

    def __iter__(self):
        """Each block as a callable on its weights' device copy; the next block's copy is under way while the
        caller runs this one, and this one's is dropped when the caller asks for the next."""
        ahead = self.fetch(self.blocks[0])
        for i, block in enumerate(self.blocks):
            state, done = ahead
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)
                for t in state.values():  # memory from the copy stream is now used on this one too
                    t.record_stream(torch.cuda.current_stream(self.device))
            if i + 1 < len(self.blocks):
                ahead = self.fetch(self.blocks[i + 1])  # overlaps with this block's compute
            held = [state]  # the caller's callable reaches the copy only through this, emptied on its next ask,
            del state  # so the copy is freed before the block after next is fetched: two blocks resident at most
            yield partial(run_with, block, held)
            held.clear()

    def __call__(self, img, txt, vec, rope, plan):
        for block in self:
            img, txt = block(img, txt, vec, rope, plan)
        return img, txt


def run_with(block: nn.Module, held: list[dict], *args):
    """The block's forward on the device copy of its tensors (held[0]) in place of its own."""
    return functional_call(block, held[0], args)


def place_for_streaming(transformer: nn.Module, device: torch.device) -> None:
    """Everything but the blocks to the device; the blocks stay on the CPU and are streamed: a transformer with a
    `stream` slot (Qwen-Image-2.1's) iterates the stream itself, the 20B's run_blocks is replaced by it."""
    for name, child in transformer.named_children():
        if name != "transformer_blocks":
            child.to(device)
    stream = BlockStream(transformer.transformer_blocks, device)
    if hasattr(transformer, "stream"):
        transformer.stream = stream
    else:
        transformer.run_blocks = stream
