"""Where the worker lives: a per-user folder only its owner can enter, a socket and lock named after the
qimg version, installation and code (a worker of another one, or one started before the code changed,
is never used), and a log file; every file the worker writes is opened by open_private (never through a link)."""

import functools
import hashlib
import os
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

from qimg import __version__
from qimg.small_files import state_dir


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
    return state_dir() / "worker.log"


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """A descriptor of one of the worker's own files (log, lock), made 0600 if new, never through a symlink:
    its folder must be a real one this user owns (made 0700 if missing), the file itself a regular file this
    user owns; Insecure otherwise. The file is opened relative to the folder it was checked in, so neither
    can be swapped for a link between the check and the open."""
    folder = path.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:  # ELOOP, ENOTDIR: a symlink or a file
        raise Insecure(f"worker folder {folder} is not a directory of its own ({e.strerror}); remove it") from None
    try:
        owned(os.fstat(dir_fd), folder, "folder")
        try:
            fd = os.open(path.name, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600,
                         dir_fd=dir_fd)
        except OSError as e:
            raise Insecure(f"worker file {path} cannot be opened ({e.strerror}); remove it") from None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Insecure(f"worker file {path} is not a regular file; remove it")
        owned(st, path, "file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def owned(st: os.stat_result, path: Path, kind: str) -> None:
    if st.st_uid != os.getuid():
        raise Insecure(f"worker {kind} {path} belongs to uid {st.st_uid}, not to you ({os.getuid()}); remove it")


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


class Log:
    """The worker's log, appended to by line; past `limit` bytes it moves to `<name>.1` (replacing the one
    before), so a worker left running for months keeps at most twice that on disk. Opened as open_private
    opens it: never through a symlink, 0600, this user's regular file."""

    def __init__(self, path: Path, limit: int = 1 << 20):
        self.path, self.limit = path, limit
        self.lock = threading.Lock()
        self.file = self._open()

    def _open(self):
        return open(open_private(self.path), "a", buffering=1, encoding="utf-8")

    def __call__(self, message: str) -> None:
        with self.lock:
            if os.fstat(self.file.fileno()).st_size > self.limit:
                self.file.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self.file = self._open()
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}\n")
