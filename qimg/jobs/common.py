"""What every job does around its engine call: open the cache, find the model (and refuse the wrong kind), open
the engine (the worker's kept one when it computes the same numbers), name and save outputs, pick a seed, say
which --shard runs; and the tail generate, inpaint/outpaint and edit share (`sample_and_save`)."""

import functools
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Optional

from qimg.errors import UsageError, say
from qimg.jobs import shard
from qimg.jobs.previews import last_preview
from qimg.jobs.report import Reporter
from qimg.jobs.spec import CacheSpec, ModelSpec


def open_cache(spec: CacheSpec):
    """The latent and prompt store, or None with --no-cache or --cache-size 0; checked before any work (and
    before torch is imported)."""
    from qimg.cache import Store, default_cache_dir, size_option

    max_bytes = size_option(spec.size)
    if spec.off or max_bytes == 0:
        return None
    return Store(spec.folder or default_cache_dir(), max_bytes, lambda message: say(f"qimg: warning: {message}"))


def with_files(spec: ModelSpec) -> ModelSpec:
    """spec, or for --model on a folder that is no diffusers model (ComfyUI's models folder, loose files) the
    spec of the files found there (weights/comfy_folder.py), the options' own files kept."""
    folder = Path(spec.model).expanduser() if spec.model not in (None, "", "builtin") else None
    if folder is None or not folder.is_dir() or (folder / "model_index.json").exists():
        return spec
    from qimg.weights.comfy_folder import holds_files, pick

    if not holds_files(folder):
        return spec

    given = tuple(Path(f).resolve() if f else None for f in (spec.transformer, spec.text_encoder, spec.vae,
                                                                spec.vision))
    transformer, text_encoder, vae, vision = pick(folder.resolve(), given)
    return replace(spec, model=None, transformer=transformer, text_encoder=text_encoder, vae=vae, vision=vision,
                   transformer_from_env=False)


def resolve_model(spec: ModelSpec) -> Path:
    """The model folder --model names (weights.folders.resolve_model): every job finds it first, so a wrong --model
    shows before any input is read or planned. A transformer file $QIMG_TRANSFORMER gives (set once, for one
    model) must be for this folder's kind of model: its weights would silently replace the folder's."""
    from qimg.weights.folders import model_kind, named_kind
    from qimg.weights.folders import resolve_model as resolve

    spec = with_files(spec)
    if spec.model is None and (spec.text_encoder or spec.vae):  # split files, no folder: qimg's shipped configs
        from qimg.weights.shipped import shipped_folder

        missing = [option for option, f in (("--transformer", spec.transformer), ("--text-encoder", spec.text_encoder),
                                            ("--vae", spec.vae)) if f is None]
        if missing:
            raise UsageError(f"without --model, qimg runs from three files: {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing (or pass --model for the other parts)")
        return shipped_folder(spec.transformer)
    folder = resolve(spec.model)
    if spec.transformer_from_env and spec.transformer is not None:
        kind, made_for = model_kind(folder), named_kind(spec.transformer)
        if kind != made_for:
            raise UsageError(f"QIMG_TRANSFORMER={spec.transformer}: its name says it is a {made_for.display} "
                             f"transformer, and {folder} is a {kind.display} model; unset QIMG_TRANSFORMER for "
                             "this model, or give the file as --transformer to use it anyway")
    return folder


def generation_model(folder: Path, command: str) -> None:
    """Refuse an Edit model for a command that needs a Qwen-Image (generation) model, and a Qwen-Image-2.1 one
    for any but generate, before it loads."""
    from qimg.weights.folders import model_kind

    kind = model_kind(folder)
    if not kind.generates:
        raise UsageError(f"{folder} is a {kind.display} model, which edits by instruction: use `qimg edit` "
                         f"(with --mask or --rect to edit a part); `qimg {command}` needs a Qwen-Image model")
    if kind.family == "qwen-image-2.1" and command != "generate":
        raise UsageError(f"`qimg {command}` does not run {kind.display} models yet: use `qimg edit` with --mask or "
                         "--rect to change a part (pixels outside stay byte-identical), or a Qwen-Image model")


