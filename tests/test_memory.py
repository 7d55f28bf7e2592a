"""The working-memory estimate that refuses absurd sizes before any weights load."""

from qimg.memory import activation_bytes, gigabytes
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
