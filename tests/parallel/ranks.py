"""One rank of a model-level parallel check, run as a script by test_parallel_math.py: the tiny transformer
(weights from FOLDER) called on a set of inputs under one mode (or `single`: one process, no group), the
velocities saved to OUT by rank 0. Environment: torchrun's (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
SENT = [0]  # bytes this rank sent by collectives: before the first call (joining), then one entry per call


def counted(collective, share):
    """`collective` that adds the bytes this rank sends (share(input, ranks)) to SENT's last entry."""
    import torch.distributed as dist

    def call(output, input, group=None, **kwargs):
        SENT[-1] += share(input.numel() * input.element_size(), dist.get_world_size(group))
        return collective(output, input, group=group, **kwargs)

    return call


def count_collectives() -> None:
    import torch.distributed as dist

    dist.all_to_all_single = counted(dist.all_to_all_single, lambda size, n: size * (n - 1) // n)
    for name in ("all_gather_single", "all_gather_into_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name), lambda size, n: size * (n - 1)))


count_collectives()  # before qimg.parallel binds the names
from qimg.model.transformer import QwenImageTransformer, TransformerConfig  # noqa: E402
from qimg.parallel.layout import Layout  # noqa: E402
from qimg.weights.folders import load_module  # noqa: E402

CONFIG = TransformerConfig(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                           joint_attention_dim=32, axes_dims_rope=(4, 6, 6), zero_cond_t=True)
MODES = {"single": Layout(), "cfg": Layout(cfg=True), "ulysses": Layout(ulysses=2), "tp": Layout(tp=2)}


def cases() -> list[tuple]:
    """(img, txt, txt_mask, t, grid, keep, refs): sequences the degree 2 does not divide (9 image tokens, 5 and 7
    text tokens), the text mask of a CFG pair, inpaint's kept tokens, a reference picture at t = 0, one row."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    keep = torch.zeros(9, dtype=torch.bool)
    keep[[0, 1, 3, 4, 8]] = True
    t = torch.tensor([0.7, 0.7])
    return [
        (rand(2, 9, 16), rand(2, 7, 32), mask, t, (3, 3), None, ()),
        (rand(2, 9, 16), rand(2, 7, 32), mask, t, (3, 3), keep, ()),
        (rand(2, 9 + 6, 16), rand(2, 7, 32), mask, t, (3, 3), None, ((2, 3),)),
        (rand(1, 9, 16), rand(1, 5, 32), None, t[:1], (3, 3), None, ()),
    ]


def main(mode: str, folder: Path, out: Path) -> None:
    layout = MODES[mode]
    if mode == "single":
        module = load_module(lambda: QwenImageTransformer(CONFIG), folder, torch.float32, torch.device("cpu"))
        torch.save([module(*case) for case in cases()], out)
        return
    from qimg.parallel.group import Group

    group = Group(layout, torch.device("cpu"))
    if layout.tp > 1:
        from qimg.parallel.tensor import load_split, rank_bytes

        module = load_split(CONFIG, folder, torch.float32, torch.device("cpu"), group.mesh["tp"])
        held = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in module.parameters())
        with torch.device("meta"):
            assert held == rank_bytes(QwenImageTransformer(CONFIG), 2, 4), held  # this rank's slices only
    else:
        module = load_module(lambda: QwenImageTransformer(CONFIG), folder, torch.float32, torch.device("cpu"))
    model = group.wrap(module)
    with torch.no_grad():
        if group.lead:
            results = []
            for case in cases():
                SENT.append(0)
                results.append(model(*case))
            torch.save(results, out)
            torch.save(SENT[1:], out.with_suffix(".sent"))
        else:
            group.serve(model)
    group.close()


if __name__ == "__main__":
    with torch.no_grad():
        main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
