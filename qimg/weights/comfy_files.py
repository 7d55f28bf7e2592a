"""Key maps of the split files ComfyUI and stable-diffusion.cpp users have, onto qimg's modules (pure functions).

* The VAE in the original Wan 2.1 naming (`qwen_image_vae.safetensors`: `encoder.downsamples.N.residual.M`, ...)
  -> diffusers' `AutoencoderKLQwenImage` names, which qimg's VAE uses (diffusers' `convert_wan_vae_to_diffusers`).
* A llama.cpp GGUF text encoder (architecture `qwen2vl`: `token_embd`, `blk.N.attn_q`, ...) -> the Qwen2.5-VL
  checkpoint names (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ...). llama.cpp's converter maps
  Qwen2's names only: unlike Llama's, its q/k rows are not permuted, so a tensor is the checkpoint's as it is.
* A llama.cpp mmproj GGUF (architecture `clip`, projector `qwen2.5vl_merger`) -> the checkpoint's `visual.*`
  names; its converter splits the fused qkv rows in three and the Conv3d patch kernel in two 2-D kernels, which
  `join_vision` puts back.
* `part_of`: which part of the model a file's names say it holds, to refuse a file given for the wrong part.
"""

import re

import torch

# --- the VAE -------------------------------------------------------------------------------------------------

WAN_MARK = "decoder.middle.0.residual.0.gamma"  # only the Wan naming has it (ComfyUI detects the VAE by it)
RESIDUAL = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."), ("residual.6.", "conv2."),
            ("shortcut.", "conv_shortcut."))  # a residual block's layers; resample.* and time_conv.* keep their names
SIDES = {"conv1.": "conv_in.", "head.0.": "norm_out.", "head.2.": "conv_out."}  # in the encoder and the decoder


def _residual(rest: str) -> str:
    return next((new + rest[len(old):] for old, new in RESIDUAL if rest.startswith(old)), rest)


