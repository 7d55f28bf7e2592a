"""qimg under torchrun's environment with one image on two ranks (gloo, one thread each), against the same
command in one process: generate with a LoRA at a size whose sequence two does not divide (9 image tokens),
inpaint with --attn-mask, an Edit-2511 edit with a reference picture (under --ulysses 2, and guided under
--cfg-parallel). The pixels match within 1/255 (the order-sensitive ops are named in test_parallel_math.py; the
runs here came out byte-identical), only rank 0 writes or prints, and the refusals are one line from rank 0: a
degree the head count does not divide, a world size the options do not make, an option or device that does not
combine, a bad QIMG_PARALLEL_TIMEOUT, a bad file loaded after connecting, a rank killed mid-run."""

import json
import time

import numpy as np
import pytest
from helpers import lightning_lora, lora_layers, pixels
from launch import run, start
from safetensors.torch import save_file

FAST = ["--steps", "2", "--seed", "7", "--device", "cpu", "--no-cache"]
MODES = {"cfg": ["--cfg-parallel"], "ulysses": ["--ulysses", "2"], "tp": ["--tp", "2", "--offload", "model"]}


def together(args: list, cwd) -> tuple[str, str]:
    """`qimg ARGS` on two ranks: rank 0's stdout and stderr, after checking both ranks ended well and rank 1 said
    nothing."""
    (code0, out0, err0), (code1, out1, err1) = run(["-m", "qimg", *map(str, args)], cwd=cwd)
    assert (code0, code1) == (0, 0), (err0, err1)
    assert (out1, err1) == ("", "")
    return out0, err0


def close(a, b) -> None:
    a, b = pixels(a).astype(int), pixels(b).astype(int)
    assert a.shape == b.shape and a.std() > 1
    assert np.abs(a - b).max() <= 1


@pytest.fixture(scope="module")
def lora(tiny_model_dir, tmp_path_factory):
    """A LoRA over every linear layer: under --tp each rank fuses it into its own slices."""
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_file(lightning_lora(lora_layers(tiny_model_dir)), path)  # changes the image by up to 31/255
    return path


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_generate(tiny_model_dir, lora, tmp_path, cli, one_thread, mode):
    args = ["generate", "-p", "a red circle", "-m", tiny_model_dir, "--size", "48x48", "--lora", lora, *FAST]
    assert cli(*args, "-o", tmp_path / "one.png")[0] == 0
    _, err = together([*args, "-o", tmp_path / "par.png", *MODES[mode]], tmp_path)
    assert str(tmp_path / "par.png") in err
    close(tmp_path / "one.png", tmp_path / "par.png")


@pytest.mark.subprocess
@pytest.mark.slow
def test_inpaint_keeps_every_pixel_outside_the_mask(tiny_model_dir, photo, tmp_path, cli, one_thread):
    args = ["inpaint", photo, "-p", "a red circle", "-m", tiny_model_dir, "--rect", "16,8,24,40", "--attn-mask", "on",
            *FAST]
    assert cli(*args, "-o", tmp_path / "one.png")[0] == 0
    together([*args, "-o", tmp_path / "par.png", "--ulysses", "2"], tmp_path)
    close(tmp_path / "one.png", tmp_path / "par.png")
    outside = np.ones((64, 64), bool)
    outside[8:48, 16:40] = False
    assert np.array_equal(pixels(tmp_path / "par.png")[outside], pixels(photo)[outside])


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ulysses", "cfg"])
def test_edit_2511_with_a_reference_picture(tiny_2511_dir, photo, tmp_path, cli, one_thread, mode):
    """Under --cfg-parallel, guided: each half of the grid runs one branch of the pair, reference tokens and all."""
    args = ["edit", photo, "--ref", photo, "-p", "put the lamp from picture 2 on the table", "-m", tiny_2511_dir,
            "--edit-area", 48 * 48, "--vision-area", 64 * 64, *FAST, *(["--cfg", "4"] if mode == "cfg" else [])]
    assert cli(*args, "-o", tmp_path / "one.png")[0] == 0
    _, err = together([*args, "-o", tmp_path / "par.png", *MODES[mode]], tmp_path)
    assert "--cfg-parallel does nothing" not in err
    close(tmp_path / "one.png", tmp_path / "par.png")


@pytest.mark.subprocess
@pytest.mark.slow
def test_cfg_parallel_at_cfg_1_says_so_once_and_runs(tiny_model_dir, tmp_path):
    out, err = together(["generate", "-p", "a red circle", "-m", tiny_model_dir, "--size", "32x32", *FAST, "--cfg",
                         "1", "--cfg-parallel", "-o", tmp_path / "o.png", "--json"], tmp_path)
    assert err.count("--cfg-parallel does nothing at cfg <= 1") == 1
    assert json.loads(out)["parallel"] == {"cfg_parallel": True, "ulysses": 1, "tp": 1, "ranks": 2}
    assert (tmp_path / "o.png").is_file()


