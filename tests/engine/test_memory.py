"""The working-memory estimate that refuses absurd sizes before any weights load."""

import numpy as np
import pytest
from helpers import one_line
from PIL import Image

from qimg.engine.memory import activation_bytes, edit_activation_bytes, gigabytes
from qimg.model.qwen2 import Qwen2Config
from qimg.model.transformer import TransformerConfig
from qimg.model.vae import VAEConfig
from qimg.model.vision import VisionConfig

REAL = TransformerConfig(), VAEConfig()
REAL_EDIT = (*REAL, Qwen2Config(), VisionConfig())


def test_estimate_scales_with_pixels_and_dtype():
    small, large = activation_bytes(512, 512, *REAL, 2), activation_bytes(2048, 2048, *REAL, 2)
    assert 12 < large / small <= 16  # ~linear in pixels: memory-efficient attention, no (N, N) matrix
    assert activation_bytes(1024, 1024, *REAL, 4) > activation_bytes(1024, 1024, *REAL, 2)


def test_estimate_at_1024_is_a_few_gigabytes():
    # bf16 on a GPU: the VAE decoder at full resolution dominates; far below any GPU that holds the weights.
    need = activation_bytes(1024, 1024, *REAL, 2)
    assert 1 * 2**30 < need < 4 * 2**30, gigabytes(need)


def test_absurd_sizes_need_terabytes():
    assert gigabytes(activation_bytes(100_000, 100_000, *REAL, 2)).endswith("TB")


# --- the transformer's weights, at their packed sizes ------------------------------------------------------


def q4_k_m(name: str, shape: tuple) -> str:
    """city96's Q4_K_M rules (research notes section 2.1): small and 1-D tensors F32, the in/out layers BF16,
    blocks 0 and 59 Q5_K, values and MLP down-projections Q6_K, the rest Q4_K."""
    import math

    if len(shape) == 1 or math.prod(shape) <= 1024:
        return "F32"
    if name.startswith(("img_in.", "txt_in.", "time_text_embed.", "proj_out.", "norm_out.")):
        return "BF16"
    if name.split(".")[1] in ("0", "59"):
        return "Q5_K"
    return "Q6_K" if any(s in name for s in (".to_v.", ".add_v_proj.", "mlp.net.2")) else "Q4_K"


@pytest.mark.slow
def test_packed_sizes_of_the_real_transformer_match_the_published_files():
    import math

    import torch

    from qimg.engine.memory import resident_bytes
    from qimg.model.quant import packed_size
    from qimg.model.transformer import QwenImageTransformer, TransformerConfig
    from qimg.weights.transformer import Source, tensor_sizes

    cfg, gpu = TransformerConfig(), torch.device("meta")  # any device but the CPU keeps weights packed
    dense = tensor_sizes(cfg, None, Source(), torch.bfloat16, gpu)
    fp8 = tensor_sizes(cfg, None, Source(quantize="fp8"), torch.bfloat16, gpu)
    assert abs(sum(dense.values()) / 40.86e9 - 1) < 0.01  # Comfy-Org's qwen_image_bf16: 40.86 GB
    assert abs(sum(fp8.values()) / 20.43e9 - 1) < 0.01  # qwen_image_fp8_e4m3fn: 20.43 GB
    assert tensor_sizes(cfg, None, Source(quantize="fp8"), torch.bfloat16, torch.device("cpu")) == dense  # unpacked
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in QwenImageTransformer(cfg).state_dict().items()}
    sizes = {k: math.prod(s) * {"F32": 4, "BF16": 2}[kind] if kind in ("F32", "BF16") else packed_size(kind, s)
             for k, s in shapes.items() for kind in [q4_k_m(k, s)]}
    assert abs(sum(sizes.values()) / 13.07e9 - 1) < 0.01  # city96's Qwen_Image-Q4_K_M.gguf: 13.07 GB
    # streamed blocks: everything else plus the two largest blocks
    block = sum(v for k, v in fp8.items() if k.startswith("transformer_blocks.1."))
    rest = sum(v for k, v in fp8.items() if not k.startswith("transformer_blocks."))
    assert resident_bytes(fp8, streamed=True) == rest + 2 * block


