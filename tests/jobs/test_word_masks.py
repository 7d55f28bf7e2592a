"""Masks from words: qimg's probability maps equal the models' own outputs through transformers (tiny random
CLIPSeg and GroundingDINO + SAM2 folders), `qimg mask` and `--mask-prompt` give the same mask, a folder batch
(per-file masks, pixels outside each byte-identical, an empty mask named and the others written, exit 1),
--save-mask, the cache (a re-run loads no segmentation model), and one line without the extra."""

import json
import sys
from types import SimpleNamespace
from unittest.mock import ANY

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import pixels
from PIL import Image
from segment_models import build_clipseg, build_grounded_sam
from skimage import data

from qimg import masks

PHRASES = ["the sky", "a person"]
COMMON = ["--steps", "2", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="session")
def clipseg_dir(tmp_path_factory):
    return build_clipseg(tmp_path_factory.mktemp("masks") / "clipseg")


@pytest.fixture(scope="session")
def grounded_sam_dir(tmp_path_factory):
    return build_grounded_sam(tmp_path_factory.mktemp("masks") / "grounded-sam")


def picture(i: int) -> np.ndarray:
    """Three different 48x64 crops of skimage's astronaut."""
    return np.ascontiguousarray(data.astronaut()[i * 120 : i * 120 + 192 : 4, 100:356:4])


def provider(folder):
    from qimg.segment import models, providers

    return providers.load(models.resolve(str(folder)), "cpu")


@pytest.mark.parity
@pytest.mark.slow
def test_clipseg_probabilities_are_the_models_own_sigmoid_resized(clipseg_dir):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    image = picture(0)
    ours = provider(clipseg_dir).probabilities(image, PHRASES)
    processor = CLIPSegProcessor.from_pretrained(clipseg_dir)
    model = CLIPSegForImageSegmentation.from_pretrained(clipseg_dir).eval()
    with torch.no_grad():
        logits = model(**processor(text=PHRASES, images=[image] * 2, padding=True, return_tensors="pt")).logits
    want = F.interpolate(logits.sigmoid()[:, None], image.shape[:2], mode="bilinear", align_corners=False)[:, 0]
    assert ours.shape == (2, 48, 64)
    # qimg runs the vision tower once (a batch of 1) for both phrases, transformers once each (a batch of 2): the
    # float sums run in another order
    np.testing.assert_allclose(ours, want.numpy(), atol=1e-5)
    t = float(np.median(ours))
    assert np.array_equal(masks.union_above(ours, t), ((ours[0] >= t) | (ours[1] >= t)).astype(np.float32))


@pytest.mark.parity
@pytest.mark.slow
def test_grounded_sam_is_groundingdino_boxes_refined_by_sam2(grounded_sam_dir):
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor, Sam2Model

    from qimg.segment.providers import BOX_THRESHOLD, TEXT_THRESHOLD

    image = picture(1)
    ours = provider(grounded_sam_dir)
    got = ours.probabilities(image, ["the sky"])
    processor = GroundingDinoProcessor.from_pretrained(grounded_sam_dir / "detector")
    detector = GroundingDinoForObjectDetection.from_pretrained(grounded_sam_dir / "detector").eval()
    sam = Sam2Model.from_pretrained(grounded_sam_dir / "segmenter").eval()
    with torch.no_grad():
        inputs = processor(images=image, text="the sky.", return_tensors="pt")
        boxes = processor.post_process_grounded_object_detection(
            detector(**inputs), inputs.input_ids, threshold=BOX_THRESHOLD, text_threshold=TEXT_THRESHOLD,
            target_sizes=[(48, 64)])[0]["boxes"]
        assert len(boxes) > 0  # the random detector finds boxes: the SAM2 path runs
        size = json.loads((grounded_sam_dir / "segmenter" / "preprocessor_config.json").read_text())["size"]["height"]
        pixel_values = sam_pixel_values(image, size)
        scaled = boxes * torch.tensor([size / 64, size / 48] * 2)
        logits = sam(pixel_values=pixel_values, input_boxes=scaled[None], multimask_output=False).pred_masks[0, :, 0]
    want = F.interpolate(logits[:, None], (48, 64), mode="bilinear", align_corners=False)[:, 0].sigmoid().amax(0)
    np.testing.assert_allclose(got[0], want.numpy(), atol=1e-5)
    # the tiny random SAM2's masks hardly depend on the pixels: its image embeddings do (a level apart: < 1%)
    with torch.no_grad():
        ours_embedded = ours.segmenter.get_image_embeddings(ours.sam_inputs(image)[0])
        for a, b in zip(ours_embedded, sam.get_image_embeddings(pixel_values)):
            assert float((a - b).abs().max()) < 0.01 * float(b.abs().max())


