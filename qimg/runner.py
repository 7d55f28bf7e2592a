"""The job runner: executes a job (jobs.py) against an engine and reports through a Reporter.

Every check that needs no model runs before one loads (the cache options, the model folder, output names,
input files, masks, chain plans), so a mistake costs nothing. In the worker, the engine of the last job
stays loaded for the next (worker/warm.py).
"""

import functools
import os
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Optional

from . import batch, edits, shard
from .errors import OutputExists, QimgError, UsageError, say
from .jobs import CacheSpec, Chain, Edit, Generate, InpaintMask, Instruct, Job, ModelSpec, Output, Prompts
from .report import Reporter


def execute(job: Job, reporter: Reporter) -> None:
    run = {Generate: generate, Edit: edit, Instruct: edit, Chain: chain, Prompts: prompts}[type(job)]
    run(job, reporter)


def open_cache(spec: CacheSpec):
    """The latent and prompt store, or None with --no-cache or --cache-size 0; checked before any work (and
    before torch is imported)."""
    from .cache import Store, default_cache_dir, size_option

    max_bytes = size_option(spec.size)
    if spec.off or max_bytes == 0:
        return None
    return Store(spec.folder or default_cache_dir(), max_bytes, lambda message: say(f"qimg: warning: {message}"))


def resolve_model(spec: ModelSpec) -> Path:
    """The model folder --model names (weights.resolve_model): every job finds it first, so a wrong --model
    shows before any input is read or planned."""
    from .weights import resolve_model as resolve

    return resolve(spec.model)


def generation_model(folder: Path, command: str) -> None:
    """Refuse an Edit model for a command that needs a Qwen-Image (generation) model, before it loads."""
    from .weights import KIND_NAMES, model_kind

    kind = model_kind(folder)
    if kind != "qwen-image":
        raise UsageError(f"{folder} is a {KIND_NAMES[kind]} model, which edits by instruction: use `qimg edit` "
                         f"(with --mask or --rect to edit a part); `qimg {command}` needs a Qwen-Image model")


def open_engine(folder: Path, spec: ModelSpec, store):
    """The engine for a job: a new one, or in the worker the one the last job left loaded if it computes the
    same numbers (worker/warm.py), then serving this job's cache."""
    import torch

    from .engine import DTYPES, Engine, pick_device, pick_dtype
    from .worker import warm

    from .lora import identity

    speed = spec.speed()
    device = pick_device(spec.device)  # what auto means here: the kept engine's key says what it runs on
    if spec.device == "auto":
        device = torch.device(shard.rank_device(str(device), spec.local_rank, torch.cuda.device_count()))
    dtype = next(name for name, d in DTYPES.items() if d == pick_dtype(spec.dtype, device))
    key = {**speed, "loras": identity(spec.loras)} if spec.loras else speed
    engine = warm.engine(folder, str(device), dtype, key,
                         lambda: Engine(folder, str(device), dtype, store, loras=spec.loras, **speed))
    engine.cache = store
    return engine


def save_output(engine, reporter: Reporter, out: Path, params: dict, image, latent=None,
                overwrite: bool = False, next_free=None) -> Path:
    """The one way an output is written: atomically (files.save_image; an existing file only with
    `overwrite`; a default numbered name taken meanwhile gives way to `next_free()`), with its parameters
    (metadata.py), told to the reporter; then `latent` (when it stands for the image 1:1) is cached under its
    pixels. Only PNG keeps those pixels exactly, so only a PNG output's latent can be found again. Returns
    where the image went."""
    from PIL import Image

    from .files import save_image
    from .metadata import png_text

    out = save_image(Image.fromarray(image), out, png_text(params), overwrite, next_free)
    reporter.saved(out)
    if out.suffix.lower() == ".png":
        engine.cache_latent(image, latent)
    return out


def output_target(out: Optional[Path], stem: str, folder: Path, numbered: bool):
    """(path, next_free): `out` when given (next_free None: it is the user's name, never changed), else the
    default name (files.default_output) and, when it is numbered, how to find the next free one should
    another run take it first."""
    from .files import default_output

    if out:
        return out, None
    return default_output(stem, folder, numbered), (functools.partial(default_output, stem, folder) if numbered
                                                    else None)


