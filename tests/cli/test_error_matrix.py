"""The error matrix: every input a user can get wrong, through the real CLI (`qimg.cli.app.run`, in process).

Each case checks the exit code (2 usage, 1 runtime), one line on stderr naming the thing, no traceback,
and that nothing was written. Cases that must fail before any weights load use `configs_only`: a model
folder with the tiny checkpoint's configs and no weights, so reaching the loader would fail differently.
"""

import errno
import json
import os
import re
import shutil
import stat

import numpy as np
import pytest
from helpers import corrupt_files, one_line, pixels, raw_png
from PIL import Image

from qimg.cli.app import run

FAST = ["--steps", "1", "--seed", "3", "--device", "cpu", "--cfg", "1"]


def broken_copy(tiny_model_dir, tmp_path, edit):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    edit(folder)
    return folder


# --- input images and masks ------------------------------------------------------------------------------

CORRUPT = ["missing", "folder", "zero-byte", "truncated", "corrupt", "not an image", "bomb", "huge bomb"]


@pytest.mark.parametrize("case", [c for c in CORRUPT if c != "folder"])  # inpaint takes a folder as a batch
def test_bad_input_image(cli, tmp_path, photo, configs_only, case):
    path, message = corrupt_files(tmp_path, pixels(photo))[case]
    out = tmp_path / "out.png"
    code, _, err = cli("inpaint", path, "-p", "x", "--rect", "0,0,8,8", "-m", configs_only, "-o", out)
    assert code == 2
    one_line(err, f"image {path}", message)
    assert not out.exists()