def test_weights_too_large_for_the_device_are_refused_before_loading(capsys, tmp_path, tiny_model_dir, monkeypatch):
    from qimg.cli.app import run
    from qimg.engine import latents
    from qimg.weights.folders import read_config

    tiny = (TransformerConfig.from_dict(read_config(tiny_model_dir / "transformer")),
            VAEConfig.from_dict(read_config(tiny_model_dir / "vae")))
    room = activation_bytes(32, 32, *tiny, 4) + 1000  # for the activations, not for the weights
    monkeypatch.setattr(latents, "device_bytes", lambda device: room)
    code = run(["generate", "-p", "x", "--size", "32x32", "-m", str(tiny_model_dir), "--device", "cpu",
                "-o", str(tmp_path / "o.png"), "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "the transformer's weights take about" in err and "--no-dequantize" in err
    assert not (tmp_path / "o.png").exists()


# --- instruction edits: every picture and the vision tower's input -----------------------------------------


def test_edit_estimate_counts_every_picture_and_the_vision_input():
    work, bf16 = (1024, 1024), 2
    alone = edit_activation_bytes(work, [work], 0, *REAL_EDIT, bf16)
    assert alone >= activation_bytes(*work, *REAL, bf16)  # the noisy image's own forward, and Picture 1 beside it
    refs = edit_activation_bytes(work, [work] * 3, 0, *REAL_EDIT, bf16)
    assert refs > alone  # each --ref picture's latent tokens join the sequence
    big_ref = edit_activation_bytes(work, [work, (3584, 3584)], 0, *REAL_EDIT, bf16)
    assert big_ref > refs  # a large ref at the edit area: its tokens, and the VAE encoding it
    # the vision tower over every picture at the processor's most pixels (12845056 = 65536 patches a picture)
    vision = edit_activation_bytes(work, [work] * 3, 3 * 65536, *REAL_EDIT, bf16)
    assert vision > refs and vision > 3 * 65536 * 1280 * bf16


def test_an_edit_whose_pictures_cannot_fit_is_refused_before_loading(tiny_plus_dir, tmp_path, cli, monkeypatch):
    """The device fits the edited picture alone (the old check) but not with its two --ref pictures and their
    vision patches: refused, naming the sizes, before any weights load."""
    from qimg.engine import components, latents
    from qimg.engine.components import Components
    from qimg.engine.instruct import Areas, calculate_dimensions, vision_sizes
    from qimg.model.vl_image import smart_resize
    from qimg.weights.folders import EDIT_2509, read_config
    from qimg.weights.text_encoder import image_config

    for i, name in enumerate(("in.png", "ref1.png", "ref2.png")):
        Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8)).save(tmp_path / name)
    areas = Areas(64 * 48, 512 * 512)
    work = calculate_dimensions(areas.edit, 64 / 48)
    d = read_config(tiny_plus_dir / "text_encoder")
    tiny = (TransformerConfig.from_dict(read_config(tiny_plus_dir / "transformer")),
            VAEConfig.from_dict(read_config(tiny_plus_dir / "vae")), Qwen2Config.from_dict(d),
            VisionConfig.from_dict(d))
    cfg = image_config(tiny_plus_dir)
    h, w = smart_resize(*vision_sizes(EDIT_2509, [(64, 48)], areas)[0][::-1], cfg)
    patches = h * w // cfg.patch_size ** 2
    alone = edit_activation_bytes(work, [work], patches, *tiny, 4)
    assert edit_activation_bytes(work, [work] * 3, 3 * patches, *tiny, 4) > alone
    weights = Components(tiny_plus_dir, "cpu", "float32").weight_bytes
    monkeypatch.setattr(latents, "device_bytes", lambda device: weights + alone)  # room for one picture only

    def loaded(*args, **kwargs):
        raise AssertionError("weights loaded")

    for name in ("load_module", "load_transformer", "load_instruct_encoder"):
        monkeypatch.setattr(components, name, loaded)
    code, _, err = cli("edit", tmp_path / "in.png", "-p", "x", "--ref", tmp_path / "ref1.png", "--ref",
                       tmp_path / "ref2.png", "-m", tiny_plus_dir, "--edit-area", areas.edit, "--vision-area",
                       areas.vision, "--device", "cpu", "--no-worker", "--no-cache", "--steps", 1,
                       "-o", tmp_path / "o.png")
    size = f"{work[0]}x{work[1]}"
    assert code == 2, err
    one_line(err, f"an edit at {size} with pictures of {size}, {size}, {size} and {3 * patches:,} vision patches "
             "would need about", "fewer --ref pictures")
    assert not (tmp_path / "o.png").exists()
