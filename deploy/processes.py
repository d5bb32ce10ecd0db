"""Start processes, stream their output, and stop every one of them (descendants too) by pid.

Flower's SuperLink and SuperNodes start helper processes of their own (SuperExec, then one
ServerApp/ClientApp process per task) in new sessions, so killing a process group would
miss them. Every process started here gets a unique marker in its environment, which its
descendants inherit; the supervisor finds them all by that marker (with psutil), records
every process it has seen (as `psutil.Process`, which tells a reused pid from the process
it saw), and on shutdown terminates and, if need be, kills them.

Each process runs with its command's umask (077 for every Flower command: what they write
is private), and its log is mode 600 in a mode-700 folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import psutil

from deploy.commands import Command
from deploy.files import append_private, private_dir
from deploy.layout import DeploymentError

MARKER = "FL_DEPLOY_TAG"
Echo = Callable[[str], None]


class ProcessesLeft(DeploymentError):
    """Processes a supervisor started (or their descendants) that survived its shutdown."""

    def __init__(self, survivors: list[psutil.Process]) -> None:
        self.survivors = survivors
        super().__init__(f"could not stop pids {[proc.pid for proc in survivors]}")


class Managed:
    """A started process: its Popen handle, psutil handle, log file and captured stdout.

    Its log is `log_path` from byte `log_offset` on (earlier bytes belong to an earlier
    process of the same name).
    """

    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path, log_offset: int,
                 capture: bool, echo: bool) -> None:
        self.name = name
        self.echo = echo
        self.popen = popen
        self.process = psutil.Process(popen.pid)
        self.log_path = log_path
        self.log_offset = log_offset
        self.output: list[str] | None = [] if capture else None
        self.reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.popen.poll()

    def text(self) -> str:
        """The captured standard output (processes started with `capture=True`)."""
        if self.reader is not None:
            self.reader.join()
        return "".join(self.output or [])

    def log_text(self, wait: float = 5.0) -> str:
        """Everything this process wrote to its log (stdout and stderr); waits up to `wait` s
        for the output of an exited process to be drained (descendants may hold the pipe)."""
        if self.reader is not None:
            self.reader.join(timeout=wait)
        return self.log_path.read_bytes()[self.log_offset:].decode("utf-8", "replace")


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone, a zombie, or no longer ours to inspect
        return False


def living(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The processes among `procs` that still run: not exited, not an exited-but-unreaped
    zombie, and not a new process that reuses the pid of one that exited."""
    return [proc for proc in procs if _is_alive(proc)]


def _cmdline(proc: psutil.Process) -> str | None:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return None


