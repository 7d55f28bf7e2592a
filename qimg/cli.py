"""The `qimg` command line: declare the options, parse them into a job (jobs.py), hand it to the runner.

Nothing here loads a model or writes a file; torch is imported only by the runner, so `qimg --help` stays
instant. `run` is the one place errors become a line on stderr and an exit code.
"""

import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from typer.exceptions import TyperException

from . import cache_commands, jobs, presets
from .errors import Interrupted, QimgError, QimgWarning, UsageError, failure_line, say, signals_raise
from .report import Reporter, json_line, print_result
from .worker.commands import app as worker_app

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Generate and edit images with Qwen-Image from the shell.",
)

PROMPT, MASK, SAMPLING, MODEL, OUTPUT, CACHE, SPEED, SCALE = (
    "Prompt", "Mask", "Sampling", "Model and device", "Output", "Cache", "Speed", "Many GPUs, many machines")


def utf8_text(value: Optional[str]) -> Optional[str]:
    """Refuse text that is not UTF-8 (on POSIX, undecodable argv bytes arrive as surrogates)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise typer.BadParameter(f"byte {e.object[e.start].encode('utf-8', 'surrogateescape')!r} at character "
                                     f"{e.start} is not UTF-8; pass text in UTF-8") from None
    return value


def device_name(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return value


def size_value(value: Optional[str]) -> Optional[str]:
    if value is not None:
        from .edits import parse_size

        parse_size(value)  # a UsageError names --size
    return value


# --- Options, shared by the commands -----------------------------------------------------------------------

PromptOpt = Annotated[str, typer.Option("--prompt", "-p", callback=utf8_text, rich_help_panel=PROMPT,
                                        help="What to draw (any language).")]
NegativeOpt = Annotated[Optional[str], typer.Option(callback=utf8_text, rich_help_panel=PROMPT,
                                                    show_default="the model's, ' '", help="What to steer away from.")]
SizeOpt = Annotated[Optional[str], typer.Option(callback=size_value, rich_help_panel=SAMPLING,
                                                show_default="the model's", help="WIDTHxHEIGHT, multiples of 16.")]
StepsOpt = Annotated[Optional[int], typer.Option(min=1, max=1000, rich_help_panel=SAMPLING,
                                                 show_default="the model's, 50", help="Sampling steps.")]
CfgOpt = Annotated[Optional[float], typer.Option(min=0.0, max=100.0, rich_help_panel=SAMPLING,
                                                 help="True CFG scale; 1 or less turns guidance off.")]
SeedOpt = Annotated[Optional[int], typer.Option(min=0, max=2**63 - 1, rich_help_panel=SAMPLING,
                                                show_default="random, reported", help="Random seed.")]
StrengthOpt = Annotated[float, typer.Option(min=0.0, max=1.0, rich_help_panel=SAMPLING,
                                            help="How far to re-noise the masked area; 1 = from scratch.")]
AttnMaskOpt = Annotated[Literal["on", "off"], typer.Option(
    rich_help_panel=SAMPLING, help="on: kept pixels never attend to the edited area or the text; off: they do.")]
PIXELS = 2**31 - 1  # the largest pixel count an option takes: far past any image; huge numbers never reach the math
ContextOpt = Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=SAMPLING,
                                         help="Pixels around the mask the model sees on large images.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="QIMG_MODEL", show_envvar=True, rich_help_panel=MODEL,
    show_default="builtin", help="Model folder (diffusers layout), Hugging Face repo id (Qwen/Qwen-Image), or "
                                 "builtin: the small shapes model.")]
DeviceOpt = Annotated[str, typer.Option(callback=device_name, rich_help_panel=MODEL,
                                        help="Where to run: auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[Literal["auto", "float32", "bfloat16", "float16"], typer.Option(
    rich_help_panel=MODEL, help="Number format; auto: bfloat16 on GPUs, float32 on CPU.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", rich_help_panel=OUTPUT,
                                                help="Output image (.png, .jpg, .webp).")]
OverwriteOpt = Annotated[bool, typer.Option(
    rich_help_panel=OUTPUT, help="Replace existing outputs (--out, the input image included, or the default "
                                 "names), atomically; without it qimg never replaces a file.")]
JsonOpt = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT,
                                       help="Print one JSON object per result on stdout.")]
OutDirOpt = Annotated[Optional[Path], typer.Option(rich_help_panel=OUTPUT,
                                                   help="Folder for the outputs, named <stem>.<command>.png.")]
SkipExistingOpt = Annotated[bool, typer.Option(rich_help_panel=OUTPUT,
                                               help="Skip inputs whose <stem>.<command>.png exists (resume).")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(
    rich_help_panel=CACHE, show_default="$QIMG_CACHE_DIR, else the user cache folder",
    help="Latent and prompt cache folder.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", rich_help_panel=CACHE, help="Neither read nor write the cache.")]
CacheSizeOpt = Annotated[str, typer.Option(envvar="QIMG_CACHE_SIZE", show_envvar=True, rich_help_panel=CACHE,
                                           help="Cache size cap; least recently used entries go first; 0: no cache.")]
OffloadOpt = Annotated[Literal["none", "model", "blocks"], typer.Option(
    rich_help_panel=SPEED, help="none; model: load text encoder, transformer and VAE one at a time; blocks: "
                                "stream the transformer's blocks from CPU memory.")]
CompileOpt = Annotated[bool, typer.Option("--compile", rich_help_panel=SPEED,
                                          help="torch.compile the transformer blocks (slow first step).")]
AttentionOpt = Annotated[Literal["auto", "math", "flash", "efficient", "cudnn"], typer.Option(
    rich_help_panel=SPEED, help="Attention kernel; auto: PyTorch picks.")]
TilingOpt = Annotated[Literal["auto", "on", "off"], typer.Option(
    rich_help_panel=SPEED, help="Decode the VAE in tiles; auto: images over 4 megapixels.")]
PresetOpt = Annotated[Optional[str], typer.Option(
    is_eager=True, callback=presets.apply, rich_help_panel=SAMPLING,
    help="Options from a preset: a bundled name (see `qimg presets`) or a YAML file; flags given here win.")]
ImagesArg = Annotated[list[Path], typer.Argument(
    help="Input image(s): files, folders (their images, not qimg outputs) or quoted globs.", show_default=False)]
ReuseOpt = Annotated[Optional[float], typer.Option(
    min=0.0, max=1.0, rich_help_panel=SPEED, show_default="0: off",
    help="Reuse the last velocity while the model's output is estimated to change less than this (0.05-0.2 "
         "trade a little fidelity for 25-55% fewer transformer calls).")]
CfgUntilOpt = Annotated[Optional[float], typer.Option(
    min=0.0, max=1.0, rich_help_panel=SPEED, show_default="1: every step",
    help="True CFG only for this first fraction of the steps, the conditional pass alone after.")]
PreviewOpt = Annotated[Optional[Path], typer.Option(
    rich_help_panel=OUTPUT, help="Write the current estimate of the image to this file as it renders, replaced "
                                 "atomically, the last time by the result; for a batch, a folder (one file each).")]
PreviewEveryOpt = Annotated[Optional[int], typer.Option(
    min=1, max=1000, rich_help_panel=OUTPUT, show_default="about a tenth of the steps",
    help="Steps between --preview writes.")]
LoraOpt = Annotated[Optional[list[str]], typer.Option(
    "--lora", rich_help_panel=MODEL, show_default=False,
    help="A LoRA (or LoKr, LoHa) .safetensors file, FILE or FILE:SCALE (scale 1 by default); repeatable, they "
         "add up.")]
ShiftOpt = Annotated[Optional[float], typer.Option(
    min=0.001, max=1000.0, rich_help_panel=SAMPLING, show_default="the model's schedule",
    help="A constant flow shift instead of the model's schedule: 3 for the Lightning LoRAs.")]
TransformerOpt = Annotated[Optional[Path], typer.Option(
    envvar="QIMG_TRANSFORMER", show_envvar=True, rich_help_panel=MODEL, show_default="the model folder's",
    help="The transformer's weights from one file: .gguf (Q8_0, Q4_K_M, ...) or .safetensors (bf16, fp8, ComfyUI "
         "scaled fp8); everything else comes from --model.")]
DequantizeOpt = Annotated[Optional[bool], typer.Option(
    "--dequantize/--no-dequantize", rich_help_panel=MODEL, show_default="on the CPU only",
    help="Unpack GGUF/fp8 weights once at load (full size) instead of on every step (they stay small).")]
QuantizeOpt = Annotated[Literal["none", "fp8"], typer.Option(
    rich_help_panel=MODEL, help="fp8: keep the transformer's block weights as scaled fp8, about half of bf16's memory.")]
NoWorkerOpt = Annotated[bool, typer.Option(
    "--no-worker", rich_help_panel=MODEL, help="Run in this process even when a worker runs (also QIMG_WORKER=0).")]
FeatherOpt = Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK,
                                         help="Soft edge width in pixels outside the mask.")]
ShardOpt = Annotated[Optional[str], typer.Option(
    rich_help_panel=SCALE, show_default="all", help="I/N: only the batch's inputs whose name hashes to shard I of N "
    "(from 0); auto: from RANK/WORLD_SIZE (torchrun) or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT.")]
RayOpt = Annotated[Optional[str], typer.Option(
    rich_help_panel=SCALE, metavar="ADDRESS", help="Spread the batch over Ray actors (pip install 'qimg\\[ray]'): "
    "local (a cluster started for the run), auto ($RAY_ADDRESS or the running one) or the cluster's address.")]
RayWorkersOpt = Annotated[Optional[int], typer.Option(
    min=1, max=100_000, rich_help_panel=SCALE, show_default="one per GPU of the cluster",
    help="With --ray: this many actors, one CPU each.")]
RetriesOpt = Annotated[int, typer.Option(
    min=0, max=100, rich_help_panel=SCALE,
    help="With --ray: run a file whose actor failed or was lost again on another, this many times.")]
Anchor = Literal["center", "left", "right", "top", "bottom", "top-left", "top-right", "bottom-left", "bottom-right"]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", envvar="QIMG_DEBUG", help="Show tracebacks.")] = False,
          no_worker: Annotated[bool, typer.Option(
              "--no-worker", help="Run in this process even when a worker runs (also QIMG_WORKER=0).")] = False):
    pass


# The parts of a job every model command declares alike, from the command's parameters (its `locals()`).


def model_of(p: dict, part=None) -> jobs.ModelSpec:
    """part: the --shard, whose torchrun LOCAL_RANK picks the GPU under --device auto."""
    from .lora import parse_spec

    return jobs.ModelSpec(p["model"], p["device"], p["dtype"], p["offload"], p["compile_"], p["attention"],
                          p["vae_tiling"], tuple(parse_spec(text) for text in p["lora"] or ()), p["transformer"],
                          p["dequantize"], p["quantize"], part.local_rank if part is not None else None)


def cache_of(p: dict) -> jobs.CacheSpec:
    return jobs.CacheSpec(p["cache_dir"], p["no_cache"], p["cache_size"])


def output_of(p: dict) -> jobs.Output:
    return jobs.Output(p["out"], p["overwrite"], p["json_"], p["preview"], preview_every(p))


def preview_every(p: dict) -> Optional[int]:
    """--preview-every; on the command line only with --preview (a preset's applies when a run previews)."""
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context

    given = get_current_context().get_parameter_source("preview_every") is ParameterSource.COMMANDLINE
    if given and p["preview"] is None:
        raise UsageError(f"--preview-every {p['preview_every']} needs --preview FILE, the file to write them to")
    return p["preview_every"]


def shortcuts_of(p: dict) -> tuple[float, float, Optional[float]]:
    """--reuse, --cfg-until and --shift, off when not given (None: so a chain's command line overrides only what
    it gives)."""
    return 0.0 if p["reuse"] is None else p["reuse"], 1.0 if p["cfg_until"] is None else p["cfg_until"], p["shift"]


def edit_job(shape, p: dict) -> jobs.Edit:
    """inpaint's and outpaint's job: the mask's options in `shape`, the rest from the command's parameters."""
    part = shard_of(p)
    return jobs.Edit(tuple(p["images"]), shape, jobs.Prompt(p["prompt"], p["negative_prompt"], p["steps"], p["cfg"],
                                                            p["seed"], *shortcuts_of(p)),
                     p["strength"], p["attn_mask"], p["context"], output_of(p), p["out_dir"], p["skip_existing"],
                     model_of(p, part), cache_of(p), p["preset"], part)


def shard_of(p: dict):
    """--shard as a shard.Shard (None: the whole batch)."""
    from . import shard

    return shard.parse(p["shard"]) if p["shard"] is not None else None


def ray_of(p: dict) -> Optional[jobs.RaySpec]:
    """--ray, --ray-workers and --retries as a jobs.RaySpec (None: no Ray)."""
    if p["ray"] is None:
        for name in ("ray_workers", "retries"):
            if p[name] != {"ray_workers": None, "retries": 2}[name]:
                raise UsageError(f"--{name.replace('_', '-')} goes with --ray ADDRESS")
        return None
    return jobs.RaySpec(p["ray"], p["ray_workers"], p["retries"])


def execute(job: jobs.Job, as_json: bool, ray: Optional[jobs.RaySpec] = None) -> None:
    from . import runner

    with Reporter(as_json) as reporter:
        try:
            if ray is not None:
                from . import ray_runner

                ray_runner.execute(job, ray, reporter)
            else:
                runner.execute(job, reporter)
        except Interrupted as e:
            e.written = reporter.written  # the stop's message names what was finished
            raise


# --- Commands ----------------------------------------------------------------------------------------------


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", callback=utf8_text, rich_help_panel=PROMPT, show_default=False,
        help="What to draw (any language); or --prompts.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(
        rich_help_panel=PROMPT, help="A batch: one prompt per line, or a .jsonl/.yaml list of prompts or of "
        "{prompt, seed, size, negative_prompt}; writes <out-dir>/<n>-<slug>.png.")] = None,
    negative_prompt: NegativeOpt = None, size: SizeOpt = None, steps: StepsOpt = None,
    cfg: CfgOpt = None, seed: SeedOpt = None, preset: PresetOpt = None, model: ModelOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", out: OutOpt = None, overwrite: OverwriteOpt = False,
    json_: JsonOpt = False, cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False,
    cache_size: CacheSizeOpt = "2GB", offload: OffloadOpt = "none", compile_: CompileOpt = False,
    attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto", reuse: ReuseOpt = None,
    cfg_until: CfgUntilOpt = None, no_worker: NoWorkerOpt = False, preview: PreviewOpt = None,
    preview_every: PreviewEveryOpt = None, lora: LoraOpt = None, shift: ShiftOpt = None,
    transformer: TransformerOpt = None, dequantize: DequantizeOpt = None, quantize: QuantizeOpt = "none",
    out_dir: Annotated[Optional[Path], typer.Option(rich_help_panel=OUTPUT, show_default="the working folder",
                                                    help="With --prompts: the folder for the outputs.")] = None,
    skip_existing: Annotated[bool, typer.Option(
        rich_help_panel=OUTPUT, help="With --prompts: skip entries whose output exists (resume).")] = False,
    shard: ShardOpt = None, ray: RayOpt = None, ray_workers: RayWorkersOpt = None, retries: RetriesOpt = 2,
):
    """Generate an image from a prompt, or one per entry of a --prompts file."""
    from .edits import parse_size

    if (prompt is None) == (prompts is None):
        raise UsageError("give --prompt TEXT or --prompts FILE" + (", not both" if prompts else ""))
    if prompts is None:
        for name, value, default in (("--out-dir", out_dir, None), ("--skip-existing", skip_existing, False),
                                     ("--shard", shard, None), ("--ray", ray, None)):
            if value != default:
                raise UsageError(f"{name} goes with --prompts FILE (a batch)")
    p = jobs.Prompt(prompt or "", negative_prompt, steps, cfg, seed, *shortcuts_of(locals()))
    if prompts is None:
        job = jobs.Generate(p, parse_size(size) if size else None, output_of(locals()), model_of(locals()),
                            cache_of(locals()), preset)
    else:
        part = shard_of(locals())
        job = jobs.Prompts(prompts, p, parse_size(size) if size else None, output_of(locals()),
                           out_dir or Path("."), skip_existing, model_of(locals(), part), cache_of(locals()), preset,
                           part)
    execute(job, json_, ray_of(locals()))


