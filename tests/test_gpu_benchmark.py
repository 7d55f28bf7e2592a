"""benchmarks/gpu.py without a GPU: its options parse, it skips with one line, and the Qwen-Image-2.1 rows it times
on a GPU (no cache, cache fill, cache read) run on the CPU at the tiny width, the cached forward equal to the
uncached one, with the report's lines."""

import sys
from pathlib import Path

import pytest
import torch

from qimg.model.transformer21 import Transformer21Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_options_and_the_skip_without_cuda(monkeypatch, capsys):
    args = gpu.parse(["--family", "2.1", "--pictures", "0", "--steps", "8"])
    assert (args.family, args.layers, args.pictures, args.steps, args.size) == ("2.1", 32, 0, 8, 1024)
    assert (gpu.parse([]).family, gpu.parse([]).layers) == ("qwen-image", 60)
    with pytest.raises(SystemExit):
        gpu.parse(["--family", "2.0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu.main(["--family", "2.1"])
    assert capsys.readouterr().out == "no CUDA device: skipped\n"


@pytest.mark.parametrize("pictures", [0, 2])
def test_the_2_1_rows_run_on_the_cpu(pictures, capsys):
    cfg = Transformer21Config.tiny()
    rows = gpu.transformer21_rows(cfg, torch.device("cpu"), torch.float32, txt_tokens=5, side=4, pictures=pictures,
                                  reps=1)
    assert rows["tokens"] == 5 * (pictures + 1) + 16 * (pictures + 1) and rows["prefix"] == rows["tokens"] - 16
    assert rows["diff"] <= 1e-5 and set(rows["seconds"]) == {"no cache", "cache fill", "cache read", "offload no cache",
                                                              "offload cache read"}
    args = gpu.parse(["--family", "2.1", "--txt-tokens", "5", "--size", "64", "--pictures", str(pictures),
                      "--reps", "1"])
    gpu.report21(cfg, rows, args, peak=None)
    out = capsys.readouterr().out
    assert "2 blocks x hidden 32" in out and "offload cache read" in out and "one image of 40 steps" in out
    assert gpu.forward21_flops(cfg, 16, rows["tokens"]) < gpu.forward21_flops(cfg, rows["tokens"], rows["tokens"])
