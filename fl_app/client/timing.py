"""Where one fit message's time went on the client, reported with its fit metrics.

Each phase is a fit metric `time_<phase>` in seconds (`fl_app.wire.TIMING_PREFIX`):
`process` (from the process's start until the message reaches the client: Python,
Flower, the app bundle's installation, the ClientApp module, pulling the message),
`imports` (the modules the client needs, TensorFlow among them where this process
trains), `data` (loading and checking the node's data; 0 when the process has it loaded),
`model` (building the trainer; 0 when built) and `training` (the local fit). A process
that serves many messages (a simulation worker, a node executor's warm ClientApp) pays
`process` and `imports` once: later messages report 0 and the little their imports take.
The server records the clients' mean per phase (`fit.timing` in history.json). Imports no
TensorFlow.

`message_seconds_mod` measures on the client, outside every other mod of the ClientApp, what
each message costs there (wall and CPU seconds of this process), and hands it to a sink of
the caller's: for benchmarks, where fit metrics are not enough (a protected run strips
them, and a SecAgg+ round is four messages, not one).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from fl_app.client.wrapper import ClientWrapper
from fl_app.flower_internals import ClientAppCallable, Mod
from fl_app.wire import TIMING_PREFIX

PHASES = ("process", "imports", "data", "model", "training")


class TimedClient(ClientWrapper):
    """`inner`'s client whose fit metrics also carry `seconds` (phase → seconds) and the
    fit's own time as `training`, each unless `inner` already reports it (a client that
    measures its own phases)."""

    def __init__(self, inner: NumPyClient, seconds: Mapping[str, float]) -> None:
        super().__init__(inner)
        self.seconds = dict(seconds)

    def __getattr__(self, name: str) -> Any:
        # Attributes particular to the wrapped client (a KerasClient's data, trainer).
        return getattr(self.__dict__["inner"], name)

    def fit(self, parameters: NDArrays,
            config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """The wrapped client's fit, its metrics with the phases' seconds added."""
        start = time.perf_counter()
        weights, num_examples, metrics = self.inner.fit(parameters, config)
        seconds = {**self.seconds, "training": time.perf_counter() - start}
        timed = dict(metrics)
        for phase, value in seconds.items():
            timed.setdefault(f"{TIMING_PREFIX}{phase}", float(value))
        return weights, num_examples, timed


def process_seconds(since: float) -> float:
    """Seconds from this process's start until `since` (a `time.time()`), or 0 if the
    process's start time cannot be read."""
    import psutil

    try:
        return max(0.0, since - psutil.Process().create_time())
    except psutil.Error:
        return 0.0


@dataclass(frozen=True)
class MessageSeconds:
    """What one message cost the client: `wall` and `cpu` seconds (the CPU time of the
    whole process, every thread, so TensorFlow's included), from the message's arrival at
    the outermost mod to its reply. `group` is the message's group id (Flower's round
    number for fit rounds, SecAgg+ stages included)."""

    node_id: int
    message_type: str
    group: str
    wall: float
    cpu: float


MessageSink = Callable[[MessageSeconds], None]
"""Where `message_seconds_mod` puts each measurement (it runs on the client: in simulation
a worker process, so a sink that must reach the caller writes to a file)."""


@dataclass(frozen=True)
class JsonLinesSink:
    """A `MessageSink` that appends each measurement to the file `path` as one JSON line
    (one short append per message, so the simulation's worker processes can share the
    file); picklable, so it travels with the ClientApp to those processes."""

    path: str

    def __call__(self, seconds: MessageSeconds) -> None:
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(asdict(seconds)) + "\n")

    def read(self) -> list[MessageSeconds]:
        """Every measurement written so far (none when the file does not exist)."""
        path = Path(self.path)
        if not path.is_file():
            return []
        return [MessageSeconds(**json.loads(line))
                for line in path.read_text(encoding="utf-8").splitlines() if line]


def message_seconds_mod(sink: MessageSink) -> Mod:
    """A Flower client mod that times every message it passes on (the mods after it and the
    ClientApp) and gives `sink` a `MessageSeconds`; a message that raises is not counted.
    Put it first in the ClientApp's mods (`make_client_app(outer_mods=...)`) to time
    everything the client does for a message."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        wall, cpu = time.perf_counter(), time.process_time()
        reply = call_next(msg, context)
        sink(MessageSeconds(context.node_id, msg.metadata.message_type, msg.metadata.group_id,
                            time.perf_counter() - wall, time.process_time() - cpu))
        return reply

    return mod
