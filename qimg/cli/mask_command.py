"""`qimg mask`: masks from words for images or folders, written where `qimg inpaint --mask-dir` reads them."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from qimg.cli.options import (
    MASK,
    OUTPUT,
    PIXELS,
    PROMPT,
    CacheDirOpt,
    CacheSizeOpt,
    DeviceOpt,
    FeatherOpt,
    ImagesArg,
    JsonOpt,
    MaskModelOpt,
    MaskThresholdOpt,
    NoCacheOpt,
    NoWorkerOpt,
    OverwriteOpt,
    utf8_texts,
)
from qimg.cli.to_job import cache_of, working_folder
from qimg.errors import Interrupted
from qimg.jobs import spec
from qimg.jobs.report import Reporter
from qimg.option_values import CACHE_SIZE, MASK_THRESHOLD


def mask(
    images: ImagesArg,
    prompt: Annotated[list[str], typer.Option(
        "--prompt", "-p", callback=utf8_texts, rich_help_panel=PROMPT, show_default=False,
        help="What to mask: the sky, the sofa; repeatable (the union).")],
    mask_model: MaskModelOpt = None, mask_threshold: MaskThresholdOpt = MASK_THRESHOLD,
    invert_mask: Annotated[bool, typer.Option(rich_help_panel=MASK,
                                              help="White where the words are not.")] = False,
    grow: Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK,
                                      help="Dilate the mask by this many pixels.")] = 0,
    feather: FeatherOpt = 0, device: DeviceOpt = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", rich_help_panel=OUTPUT,
                                                help="The mask file (one input).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        rich_help_panel=OUTPUT, show_default="beside each input",
        help="Folder for the masks, named <stem>_mask.png (what inpaint and edit --mask-dir read).")] = None,
    skip_existing: Annotated[bool, typer.Option(rich_help_panel=OUTPUT,
                                                help="Skip inputs whose <stem>_mask.png exists (resume).")] = False,
    overwrite: OverwriteOpt = False, json_: JsonOpt = False, cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False, cache_size: CacheSizeOpt = CACHE_SIZE, no_worker: NoWorkerOpt = False,
):
    """Make a mask from words for each image (pip install 'qimg\\[masks]'): white where the phrases are, the
    image's size; an image where nothing matches is an error, never an all-black mask."""
    from qimg.jobs import runner

    working_folder()
    words = spec.WordMask(tuple(prompt), mask_model, mask_threshold, device)
    job = spec.Mask(tuple(images), words, invert_mask, grow, feather, spec.Output(out, overwrite, json_), out_dir,
                    skip_existing, cache_of(locals()))
    with Reporter(json_) as reporter:
        try:
            runner.execute(job, reporter)
        except Interrupted as e:
            e.written = reporter.written  # the stop's message names what was finished
            raise