def test_folder_as_the_input_image(cli, tmp_path, configs_only):
    """inpaint and outpaint take a folder as a batch of its images; chain takes one image."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "c.yaml").write_text('edits:\n  - inpaint: {rect: "0,0,8,8", prompt: x}\n')
    code, _, err = cli("inpaint", tmp_path / "empty", "-p", "x", "--rect", "0,0,8,8", "-m", configs_only)
    assert code == 2
    one_line(err, f"folder {tmp_path / 'empty'} has no images")
    code, _, err = cli("chain", tmp_path / "empty", tmp_path / "c.yaml", "-m", configs_only)
    assert code == 2
    one_line(err, f"image {tmp_path / 'empty'} is a folder")
    assert list(tmp_path.rglob("*.png")) == []


@pytest.mark.parametrize("case", CORRUPT)
def test_bad_mask(cli, tmp_path, photo, configs_only, case):
    path, message = corrupt_files(tmp_path, pixels(photo))[case]
    out = tmp_path / "out.png"
    code, _, err = cli("inpaint", photo, "-p", "x", "--mask", path, "--mask-resize", "-m", configs_only,
                       "-o", out)
    assert code == 2
    one_line(err, f"mask {path}", message)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_image(cli, tmp_path, photo, configs_only):
    photo.chmod(0)
    code, _, err = cli("inpaint", photo, "-p", "x", "--rect", "0,0,8,8", "-m", configs_only)
    assert code == 2
    one_line(err, str(photo), "permission denied")


def test_unreadable_image_as_root_too(cli, tmp_path, photo, configs_only, monkeypatch):
    def denied(path, *args, **kwargs):  # what the OS says to a non-root user for a mode-000 file
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", denied)
    code, _, err = cli("inpaint", photo, "-p", "x", "--rect", "0,0,8,8", "-m", configs_only)
    assert code == 2
    one_line(err, str(photo), "permission denied")


def test_a_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from qimg.errors import UsageError
    from qimg.images import read_image

    path = tmp_path / "bomb.png"
    path.write_bytes(raw_png(20000, 20000, 8, 2, b"\0" * 100))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(UsageError, match="megapixels"):
        read_image(path)


# --- input formats: converted, pixels checked through a full run ----------------------------------------


def converted(name, photo):
    """(file writer, expected RGB pixels) for one kind of input."""
    grey = photo[..., 1]
    grey16 = grey.astype(np.uint16) * 257 + 3  # 16 bits with low bits set: >> 8 and / 257 differ here
    palette = Image.fromarray(photo).quantize(16)
    lut = np.array(palette.getpalette()[: 16 * 3], np.uint8).reshape(16, 3)
    rgb48 = np.ascontiguousarray(photo.astype(">u2") * 257)
    rows = b"".join(b"\0" + r.tobytes() for r in rgb48)
    frames = [Image.fromarray(photo).convert("P"), Image.fromarray(255 - photo).convert("P")]
    cases = {
        "cmyk.tif": (lambda p: Image.fromarray(photo).convert("CMYK").save(p), photo),
        "palette.png": (lambda p: palette.save(p), lut[np.asarray(palette)]),
        "la.png": (lambda p: Image.fromarray(np.dstack([grey, np.full_like(grey, 200)]), "LA").save(p),
                   np.repeat(grey[..., None], 3, 2)),
        "grey16.png": (lambda p: Image.fromarray(grey16).save(p),
                       np.repeat(np.round(grey16 / 257).astype(np.uint8)[..., None], 3, 2)),
        "rgb48.png": (lambda p: p.write_bytes(raw_png(64, 64, 16, 2, rows)), photo),
        "bilevel.png": (lambda p: Image.fromarray(grey > 128).save(p),
                        np.repeat(((grey > 128) * 255)[..., None], 3, 2)),
        "anim.gif": (lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]),
                     np.asarray(frames[0].convert("RGB"))),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["cmyk.tif", "palette.png", "la.png", "grey16.png", "rgb48.png", "bilevel.png",
                                  "anim.gif"])
def test_input_formats_convert_to_the_right_pixels(cli, tmp_path, tiny_model_dir, photo, name, one_thread):
    write, expected = converted(name, pixels(photo))
    path = tmp_path / name
    write(path)
    out = tmp_path / "out.png"
    code, _, err = cli("inpaint", path, "-p", "x", "--rect", "0,0,16,16", "-m", tiny_model_dir, "-o", out,
                       *FAST)
    assert code == 0, err
    after = np.asarray(Image.open(out).convert("RGB"))
    keep = np.ones((64, 64), bool)
    keep[:16, :16] = False
    assert np.array_equal(after[keep], expected.astype(np.uint8)[keep])
    if name == "anim.gif":
        assert "qimg: warning:" in err and "first frame" in err


# --- masks and rectangles --------------------------------------------------------------------------------


@pytest.mark.parametrize("rect, message", [
    ("10,10,-5,5", "width and height must be positive"),
    ("a,b,c,d", "expected X,Y,W,H"),
    ("10%%,0,5,5", "expected X,Y,W,H"),
    ("1,2,3", "expected X,Y,W,H"),
    ("150%,0,10%,10%", "lies outside the 64x64 image"),
    ("0,-100,10,50", "lies outside"),
    ("0,0,0%,50%", "width and height must be positive"),
    ("0,0," + "9" * 5000 + ",5", "over 30 digits"),  # int() refuses over 4300 digits
    ("0,0,1e5000,5", "expected X,Y,W,H"),
])
def test_bad_rectangles(cli, photo, configs_only, rect, message):
    code, _, err = cli("inpaint", photo, "-p", "x", "--rect", rect, "-m", configs_only)
    assert code == 2
    one_line(err, "--rect", message)


def test_empty_mask_file(cli, tmp_path, photo, configs_only):
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    code, _, err = cli("inpaint", photo, "-p", "x", "--mask", tmp_path / "black.png", "-m", configs_only)
    assert code == 2
    one_line(err, "selects nothing")


def test_mask_of_another_size(cli, tmp_path, photo, configs_only):
    Image.new("L", (32, 48), 255).save(tmp_path / "small.png")
    code, _, err = cli("inpaint", photo, "-p", "x", "--mask", tmp_path / "small.png", "-m", configs_only)
    assert code == 2
    one_line(err, "32x48", "64x64", "--mask-resize")


@pytest.mark.parametrize("args, message", [
    (["--left", "1000000000"], "the outpainted canvas is 1000000064x64"),
    (["--to", "100000x100000"], "add fewer pixels"),
    (["--anchor", "middle"], "--anchor"),
])
def test_bad_outpaint(cli, photo, configs_only, args, message):
    code, _, err = cli("outpaint", photo, "-p", "x", *args, "-m", configs_only)
    assert code == 2
    one_line(err, message)


def test_huge_grow_and_feather_are_quick(cli, photo, configs_only):
    # Reaches the model stage (exit 1: no weights), so the mask was built with both radii.
    code, _, err = cli("inpaint", photo, "-p", "x", "--rect", "0,0,8,8", "--grow", "1000000000",
                       "--feather", "1000000000", "-m", configs_only, "-o", photo.parent / "o.png")
    assert code == 1
    one_line(err, "no .safetensors weights")


# --- options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["100000x100000", "16x99999999999999999984", "65536x65536"])
def test_absurd_sizes_are_refused_with_an_estimate_before_loading(cli, tmp_path, configs_only, size):
    code, _, err = cli("generate", "-p", "x", "--size", size, "-m", configs_only, "--device", "cpu",
                       "-o", tmp_path / "o.png")
    assert code == 2
    line = one_line(err, size, "would need about", "use a smaller size")
    assert " GB " in line or " TB " in line


@pytest.mark.parametrize("option, value", [
    ("--cfg", "-1"), ("--cfg", "101"), ("--cfg", "nan"), ("--cfg", "inf"), ("--cfg", "lots"),
    ("--strength", "-0.1"), ("--strength", "1.5"), ("--strength", "nan"), ("--strength", "0"),
    ("--steps", "0"), ("--steps", "-1"), ("--steps", "1001"), ("--seed", "-1"), ("--context", "-5"),
])
def test_options_out_of_range(cli, tmp_path, photo, configs_only, option, value):
    code, _, err = cli("inpaint", photo, "-p", "x", "--rect", "0,0,8,8", option, value,
                       "-m", configs_only, "-o", tmp_path / "o.png")
    assert code == 2
    one_line(err, option)
    assert not (tmp_path / "o.png").exists()


# --- model folders ---------------------------------------------------------------------------------------

FLUX_TRANSFORMER = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True,
                    "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                    "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}
SD_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 4,
          "in_channels": 3, "out_channels": 3, "sample_size": 512}


def write_json(path, value):
    path.write_text(json.dumps(value))


def torch_pickle_that_writes(marker):
    """A .bin that runs code when unpickled: it creates `marker`."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps({"weight": Payload()})