@app.command()
def inpaint(
    images: ImagesArg, prompt: PromptOpt, negative_prompt: NegativeOpt = None,
    mask: Annotated[Optional[Path], typer.Option(
        rich_help_panel=MASK, help="Mask image: white regenerates, black keeps, grey blends; transparent pixels "
                                   "regenerate.")] = None,
    mask_dir: Annotated[Optional[Path], typer.Option(
        rich_help_panel=MASK, help="Masks for a batch: <stem>.png or <stem>_mask.png.")] = None,
    rect: Annotated[Optional[list[str]], typer.Option(
        rich_help_panel=MASK, help="X,Y,W,H in pixels or percent; repeatable (union).")] = None,
    mask_resize: Annotated[bool, typer.Option(rich_help_panel=MASK,
                                              help="Stretch a mask of another size to the image.")] = False,
    invert_mask: Annotated[bool, typer.Option(rich_help_panel=MASK,
                                              help="Regenerate what the mask keeps and keep what it covers.")] = False,
    grow: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK, help="Dilate the mask by this many pixels.")] = 0,
    feather: FeatherOpt = 0, strength: StrengthOpt = 1.0, attn_mask: AttnMaskOpt = "off", context: ContextOpt = 64,
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, preset: PresetOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", out: OutOpt = None,
    out_dir: OutDirOpt = None, skip_existing: SkipExistingOpt = False, overwrite: OverwriteOpt = False,
    json_: JsonOpt = False, cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False,
    cache_size: CacheSizeOpt = "2GB", offload: OffloadOpt = "none", compile_: CompileOpt = False,
    attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto", reuse: ReuseOpt = None,
    cfg_until: CfgUntilOpt = None, no_worker: NoWorkerOpt = False, preview: PreviewOpt = None,
    preview_every: PreviewEveryOpt = None, lora: LoraOpt = None, shift: ShiftOpt = None,
    transformer: TransformerOpt = None, dequantize: DequantizeOpt = None, quantize: QuantizeOpt = "none",
    shard: ShardOpt = None, ray: RayOpt = None, ray_workers: RayWorkersOpt = None, retries: RetriesOpt = 2,
):
    """Regenerate the masked part of an image; every pixel outside the mask stays byte-identical."""
    shape = jobs.InpaintMask(mask, mask_dir, tuple(rect or ()), mask_resize, invert_mask, grow, feather)
    execute(edit_job(shape, locals()), json_, ray_of(locals()))


