"""inpaint, outpaint and edit (by instruction, with an Edit model): one input file, or a batch of them.

edit_plan does every check that needs no model for the whole batch (and picks this --shard's inputs); edit
runs the inputs, each one's canvas and mask built by mask_builder and its output named by edit_output
(names.edit_output, which the --skip-existing check asks too)."""

import functools
import os
import time
from pathlib import Path
from typing import NamedTuple, Optional

from qimg.errors import OutputExists, QimgError, UsageError, Withheld
from qimg.jobs import batch, edit_inputs, names, safety, shard, word_masks
from qimg.jobs.common import (
    announce_shard,
    generation_model,
    licence_notice,
    open_cache,
    open_engine,
    output_target,
    random_seed,
    resolve_model,
    sample_and_save,
)
from qimg.jobs.previews import PreviewFile, edit_previews
from qimg.jobs.report import Reporter
from qimg.jobs.spec import Edit, Inpaint, InpaintMask


def mask_builder(job: Inpaint | Edit, words=None):
    """(build(image, pixels, picture) -> (canvas, mask), mask_file(image) -> the mask file it reads or None).
    An instruction edit without a mask builds None: it edits the whole picture. words: the job's
    word_masks.WordMasks (--mask-prompt), or None."""
    from qimg import masks

    s = job.shape
    if s is None:
        return (lambda _image, pixels, _picture: (pixels, None)), (lambda image: None)
    if isinstance(s, InpaintMask):
        if s.mask and s.mask_dir:
            raise UsageError("give --mask or --mask-dir, not both")

        def mask_file(image):
            return s.mask or (s.mask_dir and batch.mask_for(s.mask_dir, image))

        def build(image, pixels, picture):
            region = words.region(pixels, image) if words is not None else None
            return pixels, edit_inputs.inpaint_mask(pixels.shape[1::-1], picture, image, mask_file(image), s.rect,
                                                    s.mask_resize, s.invert_mask, s.grow, s.feather, region)

        return build, mask_file

    def build(_image, pixels, _picture):
        margins = masks.outpaint_margins(pixels.shape[1::-1], s.left, s.right, s.top, s.bottom, s.expand, s.to,
                                         s.anchor)
        return masks.outpaint_canvas(pixels, margins, s.feather)

    return build, lambda image: None


def save_mask(job: Inpaint | Edit, image: Path, mask, is_batch: bool, reporter: Reporter) -> None:
    """--save-mask: the mask this input is edited with, for review, written before the model runs: to the file
    it names, or `<stem>_mask.png` in the folder it names (a batch's always; a name without a suffix is a folder),
    which --mask-dir reads back. An
    existing one is replaced with --overwrite, kept with --skip-existing, else it is this input's error."""
    from PIL import Image

    from qimg.images import check_writable, save_image
    from qimg.masks import to_grey

    path = save_mask_path(job.shape.save_mask, image, is_batch)
    check_writable(path, "--save-mask", mask.shape[::-1])
    if os.path.lexists(path) and not job.output.overwrite:
        if job.skip_existing:
            return
        raise UsageError(f"--save-mask {path} exists; pass --overwrite to replace it, or choose another name")
    reporter.saved(save_image(Image.fromarray(to_grey(mask)), path, overwrite=job.output.overwrite))


def save_mask_path(where: Path, image: Path, is_batch: bool) -> Path:
    """The file --save-mask writes for `image`: `where`, or `<stem>_mask.png` in it when it is a folder."""
    return names.mask_output(image, where) if is_batch or where.is_dir() or not where.suffix else where


