"""The `qimg` command line: parse, resolve options, call the engine, save, report.

torch and the model code are imported inside the commands, so `qimg --help` stays instant.
"""

import functools
import json
import os
import secrets
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException

from . import presets
from .errors import Interrupted, OutputExists, QimgError, QimgWarning, UsageError, failure_line, say, signals_raise
from .worker.commands import app as worker_app

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Generate and edit images with Qwen-Image from the shell.",
)

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="QIMG_MODEL", show_envvar=True,
    help="Model folder (diffusers layout), Hugging Face repo id (Qwen/Qwen-Image), or builtin: the small shapes demo model [default: builtin].")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on GPUs, float32 on CPU), float32, bfloat16, float16.")]


def utf8_text(value: Optional[str]) -> Optional[str]:
    """Refuse text that is not UTF-8 (on POSIX, undecodable argv bytes arrive as surrogates)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise typer.BadParameter(f"byte {e.object[e.start].encode('utf-8', 'surrogateescape')!r} at character "
                                     f"{e.start} is not UTF-8; pass text in UTF-8") from None
    return value


PromptOpt = Annotated[str, typer.Option("--prompt", "-p", callback=utf8_text, help="What to draw (any language).")]
NegativeOpt = Annotated[Optional[str], typer.Option(callback=utf8_text,
                                                    help="What to steer away from [default: model's, ' '].")]
SizeOpt = Annotated[Optional[str], typer.Option(help="WIDTHxHEIGHT, multiples of 16 [default: model's].")]
StepsOpt = Annotated[Optional[int], typer.Option(min=1, max=1000, help="Sampling steps [default: model's, 50].")]
CfgOpt = Annotated[Optional[float], typer.Option(min=0.0, max=100.0, help="True CFG scale; <= 1 disables guidance.")]
SeedOpt = Annotated[Optional[int], typer.Option(min=0, max=2**63 - 1, help="Random seed [default: random, reported].")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output image (.png, .jpg, .webp).")]
OverwriteOpt = Annotated[bool, typer.Option(
    help="Replace existing outputs (--out, the input image included, or the default names), atomically; "
         "without it qimg never replaces a file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object describing the result on stdout.")]
ImageArg = Annotated[Path, typer.Argument(help="Input image.", show_default=False)]
ImagesArg = Annotated[list[Path], typer.Argument(
    help="Input image(s): files, folders (their images, not qimg outputs) or quoted globs.", show_default=False)]
OutDirOpt = Annotated[Optional[Path], typer.Option(help="Folder for the outputs, named <stem>.<command>.png.")]
SkipExistingOpt = Annotated[bool, typer.Option(help="Skip inputs whose <stem>.<command>.png already exists (resume).")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(
    help="Latent and prompt cache folder [default: $QIMG_CACHE_DIR, else the user cache folder].")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache.")]
CacheSizeOpt = Annotated[str, typer.Option(envvar="QIMG_CACHE_SIZE", show_envvar=True,
                                           help="Cache size cap; least recently used entries go first; 0: no cache.")]
StrengthOpt = Annotated[float, typer.Option(min=0.0, max=1.0,
                                            help="How far to re-noise the masked area; 1 = from scratch.")]
AttnMaskOpt = Annotated[str, typer.Option(help="on: kept pixels never attend to the edit (seed's dynamic mask); off.")]
FeatherOpt = Annotated[int, typer.Option(min=0, help="Soft edge width in pixels outside the mask.")]
ContextOpt = Annotated[int, typer.Option(min=0, help="Pixels around the mask the model sees on large images.")]
OffloadOpt = Annotated[str, typer.Option(help="none; model: load text encoder, transformer and VAE one at a time; "
                                              "blocks: stream the transformer's blocks from CPU memory.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the transformer blocks (slow first step).")]
AttentionOpt = Annotated[str, typer.Option(help="Attention backend: auto, math, flash, efficient, cudnn.")]
TilingOpt = Annotated[str, typer.Option(help="Decode the VAE in tiles: auto (images over 4 MP), on, off.")]
PresetOpt = Annotated[Optional[str], typer.Option(
    is_eager=True, callback=presets.apply,
    help="Options from a preset: a bundled name (see `qimg presets`) or a YAML file; flags given here win.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", envvar="QIMG_DEBUG", help="Show tracebacks.")] = False,
          no_worker: Annotated[bool, typer.Option(
              "--no-worker", help="Run in this process even when a worker runs (also QIMG_WORKER=0).")] = False):
    pass


def parse_size(text: str, option: str = "--size", multiple: int = 16) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{option} {text!r} is not WIDTHxHEIGHT, e.g. 1024x768") from None
    for name, v in (("width", w), ("height", h)):
        if v <= 0 or v % multiple:
            raise UsageError(f"{option} {text}: {name} {v} must be a positive multiple of {multiple}")
    return w, h


def open_cache(folder: Optional[Path], off: bool, size: str):
    """The latent and prompt store, or None with --no-cache or --cache-size 0; checked before any work (and
    before torch is imported)."""
    from .cache import Store, default_cache_dir, parse_bytes

    try:
        max_bytes = parse_bytes(size)
    except ValueError as e:
        raise UsageError(f"--cache-size {e}") from None
    if off or max_bytes == 0:
        return None
    return Store(folder or default_cache_dir(), max_bytes, lambda message: say(f"qimg: warning: {message}"))


def speed_options(offload: str, compile_: bool, attention: str, vae_tiling: str) -> dict:
    """The Engine's memory and speed options from the command line's (checked by the Engine)."""
    return dict(offload=offload, compile=compile_, attention=attention, vae_tiling=vae_tiling)


def resolve_model(model: Optional[str]) -> Path:
    """The model folder --model names (weights.resolve_model): every command finds it first, so a wrong
    --model shows before any input is read or planned."""
    from .weights import resolve_model as resolve

    return resolve(model)


def open_engine(folder: Path, device: str, dtype: str, cache=None, speed: Optional[dict] = None):
    """folder: from resolve_model; speed: the Engine's offload, compile, attention and vae_tiling options
    (`speed_options`)."""
    from .engine import Engine
    from .worker import warm

    speed = speed or {}
    engine = warm.engine(folder, device, dtype, speed, lambda: Engine(folder, device, dtype, cache, **speed))
    engine.cache = cache  # a kept engine serves this job's cache
    return engine


def progress_bars():
    """Rich progress bars on stderr, drawn only on a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=True,
        disable=not console.is_terminal,
    )


