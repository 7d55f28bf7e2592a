"""--preview: the running estimate of the image (the x0 prediction, decoded and composited like the result)
written atomically while a job runs, the result itself last; the output never changes for it; a stopped run
leaves the last complete preview; bad preview paths are refused before anything loads."""

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import pixels
from PIL import Image

from qimg.engine.preview import watching
from qimg.sampling import euler

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--seed", "3", "--device", "cpu", "--no-cache", "--cfg", "4"]
PHOTO = np.s_[:320:8, :448:8]  # the `photo` fixture at 56x40


@pytest.fixture
def written(monkeypatch):
    """Every image saved, as (file name, pixels), in order."""
    from qimg import images

    saved, save = [], images.save_image

    def spy(image, path, *args, **kwargs):
        saved.append((Path(path).name, np.asarray(image)))
        return save(image, path, *args, **kwargs)

    monkeypatch.setattr(images, "save_image", spy)
    return saved


def test_the_estimate_is_x_minus_sigma_v_and_at_the_last_step_the_result():
    sigmas = torch.linspace(1, 0, 7)

    def velocity(x, sigma):
        return torch.sin(3 * x) + sigma  # curved: the estimate changes from step to step

    x = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0))
    seen, inputs = [], []
    recorded, callback = watching(lambda x, s: inputs.append((x, s)) or velocity(x, s), None, sigmas,
                                  lambda done, total, estimate: seen.append((done, total, estimate())))
    result = euler(recorded, x, sigmas, callback)
    assert torch.equal(result, euler(velocity, x, sigmas))  # the velocity's values untouched
    assert [(done, total) for done, total, _ in seen] == [(i, 6) for i in range(1, 7)]
    for (_, _, estimate), (x_i, sigma) in zip(seen, inputs):
        assert torch.equal(estimate, x_i - sigma * velocity(x_i, sigma))
    assert torch.equal(seen[-1][2], result)
    assert not torch.allclose(seen[0][2], result, atol=1e-3)


@pytest.mark.slow
def test_a_reader_only_ever_finds_complete_pngs_and_the_last_is_the_output(tiny_model_dir, tmp_path, cli,
                                                                         one_thread):
    preview, out = tmp_path / "live.png", tmp_path / "o.png"
    reads, broken, running = [], [], threading.Event()

    def reader():
        while running.is_set():
            try:
                data = preview.read_bytes()
            except FileNotFoundError:
                continue
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
                reads.append(np.asarray(image))
            except Exception as e:  # a partial file
                broken.append(repr(e))

    running.set()
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        code, (report,), err = cli.lines("generate", "-p", "x", "-m", tiny_model_dir, "-o", out, "--preview",
                                         preview, "--preview-every", "1", "--steps", "24", "--size", "64x64", "--json",
                                         *FAST)
    finally:
        running.clear()
        thread.join()
    assert code == 0, err
    assert broken == [] and len(reads) > 1
    assert report["previews"] == 24 and report["preview_seconds"] > 0
    assert np.array_equal(pixels(preview), pixels(out))  # (the reader may not have polled after the last write)
    last, output = Image.open(preview), Image.open(out)
    assert last.text["qimg-preview"] == "result" and last.text["qimg"] == output.text["qimg"]  # `qimg info` reads it
    assert not np.array_equal(reads[0], pixels(out))  # the first was an estimate
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.png", "o.png"]  # no temporary file left


def test_the_output_is_the_same_bytes_with_or_without_a_preview(tiny_model_dir, tmp_path, cli, one_thread):
    base = ["generate", "-p", "x", "-m", tiny_model_dir, "--steps", "6", "--size", "32x32", "--json", "--reuse",
            "0.5", *FAST]
    code, (plain,), err = cli.lines(*base, "-o", tmp_path / "a.png")
    assert code == 0, err
    code, (watched,), err = cli.lines(*base, "-o", tmp_path / "b.png", "--preview", tmp_path / "p.png",
                                      "--preview-every", "2")
    assert code == 0, err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert "previews" not in plain and "preview_seconds" not in plain
    assert watched["previews"] == 3  # after steps 2 and 4, then the result
    assert {k: v for k, v in watched.items() if k not in ("output", "seconds", "previews", "preview_seconds")} == \
        {k: v for k, v in plain.items() if k not in ("output", "seconds")}


