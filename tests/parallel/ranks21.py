"""One rank of a model-level Qwen-Image-2.1 check, run as a script by test_qwen21_parallel.py: the tiny 2.1
transformer (weights from FOLDER) on a set of calls under one mode (or `single`: one process, no group); rank 0
saves the velocities, the heads its prefix caches hold and the all-to-alls it made to OUT."""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
EXCHANGES = [0]


def counted():
    import torch.distributed as dist

    all_to_all = dist.all_to_all_single

    def call(*args, **kwargs):
        EXCHANGES[0] += 1
        return all_to_all(*args, **kwargs)

    dist.all_to_all_single = call


counted()  # before qimg.parallel binds the name
from qimg.model.rope21 import build_layout  # noqa: E402
from qimg.model.transformer21 import PrefixCache, QwenImage21Transformer, Transformer21Config  # noqa: E402
from qimg.parallel.layout import Layout  # noqa: E402
from qimg.weights.folders import load_module  # noqa: E402

CONFIG = Transformer21Config(in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16,
                             num_attention_heads=4, context_in_dim=24, axes_dims_rope=(4, 6, 6))
MODES = {"single": Layout(), "ulysses": Layout(ulysses=2), "tp": Layout(tp=2)}


def calls() -> list[tuple]:
    """(latents, txt, t, layout, cache) in the order a sampler makes them: a prompt of 5 text tokens, a 2x4
    picture's slots and 2 more (prefix 15: odd), a padded text key, a 2x2 target (4 tokens); the prefix cache
    filled at the first step and read at the next two; the same without a cache."""
    g = torch.Generator().manual_seed(0)
    slots = torch.tensor([False] * 5 + [True] * 2 + [False] * 2)
    layout = build_layout(slots, [(2, 4), (2, 2)], CONFIG.axes_dims_rope, txt_mask=torch.tensor([[1] * 8 + [0]]))
    txt, refs = torch.randn(1, 9, 24, generator=g), torch.randn(1, 8, 8, generator=g)
    cache = PrefixCache()
    out = []
    for cached in (cache, None):
        for t in (0.9, 0.6, 0.3):
            out.append((torch.cat([refs, torch.randn(1, 4, 8, generator=g)], 1), txt, torch.tensor([t]), layout,
                        cached))
    return out


def main(mode: str, folder: Path, out: Path) -> None:
    module = load_module(lambda: QwenImage21Transformer(CONFIG), folder, torch.float32, torch.device("cpu"))
    if mode == "single":
        torch.save([module(*call) for call in calls()], out)
        return
    from qimg.parallel.group import Group

    group = Group(MODES[mode], torch.device("cpu"))
    held = None
    if mode == "tp":
        from qimg.parallel.tensor import load_split, rank_bytes

        module = load_split(CONFIG, folder, torch.float32, torch.device("cpu"), group.mesh["tp"])
        held = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in module.parameters())
        with torch.device("meta"):
            assert held == rank_bytes(QwenImage21Transformer(CONFIG), 2, 4), held  # this rank's slices only
    model = group.wrap(module)
    if group.lead:
        results, heads = [], []
        for call in calls():
            results.append(model(*call))
            if call[4] is not None:  # the heads of this rank's cache, per block
                heads = [k.shape[2] for cache in model.ranked.caches.values() for k, _ in cache.layers]
        torch.save({"velocities": results, "heads": heads, "exchanges": EXCHANGES[0], "held": held}, out)
    else:
        group.serve(model)
    group.close()


if __name__ == "__main__":
    with torch.no_grad():
        main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
