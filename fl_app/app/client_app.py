"""The Flower ClientApp: each node's data and the shared trainer behind a `KerasClient`.

Importing this module imports no TensorFlow: the first message does, and the client trains
in this process as `fl_app.app.local_client.client_for` builds it, keeping TensorFlow, the
node's data and the compiled model for the next message when the process lives on (a
simulation's workers, a deployment node's executor: `fl_app.worker.executor`). The client is
wrapped here, in
the ClientApp, by `CompressingClient` (`fl_app.client.compression`), which decodes a
compressed broadcast and encodes the update, keeping its error-feedback residual in the
node's `context.state`. Every ClientApp carries `node_policy_mod` first (the node's own
floor from its node config, `fl_app.client.node_policy`), `secure_aggregation_mod` (SecAgg+,
active only for the protocol's messages) and, for a protected run (SecAgg+ or homomorphic
encryption, or a node whose node config sets `require-secure`), `withhold_weights_mod` and
`private_replies_mod` (no weights, fit metrics or evaluation in the clear); see
`fl_app.client.secure_mod`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from flwr.client import Client
from flwr.clientapp import ClientApp
from flwr.common import Context

from fl_app.app.logs import quiet_libraries
from fl_app.client.compression import CompressingClient
from fl_app.client.node_policy import NodePolicy, node_policy_mod
from fl_app.client.secure_mod import (
    private_replies_mod,
    secure_aggregation_mod,
    withhold_weights_mod,
)
from fl_app.client.timing import TimedClient, process_seconds
from fl_app.flower_internals import Mod
from fl_app.schema import RunConfig, Scalar


class _StartUp:
    """The `process` and `imports` seconds of this process's first message (`process`: 0
    after it)."""

    def __init__(self) -> None:
        self.first = True

    def seconds(self, imports_since: float) -> dict[str, float]:
        """This message's start-up phases; `imports_since` is when its own imports began:
        `process` until then (the first message only), `imports` from then until now."""
        imports = time.time() - imports_since
        if not self.first:
            return {"process": 0.0, "imports": imports}
        self.first = False
        return {"process": process_seconds(imports_since), "imports": imports}


# One per process (not per ClientApp object: the simulation engine ships a copy of the app
# with every message to its long-lived workers).
start_up = _StartUp()


def make_client_app(fixed_config: RunConfig | None = None,
                    node_config: Mapping[str, Scalar] | None = None,
                    outer_mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp; with `fixed_config` it ignores `context.run_config` (for run_simulation),
    and `node_config` adds to every node's own (the simulation engine's is fixed; this is
    how run_simulation gives the simulated nodes their key file, which the server never
    sees). Each fit's metrics say where the message's time went (`fl_app.client.timing`).
    `outer_mods` go before the app's own mods, outermost first (a benchmark's
    `fl_app.client.timing.message_seconds_mod` sees each message as it arrives).
    """
    extra = dict(node_config or {})

    def node_config_of(context: Context) -> Mapping[str, Scalar]:
        return {**context.node_config, **extra}

    def client_fn(context: Context) -> Client:
        node = node_config_of(context)
        imports_since = time.time()
        raw = fixed_config if fixed_config is not None else context.run_config
        quiet_libraries(raw.get("verbose") is True)  # before anything imports TensorFlow
        from fl_app.app.config import resolve
        from fl_app.app.local_client import client_for as build  # imports TensorFlow
        from fl_app.data.types import DataError

        seconds = start_up.seconds(imports_since)
        cfg = fixed_config if fixed_config is not None else resolve(raw)
        try:
            client = build(cfg, node, run_id=context.run_id, state=context.state)
        except DataError as err:  # the server sees only this message: name the node
            raise DataError(f"node {context.node_id}: {err}") from err
        return CompressingClient(TimedClient(client, seconds).to_client(), context.state)

    def run_config(context: Context) -> Mapping[str, Scalar]:
        return fixed_config if fixed_config is not None else context.run_config

    def secure_required(context: Context) -> bool:
        return run_config(context).get("secure-aggregation", "none") != "none"

    def protected(context: Context) -> bool:  # the server must not see one client's weights
        return secure_required(context) or \
            run_config(context).get("homomorphic-encryption", "none") != "none" or \
            NodePolicy.from_node_config(node_config_of(context)).require_secure is not None

    return ClientApp(client_fn=client_fn, mods=[
        *outer_mods, node_policy_mod(run_config, node_config_of),
        withhold_weights_mod(protected), private_replies_mod(protected),
        secure_aggregation_mod(secure_required, run_config, node_config_of)])


app = make_client_app()
