"""The native Qwen2.5-VL prompt encoder against transformers on the tiny checkpoint: token ids, hidden
states, padding, truncation, both checkpoint key layouts, and the real model's config format."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qimg.model.qwen2 import Qwen2Config, Qwen2Model, rope_table
from qimg.model.text import DROP, MAX_TOKENS, TEMPLATE
from qimg.weights.text_encoder import load_text_encoder
from qimg.weights.tokenizer import read_tokenizer

PROMPTS = [
    "a red circle on a blue background",
    "一只猫坐在木桌上",
    "a 红色 circle next to 苹果树, 3 apples!",
    "  spaces\n\nnewlines\tand <|im_end|> inside  ",
    "café naïve e\u0301 ＡＢＣ 😀",
]
LONG = "a photo of a mountain lake at sunset, " * 300  # well past the 1024 + 34 token cut


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir / "text_encoder", dtype=torch.float32)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def vocab_folder(tiny_model_dir, tmp_path_factory):
    """The tiny tokenizer saved the way Qwen/Qwen-Image ships it: vocab.json + merges.txt + tokenizer_config.json
    with added_tokens_decoder, and no tokenizer.json."""
    folder = tmp_path_factory.mktemp("slow-tokenizer")
    full = json.loads((tiny_model_dir / "tokenizer" / "tokenizer.json").read_text())
    (folder / "vocab.json").write_text(json.dumps(full["model"]["vocab"], ensure_ascii=False))
    merges = ["#version: 0.2"] + [" ".join(m) for m in full["model"]["merges"]]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    config = json.loads((tiny_model_dir / "tokenizer" / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in full["added_tokens"]
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def reference_ids(tokenizer, texts, max_length=MAX_TOKENS + DROP):
    out = tokenizer(texts, max_length=max_length, padding=True, truncation=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


@pytest.mark.parity
@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json"])
def test_token_ids_match_transformers(tiny_model_dir, vocab_folder, reference, layout):
    ours = read_tokenizer(tiny_model_dir / "tokenizer" if layout == "tokenizer.json" else vocab_folder)
    texts = [TEMPLATE.format(p) for p in PROMPTS + [LONG]]
    for batch in [texts[:1], texts[1:2], texts]:  # alone, and right-padded to the longest
        ids, mask = ours(batch, MAX_TOKENS + DROP)
        ref_ids, ref_mask = reference_ids(reference[0], batch)
        assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert ours([texts[-1]], MAX_TOKENS + DROP)[0].shape[1] == MAX_TOKENS + DROP  # truncated


def test_vocab_layout_refuses_out_of_order_added_tokens(vocab_folder, tmp_path):
    from qimg.errors import QimgError

    for f in vocab_folder.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    first = min(config["added_tokens_decoder"], key=int)
    config["added_tokens_decoder"][str(int(first) + 100)] = config["added_tokens_decoder"].pop(first)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(QimgError, match="should have id"):
        read_tokenizer(tmp_path)


@pytest.mark.parity
def test_text_only_mrope_is_plain_rope(reference):
    # All three mRoPE sections get the same position for text, so the sectioned table is the 1D one.
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    config = reference[1].config.text_config
    rotary = Qwen2_5_VLRotaryEmbedding(config)
    n, head_dim = 50, config.hidden_size // config.num_attention_heads
    x = torch.zeros(1, n, head_dim)
    ref_cos, ref_sin = rotary(x, torch.arange(n)[None, None].expand(3, 1, n))
    cos, sin = rope_table(n, head_dim, config.rope_parameters["rope_theta"], torch.float32, "cpu")
    assert config.rope_parameters["mrope_section"] == [2, 3, 3]
    torch.testing.assert_close(cos, ref_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin[0], rtol=0, atol=0)


@pytest.mark.parity
def test_hidden_states_match_transformers_padded_and_truncated(tiny_model_dir, reference):
    tokenizer, model = reference
    encoder = load_text_encoder(tiny_model_dir, torch.float32, torch.device("cpu"))
    texts = [TEMPLATE.format(p) for p in PROMPTS + [LONG]]
    ids, mask = reference_ids(tokenizer, texts)
    assert (mask == 0).any() and mask.shape[1] == MAX_TOKENS + DROP  # padding and truncation both exercised
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        ours = encoder.model(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


def test_both_checkpoint_key_layouts_load_and_skip_vision_and_head(tiny_model_dir, tmp_path):
    # transformers >= 5 names the language model model.language_model.* and the vision tower model.visual.*;
    # older saves (and Qwen/Qwen-Image) use model.* and visual.*. lm_head is in both and never read.
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    file = tmp_path / "m" / "text_encoder" / "model.safetensors"
    state = load_file(file)
    assert any(k.startswith("visual.") for k in state) and "lm_head.weight" in state
    renamed = {k.replace("model.", "model.language_model.", 1).replace("visual.", "model.visual.", 1): v
               for k, v in state.items()}
    save_file(renamed, file)
    prompt = [PROMPTS[2]]
    new = load_text_encoder(tmp_path / "m", torch.float32, torch.device("cpu")).encode(prompt)[0]
    old = load_text_encoder(tiny_model_dir, torch.float32, torch.device("cpu")).encode(prompt)[0]
    assert torch.equal(new, old)
    assert not any("visual" in k or "lm_head" in k for k in Qwen2Model(Qwen2Config.tiny()).state_dict())


def test_real_config_format_reads_the_7b_shape():
    # Qwen/Qwen-Image's text_encoder/config.json (transformers 4.x): text fields and rope_theta at the top.
    d = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_act": "silu", "hidden_size": 3584,
         "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
         "rms_norm_eps": 1e-06,
         "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
         "rope_theta": 1000000.0, "vocab_size": 152064, "vision_config": {"hidden_size": 1280, "depth": 32}}
    assert Qwen2Config.from_dict(d) == Qwen2Config()


@pytest.mark.parity
def test_keys_match_transformers_language_model_at_real_size():
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    cfg = Qwen2Config()
    native_only = ("rope_theta", "mrope_section", "image_token_id")  # transformers keeps these elsewhere
    ref_cfg = Qwen2_5_VLTextConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in native_only})
    with torch.device("meta"):
        ref, ours = Qwen2_5_VLTextModel(ref_cfg), Qwen2Model(cfg)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)


@pytest.mark.subprocess
def test_generate_imports_neither_transformers_nor_dynamo(tiny_model_dir, tmp_path):
    probe = (
        "import sys; from qimg.cli.app import run; "
        f"code = run(['generate', '-m', {str(tiny_model_dir)!r}, '-p', 'x', '--size', '32x32', '--steps', '1', "
        f"'--cfg', '2', '-o', {str(tmp_path / 'o.png')!r}]); "
        "print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'diffusers', 'accelerate') "
        "or m.startswith('torch._dynamo')))"  # building on the meta device can pull in dynamo: 2-4 s
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "[]"]
