"""Outputs and what qimg prints (issue 15): symlinks that lead nowhere, sizes a format cannot hold, file names
with escape sequences, large text chunks in inputs, a closed or broken stdout or stderr, an ASCII terminal.
Checks that need no weights run on `configs_only`, so reaching the loader would fail differently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line, raw_png
from PIL import Image, PngImagePlugin

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--steps", "1", "--seed", "3", "--device", "cpu", "--cfg", "1"]
PHOTO = np.s_[::16, ::16]  # the `photo` fixture at 32x32


@pytest.mark.parametrize("link", ["dangling", "loop", "dangling folder"])
def test_a_symlink_output_that_leads_nowhere_is_refused_up_front(cli, tmp_path, photo, configs_only, link):
    out = tmp_path / "o.png"
    if link == "dangling":
        out.symlink_to(tmp_path / "gone.png")
    elif link == "loop":
        out.symlink_to(out)
    else:
        (tmp_path / "sub").symlink_to(tmp_path / "gone")
        out = tmp_path / "sub" / "o.png"
    code, _, err = cli("inpaint", photo, "-p", "x", "--rect", "0,0,8,8", "-m", configs_only, "-o", out)
    assert code == 2
    one_line(err, "symlink", "does not exist or loops")
    assert not (tmp_path / "gone").exists() and not (tmp_path / "gone.png").exists()


@pytest.mark.parametrize("make", ["dangling", "loop", "file"])
def test_a_batch_out_dir_that_cannot_be_a_folder_is_refused_up_front(cli, tmp_path, photo, configs_only, make):
    folder = tmp_path / "outs"
    if make == "dangling":
        folder.symlink_to(tmp_path / "gone")
    elif make == "loop":
        (tmp_path / "other").symlink_to(folder)
        folder.symlink_to(tmp_path / "other")
    else:
        folder.write_text("notes")
    second = tmp_path / "b.png"
    second.write_bytes(photo.read_bytes())
    for out_dir in (folder, folder / "sub"):
        code, _, err = cli("inpaint", photo, second, "-p", "x", "--rect", "0,0,8,8", "-m", configs_only,
                           "--out-dir", out_dir)
        assert code == 2
        one_line(err, f"--out-dir {folder}", "does not exist or loops" if make != "file" else "is a file")
    code, _, err = cli("inpaint", photo, second, "-p", "x", "--rect", "0,0,8,8", "-m", configs_only,
                       "--mask-dir", photo)
    assert code == 2
    one_line(err, f"--mask-dir {photo} is not a folder")


def test_a_default_name_held_by_a_dangling_symlink_is_numbered(tmp_path):
    from qimg.jobs.names import free_name

    (tmp_path / "qimg-1.png").symlink_to(tmp_path / "gone.png")
    assert free_name("qimg-1", tmp_path) == tmp_path / "qimg-1-2.png"


def test_a_batch_counts_a_dangling_symlink_output_as_existing(cli, tmp_path, photo, configs_only):
    first, second = tmp_path / "in.png", tmp_path / "b.png"
    first.write_bytes(photo.read_bytes())
    second.write_bytes(photo.read_bytes())
    (tmp_path / "in.inpaint.png").symlink_to(tmp_path / "gone.png")
    args = ["inpaint", first, second, "-p", "x", "--rect", "0,0,8,8", "-m", configs_only]
    code, _, err = cli(*args)
    assert code == 2
    one_line(err, "1 of 2 outputs exist already", "in.inpaint.png")
    code, _, err = cli(*args, "--skip-existing")  # skipped; the other one reaches the (absent) weights
    assert "in.inpaint.png  exists, skipped" in err


@pytest.mark.parametrize("suffix, size, limit", [(".webp", "16400x64", 16383), (".jpg", "64x65536", 65500)])
def test_generate_refuses_a_size_the_format_cannot_hold(cli, tmp_path, configs_only, suffix, size, limit):
    out = tmp_path / f"o{suffix}"
    code, _, err = cli("generate", "-p", "x", "--size", size, "-m", configs_only, "-o", out)
    assert code == 2
    one_line(err, str(out), size, f"{limit} pixels", ".png")
    assert list(tmp_path.iterdir()) == []


def test_outpaint_refuses_a_result_the_format_cannot_hold(cli, tmp_path, photo, configs_only):
    out = tmp_path / "o.webp"
    code, _, err = cli("outpaint", photo, "-p", "x", "--right", "16400", "-m", configs_only, "-o", out)
    assert code == 2
    one_line(err, str(out), "16432x32", "16383 pixels")


def test_the_pixel_limit_and_its_message_agree(tmp_path):
    from qimg.errors import UsageError
    from qimg.images import read_image

    path = tmp_path / "big.png"
    path.write_bytes(raw_png(11500, 11400, 8, 2, b"\0" * 100))  # 131.1 million pixels
    with pytest.raises(UsageError, match="131 megapixels; qimg works on images up to 128 megapixels"):
        read_image(path)


def test_escape_sequences_in_file_names_are_not_sent_to_the_terminal(cli, tmp_path, configs_only):
    bad = tmp_path / "\x1b[31mred.png"
    bad.write_text("not an image")
    code, _, err = cli("inpaint", bad, "-p", "x", "--rect", "0,0,8,8", "-m", configs_only)
    assert code == 2
    assert "\x1b" not in err
    one_line(err, "\\u001b[31mred.png is not an image file")


def test_a_large_xmp_chunk_does_not_make_an_input_unreadable(tmp_path):
    from qimg.images import load_image, read_image

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", "<x/>" * 400_000, zip=True)  # 1.6 MB once decompressed
    path = tmp_path / "xmp.png"
    Image.new("RGB", (8, 8), "red").save(path, pnginfo=info)
    pixels, _ = load_image(path)
    assert pixels.shape == (8, 8, 3) and pixels[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(Exception, match="MAX_TEXT_CHUNK"):  # `qimg info` still keeps Pillow's bound
        read_image(path)


def qimg_process(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "qimg", *map(str, args)], env=env, capture_output=True,
                          **kwargs)


@pytest.mark.subprocess
def test_errors_never_go_to_stdout_when_stderr_is_closed(configs_only):
    command = f"{sys.executable} -m qimg generate -p x --size 100x100 -m {configs_only} --json 2>&-"
    result = subprocess.run(["bash", "-c", command], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True)
    assert result.returncode == 2
    assert result.stdout == b""


@pytest.mark.subprocess
def test_a_broken_stdout_pipe_lets_the_batch_finish(tmp_path, tiny_model_dir):
    """`qimg inpaint FOLDER --json | head -n1`: the reader leaves after one line; every file is written."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in "abc":
        Image.new("RGB", (32, 32), "red").save(folder / f"{name}.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = (f"{sys.executable} -m qimg inpaint {folder} -p x --rect 0,0,8,8 -m {tiny_model_dir} "
               f"{' '.join(FAST)} --json | head -n1")
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"].endswith("a.inpaint.png")
    assert "Traceback" not in result.stderr and "Broken pipe" not in result.stderr
    for name in "abc":
        Image.open(folder / f"{name}.inpaint.png").load()