def step_callback(progress, total: int, label: str):
    """A bar for one sampling run and the sampler callback that advances it: (task id, callback)."""
    task = progress.add_task(label, total=total, rate="")
    started = time.perf_counter()

    def callback(i, _x):
        rate = (i + 1) / (time.perf_counter() - started)
        progress.update(task, completed=i + 1, rate=f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")

    return task, callback


written: list[Path] = []  # files this run has saved, in order: an interrupted run names them


def save_output(engine, out: Path, params: dict, image, latent=None, overwrite: bool = False,
                next_free=None) -> Path:
    """The one way an output is written: atomically (files.save_image; an existing file only with
    `overwrite`; a default numbered name taken meanwhile gives way to `next_free()`), with its parameters
    (metadata.py), recorded in `written` for the interrupted message; then `latent` (when it stands for the
    image 1:1) is cached under its pixels. Only PNG keeps those pixels exactly, so only a PNG output's
    latent can be found again. Returns where the image went."""
    from PIL import Image

    from .files import save_image
    from .metadata import png_text

    out = save_image(Image.fromarray(image), out, png_text(params), overwrite, next_free)
    written.append(out)
    if out.suffix.lower() == ".png":
        engine.cache_latent(image, latent)
    return out


def default_name(stem: str, folder: Path, numbered: bool):
    """A default output name (files.default_output) and, when it is numbered, how to find the next free one
    should another run take it first; else None."""
    from .files import default_output

    return default_output(stem, folder, numbered), (functools.partial(default_output, stem, folder) if numbered
                                                    else None)


@app.command()
def generate(
    prompt: PromptOpt, negative_prompt: NegativeOpt = None, model: ModelOpt = None, size: SizeOpt = None,
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, out: OutOpt = None,
    overwrite: OverwriteOpt = False, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", json_: JsonOpt = False,
    cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False, cache_size: CacheSizeOpt = "2GB",
    preset: PresetOpt = None,
    offload: OffloadOpt = "none", compile_: CompileOpt = False, attention: AttentionOpt = "auto",
    vae_tiling: TilingOpt = "auto",
):
    """Generate an image from a prompt."""
    started = time.perf_counter()
    folder = resolve_model(model)
    width, height = parse_size(size) if size else (None, None)
    seed = secrets.randbelow(2**32) if seed is None else seed
    from .files import check_format_size, check_output
    from .metadata import output_params

    out, next_free = (out, None) if out else default_name(f"qimg-{seed}", Path("."), not overwrite)
    check_output(out, overwrite, size=(width, height) if width else None)
    engine = open_engine(folder, device, dtype, open_cache(cache_dir, no_cache, cache_size),
                         speed_options(offload, compile_, attention, vae_tiling))
    d = engine.defaults
    width, height = width or d.width, height or d.height
    check_format_size(out, (width, height))
    steps, cfg = steps or d.steps, d.cfg if cfg is None else cfg
    negative_prompt = d.negative_prompt if negative_prompt is None else negative_prompt
    with progress_bars() as progress:
        _, callback = step_callback(progress, steps, "generating")
        result = engine.generate(prompt, negative_prompt, width, height, steps, cfg, seed, callback)
    params = output_params("generate", engine, preset, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                           width=width, height=height, steps=steps, cfg=cfg)
    out = save_output(engine, out, params, result.image, result.latent, overwrite, next_free)
    report(out, {**params, **cache_use(result)}, started, json_)


def cache_use(result) -> dict:
    return dict(latent_cache=result.latent_cache, prompt_cache=result.prompt_cache)


def edit_output(image: Path, out: Optional[Path], out_dir: Optional[Path], kind: str, overwrite: bool,
                batch: bool = False, inputs=(), read_only=(), size=None):
    """Where an edit goes, checked by files.check_output (`size`: the result's, if known), and the
    `next_free` for save_output: --out, or `<stem>.<kind>.png` in --out-dir or beside the input. A single
    run numbers that name (`-2`, `-3`...) when it is taken; a batch, or --overwrite, keeps it. An existing
    file (the input among them) is replaced only with --overwrite; `read_only` ones never."""
    from .files import check_output

    target, next_free = (out, None) if out else default_name(f"{image.stem}.{kind}", out_dir or image.parent,
                                                             not (batch or overwrite))
    check_output(target, overwrite, (image, *inputs), read_only, "--out" if out else "output", size)
    return target, next_free


def check_edit(strength: float, attn_mask: str) -> None:
    if strength <= 0:
        raise UsageError(f"--strength {strength}: must be above 0 (1 regenerates from scratch)")
    if attn_mask not in ("on", "off"):
        raise UsageError(f"--attn-mask {attn_mask!r}: expected on or off")


def inpaint_mask(size, picture, image: Path, mask, rect, mask_resize, invert_mask, grow, feather):
    """The final inpaint mask on an image of size (W, H) from the options: --mask and --rect (union), else the
    input's transparency (`picture`, None when there is none to use); then invert, grow, feather."""
    import numpy as np

    from . import masks

    width, height = size
    parts = [masks.load_mask(mask, (width, height), mask_resize)] if mask else []
    if rect:
        parts.append(masks.rect_mask([masks.parse_rect(r, width, height) for r in rect], width, height))
    if not parts:
        alpha = masks.alpha_mask(picture) if picture is not None else None
        if alpha is None:
            raise UsageError(f"no mask: give --mask FILE or --rect X,Y,W,H ({image} has no transparent pixels)")
        parts.append(alpha)
    m = parts[0] if len(parts) == 1 else np.maximum.reduce(parts)
    # One step at a time, each dropping the last: a 4000x4000 mask is 64 MB, and a chain builds one per edit.
    m = masks.invert(m) if invert_mask else m
    m = masks.grow(m, grow) if grow else m
    return masks.feather(m, feather) if feather else m


def outpaint_margins(size, left, right, top, bottom, expand, to, anchor) -> tuple[int, int, int, int]:
    from . import masks

    target = parse_size(to, "--to", multiple=1) if to else None
    return masks.outpaint_margins(size, left, right, top, bottom, expand, target, anchor)


def run_edit(kind: str, images: list[Path], build_mask, out: Optional[Path], out_dir: Optional[Path],
             skip_existing: bool, overwrite: bool, seed: Optional[int], sampling: dict, preset: Optional[str],
             open_model, as_json: bool, reads=lambda image: ()):
    """The shared body of inpaint and outpaint: for each input build (canvas, mask), inpaint, save, report.
    `reads(image)`: the other files an input's edit reads (its mask), which no output may replace.

    One input file runs as a plain command: its errors end the run. In a batch the outputs have fixed names,
    and if any exists already the batch is refused before anything runs, unless --skip-existing (skip them)
    or --overwrite (replace them). A bad input, or an output that appears while the batch runs, is reported
    and skipped, the others complete, and the run ends with a summary and exit 1; a failure of the model or
    of a write still ends it at once. The model loads once, for the first input that needs it."""
    from .batch import (check_distinct_outputs, check_outputs_free, check_reads_kept, expand_inputs, file_seed,
                        output_name)

    check_edit(sampling["strength"], sampling["attn_mask"])
    if skip_existing and overwrite:
        raise UsageError("give --skip-existing or --overwrite, not both")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is a file; give a folder")
    files, batch = expand_inputs(images)
    if batch and out:
        raise UsageError(f"--out names one file but {len(files)} inputs were given; use --out-dir")
    check_distinct_outputs(files, kind, out_dir)
    if batch:
        check_reads_kept(files, kind, out_dir, reads)
    if batch and not (skip_existing or overwrite):
        check_outputs_free(files, kind, out_dir)
    engine = functools.cache(open_model)
    failed = []
    with progress_bars() as progress:
        files_task = progress.add_task("images", total=len(files), rate="") if batch else None
        for image in files:
            started, done = time.perf_counter(), out or output_name(image, kind, out_dir)
            if skip_existing and os.path.lexists(done):  # a dangling symlink exists too
                report_skip(image, done, as_json)
            else:
                failure = None
                try:
                    canvas, mask = prepare_edit(image, build_mask)
                    target = edit_output(image, out, out_dir, kind, overwrite, batch, files, reads(image),
                                         canvas.shape[1::-1])
                except QimgError as e:
                    failure = e
                else:
                    this_seed = file_seed(seed, image) if batch and seed is not None else seed
                    try:
                        edit_one(kind, image, canvas, mask, target, this_seed, sampling, preset, engine(), progress,
                                 started, as_json, overwrite)
                    except OutputExists as e:
                        failure = e
                if failure is not None:
                    if not batch:
                        raise failure
                    failed.append(image)
                    report_failure(image, failure, as_json)
            if files_task is not None:
                progress.advance(files_task)
    if failed:
        raise QimgError(f"{len(failed)} of {len(files)} images failed: {', '.join(map(str, failed))}")


def prepare_edit(image: Path, build_mask):
    """Read an input and build its (canvas, mask): every problem with the file shows here, before the model."""
    from .files import load_image
    from .masks import ensure_not_empty

    pixels, picture = load_image(image)
    canvas, mask = build_mask(image, pixels, picture)
    ensure_not_empty(mask, "the mask")
    return canvas, mask


def edit_one(kind, image, canvas, mask, target, seed, sampling, preset, engine, progress, started, as_json, overwrite):
    """target: edit_output's (path, next_free)."""
    from .cache import array_hash
    from .masks import selected_area
    from .metadata import output_params
    from .sampling import first_step

    seed = secrets.randbelow(2**32) if seed is None else seed
    d = engine.defaults
    steps = sampling["steps"] or d.steps
    cfg = d.cfg if sampling["cfg"] is None else sampling["cfg"]
    negative = d.negative_prompt if sampling["negative_prompt"] is None else sampling["negative_prompt"]
    task, callback = step_callback(progress, steps - first_step(steps, sampling["strength"]), kind)
    edit = engine.inpaint(canvas, mask, sampling["prompt"], negative, steps, cfg, seed, sampling["strength"],
                          sampling["attn_mask"] == "on", sampling["context"], callback)
    progress.remove_task(task)
    height, width = edit.image.shape[:2]
    params = output_params(kind, engine, preset, prompt=sampling["prompt"], negative_prompt=negative, seed=seed,
                           width=width, height=height, steps=steps, cfg=cfg, strength=sampling["strength"],
                           attn_mask=sampling["attn_mask"], context=sampling["context"], input=str(image),
                           mask_area=selected_area(mask), mask_sha256=array_hash(mask), box=list(edit.box),
                           work_size=list(edit.work_size), latent_cache=edit.latent_cache)
    out = save_output(engine, target[0], params, edit.image, edit.latent, overwrite, target[1])
    report(out, {**params, **cache_use(edit)}, started, as_json)


def report_skip(image: Path, out: Path, as_json: bool) -> None:
    if as_json:
        print_result(json_line({"input": str(image), "output": str(out), "skipped": True}))
    else:
        say(f"{out}  exists, skipped")


def report_failure(image: Path, error: QimgError, as_json: bool) -> None:
    message = str(error) if str(image) in str(error) else f"{image}: {error}"
    if as_json:
        print_result(json_line({"input": str(image), "error": message}))
    say(f"qimg: error: {message}")


def json_line(obj) -> str:
    """One line of JSON for stdout: non-ASCII kept where stdout can encode it, else escaped (LANG=C, a lone
    surrogate), so the line is valid JSON either way."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode(sys.stdout.encoding or "utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj)
    return text


def print_result(text: str) -> None:
    """Results go to stdout. If its reader has gone (`qimg ... --json | head -n1`), the rest are dropped
    and the run goes on: every output is still written, and errors and the summary still go to stderr."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # so later prints and the flush at exit go nowhere
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@app.command()
def inpaint(
    images: ImagesArg, prompt: PromptOpt,
    mask: Annotated[Optional[Path], typer.Option(help="Mask image: white regenerates, black keeps, grey blends; "
                                                       "transparent pixels regenerate.")] = None,
    mask_dir: Annotated[Optional[Path], typer.Option(help="Masks for a batch: <stem>.png or <stem>_mask.png.")] = None,
    rect: Annotated[Optional[list[str]], typer.Option(help="X,Y,W,H in pixels or percent; repeatable (union).")] = None,
    mask_resize: Annotated[bool, typer.Option(help="Stretch a mask of another size to the image.")] = False,
    invert_mask: Annotated[bool, typer.Option(help="Regenerate what the mask keeps and vice versa.")] = False,
    grow: Annotated[int, typer.Option(min=0, help="Dilate the mask by this many pixels.")] = 0,
    feather: FeatherOpt = 0, strength: StrengthOpt = 1.0, attn_mask: AttnMaskOpt = "off",
    context: ContextOpt = 64, negative_prompt: NegativeOpt = None, model: ModelOpt = None, steps: StepsOpt = None,
    cfg: CfgOpt = None, seed: SeedOpt = None, out: OutOpt = None, out_dir: OutDirOpt = None,
    skip_existing: SkipExistingOpt = False, overwrite: OverwriteOpt = False, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto", json_: JsonOpt = False, cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False,
    cache_size: CacheSizeOpt = "2GB", preset: PresetOpt = None,
    offload: OffloadOpt = "none", compile_: CompileOpt = False, attention: AttentionOpt = "auto",
    vae_tiling: TilingOpt = "auto",
):
    """Regenerate the masked part of an image; every pixel outside the mask stays byte-identical."""
    from .batch import mask_for

    if mask and mask_dir:
        raise UsageError("give --mask or --mask-dir, not both")

    def mask_file(image):
        return mask or (mask_dir and mask_for(mask_dir, image))

    def build_mask(image, pixels, picture):
        return pixels, inpaint_mask(pixels.shape[1::-1], picture, image, mask_file(image), rect, mask_resize,
                                    invert_mask, grow, feather)

    folder = resolve_model(model)
    store = open_cache(cache_dir, no_cache, cache_size)
    speed = speed_options(offload, compile_, attention, vae_tiling)
    run_edit("inpaint", images, build_mask, out, out_dir, skip_existing, overwrite, seed,
             edit_sampling(prompt, negative_prompt, steps, cfg, strength, attn_mask, context), preset,
             lambda: open_engine(folder, device, dtype, store, speed), json_, lambda image: (mask_file(image),))


def edit_sampling(prompt, negative_prompt, steps, cfg, strength, attn_mask, context) -> dict:
    return dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg=cfg, strength=strength,
                attn_mask=attn_mask, context=context)