class PreviewFile:
    """--preview for one output: the running estimate the engine offers (preview.Preview) written over `path`
    every `every` steps of each sampling run (None: about a tenth of its steps) by files.save_image, so a
    viewer never reads a partial file and a stopped run leaves the last complete one; the last write is the
    result. Each carries its step ("3/50", or "result") in the PNG chunk that marks it as a preview.
    Counts the writes and the time they took, decoding included."""

    def __init__(self, path: Path, every: Optional[int]):
        self.path, self.every, self.count, self.seconds = path, every, 0, 0.0

    def __call__(self, done: int, total: int, estimate) -> None:
        if done < total and done % (self.every or max(1, round(total / 10))) == 0:  # the last: the result's
            self.write(estimate, f"{done}/{total}")

    def write(self, image, step: str, params: Optional[dict] = None) -> None:
        """Write image() (H, W, 3) uint8, with the output's parameters if given."""
        from PIL import Image

        from .files import PREVIEW_CHUNK, save_image
        from .metadata import png_text

        started = time.perf_counter()
        text = {**(png_text(params) if params else {}), PREVIEW_CHUNK: step}
        save_image(Image.fromarray(image()), self.path, text, overwrite=True, fast=True)
        self.count, self.seconds = self.count + 1, self.seconds + time.perf_counter() - started


def preview_file(path: Optional[Path], every: Optional[int]) -> Optional[PreviewFile]:
    return None if path is None else PreviewFile(path, every)


def last_preview(preview: Optional[PreviewFile], image, params: dict) -> dict:
    """The result written as the last preview (its pixels and parameters: `qimg info` reads it like the
    output); then what --json says of the previews ({} without --preview)."""
    if preview is None:
        return {}
    preview.write(lambda: image, "result", params)
    return dict(previews=preview.count, preview_seconds=round(preview.seconds, 3))


def cache_use(result) -> dict:
    return dict(latent_cache=result.latent_cache, prompt_cache=result.prompt_cache)


def random_seed(seed: Optional[int]) -> int:
    return secrets.randbelow(2**32) if seed is None else seed


def lora_info(path: Path) -> dict:
    """`qimg info` on a LoRA file: lora.summary against Qwen-Image's layer names (the same in every variant)."""
    import torch

    from .adapters import targets
    from .lora import summary
    from .model.transformer import QwenImageTransformer, TransformerConfig

    with torch.device("meta"):
        return summary(path, targets(QwenImageTransformer(TransformerConfig())))


# --- generate ----------------------------------------------------------------------------------------------


def generate(job: Generate, reporter: Reporter) -> None:
    from .files import check_format_size, check_output, check_preview
    from .metadata import output_params

    started = time.perf_counter()
    p, overwrite = job.prompt, job.output.overwrite
    store = open_cache(job.cache)
    folder = resolve_model(job.model)
    generation_model(folder, "generate")
    seed = random_seed(p.seed)
    out, next_free = output_target(job.output.out, f"qimg-{seed}", Path("."), not overwrite)
    check_output(out, overwrite, what="output" if job.member else "--out", size=job.size)
    preview = preview_file(job.output.preview, job.output.preview_every)
    if preview:
        check_preview(preview.path, {out: "the output"}, overwrite)
    engine = open_engine(folder, job.model, store)
    d = engine.defaults
    width, height = job.size or (d.width, d.height)
    check_format_size(out, (width, height))
    steps, cfg = p.steps or d.steps, d.cfg if p.cfg is None else p.cfg
    negative_prompt = d.negative_prompt if p.negative_prompt is None else p.negative_prompt
    callback, done = reporter.steps("generating", steps)
    calls = engine.calls
    result = engine.generate(p.prompt, negative_prompt, width, height, steps, cfg, seed, callback, p.shortcuts(),
                             preview)
    done()
    params = output_params("generate", engine, job.preset, prompt=p.prompt, negative_prompt=negative_prompt,
                           seed=seed, width=width, height=height, steps=steps, cfg=cfg, reuse=p.reuse,
                           cfg_until=p.cfg_until, shift=p.shift, calls=engine.calls - calls)
    out = save_output(engine, reporter, out, params, result.image, result.latent, overwrite, next_free)
    reporter.result(out, {**params, **cache_use(result), **last_preview(preview, result.image, params)}, started)


