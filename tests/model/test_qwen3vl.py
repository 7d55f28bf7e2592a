"""The native Qwen3-VL text encoder (Qwen-Image-2.1's) against transformers' Qwen3VLForConditionalGeneration on
a tiny random model: the last decoder layer's hidden state before the final norm (the pipeline's norm bypass),
for text only, text with one picture and with two, batches with left padding; and the loader's refusals."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_qwen3vl import IMAGE_PAD, VISION_END, VISION_START, build_tiny_qwen3vl, tiny_qwen3vl

from qimg.errors import QimgError
from qimg.model.qwen3vl import Qwen3VLTextConfig, interleaved_table
from qimg.model.qwen3vl_vision import Qwen3VLVisionConfig
from qimg.weights.qwen3vl import load_qwen3vl

CPU = torch.device("cpu")
PATCH_ROW = 3 * 2 * 16 * 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen3vl(tmp_path_factory.mktemp("qwen3vl") / "text_encoder")


@pytest.fixture(scope="module")
def reference():
    return tiny_qwen3vl()


@pytest.fixture(scope="module")
def ours(folder):
    return load_qwen3vl(folder, torch.float32, CPU)


def prompt(pictures: list[tuple[int, int]], seed: int, text: int = 7) -> list[int]:
    """Random text ids with each picture (rows, cols in patches) as <|vision_start|>, its pads, <|vision_end|>."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 199, (text,), generator=g).tolist()
    for h, w in pictures:
        ids += [VISION_START] + [IMAGE_PAD] * (h * w // 4) + [VISION_END]
        ids += torch.randint(0, 199, (3,), generator=g).tolist()
    return ids


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def reference_hidden(model, ids, mask, pixels=None, grids=()):
    """What QwenImage21Pipeline reads: hidden_states[-1] with the final norm hooked away."""
    kwargs = {"mm_token_type_ids": (ids == IMAGE_PAD).int()}
    if pixels is not None:
        kwargs |= {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids])}
    handle = model.model.language_model.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    finally:
        handle.remove()
    return out.hidden_states[-1]


CASES = {  # each row's pictures (rows, cols in patches)
    "text": [[], []],
    "one-picture": [[(6, 8)]],
    "two-pictures": [[(4, 6), (8, 4)]],
    "batch-padded": [[(4, 6), (6, 2)], [(2, 10)], []],  # rows of different lengths, left padded
}


@pytest.mark.parity
@pytest.mark.parametrize("rows", CASES.values(), ids=CASES.keys())
def test_hidden_states_equal_transformers_before_the_final_norm(reference, ours, rows, one_thread):
    ids, mask = left_padded([prompt(pictures, seed=i, text=7 + 5 * i) for i, pictures in enumerate(rows)])
    grids = [g for pictures in rows for g in pictures]
    pixels = None
    if grids:
        pixels = torch.randn(sum(h * w for h, w in grids), PATCH_ROW, generator=torch.Generator().manual_seed(1))
    ref = reference_hidden(reference, ids, mask, pixels, grids)
    with torch.no_grad():
        got = ours(ids, mask, pixels, grids)
    real = mask.bool()
    assert got.shape == ref.shape and ref[real].abs().max() > 1
    assert (got[real] - ref[real]).abs().max() <= 1e-5
    normed = reference.model.language_model.norm(ref)  # transformers' hidden_states[-1] without the bypass
    assert (got[real] - normed[real]).abs().max() > 0.1


@pytest.mark.parity
def test_bfloat16_is_as_close_to_float32_as_the_reference(folder, reference, one_thread):
    rows = [[(4, 6), (6, 2)], [(2, 10)]]
    ids, mask = left_padded([prompt(pictures, seed=i, text=7 + 5 * i) for i, pictures in enumerate(rows)])
    grids = [g for pictures in rows for g in pictures]
    pixels = torch.randn(sum(h * w for h, w in grids), PATCH_ROW, generator=torch.Generator().manual_seed(1))
    exact = reference_hidden(reference, ids, mask, pixels, grids)
    ref = reference_hidden(tiny_qwen3vl().to(torch.bfloat16), ids, mask, pixels.bfloat16(), grids)
    with torch.no_grad():
        got = load_qwen3vl(folder, torch.bfloat16, CPU)(ids, mask, pixels.bfloat16(), grids)
    real = mask.bool()
    assert got.dtype == torch.bfloat16
    ours, theirs = ((t[real].float() - exact[real]).abs().max() for t in (got, ref))
    assert ours <= 1.5 * theirs and (got[real].float() - ref[real].float()).abs().max() <= 2 * theirs


@pytest.mark.parity
def test_each_picture_part_moves_the_hidden_states(reference, ours, one_thread):
    # The parity above can fail: without the DeepStack features, or with Qwen2.5-VL's non-interleaved mRoPE,
    # the picture's tokens move well past its tolerance.
    grids = [(6, 8)]
    ids, mask = left_padded([prompt(grids, seed=0)])
    pixels = torch.randn(48, PATCH_ROW, generator=torch.Generator().manual_seed(1))
    ref = reference_hidden(reference, ids, mask, pixels, grids)
    with torch.no_grad():
        images, deepstack = ours.visual(pixels, grids)
        plain = ours.language_model(ids, mask, images, [], [(3, 4)])
    assert (plain - ref).abs().max() > 1e-2
    cfg = ours.language_model.cfg
    positions = ours.language_model.positions(ids, mask, [(3, 4)])
    cos, _ = interleaved_table(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, torch.float32, CPU)
    text_cos, _ = interleaved_table(positions[:1].expand(3, -1, -1), cfg.head_dim, cfg.rope_theta,
                                    cfg.mrope_section, torch.float32, CPU)
    image = (ids == IMAGE_PAD)[0]
    assert not torch.equal(cos[0, image], text_cos[0, image])
    assert torch.equal(cos[0, ~image], text_cos[0, ~image])  # text tokens: the same position on every axis


