"""The split files' key maps against the tools that write them, and loading each layout gives the folder's
tensors: ComfyUI's text encoder (plain and scaled fp8), llama.cpp's GGUF text encoder and mmproj, the Wan-named
VAE. Writers in tests/split_layouts.py; the name maps there are gguf-py's (llama.cpp's convert_hf_to_gguf.py
names tensors by them) and the VAE's are checked here against diffusers' convert_wan_vae_to_diffusers."""

import pytest
import torch
from split_layouts import (
    comfy_text_encoder,
    folder_tensors,
    gguf_text_encoder,
    mmproj,
    scaled_fp8_text_encoder,
    wan_vae,
)

from qimg.errors import UsageError
from qimg.model.qwen2 import Qwen2Config
from qimg.model.vae import VAEConfig
from qimg.model.vision import VisionConfig
from qimg.weights.comfy_files import gguf_text_key, mmproj_key, part_of, wan_vae_key
from qimg.weights.folders import EDIT, QWEN_IMAGE, load_module, read_config
from qimg.weights.split_files import (
    Files,
    load_language_model,
    load_vae,
    load_vision_tower,
    text_files,
    tokenizer_for,
)
from qimg.weights.text_encoder import load_text_encoder
from qimg.weights.tokenizer import read_tokenizer

CPU = torch.device("cpu")


def text_config(folder):
    return Qwen2Config.from_dict(read_config(folder / "text_encoder"))


def folder_model(folder):
    return load_text_encoder(folder, torch.float32, CPU).model.state_dict()