# --- inpaint and outpaint, one file or a batch -------------------------------------------------------------


def mask_builder(job: Edit | Instruct):
    """(build(image, pixels, picture) -> (canvas, mask), mask_file(image) -> the mask file it reads or None).
    An instruction edit without a mask builds None: it edits the whole picture."""
    from . import masks

    s = job.shape
    if s is None:
        return (lambda _image, pixels, _picture: (pixels, None)), (lambda image: None)
    if isinstance(s, InpaintMask):
        if s.mask and s.mask_dir:
            raise UsageError("give --mask or --mask-dir, not both")

        def mask_file(image):
            return s.mask or (s.mask_dir and batch.mask_for(s.mask_dir, image))

        def build(image, pixels, picture):
            return pixels, edits.inpaint_mask(pixels.shape[1::-1], picture, image, mask_file(image), s.rect,
                                              s.mask_resize, s.invert_mask, s.grow, s.feather)

        return build, mask_file

    def build(_image, pixels, _picture):
        margins = edits.outpaint_margins(pixels.shape[1::-1], s.left, s.right, s.top, s.bottom, s.expand, s.to,
                                         s.anchor)
        return masks.outpaint_canvas(pixels, margins, s.feather)

    return build, lambda image: None


def edit_output(image: Path, out: Optional[Path], out_dir: Optional[Path], kind: str, overwrite: bool,
                is_batch: bool = False, inputs=(), read_only=(), size=None):
    """Where an edit goes, checked by files.check_output (`size`: the result's, if known), and the
    `next_free` for save_output: --out, or `<stem>.<kind>.png` in --out-dir or beside the input. A single
    run numbers that name (`-2`, `-3`...) when it is taken; a batch, or --overwrite, keeps it. An existing
    file (the input among them) is replaced only with --overwrite; `read_only` ones never."""
    from .files import check_output

    target, next_free = output_target(out, f"{image.stem}.{kind}", out_dir or image.parent,
                                      not (is_batch or overwrite))
    check_output(target, overwrite, (image, *inputs), read_only, "--out" if out else "output", size)
    return target, next_free


def edit_previews(job: Edit | Instruct, files: list[Path], is_batch: bool, mask_file, refs=()):
    """previews(image, its output) -> its PreviewFile (None without --preview): for one input, the file --preview
    names, checked when asked; for a batch, its output's name in the --preview folder, all of them checked
    here, before anything runs, against every file the batch reads or writes."""
    from .files import check_folder, check_preview

    where, every = job.output.preview, job.output.preview_every
    if where is None:
        return lambda image, out: None
    if not is_batch:
        def previews(image, out):
            check_preview(where, {out: "the output", image: "the input image", mask_file(image): "the mask",
                                  **{r: "a --ref picture" for r in refs}}, job.output.overwrite)
            return PreviewFile(where, every)

        return previews
    check_folder(where, "--preview")

    def path(image):
        return where / batch.output_name(image, job.kind, None).name

    taken = {batch.real(f): f"the input {f}" for f in files}
    taken.update((batch.real(r), f"the --ref picture {r}") for r in refs)
    taken.update((batch.real(batch.output_name(f, job.kind, job.out_dir)), f"the output of {f}") for f in files)
    for f in files:
        try:
            mask = mask_file(f)
        except UsageError:  # none found: that input fails in its turn
            continue
        if mask is not None:
            taken.setdefault(batch.real(mask), f"the mask of {f}")
    for f in files:
        if batch.real(path(f)) in taken:
            raise UsageError(f"--preview {where}: {path(f)}, the preview of {f}, is {taken[batch.real(path(f))]}; "
                             "give another folder")
        check_preview(path(f), {}, job.output.overwrite)
    return lambda image, out: PreviewFile(path(image), every)


