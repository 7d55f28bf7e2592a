"""--ray on a local 2-CPU Ray cluster started once for the module: the local batch's bytes, a lost actor's
file redone on another, a file that always fails reported like a bad file (exit 1, the rest complete).
(That Ray is imported only with --ray: tests/test_imports.py.)"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--rect", "8,8,16,16", "-p", "a red circle", "--steps", "2", "--seed", "7", "--device", "cpu", "--no-cache",
        "--json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A Ray head of 2 CPUs in its own process group (stopped by that group's id, never `ray stop`, which
    would stop every cluster of the machine), token auth off as for a test, qimg importable by its workers."""
    temp = tempfile.mkdtemp(prefix="qr", dir="/tmp")  # Ray's socket paths must stay short
    log = open(Path(temp) / "head.log", "w+")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "QIMG_WORKER": "0",
           "OMP_NUM_THREADS": "1"}
    # With ray[client] installed the head also serves Ray Client, on 10001 unless told: give it a free port. The
    # plain `ray` the test extra installs has no client, and refuses the option.
    from ray._private.utils import get_ray_client_dependency_error

    client = [] if get_ray_client_dependency_error() else ["--ray-client-server-port", str(free_port())]
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats", "--port", "0",
                             *client, "--temp-dir", temp],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            log.seek(0)
            text = log.read()
            if "ray start --address='" in text:
                break
            assert head.poll() is None and time.monotonic() < deadline, text[-2000:]
            time.sleep(0.2)
        yield text.split("ray start --address='")[1].split("'")[0]
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # the head, its daemons and workers: the whole group
        except ProcessLookupError:  # the head failed to start, and the group is gone with it
            pass
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever did not stop
        except ProcessLookupError:
            pass
        head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_env(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")


def make_photos(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(folder / f"p{i}.png")
    return folder


def outputs(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.subprocess
def test_ray_gives_the_local_bytes_and_redoes_a_lost_actor_s_file(cluster, ray_env, tmp_path, cli, monkeypatch):
    photos = make_photos(tmp_path / "photos", 5)
    assert cli.lines("inpaint", photos, *FAST, "--out-dir", tmp_path / "local")[0] == 0
    lost = tmp_path / "lost"
    monkeypatch.setenv("QIMG_TEST_ACTOR_EXIT", f"p2.png:{lost}")  # the actor running p2.png exits, once
    code, lines, err = cli.lines("inpaint", photos, *FAST, "--out-dir", tmp_path / "ray", "--ray", cluster,
                                 "--ray-workers", "2")
    assert code == 0, err
    assert lost.exists() and f"{photos / 'p2.png'}: its Ray actor was lost; running it again (1 of 2)" in err
    assert sorted(Path(r["output"]).name for r in lines) == [f"p{i}.inpaint.png" for i in range(5)]  # each once
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")


@pytest.mark.subprocess
def test_a_file_that_always_fails_is_reported_and_the_rest_complete(cluster, ray_env, tmp_path, cli,
                                                                    monkeypatch):
    photos = make_photos(tmp_path / "photos", 4)
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")  # a bad file: reported, never retried
    monkeypatch.setenv("QIMG_TEST_ACTOR_EXIT", "p1.png")  # every actor running p1.png exits
    code, lines, err = cli.lines("inpaint", photos, *FAST, "--out-dir", tmp_path / "ray", "--ray", cluster,
                                 "--ray-workers", "2", "--retries", "1")
    assert code == 1
    assert err.count("is not an image file Pillow can read") == 1
    assert f"{photos / 'p1.png'}: failed 2 times: its Ray actor was lost" in err
    assert err.strip().splitlines()[-1] == (f"qimg: error: 2 of 5 images failed: {photos / 'broken.png'}, "
                                            f"{photos / 'p1.png'}")
    assert sorted(outputs(tmp_path / "ray")) == ["p0.inpaint.png", "p2.inpaint.png", "p3.inpaint.png"]
    assert sorted(r["input"] for r in lines if "error" in r) == [str(photos / "broken.png"), str(photos / "p1.png")]


@pytest.mark.subprocess
def test_prompts_over_ray(cluster, ray_env, tmp_path, cli):
    file = tmp_path / "p.txt"
    file.write_text("a red circle\na blue square\n")
    common = ["generate", "--prompts", file, "--size", "32x32", "--steps", "2", "--seed", "7", "--device", "cpu",
              "--no-cache", "--json"]
    assert cli.lines(*common, "--out-dir", tmp_path / "local")[0] == 0
    code, lines, err = cli.lines(*common, "--out-dir", tmp_path / "ray", "--ray", cluster, "--ray-workers", "2")
    assert code == 0, err
    assert sorted(Path(r["output"]).name for r in lines) == ["0001-a-red-circle.png", "0002-a-blue-square.png"]
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")


def test_a_file_written_before_its_actor_was_lost_is_not_run_again(tmp_path, capsys):
    from collections import deque

    from qimg.jobs.ray_runner import Item, Pool
    from qimg.jobs.report import Reporter
    from qimg.jobs.spec import RaySpec

    target = tmp_path / "p0.inpaint.png"
    target.write_bytes(b"complete: outputs are written atomically")
    todo, failed, advanced = deque(), [], []
    pool = Pool(RaySpec("local", 2))
    pool.stdout = sys.stdout
    with Reporter() as reporter:
        pool.retry(Item("photos/p0.png", target, None), 1, "its Ray actor was lost", todo, failed, reporter,
                    lambda: advanced.append(1))
    assert (list(todo), failed, advanced) == ([], [], [1])
    assert f"{target}  exists, skipped" in capsys.readouterr().err
