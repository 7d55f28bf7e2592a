"""The working-memory estimate that refuses absurd sizes before any weights load."""

import pytest

from qimg.engine.memory import activation_bytes, gigabytes
from qimg.model.transformer import TransformerConfig
from qimg.model.vae import VAEConfig

REAL = TransformerConfig(), VAEConfig()


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
    from qimg.engine import latents as sampler
    from qimg.weights.folders import read_config

    tiny = (TransformerConfig.from_dict(read_config(tiny_model_dir / "transformer")),
            VAEConfig.from_dict(read_config(tiny_model_dir / "vae")))
    room = activation_bytes(32, 32, *tiny, 4) + 1000  # for the activations, not for the weights
    monkeypatch.setattr(sampler, "device_bytes", lambda device: room)
    code = run(["generate", "-p", "x", "--size", "32x32", "-m", str(tiny_model_dir), "--device", "cpu",
                "-o", str(tmp_path / "o.png"), "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "the transformer's weights take about" in err and "--no-dequantize" in err
    assert not (tmp_path / "o.png").exists()
