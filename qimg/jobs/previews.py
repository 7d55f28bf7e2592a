"""--preview: the running estimate of an output written to a file as it renders (PreviewFile), the last time the
result with its parameters; for an edit batch, one file each in the --preview folder, all checked before
anything runs."""

import os
import time
from pathlib import Path
from typing import Optional

from qimg.errors import UsageError, say
from qimg.jobs import batch, names
from qimg.jobs.spec import Edit, Inpaint, Safety


class PreviewFile:
    """--preview for one output: the running estimate the engine offers (preview.Preview) written over `path`
    every `every` steps of each sampling run (None: about a tenth of its steps) by images.save_image, so a
    viewer never reads a partial file and a stopped run leaves the last complete one; the last write is the
    result. Each carries its step ("3/50", or "result") in the PNG chunk that marks it as a preview.
    Counts the writes and the time they took, decoding included."""

    def __init__(self, path: Path, every: Optional[int], safety: Optional[Safety] = None):
        self.path, self.every, self.count, self.seconds = path, every, 0, 0.0
        self.safety, self.held = safety or Safety(), 0  # the image filter (jobs/safety.py); previews it held back

    def __call__(self, done: int, total: int, estimate) -> None:
        if done < total and done % (self.every or max(1, round(total / 10))) == 0:  # the last: the result's
            self.write(estimate, f"{done}/{total}")

    def write(self, image, step: str, params: Optional[dict] = None, screened: bool = False) -> None:
        """Write image() (H, W, 3) uint8, with the output's parameters if given; screened: the result, which the
        safety filter has seen already. A running estimate the image filter flags is held back (the preview on disk
        removed) or written blurred or black, as --safety-action says."""
        from PIL import Image

        from qimg.images import PREVIEW_CHUNK, save_image
        from qimg.jobs import safety
        from qimg.jobs.metadata import png_text

        started = time.perf_counter()
        pixels = image()
        hit = safety.image_hit(self.safety, pixels) if self.safety.images and not screened else None
        if hit is not None:
            if not self.held:
                named = safety.named(self.safety, self.path)
                what = f"the preview of {named}" if named != self.path else f"the preview {named}"
                say(f"qimg: safety: {what} at step {step} and any later flagged: {safety.told(hit)}")
            self.held += 1
            if hit["action"] == "refuse":
                self.withdraw()
                return
            pixels = safety.censor(pixels, hit["action"])
        text = {**png_text(params), PREVIEW_CHUNK: step}
        save_image(Image.fromarray(pixels), self.path, text, overwrite=True, fast=True)
        self.count, self.seconds = self.count + 1, self.seconds + time.perf_counter() - started

    def withdraw(self) -> None:
        """Remove the preview this run wrote (a flagged image's estimate must not stay on disk)."""
        if self.count:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def preview_file(path: Optional[Path], every: Optional[int], safety: Optional[Safety] = None) -> Optional[PreviewFile]:
    return None if path is None else PreviewFile(path, every, safety)


def last_preview(preview: Optional[PreviewFile], image, params: Optional[dict]) -> dict:
    """The result written as the last preview (its pixels and parameters, those the output stores: `qimg info`
    reads it like the output); then what --json says of the previews ({} without --preview)."""
    if preview is None:
        return {}
    preview.write(lambda: image, "result", params, screened=True)
    held = dict(previews_withheld=preview.held) if preview.held else {}
    return dict(previews=preview.count, preview_seconds=round(preview.seconds, 3), **held)


def edit_previews(job: Inpaint | Edit, files: list[Path], is_batch: bool, mask_file, refs=()):
    """previews(image, its output) -> its PreviewFile (None without --preview): for one input, the file --preview
    names, checked when asked; for a batch, its output's name in the --preview folder, all of them checked
    here, before anything runs, against every file the batch reads or writes."""
    from qimg.images import check_folder, check_preview

    where, every = job.output.preview, job.output.preview_every
    if where is None:
        return lambda image, out: None
    if not is_batch:
        def previews(image, out):
            check_preview(where, {out: "the output", image: "the input image", mask_file(image): "the mask",
                                  **{r: "a --ref picture" for r in refs}}, job.output.overwrite)
            return PreviewFile(where, every, job.output.safety)

        return previews
    if where.suffix.lower() == ".png" and not os.path.lexists(where):  # (an existing file: check_folder says so)
        raise UsageError(f"--preview {where}: a batch writes one preview per input, into a folder; give a folder")
    check_folder(where, "--preview")
    if any(batch.real(f.parent) == batch.real(where) for f in files):
        raise UsageError(f"--preview {where} holds inputs of this batch: previews there would be read as inputs by "
                         "the next run over it; give another folder")

    def path(image):
        return names.batch_preview(where, image, job.kind)

    taken = {batch.real(f): f"the input {f}" for f in files}
    taken.update((batch.real(r), f"the --ref picture {r}") for r in refs)
    taken.update((batch.real(names.edit_output(f, job.kind, job.out_dir)), f"the output of {f}") for f in files)
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
    return lambda image, out: PreviewFile(path(image), every, job.output.safety)