def check_save_mask(job: Inpaint | Edit, files: list[Path], is_batch: bool, mask_file, refs: tuple) -> None:
    """Refuse, before anything is written, a --save-mask file that this run reads (an input, a --mask, a --ref
    picture) or writes (an output), --overwrite or not: the mask would replace it."""
    taken = {batch.real(f): f"the input {f}" for f in files}
    taken.update((batch.real(r), f"the --ref picture {r}") for r in refs)
    for f in files:
        try:
            read = mask_file(f)
        except UsageError:
            read = None  # fails in its turn
        if read is not None:
            taken.setdefault(batch.real(read), f"the mask of {f}")
        taken.setdefault(batch.real(job.output.out or names.edit_output(f, job.kind, job.out_dir)),
                         f"the output of {f}")
    for f in files:
        path = save_mask_path(job.shape.save_mask, f, is_batch)
        if batch.real(path) in taken:
            raise UsageError(f"--save-mask {path} is {taken[batch.real(path)]}, which the mask would replace; "
                             "choose another name")


def edit_output(image: Path, out: Optional[Path], out_dir: Optional[Path], kind: str, overwrite: bool,
                is_batch: bool = False, inputs=(), read_only=(), size=None):
    """Where an edit goes, checked by images.check_output (`size`: the result's, if known), and the
    `next_free` for save_output: --out, or `<stem>.<kind>.png` in --out-dir or beside the input. A single
    run numbers that name (`-2`, `-3`...) when it is taken; a batch, or --overwrite, keeps it. An existing
    file (the input among them) is replaced only with --overwrite; `read_only` ones never."""
    from qimg.images import check_output

    target, next_free = output_target(out, functools.partial(names.edit_output, image, kind, out_dir),
                                      not (is_batch or overwrite))
    check_output(target, overwrite, (image, *inputs), read_only, "--out" if out else "output", size)
    return target, next_free


class EditPlan(NamedTuple):
    files: list  # the inputs this run edits (this shard's)
    is_batch: bool
    build: object  # mask_builder's
    mask_file: object
    store: object
    folder: Path
    refs: tuple  # an instruction edit's --ref pictures, read by every input
    pictures: tuple  # instruct_pictures' (model kind, refs' pixels, areas); () for inpaint and outpaint
    words: object = None  # --mask-prompt's word_masks.WordMasks


def edit_plan(job: Inpaint | Edit) -> EditPlan:
    """Every check of an edit that needs no model, and the inputs it runs on: of a batch with --shard, that
    shard's (the batch-wide checks see every input, so every shard refuses the same batch)."""
    from qimg.images import check_folder

    kind, out, out_dir, overwrite = job.kind, job.output.out, job.out_dir, job.output.overwrite
    safety.prepare(job.output.safety)
    safety.check_prompt(job.output.safety, job.prompt.prompt, None if job.member else "--prompt")  # every input's
    edit_inputs.check_strength(job.strength)
    if job.skip_existing and overwrite:
        raise UsageError("give --skip-existing or --overwrite, not both")
    store = open_cache(job.cache)
    words = None
    if isinstance(job.shape, InpaintMask) and job.shape.words is not None:
        words = word_masks.WordMasks(job.shape.words, store)
    build, mask_file = mask_builder(job, words)
    folder = resolve_model(job.model)
    refs = job.refs if isinstance(job, Edit) else ()
    if isinstance(job, Edit):
        pictures = instruct_pictures(job, folder)
        if pictures[0].rgba and out is not None:
            from qimg.images import check_alpha_format

            check_alpha_format(out, job.output.background)
        licence_notice(folder, job.output.quiet)
    else:
        generation_model(folder, kind)
        pictures = ()
    if out_dir is not None:
        check_folder(out_dir, "--out-dir")
    if isinstance(job.shape, InpaintMask) and job.shape.mask_dir is not None and not job.shape.mask_dir.is_dir():
        raise UsageError(f"--mask-dir {job.shape.mask_dir} is not a folder; give the folder of the masks")
    named, is_batch = batch.named_inputs(list(job.images))
    files, is_batch = [f for f, _ in named], is_batch or job.member
    if is_batch and out:
        raise UsageError(f"--out names one file but {len(files)} inputs were given; use --out-dir")
    save_mask = job.shape.save_mask if isinstance(job.shape, InpaintMask) else None
    if save_mask is not None and is_batch and save_mask.exists() and not save_mask.is_dir():
        raise UsageError(f"--save-mask {save_mask} is a file; a batch writes one mask each: give a folder")
    if save_mask is not None:
        check_save_mask(job, files, is_batch, mask_file, refs)
    batch.check_distinct_outputs(files, kind, out_dir)
    if is_batch:
        batch.check_reads_kept(files, kind, out_dir, lambda image: (mask_file(image),), refs)
    files = [f for f, _ in shard.select(named, lambda item: item[1], job.shard)]
    announce_shard(job.shard, len(files), len(named), "images")
    if is_batch and not (job.skip_existing or overwrite or job.member):
        batch.check_outputs_free(files, kind, out_dir)
    return EditPlan(files, is_batch, build, mask_file, store, folder, refs, pictures, words)


