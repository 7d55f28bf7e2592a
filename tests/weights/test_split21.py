"""Qwen-Image-2.1's shipped configs and Qwen3-VL tokenizer, and the text encoder file's key map (weights/split21.py,
weights/shipped.py). The published shapes are Qwen3-VL-8B-Instruct's config (ComfyUI's
comfy/text_encoders/qwen3vl.py: QWEN3VL_VISION["qwen3vl_8b"], Qwen3VL_8BConfig) and diffusers'
QwenImage21Transformer2DModel / AutoencoderKLQwenImage21 defaults."""

import json

import pytest
import torch

from qimg.weights.folders import model_kind, read_config, sample_sigmas

# Qwen-Image-2.1-Turbo's model_index.json grid, as several independent ports quote it (8 steps).
TURBO = [1.0, 0.978453, 0.95418, 0.926626, 0.89508, 0.845148, 0.704534, 0.414568]


@pytest.mark.parametrize("variant", ["qwen-image-2.1", "qwen-image-2.1-turbo"])
def test_shipped_2_1_configs_build_the_published_shapes(variant):
    from qimg.model.qwen3vl import Qwen3VLTextModel
    from qimg.model.qwen3vl_vision import Qwen3VLVisionTower
    from qimg.model.transformer21 import QwenImage21Transformer
    from qimg.model.vae21 import QwenImage21VAE
    from qimg.weights.qwen3vl import configs, load_image_config
    from qimg.weights.qwen21 import transformer21_config, vae21_config
    from qimg.weights.shipped import CONFIGS

    folder = CONFIGS / variant
    assert model_kind(folder).name == variant
    text_cfg, vision_cfg = configs(folder / "text_encoder")
    with torch.device("meta"):
        text = Qwen3VLTextModel(text_cfg).state_dict()
        tower = Qwen3VLVisionTower(vision_cfg).state_dict()
        transformer = QwenImage21Transformer(transformer21_config(folder))
        vae = QwenImage21VAE(vae21_config(folder)).state_dict()
    assert tuple(text["embed_tokens.weight"].shape) == (151936, 4096)
    assert tuple(text["layers.35.self_attn.k_proj.weight"].shape) == (1024, 4096)
    assert tuple(text["layers.0.mlp.down_proj.weight"].shape) == (4096, 12288)
    assert tuple(tower["merger.linear_fc2.weight"].shape) == (4096, 4608)
    assert tuple(tower["deepstack_merger_list.2.norm.weight"].shape) == (4608,)
    assert tuple(tower["blocks.26.mlp.linear_fc1.weight"].shape) == (4304, 1152)
    assert len(transformer.transformer_blocks) == 32 and tuple(transformer.txt_in.in_layer.weight.shape) == (4096, 4096)
    assert tuple(vae["post_quant_conv.weight"].shape)[:2] == (64, 64) and vae["encoder.conv_in.weight"].shape[1] == 4
    cfg = load_image_config(folder / "processor", vision_cfg)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size) == (65536, 16777216, 16)
    scheduler = read_config(folder / "scheduler", "scheduler_config.json")
    if variant.endswith("turbo"):
        assert list(sample_sigmas(folder)) == TURBO
        assert scheduler["use_dynamic_shifting"] is False and scheduler["shift"] == 1.0
    else:
        assert not sample_sigmas(folder) and scheduler["use_dynamic_shifting"] is True


def test_shipped_qwen3_tokenizer_is_qwen2s_bpe_with_qwen3s_added_tokens(tmp_path):
    """The shipped tokenizer_config adds Qwen3's four tokens to Qwen2.5-VL's 22 and reads the BPE from the qwen2.5
    folder; transformers' Qwen2TokenizerFast on the same three files in one folder gives the same ids (the oracle)."""
    import shutil

    from transformers import Qwen2TokenizerFast

    from qimg.weights.shipped import TOKENIZER
    from qimg.weights.split21 import QWEN3_IDS, QWEN3_TOKENIZER
    from qimg.weights.tokenizer import read_tokenizer

    added = json.loads((QWEN3_TOKENIZER / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert sorted(map(int, added)) == list(range(151643, QWEN3_IDS))
    assert [added[str(i)]["content"] for i in range(151665, 151669)] == [
        "<tool_response>", "</tool_response>", "<think>", "</think>"]
    assert not (QWEN3_TOKENIZER / "vocab.json").exists()  # the 2.5 folder's files serve both
    ours = read_tokenizer(QWEN3_TOKENIZER, vocabulary=TOKENIZER)
    for file in (TOKENIZER / "vocab.json", TOKENIZER / "merges.txt", QWEN3_TOKENIZER / "tokenizer_config.json"):
        shutil.copy(file, tmp_path / file.name)
    theirs = Qwen2TokenizerFast.from_pretrained(tmp_path)
    texts = ["<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n",
             "<|im_start|>user\n<image1><|vision_start|><|image_pad|><|vision_end|>把天空变成橙色<|im_end|>\n",
             "<think>\n\n</think>\n\n a sign that says hello world"]
    for text in texts:
        assert ours.ids([text])[0] == theirs(text)["input_ids"], text
    assert ours.ids(["<|im_start|>system\n"])[0] == [151644, 8948, 198]
    assert ours.ids(["<think></think>"])[0] == [151667, 151668]


def test_text_encoder_names_map_to_the_folders():
    """transformers' names pass as they are; ComfyUI's module names (sd.cpp's convert_qwen3_vl.py rewrites
    model.language_model. -> model., and ComfyUI's Qwen3VL holds `visual` beside `model`) map back; lm_head is
    left out."""
    from qimg.weights.split21 import canonical

    assert canonical("model.language_model.layers.3.self_attn.q_norm.weight") == \
        "model.language_model.layers.3.self_attn.q_norm.weight"
    assert canonical("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert canonical("visual.deepstack_merger_list.0.norm.weight") == "model.visual.deepstack_merger_list.0.norm.weight"
    assert canonical("model.visual.patch_embed.proj.weight") == "model.visual.patch_embed.proj.weight"
    assert canonical("lm_head.weight") is None


def test_the_documented_2_1_text_encoder_sizes():
    """docs/split-files.md's 2.1 figures: Qwen3-VL-8B's language model in bf16 and fp8 as qimg keeps it (packed
    layers packed), its vision tower in bf16."""
    from qimg.model.qwen3vl import Qwen3VLTextModel
    from qimg.model.qwen3vl_vision import Qwen3VLVisionTower
    from qimg.weights.qwen3vl import configs
    from qimg.weights.shipped import CONFIGS
    from qimg.weights.split_files import language_model_bytes

    text_cfg, vision_cfg = configs(CONFIGS / "qwen-image-2.1" / "text_encoder")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3VLTextModel(text_cfg).state_dict().items()}
        tower = sum(v.numel() for v in Qwen3VLVisionTower(vision_cfg).state_dict().values())
    sizes = {kind: round(language_model_bytes({k: (kind, s) for k, s in shapes.items()}, torch.bfloat16, False) / 1e9,
                         1) for kind in ("dense", "F8_E4M3")}
    assert sizes == {"dense": 15.1, "F8_E4M3": 8.2} and round(tower * 2 / 1e9, 2) == 1.15