@pytest.mark.parity
def test_wan_names_are_diffusers_converter_names(tiny_model_dir, tmp_path):
    """diffusers' own Wan->diffusers converter takes the Wan file qimg's map inverts back to the folder's names
    and values: qimg's map and diffusers' agree on every one of the VAE's 194 keys."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    wan = wan_vae(tiny_model_dir, tmp_path / "qwen_image_vae.safetensors")
    back = convert_wan_vae_to_diffusers(wan)
    state = folder_tensors(tiny_model_dir / "vae")
    assert len(state) == 194 and back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert wan_vae_key("decoder.upsamples.7.resample.1.weight") == "decoder.up_blocks.1.upsamplers.0.resample.1.weight"
    assert wan_vae_key("decoder.upsamples.4.shortcut.bias") == "decoder.up_blocks.1.resnets.0.conv_shortcut.bias"
    assert wan_vae_key("model.layers.0.mlp.up_proj.weight") is None


@pytest.mark.slow
def test_wan_vae_loads_as_the_folder(tiny_model_dir, tmp_path):
    path = tmp_path / "qwen_image_vae.safetensors"
    wan_vae(tiny_model_dir, path)
    cfg = VAEConfig.from_dict(read_config(tiny_model_dir / "vae"))
    from qimg.model.vae import QwenImageVAE

    ours = load_vae(path, cfg, torch.float32, CPU).state_dict()
    theirs = load_module(lambda: QwenImageVAE(cfg), tiny_model_dir / "vae", torch.float32, CPU).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    decoder_only = load_vae(path, cfg, torch.float32, CPU, only=("decoder.",))
    assert decoder_only.encoder.conv_in.weight.is_meta and not decoder_only.decoder.conv_in.weight.is_meta


@pytest.mark.parity
def test_gguf_text_names_are_gguf_py_names():
    """gguf-py's qwen2vl map (what llama.cpp's converter names by) read back through qimg's inverse."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    names = get_tensor_name_map(MODEL_ARCH.QWEN2VL, 2)
    for hf in ("model.embed_tokens", "model.norm", "lm_head", "model.layers.1.input_layernorm",
               "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
               "model.layers.0.self_attn.o_proj", "model.layers.0.post_attention_layernorm",
               "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        assert gguf_text_key(names.get_name(hf) + ".weight") == hf + ".weight"
    assert gguf_text_key("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gguf_text_key("rope_freqs.weight") is None
    mm = get_tensor_name_map(MODEL_ARCH.MMPROJ, 3)  # mm.{bid} counts as a block: 2 needs 3
    for hf in ("visual.blocks.1.attn.q", "visual.blocks.0.attn.proj", "visual.blocks.0.norm1", "visual.blocks.0.norm2",
               "visual.blocks.0.mlp.gate_proj", "visual.blocks.0.mlp.up_proj", "visual.blocks.0.mlp.down_proj",
               "visual.merger.ln_q", "visual.merger.mlp.0", "visual.merger.mlp.2", "visual.patch_embed.proj"):
        assert mmproj_key(mm.get_name(hf) + ".weight") == hf + ".weight"


def test_comfy_text_encoder_loads_as_the_folder(tiny_model_dir, tmp_path):
    path = comfy_text_encoder(tiny_model_dir, tmp_path / "qwen_2.5_vl_7b.safetensors")
    ours = load_language_model(path, text_config(tiny_model_dir), torch.float32, CPU, unpack=True).state_dict()
    theirs = folder_model(tiny_model_dir)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("unpack", [True, False])
def test_scaled_fp8_text_encoder_holds_its_scaled_weights(tiny_model_dir, tmp_path, unpack):
    held = scaled_fp8_text_encoder(tiny_model_dir, tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors")
    model = load_language_model(tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors", text_config(tiny_model_dir),
                                torch.float32, CPU, unpack=unpack)
    q = model.layers[0].self_attn.q_proj
    want = held["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q.weight if unpack else q.unpacked(), want)
    assert type(q).__name__ == ("Linear" if unpack else "PackedLinear")


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_gguf_text_encoder_and_its_tokenizer(tiny_model_dir, tmp_path, kind):
    path = tmp_path / f"Qwen2.5-VL-7B-Instruct-{kind}.gguf"
    held = gguf_text_encoder(tiny_model_dir, path, kind)
    model = load_language_model(path, text_config(tiny_model_dir), torch.float32, CPU, unpack=True).state_dict()
    assert torch.equal(model["layers.1.mlp.down_proj.weight"], held["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(model["embed_tokens.weight"], held["model.embed_tokens.weight"])
    if kind == "F32":
        theirs = folder_model(tiny_model_dir)
        assert all(torch.equal(model[k], theirs[k]) for k in theirs)
    ours = tokenizer_for(Files(text_encoder=path), tmp_path, edits=False)
    folder = read_tokenizer(tiny_model_dir / "tokenizer")
    text = ["<|im_start|>user\na red circle 蓝色背景上的红色圆形 hello<|im_end|>"]
    assert ours.ids(text) == folder.ids(text) and ours.pad_id == folder.pad_id


@pytest.mark.parity
def test_mmproj_vision_tower_loads_as_the_folder(tiny_edit_dir, tmp_path):
    path = tmp_path / "Qwen2.5-VL-7B-Instruct-mmproj-F32.gguf"
    mmproj(tiny_edit_dir, path)
    cfg = VisionConfig.from_dict(read_config(tiny_edit_dir / "text_encoder"))
    from qimg.weights.text_encoder import load_instruct_encoder

    theirs = load_instruct_encoder(tiny_edit_dir, torch.float32, CPU, plus=False).vision.state_dict()
    for files in (Files(vision=path), Files(text_encoder=comfy_text_encoder(tiny_edit_dir, tmp_path / "te.st"))):
        ours = load_vision_tower(files, cfg, torch.float32, CPU).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_wrong_parts_and_architectures_are_one_line_each(tiny_model_dir, tmp_path):
    te = comfy_text_encoder(tiny_model_dir, tmp_path / "te.safetensors")
    vae = wan_vae(tiny_model_dir, tmp_path / "vae.safetensors") and tmp_path / "vae.safetensors"
    cfg = text_config(tiny_model_dir)
    with pytest.raises(UsageError, match=r"--text-encoder .*vae.safetensors holds a VAE's weights \(pass it as --vae"):
        load_language_model(vae, cfg, torch.float32, CPU, unpack=True)
    with pytest.raises(UsageError, match=r"--vae .*te.safetensors holds a text encoder's weights"):
        load_vae(te, VAEConfig(), torch.float32, CPU)
    other = tmp_path / "llama.gguf"
    gguf_text_encoder(tiny_model_dir, other, arch="llama")
    with pytest.raises(UsageError, match="architecture 'llama'; --text-encoder takes Qwen2.5-VL's language model"):
        load_language_model(other, cfg, torch.float32, CPU, unpack=True)
    text_gguf = tmp_path / "te.gguf"
    gguf_text_encoder(tiny_model_dir, text_gguf)
    with pytest.raises(UsageError) as e:  # said once, as a sentence (it read "pass the a vision tower ... file")
        load_vision_tower(Files(vision=text_gguf), VisionConfig(), torch.float32, CPU)
    assert str(e.value) == (f"--vision {text_gguf}: a GGUF file of architecture 'qwen2vl'; --vision takes "
                            "Qwen2.5-VL's vision tower (mmproj) (architecture clip)")
    qwen2vl = tmp_path / "qwen2vl-mmproj.gguf"
    mmproj(tiny_model_dir, qwen2vl, projector="qwen2vl_merger")
    with pytest.raises(UsageError, match="its projector is 'qwen2vl_merger', not Qwen2.5-VL's"):
        load_vision_tower(Files(vision=qwen2vl), VisionConfig(), torch.float32, CPU)
    te.write_bytes(te.read_bytes()[:-200])
    with pytest.raises(UsageError, match="--text-encoder .*truncated"):
        load_language_model(te, cfg, torch.float32, CPU, unpack=True)


def test_parts_are_told_by_their_names():
    assert part_of(["transformer_blocks.0.attn.to_q.weight"]) == "transformer"
    assert part_of(["token_embd.weight", "blk.0.attn_q.weight"]) == "text encoder"
    assert part_of(["model.embed_tokens.weight", "visual.blocks.0.norm1.weight"]) == "text encoder"
    assert part_of(["decoder.middle.0.residual.0.gamma"]) == part_of(["decoder.conv_in.weight"]) == "VAE"
    assert part_of(["v.blk.0.attn_q.weight"]) == "vision tower"
    assert part_of(["something.else"]) is None


def test_safetensors_text_encoder_needs_a_tokenizer_beside_it(tiny_model_dir, tmp_path):
    import shutil

    path = comfy_text_encoder(tiny_model_dir, tmp_path / "qwen_2.5_vl_7b.safetensors")
    with pytest.raises(UsageError, match="no tokenizer for it.*qwen25_tokenizer"):
        tokenizer_for(Files(text_encoder=path), tmp_path / "nowhere", edits=False)
    shutil.copytree(tiny_model_dir / "tokenizer", tmp_path / "qwen25_tokenizer")
    assert tokenizer_for(Files(text_encoder=path), tmp_path / "nowhere", edits=False).pad_id is not None
    assert QWEN_IMAGE.edits is False and EDIT.edits


def test_the_fingerprinted_tokenizer_is_the_one_loaded(tiny_model_dir, tmp_path):
    """text_files takes the model's kind as the loader does (not a processor/ folder's presence): a text-to-image
    folder with a processor/ beside its tokenizer/ encodes, and is fingerprinted, with tokenizer/."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    shutil.copytree(folder / "tokenizer", folder / "processor")
    files = Files(text_encoder=comfy_text_encoder(tiny_model_dir, tmp_path / "te.safetensors"))
    assert text_files(files, folder, QWEN_IMAGE.edits) == (folder / "tokenizer",)
    assert text_files(files, folder, EDIT.edits) == (folder / "processor",)


# The published Qwen2.5-VL-7B-Instruct and Qwen-Image VAE shapes (the checkpoint ComfyUI's qwen_2.5_vl_7b file
# holds, comfy/text_encoders/llama.py's Qwen25_7BVLI_Config; comfy/ldm/wan/vae.py's dim 96, z_dim 16).
REAL = {"embed_tokens.weight": (152064, 3584), "layers.27.self_attn.q_proj.weight": (3584, 3584),
        "layers.0.self_attn.k_proj.weight": (512, 3584), "layers.0.self_attn.k_proj.bias": (512,),
        "layers.0.mlp.gate_proj.weight": (18944, 3584), "layers.0.mlp.down_proj.weight": (3584, 18944)}
REAL_VISION = {"patch_embed.proj.weight": (1280, 3, 2, 14, 14), "blocks.31.attn.qkv.weight": (3840, 1280),
               "blocks.0.mlp.gate_proj.weight": (3420, 1280), "merger.mlp.0.weight": (5120, 5120),
               "merger.mlp.2.weight": (3584, 5120)}


@pytest.mark.parametrize("variant", ["qwen-image", "edit", "edit-2509", "edit-2511"])
def test_shipped_configs_build_the_published_shapes(variant):
    from qimg.model.qwen2 import Qwen2Model
    from qimg.model.transformer import QwenImageTransformer, TransformerConfig
    from qimg.model.vae import QwenImageVAE
    from qimg.model.vision import VisionTower
    from qimg.weights.folders import model_kind
    from qimg.weights.shipped import CONFIGS

    folder = CONFIGS / variant
    assert model_kind(folder).name == variant
    with torch.device("meta"):
        text = Qwen2Model(text_config(folder)).state_dict()
        tower = VisionTower(VisionConfig.from_dict(read_config(folder / "text_encoder"))).state_dict()
        vae = QwenImageVAE(VAEConfig.from_dict(read_config(folder / "vae"))).state_dict()
        transformer = QwenImageTransformer(TransformerConfig.from_dict(read_config(folder / "transformer")))
    assert {k: tuple(text[k].shape) for k in REAL} == REAL and len(text) == 1 + 28 * 12 + 1
    assert {k: tuple(tower[k].shape) for k in REAL_VISION} == REAL_VISION
    assert len(vae) == 194 and tuple(vae["post_quant_conv.weight"].shape)[:2] == (16, 16)
    assert len(transformer.transformer_blocks) == 60 and transformer.txt_in.in_features == 3584


def test_the_documented_text_encoder_sizes():
    """docs/split-files.md's table: the real language model's bytes on the device, packed as qimg keeps them."""
    from qimg.model.qwen2 import Qwen2Model
    from qimg.weights.shipped import CONFIGS
    from qimg.weights.split_files import language_model_bytes

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen2Model(text_config(CONFIGS / "qwen-image")).state_dict().items()}
    sizes = {kind: language_model_bytes({k: (kind, s) for k, s in shapes.items()}, torch.bfloat16, unpack=False)
             for kind in ("dense", "F8_E4M3", "Q8_0", "Q6_K", "Q4_K")}
    assert {k: round(v / 1e9, 1) for k, v in sizes.items()} == {"dense": 14.1, "F8_E4M3": 7.6, "Q8_0": 8.0,
                                                                 "Q6_K": 6.4, "Q4_K": 4.8}
    assert language_model_bytes({k: ("Q8_0", s) for k, s in shapes.items()}, torch.bfloat16, True) == sizes["dense"]


def test_diffusers_and_transformers_names_in_one_file(tiny_model_dir, tmp_path):
    """The diffusers VAE's own file, and a text encoder saved with transformers 5's names (model.language_model.*,
    model.visual.*), load as the folder."""
    from safetensors.torch import save_file

    from qimg.model.vae import QwenImageVAE

    cfg = VAEConfig.from_dict(read_config(tiny_model_dir / "vae"))
    vae_file = next((tiny_model_dir / "vae").glob("*.safetensors"))
    ours = load_vae(vae_file, cfg, torch.float32, CPU).state_dict()
    theirs = load_module(lambda: QwenImageVAE(cfg), tiny_model_dir / "vae", torch.float32, CPU).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k): v
               for k, v in folder_tensors(tiny_model_dir / "text_encoder").items() if k != "lm_head.weight"}
    save_file(renamed, tmp_path / "te.safetensors")
    model = load_language_model(tmp_path / "te.safetensors", text_config(tiny_model_dir), torch.float32, CPU, True)
    theirs = folder_model(tiny_model_dir)
    assert all(torch.equal(model.state_dict()[k], theirs[k]) for k in theirs)