def edit(job: Inpaint | Edit, reporter: Reporter) -> None:
    """For each input build (canvas, mask), inpaint (or edit by instruction), save, report.

    One input file runs as a plain command: its errors end the run. In a batch the outputs have fixed names,
    and if any exists already the batch is refused before anything runs, unless --skip-existing (skip them)
    or --overwrite (replace them). A bad input, or an output that appears while the batch runs, is reported
    and skipped, the others complete, and the run ends with a summary and exit 1; a failure of the model or
    of a write still ends it at once. The model loads once, for the first input that needs it."""
    kind, out, out_dir, overwrite = job.kind, job.output.out, job.out_dir, job.output.overwrite
    files, is_batch, build, mask_file, store, folder, refs, pictures, words = edit_plan(job)
    if words is not None:  # every mask made now: the segmentation model is gone before the image model loads
        words.prepare([f for f in files if not (job.skip_existing and os.path.lexists(
            out or names.edit_output(f, kind, out_dir)))], reporter)
    one = functools.partial(instruct_one, pictures=pictures) if pictures else edit_one
    previews = edit_previews(job, files, is_batch, mask_file, refs)
    engine = functools.cache(lambda: open_engine(folder, job.model, store))
    failed, withheld = [], []
    advance = reporter.bar("images", len(files)) if is_batch else (lambda: None)
    for image in files:
        started, done = time.perf_counter(), out or names.edit_output(image, kind, out_dir)
        if job.skip_existing and os.path.lexists(done):  # a dangling symlink exists too
            reporter.skipped(image, done)
        else:
            failure = None
            try:
                canvas, mask = edit_inputs.prepare(image, build)
                if isinstance(job.shape, InpaintMask) and job.shape.save_mask is not None:
                    save_mask(job, image, mask, is_batch, reporter)
                if pictures:
                    check_pictures(job, image, canvas, pictures)
                size = job.size if isinstance(job, Edit) and job.size else canvas.shape[1::-1]
                target = edit_output(image, out, out_dir, kind, overwrite, is_batch, files, (mask_file(image), *refs),
                                     size)
                preview = previews(image, target[0])
            except QimgError as e:
                failure = e
            else:
                seed = batch.file_seed(job.prompt.seed, image) if is_batch and job.prompt.seed is not None \
                    else job.prompt.seed
                try:
                    one(job, image, canvas, mask, target, seed, engine(), reporter, started, preview,
                        mask_file=mask_file(image), words=words and words.record())
                except OutputExists as e:
                    failure = e
                except Withheld as e:  # its image: a batch goes on with the next input
                    if not is_batch:
                        raise
                    withheld.append(image)
                    reporter.withheld(image, e)
            if failure is not None:
                if not is_batch:
                    raise failure
                failed.append(image)
                reporter.failed(image, failure)
        advance()
    safety.batch_end(failed, withheld, len(files), "images")


