"""What a run calls as it goes, like Keras callbacks per epoch: subclass `Callback`, override
the hooks you need and pass instances to `fl_app.api.run(..., callbacks=[...])`.

    class PrintAccuracy(Callback):
        def on_round_end(self, server_round, record):
            print(server_round, record.get("centralized", {}).get("accuracy"))

The records are history.json's (`round`, `seconds`, `fit`, `centralized`, `distributed`,
`privacy`, ...), copied for each callback, so a callback cannot change what is saved. The
run's own console progress and TensorBoard writer are callbacks too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Callback:
    """Base class of the hooks a run calls on the server; every hook does nothing here."""

    def on_run_begin(self, config: Mapping[str, Any], startup_seconds: float) -> None:
        """Called once the clients are up, before the first record (round 0, or the first
        round after the resume point), with the resolved run config and the seconds the
        start-up took (imports, simulation engine, clients; not part of any round's time)."""

    def on_round_end(self, server_round: int, record: dict[str, Any]) -> None:
        """Called with each round's record, as soon as it is in history.json."""

    def on_run_end(self, history: dict[str, Any]) -> None:
        """Called when the run stops, with the whole history (its `summary` included)."""
