"""The `qimg` command line: the commands, their options (shared ones declared in options.py) parsed into a
job (jobs/spec.py; the parts every command shares built by to_job.py), handed to the job runner.

Nothing here loads a model or writes a file; torch is imported only by the runner, so `qimg --help` stays
instant. `run` is the one place errors become a line on stderr and an exit code. The commands declared
elsewhere (chain_command.py, mask_command.py, info_commands.py, worker_commands.py, cache_commands.py) are
registered here, in the order `qimg --help` lists them.
"""

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException

from qimg.cli import cache_commands, chain_command, info_commands, mask_command, presets
from qimg.cli.execute import execute
from qimg.cli.options import (
    MASK,
    OUTPUT,
    PIXELS,
    PROMPT,
    SAMPLING,
    Anchor,
    AttentionOpt,
    AttnMaskOpt,
    BackgroundOpt,
    CacheDirOpt,
    CacheSizeOpt,
    CfgOpt,
    CfgParallelOpt,
    CfgUntilOpt,
    CompileOpt,
    ContextOpt,
    DequantizeOpt,
    DeviceOpt,
    DevicesOpt,
    DtypeOpt,
    FeatherOpt,
    ImagesArg,
    JsonOpt,
    LoraOpt,
    MaskModelOpt,
    MaskPromptOpt,
    MaskThresholdOpt,
    MetadataOpt,
    ModelOpt,
    NegativeOpt,
    NoCacheOpt,
    NoKvCacheOpt,
    NoWorkerOpt,
    OffloadOpt,
    OutDirOpt,
    OutOpt,
    OverwriteOpt,
    PresetOpt,
    PreviewEveryOpt,
    PreviewOpt,
    PromptOpt,
    QuantizeOpt,
    QuietOpt,
    RayOpt,
    RayWorkersOpt,
    RetriesOpt,
    ReuseOpt,
    SafetyActionOpt,
    SafetyClassifierOpt,
    SafetyOpt,
    SafetyPromptClassifierOpt,
    SafetyThresholdOpt,
    SafetyWordsOpt,
    SaveMaskOpt,
    SeedOpt,
    ShardOpt,
    ShiftOpt,
    SizeOpt,
    SkipExistingOpt,
    SplitOpt,
    StepsOpt,
    StrengthOpt,
    TextEncoderOpt,
    TilingOpt,
    TpOpt,
    TransformerOpt,
    UlyssesOpt,
    VaeOpt,
    VisionOpt,
    any_size,
    to_size,
    utf8_text,
)
from qimg.cli.to_job import (
    cache_of,
    edit_job,
    model_of,
    output_of,
    ray_of,
    shard_of,
    shortcuts_of,
    words_of,
)
from qimg.cli.worker_commands import app as worker_app
from qimg.errors import Interrupted, QimgError, QimgWarning, UsageError, failure_line, say, signals_raise
from qimg.jobs import spec
from qimg.option_values import CACHE_SIZE, CONTEXT, MASK_THRESHOLD, RAY_RETRIES, SAFETY_THRESHOLD

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Generate and edit images with Qwen-Image from the shell.",
)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", envvar="QIMG_DEBUG", help="Show tracebacks.")] = False,
          no_worker: Annotated[bool, typer.Option(
              "--no-worker", help="Run in this process even when a worker runs (also QIMG_WORKER=0).")] = False):
    pass


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
    json_: JsonOpt = False, metadata: MetadataOpt = "full", cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False, cache_size: CacheSizeOpt = CACHE_SIZE, offload: OffloadOpt = "none",
    compile_: CompileOpt = False, attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto",
    reuse: ReuseOpt = None, cfg_until: CfgUntilOpt = None, no_worker: NoWorkerOpt = False,
    preview: PreviewOpt = None, preview_every: PreviewEveryOpt = None, lora: LoraOpt = None, shift: ShiftOpt = None,
    transformer: TransformerOpt = None, dequantize: DequantizeOpt = None, quantize: QuantizeOpt = "none",
    devices: DevicesOpt = None, split: SplitOpt = None,
    text_encoder: TextEncoderOpt = None, vae: VaeOpt = None, vision: VisionOpt = None,
    safety: SafetyOpt = None, safety_words: SafetyWordsOpt = None, safety_classifier: SafetyClassifierOpt = None,
    safety_prompt_classifier: SafetyPromptClassifierOpt = None, safety_threshold: SafetyThresholdOpt = SAFETY_THRESHOLD,
    safety_action: SafetyActionOpt = "refuse",
    out_dir: Annotated[Optional[Path], typer.Option(rich_help_panel=OUTPUT, show_default="the working folder",
                                                    help="With --prompts: the folder for the outputs.")] = None,
    skip_existing: Annotated[bool, typer.Option(
        rich_help_panel=OUTPUT, help="With --prompts: skip entries whose output exists (resume).")] = False,
    shard: ShardOpt = None, ray: RayOpt = None, ray_workers: RayWorkersOpt = None, retries: RetriesOpt = RAY_RETRIES,
    no_kv_cache: NoKvCacheOpt = False, background: BackgroundOpt = None, quiet: QuietOpt = False,
    cfg_parallel: CfgParallelOpt = False, ulysses: UlyssesOpt = 1, tp: TpOpt = 1,
):
    """Generate an image from a prompt, or one per entry of a --prompts file."""
    if (prompt is None) == (prompts is None):
        raise UsageError("give --prompt TEXT or --prompts FILE" + (", not both" if prompts else ""))
    if prompts is None:
        for name, value, default in (("--out-dir", out_dir, None), ("--skip-existing", skip_existing, False),
                                     ("--shard", shard, None), ("--ray", ray, None)):
            if value != default:
                raise UsageError(f"{name} goes with --prompts FILE (a batch)")
    p = spec.Prompt(prompt or "", negative_prompt, steps, cfg, seed, *shortcuts_of(locals()))
    if prompts is None:
        job = spec.Generate(p, size, output_of(locals()), model_of(locals()),
                            cache_of(locals()), preset)
    else:
        part = shard_of(locals())
        job = spec.Prompts(prompts, p, size, output_of(locals()),
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
    grow: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK,
                                      help="Dilate the mask by this many pixels.")] = 0,
    feather: FeatherOpt = 0, mask_prompt: MaskPromptOpt = None, mask_model: MaskModelOpt = None,
    mask_threshold: MaskThresholdOpt = MASK_THRESHOLD, save_mask: SaveMaskOpt = None,
    strength: StrengthOpt = 1.0, attn_mask: AttnMaskOpt = "off", context: ContextOpt = CONTEXT,
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, preset: PresetOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", out: OutOpt = None,
    out_dir: OutDirOpt = None, skip_existing: SkipExistingOpt = False, overwrite: OverwriteOpt = False,
    json_: JsonOpt = False, metadata: MetadataOpt = "full", cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False, cache_size: CacheSizeOpt = CACHE_SIZE, offload: OffloadOpt = "none",
    compile_: CompileOpt = False, attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto",
    reuse: ReuseOpt = None, cfg_until: CfgUntilOpt = None, no_worker: NoWorkerOpt = False,
    preview: PreviewOpt = None, preview_every: PreviewEveryOpt = None, lora: LoraOpt = None, shift: ShiftOpt = None,
    transformer: TransformerOpt = None, dequantize: DequantizeOpt = None, quantize: QuantizeOpt = "none",
    devices: DevicesOpt = None, split: SplitOpt = None,
    text_encoder: TextEncoderOpt = None, vae: VaeOpt = None, vision: VisionOpt = None,
    safety: SafetyOpt = None, safety_words: SafetyWordsOpt = None, safety_classifier: SafetyClassifierOpt = None,
    safety_prompt_classifier: SafetyPromptClassifierOpt = None, safety_threshold: SafetyThresholdOpt = SAFETY_THRESHOLD,
    safety_action: SafetyActionOpt = "refuse",
    shard: ShardOpt = None, ray: RayOpt = None, ray_workers: RayWorkersOpt = None, retries: RetriesOpt = RAY_RETRIES,
    cfg_parallel: CfgParallelOpt = False, ulysses: UlyssesOpt = 1, tp: TpOpt = 1,
):
    """Regenerate the masked part of an image; every pixel outside the mask stays byte-identical."""
    shape = spec.InpaintMask(mask, mask_dir, tuple(rect or ()), mask_resize, invert_mask, grow, feather,
                             words_of(locals()), save_mask)
    execute(edit_job(shape, locals()), json_, ray_of(locals()))