class Supervisor:
    """Owns every process a deployment starts; a context manager that stops them all on exit
    (and raises `ProcessesLeft` if any survive).

    `echo` receives each output line, prefixed with the process name (None: log files only).
    """

    def __init__(self, log_dir: Path, echo: Echo | None = print, poll_seconds: float = 0.5):
        self.log_dir = log_dir
        self.echo = echo
        self.tag = uuid.uuid4().hex
        self.started: list[Managed] = []
        self._seen: dict[psutil.Process, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_seconds = poll_seconds
        self._tracker = threading.Thread(target=self._track, name="deploy-tracker", daemon=True)

    def __enter__(self) -> Supervisor:
        private_dir(self.log_dir)
        self._tracker.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: object) -> None:
        survivors = self.shutdown()
        if not survivors:
            return
        left = ProcessesLeft(survivors)
        if exc is None:
            raise left
        exc.add_note(str(left))  # the error that ended the block stays the one reported

    # --- starting
    def start(self, name: str, cmd: Command, cwd: Path | None = None,
              capture: bool = False, echo: bool = True) -> Managed:
        """Start `cmd` in its own session, with its umask, and its output going to
        `<log_dir>/<name>.log` (mode 600; and to the supervisor's `echo` unless `echo` is
        False).

        With `capture`, standard output is also kept (`Managed.text()`) apart from standard
        error, which goes to the log only.
        """
        env = {**os.environ, **cmd.env, MARKER: self.tag, "PYTHONUNBUFFERED": "1",
               "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                        os.environ.get("PATH", "")])}
        log_path = self.log_dir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        with append_private(log_path) as log:  # O_APPEND: the child's stderr and our pump
            popen = subprocess.Popen(cmd.argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE,
                                     stderr=log if capture else subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True,
                                     umask=-1 if cmd.umask is None else cmd.umask)
        managed = Managed(name, popen, log_path, offset, capture, echo)
        with self._lock:
            self.started.append(managed)
            self._seen[managed.process] = " ".join(cmd.argv)
        managed.reader = threading.Thread(target=self._pump, args=(managed,),
                                          name=f"log-{name}", daemon=True)
        managed.reader.start()
        return managed

    def run(self, name: str, cmd: Command, timeout: float, cwd: Path | None = None) -> Managed:
        """Run a short command to its end (killed after `timeout` s); stdout is captured."""
        managed = self.start(name, cmd, cwd=cwd, capture=True, echo=False)
        try:
            managed.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._terminate([managed.process], grace=2.0)
        managed.text()
        return managed

    def _pump(self, managed: Managed) -> None:
        """Copy the process's output to its log (and echo) until the pipe closes.

        An echo that fails (a closed terminal: BrokenPipeError) is dropped, and the pipe is
        still drained to the end, so the process never blocks on a full pipe.
        """
        stream: IO[str] = managed.popen.stdout  # type: ignore[assignment]
        echo = self.echo if managed.echo else None
        with append_private(managed.log_path, text=True) as log:
            for line in stream:
                log.write(line)
                log.flush()
                if managed.output is not None:
                    managed.output.append(line)
                if echo is not None:
                    try:
                        echo(f"[{managed.name}] {line.rstrip()}")
                    except Exception as err:  # whatever the failure, stop echoing, keep draining
                        echo = None
                        log.write(f"[deploy] echo stopped ({err!r}); output continues here\n")
        managed.popen.wait()

    # --- tracking
    def _scan(self) -> list[psutil.Process]:
        """Live processes carrying this supervisor's marker (the started ones and descendants);
        each one's latest command line is recorded."""
        found = {}
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER) == self.tag and _is_alive(proc):
                    found[proc] = _cmdline(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        with self._lock:
            for proc, cmdline in found.items():
                self._seen[proc] = cmdline if cmdline is not None else self._seen.get(proc, "")
        return list(found)

    def _track(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            self._scan()

    def seen(self) -> dict[psutil.Process, str]:
        """Every process this supervisor started or found among their descendants, with its
        command line as last seen running."""
        self._scan()
        with self._lock:
            return dict(self._seen)

    def alive(self) -> list[psutil.Process]:
        """The processes seen so far (and any found now) that are still running."""
        return living(self.seen())

    # --- stopping
    @staticmethod
    def _terminate(procs: list[psutil.Process], grace: float) -> None:
        """SIGTERM `procs`, wait `grace` s, SIGKILL the rest (psutil checks pid reuse)."""
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, survivors = psutil.wait_procs(procs, timeout=grace)
        for proc in survivors:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(survivors, timeout=grace)

    def shutdown(self, grace: float = 10.0) -> list[psutil.Process]:
        """Stop the started processes (last started first), then every descendant left.

        Each process is signalled once, in order: the started ones; then their descendants
        get `grace` seconds to exit on their own (Flower's SuperNode and SuperExec, and our
        executors, stop the processes they started: a second SIGTERM while one handles the
        first makes it print a traceback); then whatever is left is terminated, and killed
        if need be. Returns the processes
        still alive afterwards (empty unless one resisted SIGKILL).
        """
        with _ignoring_interrupts():
            self._stop.set()
            self._scan()
            ordered = list(reversed(self.started))
            self._terminate(living([m.process for m in ordered]), grace)
            psutil.wait_procs(self.alive(), timeout=grace)
            for _ in range(3):
                left = self.alive()
                if not left:
                    break
                self._terminate(left, grace=3.0)
            for managed in self.started:
                managed.popen.poll()  # reap our direct children
                if managed.reader is not None:
                    managed.reader.join(timeout=5.0)
            return self.alive()


@contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    """Let a shutdown finish even if Ctrl-C (or SIGTERM, SIGHUP) comes again (main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
