"""The safety filter (docs/safety.md): a best-effort check of prompts before any model loads and of images
before they are written, off unless --safety (or $QIMG_SAFETY, or a preset) turns it on. The job layer decides
what is written, so the image check sits where outputs and previews are saved; the engine knows nothing of it.

- Prompts (`--safety prompt` or `both`): the word lists (safety_words.py) and the prompt classifier, on a
  prompt, an instruction or a chain edit's prompt (never the negative prompt); a hit withholds the item before
  any model loads (errors.Withheld, exit 3).
- Images (`image` or `both`): the classifier (safety_models.py) scores every output and every preview before it
  reaches the disk; a score at or over the threshold is a hit, and --safety-action says what it becomes:
  refuse (nothing written, the item's preview removed; exit 3), blur or black (written so, exit 0).
Each hit is one stderr line naming the item, the filter, the score, the threshold and the action, never the
prompt's text (unless --debug); --json and the output's metadata carry the same as `"safety"`, and no prompt's
text."""

import functools
import os
from pathlib import Path
from typing import Optional

import numpy as np

from qimg.errors import UsageError, Withheld, say
from qimg.jobs import safety_models
from qimg.jobs.safety_words import Words
from qimg.jobs.spec import Safety

BLUR_RADIUS = 32  # InvokeAI's (pixels), for images up to 1024 on a side; larger ones blur in proportion


def prepare(spec: Safety) -> None:
    """Everything the filter needs, checked and loaded before any model: the word lists read, the classifiers
    imported (no image classifier installed, or neither a word list nor a prompt classifier for the prompt
    check: one usage line, exit 2)."""
    if spec.prompts:
        if not spec.words and not spec.prompt_classifier:
            raise UsageError("--safety prompt needs something to check prompts with: a word list (--safety-words "
                             "FILE or QIMG_SAFETY_WORDS) or --safety-prompt-classifier MODULE:CALLABLE")
        for path in spec.words:
            word_list(path)
        if spec.prompt_classifier:
            safety_models.prompt_classifier(spec.prompt_classifier)
    if spec.images:
        safety_models.image_classifier(spec.classifier)


def word_list(path: Path) -> Words:
    """A word list, read again only when its file changed (the worker runs many jobs)."""
    try:
        stat = os.stat(path)
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except OSError:
        key = None  # Words.read says what is wrong with it
    return _word_list(Path(path), key)


@functools.lru_cache(maxsize=16)
def _word_list(path: Path, _key) -> Words:
    return Words.read(path, "safety word list")


def record(kind: str, score: float, spec: Safety, action: str) -> dict:
    """What --json, the metadata and the hit's line say of a hit."""
    return dict(filter=kind, score=round(score, 4), threshold=spec.threshold, action=action)


def told(rec: dict) -> str:
    score, threshold = rec["score"], rec["threshold"]
    return f"the {rec['filter']} filter scored {score:g} (threshold {threshold:g}), action {rec['action']}"


def check_prompt(spec: Safety, text: str, where: Optional[str]) -> None:
    """Withhold the item whose prompt (or instruction) `text` a word list or the prompt classifier flags;
    where: how the line names it ("--prompt", "chain.yaml edit 2"; None: the batch's reporter names it)."""
    hit = prompt_hit(spec, text) if spec.prompts else None
    if hit is None:
        return
    rec, detail = hit
    where, shown = f"{where}: " if where else "", f" ({detail})" if spec.debug else ""
    raise Withheld(f"{where}the prompt is withheld before any model loads: {told(rec)}{shown}", rec)


def prompt_hit(spec: Safety, text: str) -> Optional[tuple[dict, str]]:
    """(the hit's record, what matched: for --debug only) when a word list or the prompt classifier flags
    `text`, else None."""
    for path in spec.words:
        term = word_list(path).match(text)
        if term is not None:
            return record("words", 1.0, spec, "refuse"), f"matched {term!r} of {path} in {text!r}"
    if spec.prompt_classifier:
        score = safety_models.scored(safety_models.prompt_classifier(spec.prompt_classifier), text, "prompt")
        if score >= spec.threshold:
            return record("prompt classifier", score, spec, "refuse"), f"prompt {text!r}"
    return None


def image_hit(spec: Safety, image: np.ndarray) -> Optional[dict]:
    """The hit's record when the image classifier flags `image` (H, W, 3 uint8), else None."""
    from PIL import Image

    classify = safety_models.image_classifier(spec.classifier)
    score = safety_models.scored(classify, Image.fromarray(image), "image")
    return record("image", score, spec, spec.action) if score >= spec.threshold else None


def censor(image: np.ndarray, action: str) -> np.ndarray:
    """The image as --safety-action writes a flagged one: black, or blurred past recognition."""
    if action == "black":
        return np.zeros_like(image)
    from PIL import Image, ImageFilter

    radius = max(BLUR_RADIUS, max(image.shape[:2]) * BLUR_RADIUS // 1024)
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def screen(spec: Safety, image: np.ndarray, where, preview=None) -> tuple[np.ndarray, Optional[dict]]:
    """An output's image checked before it is written: (the image to write, the hit's record or None). On a hit
    with action refuse, its preview (previews.PreviewFile, if any) is removed and the item withheld."""
    if not spec.images:
        return image, None
    rec = image_hit(spec, image)
    if rec is None:
        return image, None
    where = named(spec, where)
    if spec.action == "refuse":
        if preview is not None:
            preview.withdraw()
        raise Withheld(f"{where}: the image is withheld, nothing written: {told(rec)}", rec)
    say(f"qimg: safety: {where}: the image is written {'blurred' if spec.action == 'blur' else 'black'}: {told(rec)}")
    return censor(image, spec.action), rec


def named(spec: Safety, path) -> str:
    """How a hit's line names an output (or preview) file: a --prompts entry by its place in the file, since its
    file names carry its prompt's words (0001-a-red-circle.png); with --debug, by the file."""
    return spec.item if spec.item and not spec.debug else path


PROMPT_FIELDS = ("prompt", "negative_prompt")  # the text of a hit's prompts: in no record of its output


def with_record(params, rec: Optional[dict]):
    """metadata.Params with the hit's record added as "safety" (to --json and to what the PNG stores), and its
    prompts' text (each chain edit's too) left out: a blurred or black output does not say what it showed."""
    if rec is None:
        return params

    def censored(fields: dict) -> dict:
        kept = {k: v for k, v in fields.items() if k not in PROMPT_FIELDS}
        if kept.get("lineage"):
            kept["lineage"] = [{k: v for k, v in entry.items() if k not in PROMPT_FIELDS} for entry in kept["lineage"]]
        return {**kept, "safety": rec}

    return type(params)(censored(params.report), None if params.stored is None else censored(params.stored))


def batch_end(failed: list, withheld: list, total: int, what: str) -> None:
    """A batch's end: any withheld item ends it with exit 3 (the failed named too), failed items alone with 1."""
    from qimg.jobs.batch import failed_summary

    if withheld:
        also = f"; {failed_summary(failed, total, what)}" if failed else ""
        raise Withheld(f"{len(withheld)} of {total} {what} withheld by the safety filter: "
                       f"{', '.join(map(str, withheld))}{also}")
    if failed:
        raise failed_summary(failed, total, what)