@app.command()
def outpaint(
    images: ImagesArg, prompt: PromptOpt, negative_prompt: NegativeOpt = None,
    left: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK, help="Pixels to add on the left.")] = 0,
    right: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK, help="Pixels to add on the right.")] = 0,
    top: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK, help="Pixels to add on top.")] = 0,
    bottom: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK, help="Pixels to add at the bottom.")] = 0,
    expand: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK,
                                        help="Pixels to add on every side not anchored.")] = 0,
    to: Annotated[Optional[str], typer.Option(rich_help_panel=MASK, help="Grow the canvas to WIDTHxHEIGHT.")] = None,
    anchor: Annotated[Anchor, typer.Option(rich_help_panel=MASK,
                                           help="Where the original sits on the grown canvas.")] = "center",
    feather: FeatherOpt = 32, strength: StrengthOpt = 1.0, attn_mask: AttnMaskOpt = "off", context: ContextOpt = 64,
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, preset: PresetOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", out: OutOpt = None,
    out_dir: OutDirOpt = None, skip_existing: SkipExistingOpt = False, overwrite: OverwriteOpt = False,
    json_: JsonOpt = False, cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False,
    cache_size: CacheSizeOpt = "2GB", offload: OffloadOpt = "none", compile_: CompileOpt = False,
    attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto", reuse: ReuseOpt = None,
    cfg_until: CfgUntilOpt = None, no_worker: NoWorkerOpt = False, preview: PreviewOpt = None,
    preview_every: PreviewEveryOpt = None, lora: LoraOpt = None, shift: ShiftOpt = None,
    transformer: TransformerOpt = None, dequantize: DequantizeOpt = None, quantize: QuantizeOpt = "none",
    shard: ShardOpt = None, ray: RayOpt = None, ray_workers: RayWorkersOpt = None, retries: RetriesOpt = 2,
):
    """Extend the canvas and fill the new area; the original stays byte-identical in place, except a
    --feather band along the grown sides that is blended so the seam does not show."""
    shape = jobs.Outpaint(left, right, top, bottom, expand, to, anchor, feather)
    execute(edit_job(shape, locals()), json_, ray_of(locals()))


