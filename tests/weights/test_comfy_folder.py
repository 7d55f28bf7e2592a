"""comfy_folder: a part's file told by its header under each naming qimg reads (the checkpoint's, transformers
5's, llama.cpp's, Wan's, diffusers'), and why a file in a part's folder was not taken."""

import pytest
from safetensors.torch import save_file
from split_layouts import comfy_text_encoder, folder_tensors, gguf_text_encoder, wan_vae

from qimg.weights.comfy_folder import Takes, _fits, _read, describe_file

QWEN_IMAGE = Takes(text_width=64, qwen3=False, channels=16, vision=False)  # what the tiny 20B transformer takes


def transformers5_text_encoder(folder, path):
    """A text encoder saved by transformers 5 (model.language_model.*, model.visual.*)."""
    save_file({("model.language_model." + k[6:] if k.startswith("model.") else "model." + k): v
               for k, v in folder_tensors(folder / "text_encoder").items() if k != "lm_head.weight"}, path)
    return path


@pytest.mark.parametrize("naming", ["checkpoint", "transformers 5", "llama.cpp"])
def test_text_encoder_width_and_layers_in_every_naming(tiny_model_dir, tmp_path, naming):
    path = tmp_path / ("te.gguf" if naming == "llama.cpp" else "te.safetensors")
    {"checkpoint": comfy_text_encoder, "transformers 5": transformers5_text_encoder,
     "llama.cpp": gguf_text_encoder}[naming](tiny_model_dir, path)
    info = describe_file(path)
    assert (info["width"], info["layers"], info["vision_tower"]) == (64, 2, naming != "llama.cpp")
    part, shapes, _ = _read(path)  # what -m on a ComfyUI folder takes: as wide as the transformer's txt_in
    assert part == "text encoder" and _fits(part, shapes, QWEN_IMAGE)
    assert not _fits(part, shapes, Takes(128, False, 16, False))  # another width
    assert not _fits(part, shapes, Takes(64, True, 64, True))  # Qwen-Image-2.1 takes Qwen3-VL


@pytest.mark.parametrize("naming", ["Wan 2.1", "diffusers"])
def test_vae_latent_channels_in_both_namings(tiny_model_dir, tmp_path, naming):
    path = tmp_path / "vae.safetensors"
    if naming == "Wan 2.1":
        wan_vae(tiny_model_dir, path)
    else:
        save_file(folder_tensors(tiny_model_dir / "vae"), path)
    info = describe_file(path)
    assert (info["names"], info["latent_channels"]) == (naming, 16)
    assert _fits("VAE", _read(path)[1], QWEN_IMAGE) and not _fits("VAE", _read(path)[1], Takes(64, True, 64, True))
