"""Start processes, stream their output, and stop every one of them (descendants too) by pid.

Flower's SuperLink and SuperNodes start helper processes of their own (SuperExec, then one
ServerApp/ClientApp process per task) in new sessions, so killing a process group would
miss them. Every process started here gets a unique marker in its environment, which its
descendants inherit; the supervisor finds them all by that marker (with psutil), records
every pid it has seen, and on shutdown terminates and, if need be, kills them by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import psutil

from deploy.commands import Command

MARKER = "FL_DEPLOY_TAG"
Echo = Callable[[str], None]


class Managed:
    """A started process: its Popen handle, log file and (optionally) its captured output."""

    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path,
                 capture: bool, echo: bool) -> None:
        self.name = name
        self.echo = echo
        self.popen = popen
        self.log_path = log_path
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
        """The captured output (processes started with `capture=True`)."""
        if self.reader is not None:
            self.reader.join()
        return "".join(self.output or [])


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone, a zombie, or no longer ours to inspect
        return False


def living(pids: Iterable[int]) -> list[int]:
    """The pids among `pids` that still run (exited-but-unreaped zombies do not count)."""
    alive = []
    for pid in pids:
        try:
            if _is_alive(psutil.Process(pid)):
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


class Supervisor:
    """Owns every process a deployment starts; a context manager that stops them all on exit.

    `echo` receives each output line, prefixed with the process name (None: log files only).
    """

    def __init__(self, log_dir: Path, echo: Echo | None = print, poll_seconds: float = 0.5):
        self.log_dir = log_dir
        self.echo = echo
        self.tag = uuid.uuid4().hex
        self.started: list[Managed] = []
        self._seen: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_seconds = poll_seconds
        self._tracker = threading.Thread(target=self._track, name="deploy-tracker", daemon=True)

    def __enter__(self) -> Supervisor:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._tracker.start()
        return self

    def __exit__(self, *exc_info) -> None:
        survivors = self.shutdown()
        if survivors:
            print(f"warning: could not stop pids {[p.pid for p in survivors]}", file=sys.stderr)

    # --- starting
    def start(self, name: str, cmd: Command, cwd: Path | None = None,
              capture: bool = False, echo: bool = True) -> Managed:
        """Start `cmd` in its own session with its output going to `<log_dir>/<name>.log`
        (and to the supervisor's `echo` unless `echo` is False)."""
        env = {**os.environ, **cmd.env, MARKER: self.tag, "PYTHONUNBUFFERED": "1",
               "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                        os.environ.get("PATH", "")])}
        log_path = self.log_dir / f"{name}.log"
        popen = subprocess.Popen(cmd.argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace", start_new_session=True)
        managed = Managed(name, popen, log_path, capture, echo)
        with self._lock:
            self.started.append(managed)
            self._seen[popen.pid] = psutil.Process(popen.pid)
        managed.reader = threading.Thread(target=self._pump, args=(managed,),
                                          name=f"log-{name}", daemon=True)
        managed.reader.start()
        return managed

    def run(self, name: str, cmd: Command, timeout: float, cwd: Path | None = None) -> Managed:
        """Run a short command to its end (killed after `timeout` s); output is captured."""
        managed = self.start(name, cmd, cwd=cwd, capture=True, echo=False)
        try:
            managed.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._terminate([self._seen[managed.pid]], grace=2.0)
        managed.text()
        return managed

    def _pump(self, managed: Managed) -> None:
        stream: IO[str] = managed.popen.stdout  # type: ignore[assignment]
        with managed.log_path.open("a", encoding="utf-8") as log:
            for line in stream:
                log.write(line)
                log.flush()
                if managed.output is not None:
                    managed.output.append(line)
                if self.echo is not None and managed.echo:
                    self.echo(f"[{managed.name}] {line.rstrip()}")
        managed.popen.wait()

    # --- tracking
    def _scan(self) -> list[psutil.Process]:
        """Live processes carrying this supervisor's marker (the started ones and descendants)."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER) == self.tag and _is_alive(proc):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        with self._lock:
            for proc in found:
                self._seen.setdefault(proc.pid, proc)
        return found

    def _track(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            self._scan()

    def seen_pids(self) -> set[int]:
        """Every pid this supervisor has started or found among their descendants."""
        self._scan()
        with self._lock:
            return set(self._seen)

    def alive(self) -> list[psutil.Process]:
        """The processes seen so far (and any found now) that are still running."""
        self._scan()
        with self._lock:
            return [proc for proc in self._seen.values() if _is_alive(proc)]

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

        Returns the processes still alive afterwards (empty unless one resisted SIGKILL).
        """
        with _ignoring_interrupts():
            self._stop.set()
            self._scan()
            with self._lock:
                roots = [self._seen[m.pid] for m in reversed(self.started)]
            self._terminate([p for p in roots if _is_alive(p)], grace)
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
