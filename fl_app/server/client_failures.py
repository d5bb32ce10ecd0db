"""Name the client behind every failure, including timeouts and errors raised by a ClientApp.

Flower's server loop records a client call that raises as a bare exception: the proxy is
dropped, so a timed-out or crashed client could not be named. The client manager wraps
each proxy it registers in `NamedClientProxy`, whose calls re-raise any error as a
`ClientFailure` that carries the client's id.
"""

from __future__ import annotations

from typing import Any

from flwr.common import (
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    ReconnectIns,
)
from flwr.server.client_proxy import ClientProxy


class ClientFailure(Exception):
    """A client call that failed (raised, timed out, or the ClientApp errored), with its id."""

    def __init__(self, cid: str, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.cid = cid
        self.error = error


class NamedClientProxy(ClientProxy):
    """Delegates every call to `inner`; an error comes back as a `ClientFailure` naming it."""

    def __init__(self, inner: ClientProxy) -> None:
        super().__init__(inner.cid)
        self.inner = inner
        self.properties = inner.properties

    def __getattr__(self, name: str) -> Any:
        # Attributes particular to the wrapped proxy (e.g. a GridClientProxy's node_id).
        return getattr(self.__dict__["inner"], name)

    def _call(self, method: str, ins: Any, timeout: float | None, group_id: int | None) -> Any:
        try:
            return getattr(self.inner, method)(ins, timeout=timeout, group_id=group_id)
        except Exception as error:
            raise ClientFailure(self.cid, error) from error

    def get_properties(self, ins: GetPropertiesIns, timeout: float | None,
                       group_id: int | None) -> GetPropertiesRes:
        """Delegate to the wrapped proxy."""
        return self._call("get_properties", ins, timeout, group_id)

    def get_parameters(self, ins: GetParametersIns, timeout: float | None,
                       group_id: int | None) -> GetParametersRes:
        """Delegate to the wrapped proxy."""
        return self._call("get_parameters", ins, timeout, group_id)

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        """Delegate to the wrapped proxy."""
        return self._call("fit", ins, timeout, group_id)

    def evaluate(self, ins: EvaluateIns, timeout: float | None,
                 group_id: int | None) -> EvaluateRes:
        """Delegate to the wrapped proxy."""
        return self._call("evaluate", ins, timeout, group_id)

    def reconnect(self, ins: ReconnectIns, timeout: float | None,
                  group_id: int | None) -> DisconnectRes:
        """Delegate to the wrapped proxy."""
        return self._call("reconnect", ins, timeout, group_id)


def describe_failure(failure: tuple[ClientProxy, Any] | BaseException) -> dict[str, str]:
    """Which client failed and why, from a Flower failure entry (exception or bad status)."""
    if isinstance(failure, ClientFailure):
        return {"client": failure.cid, "error": str(failure)}
    if isinstance(failure, BaseException):  # from a proxy that is not a NamedClientProxy
        return {"client": "unknown", "error": f"{type(failure).__name__}: {failure}"}
    proxy, res = failure
    return {"client": str(proxy.cid), "error": str(res.status.message)}


def last_line(error: str) -> str:
    """The last non-empty line of an error (for the console: a remote traceback ends with
    the client's own message; history.json keeps the whole text)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[-1] if lines else error
