"""TLS 1.3 late rejection: the server refuses our certificate after our handshake returned.

In TLS 1.3 the client finishes its handshake before the server has judged the client's
certificate, so a rejection (an alert, or a server that just hangs up) reaches the
client on its first read. For each TLS 1.3 client connection we stand in for the ssl
object's ``read`` until the first application data arrives: an instance attribute that
shadows the class's method, so every other connection pays nothing and the watched one
stops paying once it has read. What the application sees is unchanged: the original
``read`` runs, and its result or exception passes through.
"""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Callable
from typing import Any, Final

from opentelemetry.instrumentation.mtls import _errors
from opentelemetry.instrumentation.mtls._handshake import HandshakeRecord, SSLEndpoint

_AGAIN: Final = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_READ: Final = "read"

OnRejected = Callable[[HandshakeRecord, str, str], None]
"""Called with the client's handshake record, the ``error.type`` and a message."""


class FirstReadWatch:
    """The ``read`` of one TLS 1.3 client connection until its first application data."""

    __slots__ = ("_endpoint", "_on_rejected", "_record")

    def __init__(
        self, endpoint: SSLEndpoint, record: HandshakeRecord, on_rejected: OnRejected
    ) -> None:
        # A weak reference: the watch lives in the endpoint's __dict__.
        self._endpoint = weakref.ref(endpoint)
        self._record = record
        self._on_rejected = on_rejected

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        endpoint = self._endpoint()
        if endpoint is None:  # pragma: no cover - the endpoint owns us
            raise RuntimeError("TLS connection is gone")
        try:
            read: Callable[..., Any] = type(endpoint).read
            data = read(endpoint, *args, **kwargs)
        except _AGAIN:
            raise
        except BaseException as exc:
            self.stop(endpoint)
            error_type = _rejection_type(exc)
            if error_type is not None:
                self._on_rejected(self._record, error_type, str(exc))
            raise
        self.stop(endpoint)
        if not data:
            self.closed()
        return data

    def stop(self, endpoint: SSLEndpoint) -> None:
        """Put the class's ``read`` back in charge of this connection."""
        if endpoint.__dict__.get(_READ) is self:
            del endpoint.__dict__[_READ]

    def closed(self) -> None:
        """Report a server that closed the connection before sending anything."""
        self._on_rejected(
            self._record,
            _errors.PEER_CONNECTION_CLOSED,
            "the server closed the connection before sending any data",
        )


def watch(endpoint: SSLEndpoint, record: HandshakeRecord, on_rejected: OnRejected) -> None:
    """Watch a TLS 1.3 client connection's first read for the server's rejection."""
    endpoint.__dict__[_READ] = FirstReadWatch(endpoint, record, on_rejected)


def connection_lost(endpoint: SSLEndpoint) -> None:
    """Report a watched connection that an event loop lost before any data: a rejection."""
    watcher = endpoint.__dict__.get(_READ)
    if isinstance(watcher, FirstReadWatch):
        watcher.stop(endpoint)
        watcher.closed()


def _rejection_type(exc: BaseException) -> str | None:
    error_type = _errors.error_type(exc)
    if error_type in (_errors.PEER_REJECTED_CERTIFICATE, _errors.PEER_CONNECTION_CLOSED):
        return error_type
    return None