@pytest.mark.parametrize("env, args, fragment", [
    ({"WORLD_SIZE": "3"}, ["--ulysses", "3"], "--ulysses 3: the model has 2 attention heads, which 3 does not "
                                               "divide; valid --ulysses degrees here: 2"),
    ({"WORLD_SIZE": "4"}, ["--ulysses", "2"], "the options make 1 (--cfg-parallel) x 2 (--ulysses) x 1 (--tp) = 2 "
                                               "processes, and WORLD_SIZE is 4"),
    ({}, ["--tp", "2"], "--tp 2 runs one image on 2 processes: start it with torchrun"),
    ({"WORLD_SIZE": "2"}, ["--tp", "2", "--quantize", "fp8"], "--tp 2 splits dense weights; --quantize fp8 packs "
                                                              "them"),
    ({"WORLD_SIZE": "2"}, ["--ulysses", "2", "--offload", "blocks"], "--offload blocks does not combine with "
                                                                      "--ulysses 2"),
    ({"WORLD_SIZE": "2", "QIMG_PARALLEL_TIMEOUT": "abc"}, ["--ulysses", "2"], "QIMG_PARALLEL_TIMEOUT='abc' is not "
                                                                               "a number of seconds above 0"),
])
def test_refusals_are_one_line_from_rank_0(tiny_model_dir, tmp_path, cli, monkeypatch, env, args, fragment):
    refused_alike(tiny_model_dir, tmp_path, cli, monkeypatch, env, args, fragment)


@pytest.mark.parametrize("gpus, args, fragment", [
    (2, ["--device", "cuda:0"], "--device cuda:0 puts every rank on GPU 0: give --device cuda or auto with"),
    (1, ["--device", "cuda"], "--ulysses 2: torchrun starts 2 ranks on this node (LOCAL_WORLD_SIZE) and 1 GPU(s) are "
                              "visible; NCCL needs one GPU per rank"),
    (0, ["--device", "mps"], "--ulysses 2 runs its ranks on CUDA GPUs or the CPU, not MPS (--device mps)"),
])
def test_a_device_the_ranks_cannot_share_is_refused(tiny_model_dir, tmp_path, cli, monkeypatch, gpus, args, fragment):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    refused_alike(tiny_model_dir, tmp_path, cli, monkeypatch, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
                  ["--ulysses", "2", *args], fragment)


def test_device_cuda_takes_gpu_local_rank(monkeypatch):
    import torch

    from qimg.jobs.common import engine_device
    from qimg.jobs.spec import ModelSpec
    from qimg.parallel.layout import Layout

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert engine_device(ModelSpec(device="cuda", local_rank=1, parallel=Layout(ulysses=2))) == torch.device("cuda:1")
    assert engine_device(ModelSpec(device="cuda", local_rank=1)) == torch.device("cuda")  # --shard auto: as given


def refused_alike(tiny_model_dir, tmp_path, cli, monkeypatch, env, args, fragment) -> None:
    """One usage line from rank 0 (none without torchrun's environment); rank 1 exits 2 in silence."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ({"RANK": "0", **env} if env else {}).items():
        monkeypatch.setenv(name, value)
    code, out, err = cli("generate", "-p", "x", "-m", tiny_model_dir, *FAST, "-o", tmp_path / "o.png", *args)
    assert (code, out) == (2, "") and err.splitlines() == [f"qimg: error: {err.strip()[13:]}"]
    assert fragment in err
    if env:  # another rank refuses alike, in silence
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(SystemExit) as stop:
            cli("generate", "-p", "x", "-m", tiny_model_dir, *FAST, "-o", tmp_path / "o.png", *args)
        assert stop.value.code == 2 and cli.capsys.readouterr() == ("", "")


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_bad_file_loaded_after_connecting_is_one_line_from_rank_0(tiny_model_dir, tmp_path):
    """Every rank loads the --lora once the ranks have connected, and fails on it alike: rank 0 says it."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    (code0, out0, err0), (code1, out1, err1) = run(
        ["-m", "qimg", "generate", "-p", "x", "-m", str(tiny_model_dir), "--size", "32x32", *FAST, "--lora", str(bad),
         "-o", str(tmp_path / "o.png"), "--ulysses", "2"], cwd=tmp_path)
    assert (code0, code1) == (2, 2) and (out0, out1, err1) == ("", "", "")
    assert err0.splitlines() == [f"qimg: error: --lora {bad} is not a readable safetensors file (its header does not "
                                 "parse); download it again"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_killed_rank_stops_the_other_with_one_line(tiny_model_dir, tmp_path):
    preview = tmp_path / "preview.png"
    procs = start(["-m", "qimg", "generate", "-p", "a red circle", "-m", str(tiny_model_dir), "--size", "128x128",
                   "--steps", "1000", "--device", "cpu", "--no-cache", "--preview", str(preview), "--preview-every",
                   "1", "-o", str(tmp_path / "o.png"), "--ulysses", "2"], timeout=20, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not preview.exists() and time.monotonic() < deadline:  # sampling runs: both ranks are in it
            time.sleep(0.2)
        assert preview.exists(), procs[0].communicate(timeout=5)
        procs[1].kill()
        killed = time.monotonic()
        out, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - killed < 40
        assert procs[0].returncode == 1 and not (tmp_path / "o.png").exists()
        lines = [line for line in err.splitlines() if line.startswith("qimg: error")]
        assert len(lines) == 1 and lines[0].startswith("qimg: error: rank 0 of 2:"), err
        assert "every rank stops" in lines[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
