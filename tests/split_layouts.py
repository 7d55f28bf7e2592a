"""A tiny model folder's parts written as the single files ComfyUI, stable-diffusion.cpp and llama.cpp users have.

The names come from the tools' own code where the test environment has it (gguf-py's tensor name maps, which
llama.cpp's convert_hf_to_gguf.py writes by), else from the published layouts cited beside each writer; the
VAE's Wan names are checked against diffusers' own converter in test_split_files.py.
"""

import json
from pathlib import Path

import numpy as np
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from qimg.weights.comfy_files import wan_vae_key


def folder_tensors(part: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(part.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def comfy_text_encoder(folder: Path, path: Path, dtype: torch.dtype | None = None) -> Path:
    """ComfyUI's qwen_2.5_vl_7b.safetensors: the Qwen2.5-VL checkpoint's own names (`model.*`, `visual.*`,
    `lm_head.weight`) in one file (comfy/text_encoders/llama.py, Qwen25_7BVLI)."""
    state = folder_tensors(folder / "text_encoder")
    save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}, str(path))
    return path


def scaled_fp8_text_encoder(folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """ComfyUI's legacy scaled fp8 (comfy/utils.py convert_old_quants): a `scaled_fp8` marker tensor, each
    language-model linear as float8_e4m3fn `<layer>.weight` with a float32 `<layer>.scale_weight`; returns the
    weights the file holds, dequantized (W = fp8 * scale)."""
    state, held = folder_tensors(folder / "text_encoder"), {}
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in state.items():
        if k.startswith("model.layers.") and k.endswith("proj.weight"):
            scale = v.abs().max().float() / 448
            q = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k], out[k.removesuffix(".weight") + ".scale_weight"] = q, scale.reshape(())
            held[k] = q.float() * scale
        else:
            out[k], held[k] = v, v
    save_file(out, str(path))
    return held


def _tokenizer_metadata(writer: GGUFWriter, folder: Path, rows: int) -> None:
    """The tokenizer as llama.cpp's converter writes a Qwen2 one (_set_vocab_gpt2): tokens by id, added tokens
    as CONTROL (special) or USER_DEFINED, unused rows up to the embedding's as [PADn] UNUSED; merges "a b"."""
    data = json.loads((folder / "tokenizer" / "tokenizer.json").read_text())
    by_id = {i: (t, 1) for t, i in data["model"]["vocab"].items()}
    by_id.update({a["id"]: (a["content"], 3 if a["special"] else 4) for a in data["added_tokens"]})
    tokens = [by_id.get(i, (f"[PAD{i}]", 5)) for i in range(rows)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([t for t, _ in tokens])
    writer.add_token_types([k for _, k in tokens])
    merges = data["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])


def _write(writer: GGUFWriter, tensors: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Matrices as `kind`, vectors F32 (as llama.cpp's converter does); returns what the file holds."""
    held = {}
    for name, t in tensors.items():
        w = t.float().numpy()
        k = kind if w.ndim == 2 and w.shape[1] % 32 == 0 else "F32"
        data = quantize(w, GGMLQuantizationType[k])
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[k])
        held[name] = torch.from_numpy(np.array(dequantize(data, GGMLQuantizationType[k]), np.float32)).reshape(t.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def gguf_text_encoder(folder: Path, path: Path, kind: str = "F32", arch: str = "qwen2vl") -> dict[str, torch.Tensor]:
    """llama.cpp's Qwen2.5-VL text GGUF (Qwen2VLModel): the language model under gguf-py's qwen2vl names, no
    q/k permutation, the vision tower left out; returns {checkpoint name: what the file holds}."""
    state = {k: v for k, v in folder_tensors(folder / "text_encoder").items() if not k.startswith("visual.")}
    blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    names = get_tensor_name_map(MODEL_ARCH.QWEN2VL, blocks)
    writer = GGUFWriter(str(path), arch=arch)
    writer.add_block_count(blocks)
    _tokenizer_metadata(writer, folder, state["model.embed_tokens.weight"].shape[0])
    gguf_names = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in state}
    held = _write(writer, {g: state[k] for g, k in gguf_names.items()}, kind)
    return {gguf_names[g]: t for g, t in held.items()}


def mmproj(folder: Path, path: Path, projector: str = "qwen2.5vl_merger") -> dict[str, torch.Tensor]:
    """llama.cpp's mmproj for Qwen2.5-VL (Qwen2VLVisionModel): qkv split in q, k, v and the Conv3d patch kernel
    in two 2-D kernels (`v.patch_embd.weight`, `.weight.1`), names by gguf-py's MMPROJ map; F32 throughout.
    Returns the checkpoint's visual.* tensors it holds."""
    state = {k: v for k, v in folder_tensors(folder / "text_encoder").items() if k.startswith("visual.")}
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("visual.blocks."))
    names = get_tensor_name_map(MODEL_ARCH.MMPROJ, max(depth, 3))  # mm.2 is "block" 2 of the map
    split = {}
    for k, v in state.items():
        if ".attn.qkv." in k:
            for part, rows in zip("qkv", v.chunk(3)):
                split[k.replace(".qkv.", f".{part}.")] = rows
        elif k == "visual.patch_embed.proj.weight":
            split[k], split[k + ".1"] = v[:, :, 0], v[:, :, 1]
        else:
            split[k] = v
    out = {}
    for k, v in split.items():
        base = names.get_name(k.removesuffix(".1"), try_suffixes=(".weight", ".bias"))
        out[base + (".1" if k.endswith(".1") else "")] = v.contiguous()
    writer = GGUFWriter(str(path), arch="clip")
    writer.add_string("clip.projector_type", projector)
    _write(writer, out, "F32")
    return state


def wan_vae(folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """The folder's VAE under the original Wan 2.1 names (qwen_image_vae.safetensors): the inverse of qimg's map,
    which test_split_files checks against diffusers' convert_wan_vae_to_diffusers. Returns the Wan dict."""
    state = folder_tensors(folder / "vae")
    wan = {}
    for name in _wan_names(set(state)):
        wan[name] = state[wan_vae_key(name)]
    save_file(wan, str(path))
    return wan


def _wan_names(diffusers_names: set[str]) -> list[str]:
    """For each diffusers name, the one Wan name (of every name a Wan VAE can have) wan_vae_key sends to it."""
    blocks = ("residual.0.", "residual.2.", "residual.3.", "residual.6.", "shortcut.", "resample.1.", "time_conv.")
    tops = ["conv1.", "conv2.", "encoder.conv1.", "decoder.conv1.", "encoder.head.0.", "encoder.head.2.",
            "decoder.head.0.", "decoder.head.2."]
    out = []
    for n in diffusers_names:
        tail = n.rsplit(".", 1)[1]
        pool = [t + tail for t in tops] + [f"{s}.middle.{i}.{r}{tail}" for s in ("encoder", "decoder")
                                           for i in range(3) for r in ("residual.0.", "residual.2.", "residual.3.",
                                                                       "residual.6.", "norm.", "to_qkv.", "proj.")]
        pool += [f"{s}.{i}.{r}{tail}" for s in ("encoder.downsamples", "decoder.upsamples") for i in range(16)
                 for r in blocks]
        hits = [w for w in pool if wan_vae_key(w) == n]
        assert len(hits) == 1, (n, hits)
        out.append(hits[0])
    return out
