"""Qwen-Image-2.1's loaders on a tiny folder saved by diffusers (sharded transformer, single-file VAE): every
weight loaded as saved; ComfyUI single files (fused SwiGLU, prefixed keys) in bf16, scaled fp8 and GGUF Q8_0;
`--quantize fp8`; a missing weight or a bad config refused in one line."""

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel
from quant_files import write_gguf
from safetensors.torch import load_file, save_file

from qimg.errors import QimgError
from qimg.model.quant import PackedLinear, dequantize, quantize_fp8
from qimg.model.rope21 import build_layout
from qimg.model.transformer21 import Transformer21Config
from qimg.model.vae21 import VAE21Config
from qimg.weights.qwen21 import load_transformer21, load_vae21
from qimg.weights.transformer import Source

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]
CPU = torch.device("cpu")
PREFIX = "model.diffusion_model."


def listed(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 2.1 model folder's transformer (in three shards with an index) and VAE, random weights."""
    root = tmp_path_factory.mktemp("qwen21")
    torch.manual_seed(0)
    transformer = QwenImage21Transformer2DModel(**listed(Transformer21Config.tiny()))
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    transformer.save_pretrained(root / "transformer", max_shard_size="20KB")
    AutoencoderKLQwenImage21(**listed(VAE21Config.tiny())).save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def state(folder):
    return QwenImage21Transformer2DModel.from_pretrained(folder / "transformer").state_dict()


def same(loaded: dict, expected: dict, tol=0.0):
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert (loaded[k].float() - v.float()).abs().max() <= tol, k


def comfy(state: dict, convert=lambda k, v: v) -> dict:
    """ComfyUI's naming: prefixed keys, each block's gate_layer and proj fused into gate_up (gate rows first)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".img_mlp.proj.weight"):
            continue
        if k.endswith(".img_mlp.gate_layer.weight"):
            k, v = k.replace("gate_layer", "gate_up"), torch.cat([v, state[k.replace("gate_layer", "proj")]])
        out[PREFIX + k] = convert(k, v)
    return out


def test_folder_loads_every_weight_as_saved(folder, state):
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 1  # sharded, read through its index
    same(load_transformer21(folder, Source(), torch.float32, CPU).state_dict(), state)
    vae = AutoencoderKLQwenImage21.from_pretrained(folder / "vae").state_dict()
    same(load_vae21(folder, torch.float32, CPU).state_dict(), vae)
    decoder = load_vae21(folder, torch.float32, CPU, only=("decoder.", "post_quant_conv."))
    assert decoder.encoder.conv_in.weight.is_meta and not decoder.decoder.conv_in.weight.is_meta


def test_comfy_bf16_file_gives_the_folder_weights(tmp_path, folder, state):
    path = tmp_path / "qwen_image_2.1_bf16.safetensors"
    save_file(comfy(state, lambda k, v: v.to(torch.bfloat16)), path)
    loaded = load_transformer21(folder, Source(path), torch.float32, CPU).state_dict()
    same(loaded, {k: v.to(torch.bfloat16) for k, v in state.items()})


def own_storage(module) -> bool:
    """Every weight holds only its own bytes (a view of a fused tensor would keep the whole tensor alive)."""
    return all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in module.state_dict().values())


def test_split_gate_up_halves_do_not_keep_the_fused_tensor(tmp_path, folder, state):
    path = tmp_path / "qwen_image_2.1_bf16.safetensors"
    save_file(comfy(state, lambda k, v: v.to(torch.bfloat16)), path)
    assert own_storage(load_transformer21(folder, Source(path), torch.bfloat16, CPU))  # the file's dtype: no copy


def unfuse(state: dict) -> dict:
    """comfy()'s inverse: diffusers' names, gate_up split into gate_layer and proj."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix(PREFIX)
        if k.endswith("gate_up.weight"):
            out[k.replace("gate_up", "gate_layer")], out[k.replace("gate_up", "proj")] = v.chunk(2)
        else:
            out[k] = v
    return out


def fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w as scaled fp8: (fp8 tensor, scale, the weight they stand for)."""
    q, scale = quantize_fp8(w)
    return q.view(torch.float8_e4m3fn), scale, dequantize("F8_E4M3", q, tuple(w.shape), scale)


def test_scaled_fp8_file_and_quantize_fp8_give_their_weights(tmp_path, folder, state):
    tensors, held = {}, {}
    for k, v in comfy(state).items():
        if v.ndim == 2 and k.startswith(PREFIX + "transformer_blocks."):  # a block's linear: fp8 and one scale
            tensors[k], scale, held[k] = fp8(v)
            tensors[k.removesuffix(".weight") + ".weight_scale"] = scale.reshape(())
        else:
            tensors[k] = held[k] = v.to(torch.bfloat16)
    path = tmp_path / "qwen_image_2.1_fp8_scaled.safetensors"
    save_file(tensors, path)
    same(load_transformer21(folder, Source(path), torch.float32, CPU).state_dict(), unfuse(held))
    packed = load_transformer21(folder, Source(path, dequantize=False), torch.float32, CPU)
    assert isinstance(packed.transformer_blocks[0].img_mlp.gate_layer, PackedLinear) and own_storage(packed)

    quantized = load_transformer21(folder, Source(quantize="fp8"), torch.float32, CPU).state_dict()
    for k, v in state.items():
        assert torch.equal(quantized[k], fp8(v)[2] if v.ndim == 2 and k.startswith("transformer_blocks.") else v), k


def test_gguf_q8_0_file_gives_its_weights(tmp_path, folder, state):
    fused = comfy(state)
    path = tmp_path / "Qwen-Image-2.1-Q8_0.gguf"
    kinds = {k.removeprefix(PREFIX): "Q8_0" for k, v in fused.items() if v.ndim == 2 and "transformer_blocks" in k}
    # ComfyUI-GGUF writes 2.1 files with the architecture "qwen_image", as for the 20B models (users' patches to its
    # convert.py detect 2.1 by txt_in.text_norm.weight and name it so).
    expected = unfuse(write_gguf(path, {k.removeprefix(PREFIX): v for k, v in fused.items()}, kinds))
    dense = load_transformer21(folder, Source(path), torch.float32, CPU)
    same(dense.state_dict(), expected)
    packed = load_transformer21(folder, Source(path, dequantize=False), torch.float32, CPU)
    assert isinstance(packed.transformer_blocks[1].img_mlp.proj, PackedLinear)
    cfg = dense.cfg
    layout = build_layout(torch.tensor([0, 0, 1, 0], dtype=torch.bool), [(2, 2), (2, 4)], cfg.axes_dims_rope)
    g = torch.Generator().manual_seed(0)
    latents, txt = torch.randn(1, 12, cfg.in_channels, generator=g), torch.randn(1, 4, cfg.context_in_dim, generator=g)
    with torch.no_grad():
        a, b = (m(latents, txt, torch.tensor([0.5]), layout) for m in (dense, packed))
    assert (a - b).abs().max() <= 1e-5


def test_missing_weight_and_bad_config_are_one_line(tmp_path, folder):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    vae_file = next((broken / "vae").glob("*.safetensors"))
    tensors = load_file(vae_file)
    del tensors["decoder.conv_in.weight"]
    save_file(tensors, vae_file)
    with pytest.raises(QimgError) as e:
        load_vae21(broken, torch.float32, CPU)
    assert str(e.value) == f"{broken / 'vae'}: missing weights decoder.conv_in.weight"
    config = broken / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"causal_condition": true', '"causal_condition": true, '
                                                                          '"guidance_embeds": true'))
    with pytest.raises(QimgError, match=r"transformer/config.json: transformer config: unknown key 'guidance_embeds'$"):
        load_transformer21(broken, Source(), torch.float32, CPU)