def wan_vae_key(key: str, res_blocks: int = 2) -> str | None:
    """A Wan 2.1 VAE key -> its diffusers name; None for a key no Wan VAE has. The decoder's `upsamples` are one
    flat list, res_blocks + 1 residual blocks then an upsampler per up block (none after the last)."""
    for old, new in (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")):
        if key.startswith(old):
            return new + key[len(old):]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    for old, new in SIDES.items():
        if rest.startswith(old):
            return f"{side}.{new}{rest[len(old):]}"
    m = re.fullmatch(r"(middle|downsamples|upsamples)\.(\d+)\.(.+)", rest)
    if m is None:
        return None
    where, i, tail = m.group(1), int(m.group(2)), m.group(3)
    if where == "middle":
        return f"{side}.mid_block.attentions.0.{tail}" if i == 1 else \
            f"{side}.mid_block.resnets.{i // 2}.{_residual(tail)}"
    if where == "downsamples" and side == "encoder":
        return f"encoder.down_blocks.{i}.{_residual(tail)}"
    if where == "upsamples" and side == "decoder":
        block, r = divmod(i, res_blocks + 2)
        if r == res_blocks + 1:
            return f"decoder.up_blocks.{block}.upsamplers.0.{tail}"
        return f"decoder.up_blocks.{block}.resnets.{r}.{_residual(tail)}"
    return None


# --- llama.cpp's text encoder and mmproj ---------------------------------------------------------------------

TEXT_ARCHITECTURES = {"qwen2vl": "Qwen2.5-VL's language model"}
VISION_ARCHITECTURES = {"clip": "Qwen2.5-VL's vision tower (mmproj)"}
VISION_PROJECTOR = "qwen2.5vl_merger"  # clip.projector_type of Qwen2.5-VL's mmproj files
TEXT_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
TEXT_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
VISION_TOP = {"v.patch_embd.weight": "visual.patch_embed.proj.weight",
              "v.patch_embd.weight.1": "visual.patch_embed.proj.weight.1",  # the second frame's kernel
              "v.post_ln.weight": "visual.merger.ln_q.weight", "v.post_ln.bias": "visual.merger.ln_q.bias"}
VISION_BLOCK = {"attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_out": "attn.proj", "ln1": "norm1",
                "ln2": "norm2", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_text_key(name: str) -> str | None:
    """A llama.cpp qwen2vl tensor name -> the checkpoint's; None for a name that model has not."""
    if name in TEXT_TOP:
        return TEXT_TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m is None or m.group(2) not in TEXT_BLOCK:
        return None
    return f"model.layers.{m.group(1)}.{TEXT_BLOCK[m.group(2)]}.{m.group(3)}"


def mmproj_key(name: str) -> str | None:
    """A llama.cpp mmproj tensor name -> the checkpoint's (split q/k/v and patch kernels: join_vision joins
    them); None for a name Qwen2.5-VL's vision tower has not."""
    if name in VISION_TOP:
        return VISION_TOP[name]
    m = re.fullmatch(r"mm\.([02])\.(weight|bias)", name)
    if m:
        return f"visual.merger.mlp.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m is None or m.group(2) not in VISION_BLOCK:
        return None
    return f"visual.blocks.{m.group(1)}.{VISION_BLOCK[m.group(2)]}.{m.group(3)}"


def join_vision(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmproj_key's names -> the checkpoint's: q, k, v rows stacked into qkv; the two frames' 2-D patch kernels
    into the Conv3d kernel (out, in, frame, h, w). A part missing stays unjoined, for the key check to name."""
    out = dict(tensors)
    for name in [n for n in tensors if re.search(r"\.attn\.q\.(weight|bias)$", n)]:
        parts = [name.replace(".attn.q.", f".attn.{x}.") for x in "qkv"]
        if all(p in out for p in parts):
            out[name.replace(".attn.q.", ".attn.qkv.")] = torch.cat([out.pop(p) for p in parts])
    first = VISION_TOP["v.patch_embd.weight"]
    if first in out and first + ".1" in out:
        out[first] = torch.stack([out[first], out.pop(first + ".1")], dim=2)
    return out


# --- which part a file holds ---------------------------------------------------------------------------------

PARTS = {"transformer": "--transformer", "text encoder": "--text-encoder", "VAE": "--vae",
         "vision tower": "--vision"}


TEXT_EMBEDDINGS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "token_embd.weight")
TEXT_LAYER = re.compile(r"(?:model\.(?:language_model\.)?layers|blk)\.(\d+)\.")


def text_size(shapes: dict) -> tuple[int | None, int]:
    """(width, layers) of a text encoder from its tensors' shapes by the file's own names: the checkpoint's
    (`model.*`), transformers 5's (`model.language_model.*`) or llama.cpp's (`token_embd`, `blk.N`); the width is
    None without a token embedding."""
    width = next((shapes[k][1] for k in TEXT_EMBEDDINGS if k in shapes), None)
    return width, len({m.group(1) for n in shapes if (m := TEXT_LAYER.match(n))})


def qwen3(names) -> bool:
    """Whether a text encoder's tensor names are Qwen3's (Qwen-Image-2.1's Qwen3-VL, Z-Image's Qwen3): per-head
    q/k norms in its attention, which Qwen2.5-VL's has not; in transformers' names, the checkpoint's or ComfyUI's
    (`.self_attn.q_norm.`)."""
    return any(".self_attn.q_norm." in n for n in names)


def latent_channels(shapes: dict) -> int | None:
    """Channels of the latents a VAE file makes (post_quant_conv's input; `conv2` in Wan's names), from its
    tensors' shapes; None without that layer."""
    shape = shapes.get("post_quant_conv.weight") or shapes.get("conv2.weight")
    return shape[1] if shape else None


def part_of(names) -> str | None:
    """"transformer", "text encoder", "VAE" or "vision tower", as a file's tensor names (any of the layouts above,
    a ComfyUI all-in-one prefix already stripped) say; None when they say none of these."""
    names = set(names)
    if any(n.startswith(("transformer_blocks.", "img_in.")) for n in names):
        return "transformer"
    if names.intersection(TEXT_EMBEDDINGS):
        return "text encoder"
    if any(n.startswith("decoder.") for n in names):
        return "VAE"
    if any(n.startswith(("visual.", "model.visual.", "v.blk.")) for n in names):
        return "vision tower"
    return None