def any_size(value: Optional[str]) -> Optional[str]:
    if value is not None:
        from .edits import parse_size

        parse_size(value, multiple=1)  # a UsageError names --size
    return value


@app.command()
def edit(
    images: ImagesArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", callback=utf8_text, rich_help_panel=PROMPT,
                                        help="The instruction: what to change (any language).")],
    negative_prompt: NegativeOpt = None,
    ref: Annotated[Optional[list[Path]], typer.Option(
        rich_help_panel=PROMPT, help="Another picture the instruction can name (Picture 2, 3); repeatable; "
                                     "Qwen-Image-Edit-2509/2511.")] = None,
    mask: Annotated[Optional[Path], typer.Option(
        rich_help_panel=MASK, help="Edit only here: white edits, black keeps (byte-identical), grey blends.")] = None,
    mask_dir: Annotated[Optional[Path], typer.Option(
        rich_help_panel=MASK, help="Masks for a batch: <stem>.png or <stem>_mask.png.")] = None,
    rect: Annotated[Optional[list[str]], typer.Option(
        rich_help_panel=MASK, help="Edit only inside X,Y,W,H (pixels or percent); repeatable (union).")] = None,
    mask_resize: Annotated[bool, typer.Option(rich_help_panel=MASK,
                                              help="Stretch a mask of another size to the image.")] = False,
    invert_mask: Annotated[bool, typer.Option(rich_help_panel=MASK,
                                              help="Edit what the mask keeps and keep what it covers.")] = False,
    grow: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK,
                                      help="Dilate the mask by this many pixels.")] = 0,
    feather: FeatherOpt = 0, strength: StrengthOpt = 1.0,
    size: Annotated[Optional[str], typer.Option(callback=any_size, rich_help_panel=SAMPLING, show_default="the input's",
                                                help="Output WIDTHxHEIGHT (no mask).")] = None,
    edit_area: Annotated[Optional[int], typer.Option(
        min=32 * 32, max=PIXELS, rich_help_panel=SAMPLING, show_default="the model's, 1048576",
        help="Pixels the pictures are resized to for the model (the result is resized back).")] = None,
    vision_area: Annotated[Optional[int], typer.Option(
        min=28 * 28, max=PIXELS, rich_help_panel=SAMPLING, show_default="the model's, 147456",
        help="Pixels the pictures are resized to for the vision encoder (2509/2511).")] = None,
    mask_crop: Annotated[Optional[int], typer.Option(
        min=0, max=PIXELS, rich_help_panel=MASK, show_default="off: the whole picture",
        help="Show the model only the mask's box plus this many pixels (finer on large pictures).")] = None,
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, preset: PresetOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", out: OutOpt = None,
    out_dir: OutDirOpt = None, skip_existing: SkipExistingOpt = False, overwrite: OverwriteOpt = False,
    json_: JsonOpt = False, cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False,
    cache_size: CacheSizeOpt = "2GB", offload: OffloadOpt = "none", compile_: CompileOpt = False,
    attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto", reuse: ReuseOpt = None,
    cfg_until: CfgUntilOpt = None, no_worker: NoWorkerOpt = False, preview: PreviewOpt = None,
    preview_every: PreviewEveryOpt = None, lora: LoraOpt = None, shift: ShiftOpt = None,
    transformer: TransformerOpt = None, dequantize: DequantizeOpt = None, quantize: QuantizeOpt = "none",
    shard: ShardOpt = None, ray: RayOpt = None, ray_workers: RayWorkersOpt = None, retries: RetriesOpt = 2,
):
    """Edit a picture by instruction with a Qwen-Image-Edit model (-m): the whole picture, or only inside a
    mask (pixels outside it stay byte-identical). The result has the input's size."""
    from .edits import parse_size

    masked = mask or mask_dir or rect
    shape = jobs.InpaintMask(mask, mask_dir, tuple(rect or ()), mask_resize, invert_mask, grow, feather) if masked \
        else None
    instruction = jobs.Prompt(prompt, negative_prompt, steps, cfg, seed, *shortcuts_of(locals()))
    part = shard_of(locals())
    execute(jobs.Instruct(tuple(images), instruction, tuple(ref or ()), shape, strength,
                          parse_size(size, multiple=1) if size else None, edit_area, vision_area, mask_crop,
                          output_of(locals()), out_dir, skip_existing, model_of(locals(), part), cache_of(locals()),
                          preset, part),
            json_, ray_of(locals()))


