"""The Ray a single-machine simulation starts is private: every process of it listens on
127.0.0.1 only, and its temporary folder (sockets, logs with the clients' output) is 0700
with no file others can read, and is gone after the run."""

from __future__ import annotations

import stat
from pathlib import Path

import psutil
import pytest

from fl_app.cli import simulate
from fl_app.server.callbacks import Callback

pytestmark = pytest.mark.slow  # runs a Flower simulation

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def listening(process: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket `process` listens on."""
    try:
        return [(process.name(), c.laddr.ip, c.laddr.port)
                for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:
        return []


class RayProbe(Callback):
    """Looks at the running Ray when the run begins (its clients started: round 0 is done)."""

    def __init__(self) -> None:
        self.sockets: list[tuple[str, str, int]] = []
        self.session: Path | None = None
        self.modes: dict[Path, int] = {}

    def on_run_begin(self, config, startup_seconds) -> None:
        """Record every listening socket of this process and its children, and the modes of
        Ray's session folder, the folders above it up to the run's Ray folder, and its files
        (while the run goes on, its clients' logs among them)."""
        import ray

        this = psutil.Process()
        for process in [this, *this.children(recursive=True)]:
            self.sockets += listening(process)
        self.session = Path(ray._private.worker._global_node.get_session_dir_path())
        for path in [self.session, self.session.parent, self.session.parent.parent,
                     *self.session.rglob("*")]:
            if not path.is_symlink():
                self.modes[path] = path.lstat().st_mode


def test_a_local_simulations_ray_listens_on_loopback_only_in_a_private_folder(
        tmp_path, monkeypatch):
    from ray._private import ray_constants

    # Ray as a user's shell has it, not as tests/conftest.py sets it for every other test.
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    probe = RayProbe()
    args = simulate.parse_args(["--num-supernodes", "2", "--out", str(tmp_path / "out"),
                                "--run-config", "num-server-rounds=1 local-epochs=1 "
                                "fraction-evaluate=0 min-fit-clients=2 min-available-clients=2"])
    cfg = simulate.prepare(args)
    simulate.simulate(cfg, args, [probe])

    names = {name for name, _, _ in probe.sockets}
    assert {"gcs_server", "raylet"} <= names, probe.sockets  # Ray's servers were seen
    exposed = [s for s in probe.sockets if s[1] not in LOOPBACK]
    assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"

    session = probe.session
    ray_root = session.parent.parent  # <temp>/fl-ray-XXXX/ray/session_...: a fresh folder
    assert ray_root.name.startswith("fl-ray-") and ray_root.parent != Path("/tmp/ray")
    # Ray makes its own folders 0777 (from every process); the folder above them is closed.
    assert stat.S_IMODE(probe.modes[ray_root]) == 0o700, oct(probe.modes[ray_root])
    readable = {str(p): oct(m) for p, m in probe.modes.items()
                if m & 0o077 and not stat.S_ISDIR(m)}
    assert readable == {}, readable  # logs and sockets: the run's account only
    assert len(str(session / "sockets" / "plasma_store")) < 108
    assert not ray_root.exists()  # removed with the run

    history = (tmp_path / "out" / "history.json").read_text()
    assert '"stopped": "num-server-rounds"' in history
