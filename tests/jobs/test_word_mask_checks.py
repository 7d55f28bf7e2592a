"""Masks from words, the checks around them that need no segmentation model: --save-mask never replaces a file
the run reads or writes, --mask-threshold's open range, the worker's one kept-model slot (an image engine or a
segmenter), a chain's release on failure, --mask-model repo ids through weights.folders.from_hub, and the
benchmark's smoke run."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from qimg.errors import UsageError


def test_the_worker_keeps_one_model_an_image_engine_or_a_segmenter(tmp_path, monkeypatch):
    """kept_engine's one slot: loading a segmentation model drops a kept image engine and the other way round
    (a generate after `qimg mask`, an inpaint --mask-prompt after a generate); release drops only a segmenter."""
    import gc
    import weakref

    from qimg.jobs import kept_engine, word_masks

    class Model:
        pass

    monkeypatch.setattr(kept_engine, "enabled", True)
    monkeypatch.setattr(kept_engine, "_key", None)
    monkeypatch.setattr(kept_engine, "_engine", None)
    (tmp_path / "config.json").write_text("{}")

    def engine():
        return kept_engine.engine(tmp_path, "cpu", "float32", {}, Model)

    def segmenter():
        return kept_engine.segmenter("f" * 64, "cpu", "clipseg", Model)

    seg = weakref.ref(segmenter())
    word_masks.release(keep=True)  # `qimg mask` in the worker: kept
    assert seg() is segmenter() and kept_engine.summary()["mask_model"] == "clipseg"
    eng = weakref.ref(engine())  # a generate next: the segmenter goes first
    gc.collect()
    assert seg() is None and kept_engine.summary()["model"] == str(tmp_path)
    word_masks.release()  # an inpaint whose masks were all cached: the kept engine stays
    assert eng() is engine()
    seg = weakref.ref(segmenter())  # --mask-prompt after it: the engine goes before the segmenter loads
    gc.collect()
    assert eng() is None and seg() is not None
    word_masks.release()
    gc.collect()
    assert seg() is None and kept_engine.summary() is None


@pytest.mark.slow
def test_save_mask_never_replaces_a_file_the_run_reads_or_writes(configs_only, tmp_path, cli):
    """--save-mask naming the input, the --mask, a --ref picture or the output is refused (one line, exit 2)
    before anything is written, --overwrite or not."""
    files = {}
    for name, value in (("a.png", 90), ("m.png", 255), ("r.png", 30), ("o.png", 60)):
        files[name] = tmp_path / name
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(files[name])
    before = {name: path.read_bytes() for name, path in files.items()}
    a, m, r, o = files.values()
    runs = [["inpaint", a, "--rect", "0,0,8,8", "--save-mask", a],
            ["inpaint", a, "--mask", m, "--save-mask", m],
            ["inpaint", a, "--rect", "0,0,8,8", "--save-mask", o]]
    for args in runs:
        code, _, err = cli(*args, "-p", "x", "-m", configs_only, "-o", o, "--overwrite", "--device", "cpu")
        assert code == 2 and err.count("\n") == 1 and f"--save-mask {args[-1]} is" in err, (args, err)
        assert {name: path.read_bytes() for name, path in files.items()} == before
    from qimg.jobs.edit import check_save_mask

    job = SimpleNamespace(shape=SimpleNamespace(save_mask=r), output=SimpleNamespace(out=o), kind="edit", out_dir=None)
    with pytest.raises(UsageError, match="--ref picture"):  # an instruction edit's --ref
        check_save_mask(job, [a], False, lambda image: None, (r,))


def test_mask_threshold_0_or_1_is_refused_when_parsed(tmp_path, cli):
    for args in (["mask", tmp_path / "a.png", "-p", "sky"], ["inpaint", tmp_path / "a.png", "-p", "x", "--mask-prompt",
                                                              "sky"]):
        for value in ("0", "1", "1.5"):
            code, _, err = cli(*args, "--mask-threshold", value)
            assert code == 2 and err.count("\n") == 1 and "Invalid value for '--mask-threshold'" in err, err


def test_a_chain_releases_the_segmentation_model_when_an_edit_fails(monkeypatch):
    from qimg.errors import QimgError
    from qimg.jobs import chain_plan, word_masks
    from qimg.jobs.spec import InpaintMask, WordMask

    class Words:
        def __init__(self, spec, store):
            self.spec = spec

        def region(self, pixels, image):
            if self.spec.phrases == ("a dog",):
                raise QimgError("the input: nothing matches 'a dog'")
            return np.ones(pixels.shape[:2], np.float32)

    released = []
    monkeypatch.setattr(word_masks, "WordMasks", Words)
    monkeypatch.setattr(word_masks, "release", lambda: released.append(1))
    steps = [SimpleNamespace(index=i, where=f"edit {i}", shape=InpaintMask(words=WordMask((phrase,))))
             for i, phrase in enumerate(["the sky", "a dog"], 1)]
    with pytest.raises(QimgError, match="edit 2: the input: nothing matches"):
        chain_plan.word_regions(steps, np.zeros((4, 4, 3), np.uint8), None)
    assert released == [1]


def test_a_mask_model_repo_id_is_found_as_a_model_one_is(tmp_path, monkeypatch):
    """--mask-model owner/name goes through weights.folders.from_hub (the local cache first), as --model does;
    neither there nor downloadable: one line naming --mask-model."""
    import huggingface_hub

    from qimg.errors import QimgError
    from qimg.segment import models
    from qimg.weights import folders

    (tmp_path / "config.json").write_text('{"model_type": "clipseg"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    asked = []
    monkeypatch.setattr(folders, "from_hub", lambda repo, option: asked.append((repo, option)) or tmp_path)
    assert models.resolve("someone/clipseg").folders == (tmp_path,) and asked == [("someone/clipseg", "--mask-model")]
    monkeypatch.undo()

    def offline(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(QimgError, match=r"^--mask-model someone/clipseg: not in the Hugging Face cache .* "
                                        r"--mask-model /path/to/clipseg$"):
        models.resolve("someone/clipseg")


@pytest.mark.subprocess
@pytest.mark.slow
def test_the_masks_benchmark_runs():
    """benchmarks/masks.py on the tiny model, so it cannot rot (its figures are not checked)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "masks.py"), "--tiny", "--reps", "1",
                           "--phrases", "2"], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "2 phrase(s), cpu, 1 thread(s):" in done.stdout and "ms CPU" in done.stdout and "load average" in done.stdout
