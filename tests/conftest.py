"""Shared fixtures: one tiny random Qwen-Image checkpoint per session, and diffusers loaded on it."""

import os
import shutil
import sys
from pathlib import Path

# Before anything imports huggingface_hub (it reads these once): no test may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Interim: test modules still import helpers from each other across the package folders.
sys.path[:0] = [str(p) for p in sorted(Path(__file__).parent.iterdir()) if p.is_dir() and not p.name.startswith((".", "_"))]

import pytest  # noqa: E402
import torch  # noqa: E402
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
