"""How one image is spread over the processes of a torchrun: the degrees the options ask for, checked against
the launch and the model before anything loads, and where each rank sits. Pure and light (no torch): the job
layer checks a run with it before the process group starts.

Ranks form a grid (cfg, ulysses, tp), tp the fastest-varying: rank = (c * ulysses + u) * tp + t. The tensor
parallel ranks of one sequence shard are neighbours, so on a node their all-reduces take the nearest GPUs.
"""

import os
from dataclasses import dataclass
from typing import Mapping

from qimg.errors import UsageError

TIMEOUT = 600.0  # seconds a collective waits for the other ranks (QIMG_PARALLEL_TIMEOUT) before every rank stops


@dataclass(frozen=True)
class Layout:
    cfg: bool = False  # --cfg-parallel: two ranks, one branch of true CFG each
    ulysses: int = 1  # --ulysses N: the tokens split over N ranks, the heads for attention
    tp: int = 1  # --tp N: each layer's weights split over N ranks

    @property
    def world(self) -> int:
        return (2 if self.cfg else 1) * self.ulysses * self.tp

    @property
    def named(self) -> str:
        """The options given, for messages: `--cfg-parallel and --ulysses 2`."""
        given = ("--cfg-parallel" if self.cfg else "", f"--ulysses {self.ulysses}" if self.ulysses > 1 else "",
                 f"--tp {self.tp}" if self.tp > 1 else "")
        return " and ".join(g for g in given if g)

    @property
    def product(self) -> str:
        """The world size as the options make it, for messages: `2 x 2 x 1 = 4`."""
        return f"{2 if self.cfg else 1} (--cfg-parallel) x {self.ulysses} (--ulysses) x {self.tp} (--tp) = {self.world}"

    def report(self) -> dict:
        """The layout as --json reports it beside a result."""
        return {"cfg_parallel": self.cfg, "ulysses": self.ulysses, "tp": self.tp, "ranks": self.world}

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(cfg, ulysses, tp) position of `rank`."""
        return rank // (self.ulysses * self.tp), rank // self.tp % self.ulysses, rank % self.tp

    def check_heads(self, heads: int) -> None:
        """Ulysses gives each rank heads / (ulysses * tp) heads, tensor parallelism heads / tp: both must divide."""
        split = self.ulysses * self.tp
        if split > 1 and heads % split:
            valid = [d for d in range(2, heads + 1) if heads % (d * self.tp) == 0] if self.ulysses > 1 else \
                [d for d in range(2, heads + 1) if heads % d == 0]
            option = f"--ulysses {self.ulysses}" + (f" with --tp {self.tp}" if self.ulysses > 1 and self.tp > 1
                                                    else "") if self.ulysses > 1 else f"--tp {self.tp}"
            raise UsageError(f"{option}: the model has {heads} attention heads, which {split} does not divide; valid "
                             f"{option.split()[0]} degrees here: {', '.join(map(str, valid)) or 'none'}")


def check_world(layout: Layout, env: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, checked against the options' product."""
    if not env.get("WORLD_SIZE", "").strip() or not env.get("RANK", "").strip():
        raise UsageError(f"{layout.named} runs one image on {layout.world} processes: start it with torchrun "
                         f"--nproc-per-node {layout.world} -m qimg ... (RANK and WORLD_SIZE are not set)")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    except ValueError:
        raise UsageError(f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}: not whole numbers") from None
    if world != layout.world:
        raise UsageError(f"the options make {layout.product} processes, and WORLD_SIZE is {world}: start "
                         f"torchrun with --nproc-per-node {layout.world} (times the nodes), or change the degrees")
    return rank, world, local


def timeout(env: Mapping[str, str] = os.environ) -> float:
    text = env.get("QIMG_PARALLEL_TIMEOUT", "").strip()
    if not text:
        return TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 < value < 1e7:
        raise UsageError(f"QIMG_PARALLEL_TIMEOUT={text!r} is not a number of seconds above 0")
    return value


def exchanged_bytes(layout: Layout, dim: int, layers: int, txt: int, img: int, noisy: int, channels: int,
                    itemsize: int, rows: int = 1) -> dict[str, int]:
    """Bytes one rank sends per transformer call (one step) in each mode, computed from the shapes: txt and img
    tokens (img: noisy plus reference tokens), `channels` per token of velocity, `rows` batch rows this rank
    computes (2 for CFG's pair on one rank, 1 with --cfg-parallel). The inputs rank 0 broadcasts are not counted
    (the latent and the prompt: kilobytes to a few megabytes)."""
    sent = {}
    if layout.cfg:  # each rank's velocity to the other
        sent["cfg"] = rows * noisy * channels * itemsize
    if layout.ulysses > 1:  # q, k, v to heads and the output back (each rank keeps 1/N); the last all-gather
        n, width = layout.ulysses, dim // layout.tp
        local = -(-txt // n) + -(-img // n)  # each stream padded to a multiple of N
        sent["ulysses"] = rows * (layers * 4 * local * width * itemsize * (n - 1) // n
                                  + local * dim * itemsize * (n - 1))
    if layout.tp > 1:  # ring all-reduce of the four rowwise outputs, ring all-gather of the two modulations
        n, local = layout.tp, -(-txt // layout.ulysses) + -(-img // layout.ulysses)
        reduce = 2 * local * dim * itemsize * 2 * (n - 1) // n
        gather = 2 * 6 * dim * itemsize * (n - 1) // n
        sent["tp"] = rows * layers * (reduce + gather)
    return sent