@app.command()
def outpaint(
    images: ImagesArg, prompt: PromptOpt, negative_prompt: NegativeOpt = None,
    left: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK, help="Pixels to add on the left.")] = 0,
    right: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK,
                                       help="Pixels to add on the right.")] = 0,
    top: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK, help="Pixels to add on top.")] = 0,
    bottom: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK,
                                        help="Pixels to add at the bottom.")] = 0,
    expand: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK,
                                        help="Pixels to add on every side not anchored.")] = 0,
    to: Annotated[Optional[str], typer.Option(callback=to_size, rich_help_panel=MASK,
                                             help="Grow the canvas to WIDTHxHEIGHT.")] = None,
    anchor: Annotated[Anchor, typer.Option(rich_help_panel=MASK,
                                           help="Where the original sits on the grown canvas.")] = "center",
    feather: FeatherOpt = 32, strength: StrengthOpt = 1.0, attn_mask: AttnMaskOpt = "off",
    context: ContextOpt = CONTEXT,
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, preset: PresetOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", out: OutOpt = None,
    out_dir: OutDirOpt = None, skip_existing: SkipExistingOpt = False, overwrite: OverwriteOpt = False,
    json_: JsonOpt = False, metadata: MetadataOpt = "full", cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False, cache_size: CacheSizeOpt = CACHE_SIZE, offload: OffloadOpt = "none",
    compile_: CompileOpt = False, attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto",
    reuse: ReuseOpt = None, cfg_until: CfgUntilOpt = None, no_worker: NoWorkerOpt = False,
    preview: PreviewOpt = None, preview_every: PreviewEveryOpt = None, lora: LoraOpt = None, shift: ShiftOpt = None,
    transformer: TransformerOpt = None, dequantize: DequantizeOpt = None, quantize: QuantizeOpt = "none",
    devices: DevicesOpt = None, split: SplitOpt = None,
    text_encoder: TextEncoderOpt = None, vae: VaeOpt = None, vision: VisionOpt = None,
    safety: SafetyOpt = None, safety_words: SafetyWordsOpt = None, safety_classifier: SafetyClassifierOpt = None,
    safety_prompt_classifier: SafetyPromptClassifierOpt = None, safety_threshold: SafetyThresholdOpt = SAFETY_THRESHOLD,
    safety_action: SafetyActionOpt = "refuse",
    shard: ShardOpt = None, ray: RayOpt = None, ray_workers: RayWorkersOpt = None, retries: RetriesOpt = RAY_RETRIES,
    cfg_parallel: CfgParallelOpt = False, ulysses: UlyssesOpt = 1, tp: TpOpt = 1,
):
    """Extend the canvas and fill the new area; the original stays byte-identical in place, except a
    --feather band along the grown sides that is blended so the seam does not show."""
    shape = spec.Outpaint(left, right, top, bottom, expand, to, anchor, feather)
    execute(edit_job(shape, locals()), json_, ray_of(locals()))


