"""The built-in shapes model: shipped in the package, small, loaded by default, the same image as the
reference pipeline, and it draws what it is asked (a small, fixed-seed run of the evaluation)."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from qimg.engine.engine import Engine
from qimg.engine.request import Sampling
from qimg.model.text import DROP, TEMPLATE
from qimg.train.evaluate import evaluate
from qimg.weights.folders import BUILTIN, builtin_model

PROMPT = "a red circle on the left of a blue background"
RATIO = 1.1  # swapped-shape over true-shape loss on the object tokens (test_shape_word_changes_the_prediction)


@pytest.fixture(scope="module")
def engine():
    return Engine(builtin_model(), "cpu", "float32")


def test_folder_is_small_and_complete():
    size = sum(f.stat().st_size for f in BUILTIN.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MB"
    for part in ("model_index.json", "qimg.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
                 "text_encoder/model.safetensors", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        assert (BUILTIN / part).is_file(), part


@pytest.mark.parity
def test_template_prefix_is_what_the_reference_drops():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUILTIN / "tokenizer")
    prefix = TEMPLATE.split("{}")[0]
    assert len(tok(prefix).input_ids) == DROP
    ids = tok(TEMPLATE.format(PROMPT)).input_ids
    assert tok.decode(ids[DROP:]).startswith(PROMPT)


@pytest.mark.parity
def test_same_image_as_the_reference_pipeline(engine):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(BUILTIN, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    d = engine.defaults
    ref = pipe(PROMPT, negative_prompt=d.negative_prompt, true_cfg_scale=d.cfg, num_inference_steps=d.steps,
               width=d.width, height=d.height, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    ours = engine.generate(Sampling(PROMPT, d.negative_prompt, d.steps, d.cfg, 3), d.width, d.height).image
    assert np.abs(np.asarray(ref).astype(int) - ours).max() <= 1


@pytest.mark.subprocess
def test_generate_needs_no_model_option(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QIMG_MODEL"}
    out = tmp_path / "demo.png"
    result = subprocess.run([sys.executable, "-m", "qimg", "generate", "-p", PROMPT, "-o", str(out), "--seed", "1"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (128, 128, 3)


@pytest.mark.slow
def test_small_evaluation(engine):
    """Twelve held-out captions and four inpaintings with fixed seeds. The floors sit well above what a
    model ignoring its prompt scores (a session-2 checkpoint: 0-5% all stated, 5% inpaint) and below what
    the shipped one scores here (100/50/100% all stated, 100% inpaint; the full evaluation is in the
    README), so they catch a checkpoint or engine change that breaks prompt following without flaking
    on a single case."""
    table, cases = evaluate(engine, per_language=4, seed=7)
    languages = ("en", "zh", "mixed")
    assert all(table[lang]["background"] >= 0.75 for lang in languages), (table, cases)
    assert sum(table[lang]["all stated"] for lang in languages) / 3 >= 0.65, (table, cases)
    assert table["inpaint"]["color"] >= 0.5, (table, cases)


@pytest.mark.slow
def test_shape_word_changes_the_prediction():
    """The shape named in the prompt must matter to the model where the shape is still open (t 0.6-0.9):
    rendered scenes fit worse under captions naming other shapes. A checkpoint trained without the shape
    contrast scores 1.01 here (it read colour and position from the prompt, never shape); the shipped one 1.45."""
    from qimg.model.transformer import patchify
    from qimg.train.shapes import render, sample_scene
    from qimg.train.text import Prompts
    from qimg.train.train import caption_pair, encode_all, flow_errors, load_folder, object_tokens, weighted

    tokenizer, encoder, vae, model = load_folder(BUILTIN)
    rng = random.Random(11)
    scenes = [sample_scene(rng, objects=1) for _ in range(48)]
    images = np.stack([render(s, rng) for s in scenes])
    pairs = []
    while len(pairs) < len(scenes):  # a conditional caption pair per scene
        pair = caption_pair(scenes[len(pairs)], rng)
        if pair[0] != " ":
            pairs.append(pair)
    x0 = patchify(encode_all(vae, images))
    on_objects = object_tokens(images).float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    s = torch.linspace(0.6, 0.9, len(scenes))
    prompts = Prompts(tokenizer, encoder)
    with torch.no_grad():
        true, swapped = (weighted(flow_errors(model, prompts, x0, noise, s, list(texts), (8, 8)), on_objects).mean()
                         for texts in zip(*pairs))
    assert swapped / true >= RATIO, (swapped.item(), true.item())