class EditPlan(NamedTuple):
    files: list  # the inputs this run edits (this shard's)
    is_batch: bool
    build: object  # mask_builder's
    mask_file: object
    store: object
    folder: Path
    refs: tuple  # an instruction edit's --ref pictures, read by every input
    pictures: tuple  # instruct_pictures' (model kind, refs' pixels); () for inpaint and outpaint


def edit_plan(job: Edit | Instruct) -> EditPlan:
    """Every check of an edit that needs no model, and the inputs it runs on: of a batch with --shard, that
    shard's (the batch-wide checks see every input, so every shard refuses the same batch)."""
    from .files import check_folder

    kind, out, out_dir, overwrite = job.kind, job.output.out, job.out_dir, job.output.overwrite
    edits.check_strength(job.strength)
    if job.skip_existing and overwrite:
        raise UsageError("give --skip-existing or --overwrite, not both")
    build, mask_file = mask_builder(job)
    store = open_cache(job.cache)
    folder = resolve_model(job.model)
    refs = job.refs if isinstance(job, Instruct) else ()
    if isinstance(job, Instruct):
        pictures = instruct_pictures(job, folder)
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
    batch.check_distinct_outputs(files, kind, out_dir)
    if is_batch:
        batch.check_reads_kept(files, kind, out_dir, lambda image: (mask_file(image), *refs))
    files = [f for f, _ in shard.select(named, lambda item: item[1], job.shard)]
    announce_shard(job.shard, len(files), len(named), "images")
    if is_batch and not (job.skip_existing or overwrite or job.member):
        batch.check_outputs_free(files, kind, out_dir)
    return EditPlan(files, is_batch, build, mask_file, store, folder, refs, pictures)


def announce_shard(part, chosen: int, total: int, what: str) -> None:
    """The line that tells the processes' logs apart: which shard this is and how much of the batch it takes."""
    if part is not None:
        say(f"qimg: shard {part}: {chosen} of {total} {what}")


def edit(job: Edit | Instruct, reporter: Reporter) -> None:
    """For each input build (canvas, mask), inpaint (or edit by instruction), save, report.

    One input file runs as a plain command: its errors end the run. In a batch the outputs have fixed names,
    and if any exists already the batch is refused before anything runs, unless --skip-existing (skip them)
    or --overwrite (replace them). A bad input, or an output that appears while the batch runs, is reported
    and skipped, the others complete, and the run ends with a summary and exit 1; a failure of the model or
    of a write still ends it at once. The model loads once, for the first input that needs it."""
    kind, out, out_dir, overwrite = job.kind, job.output.out, job.out_dir, job.output.overwrite
    files, is_batch, build, mask_file, store, folder, refs, pictures = edit_plan(job)
    one = functools.partial(instruct_one, pictures=pictures) if pictures else edit_one
    previews = edit_previews(job, files, is_batch, mask_file, refs)
    engine = functools.cache(lambda: open_engine(folder, job.model, store))
    failed = []
    advance = reporter.bar("images", len(files)) if is_batch else (lambda: None)
    for image in files:
        started, done = time.perf_counter(), out or batch.output_name(image, kind, out_dir)
        if job.skip_existing and os.path.lexists(done):  # a dangling symlink exists too
            reporter.skipped(image, done)
        else:
            failure = None
            try:
                canvas, mask = edits.prepare(image, build)
                if pictures:
                    check_pictures(job, image, canvas, pictures)
                size = job.size if isinstance(job, Instruct) and job.size else canvas.shape[1::-1]
                target = edit_output(image, out, out_dir, kind, overwrite, is_batch, files, (mask_file(image), *refs),
                                     size)
                preview = previews(image, target[0])
            except QimgError as e:
                failure = e
            else:
                seed = batch.file_seed(job.prompt.seed, image) if is_batch and job.prompt.seed is not None \
                    else job.prompt.seed
                try:
                    one(job, image, canvas, mask, target, seed, engine(), reporter, started, preview)
                except OutputExists as e:
                    failure = e
            if failure is not None:
                if not is_batch:
                    raise failure
                failed.append(image)
                reporter.failed(image, failure)
        advance()
    if failed:
        raise batch.failed_summary(failed, len(files), "images")


