"""Batches: which files the IMAGE arguments name, their masks and seeds, and the checks of their outputs (named
by names.py). Pure path logic, so every problem with the arguments shows before a model loads."""

import glob
import hashlib
import os
from pathlib import Path

from qimg.errors import QimgError, UsageError, listing
from qimg.jobs import names

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def expand_inputs(args: list[Path]) -> tuple[list[Path], bool]:
    """The files IMAGE arguments name, and whether they make a batch.

    A file is taken as it is (a missing one too: it fails on its own, in its turn). A folder gives its image
    files, sorted, leaving out qimg's own outputs (`*.inpaint.png`, `*.outpaint-2.png`) and `*_mask` files, so
    re-running over a folder does not edit its results. A glob the shell left alone (quoted, or Windows)
    gives its matches. Several arguments, a folder or a glob make a batch; one file does not."""
    named, batch = named_inputs(args)
    return [f for f, _ in named], batch


def named_inputs(args: list[Path]) -> tuple[list[tuple[Path, str]], bool]:
    """expand_inputs' files, each with its name relative to the batch's root (what --shard divides by, the
    same on every machine whatever the working folder or mount point): a folder's files by their name in
    it, a glob's matches relative to the glob's fixed leading folders, a file given alone by its name."""
    files, batch = [], len(args) > 1
    for arg in args:
        if arg.is_dir():
            found = sorted(p for p in arg.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not names.LEFT_OUT.search(p.stem))
            if not found:
                raise UsageError(f"folder {arg} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += [(p, p.name) for p in found]
            batch = True
        elif not arg.exists() and glob.has_magic(str(arg)):
            found = sorted(Path(p) for p in glob.glob(str(arg)) if Path(p).is_file())
            if not found:
                raise UsageError(f"no files match {str(arg)!r}")
            root = os.path.join(*(_fixed_parts(arg) or (".",)))
            files += [(p, Path(os.path.relpath(p, root)).as_posix()) for p in found]
            batch = True
        else:
            files.append((arg, arg.name))
    unique = list({real(f): (f, name) for f, name in reversed(files)}.values())[::-1]  # each file once, first kept
    return unique, batch


def _fixed_parts(pattern: Path) -> tuple[str, ...]:
    """The leading parts of a glob with no wildcard in them."""
    parts = pattern.parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return parts[:fixed]


def real(path: Path) -> Path:
    """The file a path names, links resolved (Path.resolve raises on a link that loops; this keeps it as is:
    it names no file, and fails on its own when read or written)."""
    return Path(os.path.realpath(path))


def mask_for(mask_dir: Path, image: Path) -> Path:
    """`<stem>.png` or else `<stem>_mask.png` in mask_dir (any image suffix)."""
    for stem in (image.stem, f"{image.stem}_mask"):
        for suffix in sorted(IMAGE_SUFFIXES):
            path = mask_dir / f"{stem}{suffix}"
            if path.is_file():
                return path
    raise UsageError(f"no mask for {image.name} in {mask_dir} ({image.stem}.png or {image.stem}_mask.png)")


def file_seed(seed: int, image: Path) -> int:
    """A batch file's own seed: fixed by the batch seed and the file's name (not its folder), so a re-run or a
    resumed run gives every file the seed it had, and files differ from one another."""
    return name_seed(seed, image.name)


def name_seed(seed: int, name: str) -> int:
    """The seed of a batch's item called `name` (an input's file name, a prompt file's output name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:4], "big")


def check_distinct_outputs(files: list[Path], kind: str, out_dir: Path | None) -> None:
    """Refuse a batch in which two inputs would write one output, or an output would replace another input."""
    seen, inputs = {}, {real(f) for f in files}
    for f in files:
        out = names.edit_output(f, kind, out_dir)
        if out in seen:
            raise UsageError(f"{seen[out]} and {f} would both write {out}; run them with different --out-dir")
        if real(out) in inputs:
            raise UsageError(f"{out} is an input and the output of {f}; write the outputs elsewhere with --out-dir")
        seen[out] = f


def check_reads_kept(files: list[Path], kind: str, out_dir: Path | None, reads, refs: tuple = ()) -> None:
    """Refuse a batch in which an output would replace a file the batch reads (any input, any input's mask, a
    --ref picture every edit reads), --overwrite or not: the files are read one after another, so a replaced
    one would be read as the new picture. reads(image): the masks that input's edit reads; one it cannot name
    fails in its turn."""
    read = {real(f): f"input {f}" for f in files}
    read.update((real(r), f"the --ref picture {r}") for r in refs)
    for f in files:
        try:
            others = reads(f)
        except UsageError:
            continue
        read.update((real(p), f"the mask of {f}") for p in others if p is not None and real(p) not in read)
    for f in files:
        out = names.edit_output(f, kind, out_dir)
        if real(out) in read:
            raise UsageError(f"{out}, the output of {f}, is {read[real(out)]}, which this batch reads and never "
                             "replaces; write the outputs elsewhere with --out-dir")


def check_outputs_free(files: list[Path], kind: str, out_dir: Path | None) -> None:
    """Refuse, before anything runs, a batch whose outputs exist already: without --skip-existing or
    --overwrite it is unclear whether the user means to resume or to redo, and a guess costs work or files."""
    check_free([names.edit_output(f, kind, out_dir) for f in files])


def check_free(outputs: list[Path]) -> None:
    """check_outputs_free for a batch's output paths."""
    taken = [out for out in outputs if os.path.lexists(out)]  # a dangling symlink too
    if taken:
        raise UsageError(f"{len(taken)} of {len(outputs)} outputs exist already ({listing(map(str, taken), 3)}); "
                         "pass --skip-existing to resume the batch, or --overwrite to replace them")


def failed_summary(failed: list, total: int, what: str) -> QimgError:
    """The error a batch ends with when some of its items failed (exit 1), naming them."""
    return QimgError(f"{len(failed)} of {total} {what} failed: {', '.join(map(str, failed))}")
