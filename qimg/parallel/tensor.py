"""Tensor parallelism on qimg's transformer with torch.distributed.tensor.parallel: in every block the q/k/v
projections of both streams and the MLPs' up projections are split by output (colwise), the attention outputs
and the MLPs' down projections by input (rowwise, one all-reduce each), and the modulation layers (a third of
the weights) colwise with their output gathered, so they are split too (diffusers' plan keeps them whole). The
small layers outside the blocks stay whole on every rank.

Qwen-Image-2.1 (one stream) splits the same way: q/k/v and the SwiGLU's gate and up projections colwise, the
attention output and the SwiGLU's down projection rowwise. Its modulation is one layer shared by every block,
outside them (0.13 GB of the 14.2 GB in bf16), and stays whole.

Each rank reads only its slices of the safetensors files (`load_split`), and fuses LoRAs into its slices. Packed
layers (GGUF, fp8) are refused: their blocks of quantized values do not split on these boundaries.
"""

from pathlib import Path

import torch
from torch import nn

from qimg.errors import QimgError, UsageError
from qimg.model.transformer import QwenImageTransformer, TransformerConfig
from qimg.model.transformer21 import QwenImage21Transformer, Transformer21Config

COLWISE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
           "img_mlp.net.0.proj", "txt_mlp.net.0.proj")
ROWWISE = ("attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "txt_mlp.net.2")
GATHERED = ("img_mod.1", "txt_mod.1")  # colwise, the output gathered whole for the chunk into six
COLWISE21 = ("attn.to_q", "attn.to_k", "attn.to_v", "img_mlp.proj", "img_mlp.gate_layer")  # Qwen-Image-2.1's
ROWWISE21 = ("attn.to_out.0", "img_mlp.out")


def block_plan(cfg=None) -> dict:
    """parallelize_module's plan for one block of the model of `cfg` (Qwen-Image's when None)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if isinstance(cfg, Transformer21Config):
        return {**{name: ColwiseParallel() for name in COLWISE21}, **{name: RowwiseParallel() for name in ROWWISE21}}
    return {**{name: ColwiseParallel() for name in COLWISE}, **{name: RowwiseParallel() for name in ROWWISE},
            **{name: ColwiseParallel(output_layouts=Replicate()) for name in GATHERED}}


def rank_bytes(module: nn.Module, ranks: int, itemsize: int, modulation: bool = True) -> int:
    """Weight bytes one of `ranks` tensor-parallel ranks holds for `module` (meta is enough): the planned layers
    of every block split (a rowwise layer's bias whole), every other weight whole. modulation=False: as if the
    modulation layers stayed whole (diffusers' plan), for comparison."""
    two = isinstance(module, QwenImage21Transformer)
    split = COLWISE21 if two else COLWISE + (GATHERED if modulation else ())
    total = 0
    for name, p in module.named_parameters():
        layer, _, kind = name.rpartition(".")
        inner = layer.split(".", 2)[-1] if layer.startswith("transformer_blocks.") else ""
        shared = inner in split or (inner in (ROWWISE21 if two else ROWWISE) and kind == "weight")
        total += p.numel() * itemsize // (ranks if shared else 1)
    return total


def check_source(file, quantize: str, what: str) -> None:
    """Tensor parallelism splits the model folder's dense weights: a --transformer file or --quantize is refused."""
    if file is not None:
        raise UsageError(f"{what} splits the model folder's dense safetensors weights; --transformer {file} "
                         "(GGUF or fp8, packed layers whose quantized blocks do not split by rows and columns, or "
                         "one file not read by slices) is not supported with it: leave --transformer out")
    if quantize != "none":
        raise UsageError(f"{what} splits dense weights; --quantize {quantize} packs them: leave it out")


def load_split(cfg: TransformerConfig | Transformer21Config, folder: Path, dtype: torch.dtype,
               device: torch.device, mesh, adapters=()) -> nn.Module:
    """The transformer with every block split over `mesh` (1-D, the tensor-parallel ranks), this rank's slices
    read from the folder's safetensors (the others never leave the disk), every key and shape checked.
    adapters: the LoRAs' update sets (weights.adapters), each fused into this rank's slice of its layer."""
    from safetensors import SafetensorError, safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    from qimg.weights.folders import Contents, check_keys, safetensors_files

    with torch.device("meta"):
        module = (QwenImage21Transformer if isinstance(cfg, Transformer21Config) else QwenImageTransformer)(cfg)
    expected = module.state_dict()
    for block in module.transformer_blocks:
        parallelize_module(block, mesh, block_plan(cfg))
    params = dict(module.named_parameters())
    rank, ranks = mesh.get_local_rank(), mesh.size()
    shapes, contents, state = {}, Contents(), {}
    for file in safetensors_files(folder):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    shapes[key] = tuple(part.get_shape())
                    if key not in params or tuple(params[key].shape) != shapes[key]:
                        continue  # check_keys names it below
                    state[key] = contents.check(_slice(part, params[key], rank, ranks), file, key)
        except (SafetensorError, OSError) as e:
            raise QimgError(f"{file} is not a readable safetensors file ({e}); download it again") from None
    check_keys(folder, expected, shapes)
    contents.all_zero(folder)
    for name, param in params.items():
        local = state[name].to(device=device, dtype=dtype)
        updates = [one[name.removesuffix(".weight")] for one in adapters if name.removesuffix(".weight") in one]
        if updates and name.endswith(".weight"):
            local = _fused(local, updates, param, rank, ranks)
        if isinstance(param, DTensor):
            local = DTensor.from_local(local, mesh, param.placements, run_check=False)
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, nn.Parameter(local, requires_grad=False))
    return module.eval()


def _fused(local: torch.Tensor, updates, param, rank: int, ranks: int) -> torch.Tensor:
    """This rank's slice of a weight with its LoRA updates added, in float32 (weights.adapters' rule): a low-rank
    update's up factor sliced by output rows, or its down factor by input columns, as the weight is split."""
    from qimg.weights.adapters import factors

    shard = param.placements[0].dim if hasattr(param, "placements") and param.placements[0].is_shard() else None
    fused = local.float()
    for down, up in (factors(update, local.device) for update in updates):
        if up is None:  # a dense delta (LoKr, LoHa): sliced as the weight
            fused += down if shard is None else down.chunk(ranks, shard)[rank]
        elif shard == 0:
            fused.addmm_(up.chunk(ranks, 0)[rank], down)
        elif shard == 1:
            fused.addmm_(up, down.chunk(ranks, 1)[rank])
        else:
            fused.addmm_(up, down)
    return fused.to(local.dtype)


def _slice(part, param, rank: int, ranks: int) -> torch.Tensor:
    """This rank's slice of one checkpoint tensor (a safetensors slice), as `param`'s placement says."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor) or not param.placements[0].is_shard():
        return part[:]
    dim = param.placements[0].dim
    size = param.shape[dim] // ranks
    index = [slice(None)] * len(param.shape)
    index[dim] = slice(rank * size, (rank + 1) * size)
    return part[tuple(index)]