def edit_one(job: Edit, image: Path, canvas, mask, target, seed: Optional[int], engine, reporter: Reporter,
             started: float, preview: Optional[PreviewFile] = None) -> None:
    """target: edit_output's (path, next_free)."""
    from .cache import array_hash
    from .masks import selected_area
    from .metadata import output_params
    from .sampling import first_step

    seed, d, p = random_seed(seed), engine.defaults, job.prompt
    steps = p.steps or d.steps
    cfg = d.cfg if p.cfg is None else p.cfg
    negative = d.negative_prompt if p.negative_prompt is None else p.negative_prompt
    callback, done = reporter.steps(job.kind, steps - first_step(steps, job.strength))
    calls = engine.calls
    result = engine.inpaint(canvas, mask, p.prompt, negative, steps, cfg, seed, job.strength, job.attn_mask == "on",
                            job.context, callback, p.shortcuts(), preview)
    done()
    height, width = result.image.shape[:2]
    params = output_params(job.kind, engine, job.preset, prompt=p.prompt, negative_prompt=negative, seed=seed,
                           width=width, height=height, steps=steps, cfg=cfg, reuse=p.reuse, cfg_until=p.cfg_until,
                           shift=p.shift, calls=engine.calls - calls, strength=job.strength,
                           attn_mask=job.attn_mask, context=job.context, input=str(image),
                           mask_area=selected_area(mask), mask_sha256=array_hash(mask), box=list(result.box),
                           work_size=list(result.work_size), latent_cache=result.latent_cache)
    out = save_output(engine, reporter, target[0], params, result.image, result.latent, job.output.overwrite,
                      target[1])
    reporter.result(out, {**params, **cache_use(result), **last_preview(preview, result.image, params)}, started)


# --- edit: instructions with an Edit model -----------------------------------------------------------------


def instruct_pictures(job: Instruct, folder: Path) -> tuple:
    """The job's checks that need no input image, and its reference pictures read: (model kind, pictures)."""
    from .files import load_image
    from .instruct import check_model

    if not job.prompt.prompt.strip():
        raise UsageError("--prompt is empty: say what to change, e.g. -p 'replace the sky with a sunset'")
    if job.size and job.shape is not None:
        raise UsageError("--size does not combine with a mask: a masked edit keeps the input's pixels, and so "
                         "its size")
    if job.mask_crop is not None and job.shape is None:
        raise UsageError(f"--mask-crop {job.mask_crop} needs a mask (--mask, --rect or --mask-dir) to crop around")
    if job.strength < 1 and job.shape is None:
        raise UsageError(f"--strength {job.strength} needs a mask (--mask, --rect or --mask-dir): without one "
                         "the whole picture is made anew")
    kind = check_model(folder)
    return kind, [load_image(ref)[0] for ref in job.refs]


def check_pictures(job: Instruct, image: Path, pixels, pictures: tuple) -> None:
    """instruct.check_pictures for one input of the job and its refs; pictures: instruct_pictures'."""
    from .instruct import check_pictures as check

    kind, refs = pictures
    check(kind, [p.shape[1::-1] for p in (pixels, *refs)], [str(image), *map(str, job.refs)])


