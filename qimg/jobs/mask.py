"""`qimg mask`: one mask file per input made from words (word_masks.py), white where the phrases are, the
image's size, written as `<stem>_mask.png` beside the input or in --out-dir (the names --mask-dir reads), or
--out for one input. An input whose mask comes out empty is that input's error: named, the batch goes on,
exit 1; an all-black mask is never written."""

import os
import time
from pathlib import Path

from qimg import masks
from qimg.errors import QimgError, UsageError, say
from qimg.jobs import batch, names, word_masks
from qimg.jobs.common import open_cache
from qimg.jobs.report import Reporter, json_line, print_result
from qimg.jobs.spec import Mask
from qimg.segment.models import BadMaskModel


def outputs(job: Mask) -> tuple[list[Path], dict[Path, Path], bool]:
    """The inputs, each one's output, and whether they make a batch; refused up front: two inputs writing one
    file, an output that is an input, a batch's existing outputs without --skip-existing or --overwrite."""
    from qimg.images import check_folder

    if job.skip_existing and job.output.overwrite:
        raise UsageError("give --skip-existing or --overwrite, not both")
    if job.out_dir is not None:
        check_folder(job.out_dir, "--out-dir")
    files, is_batch = batch.expand_inputs(list(job.images))
    if is_batch and job.output.out:
        raise UsageError(f"--out names one file but {len(files)} inputs were given; use --out-dir")
    targets, inputs = {}, {batch.real(f): f for f in files}
    for f in files:
        out = job.output.out or names.mask_output(f, job.out_dir)
        if out in targets.values():
            raise UsageError(f"{f} and another input would both write {out}; run them with different --out-dir")
        if batch.real(out) in inputs:
            raise UsageError(f"{out}, the mask of {f}, is an input; write the masks elsewhere with --out-dir")
        targets[f] = out
    if is_batch and not (job.skip_existing or job.output.overwrite):
        batch.check_free(list(targets.values()))
    return files, targets, is_batch


def mask(job: Mask, reporter: Reporter) -> None:
    """Each input's mask made, checked not empty and written; the segmentation model stays loaded in the worker."""
    from qimg.images import check_output, load_image

    files, targets, is_batch = outputs(job)
    words = word_masks.WordMasks(job.words, open_cache(job.cache))
    failed = []
    advance = reporter.bar("masks", len(files)) if is_batch else (lambda: None)
    try:
        for image in files:
            started, target = time.perf_counter(), targets[image]
            if job.skip_existing and os.path.lexists(target):
                reporter.skipped(image, target)
            else:
                try:
                    pixels = load_image(image)[0]
                    check_output(target, job.output.overwrite, (image,), (), "--out" if job.output.out else "output",
                                 pixels.shape[1::-1])
                    m = masks.adjust(words.region(pixels, image), job.invert_mask, job.grow, job.feather)
                    if not m.any():  # --invert-mask of a mask covering everything
                        raise QimgError(f"{image}: the mask of {words.describe()} selects nothing after "
                                        "--invert-mask (the words cover the whole image); no mask written")
                    write(reporter, image, target, m, job.output.overwrite, started)
                except QimgError as e:
                    if not is_batch or isinstance(e, BadMaskModel):  # a model that cannot load fails every image
                        raise
                    failed.append(image)
                    reporter.failed(image, e)
            advance()
    finally:
        word_masks.release(keep=True)
    if failed:
        raise batch.failed_summary(failed, len(files), "images")


def write(reporter: Reporter, image: Path, target: Path, m: masks.Mask, overwrite: bool, started: float) -> Path:
    """Save the mask as 8-bit grey (white: in the mask) and report its area and box."""
    from PIL import Image

    from qimg.images import save_image

    out = save_image(Image.fromarray(masks.to_grey(m)), target, overwrite=overwrite)
    reporter.saved(out)
    area, box = masks.selected_area(m), masks.box_of(m)
    seconds = round(time.perf_counter() - started, 3)
    if reporter.as_json:
        print_result(json_line({"input": str(image), "output": str(out), "width": m.shape[1], "height": m.shape[0],
                                "area": area, "box": list(box), "seconds": seconds}))
    else:
        say(f"{out}  {area} px ({100 * area / m.size:.1f}%)  box {','.join(map(str, box))}  {seconds:.1f} s")
    return out

