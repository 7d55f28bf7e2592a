"""What can stop a run, and how the CLI reports it: the one exception type it turns into a single line on
stderr and an exit code, the signals it turns into an orderly stop, and warnings that do not stop it."""

import signal
import sys
import threading
import unicodedata
from contextlib import contextmanager

USAGE = 2  # bad options or input files: the user can fix the command line
RUNTIME = 1  # the command was valid but the work failed
SAFETY = 3  # the safety filter withheld an item (docs/safety.md)


class QimgError(Exception):
    def __init__(self, message: str, code: int = RUNTIME):
        super().__init__(message)
        self.code = code


class UsageError(QimgError):
    def __init__(self, message: str):
        super().__init__(message, USAGE)


class OutputExists(QimgError):
    """An output file appeared between the checks and the save; it was kept. Runtime (exit 1): the command
    was valid when it started. In a batch it is that file's failure, and the others go on."""


class Withheld(QimgError):
    """The safety filter held an item back (exit 3): a prompt refused before any model loads, or an image
    refused before it is written. `record`: what --json says of the hit (filter, score, threshold, action).
    Its line starts `qimg: safety:`, not `qimg: error:`."""

    label = "safety"

    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message, SAFETY)
        self.record = record or {}


# The signals that stop a run cleanly, each with the word its last line says: Ctrl-C, kill, a closed
# terminal or a dropped SSH session, Ctrl-\ (SIGQUIT).
STOPS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up",
         signal.SIGQUIT: "quit"}


class Interrupted(BaseException):
    """A signal of STOPS, raised wherever the program is (like KeyboardInterrupt, which Typer would swallow),
    so every `finally` runs and no temporary file is left. Exit code 128 + the signal: 130, 143, 129, 131."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.code = 128 + signum
        self.what = STOPS[signum]
        self.written = []  # the files saved before the stop, in order

    def message(self) -> str:
        """The line for the stop, saying what it finished."""
        if not self.written:
            return f"qimg: {self.what}; nothing written"
        more = f" and {len(self.written) - 1} more" if len(self.written) > 1 else ""
        return f"qimg: {self.what} after writing {self.written[-1]}{more}"


@contextmanager
def signals_raise():
    """While inside, the signals of STOPS raise Interrupted; the previous handlers come back after. A signal
    ignored when this starts (a background job's SIGINT, SIGHUP under nohup) stays ignored. Signals reach
    only the main thread, so elsewhere (a test runner's worker) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in STOPS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class QimgWarning(UserWarning):
    """Worth a line on stderr but not worth stopping for: a truncated prompt, an animated input."""


def out_of_memory(e: BaseException) -> bool:
    """Whether e is the device (or the host) running out of memory; torch is only looked at if loaded."""
    torch = sys.modules.get("torch")
    return (
        isinstance(e, MemoryError)
        or (torch is not None and isinstance(e, torch.OutOfMemoryError))
        or "DefaultCPUAllocator: can't allocate memory" in str(e)
    )


def failure_line(e: BaseException) -> str:
    """One line for an unexpected exception: out of memory with what to do, else its type and first line."""
    if out_of_memory(e):
        return "out of memory; use a smaller size, or --offload"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first} (rerun with --debug for details)"


def listing(items, shown: int = 5) -> str:
    """The first `shown` of `items` for a message, and how many more there are."""
    items = list(items)
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def printable(text: str) -> str:
    """`text` with control and format characters (Cc, Cf) and lone surrogates (Cs) escaped as \\uXXXX, so a
    file name printed to the terminal cannot move the cursor or recolour the text after it."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf", "Cs") else c for c in str(text))


def say(line: str) -> None:
    """One line for the user on stderr, control characters escaped; dropped if stderr cannot take it (closed,
    a broken pipe): never sent to stdout, where it would mix into --json output."""
    if sys.stderr is None:
        return
    try:
        print(printable(line), file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
