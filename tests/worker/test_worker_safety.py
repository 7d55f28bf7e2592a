"""The worker applies the safety filter's rules of each caller's environment (QIMG_SAFETY and the rest) to that
caller's job: the worker's own environment, and the job before, decide nothing."""

import pytest
from worker_helpers import FAST, ROOT, qimg, start, status, stop, worker_env

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]
STUBS = ROOT / "tests" / "safety_stubs.py"  # by path: the worker's job process has no tests/ on its sys.path


def test_the_worker_applies_the_callers_safety_environment(tmp_path, tiny_model_dir):
    env = worker_env(tmp_path)
    start(env)
    try:
        words = tmp_path / "words.txt"
        words.write_text("unsafe test token\n")
        operator = {**env, "QIMG_SAFETY": "both", "QIMG_SAFETY_WORDS": str(words),
                    "QIMG_SAFETY_CLASSIFIER": f"{STUBS}:flag_all"}
        before = status(env)["jobs_run"]

        def run(prompt, out, environment, *more):
            return qimg(["generate", "-p", prompt, "-m", tiny_model_dir, "-o", out, "--size", "32x32", *FAST, *more],
                        environment, cwd=tmp_path)

        result = run("an unsafe test token", "a.png", operator)
        assert result.returncode == 3 and "the words filter" in result.stderr and "token" not in result.stderr
        result = run("a red circle", "b.png", operator, "--safety", "off")
        assert result.returncode == 2 and "QIMG_SAFETY=both is set" in result.stderr
        result = run("a red circle", "c.png", operator)
        assert result.returncode == 3 and "c.png: the image is withheld, nothing written" in result.stderr
        result = run("an unsafe test token", "d.png", env)  # another caller, no QIMG_SAFETY: nothing checked
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in tmp_path.glob("*.png")) == ["d.png"]
        assert status(env)["jobs_run"] == before + 4  # every one ran in the worker
    finally:
        stop(env)
