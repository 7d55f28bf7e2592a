"""End to end against the reference: prompt embeddings and `qimg generate` PNGs vs QwenImagePipeline
on the same tiny checkpoint, loaded by qimg from disk."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from qimg.cli.app import run
from qimg.engine.engine import Engine

PROMPTS = ["a red circle on a blue background", "蓝色背景上的红色圆形", "a 红色 circle on the left"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(tiny_model_dir, "cpu", "float32")


@pytest.mark.parity
@pytest.mark.parametrize("prompt", PROMPTS + [" "])
def test_prompt_embeddings_match_pipeline(engine, reference_pipeline, prompt):
    ours = engine.encode_prompts([prompt])[0]
    ref, ref_mask = reference_pipeline.encode_prompt(prompt, device="cpu")
    assert ref_mask is None and ours.shape == ref[0].shape
    torch.testing.assert_close(ours, ref[0], rtol=0, atol=1e-5)


def test_prompts_of_different_lengths_encode_as_if_alone(engine):
    long, short = engine.encode_prompts([PROMPTS[0] + " with a small yellow square", PROMPTS[1]])
    assert long.shape[0] > short.shape[0]
    torch.testing.assert_close(engine.text.encode([PROMPTS[1]])[0], short, rtol=0, atol=1e-5)


def reference_image(pipe, prompt, width, height, steps, cfg, seed):
    return pipe(prompt, negative_prompt=" ", true_cfg_scale=cfg, width=width, height=height,
                num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


@pytest.mark.parity
@pytest.mark.parametrize("prompt, width, height, steps, cfg, seed", [
    (PROMPTS[0], 64, 64, 4, 4.0, 7),
    (PROMPTS[1], 80, 48, 3, 4.0, 11),
    (PROMPTS[2], 48, 112, 3, 2.5, 0),
    (PROMPTS[0], 64, 32, 3, 1.0, 3),  # no guidance: one pass per step
])
def test_generate_png_matches_pipeline(tiny_model_dir, reference_pipeline, capsys, tmp_path,
                                       prompt, width, height, steps, cfg, seed):
    out = tmp_path / "out.png"
    code = run(["generate", "-m", str(tiny_model_dir), "-p", prompt, "--size", f"{width}x{height}",
                "--steps", str(steps), "--cfg", str(cfg), "--seed", str(seed), "-o", str(out), "--device", "cpu",
                "--json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["output"] == str(out) and report["seed"] == seed
    assert (report["width"], report["height"], report["steps"]) == (width, height, steps)
    ours = np.asarray(Image.open(out).convert("RGB")).astype(int)
    ref = np.asarray(reference_image(reference_pipeline, prompt, width, height, steps, cfg, seed)).astype(int)
    assert ours.shape == (height, width, 3)
    assert np.abs(ours - ref).max() <= 1
    assert ref.std() > 1  # a flat image would make the comparison meaningless


@pytest.mark.slow
def test_seed_changes_the_image_and_is_reported_when_random(tiny_model_dir, capsys, tmp_path):
    images = []
    for i, seed in enumerate(["1", "2", None]):
        args = ["generate", "-m", str(tiny_model_dir), "-p", PROMPTS[0], "--size", "32x32", "--steps", "2",
                "-o", str(tmp_path / f"{i}.png"), "--json"] + (["--seed", seed] if seed else [])
        assert run(args) == 0
        report = json.loads(capsys.readouterr().out)
        images.append(np.asarray(Image.open(tmp_path / f"{i}.png")))
    assert isinstance(report["seed"], int)
    assert not np.array_equal(images[0], images[1])
    assert json.loads(Image.open(tmp_path / "0.png").text["qimg"])["seed"] == 1


@pytest.mark.subprocess
def test_repo_id_resolves_through_the_hub_cache(tiny_model_dir, tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen-Image" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "qimg", "generate", "-m", "Qwen/Qwen-Image", "-p", "x", "--size", "32x32",
         "--steps", "1", "--seed", "5", "-o", str(tmp_path / "o.png"), "--json"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == str(snapshot)
    assert Image.open(tmp_path / "o.png").size == (32, 32)
