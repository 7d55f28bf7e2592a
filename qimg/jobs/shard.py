"""Dividing a batch between processes that never talk to each other: `--shard I/N` keeps the inputs whose
stable hash of the name falls in shard I, so every process of a torchrun, a Slurm array or an ssh loop
takes its own part, and adding inputs later moves none of the others. Pure: the names in, the part out."""

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, TypeVar

from qimg.errors import UsageError

T = TypeVar("T")
TORCHRUN = ("RANK", "WORLD_SIZE")
SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")


@dataclass(frozen=True)
class Shard:
    index: int  # from 0, as torchrun's RANK
    count: int
    local_rank: Optional[int] = None  # torchrun's LOCAL_RANK: which GPU of its node this process takes

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse(value: str, env: Mapping[str, str] = os.environ) -> Shard:
    """`--shard I/N` (I from 0 to N-1) or `--shard auto` (from the environment, `from_env`)."""
    if value.strip().lower() == "auto":
        return from_env(env)
    m = re.fullmatch(r"\s*(\d{1,9})\s*/\s*(\d{1,9})\s*", value)
    if not m:
        raise UsageError(f"--shard {value!r} is not I/N (0/4 is the first of 4 shards) or auto")
    return checked(int(m[1]), int(m[2]), f"--shard {value}")


def checked(index: int, count: int, what: str, local_rank: Optional[int] = None) -> Shard:
    if count < 1:
        raise UsageError(f"{what}: the number of shards must be at least 1")
    if not 0 <= index < count:
        raise UsageError(f"{what}: shards count from 0, so the index must be 0 to {count - 1}")
    return Shard(index, count, local_rank)


def from_env(env: Mapping[str, str]) -> Shard:
    """This process's shard from torchrun's RANK and WORLD_SIZE (LOCAL_RANK for its GPU) or a Slurm array
    task's SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (counted from SLURM_ARRAY_TASK_MIN in steps of
    SLURM_ARRAY_TASK_STEP, so `--array=1-8` makes shards 0 to 7). Under both (torchrun in each task of an
    array) every rank of every task takes its own shard: task t's rank r is shard t * WORLD_SIZE + r."""
    ranks = _pair(env, TORCHRUN, "torchrun")
    tasks = _pair(env, SLURM, "a Slurm array job")
    if ranks is None and tasks is None:
        raise UsageError(f"--shard auto found neither {' and '.join(TORCHRUN)} (torchrun) nor "
                         f"{' and '.join(SLURM)} (a Slurm array job) in the environment; give --shard I/N")
    if tasks is not None:
        task_id, task_count = tasks
        low, step = _int(env, "SLURM_ARRAY_TASK_MIN", 0), _int(env, "SLURM_ARRAY_TASK_STEP", 1)
        if step < 1 or (task_id - low) % step:
            raise UsageError(f"--shard auto: SLURM_ARRAY_TASK_ID {task_id} is not SLURM_ARRAY_TASK_MIN {low} plus "
                             f"a multiple of SLURM_ARRAY_TASK_STEP {step}; use a range (--array=0-N) or --shard I/N")
        tasks = ((task_id - low) // step, task_count)
        if tasks[0] >= task_count:
            raise UsageError(f"--shard auto: SLURM_ARRAY_TASK_ID {task_id} is past the {task_count} tasks counted from "
                             f"SLURM_ARRAY_TASK_MIN {low}; use a range (--array=0-N) or --shard I/N")
    index, count = tasks or (0, 1)
    if ranks is not None:
        index, count = index * ranks[1] + ranks[0], count * ranks[1]
    local = _int(env, "LOCAL_RANK", -1) if ranks is not None else -1
    names = ", ".join(f"{k}={env[k]}" for k in (*TORCHRUN, *SLURM, "SLURM_ARRAY_TASK_MIN") if k in env)
    return checked(index, count, f"--shard auto ({names})", local if local >= 0 else None)


def _pair(env: Mapping[str, str], names: tuple[str, str], what: str) -> Optional[tuple[int, int]]:
    given = [n for n in names if env.get(n, "").strip()]
    if not given:
        return None
    if len(given) < 2:
        missing = next(n for n in names if n not in given)
        raise UsageError(f"--shard auto: {given[0]} is set but {missing} is not; is this {what}? Give --shard I/N")
    return _int(env, names[0], 0), _int(env, names[1], 0)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    if not re.fullmatch(r"-?\d{1,9}", text):
        raise UsageError(f"--shard auto: {name}={text!r} is not a whole number")
    return int(text)


def key(name: str) -> int:
    """A name's place among shards: sha256, stable across processes, machines and Python versions (Python's
    own hash() of a string changes with every process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big")


def select(items: Iterable[T], name: Callable[[T], str], shard: Optional[Shard]) -> list[T]:
    """The items of `shard` (all of them when None), in their order; `name(item)` is the item's name relative
    to the batch's root, the same in every process whatever its working folder or mount point."""
    items = list(items)
    if shard is None:
        return items
    return [item for item in items if key(name(item)) % shard.count == shard.index]


def rank_device(picked: str, local_rank: Optional[int], gpus: int) -> str:
    """The device of a torchrun process given --device auto, which picked `picked`: with CUDA, GPU LOCAL_RANK
    of this node (modulo the GPUs it sees, so a scheduler that shows each process one GPU works too)."""
    if local_rank is None or not picked.startswith("cuda") or gpus < 1:
        return picked
    return f"cuda:{local_rank % gpus}"
