"""Atomic outputs and clean stops: Ctrl-C and SIGTERM exit 130 / 143 with a line saying what was finished,
and a process stopped at any moment (SIGKILL included) leaves either no output or a complete one."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qimg.cli import run
from qimg.report import Reporter

FAST = ["--steps", "1", "--seed", "3", "--device", "cpu", "--cfg", "1", "--size", "32x32"]
ROOT = Path(__file__).resolve().parent.parent


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".qimg-"))


def signal_self(signum):
    def send(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises long before this ends
        pytest.fail("the signal did not stop the run")

    return send


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_while_sampling_writes_nothing(capsys, tmp_path, tiny_model_dir, monkeypatch, signum, code, word):
    from qimg.engine import Engine

    monkeypatch.setattr(Engine, "generate", signal_self(signum))
    before = signal.getsignal(signum)
    out = tmp_path / "o.png"
    assert run(["generate", "-p", "x", "-m", str(tiny_model_dir), "-o", str(out), *FAST]) == code
    err = capsys.readouterr().err
    assert err.strip() == f"qimg: {word}; nothing written"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signum) == before  # the handlers are put back


def test_signal_after_the_save_names_the_file(capsys, tmp_path, tiny_model_dir, monkeypatch, one_thread):
    monkeypatch.setattr(Reporter, "result", signal_self(signal.SIGINT))
    out = tmp_path / "o.png"
    assert run(["generate", "-p", "x", "-m", str(tiny_model_dir), "-o", str(out), *FAST]) == 130
    assert capsys.readouterr().err.strip() == f"qimg: interrupted after writing {out}"
    Image.open(out).load()


def test_signal_in_the_middle_of_writing_keeps_the_old_file(capsys, tmp_path, tiny_model_dir, monkeypatch, one_thread):
    out = tmp_path / "o.png"
    out.write_bytes(b"old")

    def half_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half an image")
        signal_self(signal.SIGINT)()

    monkeypatch.setattr(Image.Image, "save", half_save)
    code = run(["generate", "-p", "x", "-m", str(tiny_model_dir), "-o", str(out), "--overwrite", *FAST])
    assert code == 130
    assert capsys.readouterr().err.strip() == "qimg: interrupted; nothing written"
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite, publish", [(True, "replace"), (False, "link")])
def test_save_writes_a_synced_temp_file_beside_the_target_then_renames(tmp_path, monkeypatch, overwrite, publish):
    """With --overwrite the temp file is renamed over the target; without, hard-linked to it, which fails
    rather than replace a file that appeared meanwhile."""
    from qimg.files import save_image

    calls = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "link")}
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", fd)) or real["fsync"](fd))
    for name in ("replace", "link"):
        monkeypatch.setattr(os, name, lambda a, b, name=name: calls.append((name, Path(a), Path(b))) or real[name](a, b))
    out = tmp_path / "sub" / "o.png"
    save_image(Image.new("RGB", (8, 8), "red"), out, {"qimg": "{}"}, overwrite)
    kinds = [c[0] for c in calls]
    assert kinds[:2] == ["fsync", publish]  # file data on disk before the rename (the folder is synced after)
    _, tmp, target = calls[1]
    assert target == out and tmp.parent == out.parent and tmp.name.startswith(".qimg-o.png.")
    assert np.asarray(Image.open(out)).tolist() == np.asarray(Image.new("RGB", (8, 8), "red")).tolist()
    assert leftovers(out.parent) == []


def test_a_file_that_appears_during_the_save_is_kept(tmp_path, monkeypatch):
    from qimg.errors import OutputExists
    from qimg.files import save_image

    out = tmp_path / "o.png"
    real_fsync = os.fsync

    def fsync_then_someone_writes(fd):  # another program creates the output while qimg finishes its file
        real_fsync(fd)
        out.write_bytes(b"theirs")

    monkeypatch.setattr(os, "fsync", fsync_then_someone_writes)
    with pytest.raises(OutputExists, match="it was kept"):
        save_image(Image.new("RGB", (8, 8), "red"), out, {"qimg": "{}"})
    assert out.read_bytes() == b"theirs" and leftovers(tmp_path) == []


# --- a real process, killed while it writes --------------------------------------------------------------


def start(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["generate", "-p", "a cat", "-m", str(model), "-o", str(out), "--size", "512x512", "--steps", "1",
            "--cfg", "1", "--seed", "5", "--device", "cpu", *extra]
    return subprocess.Popen([sys.executable, "-m", "qimg", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_while_writing(proc: subprocess.Popen, folder: Path, signum: int, rng: random.Random) -> bool:
    """Wait for the temporary output to appear, then signal the process a random few ms later.
    Returns whether the signal was sent while the process was still alive."""
    deadline = time.monotonic() + 240
    while not leftovers(folder) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.02))
    if proc.poll() is not None:
        return False
    proc.send_signal(signum)
    return True


def complete_png(path: Path) -> bool:
    with Image.open(path) as img:
        img.load()
        return img.size == (512, 512)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killed_mid_write_leaves_the_old_file_or_a_complete_one(tmp_path, tiny_model_dir, signum):
    rng = random.Random(signum)
    out = tmp_path / "o.png"
    Image.new("RGB", (8, 8), "blue").save(out)
    old = out.read_bytes()
    proc = start(tiny_model_dir, out, "--overwrite")
    sent = kill_while_writing(proc, tmp_path, signum, rng)
    _, err = proc.communicate(timeout=240)
    assert "Traceback" not in err, err
    assert out.read_bytes() == old or complete_png(out)
    if signum == signal.SIGKILL:  # no cleanup possible: a temp file may stay, but never under the final name
        assert all(name.endswith(".tmp") for name in leftovers(tmp_path))
        return
    assert leftovers(tmp_path) == []
    if sent and proc.returncode != 0:
        word = "interrupted" if signum == signal.SIGINT else "terminated"
        assert proc.returncode == 128 + signum
        last = err.strip().splitlines()[-1]
        assert last in (f"qimg: {word}; nothing written", f"qimg: {word} after writing {out}")
        assert (out.read_bytes() == old) == last.endswith("nothing written")