def sam_pixel_values(image: np.ndarray, size: int) -> torch.Tensor:
    """SAM2's pixel_values as Sam2ImageProcessor documents them, built apart from qimg (without torchvision): a
    bilinear resize to size x size in 8 bits (PIL's, antialiased when shrinking), rescaled by 1/255, normalised
    with the ImageNet mean and std."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    x = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.float32) / 255
    x = (x - np.float32(IMAGENET_DEFAULT_MEAN)) / np.float32(IMAGENET_DEFAULT_STD)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))


@pytest.mark.parity
def test_sam2_inputs_are_the_documented_resize_and_normalisation():
    """qimg's SAM2 preprocessing (torch's antialiased bilinear) is PIL's within one 8-bit level: an upscale, a
    downscale and a squeeze of one side."""
    from qimg.segment.providers import GroundedSam

    sam = GroundedSam.__new__(GroundedSam)
    sam.sam_config, sam.device = {"size": {"height": 64, "width": 64}}, torch.device("cpu")
    for image in (picture(2), data.astronaut()[::3, ::2], data.astronaut()[:40]):
        ours, _ = sam.sam_inputs(image)
        np.testing.assert_allclose(ours.numpy(), sam_pixel_values(image, 64).numpy(), atol=1.01 / 255 / 0.224)


@pytest.mark.parity
def test_sam2_inputs_are_its_processors():
    torchvision = pytest.importorskip("torchvision")  # transformers' SAM2 processor needs it; qimg does not
    from transformers import Sam2ImageProcessor

    from qimg.segment.providers import GroundedSam

    assert torchvision
    image = picture(2)
    sam = GroundedSam.__new__(GroundedSam)
    sam.sam_config, sam.device = {"size": {"height": 64, "width": 64}}, torch.device("cpu")
    ours, _ = sam.sam_inputs(image)
    want = Sam2ImageProcessor(size={"height": 64, "width": 64})(images=image, return_tensors="pt")["pixel_values"]
    # within one 8-bit level: torchvision resizes uint8 with its own kernel, which may round a level differently
    np.testing.assert_allclose(ours.numpy(), want.numpy(), atol=1.01 / 255 / 0.224)


@pytest.fixture
def photos(tmp_path, clipseg_dir):
    """Three photos, and a threshold at which the words select nothing in one of them (b.png) and something in
    the others."""
    folder = tmp_path / "photos"
    folder.mkdir()
    seg = provider(clipseg_dir)
    highest = sorted((float(seg.probabilities(picture(i), ["the sky"]).max()), i) for i in range(3))
    for name, (_, i) in zip(["b.png", "a.png", "c.png"], highest):  # b: the one whose best pixel is the weakest
        Image.fromarray(picture(i)).save(folder / name)
    assert highest[0][0] < highest[1][0]
    return folder, (highest[0][0] + highest[1][0]) / 2


@pytest.mark.slow
def test_qimg_mask_over_a_folder_names_the_empty_one_and_writes_the_others(photos, clipseg_dir, tmp_path, cli,
                                                                         monkeypatch):
    folder, threshold = photos
    out = tmp_path / "masks"
    args = ["mask", folder, "-p", "the sky", "--mask-model", clipseg_dir, "--mask-threshold", f"{threshold:.9f}",
            "--out-dir", out, "--device", "cpu", "--json"]
    code, report, err = cli.lines(*args)
    assert code == 1 and "b.png" in err and "nothing matches 'the sky'" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "c_mask.png"]
    done = {r["input"].split("/")[-1]: r for r in report if "output" in r}
    for name in ("a", "c"):
        m = np.asarray(Image.open(out / f"{name}_mask.png"))
        assert m.shape == (48, 64) and set(np.unique(m)) <= {0, 255}
        assert done[f"{name}.png"]["area"] == np.count_nonzero(m) > 0
        assert done[f"{name}.png"]["box"] == list(masks.box_of(m.astype(np.float32)))

    # A re-run reads every mask from the cache: no segmentation model loads.
    from qimg.segment import providers

    monkeypatch.setattr(providers, "load", lambda *a: pytest.fail("the segmentation model loaded"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = cli(*args[:-1], "--overwrite")
    assert code == 1 and "b.png" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.slow
def test_mask_prompt_batch_edits_inside_each_files_own_mask(photos, clipseg_dir, tiny_model_dir, tmp_path, cli):
    folder, threshold = photos
    words = ["--mask-model", clipseg_dir, "--mask-threshold", f"{threshold:.9f}"]
    code, _, err = cli("mask", folder, "-p", "the sky", *words, "--out-dir", tmp_path / "masks", "--device", "cpu")
    assert code == 1
    out, saved = tmp_path / "out", tmp_path / "saved"
    code, report, err = cli.lines("inpaint", folder, "-m", tiny_model_dir, "-p", "blue", "--mask-prompt", "the sky",
                                  *words, "--save-mask", saved, "--out-dir", out, *COMMON, "--json")
    assert code == 1 and "b.png" in err and "nothing matches" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["a.inpaint.png", "c.inpaint.png"]
    written = [r for r in report if "output" in r]  # the metadata names the words, the model by its folder's name
    assert len(written) == 2 and all((r["mask_prompt"], r["mask_model"], r["mask_threshold"]) == (
        ["the sky"], "clipseg", pytest.approx(threshold)) for r in written)
    for name in ("a", "c"):
        # --mask-prompt's mask is qimg mask's, --save-mask wrote it, and only its pixels changed
        written = pixels(tmp_path / "masks" / f"{name}_mask.png")
        assert np.array_equal(pixels(saved / f"{name}_mask.png"), written)
        before, after = pixels(folder / f"{name}.png"), pixels(out / f"{name}.inpaint.png")
        outside = written == 0
        assert np.array_equal(after[outside], before[outside])
        assert (after[~outside] != before[~outside]).any()


@pytest.mark.slow
def test_without_the_extra_one_line_and_exit_2(photos, tmp_path, cli, monkeypatch):
    folder, _ = photos
    monkeypatch.setitem(sys.modules, "transformers", None)  # an import blocker: `import transformers` fails
    for args in (["mask", folder, "-p", "sky", "--out-dir", tmp_path / "m"],
                 ["inpaint", folder / "a.png", "-p", "x", "--mask-prompt", "sky", "-o", tmp_path / "o.png"]):
        code, out, err = cli(*args)
        assert code == 2 and err.count("\n") == 1 and "pip install 'qimg[masks]'" in err, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "o.png").exists()


def test_mask_cache_entry_is_bits_keyed_by_what_made_it(store):
    from qimg.cache import mask_key

    image = picture(0)
    keys = {mask_key(image, ("sky",), "m1", 0.4), mask_key(image, ("sky", "sea"), "m1", 0.4),
            mask_key(image, ("sky",), "m2", 0.4), mask_key(image, ("sky",), "m1", 0.5),
            mask_key(picture(1), ("sky",), "m1", 0.4)}
    assert len(keys) == 5
    m = (np.random.default_rng(0).random((48, 64)) > 0.5).astype(np.float32)
    assert np.array_equal(masks.unpack(masks.pack(m), (64, 48)), m)
    assert json.dumps(masks.box_of(m)) and masks.box_of(np.zeros((3, 3), np.float32)) is None

    # WordMasks stores the mask as packed bits under that key, with what made it; a new job reads it back
    from qimg.jobs.spec import WordMask
    from qimg.jobs.word_masks import WordMasks

    def words(probabilities):
        w = WordMasks.__new__(WordMasks)
        w.spec, w.phrases, w.store, w.fingerprint, w.found = WordMask(("sky",), threshold=0.4), ("sky",), store, \
            "m1", {}
        w.model = SimpleNamespace(name="clipseg")
        w.provider = lambda: SimpleNamespace(probabilities=probabilities)
        return w

    probs = np.where(m > 0, 0.9, 0.1).astype(np.float32)[None]
    assert np.array_equal(words(lambda pixels, phrases: probs).mask(image), m)
    tensors, record = store.get("mask", mask_key(image, ("sky",), "m1", 0.4), {"mask": ("uint8", (48 * 64 // 8,))})
    assert np.array_equal(tensors["mask"].numpy(), masks.pack(m))
    assert record["model"] == "clipseg" and record["phrases"] == ["sky"] and record["size"] == [64, 48]
    assert np.array_equal(words(lambda *a: pytest.fail("segmented again")).mask(image), m)


@pytest.mark.slow
def test_mask_prompt_in_a_chain_step_and_a_preset_is_the_same_mask(photos, clipseg_dir, tiny_model_dir, tmp_path,
                                                                    cli):
    folder, threshold = photos
    image = folder / "a.png"
    code, _, err = cli("mask", image, "-p", "the sky", "--mask-model", clipseg_dir, "--mask-threshold",
                       f"{threshold:.9f}", "-o", tmp_path / "m.png", "--device", "cpu")
    assert code == 0, err
    outside = pixels(tmp_path / "m.png") == 0
    words = {"mask_prompt": ["the sky"], "mask_model": str(clipseg_dir), "mask_threshold": threshold}
    chain = tmp_path / "edits.yaml"
    chain.write_text(json.dumps({"edits": [{"inpaint": {"prompt": "blue", **words}}]}))
    preset = tmp_path / "words.yaml"
    preset.write_text(json.dumps(words))
    for args in (["chain", image, chain], ["inpaint", image, "-p", "blue", "--preset", preset, "--save-mask", tmp_path
                                           / "review"]):
        out = tmp_path / f"{args[0]}.png"
        code, _, err = cli(*args, "-m", tiny_model_dir, "-o", out, *COMMON)
        assert code == 0, err
        before, after = pixels(image), pixels(out)
        assert np.array_equal(after[outside], before[outside]) and (after[~outside] != before[~outside]).any()
    assert np.array_equal(pixels(tmp_path / "review" / "a_mask.png"), pixels(tmp_path / "m.png"))  # no suffix: a folder


@pytest.mark.slow
def test_the_worker_keeps_the_segmentation_model_between_mask_jobs(photos, clipseg_dir, tmp_path, cli, monkeypatch):
    from qimg.cli import in_worker
    from qimg.jobs import kept_engine, word_masks
    from qimg.segment import providers

    folder, threshold = photos
    args = ["--mask-model", clipseg_dir, "--mask-threshold", f"{threshold:.9f}", "--device", "cpu", "--no-cache"]
    monkeypatch.setattr(kept_engine, "enabled", True)  # as in the worker's job process
    try:
        assert cli("mask", folder / "a.png", "-p", "the sky", "-o", tmp_path / "a.png", *args)[0] == 0
        monkeypatch.setattr(providers, "load", lambda *a: pytest.fail("the segmentation model loaded again"))
        assert cli("mask", folder / "c.png", "-p", "the sky", "-o", tmp_path / "c.png", *args)[0] == 0
        assert in_worker.loaded() == dict(mask_model="clipseg", fingerprint=ANY, device="cpu")
    finally:
        word_masks.release()  # what an inpaint job does before its model loads
    assert in_worker.loaded() is None


@pytest.mark.slow
def test_a_broken_mask_model_or_a_too_long_phrase_is_one_line(clipseg_dir, grounded_sam_dir, tmp_path, cli):
    import shutil

    image = tmp_path / "a.png"
    Image.fromarray(picture(0)).save(image)
    no_processor, truncated = tmp_path / "no-processor", tmp_path / "truncated"
    for folder in (no_processor, truncated):
        shutil.copytree(clipseg_dir, folder)
    (no_processor / "processor_config.json").unlink()
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for folder, said in ((no_processor, "Can't load image processor"), (truncated, "damaged or truncated")):
        # a batch ends on it (every image would fail alike): one line, exit 2, nothing written
        code, _, err = cli("mask", image, image, "-p", "sky", "--mask-model", folder, "--out-dir", tmp_path / "out",
                           "--device", "cpu", "--no-cache")
        assert code == 2 and err.count("\n") == 1 and f"--mask-model {folder}: " in err and said in err, err
        assert "download the model again" in err and not (tmp_path / "out").exists()
    for folder, limit in ((clipseg_dir, 16), (grounded_sam_dir, 32)):  # the tiny models' text positions
        long = " ".join(["the sky"] * 20)
        code, _, err = cli("inpaint", image, "-p", "x", "--mask-prompt", "sky", "--mask-prompt", long, "--mask-model",
                           folder, "-o", tmp_path / "o.png", "--device", "cpu", "--no-cache")
        assert code == 2 and err.count("\n") == 1 and f"more than the {limit} the mask model" in err, err
        assert "--mask-prompt 'the sky the sky" in err and "use fewer words" in err
