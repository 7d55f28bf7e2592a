"""The job runner: executes a job (jobs.py) against an engine and reports through a Reporter.

Every check that needs no model runs before one loads (output names, input files, masks, chain plans), so
a mistake costs nothing. Where engines come from is `engines`: a fresh Engine per job in a plain process;
the worker swaps in a source that keeps the last one loaded.
"""

import functools
import secrets
import time
from pathlib import Path
from typing import Callable, Optional

from . import batch, edits
from .errors import OutputExists, QimgError, UsageError
from .jobs import CacheSpec, Chain, Edit, Generate, InpaintMask, Job, ModelSpec
from .report import Reporter


def fresh_engine(spec: ModelSpec, store):
    from .engine import Engine
    from .weights import resolve_model

    return Engine(resolve_model(spec.model), spec.device, spec.dtype, store, **spec.speed())


engines: Callable = fresh_engine  # (ModelSpec, Store | None) -> Engine


def execute(job: Job, reporter: Reporter) -> None:
    run = {Generate: generate, Edit: edit, Chain: chain}[type(job)]
    run(job, reporter)


def open_cache(spec: CacheSpec):
    """The latent and prompt store, or None with --no-cache; checked before any work."""
    import sys

    from .cache import Store, default_cache_dir, parse_bytes

    try:
        max_bytes = parse_bytes(spec.size)
    except ValueError as e:
        raise UsageError(f"--cache-size {e}") from None
    if spec.off:
        return None
    return Store(spec.folder or default_cache_dir(), max_bytes,
                 lambda message: print(f"qimg: warning: {message}", file=sys.stderr))


def save_output(engine, reporter: Reporter, out: Path, params: dict, image, latent=None,
                overwrite: bool = False) -> None:
    """The one way an output is written: atomically (files.save_image; an existing file only with
    `overwrite`), with its parameters (metadata.py), told to the reporter; then `latent` (when it stands for
    the image 1:1) is cached under its pixels. Only PNG keeps those pixels exactly, so only a PNG output's
    latent can be found again."""
    from PIL import Image

    from .files import save_image
    from .metadata import png_text

    save_image(Image.fromarray(image), out, png_text(params), overwrite)
    reporter.saved(out)
    if out.suffix.lower() == ".png":
        engine.cache_latent(image, latent)


def cache_use(result) -> dict:
    return dict(latent_cache=result.latent_cache, prompt_cache=result.prompt_cache)


def random_seed(seed: Optional[int]) -> int:
    return secrets.randbelow(2**32) if seed is None else seed


# --- generate ----------------------------------------------------------------------------------------------


def generate(job: Generate, reporter: Reporter) -> None:
    from .files import check_output, default_output
    from .metadata import output_params

    started = time.perf_counter()
    p, overwrite = job.prompt, job.output.overwrite
    seed = random_seed(p.seed)
    out = job.output.out or default_output(f"qimg-{seed}", numbered=not overwrite)
    check_output(out, overwrite)
    engine = engines(job.model, open_cache(job.cache))
    d = engine.defaults
    width, height = job.size or (d.width, d.height)
    steps, cfg = p.steps or d.steps, d.cfg if p.cfg is None else p.cfg
    negative_prompt = d.negative_prompt if p.negative_prompt is None else p.negative_prompt
    callback, done = reporter.steps("generating", steps)
    result = engine.generate(p.prompt, negative_prompt, width, height, steps, cfg, seed, callback)
    done()
    params = output_params("generate", engine, job.preset, prompt=p.prompt, negative_prompt=negative_prompt,
                           seed=seed, width=width, height=height, steps=steps, cfg=cfg)
    save_output(engine, reporter, out, params, result.image, result.latent, overwrite)
    reporter.result(out, {**params, **cache_use(result)}, started)


# --- inpaint and outpaint, one file or a batch -------------------------------------------------------------


def mask_builder(job: Edit):
    """(build(image, pixels, picture) -> (canvas, mask), mask_file(image) -> the mask file it reads or None)."""
    from . import masks

    s = job.shape
    if isinstance(s, InpaintMask):
        if s.mask and s.mask_dir:
            raise UsageError("give --mask or --mask-dir, not both")

        def mask_file(image):
            return s.mask or (s.mask_dir and batch.mask_for(s.mask_dir, image))

        def build(image, pixels, picture):
            return pixels, edits.inpaint_mask(pixels, picture, image, mask_file(image), s.rect, s.mask_resize,
                                              s.invert_mask, s.grow, s.feather)

        return build, mask_file

    def build(_image, pixels, _picture):
        margins = edits.outpaint_margins(pixels.shape[1::-1], s.left, s.right, s.top, s.bottom, s.expand, s.to,
                                         s.anchor)
        return masks.outpaint_canvas(pixels, margins, s.feather)

    return build, lambda image: None


def edit_output(image: Path, out: Optional[Path], out_dir: Optional[Path], kind: str, overwrite: bool,
                is_batch: bool = False, inputs=(), read_only=()) -> Path:
    """Where an edit goes, checked by files.check_output: --out, or `<stem>.<kind>.png` in --out-dir or beside
    the input. A single run numbers that name (`-2`, `-3`...) when it is taken; a batch, or --overwrite, keeps
    it. An existing file (the input among them) is replaced only with --overwrite; `read_only` ones never."""
    from .files import check_output, default_output

    target = out or default_output(f"{image.stem}.{kind}", out_dir or image.parent,
                                   numbered=not (is_batch or overwrite))
    check_output(target, overwrite, (image, *inputs), read_only, "--out" if out else "output")
    return target


