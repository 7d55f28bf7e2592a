"""The worker keeps the last engine it loaded; outside the worker `engine` just makes a new one.

The key holds everything that changes the numbers an engine computes: the resolved model folder and its
fingerprint (a folder whose files changed is another model), device, dtype and the speed options. A job
with another key drops the old engine (and its device memory) before loading the new one."""

import gc
import sys
from contextlib import contextmanager
from pathlib import Path

enabled = False  # set by the worker process only
_key = None
_engine = None


def engine(folder, device: str, dtype: str, speed: dict, make):
    """The kept engine when this job's key matches, else `make()` (kept for the next job in the worker)."""
    global _key, _engine
    if not enabled:
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
    from qimg.weights.folders import model_kind
    from qimg.weights.split_files import Files, text_files

    files = Files(*(Path(speed[p]) if speed.get(p) else None for p in ("text_encoder", "vae", "vision")))
    if not files.text_encoder:
        return ()
    try:
        return tuple(fingerprint(p) for p in text_files(files, folder, model_kind(folder).edits))
    except (QimgError, OSError):
        return None


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


def drop() -> None:
    global _key, _engine
    if _engine is None:
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
    folder, fp, device, dtype, speed, *_ = _key
    return dict(model=folder, fingerprint=fp[:16], device=device, dtype=dtype, **dict(speed))
