"""The Flower ClientApp: each node's data and the shared trainer behind a `KerasClient`.

Importing this module imports no TensorFlow. A node whose node config names a worker
(`worker-socket`, see `fl_app.app.worker_link`) forwards each message to that long-lived
process, which keeps TensorFlow, the node's data and the compiled model across messages;
any other node (simulation, `flwr run .`, a plain SuperNode) trains in this process, as
`fl_app.app.local_client.client_for` builds it. Every ClientApp carries
`secure_aggregation_mod` (SecAgg+, active only for the protocol's messages; see
`fl_app.client.secure_mod`).
"""

from __future__ import annotations

import time

IMPORT_START = time.time()  # before this module's imports: the `process` phase ends here


from flwr.client import Client, NumPyClient  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import Context  # noqa: E402

from fl_app.app.worker_link import WorkerAddress, WorkerClient  # noqa: E402
from fl_app.client.secure_mod import secure_aggregation_mod  # noqa: E402
from fl_app.client.timing import TimedClient, process_seconds  # noqa: E402
from fl_app.schema import RunConfig  # noqa: E402

IMPORTED = time.time()


class _StartUp:
    """The `process` and `imports` seconds of this process's first message (0 after it)."""

    def __init__(self) -> None:
        self.first = True

    def seconds(self, imports_since: float) -> dict[str, float]:
        """This message's start-up phases; `imports_since` is when its imports began
        (the module's, or later ones that this message triggered)."""
        if not self.first:
            return {"process": 0.0, "imports": time.time() - imports_since}
        self.first = False
        return {"process": process_seconds(IMPORT_START),
                "imports": IMPORTED - IMPORT_START + time.time() - imports_since}


def make_client_app(fixed_config: RunConfig | None = None) -> ClientApp:
    """A ClientApp; with `fixed_config` it ignores `context.run_config` (for run_simulation).

    Each fit's metrics say where the message's time went (`fl_app.client.timing`).
    """
    start_up = _StartUp()

    def client_fn(context: Context) -> Client:
        address = WorkerAddress.from_node_config(context.node_config)
        if address is not None and fixed_config is None:
            client: NumPyClient = WorkerClient(address, context.run_config,
                                               context.node_config, f"node {context.node_id}")
            return TimedClient(client, start_up.seconds(time.time())).to_client()
        imports_since = time.time()
        from fl_app.app.config import resolve
        from fl_app.app.local_client import client_for as build  # imports TensorFlow
        from fl_app.data.types import DataError

        seconds = start_up.seconds(imports_since)
        cfg = fixed_config if fixed_config is not None else resolve(context.run_config)
        try:
            client = build(cfg, context.node_config)
        except DataError as err:  # the server sees only this message: name the node
            raise DataError(f"node {context.node_id}: {err}") from err
        return TimedClient(client, seconds).to_client()

    def secure_required(context: Context) -> bool:
        run_config = fixed_config if fixed_config is not None else context.run_config
        return run_config.get("secure-aggregation", "none") != "none"

    return ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod(secure_required)])


app = make_client_app()
