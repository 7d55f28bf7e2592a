"""The worker gives what an in-process run gives: the same files, bytes and metadata, the same stdout and
stderr lines and exit codes, for every model command and for errors; the client stays light."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from worker_helpers import FAST, qimg, start, status, stop, worker_env

pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = worker_env(tmp_path_factory.mktemp("worker"))
    start(env)
    yield env
    stop(env)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of inputs every case copies: two photos, a mask, a chain file, a broken mask."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    (folder / "photos").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / "photos" / f"{name}.png")
    shutil.copy(folder / "photos" / "a.png", folder / "in.png")
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 16:32] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "chain.yaml").write_text('steps: 1\nedits:\n  - inpaint: {rect: "0,0,16,16", prompt: "a cat"}\n'
                                       '  - outpaint: {right: 16, prompt: "more"}\n')
    (folder / "bad.yaml").write_text("edits: [unclosed\n")
    (folder / "taken.png").write_bytes(b"keep me")
    shutil.copy(folder / "photos" / "a.png", folder / "photos" / "a.inpaint.png")  # --skip-existing skips it
    return folder


def outcome(result, folder):
    """What a run left: exit code, stdout and stderr (timings masked) and every file's bytes."""
    def masked(text):
        return re.sub(r'"(preview_)?seconds": [0-9.]+', r'"\1seconds": S', re.sub(r"[0-9.]+ s\b", "S s", text))

    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return result.returncode, masked(result.stdout), masked(result.stderr), files


CASES = {
    "generate": ["generate", "-p", "a red circle", "-o", "g.png", "--size", "32x32", "--json"],
    "inpaint mask file": ["inpaint", "in.png", "-p", "a cat", "--mask", "mask.png", "--json"],
    "inpaint rect": ["inpaint", "in.png", "-p", "a cat", "--rect", "4,4,50%,50%", "--feather", "2"],
    "outpaint": ["outpaint", "in.png", "-p", "more", "--left", "16", "--json"],
    "chain": ["chain", "in.png", "chain.yaml", "--json"],
    "preview": ["inpaint", "in.png", "-p", "a cat", "--mask", "mask.png", "--preview", "live/in.png", "--json"],
    "batch skip-existing": ["inpaint", "photos", "-p", "x", "--rect", "0,0,8,8", "--skip-existing", "--json"],
    "missing input": ["inpaint", "nope.png", "-p", "x", "--rect", "0,0,8,8", "--json"],
    "bad size": ["generate", "-p", "x", "--size", "33x32", "--json"],
    "existing out": ["generate", "-p", "x", "-o", "taken.png", "--json"],
    "bad mask": ["inpaint", "in.png", "-p", "x", "--mask", "broken.png", "--json"],
    "bad chain file": ["chain", "in.png", "bad.yaml", "--json"],
}


@pytest.mark.parametrize("case", CASES)
def test_worker_matches_in_process(case, env, inputs, tiny_model_dir, tmp_path, cache_dir):
    args = [*CASES[case], "-m", tiny_model_dir, *FAST]
    results = {}
    for mode in ("0", "1"):
        folder = tmp_path / f"run-{mode}"
        shutil.copytree(inputs, folder)
        before = status(env)["jobs_run"]
        result = qimg(args, {**env, "QIMG_CACHE_DIR": str(cache_dir / mode)}, cwd=folder, mode=mode)
        assert status(env)["jobs_run"] == before + (mode == "1")  # the worker ran it, or did not
        results[mode] = outcome(result, folder)
    assert results["0"] == results["1"]
    code, _, err, files = results["0"]
    assert (code == 0) == (case in ("generate", "inpaint mask file", "inpaint rect", "outpaint", "chain", "preview",
                                    "batch skip-existing"))
    assert code == 0 or err.startswith("qimg: error: ") and err.count("\n") == 1
    assert len(files) > len(list(inputs.rglob("*.*"))) or code != 0  # a success wrote something
    assert case != "preview" or b"qimg-preview" in files["live/in.png"]  # at the caller's path, as --out is


def test_the_worker_keeps_the_engine_and_reports_it(env, tiny_model_dir, tmp_path):
    qimg(["generate", "-p", "x", "-m", tiny_model_dir, "--size", "32x32", *FAST], env, cwd=tmp_path)
    answer = status(env)
    assert answer["loaded"]["model"] == str(tiny_model_dir) and answer["loaded"]["device"] == "cpu"
    assert answer["memory"] > 0 and answer["log"].endswith("qimg/worker.log")
    text = qimg(["worker", "status"], env)
    assert f"pid:       {answer['pid']}" in text.stdout and str(tiny_model_dir) in text.stdout


