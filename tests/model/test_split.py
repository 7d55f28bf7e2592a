"""model/split.py's BlockSplit across two different devices on a machine without GPUs: the CPU, then the meta
device (shapes only, no data), which refuses any operation that mixes in a tensor of another device. Two names of
the CPU (the other tests' `cpu,cpu`) make every move a no-op, so only this catches a tensor left behind. The
hidden states' way back to the first device is not checked here (nothing can be copied out of the meta device):
benchmarks/gpu.py runs the split over two GPUs against one GPU's output when two are visible."""

import pytest
import torch

from qimg.model.split import BlockSplit, place_split
from qimg.model.transformer import QwenImageTransformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CPU, META = torch.device("cpu"), torch.device("meta")


def block_inputs(model: QwenImageTransformer) -> tuple:
    """The (img, txt, vec, rope, plan) the layers before the blocks make, with everything that can be in them: a
    padded prompt (the text key mask), an inpaint's kept tokens (the attention plan's indices), a reference
    picture under zero_cond_t (two timestep rows)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(2, 4 * 6 + 4 * 2, cfg.in_channels, generator=gen)
    txt = torch.randn(2, 5, cfg.joint_attention_dim, generator=gen)
    txt_mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2])
    keep = torch.arange(24) < 10
    seen = []

    def record(*args):
        seen.append(args)
        return args[:2]

    model.run_blocks = record
    model(img, txt, txt_mask, torch.tensor([0.3, 0.3]), (4, 6), keep, ((4, 2),))
    del model.run_blocks
    return seen[0]


@pytest.mark.slow  # the meta device's kernels import torch's Python decompositions: ~4 s once a process
def test_each_stage_runs_on_its_device_with_every_input_moved_there():
    cfg = TransformerConfig(num_layers=3, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=24,
                            axes_dims_rope=(4, 6, 6), zero_cond_t=True)
    torch.manual_seed(0)
    model = QwenImageTransformer(cfg).eval()
    inputs = block_inputs(model)
    plan = inputs[4]
    assert plan.mask is not None and plan.kept is not None and inputs[2].shape[1] == 2  # all of it exercised
    with torch.no_grad():
        want = model.run_blocks(*inputs)
        place_split(model, [(CPU, 0, 2), (META, 2, 3)], META)
        split = model.run_blocks
        assert isinstance(split, BlockSplit)
        assert [{p.device.type for p in block.parameters()} for block in model.transformer_blocks] == \
            [{"cpu"}, {"cpu"}, {"meta"}]
        img, txt = split(*inputs)  # an operation mixing a CPU tensor into the meta stage raises
    assert (img.device, txt.device) == (META, META)
    assert (img.shape, txt.shape) == (want[0].shape, want[1].shape)


def test_a_shared_input_left_on_the_first_device_is_caught(monkeypatch):
    """The check above can fail: a BlockSplit that does not move the timestep embeddings to the meta stage."""
    from qimg.model import split as split_module

    cfg = TransformerConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=24,
                            axes_dims_rope=(4, 6, 6))
    torch.manual_seed(0)
    model = QwenImageTransformer(cfg).eval()
    inputs = block_inputs(model)
    moved = split_module.moved

    def leaving_vec(x, device):
        if isinstance(x, tuple) and x and x[0] is inputs[2]:  # (vec, rope, plan): vec stays where it is
            return (x[0], *moved(x[1:], device))
        return moved(x, device)

    monkeypatch.setattr(split_module, "moved", leaving_vec)
    place_split(model, [(CPU, 0, 1), (META, 1, 2)], META)
    with torch.no_grad(), pytest.raises(RuntimeError, match="device"):
        model.run_blocks(*inputs)
