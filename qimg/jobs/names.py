"""Every name qimg gives a file it writes, and the ones a folder's listing skips: decided here only, so the
check that an output exists (--skip-existing, a batch refused when its outputs exist) and the write name the
same file. Pure path logic: nothing here reads or writes a file, except `free_name` looking for a free one."""

import os
import re
from pathlib import Path

EDIT_KINDS = ("inpaint", "outpaint", "edit")  # the commands that write <stem>.<kind>.png
# Stems a folder's listing skips: qimg's own edit outputs (numbered ones too) and masks, so re-running over a
# folder does not edit its results.
LEFT_OUT = re.compile(rf"(\.({'|'.join(EDIT_KINDS)})(-\d+)?|_mask)$")


def free_name(stem: str, folder: Path = Path("."), numbered: bool = True) -> Path:
    """`stem.png`, or (`numbered`) `stem-2.png`, `stem-3.png`... whichever does not exist yet."""
    path, n = folder / f"{stem}.png", 1
    while numbered and os.path.lexists(path):  # a dangling symlink takes its name too
        n += 1
        path = folder / f"{stem}-{n}.png"
    return path


def edit_output(image: Path, kind: str, out_dir: Path | None, numbered: bool = False) -> Path:
    """Where an edit of `image` goes when no --out names it: `<stem>.<kind>.png` in out_dir or beside the input;
    `numbered` (a single run, without --overwrite): the first free of `<stem>.<kind>-2.png`, `-3`..."""
    return free_name(f"{image.stem}.{kind}", out_dir or image.parent, numbered)


def mask_output(image: Path, out_dir: Path | None) -> Path:
    """`qimg mask`'s output and --save-mask's file in a folder: `<stem>_mask.png` in out_dir or beside the input,
    a name --mask-dir reads and a folder's listing skips."""
    return (out_dir or image.parent) / f"{image.stem}_mask.png"


def generate_output(seed: int, numbered: bool = True) -> Path:
    """generate's output when no --out names it: `qimg-<seed>.png` in the working folder, numbered if taken."""
    return free_name(f"qimg-{seed}", Path("."), numbered)


def prompt_output(n: int, slug: str) -> str:
    """The file name of a prompts file's entry n: `<n>-<slug>.png` (n padded to 4 digits so listings sort)."""
    return f"{n:04d}-{slug}.png" if slug else f"{n:04d}.png"


def batch_preview(folder: Path, image: Path, kind: str) -> Path:
    """An edit batch's --preview file for `image`: its output's name, in the preview folder."""
    return folder / edit_output(image, kind, None).name


def kept_step(folder: Path, image: Path, index: int, kind: str) -> Path:
    """chain --keep-steps: edit `index`'s image, `<stem>.<NN>-<kind>.png` in `folder`."""
    return folder / f"{image.stem}.{index:02d}-{kind}.png"
