"""Qwen-Image-2.1 on the ranks of one image (group.py's plumbing, 2.1's call): a call is the latents, the timestep
and one or two branches (a guidance pair), each its text, its rope21.Layout and a key naming its prefix cache.

Every rank keeps its own PrefixCache per key: the branch it computes fills one at the first step and reads it
after. With --cfg-parallel each half of the grid computes one branch of a pair (its cache only on that half) and
the halves swap velocities; a single branch (no guidance, or --cfg-until's tail) runs on every rank. One process
computes a pair's branches one after the other, each a batch of one, so splitting them changes no operation:
the result is the one-process result bit for bit. The keys come from rank 0's caches (the engine's, one per
image and branch); a branch's text and Layout go out once, with its key's first call, and every rank keeps them
by key (later steps send the latents and the timestep alone); a cache no call names any more is dropped.
"""

import dataclasses
import itertools
import weakref

import torch
from torch import Tensor

from qimg.model.rope21 import Layout
from qimg.model.transformer21 import PrefixCache
from qimg.parallel.ulysses import gather_into

FIELDS = tuple(f.name for f in dataclasses.fields(Layout) if f.name != "exchange")  # what a call shares


class Ranked21:
    """On every rank: the transformer and this rank's prefix caches by key."""

    def __init__(self, module, group):
        self.module, self.group = module, group
        self.caches: dict[int, PrefixCache] = {}
        self.inputs: dict[int, tuple] = {}  # key -> the branch's (txt, Layout), as its first call sent them

    def compute(self, x: Tensor, t: Tensor, count: int, *flat) -> Tensor:
        """The velocities (count, target, channels) of the `count` branches in `flat` (txt, key, Layout fields;
        txt None: the key's stored ones)."""
        width, branches, new = 2 + len(FIELDS), [], set()
        for i in range(0, len(flat), width):
            txt, key = flat[i], flat[i + 1]
            if txt is not None:  # a branch's first call: its cache starts empty, whatever a key of that number
                new.add(key)     # held before (rank 0 numbers afresh when --offload model reloads the transformer)
            txt, layout = self.inputs[key] if txt is None else (txt, Layout(*flat[i + 2:i + width]))
            branches.append((txt, key, layout))
        self.inputs = {key: (txt, layout) for txt, key, layout in branches if key is not None}
        self.caches = {key: PrefixCache() if key in new else self.caches.get(key) or PrefixCache()
                       for _, key, _ in branches if key is not None}
        split = self.group.layout.cfg and count == 2
        mine = [branches[self.group.cfg_rank]] if split else branches
        with self.group.collective("a step's exchange"):
            out = [self.module(x, txt, t, layout, self.caches.get(key)) for txt, key, layout in mine]
            if not split:
                return torch.cat(out)
            both = torch.empty(2, *out[0].shape[1:], dtype=out[0].dtype, device=out[0].device)
            gather_into(both, out[0].contiguous(), group=self.group.mesh.get_group("cfg"))
            return both


class Driver21:
    """Rank 0's transformer: called as the module is (one branch) or with a guidance pair (`pair`); each call is
    shared with every rank and computed by all. Other attributes are the module's."""

    def __init__(self, ranked: Ranked21):
        self.ranked, self.module, self.group = ranked, ranked.module, ranked.group
        self.keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the engine's caches -> their keys
        self.counter = itertools.count()
        self.sent: set[int] = set()  # the keys whose text and Layout every rank holds

    def __call__(self, latents: Tensor, txt: Tensor, t: Tensor, layout: Layout,
                 cache: PrefixCache | None = None) -> Tensor:
        return self.pair(latents, t, [(txt, layout, cache)])[0]

    def pair(self, latents: Tensor, t: Tensor, branches: list[tuple]) -> list[Tensor]:
        """The velocity of each branch (txt, layout, cache), in order."""
        flat = []
        for txt, layout, cache in branches:
            key = None if cache is None else self.keys.setdefault(cache, next(self.counter))
            if key in self.sent:
                flat += [None, key, *[None] * len(FIELDS)]
            else:
                flat += [txt, key, *(getattr(layout, name) for name in FIELDS)]
                if key is not None:
                    self.sent.add(key)
        args = self.group.share((latents, t, len(branches), *flat))
        return list(self.group.compute(self.ranked, *args).split(1))

    def __getattr__(self, name):
        return getattr(self.module, name)


def wrap21(module, group):
    """The loaded 2.1 transformer set up for the group: rank 0's Driver21, the others' Ranked21 (group.serve)."""
    if group.layout.ulysses > 1:
        from qimg.parallel.ulysses import sequence_parallel21

        module.run_blocks = sequence_parallel21(module.run_blocks, group.mesh.get_group("sp"))
    ranked = Ranked21(module, group)
    return Driver21(ranked) if group.lead else ranked
