"""The worker keeps the last model it loaded, in one slot: an image engine or a segmentation model (masks from
words, word_masks.py); loading either drops the other first, so the two never share memory. Outside the worker
`engine` just makes a new one; a segmentation model is held in the slot for its job only (word_masks.release).

An engine's key holds everything that changes the numbers it computes: the resolved model folder and its
fingerprint (a folder whose files changed is another model), device, dtype and the speed options. A job
with another key drops the old model (and its device memory) before loading the new one."""

import gc
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

enabled = False  # set by the worker process only


class Segmenter(NamedTuple):  # the key of a kept segmentation model
    fingerprint: str
    device: str
    name: str  # as an output's metadata names it (MaskModel.public), for `qimg worker status`


_key = None  # an engine's key (a tuple), or a Segmenter
_engine = None  # the kept engine or segmentation model


def engine(folder, device: str, dtype: str, speed: dict, make):
    """The kept engine when this job's key matches, else `make()` (kept for the next job in the worker)."""
    global _key, _engine
    if not enabled:
        drop("segmenter")
        return make()
    from qimg.weights.fingerprint import fingerprint

    # A --transformer, --text-encoder, --vae or --vision file is part of the model: changed, it is another one.
    files = (speed.get(part) for part in ("transformer", "text_encoder", "vae", "vision"))
    weights = tuple(fingerprint(Path(f)) if f and Path(f).is_file() else None for f in files)
    key = (str(folder), fingerprint(folder), device, dtype, tuple(sorted(speed.items())), weights,
           _tokenizer(Path(folder), speed))
    if key != _key:
        drop()
        _engine = make()
        _key = key
    return _engine


def _tokenizer(folder: Path, speed: dict) -> tuple | None:
    """Fingerprints of what a --text-encoder file's prompts go through besides it (the tokenizer found for it, a
    --vision file): a tokenizer folder beside the file that changed makes another model. None when the files are
    refused: making the engine says why."""
    from qimg.errors import QimgError
    from qimg.weights.fingerprint import fingerprint
    from qimg.weights.folders import QWEN_IMAGE_21, model_kind
    from qimg.weights.split_files import Files, text_files

    files = Files(*(Path(speed[p]) if speed.get(p) else None for p in ("text_encoder", "vae", "vision")))
    if not files.text_encoder:
        return ()
    try:
        kind = model_kind(folder)
        if kind.family == QWEN_IMAGE_21.family:  # Qwen3-VL's tokenizer places (weights/split21.py)
            from qimg.weights.split21 import text_files21

            return tuple(fingerprint(p) for p in text_files21(files, folder))
        return tuple(fingerprint(p) for p in text_files(files, folder, kind.edits))
    except (QimgError, OSError):
        return None


def segmenter(fingerprint: str, device: str, name: str, make):
    """The segmentation model `fingerprint` on `device` (name: for `qimg worker status`): the one in the slot,
    else `make()` put there, after dropping what was."""
    global _key, _engine
    key = Segmenter(fingerprint, device, name)
    if key != _key:
        drop()
        _engine = make()
        _key = key
    return _engine


@contextmanager
def kept():
    """Within: engines are kept between jobs as in the worker, for a batch of jobs run in one process
    (generate --prompts); dropped after, unless this is the worker."""
    global enabled
    if enabled:
        yield
        return
    enabled = True
    try:
        yield
    finally:
        enabled = False
        drop()


def drop(only: str | None = None) -> None:
    """Drop the kept model and its memory; only="segmenter": only if it is a segmentation model."""
    global _key, _engine
    if _engine is None or (only == "segmenter" and not isinstance(_key, Segmenter)):
        return
    _key = _engine = None
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def summary() -> dict | None:
    """What is loaded, for `qimg worker status`: None when nothing is."""
    if _key is None:
        return None
    if isinstance(_key, Segmenter):
        return dict(mask_model=_key.name, fingerprint=_key.fingerprint[:16], device=_key.device)
    folder, fp, device, dtype, speed, *_ = _key
    return dict(model=folder, fingerprint=fp[:16], device=device, dtype=dtype, **dict(speed))
