"""Qwen-Image-2.1 through qimg's job features (issue 26): `generate --prompts` batches and edit folder batches,
each split by `--shard` into the same bytes, presets (a preset's values are the flags'), `--reuse` (fewer
transformer calls, the same bytes with a preview watching) and generate's previews (the last one the RGBA result).
Under torchrun, `--shard auto` gives each rank its part. --offload blocks gives the same bytes. The worker's runs are
tests/worker/test_worker_qwen21.py's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qimg.jobs import shard
from qimg.jobs.metadata import read_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
RUN = ("--device", "cpu", "--no-worker", "--json")
ROOT = Path(__file__).resolve().parents[2]


def lines(cli, *args) -> list[dict]:
    code, out, err = cli(*args, *RUN)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def rgba(path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "RGBA"
    return np.asarray(image)


def test_a_prompts_batch_writes_rgba_images_and_its_shards_the_same_bytes(cli, qwen21_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"a red circle"\n{"prompt": "a blue square", "seed": 5, "size": "64x32"}\n"一只猫"\n')
    base = ("generate", "-m", qwen21_dir, "--prompts", prompts, "--size", "32x32", "--steps", "2", "--seed", "7")
    reports = lines(cli, *base, "--out-dir", tmp_path / "all")
    whole = files(tmp_path / "all")
    assert [Path(r["output"]).name for r in reports] == sorted(whole) and len(whole) == 3
    assert all(r["calls"] == 2 and r["licence"] == "Qwen Research License" for r in reports)
    second = tmp_path / "all" / "0002-a-blue-square.png"
    assert rgba(second).shape == (32, 64, 4) and read_params(second)["seed"] == 5
    assert len({rgba(tmp_path / "all" / name).tobytes() for name in whole}) == 3
    for i in (0, 1):
        lines(cli, *base, "--out-dir", tmp_path / "shards", "--shard", f"{i}/2")
    assert files(tmp_path / "shards") == whole


def test_an_edit_folder_batch_and_its_shards_give_the_same_bytes(cli, qwen21_dir, tmp_path):
    rng = np.random.default_rng(3)
    names = [n for n in (f"p{i}.png" for i in range(40)) if shard.key(n) % 2 == 0][:2] + \
            [n for n in (f"p{i}.png" for i in range(40)) if shard.key(n) % 2 == 1][:1]  # both shards take some
    (tmp_path / "in").mkdir()
    for name in names:
        image = rng.integers(0, 256, (32, 48, 4), np.uint8)
        image[..., 3] = np.where(rng.random((32, 48)) < 0.5, 255, 60)
        Image.fromarray(image).save(tmp_path / "in" / name)
    base = ("edit", tmp_path / "in", "-m", qwen21_dir, "-p", "make it blue", "--edit-area", "1536", "--steps", "2",
            "--seed", "1", "--rect", "8,8,16,16")
    reports = lines(cli, *base, "--out-dir", tmp_path / "all")
    whole = files(tmp_path / "all")
    assert len(reports) == 3 == len(whole)
    for name in names:  # alpha kept, outside the mask the input's bytes
        result, source = rgba(tmp_path / "all" / f"{Path(name).stem}.edit.png"), rgba(tmp_path / "in" / name)
        keep = np.ones((32, 48), bool)
        keep[8:24, 8:24] = False
        assert np.array_equal(result[keep], source[keep]) and not np.array_equal(result, source)
    for i in (0, 1):
        taken = lines(cli, *base, "--out-dir", tmp_path / "shards", "--shard", f"{i}/2")
        assert len(taken) == (2 if i == 0 else 1)
    assert files(tmp_path / "shards") == whole


def test_a_preset_gives_what_its_flags_give(cli, qwen21_dir, tmp_path):
    preset = tmp_path / "q21.yaml"
    preset.write_text("steps: 2\nseed: 9\nsize: 64x32\nno-kv-cache: true\nbackground: '#204060'\n")
    by_flags = lines(cli, "generate", "-m", qwen21_dir, "-p", "a red circle", "--steps", "2", "--seed", "9",
                     "--size", "64x32", "--no-kv-cache", "--background", "#204060", "-o", tmp_path / "flags.png")[0]
    by_preset = lines(cli, "generate", "-m", qwen21_dir, "-p", "a red circle", "--preset", preset,
                      "-o", tmp_path / "preset.png")[0]
    assert by_preset["kv_cache"] == by_flags["kv_cache"] and not by_preset["kv_cache"]["on"]
    flat = np.asarray(Image.open(tmp_path / "preset.png"))
    assert flat.shape == (32, 64, 3) and np.array_equal(flat, np.asarray(Image.open(tmp_path / "flags.png")))
    edit_preset = tmp_path / "edit.yaml"
    edit_preset.write_text("steps: 1\nseed: 2\nedit-area: 1024\n")
    Image.fromarray(np.full((32, 32, 4), 128, np.uint8)).save(tmp_path / "in.png")
    report = lines(cli, "edit", tmp_path / "in.png", "-m", qwen21_dir, "-p", "x", "--preset", edit_preset,
                   "-o", tmp_path / "edited.png")[0]
    assert report["calls"] == 1 and report["seed"] == 2 and rgba(tmp_path / "edited.png").shape == (32, 32, 4)


def test_reuse_skips_calls_and_a_preview_changes_no_byte(cli, qwen21_dir, tmp_path):
    base = ("generate", "-m", qwen21_dir, "-p", "a red circle", "--size", "32x32", "--steps", "12", "--seed", "4")
    full = lines(cli, *base, "-o", tmp_path / "full.png")[0]
    reused = lines(cli, *base, "--reuse", "0.5", "-o", tmp_path / "reused.png")[0]
    watched = lines(cli, *base, "--reuse", "0.5", "-o", tmp_path / "watched.png", "--preview", tmp_path / "live.png",
                    "--preview-every", "3")[0]
    assert full["calls"] == 12 and reused["calls"] < 12 and reused["reuse"] == 0.5
    assert (tmp_path / "reused.png").read_bytes() == (tmp_path / "watched.png").read_bytes()
    assert watched["calls"] == reused["calls"] and watched["previews"] == 4  # after steps 3, 6 and 9, then the result
    assert np.array_equal(rgba(tmp_path / "live.png"), rgba(tmp_path / "watched.png"))
    assert np.abs(rgba(tmp_path / "reused.png").astype(int) - rgba(tmp_path / "full.png")).max() > 0


def test_offload_blocks_gives_the_same_bytes(cli, qwen21_dir, tmp_path):
    """--offload blocks streams the blocks' weights (model/offload.py); on the CPU the copies are the weights
    themselves, so every number is the same: with the prefix cache filled and read, without it, packed fp8."""
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 48, 4), np.uint8)).save(tmp_path / "in.png")
    runs = {
        "generate": ("generate", "-m", qwen21_dir, "-p", "a red circle", "--size", "64x32", "--steps", "3"),
        "no-kv": ("generate", "-m", qwen21_dir, "-p", "a red circle", "--size", "32x32", "--steps", "2",
                  "--no-kv-cache"),
        "edit fp8": ("edit", tmp_path / "in.png", "--ref", tmp_path / "in.png", "-m", qwen21_dir, "-p", "x",
                     "--edit-area", "1536", "--steps", "2", "--quantize", "fp8", "--no-dequantize"),
    }
    for name, args in runs.items():
        plain = lines(cli, *args, "--seed", "2", "--no-cache", "-o", tmp_path / f"{name}.png")[0]
        streamed = lines(cli, *args, "--seed", "2", "--no-cache", "--offload", "blocks",
                         "-o", tmp_path / f"{name}-streamed.png")[0]
        assert (tmp_path / f"{name}.png").read_bytes() == (tmp_path / f"{name}-streamed.png").read_bytes(), name
        assert streamed["calls"] == plain["calls"] and streamed["kv_cache"] == plain["kv_cache"]


@pytest.mark.subprocess
def test_torchrun_ranks_share_a_prompts_batch_into_the_same_bytes(cli, qwen21_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    base = ("generate", "-m", qwen21_dir, "--prompts", prompts, "--size", "32x32", "--steps", "1", "--seed", "3",
            "--device", "cpu", "--no-cache")
    lines(cli, *base, "--out-dir", tmp_path / "one")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QIMG_WORKER": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "qimg", *map(str, base), "--out-dir", tmp_path / "ranks", "--shard", "auto"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "shard 0/2" in result.stderr and "shard 1/2" in result.stderr
    assert files(tmp_path / "ranks") == files(tmp_path / "one")
