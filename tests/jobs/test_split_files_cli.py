"""generate, inpaint and edit from three files with no model folder give the folder's bytes (the same tensors in
the same dtype); the refusals are one line each, before any weights load. The configs qimg would ship for the
real model are replaced by the tiny folders' (weights.shipped.CONFIGS), as the files are the tiny model's."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import one_line, pixels
from PIL import Image
from safetensors.torch import load_file, save_file
from split_layouts import comfy_text_encoder, folder_tensors, gguf_text_encoder, mmproj, wan_vae

from qimg.jobs.metadata import read_params

pytestmark = pytest.mark.slow
RUN = ["--size", "32x32", "--steps", "2", "--seed", "5", "--device", "cpu", "--no-cache", "--no-worker", "--json"]


@pytest.fixture
def shipped(tmp_path_factory, tiny_model_dir, tiny_edit_checkpoints, monkeypatch):
    """Config-only copies of the tiny folders (no weights, no tokenizer vocabulary), as qimg ships the real ones."""
    root = tmp_path_factory.mktemp("configs")
    weights = shutil.ignore_patterns("*.safetensors*", "tokenizer", "vocab.json", "merges.txt", "tokenizer.json")
    for name, folder in (("qwen-image", tiny_model_dir), ("edit", tiny_edit_checkpoints["edit"]),
                         ("edit-2509", tiny_edit_checkpoints["plus"]), ("edit-2511", tiny_edit_checkpoints["2511"])):
        shutil.copytree(folder, root / name, ignore=weights)
    monkeypatch.setattr("qimg.weights.shipped.CONFIGS", root)
    return root


def files_of(folder, tmp_path, name="qwen_image_fp32.safetensors"):
    """The folder as three files: transformer (one safetensors), text encoder (llama.cpp GGUF, F32), Wan VAE."""
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    save_file(folder_tensors(folder / "transformer"), files / name)
    gguf_text_encoder(folder, files / "Qwen2.5-VL-7B-Instruct-F32.gguf")
    wan_vae(folder, files / "qwen_image_vae.safetensors")
    return [files / name, files / "Qwen2.5-VL-7B-Instruct-F32.gguf", files / "qwen_image_vae.safetensors"]


def split(files):
    return ["--transformer", files[0], "--text-encoder", files[1], "--vae", files[2]]


def test_generate_and_inpaint_from_three_files_give_the_folders_bytes(cli, tiny_model_dir, tmp_path, shipped):
    files = files_of(tiny_model_dir, tmp_path)
    code, _, err = cli("generate", "-p", "a red circle", "-m", tiny_model_dir, "-o", tmp_path / "folder.png", *RUN)
    assert code == 0, err
    code, out, err = cli("generate", "-p", "a red circle", *split(files), "-o", tmp_path / "files.png", *RUN)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "files.png"))
    report = json.loads(out)
    assert report["variant"] == "qwen-image" and report["model"] == str(shipped / "qwen-image")
    assert read_params(tmp_path / "files.png")["model"] == "qwen-image (split files)"  # a shared picture's name
    assert report["text_encoder"]["name"] == files[1].name and report["text_encoder"]["format"].startswith("gguf F32")
    assert report["vae"]["format"] == "safetensors F32" and len(report["vae"]["sha256"]) == 64
    for source, name in (("folder", ["-m", tiny_model_dir]), ("files", split(files))):
        code, _, err = cli("inpaint", tmp_path / "folder.png", "--rect", "0,0,16,16", "-p", "a green square", *name,
                           "-o", tmp_path / f"inpaint-{source}.png", *RUN[2:])
        assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "inpaint-folder.png"), pixels(tmp_path / "inpaint-files.png"))


def test_comfy_text_encoder_with_its_tokenizer_folder_and_the_folder_parts(cli, tiny_model_dir, tmp_path, shipped):
    """ComfyUI's safetensors text encoder needs the tokenizer beside it (qwen25_tokenizer/); with -m, each file
    replaces only its part of the folder."""
    files = files_of(tiny_model_dir, tmp_path)
    te = comfy_text_encoder(tiny_model_dir, tmp_path / "files" / "qwen_2.5_vl_7b.safetensors")
    code, _, err = cli("generate", "-p", "a red circle", *split([files[0], te, files[2]]), "-o", tmp_path / "x.png",
                       *RUN)
    assert code == 2 and not (tmp_path / "x.png").exists()
    one_line(err, f"--text-encoder {te}: no tokenizer for it", "qwen25_tokenizer")
    shutil.copytree(tiny_model_dir / "tokenizer", te.parent / "qwen25_tokenizer")
    code, _, err = cli("generate", "-p", "a red circle", *split([files[0], te, files[2]]), "-o", tmp_path / "a.png",
                       *RUN)
    assert code == 0, err
    code, _, err = cli("generate", "-p", "a red circle", "-m", tiny_model_dir, "--vae", files[2], "-o",
                       tmp_path / "b.png", *RUN)
    assert code == 0, err
    code, _, err = cli("generate", "-p", "a red circle", "-m", tiny_model_dir, "-o", tmp_path / "c.png", *RUN)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(tmp_path / "c.png"))


def test_edit_from_files_with_the_mmproj_vision_tower(cli, tiny_edit_dir, tmp_path, shipped):
    files = files_of(tiny_edit_dir, tmp_path, "qwen_image_edit_fp32.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    edit = ["edit", tmp_path / "in.png", "-p", "make it red", "--steps", "1", "--edit-area", "3072", "--device",
            "cpu", "--no-cache", "--no-worker", "--seed", "3"]
    code, _, err = cli(*edit, *split(files), "-o", tmp_path / "x.png")
    assert code == 2 and not (tmp_path / "x.png").exists()
    one_line(err, "Qwen-Image-Edit edits with pictures", f"--text-encoder {files[1]} has no vision tower", "--vision")
    other = tmp_path / "other"  # a vision tower whose tokens are twice as wide as this text encoder
    shutil.copytree(tiny_edit_dir, other)
    state = folder_tensors(other / "text_encoder")
    for name in ("visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias"):
        state[name] = state[name].repeat(2, *[1] * (state[name].dim() - 1))
    for f in (other / "text_encoder").glob("*.safetensors"):
        f.unlink()
    save_file(state, other / "text_encoder" / "model.safetensors")
    mmproj(other, tmp_path / "wide-mmproj.gguf")
    code, _, err = cli(*edit, *split(files), "--vision", tmp_path / "wide-mmproj.gguf", "-o", tmp_path / "x.png")
    assert code == 2 and not (tmp_path / "x.png").exists()
    one_line(err, f"--vision {tmp_path / 'wide-mmproj.gguf'}: its vision tower gives tokens 128 wide and the text "
             "encoder is 64", "different models")
    mmproj(tiny_edit_dir, tmp_path / "files" / "mmproj-F32.gguf")
    code, _, err = cli(*edit, *split(files), "--vision", tmp_path / "files" / "mmproj-F32.gguf", "-o",
                       tmp_path / "files.png")
    assert code == 0, err
    code, _, err = cli(*edit, "-m", tiny_edit_dir, "-o", tmp_path / "folder.png")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "files.png"))


def test_refusals_are_one_line_before_loading(cli, tiny_model_dir, tmp_path, shipped, monkeypatch):
    files = files_of(tiny_model_dir, tmp_path)
    out = ["-o", tmp_path / "x.png", "--device", "cpu", "--no-worker"]
    cases = [
        (["--transformer", files[0], "--text-encoder", files[1]], "without --model", "--vae is missing"),
        (["--transformer", files[0], "--text-encoder", files[2], "--vae", files[2]],
         f"--text-encoder {files[2]} holds a VAE's weights", "pass it as --vae"),
        (["--transformer", files[0], "--text-encoder", files[1], "--vae", files[0]],
         f"--vae {files[0]} holds a transformer's weights", "pass it as --transformer"),
    ]
    wide = tmp_path / "wide.gguf"  # a text encoder of another width (a 2.1 encoder with a 20B transformer)
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    state = folder_tensors(other / "text_encoder")
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].repeat(1, 2)
    for f in (other / "text_encoder").glob("*.safetensors"):
        f.unlink()
    save_file(state, other / "text_encoder" / "model.safetensors")
    gguf_text_encoder(other, wide)
    cases.append((["--transformer", files[0], "--text-encoder", wide, "--vae", files[2]],
                  f"--text-encoder {wide} is 128 wide and --transformer {files[0]} takes 64", "different models"))
    tower = tmp_path / "mmproj.gguf"
    mmproj(tiny_model_dir, tower)
    cases.append(([*split(files), "--vision", tower], f"--vision {tower}: Qwen-Image reads no pictures",
                  "leave --vision out"))  # it was ignored, yet recorded in the fingerprint and the metadata
    wan = load_file(files[2])  # a VAE of 32 latent channels (another model's), its keys Wan's as the file's
    wan["conv2.weight"] = wan["conv2.weight"].repeat(1, 2, 1, 1, 1)
    save_file(wan, tmp_path / "vae32.safetensors")
    cases.append((["--transformer", files[0], "--text-encoder", files[1], "--vae", tmp_path / "vae32.safetensors"],
                  "makes latents of 32 channels and the model's transformer takes 16", "different models"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files[2].read_bytes()[:-300])
    cases.append((["--transformer", files[0], "--text-encoder", files[1], "--vae", truncated], f"--vae {truncated}"))
    loads = []  # none of the big files is read before the refusal
    for loader in ("qimg.weights.split_files.load_language_model", "qimg.weights.split_files.load_vision_tower",
                   "qimg.engine.components.load_vae", "qimg.engine.components.load_transformer"):
        monkeypatch.setattr(loader, lambda *a, **k: loads.append(a))
    for args, *fragments in cases:
        code, _, err = cli("generate", "-p", "x", *args, *out)
        assert code == 2, err
        one_line(err, *fragments)
    assert not loads and not (tmp_path / "x.png").exists()


def test_q8_0_text_encoder_within_3_of_255_and_counted_packed(cli, tiny_model_dir, tmp_path, shipped, monkeypatch):
    from qimg.engine import latents
    from qimg.engine.components import Components, Loading
    from qimg.engine.memory import activation_bytes
    from qimg.model.transformer import TransformerConfig
    from qimg.model.vae import VAEConfig
    from qimg.weights.folders import read_config

    files = files_of(tiny_model_dir, tmp_path)
    q8 = tmp_path / "files" / "Qwen2.5-VL-7B-Instruct-Q8_0.gguf"
    gguf_text_encoder(tiny_model_dir, q8, "Q8_0")
    for name, te in (("f32", files[1]), ("q8", q8)):
        code, _, err = cli("generate", "-p", "a red circle", *split([files[0], te, files[2]]), "-o",
                           tmp_path / f"{name}.png", *RUN)
        assert code == 0, err
    difference = np.abs(pixels(tmp_path / "f32.png").astype(int) - pixels(tmp_path / "q8.png").astype(int))
    assert 0 < difference.max() <= 3

    def engine(te, **kw):
        return Components(shipped / "qwen-image", "cpu", "float32",
                          loading=Loading(transformer=files[0], text_encoder=te, vae=files[2], **kw))

    dense, packed = engine(files[1]).text_bytes, engine(q8, dequantize=False).text_bytes
    # Q8_0 layers at 34 bytes per 32 values (the embedding, unpacked at load, in float32)
    assert packed < dense / 2 and engine(q8).text_bytes == dense  # unpacked at load on the CPU: full size
    assert engine(files[1], offload="model").text_bytes == 0  # freed before the transformer runs
    f32, q = engine(files[1]), engine(q8)  # another file is another model, for the caches and the worker
    assert f32.text_fingerprint != q.text_fingerprint and f32.model_fingerprint != q.model_fingerprint
    assert f32.vae_fingerprint == q.vae_fingerprint
    tiny = (TransformerConfig.from_dict(read_config(shipped / "qwen-image" / "transformer")),
            VAEConfig.from_dict(read_config(shipped / "qwen-image" / "vae")))
    room = engine(files[1]).weight_bytes + activation_bytes(32, 32, *tiny, 4) + dense // 2  # no room for all of it
    monkeypatch.setattr(latents, "device_bytes", lambda device: room)
    code, _, err = cli("generate", "-p", "x", *split(files), "-o", tmp_path / "x.png", *RUN)
    assert code == 2 and not (tmp_path / "x.png").exists()
    one_line(err, "and the text encoder's", "--offload model")


def test_the_tokenizer_beside_a_text_encoder_file_is_part_of_the_model(tiny_model_dir, tmp_path, shipped):
    """A changed tokenizer folder beside a safetensors text encoder changes the model's fingerprint (the chain
    cache's key, the metadata) and the worker's kept engine's key, as the prompt embeddings' fingerprint."""
    from qimg.engine.components import Components, Loading
    from qimg.jobs import kept_engine

    files = files_of(tiny_model_dir, tmp_path)
    te = comfy_text_encoder(tiny_model_dir, tmp_path / "files" / "qwen_2.5_vl_7b.safetensors")
    shutil.copytree(tiny_model_dir / "tokenizer", tmp_path / "files" / "qwen25_tokenizer")
    loading = {"transformer": files[0], "text_encoder": te, "vae": files[2]}
    made = []

    def identity():
        engine = Components(shipped / "qwen-image", "cpu", "float32", loading=Loading(**loading))
        kept_engine.engine(shipped / "qwen-image", "cpu", "float32", loading, lambda: made.append(1))
        return engine.model_fingerprint, engine.text_fingerprint

    with kept_engine.kept():
        before = identity()
        assert identity() == before and len(made) == 1
        vocab = tmp_path / "files" / "qwen25_tokenizer" / "tokenizer.json"
        vocab.write_text(vocab.read_text() + " ")
        after = identity()
    assert after[0] != before[0] and after[1] != before[1] and len(made) == 2


def test_devices_placement_counts_a_packed_text_encoder_packed(tiny_model_dir, tmp_path, shipped, monkeypatch):
    """--devices sizes a Q8_0 --text-encoder file as its layers stay (packed), not as the folder's config in the
    run's dtype (a 4.8 GB Q4_K file counted 14.1 GB)."""
    from qimg.engine import placement
    from qimg.engine.components import Components, Loading
    from qimg.weights.split_files import Files, text_weight_bytes

    files = files_of(tiny_model_dir, tmp_path)
    q8 = tmp_path / "files" / "Qwen2.5-VL-7B-Instruct-Q8_0.gguf"
    gguf_text_encoder(tiny_model_dir, q8, "Q8_0")
    plans, plan = [], placement.plan
    monkeypatch.setattr(placement, "plan", lambda names, needs, *a: plans.append(needs) or plan(names, needs, *a))
    engine = Components(shipped / "qwen-image", "cpu", "float32", loading=Loading(
        transformer=files[0], text_encoder=q8, vae=files[2], dequantize=False, devices=("cpu", "cpu"), split=(1, 1)))
    engine.placement
    packed = text_weight_bytes(Files(text_encoder=q8), False, torch.float32, unpack=False)
    assert plans[0].text == packed < text_weight_bytes(Files(text_encoder=q8), False, torch.float32, unpack=True)