def edit(job: Edit, reporter: Reporter) -> None:
    """For each input build (canvas, mask), inpaint, save, report.

    One input file runs as a plain command: its errors end the run. In a batch the outputs have fixed names,
    and if any exists already the batch is refused before anything runs, unless --skip-existing (skip them)
    or --overwrite (replace them). A bad input, or an output that appears while the batch runs, is reported
    and skipped, the others complete, and the run ends with a summary and exit 1; a failure of the model or
    of a write still ends it at once. The model loads once, for the first input that needs it."""
    kind, out, out_dir, overwrite = job.kind, job.output.out, job.out_dir, job.output.overwrite
    edits.check_strength(job.strength)
    if job.skip_existing and overwrite:
        raise UsageError("give --skip-existing or --overwrite, not both")
    build, mask_file = mask_builder(job)
    files, is_batch = batch.expand_inputs(list(job.images))
    if is_batch and out:
        raise UsageError(f"--out names one file but {len(files)} inputs were given; use --out-dir")
    batch.check_distinct_outputs(files, kind, out_dir)
    if is_batch and not (job.skip_existing or overwrite):
        batch.check_outputs_free(files, kind, out_dir)
    store = open_cache(job.cache)
    engine = functools.cache(lambda: engines(job.model, store))
    failed = []
    advance, _ = reporter.bar("images", len(files)) if is_batch else (lambda: None, None)
    for image in files:
        started, done = time.perf_counter(), out or batch.output_name(image, kind, out_dir)
        if job.skip_existing and done.exists():
            reporter.skipped(image, done)
        else:
            failure = None
            try:
                canvas, mask = edits.prepare(image, build)
                target = edit_output(image, out, out_dir, kind, overwrite, is_batch, files, (mask_file(image),))
            except QimgError as e:
                failure = e
            else:
                seed = batch.file_seed(job.prompt.seed, image) if is_batch and job.prompt.seed is not None \
                    else job.prompt.seed
                try:
                    edit_one(job, image, canvas, mask, target, seed, engine(), reporter, started)
                except OutputExists as e:
                    failure = e
            if failure is not None:
                if not is_batch:
                    raise failure
                failed.append(image)
                reporter.failed(image, failure)
        advance()
    if failed:
        raise QimgError(f"{len(failed)} of {len(files)} images failed: {', '.join(map(str, failed))}")


def edit_one(job: Edit, image: Path, canvas, mask, out: Path, seed: Optional[int], engine, reporter: Reporter,
             started: float) -> None:
    from .cache import array_hash
    from .masks import selected_area
    from .metadata import output_params
    from .sampling import first_step

    seed, d, p = random_seed(seed), engine.defaults, job.prompt
    steps = p.steps or d.steps
    cfg = d.cfg if p.cfg is None else p.cfg
    negative = d.negative_prompt if p.negative_prompt is None else p.negative_prompt
    callback, done = reporter.steps(job.kind, steps - first_step(steps, job.strength))
    result = engine.inpaint(canvas, mask, p.prompt, negative, steps, cfg, seed, job.strength, job.attn_mask == "on",
                            job.context, callback)
    done()
    height, width = result.image.shape[:2]
    params = output_params(job.kind, engine, job.preset, prompt=p.prompt, negative_prompt=negative, seed=seed,
                           width=width, height=height, steps=steps, cfg=cfg, strength=job.strength,
                           attn_mask=job.attn_mask, context=job.context, input=str(image),
                           mask_area=selected_area(mask), mask_sha256=array_hash(mask), box=list(result.box),
                           work_size=list(result.work_size), latent_cache=result.latent_cache)
    save_output(engine, reporter, out, params, result.image, result.latent, job.output.overwrite)
    reporter.result(out, {**params, **cache_use(result)}, started)


# --- chain -------------------------------------------------------------------------------------------------


def chain(job: Chain, reporter: Reporter) -> None:
    from . import chain as chains
    from .files import check_output, load_image
    from .metadata import output_params

    started = time.perf_counter()
    overwrite = job.output.overwrite
    store = open_cache(job.cache)
    pixels, picture = load_image(job.image)
    planned = chains.plan(list(job.steps), pixels, picture)
    seed = random_seed(job.seed)
    reads = chains.files_read(job.chain_file, job.steps)  # never written, --overwrite or not
    out = edit_output(job.image, job.output.out, None, "chain", overwrite, read_only=reads)
    step_files = chains.step_files(job.image, job.steps, job.keep_steps) if job.keep_steps is not None else {}
    for step_file in step_files.values():
        check_output(step_file, overwrite, (job.image,), reads, "--keep-steps file")
        if step_file.resolve() == out.resolve():
            raise UsageError(f"--out {out} is also a --keep-steps file; choose another name")
    engine = engines(job.model, store)

    def params(canvas, lineage: list) -> dict:
        width, height = canvas.size
        seeds = sorted({entry["seed"] for entry in lineage})  # those the edits used
        return output_params("chain", engine, job.preset, lineage, input=str(job.image),
                             chain=str(job.chain_file), seed=seeds[0] if len(seeds) == 1 else seeds,
                             width=width, height=height)

    lineage = []
    for done, canvas, entry in chains.run(engine, planned, pixels, seed, reporter):
        lineage.append(entry)
        if done.step.index in step_files:
            save_output(engine, reporter, step_files[done.step.index], params(canvas, lineage),
                        engine.render(canvas), overwrite=overwrite)
    final = params(canvas, lineage)
    save_output(engine, reporter, out, final, engine.render(canvas), overwrite=overwrite)
    reporter.result(out, final, started)