@app.command()
def outpaint(
    images: ImagesArg, prompt: PromptOpt,
    left: Annotated[int, typer.Option(min=0, help="Pixels to add on the left.")] = 0,
    right: Annotated[int, typer.Option(min=0, help="Pixels to add on the right.")] = 0,
    top: Annotated[int, typer.Option(min=0, help="Pixels to add on top.")] = 0,
    bottom: Annotated[int, typer.Option(min=0, help="Pixels to add at the bottom.")] = 0,
    expand: Annotated[int, typer.Option(min=0, help="Pixels to add on every side not anchored.")] = 0,
    to: Annotated[Optional[str], typer.Option(help="Grow the canvas to WIDTHxHEIGHT.")] = None,
    anchor: Annotated[str, typer.Option(help="Where the original sits: center, left, top-right...")] = "center",
    feather: FeatherOpt = 32, strength: StrengthOpt = 1.0, attn_mask: AttnMaskOpt = "off",
    context: ContextOpt = 64, negative_prompt: NegativeOpt = None, model: ModelOpt = None, steps: StepsOpt = None,
    cfg: CfgOpt = None, seed: SeedOpt = None, out: OutOpt = None, out_dir: OutDirOpt = None,
    skip_existing: SkipExistingOpt = False, overwrite: OverwriteOpt = False, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto", json_: JsonOpt = False, cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False,
    cache_size: CacheSizeOpt = "2GB", preset: PresetOpt = None,
    offload: OffloadOpt = "none", compile_: CompileOpt = False, attention: AttentionOpt = "auto",
    vae_tiling: TilingOpt = "auto",
):
    """Extend the canvas and fill the new area; the original stays byte-identical in place, except a
    --feather band along the grown sides that is blended so the seam does not show."""
    from . import masks

    def build_mask(_image, pixels, picture):
        size = pixels.shape[1::-1]
        return masks.outpaint_canvas(pixels, outpaint_margins(size, left, right, top, bottom, expand, to, anchor),
                                     feather)

    folder = resolve_model(model)
    store = open_cache(cache_dir, no_cache, cache_size)
    speed = speed_options(offload, compile_, attention, vae_tiling)
    run_edit("outpaint", images, build_mask, out, out_dir, skip_existing, overwrite, seed,
             edit_sampling(prompt, negative_prompt, steps, cfg, strength, attn_mask, context), preset,
             lambda: open_engine(folder, device, dtype, store, speed), json_)