def edit_one(job: Inpaint, image: Path, canvas, mask, target, seed: Optional[int], engine, reporter: Reporter,
             started: float, preview: Optional[PreviewFile] = None, mask_file: Optional[Path] = None,
             words: Optional[dict] = None) -> None:
    """target: edit_output's (path, next_free); mask_file: the file the mask came from (None: --rect, or none);
    words: WordMasks.record() of --mask-prompt, for the metadata."""
    from qimg.cache import array_hash
    from qimg.masks import selected_area

    sampling = job.prompt.resolve(engine.defaults, random_seed(seed), job.strength)

    def fields(result) -> dict:
        return dict(strength=job.strength, attn_mask=job.attn_mask, context=job.context, **(words or {}),
                    mask_area=selected_area(mask), mask_sha256=array_hash(mask), box=list(result.box),
                    work_size=list(result.work_size), latent_cache=result.latent_cache)

    sample_and_save(job, job.kind, engine, reporter, sampling,
                    lambda callback: engine.inpaint(canvas, mask, sampling, job.attn_mask == "on", job.context,
                                                    callback, preview),
                    target, preview, started, fields, dict(input=image, mask=mask_file))


# --- edit: instructions with an Edit model -----------------------------------------------------------------


def instruct_pictures(job: Edit, folder: Path) -> tuple:
    """The job's checks that need no input image, its reference pictures read and its areas picked: (model
    kind, pictures, instruct.Areas)."""
    from qimg.engine.instruct import check_model, pick_areas
    from qimg.images import load_image
    from qimg.option_values import check_pixels
    from qimg.weights.folders import model_kind

    if not job.prompt.prompt.strip():
        raise UsageError("--prompt is empty: say what to change, e.g. -p 'replace the sky with a sunset'")
    if job.size and job.shape is not None:
        raise UsageError("--size does not combine with a mask: a masked edit keeps the input's pixels, and so "
                         "its size")
    if job.size:
        check_pixels(job.size, f"--size {job.size[0]}x{job.size[1]}", "give a smaller size")
    if job.mask_crop is not None and job.shape is None:
        raise UsageError(f"--mask-crop {job.mask_crop} needs a mask (--mask, --rect or --mask-dir) to crop around")
    if job.strength < 1 and job.shape is None:
        raise UsageError(f"--strength {job.strength} needs a mask (--mask, --rect or --mask-dir): without one "
                         "the whole picture is made anew")
    if model_kind(folder).family == "qwen-image-2.1":
        return pictures_21(job, folder)
    kind = check_model(folder)
    areas = pick_areas(folder, (job.edit_area, job.vision_area), ("--edit-area", "--vision-area"))
    return kind, [load_image(ref)[0] for ref in job.refs], areas


def check_pictures(job: Edit, image: Path, pixels, pictures: tuple) -> None:
    """instruct.check_pictures for one input of the job and its refs (on Qwen-Image-2.1, which takes its own
    count of pictures, only their aspect); pictures: instruct_pictures'."""
    from qimg.engine.instruct import check_aspect
    from qimg.engine.instruct import check_pictures as check

    kind, refs, _ = pictures
    sizes, names = [p.shape[1::-1] for p in (pixels, *refs)], [str(image), *map(str, job.refs)]
    if kind.family == "qwen-image-2.1":
        return check_aspect(sizes, names)
    check(kind, sizes, names)