@pytest.mark.slow
def test_inpaint_previews_show_the_input_outside_the_mask(tiny_model_dir, photo, tmp_path, cli, written):
    out, preview = tmp_path / "o.png", tmp_path / "p.png"
    code, _, err = cli.lines("inpaint", photo, "-p", "x", "--rect", "8,8,24,20", "-m", tiny_model_dir, "-o", out,
                             "--preview", preview, "--steps", "6", *FAST)
    assert code == 0, err
    shown = [image for name, image in written if name == "p.png"]
    assert len(shown) == 6  # the default: every step of 6, the last one the result
    keep = np.ones((40, 56), bool)
    keep[8:28, 8:32] = False
    for image in shown:
        assert image.shape == (40, 56, 3) and np.array_equal(image[keep], pixels(photo)[keep])
    assert np.array_equal(shown[-1], pixels(out)) and not np.array_equal(shown[0], shown[-1])


def test_a_large_inpaint_previews_the_whole_image(tiny_model_dir, photo, tmp_path, cli, written):
    """Over the working area the model sees a crop: its estimate is pasted back as the result is."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "qimg.json").write_text(json.dumps({"max_pixels": 32 * 32}))
    out = tmp_path / "o.png"
    code, _, err = cli.lines("inpaint", photo, "-p", "x", "--rect", "30,20,10,10", "--context", "4", "-m", model,
                             "-o", out, "--preview", tmp_path / "p.png", "--steps", "4", *FAST)
    assert code == 0, err
    shown = [image for name, image in written if name == "p.png"]
    keep = np.ones((40, 56), bool)
    keep[20:30, 30:40] = False
    assert len(shown) == 4 and all(np.array_equal(s[keep], pixels(photo)[keep]) for s in shown)
    assert np.array_equal(shown[-1], pixels(out))


@pytest.mark.slow
def test_outpaint_and_chain_previews_are_the_canvas_at_its_size(tiny_model_dir, photo, tmp_path, cli, written):
    code, _, err = cli.lines("outpaint", photo, "-p", "x", "--right", "24", "--feather", "0", "-m", tiny_model_dir,
                             "-o", tmp_path / "o.png", "--preview", tmp_path / "p.png", "--steps", "3", *FAST)
    assert code == 0, err
    shown = [image for name, image in written if name == "p.png"]
    assert len(shown) == 3 and all(s.shape == (40, 80, 3) and np.array_equal(s[:, :56], pixels(photo))
                                   for s in shown)
    written.clear()
    (tmp_path / "c.yaml").write_text("steps: 2\nedits:\n  - inpaint: {rect: '0,0,16,16', prompt: x}\n"
                                     "  - outpaint: {right: 16, prompt: y, feather: 0}\n")
    code, (report,), err = cli.lines("chain", photo, tmp_path / "c.yaml", "-m", tiny_model_dir, "-o",
                                     tmp_path / "c.png", "--preview", tmp_path / "cp.png", "--preview-every", "1",
                                     "--json", *FAST)
    assert code == 0, err
    shown = [image for name, image in written if name == "cp.png"]
    # step 1 of each edit, then the result: the first edit's canvas, the grown one, the output
    assert [s.shape for s in shown] == [(40, 56, 3), (40, 72, 3), (40, 72, 3)] and report["previews"] == 3
    assert np.array_equal(shown[-1], pixels(tmp_path / "c.png"))
    assert np.array_equal(shown[1][16:, :56], pixels(photo)[16:])  # outside both masks: the input


def test_a_batch_writes_one_preview_per_input_into_the_folder(tiny_model_dir, photo, tmp_path, cli):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in "ab":
        (folder / f"{name}.png").write_bytes(photo.read_bytes())
    code, reports, err = cli.lines("inpaint", folder, "-p", "x", "--rect", "0,0,16,16", "-m", tiny_model_dir,
                                   "--preview", tmp_path / "previews", "--steps", "2", "--json", *FAST)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "previews")) == ["a.inpaint.png", "b.inpaint.png"]
    for name, report in zip("ab", reports):
        assert report["previews"] == 2
        preview, out = tmp_path / "previews" / f"{name}.inpaint.png", folder / f"{name}.inpaint.png"
        assert np.array_equal(pixels(preview), pixels(out))
    # A batch's previews go to a folder of their own: not a .png name, not the inputs' folder (a later run
    # over it would take them for inputs).
    for where, fragment in [(tmp_path / "p.png", "into a folder; give a folder"), (folder, "holds inputs")]:
        code, _, err = cli.lines("inpaint", folder, "-p", "x", "--rect", "0,0,16,16", "-m", tiny_model_dir,
                                 "--preview", where, "--steps", "2", "--overwrite", *FAST)
        assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "p.png").exists() and sorted(os.listdir(folder)) == [
        "a.inpaint.png", "a.png", "b.inpaint.png", "b.png"]


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["generate", "edit", "chain"])
def test_a_stopped_run_leaves_the_last_complete_preview(tiny_model_dir, tiny_edit_dir, tmp_path, command):
    """SIGTERM while sampling (of generate, of an instruction edit, of a chain's edit): exit 143, no output, no
    temporary file; the preview is the last complete one, as docs/editing.md says."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    preview, photo = tmp_path / "out" / "p.png", tmp_path / "in" / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(photo)
    (tmp_path / "in" / "c.yaml").write_text("edits:\n  - edit: {prompt: make it red, steps: 1000, edit_area: 3072}\n")
    run_args = {"generate": ["generate", "-p", "x", "-m", tiny_model_dir, "--steps", "1000", "--size", "64x64"],
                "edit": ["edit", photo, "-p", "make it red", "-m", tiny_edit_dir, "--steps", "1000", "--edit-area",
                         "3072"],
                "chain": ["chain", photo, tmp_path / "in" / "c.yaml", "-m", tiny_edit_dir]}[command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QIMG_WORKER": "0", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "qimg", *map(str, run_args), "-o", str(tmp_path / "out" / "o.png"), "--preview",
         str(preview), "--preview-every", "1", *FAST], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 120
    while not preview.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.3))  # anywhere in a decode or a write
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert err.strip() == "qimg: terminated; nothing written"
    with Image.open(preview) as image:
        image.load()
        assert image.info["qimg-preview"].endswith("/1000") and image.size == (64, 64 if command == "generate" else 48)
    assert os.listdir(tmp_path / "out") == ["p.png"]  # no output, no temporary file