def test_no_worker_flag_and_env_run_in_process(env, tiny_model_dir, tmp_path):
    before = status(env)["jobs_run"]
    for args, mode in (([], "0"), (["--no-worker"], "1")):
        result = qimg(["generate", *args, "-p", "x", "-m", tiny_model_dir, "--size", "16x16", "-o", f"{mode}.png",
                       *FAST, *args], env, cwd=tmp_path, mode=mode)
        assert result.returncode == 0, result.stderr
    assert status(env)["jobs_run"] == before


def test_the_client_imports_nothing_heavy(env, tiny_model_dir, tmp_path):
    code = f"""
import sys
from qimg.worker.client import maybe_submit
assert maybe_submit(["generate", "-p", "x", "-m", {str(tiny_model_dir)!r}, "--size", "16x16", *{FAST!r}]) == 0
print(json.dumps(sorted(m for m in ("torch", "numpy", "PIL", "typer", "rich", "qimg.cli.app") if m in sys.modules)))
""".replace("import sys", "import json, sys")
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "QIMG_WORKER": "1"},
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert list(tmp_path.glob("qimg-3*.png"))  # the job ran, in the worker


def test_a_job_with_other_process_settings_runs_in_process(env, tiny_model_dir, tmp_path):
    before = status(env)["jobs_run"]
    result = qimg(["generate", "-p", "x", "-m", tiny_model_dir, "--size", "16x16", *FAST],
                  {**env, "OMP_NUM_THREADS": "2"}, cwd=tmp_path)  # torch reads it once, at import
    assert result.returncode == 0
    assert result.stderr.startswith("qimg: warning: not using the qimg worker: it was started with other "
                                    "OMP_NUM_THREADS; running in-process")
    assert status(env)["jobs_run"] == before


def test_progress_bars_reach_a_terminal(env, tiny_model_dir, tmp_path):
    """The client's stderr is a terminal: the job in the worker draws its bars there, as in-process."""
    import os
    import pty
    import subprocess
    import sys

    for mode in ("0", "1"):
        before = status(env)["jobs_run"]
        leader, follower = pty.openpty()
        result = subprocess.run(
            [sys.executable, "-m", "qimg", "generate", "-p", "x", "-m", str(tiny_model_dir), "--size", "16x16",
             "-o", f"{mode}.png", "--steps", "3", *FAST[2:]], cwd=tmp_path, stdout=subprocess.DEVNULL,
            stderr=follower, env={**os.environ, **env, "QIMG_WORKER": mode, "TERM": "xterm", "COLUMNS": "100"},
            timeout=300)
        os.close(follower)
        text = os.read(leader, 1 << 20).decode()
        os.close(leader)
        assert result.returncode == 0
        assert "generating" in text and "\x1b[" in text, text  # a drawn bar, with terminal codes
        assert status(env)["jobs_run"] == before + (mode == "1")


def test_changed_code_gets_another_worker(tmp_path):
    """An editable install whose sources change must not keep sending jobs to a worker running the old code."""
    from qimg.worker.paths import code_state

    package = tmp_path / "qimg"
    (package / "model").mkdir(parents=True)
    (package / "cli.py").write_text("a = 1\n")
    (package / "model" / "vae.py").write_text("b = 2\n")
    before = code_state(package)
    assert code_state(package) == before
    os.utime(package / "model" / "vae.py", ns=(0, 10**18))
    assert code_state(package) != before
    touched = code_state(package)
    (package / "cli.py").write_text("a = 22\n")
    assert code_state(package) not in (before, touched)


def test_the_worker_log_moves_aside_past_its_limit(tmp_path):
    from qimg.worker.paths import Log

    path = tmp_path / "worker.log"
    log = Log(path, limit=200)
    for i in range(30):
        log(f"line {i:02d} " + "x" * 20)
    old = (tmp_path / "worker.log.1").read_text()
    assert path.stat().st_size <= 200 + 60 and len(old) <= 200 + 60
    assert "line 29" in path.read_text() and "line 28" in path.read_text() + old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker.log", "worker.log.1"]