def instruct_one(job: Instruct, image: Path, pixels, mask, target, seed: Optional[int], engine, reporter: Reporter,
                 started: float, preview: Optional[PreviewFile] = None, *, pictures: tuple) -> None:
    """One input of `qimg edit`; target: edit_output's (path, next_free); pictures: instruct_pictures'."""
    from .cache import array_hash
    from .instruct import Areas, instruct
    from .masks import selected_area
    from .metadata import output_params
    from .sampling import first_step

    seed, d, p = random_seed(seed), engine.defaults, job.prompt
    steps = p.steps or d.steps
    cfg = d.cfg if p.cfg is None else p.cfg
    negative = d.negative_prompt if p.negative_prompt is None else p.negative_prompt
    areas = Areas(job.edit_area or d.edit_area, job.vision_area or d.vision_area)
    refs = pictures[1]
    callback, done = reporter.steps("edit", steps - first_step(steps, job.strength))
    calls = engine.calls
    result = instruct(engine, pixels, mask, refs, p.prompt, negative, steps, cfg, seed, areas, job.strength, job.size,
                      callback, p.shortcuts(), job.mask_crop, preview)
    done()
    height, width = result.image.shape[:2]
    params = output_params("edit", engine, job.preset, prompt=p.prompt, negative_prompt=negative, seed=seed,
                           width=width, height=height, steps=steps, cfg=cfg, reuse=p.reuse, cfg_until=p.cfg_until,
                           shift=p.shift, calls=engine.calls - calls, strength=job.strength, input=str(image),
                           refs=[str(r) for r in job.refs], pictures_sha256=[array_hash(x) for x in (pixels, *refs)],
                           mask_area=None if mask is None else selected_area(mask),
                           mask_sha256=None if mask is None else array_hash(mask), model_kind=engine.kind,
                           edit_area=areas.edit, vision_area=areas.vision, mask_crop=job.mask_crop,
                           box=list(result.box), work_size=list(result.work_size),
                           latent_cache=result.latent_cache)
    out = save_output(engine, reporter, target[0], params, result.image, result.latent, job.output.overwrite,
                      target[1])
    reporter.result(out, {**params, **cache_use(result), **last_preview(preview, result.image, params)}, started)


# --- generate --prompts ------------------------------------------------------------------------------------


def prompt_jobs(job: Prompts) -> list[tuple[str, Generate]]:
    """Every check of generate --prompts that needs no model, and this shard's entries as generate jobs:
    (how messages name the entry, its job). As a folder batch: fixed output names, refused up front if any
    exists unless --skip-existing or --overwrite, each entry's seed its own or derived from --seed and its
    output name."""
    from . import prompts as prompt_file
    from .files import check_folder

    if job.skip_existing and job.output.overwrite:
        raise UsageError("give --skip-existing or --overwrite, not both")
    if job.output.out is not None:
        raise UsageError("--out names one file but --prompts makes one per prompt; use --out-dir")
    open_cache(job.cache)
    resolve_model(job.model)
    check_folder(job.out_dir, "--out-dir")
    if job.output.preview is not None:  # a folder, each entry's preview named as its output
        check_folder(job.output.preview, "--preview")
        if batch.real(job.output.preview) == batch.real(job.out_dir):
            raise UsageError(f"--preview {job.output.preview} is the --out-dir: the previews would replace the "
                             "outputs; give another folder")
    entries = prompt_file.read(job.file)
    chosen = shard.select(entries, lambda e: e.name, job.shard)
    announce_shard(job.shard, len(chosen), len(entries), "prompts")
    runs = [(f"{job.file} {e.where}", entry_job(job, e)) for e in chosen]
    if not (job.skip_existing or job.output.overwrite):
        batch.check_free([g.output.out for _, g in runs])
    return runs


def entry_job(job: Prompts, e) -> Generate:
    """A prompts file's entry (prompts.Entry) as a generate job: its own values win over the command line's."""
    p = job.prompt
    seed = e.seed if e.seed is not None else None if p.seed is None else batch.name_seed(p.seed, e.name)
    negative = p.negative_prompt if e.negative_prompt is None else e.negative_prompt
    return Generate(replace(p, prompt=e.prompt, negative_prompt=negative, seed=seed), e.size or job.size,
                    Output(job.out_dir / e.name, job.output.overwrite, job.output.as_json,
                           job.output.preview and job.output.preview / e.name, job.output.preview_every),
                    job.model, job.cache,
                    job.preset, member=True)