def test_model_on_a_comfyui_models_folder_and_on_loose_files(cli, tiny_model_dir, tmp_path, shipped):
    files = files_of(tiny_model_dir, tmp_path)
    models = tmp_path / "ComfyUI" / "models"
    for sub, f in (("diffusion_models", files[0]), ("text_encoders", files[1]), ("vae", files[2])):
        (models / sub).mkdir(parents=True)
        shutil.copy(f, models / sub / f.name)
    mmproj(tiny_model_dir, models / "text_encoders" / "mmproj.gguf")  # Edit's: not taken for Qwen-Image
    (models / "loras").mkdir()
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": folder_tensors(tiny_model_dir / "vae")[
        "decoder.conv_in.bias"][None]}, models / "loras" / "a.safetensors")  # never a candidate
    code, _, err = cli("generate", "-p", "a red circle", "-m", tiny_model_dir, "-o", tmp_path / "folder.png", *RUN)
    assert code == 0, err
    for name, model in (("comfy", models), ("loose", files[0].parent)):
        code, _, err = cli("generate", "-p", "a red circle", "-m", model, "-o", tmp_path / f"{name}.png", *RUN)
        assert code == 0, err
        assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / f"{name}.png"))
    shutil.copy(files[2], models / "vae" / "wan_2.1_vae.safetensors")  # the same architecture: a second candidate
    code, _, err = cli("generate", "-p", "a red circle", "-m", models, "-o", tmp_path / "x.png", *RUN)
    assert code == 2 and not (tmp_path / "x.png").exists()
    one_line(err, f"{models} has 2 files that fit as the VAE", "qwen_image_vae.safetensors", "wan_2.1_vae",
             "choose one with --vae FILE")
    code, _, err = cli("generate", "-p", "a red circle", "-m", models, "--vae", files[2], "-o", tmp_path / "x.png",
                       *RUN)
    assert code == 0, err
    (models / "text_encoders" / files[1].name).unlink()
    code, _, err = cli("generate", "-p", "a red circle", "-m", models, "--vae", files[2], "-o", tmp_path / "x.png",
                       *RUN)
    assert code == 2
    one_line(err, "nor holds a Qwen-Image text encoder file (looked in text_encoders/, clip/ or the folder itself)")
    assert "skipped" not in err
    damaged = models / "text_encoders" / files[1].name  # a truncated download is not passed over in silence
    damaged.write_bytes(files[1].read_bytes()[:-500])
    code, _, err = cli("generate", "-p", "a red circle", "-m", models, "--vae", files[2], "-o", tmp_path / "x.png",
                       *RUN)
    assert code == 2
    one_line(err, "pass it with --text-encoder FILE (skipped: ", f"{damaged} is truncated")
    code, _, err = cli("info", damaged)
    assert code == 2
    one_line(err, f"{damaged} is truncated")