@pytest.mark.parametrize("args, fragment", [
    (["--preview", "OUT"], "--preview OUT is the output"),
    (["--preview", "TMP/d.png"], "is a folder"),
    (["--preview", "TMP/f.txt/p.png"], "is a file, not a folder"),
    (["--preview", "TMP/p.jpg"], "previews are PNG files"),
    (["--preview", "TMP/photo.png"], "exists and is not a qimg preview; pass --overwrite"),
    (["--preview-every", "3"], "--preview-every 3 needs --preview"),
    (["--preview", "TMP/p.png", "--preview-every", "0"], "--preview-every"),
])
def test_bad_preview_options_of_generate(configs_only, tmp_path, cli, args, fragment):
    (tmp_path / "d.png").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "f.txt").write_text("x")
    out = tmp_path / "o.png"
    args = [a.replace("TMP", str(tmp_path)).replace("OUT", str(out)) for a in args]
    code, _, err = cli.lines("generate", "-p", "x", "-m", configs_only, "-o", out, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert fragment.replace("OUT", str(out)) in err, err


@pytest.mark.parametrize("command, fragment", [
    (["inpaint", "{image}", "--rect", "0,0,8,8", "--preview", "{image}"], "is the input image"),
    (["inpaint", "{image}", "--mask", "{mask}", "--preview", "{mask}"], "is the mask"),
    (["inpaint", "{image}", "{tmp}/in2.png", "--rect", "0,0,8,8", "--preview", "{mask}"], "is a file, not a folder"),
    (["inpaint", "{image}", "{tmp}/in2.png", "--rect", "0,0,8,8", "--out-dir", "{tmp}/o", "--preview", "{tmp}/o"],
     "the output of"),
    (["chain", "{image}", "{tmp}/c.yaml", "--preview", "{mask}"], "a file this chain reads"),
    (["chain", "{image}", "{tmp}/c.yaml", "--keep-steps", "{tmp}/k", "--preview", "{tmp}/k/astronaut.01-inpaint.png"],
     "--keep-steps file"),
])
def test_bad_preview_paths_of_edits(configs_only, photo, tmp_path, cli, command, fragment):
    Image.new("L", (56, 40), 255).save(tmp_path / "m.png")
    (tmp_path / "in2.png").write_bytes(photo.read_bytes())
    (tmp_path / "c.yaml").write_text("edits:\n  - inpaint: {mask: m.png, prompt: x}\n")
    command = [a.format(image=photo, mask=tmp_path / "m.png", tmp=tmp_path) for a in command]
    code, _, err = cli.lines(*command, "-p" if command[0] == "inpaint" else "--seed", "1", "-m", configs_only)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert fragment in err, err


@pytest.mark.slow
def test_a_preset_may_set_preview_every_but_not_the_file(tiny_model_dir, configs_only, tmp_path, cli):
    (tmp_path / "every.yaml").write_text("preview_every: 2\n")
    (tmp_path / "file.yaml").write_text(f"preview: {tmp_path / 'p.png'}\n")
    code, _, err = cli.lines("generate", "-p", "x", "-m", configs_only, "--preset", tmp_path / "file.yaml")
    assert code == 2 and "unknown key 'preview'" in err, err
    base = ["generate", "-p", "x", "-m", tiny_model_dir, "--steps", "4", "--size", "32x32", "--json",
            "--preset", tmp_path / "every.yaml", *FAST]
    code, (report,), err = cli.lines(*base, "-o", tmp_path / "a.png", "--preview", tmp_path / "p.png")
    assert code == 0 and report["previews"] == 2, err  # after step 2, then the result
    code, (report,), err = cli.lines(*base, "-o", tmp_path / "b.png")  # no --preview: the preset's is unused
    assert code == 0 and "previews" not in report, err


@pytest.mark.slow
def test_an_earlier_preview_is_replaced_and_another_file_only_with_overwrite(tiny_model_dir, tmp_path, cli):
    preview = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(preview)  # someone's picture
    base = ["generate", "-p", "x", "-m", tiny_model_dir, "--steps", "2", "--size", "32x32", "--preview", preview, *FAST]
    code, _, err = cli.lines(*base, "-o", tmp_path / "a.png")
    assert code == 2 and "exists and is not a qimg preview" in err and Image.open(preview).size == (8, 8)
    code, _, err = cli.lines(*base, "-o", tmp_path / "b.png", "--overwrite")
    assert code == 0, err
    code, _, err = cli.lines(*base, "-o", tmp_path / "c.png", "--seed", "4")  # a preview: replaced unasked
    assert code == 0, err
    assert np.array_equal(pixels(preview), pixels(tmp_path / "c.png"))


@pytest.mark.parametrize("text", ["preview_every: 2\nedits:\n  - inpaint: {rect: '0,0,8,8', prompt: x}\n",
                                  "edits:\n  - inpaint: {rect: '0,0,8,8', prompt: x, preview: p.png}\n"])
def test_a_chain_file_leaves_previews_to_the_command_line(configs_only, photo, tmp_path, cli, text):
    (tmp_path / "c.yaml").write_text(text)
    code, _, err = cli.lines("chain", photo, tmp_path / "c.yaml", "-m", configs_only)
    assert code == 2 and "unknown key 'preview" in err and len(err.strip().splitlines()) == 1, err
