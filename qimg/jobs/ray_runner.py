"""--ray: a batch's files spread over a pool of Ray actors, one per GPU (or --ray-workers N on CPUs), each
holding one loaded engine and taking the next file when it finishes one, so slow and fast machines share the
work. Each file runs on an actor as a one-file job of the batch (runner.py, the engine kept between files as
in the worker), written by the actor straight to its target path (shared storage) with the usual atomic
save; its lines come back to this process, which prints them, draws the one progress bar and ends with the
batch's summary. A file whose actor failed or was lost runs again on another, --retries times; one that
fails every time is reported like a bad file. Ray is imported only here, only with --ray."""

import contextlib
import io
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from qimg.errors import OutputExists, QimgError, QimgWarning, UsageError, Withheld, failure_line, say
from qimg.jobs import names, runner, safety
from qimg.jobs.edit import edit_plan
from qimg.jobs.generate import prompt_jobs
from qimg.jobs.report import Reporter
from qimg.jobs.spec import Edit, Inpaint, Job, Prompts, RaySpec

FORWARDED = ("QIMG_", "HF_")  # the client's settings the actors take: model, cache, hub (QIMG_DEBUG too)
TEST_EXIT = "QIMG_TEST_ACTOR_EXIT"  # tests: "NAME" makes an actor exit on the file NAME, "NAME:MARK" only once


@dataclass
class Item:
    label: str  # how lines name it: the input's path, or "<prompts file> line N"
    target: Path
    job: Job  # the one-file job an actor runs
    attempts: int = 0
    tried: set = field(default_factory=set)  # actors it failed on


def items(job: Job) -> tuple[list[Item], str]:
    """The batch as one-file jobs, after every check that needs no model (runner's, for the whole batch and
    this --shard), and what the bar counts."""
    if isinstance(job, Prompts):
        return [Item(where, gen.output.out, gen) for where, gen in prompt_jobs(job)], "prompts"
    if isinstance(job, (Inpaint, Edit)):
        files, is_batch = edit_plan(job)[:2]
        if not is_batch:
            raise UsageError("--ray spreads a batch over actors; give a folder, several files or a glob")
        return [Item(str(f), names.edit_output(f, job.kind, job.out_dir),
                     replace(job, images=(f,), member=True, shard=None)) for f in files], "images"
    raise UsageError("--ray runs batches: inpaint, outpaint, edit, generate --prompts")


def execute(job: Job, spec: RaySpec, reporter: Reporter) -> None:
    spec, note = cpu_actors(job, spec)
    work, what = items(on_actors(job, spec))
    check_reachable(spec.address)
    pool = Pool(spec, job.output.overwrite)
    if note:
        say(note)
    advance = reporter.bar(what, len(work))
    todo = deque()
    for item in work:
        if getattr(job, "skip_existing", False) and os.path.lexists(item.target):
            reporter.skipped(item.label, item.target)
            advance()
        else:
            todo.append(item)
    failed = pool.run(todo, reporter, advance) if todo else []
    order = {item.label: i for i, item in enumerate(work)}  # the batch's order, as locally
    safety.batch_end(sorted(failed, key=order.get), sorted(pool.withheld, key=order.get), len(work), what)


