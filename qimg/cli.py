"""The `qimg` command line: parse, resolve options, call the engine, save, report.

torch and the model code are imported inside the commands, so `qimg --help` stays instant.
"""

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.exceptions import Abort, TyperException

from .errors import QimgError, UsageError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Generate and edit images with Qwen-Image from the shell.",
)

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="QIMG_MODEL", show_envvar=True,
    help="Model folder (diffusers layout) or Hugging Face repo id, e.g. Qwen/Qwen-Image.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on GPUs, float32 on CPU), float32, bfloat16, float16.")]
PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="What to draw (any language).")]
NegativeOpt = Annotated[Optional[str], typer.Option(help="What to steer away from [default: model's, ' '].")]
SizeOpt = Annotated[Optional[str], typer.Option(help="WIDTHxHEIGHT, multiples of 16 [default: model's].")]
StepsOpt = Annotated[Optional[int], typer.Option(min=1, max=1000, help="Sampling steps [default: model's, 50].")]
CfgOpt = Annotated[Optional[float], typer.Option(min=0.0, max=100.0, help="True CFG scale; <= 1 disables guidance.")]
SeedOpt = Annotated[Optional[int], typer.Option(min=0, max=2**63 - 1, help="Random seed [default: random, reported].")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output image (.png, .jpg, .webp).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object describing the result on stdout.")]
ImageArg = Annotated[Path, typer.Argument(help="Input image.", show_default=False)]
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


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", envvar="QIMG_DEBUG", help="Show tracebacks.")] = False):
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


def open_engine(model: Optional[str], device: str, dtype: str, **speed):
    """speed: the Engine's offload, compile, attention and vae_tiling options."""
    from .engine import Engine
    from .weights import resolve_model

    if not model:
        raise UsageError("no model given: pass --model FOLDER|REPO or set QIMG_MODEL")
    return Engine(resolve_model(model), device, dtype, **speed)


def step_progress(total: int, label: str):
    """A rich progress bar on stderr and the sampler callback that advances it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=True,
        disable=not console.is_terminal,
    )
    task = progress.add_task(label, total=total, rate="")
    started = time.perf_counter()

    def callback(i, _x):
        rate = (i + 1) / (time.perf_counter() - started)
        progress.update(task, completed=i + 1, rate=f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")

    return progress, callback


@app.command()
def generate(
    prompt: PromptOpt, negative_prompt: NegativeOpt = None, model: ModelOpt = None, size: SizeOpt = None,
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, out: OutOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", json_: JsonOpt = False, offload: OffloadOpt = "none",
    compile_: CompileOpt = False, attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto",
):
    """Generate an image from a prompt."""
    started = time.perf_counter()
    width, height = parse_size(size) if size else (None, None)
    seed = secrets.randbelow(2**32) if seed is None else seed
    from PIL import Image

    from .files import check_output, default_output, save_image

    out = out or default_output(f"qimg-{seed}")
    check_output(out)
    engine = open_engine(model, device, dtype, offload=offload, compile=compile_, attention=attention,
                         vae_tiling=vae_tiling)
    d = engine.defaults
    width, height = width or d.width, height or d.height
    steps, cfg = steps or d.steps, d.cfg if cfg is None else cfg
    negative_prompt = d.negative_prompt if negative_prompt is None else negative_prompt
    progress, callback = step_progress(steps, "generating")
    with progress:
        image = engine.generate(prompt, negative_prompt, width, height, steps, cfg, seed, callback)
    params = dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed, width=width, height=height,
                  steps=steps, cfg=cfg, model=str(engine.folder))
    save_image(Image.fromarray(image), out, {"qimg": json.dumps(params, ensure_ascii=False)})
    report(out, params, started, json_)


def edit_output(image: Path, out: Optional[Path], kind: str) -> Path:
    """Where an edit goes: --out, or `<stem>.<kind>.png` beside the input; never the input itself."""
    from .files import check_output, default_output

    out = out or default_output(f"{image.stem}.{kind}", image.parent)
    if out.exists() and out.resolve() == image.resolve():
        raise UsageError(f"--out {out} is the input image; choose another file")
    check_output(out)
    return out


def run_edit(kind: str, image: Path, out: Optional[Path], build_mask, model, device, dtype, prompt,
             negative_prompt, steps, cfg, seed, strength, attn_mask, context, as_json, speed: dict):
    """The shared body of inpaint and outpaint: build (canvas, mask) from the input, inpaint, save, report.
    speed: the Engine's offload, compile, attention and vae_tiling options."""
    from PIL import Image

    from .files import load_image, save_image
    from .masks import ensure_not_empty, selected_area

    started = time.perf_counter()
    if strength <= 0:
        raise UsageError(f"--strength {strength}: must be above 0 (1 regenerates from scratch)")
    if attn_mask not in ("on", "off"):
        raise UsageError(f"--attn-mask {attn_mask!r}: expected on or off")
    pixels, picture = load_image(image)
    canvas, mask = build_mask(pixels, picture)
    ensure_not_empty(mask, "the mask")
    seed = secrets.randbelow(2**32) if seed is None else seed
    out = edit_output(image, out, kind)
    engine = open_engine(model, device, dtype, **speed)
    d = engine.defaults
    steps, cfg = steps or d.steps, d.cfg if cfg is None else cfg
    negative_prompt = d.negative_prompt if negative_prompt is None else negative_prompt
    from .sampling import first_step

    progress, callback = step_progress(steps - first_step(steps, strength), kind)
    with progress:
        edit = engine.inpaint(canvas, mask, prompt, negative_prompt, steps, cfg, seed, strength,
                              attn_mask == "on", context, callback)
    height, width = edit.image.shape[:2]
    params = dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed, width=width, height=height,
                  steps=steps, cfg=cfg, strength=strength, attn_mask=attn_mask, input=str(image),
                  mask_area=selected_area(mask), box=list(edit.box), work_size=list(edit.work_size),
                  model=str(engine.folder))
    save_image(Image.fromarray(edit.image), out, {"qimg": json.dumps(params, ensure_ascii=False)})
    report(out, params, started, as_json)