def shapes_changed(folder):
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    write_json(folder / "transformer" / "config.json", {**cfg, "num_attention_heads": 4, "attention_head_dim": 8,
                                                         "axes_dims_rope": [2, 2, 4]})


def pickle_only(folder):
    for f in (folder / "transformer").glob("*.safetensors*"):
        f.unlink()
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(torch_pickle_that_writes(folder / "PWNED"))


def text_encoder_pickle_only(folder):
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(torch_pickle_that_writes(folder / "PWNED"))


def without_merges(folder):
    """A tokenizer.json that loads but splits the template into bytes: an empty or foreign vocabulary."""
    file = folder / "tokenizer" / "tokenizer.json"
    data = json.loads(file.read_text())
    data["model"]["merges"] = []
    write_json(file, data)


def truncate(file):
    file.write_bytes(file.read_bytes()[:1000])


@pytest.mark.parametrize("edit, code, message", [
    (lambda f: shutil.rmtree(f / "transformer"), 1, "is missing: the model folder is incomplete"),
    (lambda f: shutil.rmtree(f / "vae"), 1, "is missing: the model folder is incomplete"),
    (lambda f: shutil.rmtree(f / "tokenizer"), 1, "tokenizer is missing"),
    (lambda f: (f / "tokenizer" / "tokenizer.json").unlink(), 1, "no tokenizer.json and no vocab.json"),
    (without_merges, 1, "is not Qwen-Image's tokenizer"),
    (lambda f: shutil.rmtree(f / "text_encoder"), 1, "text_encoder is missing"),
    (lambda f: (f / "transformer" / "diffusion_pytorch_model-00002-of-00004.safetensors").unlink(), 1,
     "shards named in"),
    (lambda f: truncate(f / "vae" / "diffusion_pytorch_model.safetensors"), 1, "is not a readable safetensors file"),
    (lambda f: truncate(f / "text_encoder" / "model.safetensors"), 1, "cannot load the text encoder"),
    (pickle_only, 1, "only pickle weights"),
    (text_encoder_pickle_only, 1, "cannot load the text encoder"),
    (shapes_changed, 1, "wrong shape"),
    (lambda f: write_json(f / "transformer" / "config.json", FLUX_TRANSFORMER), 1, "not supported"),
    (lambda f: write_json(f / "vae" / "config.json", SD_VAE), 1, "unknown VAE config keys"),
    (lambda f: write_json(f / "model_index.json", {"_class_name": "FluxPipeline"}), 2, "FluxPipeline"),
    (lambda f: (f / "transformer" / "config.json").write_text("{not json"), 1, ": not valid JSON"),
    (lambda f: write_json(f / "tokenizer" / "tokenizer_config.json", [1]), 2, "tokenizer_config.json holds an array"),
    (lambda f: write_json(f / "model_index.json", ["QwenImagePipeline"]), 2,
     "model_index.json holds an array, not an object"),
    (lambda f: write_json(f / "model_index.json", "QwenImagePipeline"), 2, "holds a string, not an object"),
    (lambda f: write_json(f / "model_index.json", {"_class_name": ["x"]}), 2,
     "model_index.json names no pipeline (_class_name)"),
    (lambda f: write_json(f / "qimg.json", [1]), 2, "qimg.json holds an array, not an object"),
    (lambda f: write_json(f / "transformer" / "config.json", None), 2, "config.json holds null, not an object"),
    (lambda f: write_json(f / "transformer" / "diffusion_pytorch_model.safetensors.index.json", []), 2,
     "index.json holds an array, not an object"),
    (lambda f: write_json(f / "transformer" / "diffusion_pytorch_model.safetensors.index.json", {"weight_map": [1]}),
     2, "weight_map must be an object"),
    (lambda f: write_json(f / "transformer" / "diffusion_pytorch_model.safetensors.index.json",
                          {"weight_map": {"a": 1}}), 2, "weight_map must be an object"),
    (lambda f: (f / "model_index.json").unlink(), 2, "model_index.json is missing"),
])
def test_broken_model_folders(cli, tmp_path, tiny_model_dir, one_thread, edit, code, message):
    model = broken_copy(tiny_model_dir, tmp_path, edit)
    out = tmp_path / "o.png"
    got, _, err = cli("generate", "-p", "a cat", "-m", model, "--size", "32x32", "-o", out, *FAST)
    assert got == code
    one_line(err, message)
    assert not out.exists()
    assert not (model / "PWNED").exists()  # no pickle was ever loaded



