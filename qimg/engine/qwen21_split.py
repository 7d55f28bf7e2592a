"""Qwen-Image-2.1 under --devices: the layer split's plan (engine/placement.py) from 2.1's own components, its
transformer's 32 blocks (their sizes from the weights' headers), the Qwen3-VL text encoder with its vision tower,
the RGBA VAE (built on the meta device), and the working memory at the model's default size."""

import torch

from qimg.engine import placement
from qimg.engine.memory import free_bytes, qwen21_activation_bytes


def plan21(engine) -> placement.Placement:
    """The placement of an Engine21's components over its --devices, sized by the devices' free memory now
    (before anything loads) or by --split."""
    from qimg.model.qwen3vl import Qwen3VLTextModel
    from qimg.model.qwen3vl_vision import Qwen3VLVisionTower
    from qimg.model.vae21 import QwenImage21VAE
    from qimg.weights.qwen3vl import configs
    from qimg.weights.qwen21 import transformer21_config, vae21_config
    from qimg.weights.transformer import tensor_sizes

    folder, itemsize = engine.folder, engine.dtype.itemsize
    cfg, vae_cfg = transformer21_config(folder), vae21_config(folder)
    blocks, rest = placement.by_block(tensor_sizes(cfg, folder / "transformer", engine.source, engine.dtype,
                                                   engine.device))
    text_cfg, vision_cfg = configs(folder / "text_encoder")
    with torch.device("meta"):
        text = sum(placement.module_bytes(m, itemsize) for m in (Qwen3VLTextModel(text_cfg),
                                                                  Qwen3VLVisionTower(vision_cfg)))
        vae = placement.module_bytes(QwenImage21VAE(vae_cfg), itemsize)
    work = qwen21_activation_bytes((engine.defaults.width, engine.defaults.height), [], cfg.dim,
                                   vae_cfg.decoder_base_dim or vae_cfg.base_dim, itemsize)
    names = [str(d) for d in engine.devices]
    return placement.plan(names, placement.Needs(blocks, rest, text, vae, work),
                          {name: free_bytes(torch.device(name)) for name in names}, engine.split)
