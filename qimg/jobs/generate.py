"""generate: one prompt, one image; and generate --prompts, each entry of a prompts file as a generate job of
one batch (fixed output names, per-entry seeds), with one engine kept for all."""

import functools
import os
import time
from dataclasses import replace

from qimg.errors import OutputExists, UsageError, Withheld
from qimg.jobs import batch, names, safety, shard
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
from qimg.jobs.previews import preview_file
from qimg.jobs.report import Reporter
from qimg.jobs.spec import Generate, Output, Prompts


def generate(job: Generate, reporter: Reporter) -> None:
    from qimg.images import check_alpha_format, check_format_size, check_output, check_preview

    started = time.perf_counter()
    overwrite = job.output.overwrite
    safety.prepare(job.output.safety)
    safety.check_prompt(job.output.safety, job.prompt.prompt, None if job.member else "--prompt")
    store = open_cache(job.cache)
    folder = resolve_model(job.model)
    generation_model(folder, "generate")
    seed = random_seed(job.prompt.seed)
    out, next_free = output_target(job.output.out, functools.partial(names.generate_output, seed), not overwrite)
    check_output(out, overwrite, what="output" if job.member else "--out", size=job.size)
    from qimg.weights.folders import model_kind  # torch: after the checks that need none (--cache-size)

    if model_kind(folder).rgba:
        check_alpha_format(out, job.output.background, "output" if job.member else "--out")
    licence_notice(folder, job.output.quiet)
    preview = preview_file(job.output.preview, job.output.preview_every, job.output.safety)
    if preview:
        check_preview(preview.path, {out: "the output"}, overwrite)
    engine = open_engine(folder, job.model, store)
    width, height = job.size or (engine.defaults.width, engine.defaults.height)
    check_format_size(out, (width, height))
    sampling = job.prompt.resolve(engine.defaults, seed)
    if engine.kind.family == "qwen-image-2.1":
        sampling = engine.own_steps(sampling)  # Turbo: its grid's steps, reported as run
    sample_and_save(job, "generate", engine, reporter, sampling,
                    lambda callback: engine.generate(sampling, width, height, callback, preview), (out, next_free),
                    preview, started)


def prompt_jobs(job: Prompts) -> list[tuple[str, Generate]]:
    """Every check of generate --prompts that needs no model (the model folder found, unless every entry's prompt
    is withheld), and this shard's entries as generate jobs:
    (how messages name the entry, its job). As a folder batch: fixed output names, refused up front if any
    exists unless --skip-existing or --overwrite, each entry's seed its own or derived from --seed and its
    output name."""
    from qimg.images import check_folder
    from qimg.jobs import prompts_file

    if job.skip_existing and job.output.overwrite:
        raise UsageError("give --skip-existing or --overwrite, not both")
    if job.output.out is not None:
        raise UsageError("--out names one file but --prompts makes one per prompt; use --out-dir")
    safety.prepare(job.output.safety)
    open_cache(job.cache)
    check_folder(job.out_dir, "--out-dir")
    if job.output.preview is not None:  # a folder, each entry's preview named as its output
        check_folder(job.output.preview, "--preview")
        if batch.real(job.output.preview) == batch.real(job.out_dir):
            raise UsageError(f"--preview {job.output.preview} is the --out-dir: the previews would replace the "
                             "outputs; give another folder")
    entries = prompts_file.read(job.file)
    chosen = shard.select(entries, lambda e: e.name, job.shard)
    announce_shard(job.shard, len(chosen), len(entries), "prompts")
    runs = [(f"{job.file} {e.where}", entry_job(job, e)) for e in chosen]
    screen = job.output.safety  # as single runs: a prompt hit is exit 3 whatever the model folder holds
    if not screen.prompts or any(safety.prompt_hit(screen, g.prompt.prompt) is None for _, g in runs):
        resolve_model(job.model)  # a model some entry will load: a wrong --model shows before any runs
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
                           job.output.preview and job.output.preview / e.name, job.output.preview_every,
                           job.output.metadata, replace(job.output.safety, item=f"{job.file} {e.where}")),
                    job.model, job.cache,
                    job.preset, member=True)


def prompts(job: Prompts, reporter: Reporter) -> None:
    """generate --prompts: each entry as a generate job, with one engine kept for all (jobs/kept_engine.py). An
    output that appears while the batch runs, or a size the device cannot hold, is that entry's failure: the
    others complete, and the run ends with a summary and exit 1."""
    from qimg.jobs import kept_engine

    runs, failed, withheld = prompt_jobs(job), [], []
    advance = reporter.bar("prompts", len(runs))
    with kept_engine.kept():
        for where, gen in runs:
            if job.skip_existing and os.path.lexists(gen.output.out):
                reporter.skipped(where, gen.output.out)
            else:
                try:
                    generate(gen, reporter)
                except Withheld as e:  # its prompt or its image: the others go on
                    withheld.append(where)
                    reporter.withheld(where, e)
                except (UsageError, OutputExists) as e:
                    failed.append(where)
                    reporter.failed(where, e)
            advance()
    safety.batch_end(failed, withheld, len(runs), "prompts")
