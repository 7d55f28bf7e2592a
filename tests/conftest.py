"""Shared fixtures: the tiny random Qwen-Image checkpoints (one build per session) and diffusers loaded on them,
`cli` (qimg run in this process), `photo` (a real photo as a PNG), and a private cache for every test."""

import json
import os
import shutil

# Before anything imports huggingface_hub (it reads these once): no test may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from qwen21_folder import build_qwen21_folders  # noqa: E402
from tiny_checkpoint import build_tiny_checkpoint  # noqa: E402
from tiny_edit_checkpoint import build_tiny_edit_checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen-image")


@pytest.fixture(scope="session")
def tiny_edit_checkpoints(tmp_path_factory):
    """The tiny Qwen-Image-Edit folders, built together (one set of weights): {"edit", "plus", "2511"}."""
    return build_tiny_edit_checkpoints(tmp_path_factory.mktemp("tiny-edit"))


@pytest.fixture(scope="session")
def tiny_edit_dir(tiny_edit_checkpoints):
    return tiny_edit_checkpoints["edit"]  # Qwen-Image-Edit: one picture


@pytest.fixture(scope="session")
def tiny_plus_dir(tiny_edit_checkpoints):
    return tiny_edit_checkpoints["plus"]  # Qwen-Image-Edit-2509: one to three pictures


@pytest.fixture(scope="session")
def tiny_2511_dir(tiny_edit_checkpoints):
    return tiny_edit_checkpoints["2511"]  # Qwen-Image-Edit-2511: 2509 with zero_cond_t


@pytest.fixture(scope="session")
def qwen21_folders(tmp_path_factory):
    """The tiny Qwen-Image-2.1 folders, one set of weights: {"base", "turbo"} (tests/qwen21_folder.py)."""
    return build_qwen21_folders(tmp_path_factory.mktemp("tiny-qwen21"))


@pytest.fixture(scope="session")
def qwen21_dir(qwen21_folders):
    return qwen21_folders["base"]


@pytest.fixture(scope="session")
def configs_only(tmp_path_factory, tiny_model_dir):
    """The tiny checkpoint's folder layout and configs without a single weight: a run that gets this far
    into loading stops with 'no .safetensors weights', so every check before it is known to have passed."""
    folder = tmp_path_factory.mktemp("configs") / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


@pytest.fixture(scope="session")
def reference_pipeline(tiny_model_dir):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own empty qimg cache: none writes to the user's, and none sees another's entries."""
    folder = tmp_path / "qimg-cache"
    monkeypatch.setenv("QIMG_CACHE_DIR", str(folder))
    monkeypatch.delenv("QIMG_CACHE_SIZE", raising=False)
    monkeypatch.setenv("QIMG_NO_NOTICE", "1")  # a model's licence notice would be a line no test expects
    return folder


@pytest.fixture(scope="module")
def one_thread():
    # Tiny tensors: intra-op threads only add hand-off cost, and spin badly on a busy 2-core box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def store(tmp_path):
    """A 1 MB cache store in a fresh folder whose warnings are kept in `store.messages`."""
    from qimg.cache import Store

    messages = []
    s = Store(tmp_path / "cache", 10**6, messages.append)
    s.messages = messages
    return s


class CLI:
    """`qimg ARGS` run in this process through `qimg.cli.app.run` (no worker, no subprocess), with what it printed
    taken from capsys. Each call returns (exit code, stdout, stderr); `json` and `lines` parse stdout."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args) -> tuple[int, str, str]:
        from qimg.cli.app import run

        code = run([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args) -> tuple[int, dict | None, str]:
        """stdout as one JSON document (`--json` of a single run); None when the run failed or printed nothing."""
        code, out, err = self(*args)
        return code, (json.loads(out) if code == 0 and out else None), err

    def lines(self, *args) -> tuple[int, list, str]:
        """stdout as JSON lines, one per line printed (`--json` of a batch, a prompts file or a shard)."""
        code, out, err = self(*args)
        return code, [json.loads(line) for line in out.splitlines()], err


@pytest.fixture
def cli(capsys):
    return CLI(capsys)


@pytest.fixture
def photo(request, tmp_path):
    """A real photo as a PNG file, written fresh for each test (so a test may change or replace it): skimage's
    astronaut (512x512 RGB) cut by the test module's `PHOTO` slice, e.g. `PHOTO = np.s_[:300, :451]` for an
    odd-sized 451x300 crop; without one, `np.s_[::8, ::8]`, the whole picture at 64x64. The file is
    tmp_path / "astronaut.png"."""
    from skimage import data

    path = tmp_path / "astronaut.png"
    crop = getattr(request.module, "PHOTO", np.s_[::8, ::8])
    Image.fromarray(np.ascontiguousarray(data.astronaut()[crop])).save(path)
    return path