@app.command()
def chain(
    ctx: typer.Context, image: ImageArg,
    chain_file: Annotated[Path, typer.Argument(help="YAML file: optional defaults, then `edits:`, a list of "
                                                    "{inpaint: {...}} / {outpaint: {...}}.", show_default=False)],
    out: OutOpt = None,
    keep_steps: Annotated[Optional[Path], typer.Option(
        help="Folder to write each edit's image to, as <stem>.<NN>-<kind>.png.")] = None,
    overwrite: OverwriteOpt = False,
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, model: ModelOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False, cache_size: CacheSizeOpt = "2GB", json_: JsonOpt = False,
    preset: PresetOpt = None, offload: OffloadOpt = "none", compile_: CompileOpt = False,
    attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto",
):
    """Run a list of inpaint/outpaint edits in one process, the latent carried in memory between them.

    --steps, --cfg and --seed (given here or by a preset) apply to every edit and win over the file's values;
    an edit with no seed anywhere takes one random seed, reported. Each edit's result is cached (with the
    prompt embeddings, as the other commands cache theirs), so a re-run recomputes from the first changed edit."""
    from . import chain as chains
    from .files import check_output, load_image
    from .metadata import output_params

    started = time.perf_counter()
    folder = resolve_model(model)
    store = open_cache(cache_dir, no_cache, cache_size)
    given = {k: v for k, v in (("steps", steps), ("cfg", cfg), ("seed", seed)) if v is not None}
    edits = chains.read_chain(ctx, chain_file, given)
    pixels, picture = load_image(image)
    planned = chains.plan(edits, pixels.shape[1::-1], picture)
    seed = secrets.randbelow(2**32) if seed is None else seed
    reads = chains.files_read(chain_file, edits)  # never written, --overwrite or not
    sizes = {p.step.index: p.size for p in planned}  # each edit's result, (width, height)
    out, next_free = edit_output(image, out, None, "chain", overwrite, read_only=reads, size=sizes[edits[-1].index])
    step_files = chains.step_files(image, edits, keep_steps) if keep_steps is not None else {}
    for index, step_file in step_files.items():
        check_output(step_file, overwrite, (image,), reads, "--keep-steps file", sizes[index])
        if step_file.resolve() == out.resolve():
            raise UsageError(f"--out {out} is also a --keep-steps file; choose another name")
    engine = open_engine(folder, device, dtype, store, speed_options(offload, compile_, attention, vae_tiling))

    def params(canvas, lineage: list) -> dict:
        width, height = canvas.size
        seeds = sorted({entry["seed"] for entry in lineage})  # those the edits used
        return output_params("chain", engine, preset, lineage, input=str(image), chain=str(chain_file),
                             seed=seeds[0] if len(seeds) == 1 else seeds, width=width, height=height)

    lineage = []
    for done, canvas, entry in chains.run(engine, planned, pixels, picture, seed):
        lineage.append(entry)
        if done.step.index in step_files:
            save_output(engine, step_files[done.step.index], params(canvas, lineage), engine.render(canvas),
                        overwrite=overwrite)
    final = params(canvas, lineage)
    out = save_output(engine, out, final, engine.render(canvas), overwrite=overwrite, next_free=next_free)
    report(out, final, started, json_)


