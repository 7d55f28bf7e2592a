"""`qimg cache` and `qimg cache clear`: where the cache is, what it holds, and emptying it; a Typer sub-app."""

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from qimg.errors import say
from qimg.jobs.report import json_line, print_result
from qimg.option_values import CACHE_SIZE

app = typer.Typer(help="The latent and prompt cache: where it is, what it holds; `qimg cache clear` empties it.")
# as the user says it: as the store files it
KINDS = {"latent": "latent", "prompt": "prompt", "edit": "chain", "mask": "mask"}

CacheDirOpt = Annotated[Optional[Path], typer.Option(
    show_default="$QIMG_CACHE_DIR, else the user cache folder", help="The cache folder.")]


def open_store(folder: Optional[Path], size: str = CACHE_SIZE):
    from qimg.cache import Store, default_cache_dir, size_option

    max_bytes = size_option(size)
    return Store(folder or default_cache_dir(), max_bytes)


def human(n: int) -> str:
    """Bytes as the size options take them (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


@app.callback(invoke_without_command=True)
def show(
    ctx: typer.Context, cache_dir: CacheDirOpt = None,
    cache_size: Annotated[str, typer.Option(envvar="QIMG_CACHE_SIZE", show_envvar=True,
                                            help="The size cap the commands use; 0: no cache.")] = CACHE_SIZE,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
):
    """Show where the cache is, its size, its entries by kind and its cap."""
    if ctx.invoked_subcommand is not None:
        return
    store = open_store(cache_dir, cache_size)
    usage = {name: store.usage()[kind] for name, kind in KINDS.items()}
    total = sum(size for _, size in usage.values())
    folder = store.root or store.folder
    if json_:
        print_result(json_line({"folder": str(folder), "in_use": store.root is not None, "bytes": total,
                                "cap": store.max_bytes, "entries": {k: n for k, (n, _) in usage.items()},
                                "bytes_by_kind": {k: b for k, (_, b) in usage.items()}}))
        return
    state = "" if store.root is not None else "  (nothing cached yet)"
    print_result(f"folder   {folder}{state}")
    print_result(f"size     {human(total)} of {human(store.max_bytes)}"
                 + ("" if store.max_bytes else " (--cache-size 0: the commands use no cache)"))
    for name, (count, size) in usage.items():
        print_result(f"{name:<8} {entries(count)}, {human(size)}")


@app.command()
def clear(
    cache_dir: CacheDirOpt = None,
    kind: Annotated[Optional[Literal[tuple(KINDS)]], typer.Option(
        show_default="every kind",
        help="Remove only these entries: latent, prompt, edit (chain edits) or mask (masks from words).")] = None,
):
    """Empty the cache (or one kind of entry); safe while other qimg commands use it."""
    store = open_store(cache_dir)
    removed, freed = store.clear((KINDS[kind],) if kind else tuple(KINDS.values()))
    say(f"removed {entries(removed)}{' (' + kind + ')' if kind else ''}, {human(freed)}, from "
        f"{store.root or store.folder}")
