"""The `qimg` command's entry point (and `python -m qimg`'s). It takes the stopping signals before anything
heavy is imported, so a Ctrl-C while Typer and torch load exits as quietly as one later: one line, 128 +
the signal. A signal the shell started qimg with ignored (a background job's SIGINT, SIGHUP under nohup)
stays ignored. It also makes sure stdin, stdout and stderr are open files, so a closed one (`2>&-`) can
neither send error lines into stdout nor let an output file take its descriptor."""

import os
import signal
import sys

from qimg.errors import STOPS


def _stop_while_starting(signum, _frame):
    try:
        os.write(2, f"qimg: {STOPS[signum]}; nothing written\n".encode())
    except OSError:  # stderr is a broken pipe
        pass
    os._exit(128 + signum)


def _open_standard_files() -> None:
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # closed: the lowest free descriptor, which os.open takes, is this one
            os.open(os.devnull, os.O_RDWR)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")


def main() -> None:
    _open_standard_files()
    taken = [signum for signum in STOPS if signal.getsignal(signum) is not signal.SIG_IGN]
    for signum in taken:
        signal.signal(signum, _stop_while_starting)
    from qimg.worker.client import maybe_submit, spreads

    code = maybe_submit(sys.argv[1:])  # a running worker first (the client imports nothing heavy)
    if code is None:
        from qimg.cli.app import run

        code = run(sys.argv[1:])
        if spreads(sys.argv[1:]):
            from qimg.jobs.torchrun import finish

            finish(code, taken)  # under torchrun, a failed shard lets the others finish
    for signum in taken:  # the run is over and has said so: a signal now changes nothing
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)