def test_info_tells_each_part_file(cli, tiny_model_dir, tmp_path, shipped):
    files = files_of(tiny_model_dir, tmp_path)
    mmproj(tiny_model_dir, tmp_path / "files" / "mmproj.gguf")
    seen = {}
    for f in (*files, tmp_path / "files" / "mmproj.gguf"):
        code, out, err = cli("info", f, "--json")
        assert code == 0, err
        seen[json.loads(out)["option"]] = json.loads(out)
    assert seen["--transformer"]["variant"] == "qwen-image" and seen["--transformer"]["text_width"] == 64
    assert seen["--text-encoder"] | {"format": ""} == {
        "file": files[1].name, "part": "text encoder", "option": "--text-encoder", "format": "", "width": 64,
        "layers": 2, "vision_tower": False, "tokenizer": "in the file"}
    assert seen["--vae"]["names"] == "Wan 2.1" and seen["--vae"]["latent_channels"] == 16
    assert seen["--vision"]["part"] == "vision tower"


def test_preset_keys_and_variables_name_the_files(cli, tiny_model_dir, tmp_path, shipped, monkeypatch):
    """text_encoder:, vae: (and transformer:) in a preset are found beside it; QIMG_TEXT_ENCODER and QIMG_VAE
    give them as the options do."""
    files = files_of(tiny_model_dir, tmp_path)
    preset = files[0].parent / "split.yaml"
    preset.write_text(f"transformer: {files[0].name}\ntext_encoder: {files[1].name}\nvae: {files[2].name}\n")
    code, _, err = cli("generate", "-p", "a red circle", "--preset", preset, "-o", tmp_path / "preset.png", *RUN)
    assert code == 0, err
    monkeypatch.setenv("QIMG_TEXT_ENCODER", str(files[1]))
    monkeypatch.setenv("QIMG_VAE", str(files[2]))
    code, _, err = cli("generate", "-p", "a red circle", "--transformer", files[0], "-o", tmp_path / "env.png", *RUN)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "preset.png"), pixels(tmp_path / "env.png"))


