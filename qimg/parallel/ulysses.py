"""Ulysses sequence parallelism on qimg's transformer: each of N ranks holds 1/N of the text tokens and 1/N of the
image tokens through the blocks; for attention one all-to-all trades tokens for heads (every rank then sees the
whole sequence for heads/N heads) and one trades them back.

Any sequence length works: each stream is padded to a multiple of N (the last rank's shard ends in zero
tokens), and the pads are dropped before attention, so they are never keys. After the exchange the tokens are
in the one-process order, [text; image], so attention, the masks (text padding, inpaint's kept/rest split)
and the rope tables are the single-device ones, unchanged; every other op of a block works token by token. On
a CPU with the same thread count the result is bit-identical to one process (tests/parallel).
"""

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed all_gather_into_tensor (the older name still works there, with a warning)
gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def shard_length(tokens: int, ranks: int) -> int:
    return -(-tokens // ranks)


def padded(x: Tensor, length: int) -> Tensor:
    """(B, T, ...) zero-padded along dim 1 to `length` tokens."""
    extra = length - x.shape[1]
    return x if extra == 0 else torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)


class Exchange:
    """The two all-to-alls of one attention, for a sequence of `txt` text and `img` image tokens over the ranks of
    `group`; each rank's tokens are [its text shard; its image shard] (`shard_length` tokens each)."""

    def __init__(self, group, txt: int, img: int):
        self.group, self.ranks, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.txt, self.img = txt, img
        self.txt_shard, self.img_shard = shard_length(txt, self.ranks), shard_length(img, self.ranks)

    def shard(self, x: Tensor, total: int) -> Tensor:
        """This rank's shard of a (B, total, ...) stream."""
        size = shard_length(total, self.ranks)
        return padded(x, size * self.ranks)[:, self.rank * size:(self.rank + 1) * size]

    def _whole(self, parts: Tensor, dim: int) -> Tensor:
        """parts: (N, ...) one rank's tokens each, at `dim` -> the one-process [text; image] sequence at dim - 1."""
        parts = parts.movedim(0, dim - 1)  # (..., N, shard, ...)
        txt = parts.narrow(dim, 0, self.txt_shard).flatten(dim - 1, dim).narrow(dim - 1, 0, self.txt)
        img = parts.narrow(dim, self.txt_shard, self.img_shard).flatten(dim - 1, dim).narrow(dim - 1, 0, self.img)
        return torch.cat([txt, img], dim=dim - 1)

    def to_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, shard, H, D) each -> (B, S + L, H/N, D): every token, this rank's heads."""
        x = torch.stack([q, k, v]).unflatten(3, (self.ranks, -1)).movedim(3, 0).contiguous()  # (N, 3, B, T, h, D)
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        return self._whole(out, 3).unbind(0)

    def to_tokens(self, x: Tensor) -> Tensor:
        """(B, S + L, h*D) attention output for this rank's heads -> (B, shard, H*D): this rank's tokens."""
        txt = padded(x[:, :self.txt], self.txt_shard * self.ranks).unflatten(1, (self.ranks, -1))
        img = padded(x[:, self.txt:], self.img_shard * self.ranks).unflatten(1, (self.ranks, -1))
        y = torch.cat([txt, img], dim=2).movedim(1, 0).contiguous()  # (N, B, T, h*D)
        out = torch.empty_like(y)
        dist.all_to_all_single(out, y, group=self.group)
        return out.movedim(0, 2).flatten(2)  # (B, T, N * h*D), heads in rank order

    def gather(self, txt: Tensor, img: Tensor) -> tuple[Tensor, Tensor]:
        """Every rank's (B, shard, dim) text and image tokens -> the whole streams, in order."""
        local = torch.cat([txt, img], dim=1).contiguous()
        parts = torch.empty(self.ranks * local.shape[0], *local.shape[1:], dtype=local.dtype, device=local.device)
        gather_into(parts, local, group=self.group)
        whole = self._whole(parts.unflatten(0, (self.ranks, -1)), 2)
        return whole[:, self.txt:], whole[:, :self.txt]


def sequence_parallel(run_blocks, group):
    """`run_blocks` (the transformer's block stack) run on this rank's shard of the tokens, the attention's
    all-to-alls in the plan (AttentionPlan.exchange); returns the whole streams, as the stack alone does."""

    def run(img: Tensor, txt: Tensor, vec: Tensor, rope, plan):
        exchange = Exchange(group, txt.shape[1], img.shape[1])
        noisy = None if plan.noisy is None else \
            min(max(plan.noisy - exchange.rank * exchange.img_shard, 0), exchange.img_shard)
        local = plan._replace(noisy=noisy, exchange=exchange)
        img_part, txt_part = run_blocks(exchange.shard(img, img.shape[1]), exchange.shard(txt, txt.shape[1]), vec,
                                        rope, local)
        return exchange.gather(txt_part, img_part)

    return run



def sequence_parallel21(run_blocks, group):
    """Qwen-Image-2.1's `run_blocks` on this rank's shard of the tokens: its two streams are the prefix (none when
    the prefix cache is read) and the target, each padded and sharded; the prefix's tokens take the modulation's
    first row, so the split is the prefix shard's length. The keys and values each block returns are this rank's
    heads for every token (the prefix cache holds them so)."""

    def run(x: Tensor, mod: Tensor, split, layout, past, extract: bool):
        prefix = layout.prefix if past is None else 0  # x's tokens before the target's
        exchange = Exchange(group, prefix, x.shape[1] - prefix)
        local = torch.cat([exchange.shard(x[:, :prefix], prefix), exchange.shard(x[:, prefix:], exchange.img)], 1)
        local, cache = run_blocks(local, mod, None if split is None else exchange.txt_shard,
                                  dataclasses.replace(layout, exchange=exchange), past, extract)
        target, before = exchange.gather(local[:, :exchange.txt_shard], local[:, exchange.txt_shard:])
        return torch.cat([before, target], 1), cache

    return run
