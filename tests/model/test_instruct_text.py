"""Instruction encoding for the edit models against diffusers' edit pipelines on the tiny edit checkpoints:
token ids, 3D mRoPE positions, prompt embeddings with one and three pictures, the negative prompt, a long
prompt, and the errors of an incomplete folder."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_edit_checkpoint import reference_edit_pipeline, reference_processor

from qimg.errors import QimgError, UsageError
from qimg.model import instruct_text
from qimg.model.instruct_text import DROP, prompt_text
from qimg.weights.text_encoder import load_instruct_encoder

CPU = torch.device("cpu")
PROMPT = "把左边那只白色的cat改成黑色的"
LONG = "replace the sky with a sunset, " * 200  # ~1400 tokens: past the base model's 512 and 1024 cuts
SIZES = [(100, 130), (60, 200), (140, 84)]  # (height, width): different aspects, partial windows


def pictures(n):
    rs = np.random.RandomState(0)
    return [rs.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES[:n]]


@pytest.fixture(scope="module")
def encoders(tiny_edit_dir, tiny_plus_dir):
    return {"edit": load_instruct_encoder(tiny_edit_dir, torch.float32, CPU, plus=False),
            "plus": load_instruct_encoder(tiny_plus_dir, torch.float32, CPU, plus=True)}


@pytest.fixture(scope="module")
def pipelines(tiny_edit_dir, tiny_plus_dir):
    return {"edit": reference_edit_pipeline(tiny_edit_dir), "plus": reference_edit_pipeline(tiny_plus_dir)}


def reference_embeds(pipe, prompt, images):
    image = [Image.fromarray(i) for i in images]
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, image=image if len(image) > 1 else image[0], device=CPU)
    return embeds[0]


CASES = [("edit", 1), ("plus", 1), ("plus", 3)]


@pytest.mark.parity
@pytest.mark.parametrize(("kind", "n"), CASES)
def test_token_ids_equal_the_processor(tiny_edit_dir, encoders, kind, n):
    images = pictures(n)
    ids, rows, grids = encoders[kind].inputs(PROMPT, images)
    ref = reference_processor(tiny_edit_dir)(text=[prompt_text(PROMPT, n, kind == "plus")],
                                             images=[Image.fromarray(i) for i in images], return_tensors="np")
    assert ids == ref["input_ids"][0].tolist()
    assert grids == [tuple(g[1:]) for g in ref["image_grid_thw"].tolist()]
    assert np.array_equal(np.concatenate(rows), ref["pixel_values"])
    tokenizer = encoders[kind].tokenizer.bpe
    assert tokenizer.id_to_token(ids[DROP]) == ("Picture" if kind == "plus" else "<|vision_start|>")
    assert ids.count(encoders[kind].pad) == sum(h * w // 4 for h, w in grids)


@pytest.mark.parity
def test_mrope_positions_equal_get_rope_index(encoders, pipelines):
    ids, _, grids = encoders["plus"].inputs(PROMPT, pictures(3))
    ids = torch.tensor([ids])
    image = ids[0] == encoders["plus"].pad
    model = pipelines["plus"].text_encoder.model
    ref, _ = model.get_rope_index(ids, mm_token_type_ids=image[None].int(), image_grid_thw=torch.tensor(
        [[1, h, w] for h, w in grids]))
    ours = instruct_text.mrope_positions(image, [(h // 2, w // 2) for h, w in grids])
    assert torch.equal(ours, ref[:, 0])


@pytest.mark.parity
@pytest.mark.parametrize(("kind", "n"), CASES)
def test_embeddings_equal_the_pipeline(encoders, pipelines, kind, n, one_thread):
    images = pictures(n)
    ours = encoders[kind].encode(PROMPT, images)
    ref = reference_embeds(pipelines[kind], PROMPT, images)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parity
def test_negative_prompt_is_encoded_with_the_pictures(encoders, pipelines, one_thread):
    images = pictures(2)
    runs = []
    hook = encoders["plus"].vision.register_forward_hook(lambda *_: runs.append(1))
    try:
        encoders["plus"].encode(PROMPT, images)
        ours = encoders["plus"].encode(" ", [i.copy() for i in images])
    finally:
        hook.remove()
    assert len(runs) == 1  # the same pictures: the vision tower's tokens are reused
    ref = reference_embeds(pipelines["plus"], " ", images)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    picture_tokens = sum(h * w // 4 for h, w in encoders["plus"].inputs(" ", images)[2])
    assert ours.shape[0] > picture_tokens  # the pictures' tokens are part of the negative embedding
    other = encoders["plus"].encode(" ", [255 - i for i in images])  # other pictures of the same sizes
    assert other.shape == ours.shape and (other - ours).abs().max() > 1e-3


@pytest.mark.parity
def test_long_prompt_is_not_cut(encoders, pipelines, one_thread):
    images = pictures(1)
    ours = encoders["edit"].encode(LONG, images)
    assert ours.shape[0] > 1024 + 64
    torch.testing.assert_close(ours, reference_embeds(pipelines["edit"], LONG, images), rtol=0, atol=1e-5)


@pytest.mark.parity
def test_diffusers_without_token_types_gives_pictures_1d_positions(tiny_edit_dir, encoders, monkeypatch, one_thread):
    # Documents the deviation: diffusers 0.42.1 with transformers >= 5.15 does not pass mm_token_type_ids, so
    # the pictures' tokens get plain 1D positions. qimg keeps the trained 3D positions; with 1D ones it would
    # equal the uncorrected pipeline.
    images = pictures(1)
    plain = reference_embeds(reference_edit_pipeline(tiny_edit_dir, token_types=False), PROMPT, images)
    ours = encoders["edit"].encode(PROMPT, images)
    assert (ours - plain).abs().max() > 1e-3
    monkeypatch.setattr(instruct_text, "mrope_positions", lambda image, grids: torch.arange(len(image)).expand(3, -1))
    torch.testing.assert_close(encoders["edit"].encode(PROMPT, images), plain, rtol=0, atol=1e-5)


def test_picture_count_and_image_pad_in_the_text_are_usage_errors(encoders):
    with pytest.raises(UsageError, match="exactly one picture, not 2"):
        encoders["edit"].encode(PROMPT, pictures(2))
    with pytest.raises(UsageError, match="must not contain <\\|image_pad\\|>"):
        encoders["plus"].encode("put <|image_pad|> here", pictures(1))


def test_missing_processor_is_one_line(tiny_plus_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_plus_dir, folder, ignore=shutil.ignore_patterns("processor"))
    with pytest.raises(UsageError) as e:
        load_instruct_encoder(folder, torch.float32, CPU, plus=True)
    assert "processor/preprocessor_config.json" in str(e.value) and "\n" not in str(e.value)


def test_missing_vision_weights_is_one_line(tiny_plus_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_plus_dir, folder)
    file = folder / "text_encoder" / "model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if not k.startswith("visual.")}, file)
    with pytest.raises(UsageError) as e:
        load_instruct_encoder(folder, torch.float32, CPU, plus=True)
    assert "has no vision tower weights" in str(e.value) and "\n" not in str(e.value)


def test_mismatched_processor_is_one_line(tiny_plus_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_plus_dir, folder)
    config = folder / "processor" / "preprocessor_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"patch_size": 16}))
    with pytest.raises(QimgError, match="patches of another size"):
        load_instruct_encoder(folder, torch.float32, CPU, plus=True)
