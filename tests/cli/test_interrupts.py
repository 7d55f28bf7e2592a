"""Atomic outputs and clean stops: Ctrl-C, SIGTERM, SIGHUP and SIGQUIT exit 128 + the signal with a line
saying what was finished, from the first line of qimg's code on; a process stopped at any moment (SIGKILL
included) leaves either no output or a complete one, and the next save cleans what SIGKILL left."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import leftovers, signal_self
from PIL import Image

from qimg.cli.app import run
from qimg.errors import STOPS
from qimg.jobs.report import Reporter

FAST = ["--steps", "1", "--seed", "3", "--device", "cpu", "--cfg", "1", "--size", "32x32"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, word",
                         [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_while_sampling_writes_nothing(capsys, tmp_path, tiny_model_dir, monkeypatch, signum, code, word):
    from qimg.engine.engine import Engine

    monkeypatch.setattr(Engine, "generate", signal_self(signum))
    before = signal.getsignal(signum)
    out = tmp_path / "o.png"
    assert run(["generate", "-p", "x", "-m", str(tiny_model_dir), "-o", str(out), *FAST]) == code
    err = capsys.readouterr().err
    assert err.strip() == f"qimg: {word}; nothing written"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signum) == before  # the handlers are put back


@pytest.mark.slow
def test_signal_after_the_save_names_the_file(capsys, tmp_path, tiny_model_dir, monkeypatch, one_thread):
    monkeypatch.setattr(Reporter, "result", signal_self(signal.SIGINT))
    out = tmp_path / "o.png"
    assert run(["generate", "-p", "x", "-m", str(tiny_model_dir), "-o", str(out), *FAST]) == 130
    assert capsys.readouterr().err.strip() == f"qimg: interrupted after writing {out}"
    Image.open(out).load()


@pytest.mark.slow
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
    from qimg.images import save_image

    calls = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "link")}
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", fd)) or real["fsync"](fd))
    for name in ("replace", "link"):
        monkeypatch.setattr(os, name,
                            lambda a, b, name=name: calls.append((name, Path(a), Path(b))) or real[name](a, b))
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
    from qimg.images import save_image

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


def start(model: Path, out: Path, *extra: str, ignore: tuple[int, ...] = ()) -> subprocess.Popen:
    """`python -m qimg generate` at 512x512 (extra options win); `ignore`: signals it starts with ignored."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["generate", "-p", "a cat", "-m", str(model), "-o", str(out), "--size", "512x512", "--steps", "1",
            "--cfg", "1", "--seed", "5", "--device", "cpu", *extra]
    return subprocess.Popen([sys.executable, "-m", "qimg", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: [signal.signal(s, signal.SIG_IGN) for s in ignore])


def wait_for_qimg_handlers(proc: subprocess.Popen, signum: int = signal.SIGHUP) -> None:
    """Wait until the process catches `signum` (SIGHUP: Python alone never does): qimg's first lines have run
    and the rest (typer, torch) is still loading. Before that point Python handles signals itself."""
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & 1 << (signum - 1):
            return
        time.sleep(0.001)
    pytest.fail(f"qimg never took signal {signum}")


linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")


@pytest.mark.subprocess
@linux_only
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_a_signal_while_qimg_loads_its_modules_stops_it_quietly(tmp_path, tiny_model_dir, signum):
    proc = start(tiny_model_dir, tmp_path / "o.png")
    wait_for_qimg_handlers(proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    assert err.strip() == f"qimg: {STOPS[signum]}; nothing written"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.subprocess
@linux_only
def test_a_signal_ignored_at_start_stays_ignored(tmp_path, tiny_model_dir):
    """A background job of a script starts with SIGINT ignored (and nohup ignores SIGHUP): Ctrl-C in the
    terminal is not for it, so it finishes."""
    out = tmp_path / "o.png"
    proc = start(tiny_model_dir, out, "--size", "32x32", ignore=(signal.SIGINT, signal.SIGHUP))
    wait_for_qimg_handlers(proc, signal.SIGTERM)  # the one signal of the four left to it
    while proc.poll() is None:  # all through the run
        for signum in (signal.SIGINT, signal.SIGHUP):
            proc.send_signal(signum)
        time.sleep(0.05)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    Image.open(out).load()



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


@pytest.mark.subprocess
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGKILL])
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
        again = start(tiny_model_dir, out, "--overwrite", "--size", "32x32")
        assert again.wait(timeout=240) == 0
        assert leftovers(tmp_path) == []  # the next save to that name removed what the killed one left
        return
    assert leftovers(tmp_path) == []
    if sent and proc.returncode != 0:
        word = STOPS[signum]
        assert proc.returncode == 128 + signum
        last = err.strip().splitlines()[-1]
        assert last in (f"qimg: {word}; nothing written", f"qimg: {word} after writing {out}")
        assert (out.read_bytes() == old) == last.endswith("nothing written")


@pytest.mark.subprocess
@linux_only
def test_signals_at_random_moments_stop_cleanly(tmp_path, tiny_model_dir):
    """SIGINT or SIGHUP anywhere in a short run, from qimg's first line to its exit: it finished (0) or
    stopped (128 + the signal), with at most one line and no traceback, and no temporary file is left."""
    rng = random.Random(15)
    for n in range(4):
        signum = rng.choice([signal.SIGINT, signal.SIGHUP])
        out = tmp_path / f"o{n}.png"
        proc = start(tiny_model_dir, out, "--size", "32x32", "--json")
        wait_for_qimg_handlers(proc)
        time.sleep(rng.uniform(0, 2.5))
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 128 + signum), err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
        assert leftovers(tmp_path) == []
        if proc.returncode == 0 or "after writing" in err:
            Image.open(out).load()


@pytest.mark.subprocess
def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path):
    from qimg.images import STALE_TEMP_SECONDS, remove_stale_temps

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    names = {
        f".qimg-o.png.{dead.pid}-abc123.tmp": False,  # its process is gone
        f".qimg-o.png.{os.getpid()}-abc123.tmp": True,  # a run saving to o.png now
        f".qimg-o.png.{os.getpid()}-old456.tmp": False,  # alive pid, but too old to be a save: a reused pid
        f".qimg-other.png.{dead.pid}-abc123.tmp": True,  # another target's
        ".qimg-o.png.abc123.tmp": True,  # not named like qimg's own
        "o.png": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(tmp_path / f".qimg-o.png.{os.getpid()}-old456.tmp", (old, old))
    remove_stale_temps(tmp_path / "o.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, kept in names.items() if kept)


def test_a_default_name_taken_during_the_run_takes_the_next_number(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """Two runs started together pick one default name; the one that saves second takes the next number."""
    from qimg.engine.engine import Engine

    real = Engine.generate

    def other_run_saves_first(self, *args, **kwargs):
        (tmp_path / "qimg-3.png").write_bytes(b"the other run's")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", other_run_saves_first)
    monkeypatch.chdir(tmp_path)
    assert run(["generate", "-p", "x", "-m", str(tiny_model_dir), *FAST]) == 0
    assert capsys.readouterr().err.startswith("qimg-3-2.png  seed 3")
    assert (tmp_path / "qimg-3.png").read_bytes() == b"the other run's"
    Image.open(tmp_path / "qimg-3-2.png").load()
    assert leftovers(tmp_path) == []
