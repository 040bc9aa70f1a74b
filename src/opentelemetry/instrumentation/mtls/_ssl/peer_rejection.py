"""TLS 1.3 late rejection: the server refuses our certificate after our handshake returned.

In TLS 1.3 the client finishes its handshake before the server has judged the client's
certificate, so a rejection (an alert, or a server that just hangs up) reaches the
client on its first read, or makes its first write fail. For each TLS 1.3 client
connection we stand in for the ssl object's ``read`` (and a blocking socket's ``send``)
until the first application data arrives: instance attributes that shadow the class's
methods, so every other connection pays nothing and the watched one stops paying once it
has read. What the application sees is unchanged: the original
``read`` runs, and its result or exception passes through.
"""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Callable
from typing import Any, Final, Protocol

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._ssl import errors as _errors
from opentelemetry.instrumentation.mtls._ssl.record import HandshakeRecord, SSLEndpoint

_AGAIN: Final = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_READ: Final = "read"
_SEND: Final = "send"


class OnRejected(Protocol):
    """Called with the client's handshake record, the ``error.type``, a message and the alert."""

    def __call__(
        self, record: HandshakeRecord, error_type: str, message: str, *, alert: str | None = None
    ) -> None: ...


class FirstDataWatch:
    """One TLS 1.3 client connection, watched until its first application data arrives.

    Stands in for the ssl object's ``read`` and, on blocking sockets, ``send``: HTTP
    clients write first, and a server that has already rejected us makes the write fail.
    """

    __slots__ = ("_endpoint", "_on_rejected", "_record", "read", "send")

    def __init__(
        self, endpoint: SSLEndpoint, record: HandshakeRecord, on_rejected: OnRejected
    ) -> None:
        # A weak reference: the watch lives in the endpoint's __dict__.
        self._endpoint = weakref.ref(endpoint)
        self._record = record
        self._on_rejected = on_rejected
        self.read = self._call(_READ)
        self.send = self._call(_SEND)

    def _call(self, name: str) -> Callable[..., Any]:
        def method(*args: Any, **kwargs: Any) -> Any:
            endpoint = self._endpoint()
            if endpoint is None:  # pragma: no cover - the endpoint owns us
                raise RuntimeError("TLS connection is gone")
            original: Callable[..., Any] = getattr(type(endpoint), name)
            try:
                result = original(endpoint, *args, **kwargs)
            except _AGAIN:
                raise
            except BaseException as exc:
                self._verdict(endpoint, exc)
                raise
            if name == _READ and _asked_for_data(args, kwargs):
                self._verdict(endpoint, None if result else _CLOSED)
            return result

        method.watch = self  # type: ignore[attr-defined]  # found again by connection_lost
        return method

    def _verdict(self, endpoint: SSLEndpoint, exc: BaseException | None) -> None:
        """End the watch; report a rejection if ``exc`` is one. Never raises into the host."""
        try:
            self.stop(endpoint)
            if exc is _CLOSED:
                self.closed()
            elif exc is not None:
                error_type = _rejection_type(exc)
                if error_type is not None:
                    # The server's alert, as OpenSSL named it: the message observer has
                    # left this connection when its handshake ended (see _ssl/messages).
                    alert = _errors.received_alert(exc)
                    self._on_rejected(self._record, error_type, str(exc), alert=alert)
        except Exception as error:
            _failsafe.report("recording a late rejection", error)

    def stop(self, endpoint: SSLEndpoint) -> None:
        """Put the class's methods back in charge of this connection."""
        state = endpoint.__dict__
        for name in (_READ, _SEND):
            if state.get(name) is getattr(self, name):
                del state[name]

    def closed(self) -> None:
        """Report a server that closed the connection before sending anything."""
        self._on_rejected(
            self._record,
            _errors.PEER_CONNECTION_CLOSED,
            "the server closed the connection before sending any data",
        )


_CLOSED: Final = ConnectionResetError("the server closed the connection before sending data")


def _asked_for_data(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a read asked for at least one byte: ``recv(0)`` says nothing of the peer."""
    length = args[0] if args else kwargs.get("len", 1)
    return not isinstance(length, int) or length != 0


def watch(endpoint: SSLEndpoint, record: HandshakeRecord, on_rejected: OnRejected) -> None:
    """Watch a TLS 1.3 client connection's first read (and write) for a rejection."""
    watcher = FirstDataWatch(endpoint, record, on_rejected)
    state = endpoint.__dict__
    state[_READ] = watcher.read
    if isinstance(endpoint, ssl.SSLSocket):
        # SSLSocket.sendall calls self.send; SSLObject writes never meet the peer.
        state[_SEND] = watcher.send


def stop_watching(endpoint: SSLEndpoint) -> None:
    """Stop watching a connection that this side is closing: its end is no rejection."""
    watcher = getattr(endpoint.__dict__.get(_READ), "watch", None)
    if isinstance(watcher, FirstDataWatch):
        watcher.stop(endpoint)


def connection_lost(endpoint: SSLEndpoint) -> None:
    """Report a watched connection that an event loop lost before any data: a rejection."""
    read = endpoint.__dict__.get(_READ)
    watcher = getattr(read, "watch", None)
    if isinstance(watcher, FirstDataWatch):
        watcher.stop(endpoint)
        watcher.closed()


def _rejection_type(exc: BaseException) -> str | None:
    error_type = _errors.error_type(exc)
    if error_type in (_errors.PEER_REJECTED_CERTIFICATE, _errors.PEER_CONNECTION_CLOSED):
        return error_type
    return None