def prompts(job: Prompts, reporter: Reporter) -> None:
    """generate --prompts: each entry as a generate job, with one engine kept for all (worker/warm.py). An
    output that appears while the batch runs, or a size the device cannot hold, is that entry's failure: the
    others complete, and the run ends with a summary and exit 1."""
    from .worker import warm

    runs, failed = prompt_jobs(job), []
    advance = reporter.bar("prompts", len(runs))
    with warm.kept():
        for where, gen in runs:
            if job.skip_existing and os.path.lexists(gen.output.out):
                reporter.skipped(where, gen.output.out)
            else:
                try:
                    generate(gen, reporter)
                except (UsageError, OutputExists) as e:
                    failed.append(where)
                    reporter.failed(where, e)
            advance()
    if failed:
        raise batch.failed_summary(failed, len(runs), "prompts")


# --- chain -------------------------------------------------------------------------------------------------


def chain_model(folder: Path, steps, size: tuple[int, int]) -> None:
    """A chain's edits all need the model it runs: instruction edits an Edit model that takes their pictures
    (the canvas of `size` and the refs), the others Qwen-Image."""
    from .files import load_image
    from .instruct import check_model, check_pictures

    for step in steps:
        try:
            if step.kind == "edit":
                refs = step.options["ref"] or ()
                check_pictures(check_model(folder, "chain"), [size, *(load_image(r)[0].shape[1::-1] for r in refs)],
                               ["the input", *map(str, refs)])
            else:
                generation_model(folder, "chain")
        except UsageError as e:
            raise UsageError(f"{step.where}: {e}") from None


def chain(job: Chain, reporter: Reporter) -> None:
    from . import chain as chains
    from .files import check_output, check_preview, load_image
    from .metadata import output_params

    started = time.perf_counter()
    overwrite = job.output.overwrite
    store = open_cache(job.cache)
    folder = resolve_model(job.model)
    pixels, picture = load_image(job.image)
    chain_model(folder, job.steps, pixels.shape[1::-1])
    planned = chains.plan(list(job.steps), pixels.shape[1::-1], picture)
    seed = random_seed(job.seed)
    reads = chains.files_read(job.chain_file, job.steps)  # never written, --overwrite or not
    sizes = {p.step.index: p.size for p in planned}  # each edit's result, (width, height)
    out, next_free = edit_output(job.image, job.output.out, None, "chain", overwrite, read_only=reads,
                                 size=planned[-1].size)
    step_files = chains.step_files(job.image, job.steps, job.keep_steps) if job.keep_steps is not None else {}
    for index, step_file in step_files.items():
        check_output(step_file, overwrite, (job.image,), reads, "--keep-steps file", sizes[index])
        if batch.real(step_file) == batch.real(out):
            raise UsageError(f"--out {out} is also a --keep-steps file; choose another name")
    preview = preview_file(job.output.preview, job.output.preview_every)
    if preview:
        taken = {out: "the output", job.image: "the input image", **{r: "a file this chain reads" for r in reads},
                 **{f: f"the --keep-steps file of edit {i}" for i, f in step_files.items()}}
        check_preview(preview.path, taken, overwrite)
    engine = open_engine(folder, job.model, store)

    def params(canvas, lineage: list) -> dict:
        width, height = canvas.size
        seeds = sorted({entry["seed"] for entry in lineage})  # those the edits used
        return output_params("chain", engine, job.preset, lineage, input=str(job.image),
                             chain=str(job.chain_file), seed=seeds[0] if len(seeds) == 1 else seeds,
                             width=width, height=height, calls=sum(entry["calls"] for entry in lineage))

    lineage = []
    for done, canvas, entry in chains.run(engine, planned, pixels, picture, seed, reporter, preview):
        lineage.append(entry)
        if done.step.index in step_files:
            save_output(engine, reporter, step_files[done.step.index], params(canvas, lineage),
                        engine.render(canvas), overwrite=overwrite)
    final, image = params(canvas, lineage), engine.render(canvas)
    out = save_output(engine, reporter, out, final, image, overwrite=overwrite, next_free=next_free)
    reporter.result(out, {**final, **last_preview(preview, image, final)}, started)
