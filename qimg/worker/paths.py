"""Where the worker lives: a per-user folder only its owner can enter, a socket and lock named after the
qimg version, installation and code (a worker of another one, or one started before the code changed,
is never used), and a log file."""

import functools
import hashlib
import os
import stat
import sys
import tempfile
from pathlib import Path

from qimg import __version__


class Insecure(Exception):
    """The socket folder is not the user's alone; the message says what is wrong and what to do."""


def socket_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "qimg" if runtime else Path(tempfile.gettempdir()) / f"qimg-{os.getuid()}"


@functools.cache
def installation_tag() -> str:
    """A short hash of the qimg version, its package folder, the Python running it and its code: the code this
    process loaded, so worked out once (the client asks for the socket and the lock, and again while it waits)."""
    package = Path(__file__).resolve().parent.parent
    state = f"{__version__}\0{package}\0{sys.executable}\0{code_state(package)}"
    return hashlib.sha256(state.encode()).hexdigest()[:12]


def code_state(package: Path) -> str:
    """The name, size and modification time of every source file under `package`: an editable install whose
    code changed gets a new worker. About a millisecond of stat calls, where hashing the sources would cost
    every command a read of all of them."""
    sources = sorted((str(f.relative_to(package)), f.stat()) for f in package.rglob("*.py"))
    return "\0".join(f"{name}:{st.st_size}:{st.st_mtime_ns}" for name, st in sources)


def socket_path() -> Path:
    return socket_dir() / f"worker-{installation_tag()}.sock"


def lock_path() -> Path:
    return socket_dir() / f"worker-{installation_tag()}.lock"


def log_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME")
    return (Path(state) if state else Path.home() / ".local" / "state") / "qimg" / "worker.log"


def check_dir(folder: Path, create: bool) -> bool:
    """Whether `folder` exists and is safe to hold the socket: a real directory (not a symlink), owned by
    this user, mode exactly 0700. With `create`, a missing one is made so. Insecure when it is not."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        if not create:
            return False
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(folder, 0o700)
            os.chmod(folder, 0o700)  # mkdir's mode passes through the umask
        except FileExistsError:
            pass  # another client made it: check theirs like any other
        st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode):
        raise Insecure(f"worker folder {folder} is a symlink; remove it (qimg makes its own)")
    if not stat.S_ISDIR(st.st_mode):
        raise Insecure(f"worker folder {folder} is not a directory; remove it")
    if st.st_uid != os.getuid():
        raise Insecure(f"worker folder {folder} belongs to uid {st.st_uid}, not to you ({os.getuid()}); remove it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise Insecure(f"worker folder {folder} has mode {stat.S_IMODE(st.st_mode):04o}, not 0700; "
                       f"`chmod 700 {folder}` or remove it")
    return True
