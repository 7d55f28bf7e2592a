"""Qwen-Image-2.1 in the worker (issue 26): a generate, an edit with a reference picture and a mask, a prompts
batch and a chain of edits give what an in-process run gives (exit code, stdout, stderr, every file's bytes), the
worker keeps the 2.1 engine loaded between jobs, and the licence notice is printed once per model folder and state
folder as in-process."""

import shutil

import numpy as np
import pytest
from PIL import Image
from test_worker import outcome
from worker_helpers import qimg, start, status, stop, worker_env

pytestmark = pytest.mark.subprocess
FAST = ["--steps", "2", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = worker_env(tmp_path_factory.mktemp("worker21"))
    start(env)
    yield env
    stop(env)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs21")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 48, 4), np.uint8)
    image[..., 3] = 200
    Image.fromarray(image).save(folder / "in.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(folder / "ref.png")
    (folder / "prompts.txt").write_text("a red circle\na blue square\n")
    (folder / "chain.yaml").write_text('steps: 1\nedit-area: 1536\nedits:\n  - edit: {prompt: "make it blue"}\n'
                                       '  - edit: {prompt: "add a hat"}\n')
    return folder


CASES = {
    "generate": ["generate", "-p", "a red circle", "-o", "g.png", "--size", "32x32", "--json"],
    "edit ref mask": ["edit", "in.png", "--ref", "ref.png", "-p", "put picture 2 in", "--rect", "8,8,16,16",
                      "--edit-area", "1536", "-o", "e.png", "--json"],
    "prompts": ["generate", "--prompts", "prompts.txt", "--size", "32x32", "--out-dir", "batch", "--json"],
    "chain": ["chain", "in.png", "chain.yaml", "--json"],
    "jpeg without background": ["generate", "-p", "x", "-o", "x.jpg", "--size", "32x32"],
}


@pytest.mark.parametrize("case", CASES)
def test_the_worker_matches_in_process(case, env, inputs, qwen21_dir, tmp_path, cache_dir):
    args = [*CASES[case], "-m", qwen21_dir, *FAST]
    results = {}
    for mode in ("0", "1"):
        folder = tmp_path / f"run-{mode}"
        shutil.copytree(inputs, folder)
        before = status(env)["jobs_run"]
        result = qimg(args, {**env, "QIMG_CACHE_DIR": str(cache_dir / mode), "QIMG_NO_NOTICE": "1"}, cwd=folder,
                      mode=mode)
        assert status(env)["jobs_run"] == before + (mode == "1")
        results[mode] = outcome(result, folder)
    assert results["0"] == results["1"]
    code, _, err, files = results["0"]
    assert code == (2 if case == "jpeg without background" else 0), err
    assert code != 0 or len(files) > len(list(inputs.iterdir()))
    assert status(env)["loaded"]["model"] == str(qwen21_dir)


def test_the_licence_notice_once_per_state_folder_as_in_process(env, qwen21_dir, tmp_path):
    said = {}
    for mode in ("0", "1"):
        state = tmp_path / f"state-{mode}"
        job_env = {**env, "XDG_STATE_HOME": str(state), "QIMG_NO_NOTICE": "0"}  # the job's, not the worker's
        runs = [qimg(["generate", "-p", "x", "-m", qwen21_dir, "--size", "32x32", "-o", f"{mode}-{i}.png", *FAST],
                     job_env, cwd=tmp_path, mode=mode) for i in range(2)]
        assert all(run.returncode == 0 for run in runs), runs[0].stderr
        said[mode] = [run.stderr.count("Qwen Research License") for run in runs]
    assert said == {"0": [1, 0], "1": [1, 0]}
