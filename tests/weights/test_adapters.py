"""The apply step of LoRA/LoKr/LoHa: fused into plain Linear layers in float32, as side branches elsewhere."""

import torch
from torch import nn

from qimg.weights.adapters import Adapter, apply_adapters, delta, factors, targets


def lora(out=6, inp=5, rank=2, scale=0.5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return Adapter("lora", {"down": torch.randn(rank, inp, generator=g).to(dtype),
                            "up": torch.randn(out, rank, generator=g).to(dtype)}, scale)


class Packed(nn.Module):
    """A stand-in for a quantized layer: no weight to fuse into, a side branch instead."""

    def __init__(self, out, inp):
        super().__init__()
        self.out_features, self.in_features = out, inp
        self.register_buffer("packed", torch.zeros(1, dtype=torch.uint8))
        self.branches = []

    def add_branch(self, down, up):
        self.branches.append((down, up))


def test_lora_delta_and_factors_fold_the_scale():
    a = lora()
    expected = 0.5 * a.tensors["up"].double() @ a.tensors["down"].double()
    torch.testing.assert_close(delta(a).double(), expected, rtol=1e-6, atol=1e-6)
    down, up = factors(a)
    assert down.dtype == up.dtype == torch.float32
    torch.testing.assert_close((up @ down).double(), expected, rtol=1e-6, atol=1e-6)
    assert a.shape == (6, 5)


def test_lokr_and_loha_follow_their_formulas():
    g = torch.Generator().manual_seed(1)
    w1, w2a, w2b = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)
    lokr = Adapter("lokr", {"w1": w1, "w2_a": w2a, "w2_b": w2b}, 0.25)
    assert lokr.shape == (8, 15)
    torch.testing.assert_close(delta(lokr), 0.25 * torch.kron(w1, w2a @ w2b))
    assert factors(lokr)[1] is None
    h = [torch.randn(s, generator=g) for s in ((6, 2), (2, 5), (6, 3), (3, 5))]
    loha = Adapter("loha", dict(zip(("w1_a", "w1_b", "w2_a", "w2_b"), h)), 2.0)
    assert loha.shape == (6, 5)
    torch.testing.assert_close(delta(loha), 2.0 * (h[0] @ h[1]) * (h[2] @ h[3]))


def test_linear_gets_the_sum_fused_in_float32_and_cast_once():
    layer = nn.Linear(5, 6).to(torch.bfloat16).requires_grad_(False)
    before = layer.weight.clone()
    a, b = lora(seed=2, dtype=torch.bfloat16), lora(seed=3, scale=0.7)
    apply_adapters(nn.ModuleDict({"x": layer}), [{"x": a}, {"x": b}])
    assert layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.weight.float(), before.float() + delta(a) + delta(b), rtol=8e-3, atol=1e-2)
    # an update and its opposite cancel exactly only when the sum is cast once, not once per update
    layer.weight.copy_(before)
    opposite = Adapter("lora", a.tensors, -a.scale)
    apply_adapters(nn.ModuleDict({"x": layer}), [{"x": a}, {"x": opposite}])
    assert torch.equal(layer.weight, before)


def test_other_layers_take_side_branches_with_float32_factors():
    packed = Packed(6, 5)
    model = nn.ModuleDict({"q": packed, "plain": nn.Linear(5, 6)})
    assert targets(model) == {"q": (6, 5), "plain": (6, 5)}
    a = lora()
    lokr = Adapter("lokr", {"w1": torch.ones(2, 1), "w2": torch.ones(3, 5)}, 1.0)
    apply_adapters(model, [{"q": a}, {"q": lokr}])
    (down, up), (dense, none) = packed.branches
    torch.testing.assert_close(up @ down, delta(a))
    assert dense.shape == (6, 5) and none is None and dense.dtype == torch.float32


def test_fusing_in_row_chunks_equals_fusing_whole(monkeypatch):
    import qimg.weights.adapters

    monkeypatch.setattr(qimg.weights.adapters, "ROWS", 4)  # 6 rows: a chunk of 4 and one of 2
    layer = nn.Linear(5, 6)
    before = layer.weight.clone()
    a, lokr = lora(seed=4), Adapter("lokr", {"w1": torch.ones(2, 1), "w2": torch.ones(3, 5)}, 0.5)
    apply_adapters(nn.ModuleDict({"x": layer}), [{"x": a}, {"x": lokr}])
    torch.testing.assert_close(layer.weight, before + delta(a) + delta(lokr), rtol=1e-6, atol=1e-6)
