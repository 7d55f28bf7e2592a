"""--offload blocks for Qwen-Image-2.1 (model/offload.py): the streamed stack copies each block's weights once per
forward, in order, and gives the in-memory stack's numbers exactly, with the prefix cache filled and read too;
the 20B transformer's run_blocks is replaced as before, 2.1's is not (it iterates the stream)."""

import torch

from qimg.model import offload
from qimg.model.rope21 import build_layout
from qimg.model.transformer21 import PrefixCache, QwenImage21Transformer, Transformer21Config


def test_streamed_2_1_blocks_give_the_same_numbers(monkeypatch):
    torch.manual_seed(0)
    cfg = Transformer21Config.tiny()
    model = QwenImage21Transformer(cfg).eval()
    img_mask = torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool)  # text, one picture slot (2x2 latents), text
    layout = build_layout(img_mask, [(2, 2), (2, 4)], cfg.axes_dims_rope)
    latents, txt = torch.randn(1, 12, cfg.in_channels), torch.randn(1, 5, cfg.context_in_dim)
    t = torch.tensor([0.6])
    with torch.no_grad():
        plain = model(latents, txt, t, layout)
        offload.place_for_streaming(model, torch.device("cpu"))
        assert isinstance(model.stream, offload.BlockStream) and "run_blocks" not in vars(model)
        fetched = []
        fetch = offload.BlockStream.fetch
        monkeypatch.setattr(offload.BlockStream, "fetch",
                            lambda self, block: fetched.append(block) or fetch(self, block))
        assert torch.equal(model(latents, txt, t, layout), plain)
        assert fetched == list(model.transformer_blocks)
        cache = PrefixCache()
        assert torch.equal(model(latents, txt, t, layout, cache), plain) and cache.filled
        assert torch.equal(model(latents, txt, t, layout, cache), plain)
        assert len(fetched) == 3 * cfg.num_layers


def test_a_stream_frees_each_copy_before_the_block_after_next_is_fetched():
    blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
    stream = offload.BlockStream(blocks, torch.device("cpu"))
    held = []
    for block in stream:
        held.append(block.args[1])  # the list through which the callable reaches its copy
        assert sum(bool(h) for h in held) == 1  # the ones before were emptied when this one was asked for
        block(torch.zeros(1, 2))
