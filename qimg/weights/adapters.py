"""Low-rank and Kronecker adapters (LoRA, LoKr, LoHa) on a model's linear layers: each one's weight update as a
pure function, and the one step that applies a list of them to a loaded model.

A plain `nn.Linear` gets the updates fused into its weight (summed in float32, cast back once), so sampling runs
exactly as fast as without them. A layer that is not a plain Linear (a packed quantized one) keeps its weights
and takes each update as a side branch through its `add_branch(down, up)`: y += (x @ down.T) @ up.T, the scale
folded into `up`; a dense update comes as `down` (out, in) with `up=None`.
"""

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

KINDS = ("lora", "lokr", "loha")
ROWS = 1024  # weight rows fused at a time: the float32 temporaries stay small beside the largest layer


@dataclass(frozen=True)
class Adapter:
    """One linear layer's update, its factors as the file stores them (any dtype, on the CPU).

    lora: down (rank, in), up (out, rank): delta = scale * up @ down.
    lokr: w1 or w1_a @ w1_b, w2 or w2_a @ w2_b: delta = scale * kron(w1, w2).
    loha: w1_a @ w1_b and w2_a @ w2_b: delta = scale * (w1_a @ w1_b) * (w2_a @ w2_b).
    scale: the strength the user asked for times the file's own (alpha / rank and the like)."""

    kind: str
    tensors: Mapping[str, torch.Tensor]
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the layer it updates."""
        t = self.tensors
        if self.kind == "lora":
            return t["up"].shape[0], t["down"].shape[1]
        if self.kind == "loha":
            return t["w1_a"].shape[0], t["w1_b"].shape[1]
        (a, b), (c, d) = _factor_shape(t, "w1"), _factor_shape(t, "w2")
        return a * c, b * d


def _factor_shape(t: Mapping[str, torch.Tensor], name: str) -> tuple[int, int]:
    if name in t:
        return tuple(t[name].shape)
    return t[f"{name}_a"].shape[0], t[f"{name}_b"].shape[1]


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


def _factor(t: Mapping[str, torch.Tensor], name: str, device) -> torch.Tensor:
    if name in t:
        return _f32(t[name], device)
    return _f32(t[f"{name}_a"], device) @ _f32(t[f"{name}_b"], device)


def delta(adapter: Adapter, device=None) -> torch.Tensor:
    """The dense float32 update (out, in), scale included."""
    t = adapter.tensors
    if adapter.kind == "lora":
        return adapter.scale * (_f32(t["up"], device) @ _f32(t["down"], device))
    if adapter.kind == "loha":
        return adapter.scale * (_factor(t, "w1", device) * _factor(t, "w2", device))
    return adapter.scale * torch.kron(_factor(t, "w1", device), _factor(t, "w2", device))


def factors(adapter: Adapter, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(down, up) in float32 with the scale folded into up, so y += (x @ down.T) @ up.T; for an update that has
    no low-rank form (LoKr, LoHa) the dense delta (out, in) and None."""
    if adapter.kind == "lora":
        return _f32(adapter.tensors["down"], device), adapter.scale * _f32(adapter.tensors["up"], device)
    return delta(adapter, device), None


def layer_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a layer an adapter can target: a Linear, or any layer with `add_branch` that tells its
    out_features and in_features; None for anything else."""
    if isinstance(module, nn.Linear) or hasattr(module, "add_branch"):
        return module.out_features, module.in_features
    return None


def targets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every layer of `model` an adapter can update, by its name in the state dict, with its (out, in)."""
    return {name: shape for name, module in model.named_modules() if (shape := layer_shape(module)) is not None}


@torch.no_grad()
def apply_adapters(model: nn.Module, adapters: Sequence[Mapping[str, Adapter]]) -> None:
    """Apply every adapter set (one per LoRA file, names as `targets` gives them) to `model` in place: a Linear
    gets the sum of its updates fused into its weight, computed in float32 on the weight's device and cast to
    its dtype once; any other layer gets one `add_branch(down, up)` per update (see `factors`)."""
    modules = dict(model.named_modules())
    for name in dict.fromkeys(name for one in adapters for name in one):  # in order, each once
        module, updates = modules[name], [one[name] for one in adapters if name in one]
        if isinstance(module, nn.Linear):
            _fuse(module.weight, updates)
        else:
            for update in updates:
                module.add_branch(*factors(update, _device(module)))


def _fuse(w: torch.Tensor, updates: list[Adapter]) -> None:
    """w += the sum of the updates, in float32, ROWS rows at a time (a low-rank update never becomes dense)."""
    parts = [factors(update, w.device) for update in updates]
    for start in range(0, w.shape[0], ROWS):
        rows = w[start:start + ROWS]
        fused = rows.float()
        for down, up in parts:
            if up is None:  # a dense update
                fused += down[start:start + ROWS]
            else:
                fused.addmm_(up[start:start + ROWS], down)
        rows.copy_(fused)


def _device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