@pytest.mark.parametrize("model", ["x y/z", "a/b/c", "../x", "-x/y", "x/y..z"])
def test_model_that_is_neither_a_folder_nor_a_repo_id(cli, tmp_path, photo, model, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # ../x and the rest name nothing that exists, wherever the tests run
    code, _, err = cli("inpaint", photo, "-p", "x", "--rect", "0,0,8,8", "-m", model, "-o",
                       tmp_path / "o.png")
    assert code == 2
    one_line(err, f"model folder not found: {model}")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("kind", ["preset", "chain"])
def test_lone_surrogate_escapes_in_yaml(cli, tmp_path, photo, configs_only, kind):
    text = 'negative_prompt: "\\ud800"\n'
    (tmp_path / "f.yaml").write_text(text + ("edits: [{inpaint: {rect: '0,0,8,8', prompt: x}}]\n" if kind == "chain"
                                             else ""))
    args = ["chain", photo, tmp_path / "f.yaml"] if kind == "chain" else \
        ["inpaint", photo, "-p", "x", "--rect", "0,0,8,8", "--preset", tmp_path / "f.yaml"]
    code, _, err = cli(*args, "-m", configs_only, "-o", tmp_path / "o.png")
    assert code == 2
    one_line(err, f"{kind} {tmp_path / 'f.yaml'}", "line 1", "lone surrogate", "negative_prompt")
    assert not (tmp_path / "o.png").exists()


def test_out_dir_that_is_a_file(cli, tmp_path, photo, configs_only):
    (tmp_path / "taken").write_text("notes")
    code, _, err = cli("outpaint", photo, "-p", "x", "--right", "16", "--out-dir", tmp_path / "taken",
                       "-m", configs_only)
    assert code == 2
    one_line(err, f"--out-dir {tmp_path / 'taken'} is a file")
    assert (tmp_path / "taken").read_text() == "notes"

# --- outputs ---------------------------------------------------------------------------------------------


def test_existing_output_is_kept_without_overwrite(cli, tmp_path, configs_only):
    out = tmp_path / "o.png"
    out.write_bytes(b"precious")
    code, _, err = cli("generate", "-p", "x", "-m", configs_only, "-o", out)
    assert code == 2
    one_line(err, f"--out {out} exists", "--overwrite")
    assert out.read_bytes() == b"precious"


def test_output_equal_to_input_needs_overwrite_then_replaces_atomically(cli, tmp_path, tiny_model_dir, photo,
                                                                        one_thread):
    before, original = photo.read_bytes(), pixels(photo)
    code, _, err = cli("inpaint", photo, "-p", "x", "--rect", "0,0,16,16", "-o", photo,
                       "-m", tiny_model_dir, *FAST)
    assert code == 2
    one_line(err, "is the input image", "--overwrite")
    assert photo.read_bytes() == before
    photo.chmod(0o640)
    code, _, err = cli("inpaint", photo, "-p", "x", "--rect", "0,0,16,16", "-o", photo,
                       "--overwrite", "-m", tiny_model_dir, *FAST)
    assert code == 0, err
    after = np.asarray(Image.open(photo).convert("RGB"))
    assert np.array_equal(after[16:], original[16:]) and not np.array_equal(after[:16, :16], original[:16, :16])
    assert stat.S_IMODE(photo.stat().st_mode) == 0o640  # the replaced file's permissions are kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".qimg-")] == []


def test_new_outputs_get_the_usual_permissions(cli, tmp_path, tiny_model_dir, one_thread):
    out = tmp_path / "o.png"
    code, _, err = cli("generate", "-p", "x", "-m", tiny_model_dir, "--size", "32x32", "-o", out, *FAST)
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_unwritable_output_folder_as_any_user(cli, tmp_path, configs_only, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real(p, mode))
    (tmp_path / "ro").mkdir()
    code, _, err = cli("generate", "-p", "x", "-m", configs_only, "-o", tmp_path / "ro" / "o.png")
    assert code == 2
    one_line(err, "not writable")


@pytest.mark.parametrize("failure, message", [
    (OSError(errno.ENOSPC, "No space left on device"), "free some space"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "free some space"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error"),
])
def test_full_disk_keeps_the_old_file_and_leaves_no_temp(cli, tmp_path, tiny_model_dir, monkeypatch, one_thread,
                                                         failure, message):
    out = tmp_path / "o.png"
    out.write_bytes(b"old")

    def fsync(fd):  # the data did not fit: the OS reports it when the file is flushed to disk
        raise failure

    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = cli("generate", "-p", "x", "-m", tiny_model_dir, "--size", "32x32", "-o", out,
                       "--overwrite", "--no-cache", *FAST)  # the cache's own writes warn and carry on
    assert code == 1
    one_line(err, f"cannot write {out}", message)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def test_save_failure_as_root_too(cli, tmp_path, tiny_model_dir, monkeypatch, one_thread):
    import tempfile

    def mkstemp(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, _, err = cli("generate", "-p", "x", "-m", tiny_model_dir, "--size", "32x32",
                       "-o", tmp_path / "o.png", "--no-cache", *FAST)
    assert code == 1
    one_line(err, "cannot write", "Permission denied", "choose another --out folder")
    assert list(tmp_path.iterdir()) == []


# --- prompts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["-p", "--negative-prompt"])
def test_non_utf8_prompt(cli, tmp_path, configs_only, option):
    args = ["-p", "x", option, "caf\udce9 \udcff"]  # how Python hands over argv bytes that are not UTF-8
    code, _, err = cli("generate", *args, "-m", configs_only, "-o", tmp_path / "o.png")
    assert code == 2
    one_line(err, "is not UTF-8", "\\xe9")


def test_long_prompt_warns_and_runs(cli, tmp_path, tiny_model_dir, one_thread):
    code, _, err = cli("generate", "-p", "a cat sitting on a wooden table " * 150, "-m", tiny_model_dir,
                       "--size", "32x32", "-o", tmp_path / "o.png", *FAST)
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("qimg: warning:")]
    assert len(warning) == 1 and "tokens long" in warning[0] and "512" in warning[0]
    assert "Traceback" not in err


def test_mixed_language_prompt_is_fine(cli, tmp_path, tiny_model_dir, one_thread):
    code, _, err = cli("generate", "-p", "把左边那只白色的cat改成黑色的 🐈", "-m", tiny_model_dir,
                       "--size", "32x32", "-o", tmp_path / "o.png", "--json", *FAST)
    assert code == 0, err
    assert "warning" not in err


# --- runtime failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", ["cuda", "host"])
def test_out_of_memory(cli, tmp_path, tiny_model_dir, monkeypatch, error):
    import torch

    from qimg.engine.engine import Engine

    def oom(*args, **kwargs):
        if error == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has ...")
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(Engine, "generate", oom)
    code, _, err = cli("generate", "-p", "x", "-m", tiny_model_dir, "-o", tmp_path / "o.png", *FAST)
    assert code == 1
    one_line(err, "out of memory", "smaller size", "--offload")
    assert not (tmp_path / "o.png").exists()


def test_debug_shows_the_traceback(tmp_path, tiny_model_dir, monkeypatch):
    from qimg.engine.engine import Engine

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Engine, "generate", fail)
    with pytest.raises(RuntimeError, match="boom"):
        run(["--debug", "generate", "-p", "x", "-m", str(tiny_model_dir), "-o", str(tmp_path / "o.png"), *FAST])


def test_multi_line_errors_are_cut_to_one_line(cli, tmp_path, tiny_model_dir, monkeypatch):
    from qimg.engine.engine import Engine

    def fail(*args, **kwargs):
        raise RuntimeError("first line\nsecond line\nthird")

    monkeypatch.setattr(Engine, "generate", fail)
    code, _, err = cli("generate", "-p", "x", "-m", tiny_model_dir, "-o", tmp_path / "o.png", *FAST)
    assert code == 1
    one_line(err, "RuntimeError: first line", "--debug")


# --- untrusted files -------------------------------------------------------------------------------------


def test_png_metadata_is_never_evaluated(cli, tmp_path, tiny_model_dir, photo, one_thread):
    from PIL import PngImagePlugin

    marker = tmp_path / "PWNED"
    info = PngImagePlugin.PngInfo()
    for key in ("qimg", "parameters", "prompt"):
        info.add_itxt(key, f"__import__('pathlib').Path({str(marker)!r}).touch() or !!python/object/apply:os.system "
                           f"['touch {marker}']")
    Image.fromarray(pixels(photo)).save(tmp_path / "in.png", pnginfo=info)
    code, _, err = cli("inpaint", tmp_path / "in.png", "-p", "x", "--rect", "0,0,8,8", "-m", tiny_model_dir,
                       "-o", tmp_path / "o.png", *FAST)
    assert code == 0, err
    assert not marker.exists()


def test_no_code_runs_from_model_files():
    """qimg never asks for remote code, never unpickles, never loads YAML unsafely."""
    from pathlib import Path

    import qimg

    forbidden = r"trust_remote_code=True|torch\.load\(|pickle\.loads?\(|yaml\.load\(|(?<![.\w])(eval|exec)\("
    for path in Path(qimg.__file__).parent.rglob("*.py"):
        assert not re.search(forbidden, path.read_text()), path