@app.command()
def edit(
    images: ImagesArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", callback=utf8_text, rich_help_panel=PROMPT,
                                        help="The instruction: what to change (any language).")],
    negative_prompt: NegativeOpt = None,
    ref: Annotated[Optional[list[Path]], typer.Option(
        rich_help_panel=PROMPT, help="Another picture the instruction can name (Picture 2, 3...); repeatable; "
                                     "Qwen-Image-Edit-2509/2511 (up to 2), Qwen-Image-2.1 (up to 9).")] = None,
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
    feather: FeatherOpt = 0, mask_prompt: MaskPromptOpt = None, mask_model: MaskModelOpt = None,
    mask_threshold: MaskThresholdOpt = MASK_THRESHOLD, save_mask: SaveMaskOpt = None, strength: StrengthOpt = 1.0,
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
    json_: JsonOpt = False, metadata: MetadataOpt = "full", cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False, cache_size: CacheSizeOpt = CACHE_SIZE, offload: OffloadOpt = "none",
    compile_: CompileOpt = False, attention: AttentionOpt = "auto", vae_tiling: TilingOpt = "auto",
    reuse: ReuseOpt = None, cfg_until: CfgUntilOpt = None, no_worker: NoWorkerOpt = False,
    preview: PreviewOpt = None, preview_every: PreviewEveryOpt = None, lora: LoraOpt = None, shift: ShiftOpt = None,
    transformer: TransformerOpt = None, dequantize: DequantizeOpt = None, quantize: QuantizeOpt = "none",
    devices: DevicesOpt = None, split: SplitOpt = None,
    text_encoder: TextEncoderOpt = None, vae: VaeOpt = None, vision: VisionOpt = None,
    safety: SafetyOpt = None, safety_words: SafetyWordsOpt = None, safety_classifier: SafetyClassifierOpt = None,
    safety_prompt_classifier: SafetyPromptClassifierOpt = None, safety_threshold: SafetyThresholdOpt = SAFETY_THRESHOLD,
    safety_action: SafetyActionOpt = "refuse",
    shard: ShardOpt = None, ray: RayOpt = None, ray_workers: RayWorkersOpt = None, retries: RetriesOpt = RAY_RETRIES,
    no_kv_cache: NoKvCacheOpt = False, background: BackgroundOpt = None, quiet: QuietOpt = False,
    cfg_parallel: CfgParallelOpt = False, ulysses: UlyssesOpt = 1, tp: TpOpt = 1,
):
    """Edit a picture by instruction with a Qwen-Image-Edit or Qwen-Image-2.1 model (-m): the whole picture, or
    only inside a mask (pixels outside it stay byte-identical). The result has the input's size."""
    masked = mask or mask_dir or rect or mask_prompt
    if save_mask and not masked:
        raise UsageError(f"--save-mask {save_mask} needs a mask (--mask, --rect, --mask-dir or --mask-prompt) to save")
    shape = spec.InpaintMask(mask, mask_dir, tuple(rect or ()), mask_resize, invert_mask, grow, feather,
                             words_of(locals()), save_mask) if masked else None
    instruction = spec.Prompt(prompt, negative_prompt, steps, cfg, seed, *shortcuts_of(locals()))
    part = shard_of(locals())
    execute(spec.Edit(tuple(images), instruction, tuple(ref or ()), shape, strength,
                          size, edit_area, vision_area, mask_crop,
                          output_of(locals()), out_dir, skip_existing, model_of(locals(), part), cache_of(locals()),
                          preset, part),
            json_, ray_of(locals()))


app.command("chain")(chain_command.chain)
app.command("mask")(mask_command.mask)
app.add_typer(worker_app, name="worker")
app.add_typer(cache_commands.app, name="cache")


app.command("presets")(info_commands.list_presets)
app.command("info")(info_commands.info)


# --- Running -----------------------------------------------------------------------------------------------


def bare_ray_is_local(args: list[str]) -> list[str]:
    """`--ray` with no address (last, or followed by another option) means `--ray local`, as an option with an
    optional value would, which Typer has not."""
    return [a for i, arg in enumerate(args) for a in ([arg, "local"] if arg == "--ray" and (
        i + 1 == len(args) or args[i + 1].startswith("-")) else [arg])]


def run(args: list[str]) -> int:
    """Run the CLI and return its exit code; every failure becomes one line on stderr."""
    debug = "--debug" in args or os.environ.get("QIMG_DEBUG", "") not in ("", "0")
    try:
        with signals_raise(), warnings_as_lines():
            code = app(args=bare_ray_is_local(args), prog_name="qimg", standalone_mode=False)
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
        say(f"qimg: {getattr(e, 'label', 'error')}: {e}")
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
