"""The parallel modes against one process at the transformer's level, on sequences the degree does not divide,
with a CFG pair's text mask, inpaint's kept tokens and an Edit-2511 reference picture (zero_cond_t).

Each mode is within float32 rounding of one process (one thread per rank, as the single run), and no closer can
be promised on every BLAS: tensor parallel's row-split all-reduces add partial sums in another order; under
guidance-parallel each rank's timestep embedding and modulation layers take one row where one process takes the
CFG pair's two (matrix-vector and matrix-matrix products round differently); under Ulysses a linear layer runs on
a shard of the tokens, and the CPU's BLAS computes the last rows of a matrix that fill no whole row block with
another kernel, so a token near a shard's end can round differently. Attention, the exchanges, the norms and
the rope give the same bits; the first three cases here are bit-identical under Ulysses."""


import pytest
import torch
from launch import run
from ranks import CONFIG, MODES, cases
from safetensors.torch import save_file

from qimg.parallel.layout import exchanged_bytes


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from qimg.model.transformer import QwenImageTransformer

    torch.manual_seed(0)
    model = QwenImageTransformer(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("transformer")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    reference = folder / "single.pt"
    [(code, _, err)] = run(["tests/parallel/ranks.py", "single", str(folder), str(reference)], ranks=1)
    assert code == 0, err
    return folder, torch.load(reference)


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cfg", "ulysses", "tp"])
def test_each_mode_matches_one_process(weights, tmp_path, mode):
    folder, reference = weights
    out = tmp_path / f"{mode}.pt"
    results = run(["tests/parallel/ranks.py", mode, str(folder), str(out)])
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    got = torch.load(out)
    for i, (a, b) in enumerate(zip(reference, got)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=f"case {i}")
    if mode != "tp":  # the bytes the docs and benchmarks/parallel.py compute are the bytes sent (tp's all-reduce
        # goes through DTensor's own collectives, uncounted here)
        sent = torch.load(out.with_suffix(".sent"))
        for (img, txt, _, _, grid, _, _), count in zip(cases(), sent):
            layout = MODES[mode]
            rows = 1 if layout.cfg and img.shape[0] == 2 else img.shape[0]
            computed = exchanged_bytes(layout, CONFIG.dim, CONFIG.num_layers, txt.shape[1], img.shape[1],
                                       grid[0] * grid[1], CONFIG.patch_size ** 2 * CONFIG.out_channels, 4, rows)
            assert count == sum(computed.values()) or (layout.cfg and img.shape[0] == 1 and count == 0)


def test_the_memory_table_is_what_the_script_prints(capsys):
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    runpy.run_path(str(root / "scripts" / "parallel_memory.py"), run_name="__main__")
    printed = capsys.readouterr().out.strip()
    assert printed in (root / "docs" / "parallel.md").read_text(), "run python scripts/parallel_memory.py"
