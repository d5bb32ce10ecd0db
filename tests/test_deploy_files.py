"""What the deployment tools leave on disk: files mode 600 in folders mode 700, Flower's
processes under umask 077, and a SuperLink whose state (the messages it relays, the clients'
model updates among them) stays in memory.

Every test runs its code under umask 022 (the usual default), so a private mode can only
come from the code under test. No training: one real SuperLink is started for a few seconds.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

from deploy.commands import Command
from deploy.files import DIR_MODE, FILE_MODE
from deploy.launch import LocalDeployment
from deploy.layout import Deployment
from deploy.prepare import instructions, prepare
from deploy.processes import Supervisor

pytestmark = pytest.mark.timeout(300)
HOSTS = ["127.0.0.1", "localhost"]
PROGRAMS = ("flower-superlink", "flower-supernode", "flwr", "python")  # python: the executors
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3", "-wal", "-shm", "-journal")


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def loose(root: Path) -> list[str]:
    """Every path under `root` (itself included) that is not a mode-600 file or a mode-700
    folder, with its mode."""
    found = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = path.lstat().st_mode
        wanted = DIR_MODE if stat.S_ISDIR(mode) else FILE_MODE
        if stat.S_IMODE(mode) != wanted:
            found.append(f"{oct(stat.S_IMODE(mode))} {path}")
    return found


def process_umask(proc: psutil.Process) -> int:
    """The umask a running process has (Linux /proc)."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no Umask line for pid {proc.pid}")


needs_proc_umask = pytest.mark.skipif(
    not Path("/proc/self/status").is_file()
    or "Umask:" not in Path("/proc/self/status").read_text(),
    reason="reads a process's umask from /proc/<pid>/status (Linux >= 4.7)")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Deployment:
    with umask(0o022):
        return prepare(tmp_path_factory.mktemp("files") / "dep", 2, "", HOSTS)


def test_prepare_writes_only_private_files_and_folders(prepared):
    root = prepared.root
    assert {"deployment.json", "certs", "keys", "data", "flwr-home"} <= {
        path.name for path in root.iterdir()}
    written = [path for path in root.rglob("*") if path.is_file()]
    assert len(written) == 1 + 3 + 2 * 2 + 2 + 1  # manifest, certs, key pairs, data, config
    assert loose(root) == []


def test_force_replaces_loose_files_with_private_ones(tmp_path):
    """A folder prepared before (or by an older version, mode 644/755) is made private."""
    with umask(0o022):
        dep = prepare(tmp_path / "dep", 2, "", HOSTS, data_format="csv")
        for path in dep.root.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        prepare(tmp_path / "dep", 2, "", HOSTS, data_format="csv", force=True)
    assert loose(dep.root) == []


def test_a_chosen_existing_folder_keeps_its_mode_its_contents_are_private(tmp_path):
    out = tmp_path / "shared"
    out.mkdir(mode=0o755)
    out.chmod(0o755)
    with umask(0o022):
        dep = prepare(out, 2, "", HOSTS)
    assert loose(dep.root) == [f"0o755 {out}"]


def _argv(line: str, program: str) -> tuple[list[str], list[str]]:
    """The words of a printed shell line before `program`, and its arguments after it."""
    words = shlex.split(line)
    at = words.index(program)
    return words[:at], words[at + 1:]


def test_printed_commands_keep_the_superlink_state_in_memory_under_umask_077(prepared):
    lines = [line for line in instructions(prepared).splitlines()
             if line and not line.startswith("#")]
    (link,) = [line for line in lines if "flower-superlink" in line]
    _, link_args = _argv(link, "flower-superlink")
    assert "--database" not in link_args
    assert _parse_args_run_superlink().parse_args(link_args).database == FLWR_IN_MEMORY_DB_NAME
    for line in lines:
        program = next(word for word in shlex.split(line) if word in PROGRAMS)
        before, _ = _argv(line, program)
        assert before[before.index("umask"):][:3] == ["umask", "077", "&&"], line


def test_supervised_processes_write_private_files_and_logs(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)  # a log folder left by an older version
    logs.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    writer = Command([sys.executable, "-c",
                      "import pathlib; pathlib.Path('out').mkdir(); "
                      "pathlib.Path('out/result.txt').write_text('x'); print('wrote')"])
    with umask(0o022), Supervisor(logs, echo=None) as sup:
        managed = sup.run("writer", writer, timeout=60, cwd=work)
    assert managed.poll() == 0 and managed.text() == "wrote\n"
    assert loose(logs) == []
    assert loose(work / "out") == []


@needs_proc_umask
def test_a_real_superlink_keeps_its_state_in_memory_and_writes_privately(prepared, tmp_path):
    """The launcher's SuperLink on 127.0.0.1: nodes register with it (the registrations
    live in memory), it holds no database file open, and it and its SuperExec run with
    umask 077; everything it and the launcher wrote is private. Stopped by pid."""
    state, logs = tmp_path / "state", tmp_path / "logs"
    with umask(0o022), Supervisor(logs, echo=None) as sup:
        local = LocalDeployment(prepared, sup, state, echo_components=False)
        link = local.start_superlink()
        node_ids = {local.register(node) for node in prepared.nodes}
        assert len(node_ids) == 2
        cmdline = link.process.cmdline()
        at = next(i for i, word in enumerate(cmdline) if Path(word).name == "flower-superlink")
        args = _parse_args_run_superlink().parse_args(cmdline[at + 1:])
        assert args.database == FLWR_IN_MEMORY_DB_NAME and args.host == "127.0.0.1"
        running = sup.alive()
        assert link.process in running
        assert any("flower-superexec" in " ".join(proc.cmdline()) for proc in running)
        for proc in running:
            assert process_umask(proc) == 0o077, proc.cmdline()
            opened = [Path(f.path) for f in proc.open_files()]
            assert not [p for p in opened if p.name.endswith(SQLITE_SUFFIXES)
                        or p.is_relative_to(tmp_path) or p.is_relative_to(prepared.root)], \
                opened
    assert not sup.alive()
    assert (state / "flwr-home" / "config.toml").is_file()
    assert loose(state) == [] and loose(logs) == []