@app.command()
def inpaint(
    image: ImageArg, prompt: PromptOpt,
    mask: Annotated[Optional[Path], typer.Option(help="Mask image: white regenerates, black keeps, grey blends; "
                                                       "transparent pixels regenerate.")] = None,
    rect: Annotated[Optional[list[str]], typer.Option(help="X,Y,W,H in pixels or percent; repeatable (union).")] = None,
    mask_resize: Annotated[bool, typer.Option(help="Stretch a mask of another size to the image.")] = False,
    invert_mask: Annotated[bool, typer.Option(help="Regenerate what the mask keeps and vice versa.")] = False,
    grow: Annotated[int, typer.Option(min=0, help="Dilate the mask by this many pixels.")] = 0,
    feather: FeatherOpt = 0, strength: StrengthOpt = 1.0, attn_mask: AttnMaskOpt = "off",
    context: ContextOpt = 64, negative_prompt: NegativeOpt = None, model: ModelOpt = None, steps: StepsOpt = None,
    cfg: CfgOpt = None, seed: SeedOpt = None, out: OutOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto", json_: JsonOpt = False, offload: OffloadOpt = "none", compile_: CompileOpt = False,
    attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto",
):
    """Regenerate the masked part of an image; every pixel outside the mask stays byte-identical."""
    import numpy as np

    from . import masks

    def build_mask(pixels, picture):
        height, width = pixels.shape[:2]
        parts = [masks.load_mask(mask, (width, height), mask_resize)] if mask else []
        if rect:
            parts.append(masks.rect_mask([masks.parse_rect(r, width, height) for r in rect], width, height))
        if not parts:
            alpha = masks.alpha_mask(picture)
            if alpha is None:
                raise UsageError(f"no mask: give --mask FILE or --rect X,Y,W,H ({image} has no transparent pixels)")
            parts.append(alpha)
        m = np.maximum.reduce(parts)
        m = masks.invert(m) if invert_mask else m
        return pixels, masks.feather(masks.grow(m, grow), feather)

    run_edit("inpaint", image, out, build_mask, model, device, dtype, prompt, negative_prompt, steps, cfg, seed,
             strength, attn_mask, context, json_,
             dict(offload=offload, compile=compile_, attention=attention, vae_tiling=vae_tiling))


@app.command()
def outpaint(
    image: ImageArg, prompt: PromptOpt,
    left: Annotated[int, typer.Option(min=0, help="Pixels to add on the left.")] = 0,
    right: Annotated[int, typer.Option(min=0, help="Pixels to add on the right.")] = 0,
    top: Annotated[int, typer.Option(min=0, help="Pixels to add on top.")] = 0,
    bottom: Annotated[int, typer.Option(min=0, help="Pixels to add at the bottom.")] = 0,
    expand: Annotated[int, typer.Option(min=0, help="Pixels to add on every side not anchored.")] = 0,
    to: Annotated[Optional[str], typer.Option(help="Grow the canvas to WIDTHxHEIGHT.")] = None,
    anchor: Annotated[str, typer.Option(help="Where the original sits: center, left, top-right...")] = "center",
    feather: FeatherOpt = 32, strength: StrengthOpt = 1.0, attn_mask: AttnMaskOpt = "off",
    context: ContextOpt = 64, negative_prompt: NegativeOpt = None, model: ModelOpt = None, steps: StepsOpt = None,
    cfg: CfgOpt = None, seed: SeedOpt = None, out: OutOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto", json_: JsonOpt = False, offload: OffloadOpt = "none", compile_: CompileOpt = False,
    attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto",
):
    """Extend the canvas and fill the new area; the original stays byte-identical in place, except a
    --feather band along the grown sides that is blended so the seam does not show."""
    from . import masks

    def build_mask(pixels, picture):
        height, width = pixels.shape[:2]
        target = parse_size(to, "--to", multiple=1) if to else None
        margins = masks.outpaint_margins((width, height), left, right, top, bottom, expand, target, anchor)
        return masks.outpaint_canvas(pixels, margins, feather)

    run_edit("outpaint", image, out, build_mask, model, device, dtype, prompt, negative_prompt, steps, cfg, seed,
             strength, attn_mask, context, json_,
             dict(offload=offload, compile=compile_, attention=attention, vae_tiling=vae_tiling))


def report(out: Path, params: dict, started: float, as_json: bool) -> None:
    seconds = round(time.perf_counter() - started, 3)
    if as_json:
        print(json.dumps({"output": str(out), **params, "seconds": seconds}, ensure_ascii=False))
    else:
        print(f"{out}  seed {params['seed']}  {params['width']}x{params['height']}  {seconds:.1f} s", file=sys.stderr)


def run(args: list[str]) -> int:
    """Run the CLI and return its exit code; every failure becomes one line on stderr."""
    debug = "--debug" in args or os.environ.get("QIMG_DEBUG", "") not in ("", "0")
    try:
        code = app(args=args, prog_name="qimg", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except TyperException as e:
        if e.format_message():  # empty after no-args help
            print(f"qimg: error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except Abort:
        print("qimg: interrupted", file=sys.stderr)
        return 130
    except QimgError as e:
        if debug:
            raise
        print(f"qimg: error: {e}", file=sys.stderr)
        return e.code
    except Exception as e:
        if debug:
            raise
        print(f"qimg: error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return 1


def main() -> None:
    sys.exit(run(sys.argv[1:]))