def test_scaled_fp8_text_encoder_gives_a_folder_of_its_weights(cli, tiny_model_dir, tmp_path, shipped):
    """ComfyUI's scaled fp8 text encoder file gives the bytes of a folder holding its weights (fp8 * scale)."""
    from split_layouts import scaled_fp8_text_encoder

    te = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    held = scaled_fp8_text_encoder(tiny_model_dir, te)
    folder = tmp_path / "dense"
    shutil.copytree(tiny_model_dir, folder)
    for f in (folder / "text_encoder").glob("*.safetensors"):
        f.unlink()
    save_file({k: v.float().contiguous() for k, v in held.items()}, folder / "text_encoder" / "model.safetensors")
    code, _, err = cli("generate", "-p", "a red circle", "-m", folder, "-o", tmp_path / "dense.png", *RUN)
    assert code == 0, err
    code, out, err = cli("generate", "-p", "a red circle", "-m", tiny_model_dir, "--text-encoder", te, "-o",
                         tmp_path / "fp8.png", *RUN)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "dense.png"), pixels(tmp_path / "fp8.png"))
    # most parameters first: the tiny model's float32 embedding outweighs its fp8 layers
    assert json.loads(out)["text_encoder"]["format"] == "safetensors F32+F8_E4M3 scaled_fp8"