def instruct_one(job: Edit, image: Path, pixels, mask, target, seed: Optional[int], engine, reporter: Reporter,
                 started: float, preview: Optional[PreviewFile] = None, *, pictures: tuple,
                 mask_file: Optional[Path] = None, words: Optional[dict] = None) -> None:
    """One input of `qimg edit`; target: edit_output's (path, next_free); pictures: instruct_pictures';
    mask_file, words: as edit_one's."""
    from qimg.cache import array_hash
    from qimg.engine.instruct import Pictures, instruct, instruct_cropped
    from qimg.masks import selected_area

    kind, refs, areas = pictures
    sampling = job.prompt.resolve(engine.defaults, random_seed(seed), job.strength)
    if kind.family == "qwen-image-2.1":
        return edit_21(job, image, mask, target, engine, reporter, started, preview, pictures,
                       engine.own_steps(sampling), mask_file)
    shown = Pictures(refs, areas)

    def sample(callback):
        if mask is not None and job.mask_crop is not None:
            return instruct_cropped(engine, pixels, mask, job.mask_crop, shown, sampling, callback, preview)
        return instruct(engine, pixels, mask, shown, sampling, job.size, callback, preview)

    def fields(result) -> dict:
        return dict(strength=job.strength, pictures_sha256=[array_hash(x) for x in (pixels, *refs)],
                    mask_area=None if mask is None else selected_area(mask),
                    mask_sha256=None if mask is None else array_hash(mask), **(words or {}),
                    model_kind=engine.kind.name,
                    edit_area=shown.areas.edit, vision_area=shown.areas.vision, mask_crop=job.mask_crop,
                    box=list(result.box), work_size=list(result.work_size), latent_cache=result.latent_cache)

    sample_and_save(job, "edit", engine, reporter, sampling, sample, target, preview, started, fields,
                    dict(input=image, refs=list(job.refs), mask=mask_file))


# --- edit with Qwen-Image-2.1: one model, up to 10 pictures, RGBA -------------------------------------------


def pictures_21(job: Edit, folder: Path) -> tuple:
    """instruct_pictures for Qwen-Image-2.1: (model kind, the refs' RGBA pixels, the edit area). Every picture is
    resized once, to the edit area (the reference's output_resolution squared), for both the vision tower and the
    VAE, so --vision-area has nothing to set."""
    import numpy as np

    from qimg.engine.qwen21_inputs import Defaults21
    from qimg.images import load_image
    from qimg.model.qwen21_prompt import MAX_PICTURES
    from qimg.weights.folders import model_kind
    from qimg.weights.qwen21 import transformer21_config

    kind = model_kind(folder)
    if job.vision_area is not None:
        raise UsageError(f"--vision-area is for Qwen-Image-Edit-2509/2511; {kind.display} resizes each picture "
                         "once, to --edit-area")
    if len(job.refs) + 1 > MAX_PICTURES:
        raise UsageError(f"--ref: {len(job.refs) + 1} pictures; {kind.display} takes up to {MAX_PICTURES} (the "
                         f"input and {MAX_PICTURES - 1} --ref)")
    try:
        transformer21_config(folder)
    except QimgError as e:
        raise UsageError(str(e)) from None
    area = job.edit_area if job.edit_area is not None else Defaults21.from_folder(folder).edit_area
    return kind, [np.asarray(load_image(ref)[1].convert("RGBA")) for ref in job.refs], area


def edit_21(job: Edit, image: Path, mask, target, engine, reporter: Reporter, started: float, preview, pictures,
            sampling, mask_file) -> None:
    """instruct_one on a Qwen-Image-2.1 engine: the input read again with its alpha (RGBA in, RGBA out), the
    pictures resized once to the edit area; pictures: pictures_21'."""
    import numpy as np

    from qimg.cache import array_hash
    from qimg.images import load_image
    from qimg.masks import selected_area

    kind, refs, area = pictures
    pixels = np.asarray(load_image(image)[1].convert("RGBA"))

    def fields(result) -> dict:
        return dict(strength=job.strength, pictures_sha256=[array_hash(x) for x in (pixels, *refs)],
                    mask_area=None if mask is None else selected_area(mask),
                    mask_sha256=None if mask is None else array_hash(mask), model_kind=kind.name, edit_area=area,
                    mask_crop=job.mask_crop, box=list(result.box), work_size=list(result.work_size),
                    latent_cache=result.latent_cache)

    def sample(callback):
        if mask is not None and job.mask_crop is not None:
            return engine.edit_cropped(pixels, refs, mask, job.mask_crop, area, sampling, callback, preview)
        return engine.edit(pixels, refs, mask, area, sampling, job.size, callback, preview)

    sample_and_save(job, "edit", engine, reporter, sampling, sample, target, preview, started, fields,
                    dict(input=image, refs=list(job.refs), mask=mask_file))