@pytest.mark.subprocess
def test_json_on_an_ascii_stdout_stays_valid(tmp_path, tiny_model_dir):
    out = tmp_path / "o.png"
    result = qimg_process("generate", "-p", "一只猫", "-m", tiny_model_dir, "--size", "32x32", *FAST, "-o", out,
                          "--json", env={"PYTHONIOENCODING": "ascii", "LC_ALL": "C"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prompt"] == "一只猫"
    info = qimg_process("info", out, "--json", env={"PYTHONIOENCODING": "ascii", "LC_ALL": "C"})
    assert info.returncode == 0 and json.loads(info.stdout)["prompt"] == "一只猫"


@pytest.mark.subprocess
def test_info_on_an_ascii_stdout_escapes_and_a_full_stdout_is_one_line(tmp_path, tiny_model_dir):
    out = tmp_path / "o.png"
    assert qimg_process("generate", "-p", "一只猫", "-m", tiny_model_dir, "--size", "32x32", *FAST, "-o", out,
                        "--no-cache").returncode == 0
    info = qimg_process("info", out, env={"PYTHONIOENCODING": "ascii"}, text=True)
    assert info.returncode == 0 and '"\\u4e00\\u53ea\\u732b"' in info.stdout, info.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "qimg", "info", str(out)], env=env, stdout=full,
                                stderr=subprocess.PIPE, text=True)
    assert result.returncode == 1 and result.stderr == "qimg: error: cannot write to stdout: No space left on device\n"


@pytest.mark.parametrize("colour_type, channels", [(2, 3), (6, 4)])
def test_16_bit_rgb_pngs_round_to_8_bits(tmp_path, colour_type, channels):
    """round(v / 257), as the README says and 16-bit greyscale does; not Pillow's high byte (v >> 8)."""
    from qimg.images import read_image

    v = np.random.default_rng(1).integers(0, 65536, (6, 5, channels)).astype(">u2")
    raw = v.view(np.uint8).reshape(6, -1)
    up = (raw[1:].astype(int) - raw[:-1]) % 256  # rows after the first use PNG's Up filter
    rows = b"\0" + raw[0].tobytes() + b"".join(b"\2" + r.astype(np.uint8).tobytes() for r in up)
    path = tmp_path / "deep.png"
    path.write_bytes(raw_png(5, 6, 16, colour_type, rows))
    assert np.asarray(read_image(path)).tolist() == np.round(v / 257).astype(np.uint8).tolist()
