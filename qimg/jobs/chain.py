"""chain: a chain file's edits (read by the command line into the job's steps) run on one input in one process,
the latent carried between them (chain_plan.py plans and walks them); the checks that need no model first, then
the output and --keep-steps files saved."""

import time
from pathlib import Path

from qimg.errors import UsageError
from qimg.jobs import batch, safety
from qimg.jobs.common import (
    generation_model,
    licence_notice,
    open_cache,
    open_engine,
    random_seed,
    resolve_model,
    save_output,
)
from qimg.jobs.edit import edit_output
from qimg.jobs.previews import last_preview, preview_file
from qimg.jobs.report import Reporter
from qimg.jobs.spec import Chain


def chain_model(folder: Path, steps, size: tuple[int, int]) -> None:
    """A chain's edits all need the model it runs: instruction edits an Edit model that takes their pictures
    (the canvas of `size` and the refs) at their areas, the others Qwen-Image."""
    from qimg.engine.instruct import check_model, check_pictures, pick_areas
    from qimg.images import load_image
    from qimg.weights.folders import model_kind

    kind = model_kind(folder)
    for step in steps:
        try:
            if kind.family == "qwen-image-2.1":
                chain_step_21(kind, step, size)
            elif step.kind == "edit":
                refs = step.refs
                check_pictures(check_model(folder, "chain"), [size, *(load_image(r)[0].shape[1::-1] for r in refs)],
                               ["the input", *map(str, refs)])
                pick_areas(folder, (step.edit_area, step.vision_area), ("edit_area", "vision_area"))
            else:
                generation_model(folder, "chain")
        except UsageError as e:
            raise UsageError(f"{step.where}: {e}") from None


def chain_step_21(kind, step, size: tuple[int, int]) -> None:
    """A chain edit a Qwen-Image-2.1 model can run: an instruction edit (its pictures resized once, to the edit
    area), within the pictures it takes."""
    from qimg.engine.instruct import check_aspect
    from qimg.images import load_image
    from qimg.model.qwen21_prompt import MAX_PICTURES

    if step.kind != "edit":
        raise UsageError(f"{kind.display} runs `edit:` steps in a chain, not {step.kind}: use edit with a mask or "
                         "rect to change a part")
    if step.vision_area is not None:
        raise UsageError(f"vision_area is for Qwen-Image-Edit-2509/2511; {kind.display} resizes each picture once, "
                         "to edit_area")
    if len(step.refs) + 1 > MAX_PICTURES:
        raise UsageError(f"{len(step.refs) + 1} pictures; {kind.display} takes up to {MAX_PICTURES}")
    check_aspect([size, *(load_image(r)[0].shape[1::-1] for r in step.refs)], ["the input", *map(str, step.refs)])


def chain(job: Chain, reporter: Reporter) -> None:
    import numpy as np

    from qimg.images import check_output, check_preview, flatten, load_image
    from qimg.jobs import chain_plan as chains
    from qimg.jobs.metadata import output_params
    from qimg.weights.folders import model_kind

    started = time.perf_counter()
    overwrite = job.output.overwrite
    screen = job.output.safety
    safety.prepare(screen)
    for step in job.steps:  # every edit's prompt (an instruction's too) before anything loads
        safety.check_prompt(screen, step.prompt.prompt, step.where)
    store = open_cache(job.cache)
    folder = resolve_model(job.model)
    pixels, picture = load_image(job.image)
    chain_model(folder, job.steps, pixels.shape[1::-1])
    licence_notice(folder, job.output.quiet)
    regions = chains.word_regions(list(job.steps), pixels, store)
    planned = chains.plan(list(job.steps), pixels.shape[1::-1], picture, regions)
    seed = random_seed(job.seed)
    reads = chains.files_read(job.chain_file, job.steps)  # never written, --overwrite or not
    sizes = {p.step.index: p.size for p in planned}  # each edit's result, (width, height)
    out, next_free = edit_output(job.image, job.output.out, None, "chain", overwrite, read_only=reads,
                                 size=planned[-1].size)
    if model_kind(folder).rgba:  # its canvas keeps the input's alpha, edit after edit
        from qimg.images import check_alpha_format

        check_alpha_format(out, job.output.background)
        pixels = np.asarray(picture.convert("RGBA"))
    step_files = chains.step_files(job.image, job.steps, job.keep_steps) if job.keep_steps is not None else {}
    for index, step_file in step_files.items():
        check_output(step_file, overwrite, (job.image,), reads, "--keep-steps file", sizes[index])
        if batch.real(step_file) == batch.real(out):
            raise UsageError(f"--out {out} is also a --keep-steps file; choose another name")
    preview = preview_file(job.output.preview, job.output.preview_every, screen)
    if preview:
        taken = {out: "the output", job.image: "the input image", **{r: "a file this chain reads" for r in reads},
                 **{f: f"the --keep-steps file of edit {i}" for i, f in step_files.items()}}
        check_preview(preview.path, taken, overwrite)
    engine = open_engine(folder, job.model, store)

    def params(canvas, lineage: list):
        width, height = canvas.size
        seeds = sorted({entry["seed"] for entry in lineage})  # those the edits used
        return output_params("chain", engine, job, lineage, dict(input=job.image, chain=job.chain_file),
                             seed=seeds[0] if len(seeds) == 1 else seeds, width=width, height=height,
                             calls=sum(entry["calls"] for entry in lineage))

    lineage = []
    for done, canvas, entry in chains.run(engine, planned, pixels, picture, seed, reporter, preview, regions,
                                          store=not screen.images):
        lineage.append(entry)
        if done.step.index in step_files:  # a kept step the filter refuses ends the chain: no further files
            kept = flatten(engine.render(canvas), job.output.background)
            kept, hit = safety.screen(screen, kept, step_files[done.step.index], preview)
            save_output(engine, reporter, step_files[done.step.index],
                        safety.with_record(params(canvas, lineage), hit).stored, kept, overwrite=overwrite)
    image, hit = safety.screen(screen, flatten(engine.render(canvas), job.output.background), out, preview)
    final = safety.with_record(params(canvas, lineage), hit)
    out = save_output(engine, reporter, out, final.stored, image, overwrite=overwrite, next_free=next_free)
    reporter.result(out, {**final.report, **last_preview(preview, image, final.stored)}, started)