def test_configs_read_the_saved_format(folder):
    import json

    d = json.loads((folder / "config.json").read_text())
    text, vision = Qwen3VLTextConfig.from_dict(d), Qwen3VLVisionConfig.from_dict(d)
    assert text == Qwen3VLTextConfig.tiny() and vision == Qwen3VLVisionConfig.tiny() and vision.side == 8
    # transformers 4.57's save: rope_theta and rope_scaling in text_config
    scaling = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    old = d["text_config"] | {"rope_theta": 10000.0, "rope_scaling": scaling}
    del old["rope_parameters"]
    assert Qwen3VLTextConfig.from_dict(d | {"text_config": old}) == text


@pytest.fixture
def damaged(folder, tmp_path):
    """A copy of the tiny text_encoder/ whose state dict the test changes before saving."""
    copy = tmp_path / "text_encoder"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")

    def save(change):
        change(state)
        save_file(state, copy / "model.safetensors")
        return copy

    return save


@pytest.mark.parametrize("key", ["model.language_model.layers.2.self_attn.k_norm.weight",
                                 "model.visual.deepstack_merger_list.1.linear_fc2.bias"])
def test_a_missing_weight_is_one_line_naming_it(damaged, key):
    folder = damaged(lambda s: s.pop(key))
    with pytest.raises(QimgError, match=f"missing weights {key}$") as e:
        load_qwen3vl(folder, torch.float32, CPU)
    assert "\n" not in str(e.value)


def test_a_weight_of_the_wrong_shape_is_one_line_naming_it(damaged):
    key = "model.visual.pos_embed.weight"
    folder = damaged(lambda s: s.update({key: torch.zeros(81, 32)}))
    with pytest.raises(QimgError, match=f"wrong shape for this config: {key} \\(81, 32\\) \\(expected \\(64, 32\\)\\)"):
        load_qwen3vl(folder, torch.float32, CPU)


def test_lm_head_and_the_final_norm_are_optional(damaged, ours):
    folder = damaged(lambda s: [s.pop("lm_head.weight"), s.pop("model.language_model.norm.weight")])
    loaded = load_qwen3vl(folder, torch.float32, CPU)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))


def test_an_unexpected_weight_is_refused(damaged):
    folder = damaged(lambda s: s.update({"model.language_model.layers.3.mlp.up_proj.weight": torch.ones(128, 64)}))
    with pytest.raises(QimgError, match="unexpected weights model.language_model.layers.3.mlp.up_proj.weight$"):
        load_qwen3vl(folder, torch.float32, CPU)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "qwen2_5_vl"}, "model_type 'qwen2_5_vl' is not qwen3_vl"),
    ({"text_config": None}, "it has no text_config"),
    ({"vision_config": {"hidden_act": "quick_gelu"}}, "hidden_act='quick_gelu' is not supported"),
])
def test_a_config_from_another_model_is_one_line(folder, tmp_path, change, message):
    import json

    copy = tmp_path / "text_encoder"
    copy.mkdir()
    (copy / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text()) | change))
    (copy / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(QimgError, match=message):
        load_qwen3vl(copy, torch.float32, CPU)


# Qwen3-VL-8B's text_encoder/config.json, the fields that size the model (Qwen-Image-2.1's text encoder).
REAL = {
    "model_type": "qwen3_vl", "image_token_id": 151655, "video_token_id": 151656,
    "text_config": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
                    "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "attention_bias": False,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000, "mrope_interleaved": True,
                                        "mrope_section": [24, 20, 20]}},
    "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                      "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
                      "hidden_act": "gelu_pytorch_tanh", "in_channels": 3},
}


@pytest.mark.parity
def test_keys_match_transformers_at_real_size():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from qimg.model import qwen3vl, qwen3vl_vision
    from qimg.model.qwen3vl import Qwen3VLTextModel
    from qimg.model.qwen3vl_vision import Qwen3VLVisionTower

    text, vision = Qwen3VLTextConfig.from_dict(REAL), Qwen3VLVisionConfig.from_dict(REAL)
    assert text == Qwen3VLTextConfig() and vision == Qwen3VLVisionConfig()
    with torch.device("meta"):
        ref = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**{k: v for k, v in REAL.items() if k != "model_type"}))
        ours = {"text": Qwen3VLTextModel(text), "vision": Qwen3VLVisionTower(vision)}
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for part, remap in [("text", qwen3vl.remap_keys), ("vision", qwen3vl_vision.remap_keys)]:
        expected = {remap(k): s for k, s in shapes.items() if remap(k)}
        assert {k: tuple(v.shape) for k, v in ours[part].state_dict().items()} == expected
    skipped = {k for k in shapes if not qwen3vl.remap_keys(k) and not qwen3vl_vision.remap_keys(k)}
    assert skipped == {"lm_head.weight", "model.language_model.norm.weight"}
    params = sum(p.numel() for m in ours.values() for p in m.parameters())
    assert params == 8_767_123_696 - 151936 * 4096 - 4096  # the checkpoint's count, less lm_head and the norm