@app.command()
def chain(
    ctx: typer.Context, image: Annotated[Path, typer.Argument(help="Input image.", show_default=False)],
    chain_file: Annotated[Path, typer.Argument(help="YAML file: optional defaults, then `edits:`, a list of "
                                                    "{inpaint: {...}} / {outpaint: {...}} / {edit: {...}}.",
                                                    show_default=False)],
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, preset: PresetOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", out: OutOpt = None,
    keep_steps: Annotated[Optional[Path], typer.Option(
        rich_help_panel=OUTPUT, help="Folder to write each edit's image to, as <stem>.<NN>-<kind>.png.")] = None,
    overwrite: OverwriteOpt = False, json_: JsonOpt = False, cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False, cache_size: CacheSizeOpt = "2GB", offload: OffloadOpt = "none",
    compile_: CompileOpt = False, attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto",
    reuse: ReuseOpt = None, cfg_until: CfgUntilOpt = None, no_worker: NoWorkerOpt = False,
    preview: PreviewOpt = None, preview_every: PreviewEveryOpt = None, lora: LoraOpt = None, shift: ShiftOpt = None,
    transformer: TransformerOpt = None, dequantize: DequantizeOpt = None, quantize: QuantizeOpt = "none",
):
    """Run a list of inpaint/outpaint edits (or, with an Edit model, edit: instructions) in one process, the
    latent carried in memory between them.

    --steps, --cfg, --seed, --reuse, --cfg-until and --shift (given here or by a preset) apply to every edit and
    win over the file's values, and --lora to the whole chain;
    an edit with no seed anywhere takes one random seed, reported. Each edit's result is cached (with the
    prompt embeddings, as the other commands cache theirs), so a re-run recomputes from the first changed edit."""
    from .chain import read_chain

    given = {k: v for k, v in (("steps", steps), ("cfg", cfg), ("seed", seed), ("reuse", reuse),
                               ("cfg_until", cfg_until), ("shift", shift)) if v is not None}
    edit_steps = tuple(read_chain(ctx, chain_file, given))
    execute(jobs.Chain(image, chain_file, edit_steps, seed, keep_steps, output_of(locals()), model_of(locals()),
                       cache_of(locals()), preset), json_)


