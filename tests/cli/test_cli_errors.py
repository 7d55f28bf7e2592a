"""Bad input: one line on stderr naming the problem, the right exit code, nothing written.

These run without loading any weights: every check happens before the model is touched.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_line


@pytest.fixture
def fake_model(tmp_path):
    folder = tmp_path / "model"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("size", ["100x100", "0x64", "-16x64", "64", "axb", "64x64x64"])
def test_bad_size_is_a_usage_error(cli, tmp_path, fake_model, size):
    code, _, err = cli("generate", "-p", "x", "-m", str(fake_model), "--size", size,
                       "-o", str(tmp_path / "o.png"))
    assert code == 2
    one_line(err, "--size")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("command, size, parsed", [("generate", "64x48", (64, 48)), ("edit", "50x30", (50, 30))])
def test_size_is_parsed_once_into_the_job(cli, tmp_path, monkeypatch, command, size, parsed):
    from qimg.cli import app

    jobs = []
    monkeypatch.setattr(app, "execute", lambda job, *rest: jobs.append(job))
    code, _, err = cli(command, *([str(tmp_path / "in.png")] if command == "edit" else []), "-p", "x",
                       "--size", size)
    assert code == 0 and err == "" and [job.size for job in jobs] == [parsed]
    code, _, err = cli(command, *([str(tmp_path / "in.png")] if command == "edit" else []), "-p", "x",
                       "--size", "16xq")
    assert code == 2 and len(jobs) == 1
    one_line(err, "--size '16xq' is not WIDTHxHEIGHT")


def test_bad_to_on_an_outpaint_batch_is_one_usage_line_before_any_file_is_read(cli, tmp_path, monkeypatch,
                                                                               configs_only):
    """--to is parsed with the command line: not once per input (it was: two lines and exit 1 for two files)."""
    from PIL import Image

    from qimg import images

    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    monkeypatch.setattr(images, "load_image", lambda *a: pytest.fail("an input was read"))
    before = sorted(tmp_path.iterdir())
    code, out, err = cli("outpaint", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-p", "x",
                         "--to", "64xq", "-m", str(configs_only))
    assert code == 2 and out == ""
    one_line(err, "--to '64xq' is not WIDTHxHEIGHT")
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_non_positive_steps_is_a_usage_error(cli, tmp_path, fake_model, steps):
    code, _, err = cli("generate", "-p", "x", "-m", str(fake_model), "--steps", steps,
                       "-o", str(tmp_path / "o.png"))
    assert code == 2
    one_line(err, "--steps")


def test_missing_model_folder(cli, tmp_path):
    code, _, err = cli("generate", "-p", "x", "-m", str(tmp_path / "nope"), "-o", str(tmp_path / "o.png"))
    assert code == 2
    one_line(err, "model folder not found", "nope")


def test_folder_that_is_not_a_model(cli, tmp_path):
    code, _, err = cli("generate", "-p", "x", "-m", str(tmp_path), "-o", str(tmp_path / "o.png"))
    assert code == 2
    one_line(err, "not a Qwen-Image model folder", "model_index.json")


def test_model_of_another_family(cli, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    code, _, err = cli("generate", "-p", "x", "-m", str(tmp_path), "-o", str(tmp_path / "o.png"))
    assert code == 2
    one_line(err, "StableDiffusionPipeline", "not Qwen-Image")


def test_uncached_repo_id_names_the_folder_to_pass(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = cli("generate", "-p", "x", "-m", "Qwen/Qwen-Image", "-o", str(tmp_path / "o.png"))
    assert code == 1
    one_line(err, "Qwen/Qwen-Image", "--model /path/to/Qwen-Image")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(cli, tmp_path, fake_model):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = cli("generate", "-p", "x", "-m", str(fake_model), "-o", str(locked / "o.png"))
    assert code == 2
    one_line(err, "not writable")


def test_output_in_a_path_under_a_file(cli, tmp_path, fake_model):
    (tmp_path / "file").write_text("")
    code, _, err = cli("generate", "-p", "x", "-m", str(fake_model), "-o", str(tmp_path / "file" / "o.png"))
    assert code == 2
    one_line(err, f"folder {tmp_path / 'file'} is a file, not a folder")


def test_unknown_output_format(cli, tmp_path, fake_model):
    code, _, err = cli("generate", "-p", "x", "-m", str(fake_model), "-o", str(tmp_path / "o.gif"))
    assert code == 2
    one_line(err, "unknown image format", ".gif")


def test_unknown_device(cli, tmp_path, fake_model):
    code, _, err = cli("generate", "-p", "x", "-m", str(fake_model), "--device", "tpu",
                       "-o", str(tmp_path / "o.png"))
    assert code == 2
    one_line(err, "--device")


@pytest.mark.subprocess
def test_help_does_not_import_torch_numpy_or_pil():
    probe = ("import sys; from qimg.cli.app import run; run(['--help']); run(['generate', '--help']); "
             "print([m for m in ('torch', 'numpy', 'PIL') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


@pytest.mark.subprocess
def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "qimg", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout


@pytest.mark.subprocess
@pytest.mark.parametrize("command", [["generate", "-p", "x"], ["inpaint", "in.png", "-p", "x", "--rect", "0,0,8,8"],
                                     ["edit", "in.png", "-p", "x"], ["chain", "in.png", "c.yaml"]])
def test_a_deleted_working_folder_is_one_line(tmp_path, tiny_model_dir, command):
    """Every model command in a working folder that was deleted: one line, exit 2 (torch's MKL died with a raw
    line of its own, the chain's relative files were missing)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "QIMG_WORKER": "0"}
    args = [sys.executable, "-m", "qimg", *command, "-m", str(tiny_model_dir), "--device", "cpu", "--steps", "1",
            "-o", str(tmp_path / "o.png")]
    result = subprocess.run(["sh", "-c", 'cd "$0" && rmdir "$0" && exec "$@"', str(gone), *args], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    one_line(result.stderr, "qimg: error: the working folder was deleted", "cd to a folder that exists")
    assert not (tmp_path / "o.png").exists()