def open_engine(folder: Path, spec: ModelSpec, store):
    """The engine for a job: a new one, or in the worker the one the last job left loaded if it computes the
    same numbers (jobs/kept_engine.py), then serving this job's cache."""
    from qimg.engine.components import Loading
    from qimg.engine.devices import DTYPES, pick_devices, pick_dtype
    from qimg.engine.engine import Engine
    from qimg.jobs import kept_engine
    from qimg.weights.folders import model_kind
    from qimg.weights.lora import identity

    spec = with_files(spec)
    if model_kind(folder).family == "qwen-image-2.1":
        from qimg.engine.qwen21 import Engine21 as Engine

    speed = spec.speed()
    device = engine_device(spec)  # what auto means here: the kept engine's key says what it runs on
    if spec.devices:  # the layer split's first device holds the layers around the blocks
        device = pick_devices(spec.devices)[0]
    dtype = next(name for name, d in DTYPES.items() if d == pick_dtype(spec.dtype, device))
    key = {**speed, "loras": identity(spec.loras)} if spec.loras else speed
    group = None
    if spec.parallel is not None:
        from qimg.parallel.group import started

        group = started()
    engine = kept_engine.engine(folder, str(device), dtype, key, lambda: Engine(
        folder, str(device), dtype, store, Loading(loras=spec.loras, parallel=group, **speed)))
    engine.cache = store
    if engine.devices:
        for line in engine.placement.lines():
            say(f"qimg: {line}")
    return engine


def engine_device(spec: ModelSpec):
    """The device --device names; auto under torchrun (--shard auto, --cfg-parallel, --ulysses, --tp) takes GPU
    LOCAL_RANK of the node, and so does cuda under the ranks of one image (jobs/together.py refuses cuda:N)."""
    import torch

    from qimg.engine.devices import pick_device

    device = pick_device(spec.device)
    if spec.device == "auto" or (spec.device == "cuda" and spec.parallel is not None):
        device = torch.device(shard.rank_device(str(device), spec.local_rank, torch.cuda.device_count()))
    return device


def save_output(engine, reporter: Reporter, out: Path, params: Optional[dict], image, latent=None,
                overwrite: bool = False, next_free=None) -> Path:
    """The one way an output is written: atomically (images.save_image; an existing file only with
    `overwrite`; a default numbered name taken meanwhile gives way to `next_free()`), with its parameters
    (metadata.Params' stored ones; None: none), told to the reporter; then `latent` (when it stands for the
    image 1:1) is cached under its pixels. Only PNG keeps those pixels exactly, so only a PNG output's latent can
    be found again. Returns where the image went."""
    from PIL import Image

    from qimg.images import save_image
    from qimg.jobs.metadata import png_text

    out = save_image(Image.fromarray(image), out, png_text(params), overwrite, next_free)  # RGB or RGBA
    reporter.saved(out)
    if out.suffix.lower() == ".png":
        engine.cache_latent(image, latent)
    return out


def output_target(out: Optional[Path], default, numbered: bool):
    """(path, next_free): `out` when given (next_free None: it is the user's name, never changed), else the
    default name, default(numbered) (a jobs.names function), and, when it is numbered, how to find the next
    free one should another run take it first."""
    if out:
        return out, None
    return default(numbered), (functools.partial(default, True) if numbered else None)