app.add_typer(worker_app, name="worker")
app.add_typer(cache_commands.app, name="cache")


@app.command("presets")
def list_presets(ctx: typer.Context):
    """List the bundled presets: the commands each fits, its file and its contents."""
    for name, path in presets.bundled().items():
        fits = presets.fitting_commands(ctx.parent.command, presets.read_yaml(path, "preset"))
        print_result(f"{name}  ({', '.join(fits) or 'no command'})  {path}")
        print_result("".join(f"    {line}\n" for line in path.read_text().splitlines()))


@app.command()
def info(
    image: Annotated[Path, typer.Argument(help="An image qimg wrote, or a LoRA .safetensors file.",
                                          show_default=False)], json_: JsonOpt = False,
):
    """Print the parameters that made an image (stored in its PNG text chunk), or a LoRA's format, rank, alpha
    and the layers it targets."""
    from .metadata import describe, read_params
    from .runner import lora_info

    params = lora_info(image) if image.suffix.lower() == ".safetensors" else read_params(image)
    print_result(json_line(params) if json_ else describe(params))


# --- Running -----------------------------------------------------------------------------------------------


def run(args: list[str]) -> int:
    """Run the CLI and return its exit code; every failure becomes one line on stderr."""
    debug = "--debug" in args or os.environ.get("QIMG_DEBUG", "") not in ("", "0")
    try:
        with signals_raise(), warnings_as_lines():
            code = app(args=args, prog_name="qimg", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except TyperException as e:
        if e.format_message():  # empty after no-args help
            say(f"qimg: error: {presets.parser_message(e.format_message())}")
        return e.exit_code
    except Interrupted as e:
        say(e.message())
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
