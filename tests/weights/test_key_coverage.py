"""qimg's native models expose exactly the reference checkpoint keys and shapes (meta device, real sizes)."""

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.parity


def test_transformer_keys_match_reference_at_real_size():
    from diffusers import QwenImageTransformer2DModel

    from qimg.model.transformer import QwenImageTransformer, TransformerConfig

    cfg = TransformerConfig()
    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(**dataclasses.asdict(cfg))
        ours = QwenImageTransformer(cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert set(our_shapes) - set(ref_shapes) == set(), "keys the reference lacks"
    assert set(ref_shapes) - set(our_shapes) == set(), "reference keys we lack"
    assert our_shapes == ref_shapes
    assert len(our_shapes) == 1933