app.add_typer(worker_app, name="worker")


@app.command("presets")
def list_presets(ctx: typer.Context):
    """List the bundled presets: the commands each fits, its file and its contents."""
    for name, path in presets.bundled().items():
        fits = presets.fitting_commands(ctx.parent.command, presets.read_yaml(path, "preset"))
        print_result(f"{name}  ({', '.join(fits) or 'no command'})  {path}")
        print_result("".join(f"    {line}\n" for line in path.read_text().splitlines()))


@app.command()
def info(
    image: Annotated[Path, typer.Argument(help="An image qimg wrote.", show_default=False)], json_: JsonOpt = False,
):
    """Print the parameters that made an image (stored in its PNG text chunk)."""
    from .metadata import describe, read_params

    params = read_params(image)
    print_result(json_line(params) if json_ else describe(params))


def report(out: Path, params: dict, started: float, as_json: bool) -> None:
    seconds = round(time.perf_counter() - started, 3)
    if as_json:
        print_result(json_line({"output": str(out), **params, "seconds": seconds}))
    else:
        say(f"{out}  seed {params['seed']}  {params['width']}x{params['height']}  {seconds:.1f} s")


def run(args: list[str]) -> int:
    """Run the CLI and return its exit code; every failure becomes one line on stderr."""
    debug = "--debug" in args or os.environ.get("QIMG_DEBUG", "") not in ("", "0")
    written.clear()
    try:
        with signals_raise(), warnings_as_lines():
            code = app(args=args, prog_name="qimg", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except TyperException as e:
        if e.format_message():  # empty after no-args help
            say(f"qimg: error: {e.format_message()}")
        return e.exit_code
    except Interrupted as e:
        done = "; nothing written" if not written else f" after writing {written[-1]}" + (
            f" and {len(written) - 1} more" if len(written) > 1 else "")
        say(f"qimg: {e.what}{done}")
        return e.code
    except QimgError as e:
        if debug:
            raise
        say(f"qimg: error: {e}")
        return e.code
    except Exception as e:
        if debug:
            raise
        say(f"qimg: error: {failure_line(e)}")
        return 1


@contextmanager
def warnings_as_lines():
    """Show qimg's warnings as `qimg: warning: ...` lines on stderr, every time; leave others alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", QimgWarning)
        show = warnings.showwarning

        def show_line(message, category, *args, **kwargs):
            if issubclass(category, QimgWarning):
                say(f"qimg: warning: {message}")
            else:
                show(message, category, *args, **kwargs)

        warnings.showwarning = show_line
        yield