def sample_and_save(job, command: str, engine, reporter: Reporter, sampling, sample, target, preview,
                    started: float, fields=lambda result: {}, files: Optional[dict] = None) -> None:
    """The end of every job that makes one output with one sampling run (generate, inpaint, outpaint, edit):
    `sample(callback)` runs the engine (an engine.Result) under the reporter's progress over the steps the
    sampling (engine.request.Sampling) takes; the output's parameters (the command, the sampling's, the result's
    size, the transformer calls, then `fields(result)`, and the `files` it was made from: metadata.output_params)
    are saved with it to target (output_target's (path, next_free)) and reported with the cache use and the last
    --preview; started: when the job began."""
    from qimg.images import flatten
    from qimg.jobs import safety
    from qimg.jobs.metadata import output_params

    callback, done = reporter.steps("generating" if command == "generate" else command, sampling.steps_run)
    calls, counted = engine.calls, kv_counts(engine)
    result = sample(callback)
    done()
    image = flatten(result.image, job.output.background)  # an RGBA result over --background's colour
    image, hit = safety.screen(job.output.safety, image, target[0], preview)  # before anything is written
    height, width = image.shape[:2]
    s, shortcuts = sampling, sampling.shortcuts
    params = output_params(command, engine, job, files=files, prompt=s.prompt, negative_prompt=s.negative_prompt,
                           seed=s.seed, width=width, height=height, steps=s.steps, cfg=s.cfg, reuse=shortcuts.reuse,
                           cfg_until=shortcuts.cfg_until, shift=shortcuts.shift, calls=engine.calls - calls,
                           **kv_report(engine, s, counted), **fields(result))
    params = safety.with_record(params, hit)
    out = save_output(engine, reporter, target[0], params.stored, image, None if hit else result.latent,
                      job.output.overwrite, target[1])
    cache_use = dict(latent_cache=result.latent_cache, prompt_cache=result.prompt_cache)
    reporter.result(out, {**params.report, **cache_use, **last_preview(preview, image, params.stored)}, started)


def kv_counts(engine) -> Optional[tuple[int, int]]:
    """A Qwen-Image-2.1 engine's transformer tokens so far, (computed, read from the prefix cache); None for the
    others, which have no such cache."""
    if engine.kind.family != "qwen-image-2.1":
        return None
    return engine.counts.tokens, engine.counts.cached


def kv_report(engine, sampling, before: Optional[tuple[int, int]]) -> dict:
    """The prefix KV cache's effect on one run, for the metadata and --json: whether it was on, the transformer's
    tokens computed and those read from the cache instead (what the run would have computed more without it)."""
    if before is None:
        return {}
    tokens, cached = kv_counts(engine)
    return {"kv_cache": dict(on=sampling.shortcuts.kv_cache, tokens=tokens - before[0], from_cache=cached - before[1])}


def licence_notice(folder: Path, quiet: bool) -> None:
    """The first run of a model whose licence is not Apache-2.0 (Qwen-Image-2.1's Qwen Research License) prints
    one line naming it, once per model folder: a marker in qimg's state folder remembers it was shown. --quiet and
    QIMG_NO_NOTICE=1 silence it; a marker that cannot be written only means the line shows again."""
    import hashlib
    import os

    from qimg.small_files import state_dir
    from qimg.weights.folders import model_kind

    kind = model_kind(folder)
    if kind.licence not in LICENCES or quiet or os.environ.get("QIMG_NO_NOTICE", "") not in ("", "0"):
        return
    marker = state_dir() / "notices" / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    if marker.exists():
        return
    say(f"qimg: note: {kind.display} is under the {kind.licence} (non-commercial use only): read it at "
        f"{LICENCES[kind.licence]} (shown once per model; --quiet or QIMG_NO_NOTICE=1 hide it)")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{folder}\n")
    except OSError:
        pass


# Licences that are not Apache-2.0, and where to read them.
LICENCES = {"Qwen Research License": "https://huggingface.co/Qwen/Qwen-Image-2.1/blob/main/LICENSE"}


def random_seed(seed: Optional[int]) -> int:
    return secrets.randbelow(2**32) if seed is None else seed


def announce_shard(part, chosen: int, total: int, what: str) -> None:
    """The line that tells the processes' logs apart: which shard this is and how much of the batch it takes."""
    if part is not None:
        say(f"qimg: shard {part}: {chosen} of {total} {what}")