def cpu_actors(job: Job, spec: RaySpec) -> tuple[RaySpec, str | None]:
    """--ray local (a bare --ray) on a machine without a GPU: one actor per two cores, on CPUs, and the line that
    says so; any other --ray as given (None: no line)."""
    import torch

    if spec.address != "local" or spec.workers is not None or job.model.device not in ("auto", "cpu") \
            or torch.cuda.device_count():
        return spec, None
    workers = max(1, (os.cpu_count() or 1) // 2)
    return replace(spec, workers=workers), (f"qimg: --ray local: no GPU here; {workers} actor(s) on CPUs, one per "
                                            "two cores (--ray-workers N to choose)")


def on_actors(job: Job, spec: RaySpec) -> Job:
    """The job with the device its actors have: a GPU each (Ray shows each its own as cuda:0), or with
    --ray-workers only CPUs (--device auto would otherwise take a GPU of the node it lands on)."""
    device = job.model.device
    if spec.workers is not None:
        if device not in ("auto", "cpu"):
            raise UsageError(f"--ray-workers runs actors on CPUs; --device {device} cannot go with it (use cpu, "
                             "or leave --ray-workers out for one actor per GPU)")
        return replace(job, model=replace(job.model, device="cpu"))
    if device not in ("auto", "cuda"):
        raise UsageError(f"--ray gives each actor one GPU of its own; --device {device} cannot go with it (use "
                         "auto or cuda, or --ray-workers N for actors on CPUs)")
    return job


class Actor:
    """One engine in one Ray worker process, running one-file jobs in the client's working folder and with
    its QIMG_*/HF_* settings, so relative paths and defaults mean what they meant there."""

    def __init__(self, cwd: str, env: dict):
        os.environ.update(env)
        try:
            os.chdir(cwd)
        except OSError as e:
            raise QimgError(f"the client's working folder {cwd} is not on this machine ({e.strerror}); run from "
                            "a folder every machine of the cluster has (shared storage)") from None
        from qimg.jobs import kept_engine

        kept_engine.enabled = True  # keep the engine between files

    def pid(self) -> int:
        return os.getpid()

    def run(self, item: Item) -> list:
        """The file's lines as records (Recorder), for the client to print: its warnings, and what it wrote to
        stderr, first; a raised error is a failed attempt."""
        test_exit(item)
        with Recorder() as recorder, contextlib.redirect_stderr(io.StringIO()) as err, \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", QimgWarning)
            try:
                runner.execute(item.job, recorder)
            except Withheld as e:  # the safety filter's: reported (an edit batch's member did already), not retried
                if e.record:
                    recorder.withheld(item.label, e)
            except QimgError as e:  # a bad file is reported (as by a local batch), not retried
                if not recorder.failures:
                    if not isinstance(e, (UsageError, OutputExists)):
                        raise
                    recorder.failed(item.label, e)
        lines = [("warning", str(w.message)) for w in caught if issubclass(w.category, QimgWarning)]
        return lines + [("line", line) for line in err.getvalue().splitlines()] + recorder.records


def test_exit(item: Item) -> None:
    """The tests' stand-in for a machine lost mid-batch (TEST_EXIT)."""
    name, _, mark = os.environ.get(TEST_EXIT, "").partition(":")
    if name and Path(item.label).name == name and not (mark and os.path.exists(mark)):
        if mark:
            Path(mark).touch()
        os._exit(1)


class Recorder(Reporter):
    """A Reporter whose lines are kept for the client instead of printed."""

    def __init__(self):
        super().__init__(as_json=False)
        self.records, self.failures = [], 0

    def result(self, out: Path, params: dict, started: float) -> None:
        self.records.append(("result", str(out), params, time.perf_counter() - started))

    def skipped(self, image, out: Path) -> None:
        self.records.append(("skipped", str(image), str(out)))

    def failed(self, image, error: QimgError) -> None:
        self.failures += 1
        self.records.append(("failed", str(image), str(error)))

    def withheld(self, image, error: Withheld, line: bool = True) -> None:
        if line:  # (without: a single run's --json notice, which the client's replay prints)
            self.records.append(("withheld", str(image), str(error), error.record))


def replay(records: list, reporter: Reporter):
    """Print an actor's records as the local batch would have; whether the file failed (True), was withheld by
    the safety filter ("withheld") or neither (False)."""
    bad = False
    for kind, *rest in records:
        if kind == "result":
            out, params, seconds = rest
            reporter.saved(Path(out))
            reporter.result(Path(out), params, time.perf_counter() - seconds)
        elif kind == "skipped":
            reporter.skipped(rest[0], Path(rest[1]))
        elif kind == "warning":
            warnings.warn(rest[0], QimgWarning)
        elif kind == "line":
            say(rest[0])
        elif kind == "withheld":
            reporter.withheld(rest[0], Withheld(rest[1], rest[2]))
            bad = "withheld"
        else:
            reporter.failed(rest[0], QimgError(rest[1]))
            bad = True
    return bad


class Pool:
    """The actors and the loop that feeds them: each idle actor takes the next file; a lost actor is replaced."""

    def __init__(self, spec: RaySpec, overwrite: bool = False):
        try:
            import ray
        except ImportError:
            raise UsageError("--ray needs Ray: pip install 'qimg[ray]'") from None
        self.ray, self.spec = ray, spec
        options = dict(num_cpus=1) if spec.workers else dict(num_cpus=1, num_gpus=1)
        self.make = ray.remote(**options, max_restarts=0, max_task_retries=0)(Actor).remote
        self.env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
        self.started, self.first_error, self.overwrite = 0, None, overwrite
        self.withheld = []  # the files the safety filter held back

    def spawn(self):
        self.started += 1
        return self.make(os.getcwd(), self.env), self.started

    def run(self, todo: deque, reporter: Reporter, advance) -> list[str]:
        self.stdout, sys.stdout = sys.stdout, sys.stderr  # Ray prints the cluster's news to stdout (see ours)
        try:
            return self.feed(todo, reporter, advance)
        finally:
            sys.stdout = self.stdout

    @contextlib.contextmanager
    def ours(self):
        """stdout back for this thread's results (--json stays JSON), Ray's threads still on stderr."""
        before, sys.stdout = sys.stdout, ThreadStdout(self.stdout, sys.stderr)
        try:
            yield
        finally:
            sys.stdout = before

    def feed(self, todo: deque, reporter: Reporter, advance) -> list[str]:
        ray = self.ray
        connect(ray, self.spec.address)
        try:
            idle, running, failed = [], {}, []
            for _ in range(min(len(todo), actor_count(ray, self.spec))):
                actor, n = self.spawn()
                running[actor.pid.remote()] = (actor, n, None)
            while todo or any(item is not None for _, _, item in running.values()):
                while idle and todo:
                    item = todo.popleft()
                    actor, n = next(((a, i) for a, i in idle if i not in item.tried), idle[0])
                    idle.remove((actor, n))
                    running[actor.run.remote(item)] = (actor, n, item)
                if not running:
                    raise QimgError(f"every Ray actor failed to start ({self.first_error}); "
                                    f"{len(todo)} files not run")
                [done], _ = ray.wait(list(running), num_returns=1)
                actor, n, item = running.pop(done)
                try:
                    records = ray.get(done)
                except ray.exceptions.RayActorError as e:
                    self.first_error = self.first_error or actor_error(e)
                    if item is None:
                        continue  # it never started: the others do the work
                    self.retry(item, n, "its Ray actor was lost", todo, failed, reporter, advance)
                    actor, n = self.spawn()  # in the lost one's place
                    running[actor.pid.remote()] = (actor, n, None)
                    continue
                except ray.exceptions.RayTaskError as e:
                    self.retry(item, n, failure_line(e.cause or e), todo, failed, reporter, advance)
                else:
                    if item is not None:
                        with self.ours():
                            bad = replay(records, reporter)
                        if bad:
                            (self.withheld if bad == "withheld" else failed).append(item.label)
                        advance()
                idle.append((actor, n))
            return failed
        finally:
            ray.shutdown()

    def retry(self, item: Item, actor: int, error: str, todo: deque, failed: list, reporter, advance) -> None:
        """Run `item` again on another actor, or after --retries report it as the batch reports a bad file."""
        item.attempts += 1
        item.tried.add(actor)
        if not self.overwrite and os.path.lexists(item.target):  # written (atomically) before its actor was lost
            with self.ours():
                reporter.skipped(item.label, item.target)
            advance()
            return
        if item.attempts <= self.spec.retries:
            say(f"qimg: warning: {item.label}: {error}; running it again ({item.attempts} of {self.spec.retries})")
            todo.appendleft(item)
            return
        failed.append(item.label)
        with self.ours():
            reporter.failed(item.label, QimgError(f"failed {item.attempts} times: {error}"))
        advance()


class ThreadStdout:
    """sys.stdout that is the real one for one thread and stderr for the others."""

    def __init__(self, stdout, stderr):
        self.stdout, self.stderr, self.thread = stdout, stderr, threading.current_thread()

    def write(self, text: str) -> int:
        return (self.stdout if threading.current_thread() is self.thread else self.stderr).write(text)

    def flush(self) -> None:
        self.stdout.flush()
        self.stderr.flush()

    def __getattr__(self, name):
        return getattr(self.stdout, name)


def connect(ray, address: str) -> None:
    """Join the cluster --ray names (check_reachable has checked its address): local starts one on this machine
    for the run (shut down after)."""
    quiet = dict(log_to_driver=False)  # the actors' lines come back as records
    try:
        if address == "local":  # a cluster for this run alone: Ray's notices about clusters (auth tokens) are noise
            ray.init(address="local", include_dashboard=False, logging_level=logging.ERROR, **quiet)
        else:
            ray.init(address=address, logging_level=logging.WARNING, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "$RAY_ADDRESS or a running cluster" if address == "auto" else address
        error = QimgError if address == "local" else UsageError  # a cluster of its own failed, or a bad address
        raise error(f"--ray {address}: cannot join the Ray cluster at {where} ({str(e).splitlines()[0][:160]})"
                        ) from None


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT address must answer, and answer as Ray's GCS does (gRPC: HTTP/2), before Ray is asked to join
    it: Ray itself retries a dead or foreign address for minutes, one warning after another. auto: the address
    in $RAY_ADDRESS, when it gives one. A bad address is the user's to fix: a UsageError (exit 2)."""
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    host, _, port = target.rpartition(":")
    if target in ("", "local", "auto") or "://" in target or not host or not port.isdigit():
        return  # Ray's to resolve
    where = f"at $RAY_ADDRESS {target}" if address == "auto" else "there"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
            speaks = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true") or speaks_http2(conn)
    except OSError as e:
        raise UsageError(f"--ray {address}: nothing answers {where} ({e.strerror or e}); give the address "
                        "`ray start --head` printed") from None
    if not speaks:
        raise UsageError(f"--ray {address}: what answers {where} is not a Ray cluster (no gRPC reply); give the "
                        "address `ray start --head` printed")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS


def speaks_http2(conn: socket.socket) -> bool:
    """Whether the server on `conn` answers HTTP/2's client preface with a SETTINGS frame, as every gRPC server
    (Ray's GCS) does at once."""
    conn.sendall(HTTP2_PREFACE)
    conn.settimeout(3)  # a gRPC server answers at once
    head = b""
    try:
        while len(head) < 9:
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:  # a timeout: a server that waits for something else
        return False
    return head[3] == 4  # the frame type: SETTINGS


def actor_count(ray, spec: RaySpec) -> int:
    """--ray-workers, or one actor per GPU of the cluster; refused when the cluster cannot hold them."""
    resources = ray.cluster_resources()
    if spec.workers is None:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise UsageError(f"--ray {spec.address}: the Ray cluster has no GPU; give --ray-workers N to run N "
                             "actors on CPUs")
        return gpus
    cpus = int(resources.get("CPU", 0))
    if spec.workers > cpus:
        raise UsageError(f"--ray-workers {spec.workers}: the Ray cluster has {cpus} CPUs; give at most {cpus}")
    return spec.workers


def actor_error(e) -> str:
    """One line for an actor that died: its own error if it raised one while starting."""
    cause = getattr(e, "cause", None) or getattr(getattr(e, "error_msg", None), "cause", None)
    return failure_line(cause) if isinstance(cause, BaseException) else str(e).strip().splitlines()[0][:200]
