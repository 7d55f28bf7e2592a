"""The processes of one image: the process group torchrun's ranks join (NCCL on GPUs, gloo on the CPU), the grid
of sub-groups the modes talk in, and the split of work between rank 0 and the others.

Rank 0 runs the whole job (prompts, VAE, sampling loop, files, messages); every other rank only serves the
transformer: each call rank 0 makes is broadcast (its tensors and arguments), and all ranks compute it together,
each its part (`Driver`, `serve`). With --cfg-parallel each half of the grid takes one branch of a CFG pair and
the halves swap velocities; with --ulysses the ranks of a row split the tokens (ulysses.py); with --tp each layer's
weights (tensor.py). A collective that fails, or waits longer than the timeout for a rank that died or hangs,
stops that rank with one line (`collective`); every rank ends so, none hangs.
"""

import re
import warnings
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from qimg.errors import QimgError, QimgWarning, out_of_memory
from qimg.parallel.layout import Layout, check_world, timeout
from qimg.parallel.ulysses import gather_into

_started = None  # the Group of this process, once started


class Stopped(QimgError):
    """An exchange failed or timed out: each rank that sees it says so (which rank, doing what)."""


class Group:
    def __init__(self, layout: Layout, device: torch.device):
        self.layout = layout
        self.rank, self.world, self.local_rank = check_world(layout)
        self.timeout = timeout()
        self.device = device
        self.lead = self.rank == 0
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with self.collective("joining the other ranks"):
            dist.init_process_group(backend, timeout=timedelta(seconds=self.timeout),
                                    **({"device_id": device} if device.type == "cuda" else {}))
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device.type, (2 if layout.cfg else 1, layout.ulysses, layout.tp),
                                         mesh_dim_names=("cfg", "sp", "tp"))
        self.cfg_rank = self.mesh.get_local_rank("cfg")
        self.warned = False  # the --cfg-parallel at cfg <= 1 warning, said once
        self.broken = False  # an exchange failed: nothing more is sent

    @contextmanager
    def collective(self, what: str):
        """A failed or timed-out exchange as one line: this rank, what it was doing, and that every rank stops."""
        try:
            yield
        except (RuntimeError, ValueError, ConnectionError) as e:
            self.broken = True
            if out_of_memory(e):
                raise  # this rank's own failure, said as such
            raise Stopped(f"rank {self.rank} of {self.world}: {what} failed ({cause(e)}); another rank stopped or "
                          f"did not answer within {self.timeout:g} s (QIMG_PARALLEL_TIMEOUT): every rank stops") \
                from None

    def wrap(self, module):
        """The loaded transformer set up for this layout (its tensor-parallel weights already split at load): on
        rank 0 the Driver the engine calls, elsewhere the module `serve` runs."""
        from qimg.model.transformer21 import QwenImage21Transformer

        if isinstance(module, QwenImage21Transformer):
            from qimg.parallel.qwen21 import wrap21

            return wrap21(module, self)
        if self.layout.ulysses > 1:
            from qimg.parallel.ulysses import sequence_parallel

            module.run_blocks = sequence_parallel(module.run_blocks, self.mesh.get_group("sp"))
        return Driver(module, self) if self.lead else module

    def unguided(self, when: str = "at cfg <= 1") -> None:
        """A sampling run without true CFG (cfg <= 1) is starting: say once that --cfg-parallel gains nothing."""
        if self.layout.cfg and not self.warned:
            self.warned = True
            warnings.warn(f"--cfg-parallel does nothing {when} (one branch per step): both halves compute the "
                          "same branch; running", QimgWarning, stacklevel=3)

    def compute(self, module, *args) -> Tensor:
        """One transformer call on every rank, each its part; every rank returns the whole velocity. A failure
        here (out of memory, a signal) leaves the ranks out of step: nothing more is sent, the process's exit
        closes its connections and the others stop on that."""
        try:
            if hasattr(module, "compute"):  # Qwen-Image-2.1's (parallel/qwen21.py)
                return module.compute(*args)
            return self._compute(module, *args)
        except BaseException:
            self.broken = True
            raise

    def _compute(self, module, img: Tensor, txt: Tensor, mask, t: Tensor, grid, keep, refs) -> Tensor:
        rows = img.shape[0]
        split = self.layout.cfg and rows == 2  # a CFG pair: one row per half of the grid
        if split:
            i = self.cfg_rank
            img, txt, t = img[i:i + 1], txt[i:i + 1], t[i:i + 1]
            mask = None if mask is None else mask[i:i + 1]
        with self.collective("a step's exchange"):
            v = module(img, txt, mask, t, grid, keep, refs)
            if split:
                both = torch.empty(2, *v.shape[1:], dtype=v.dtype, device=v.device)
                gather_into(both, v.contiguous(), group=self.mesh.get_group("cfg"))
                v = both
        return v

    def share(self, args: tuple) -> tuple:
        """Rank 0's call arguments on every rank (None: stop serving). Tensors go by broadcast on the device."""
        with self.collective("receiving a call from rank 0" if not self.lead else "sending a call to the ranks"):
            box = [None]
            if self.lead and args is not None:
                box = [[("tensor", (tuple(a.shape), a.dtype)) if isinstance(a, Tensor) else ("value", a)
                        for a in args]]
            dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
            if box[0] is None:
                return None
            out = []
            for i, (kind, m) in enumerate(box[0]):
                if kind == "value":
                    out.append(m)
                    continue
                shape, dtype = m
                wire = torch.uint8 if dtype == torch.bool else dtype
                t = args[i].to(self.device).to(wire).contiguous() if self.lead else \
                    torch.empty(shape, dtype=wire, device=self.device)
                dist.broadcast(t, src=0)
                out.append(t.to(dtype))
            return tuple(out)

    def serve(self, module) -> None:
        """A rank other than 0: compute each call rank 0 shares until it says stop."""
        while (args := self.share(None)) is not None:
            self.compute(module, *args)

    def close(self) -> None:
        """Rank 0 tells the others to stop; then every rank leaves the group."""
        if self.lead:
            self.share(None)
        dist.destroy_process_group()


def cause(e: BaseException) -> str:
    """The first sentence of a collective's error, without the backend's source location ([.../pair.cc:537])."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0][:160]


class Driver:
    """Rank 0's transformer: a call is shared with every rank and computed by all; other attributes are the
    module's."""

    def __init__(self, module, group: Group):
        self.module, self.group = module, group

    def __call__(self, img, txt, mask, t, grid, keep=None, refs=()):
        args = self.group.share((img, txt, mask, t, tuple(grid), keep, tuple(map(tuple, refs))))
        return self.group.compute(self.module, *args)

    def __getattr__(self, name):
        return getattr(self.module, name)


def start(layout: Layout, device: torch.device) -> Group:
    global _started
    _started = Group(layout, device)
    return _started


def started() -> Group | None:
    return _started


def stop() -> None:
    """End this process's group: rank 0 releases the others. After a failed exchange nothing more is sent (a rank
    is gone or the link broken): the process's exit closes the connections."""
    global _started
    group, _started = _started, None
    if group is not None and not group.broken:
        try:
            group.close()
        except QimgError:
            pass  # the job's own result (or error) stands; the others time out on their own
