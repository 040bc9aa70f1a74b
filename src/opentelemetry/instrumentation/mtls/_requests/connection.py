"""The connection a request arrived on, found through the connection itself.

A server learns of a connection and of its bytes through the callbacks of its protocol
object (``connection_made``, ``data_received``), and those callbacks are what create a
request's task: uvicorn creates it when a request's bytes arrive, hypercorn and aiohttp
when the connection is made. While they run, :data:`CURRENT` holds the connection.
asyncio and uvloop copy the context into every task created then, so a request's task,
and everything it awaits or starts, sees the connection it arrived on.

Nothing in a request can change that: not ``scope["client"]`` (which proxy-header
middlewares rewrite from ``X-Forwarded-For``), not any header. The connection's addresses
are the transport's own, and the TCP peer is what proxy trust is judged on.

Each protocol gets instance attributes that shadow those callbacks for the life of its
connection; its class is untouched and other protocols pay nothing.
"""

from __future__ import annotations

import asyncio.base_events
import importlib.util
import ssl
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._ssl.hooks import connection_record
from opentelemetry.instrumentation.mtls._ssl.local_certificates import LocalCertificates
from opentelemetry.instrumentation.mtls._ssl.record import (
    Address,
    HandshakeRecord,
    SSLEndpoint,
    socket_address,
)
from opentelemetry.instrumentation.mtls._x509 import parse_certificate, sha256_hex

_SHADOWED: Final = ("connection_made", "data_received", "eof_received", "buffer_updated")
"""The protocol callbacks during which a request's task may be created."""
_MARK: Final = "otel_mtls"


@dataclass(slots=True, eq=False, weakref_slot=True)
class Connection:
    """One server connection, as its transport describes it; requests on it read this."""

    local: Address | None
    """The listening side's address, from the socket."""
    peer: Address | None
    """The TCP peer, from the socket: what a proxy's trust is judged on."""
    record: HandshakeRecord | None = None
    """The connection's handshake; None on a plaintext connection."""
    ssl_object: weakref.ref[SSLEndpoint] | None = None
    """For reading the verified chain (Python 3.13+) when a request first asks."""
    server_certificate: str | None = None
    """PEM of the certificate the server presented, when the process loaded it."""
    issuer_sha256: str | None = None
    """SHA-256 of the CA certificate that issued the client's, when it is known."""
    revocation: Future[Any] | None = None
    """The client certificate's revocation check, running off the handshake's path."""
    cache: dict[str, Any] = field(default_factory=dict)
    """What requests derive from the handshake, built on the first request."""


CURRENT: Final[ContextVar[Connection | None]] = ContextVar("otel_mtls_connection", default=None)
"""The connection whose callback, or whose request's task, is running."""

_live: weakref.WeakSet[Connection] = weakref.WeakSet()


def current() -> Connection | None:
    """Return the connection the running request arrived on, if a tracked server made it."""
    return CURRENT.get()


def live_connections() -> int:
    """Return how many tracked connections are still alive (a test helper for leaks)."""
    return len(_live)


Describe = Callable[[Any], Connection | None]
"""Builds the :class:`Connection` of a transport handed to ``connection_made``."""


def track(factory: Callable[[], Any], describe: Describe) -> Callable[[], Any]:
    """Wrap a server's protocol factory so each connection's callbacks set :data:`CURRENT`."""

    def protocol_factory() -> Any:
        protocol = factory()
        try:
            _shadow(protocol, describe)
        except Exception as exc:
            _failsafe.report("following a server connection", exc)
        return protocol

    return protocol_factory


def _shadow(protocol: Any, describe: Describe) -> None:
    state = getattr(protocol, "__dict__", None)
    if state is None or getattr(state.get("connection_made"), _MARK, False):
        return  # no instance attributes, or a factory handing out one protocol twice
    made, lost = getattr(protocol, "connection_made", None), protocol.connection_lost
    # The connection, once made: a cell, read on every chunk of bytes.
    connection: Connection | None = None
    set_current, reset_current = CURRENT.set, CURRENT.reset

    def connection_made(transport: Any) -> None:
        nonlocal connection
        try:
            connection = describe(transport)
            if connection is not None:
                _live.add(connection)
        except Exception as exc:
            _failsafe.report("reading a server connection", exc)
        token = set_current(connection)
        try:
            if made is not None:
                made(transport)
        finally:
            reset_current(token)

    def with_data(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        # data_received(data) and buffer_updated(nbytes): one argument, no packing.
        def callback(argument: Any) -> Any:
            token = set_current(connection)
            try:
                return original(argument)
            finally:
                reset_current(token)

        return callback

    def eof_received() -> Any:
        token = set_current(connection)
        try:
            return eof() if eof is not None else None
        finally:
            reset_current(token)

    def connection_lost(exc: BaseException | None) -> None:
        nonlocal connection
        # Our closures hold bound methods of the protocol: a cycle, broken here.
        for name in (*_SHADOWED, "connection_lost"):
            state.pop(name, None)
        connection = None
        lost(exc)

    connection_made.otel_mtls = True  # type: ignore[attr-defined]
    state["connection_made"] = connection_made
    for name in ("data_received", "buffer_updated"):
        original = getattr(protocol, name, None)
        if original is not None:
            state[name] = with_data(original)
    eof = getattr(protocol, "eof_received", None)
    if eof is not None:
        state["eof_received"] = eof_received
    state["connection_lost"] = connection_lost


class ServerConnections:
    """Follows the connections of this process's servers, so that requests can find theirs.

    Every TLS server made with ``create_server`` (asyncio's and uvloop's loops; asyncio's
    ``start_server`` and aiohttp go through it) is followed; plaintext servers too when
    ``plaintext`` is set, because a trusted proxy in front may speak plain HTTP and its
    trust is judged on the TCP peer.
    """

    def __init__(
        self,
        local_certificates: LocalCertificates,
        revocation: Any | None = None,
        *,
        plaintext: bool = False,
    ) -> None:
        self._local = local_certificates
        self._revocation = revocation
        self._plaintext = plaintext
        # Each server context's trusted CAs by subject, to find a client's issuer.
        self._issuers: weakref.WeakKeyDictionary[ssl.SSLContext, dict[str, bytes]] = (
            weakref.WeakKeyDictionary()
        )

    def install(self, patches: Patches) -> None:
        """Wrap the protocol factory of every server created from now on."""
        patches.replace(asyncio.base_events.BaseEventLoop, "create_server", self._create_server)
        if importlib.util.find_spec("uvloop") is not None:
            import uvloop  # noqa: PLC0415  # optional, only where installed

            patches.replace(uvloop.Loop, "create_server", self._create_server)

    def _create_server(self, original: Method) -> Method:
        wrap = self._wrap

        def create_server(self: Any, *args: Any, **kwargs: Any) -> Any:
            if args:
                args = (wrap(args[0], kwargs.get("ssl")), *args[1:])
            elif "protocol_factory" in kwargs:
                kwargs["protocol_factory"] = wrap(kwargs["protocol_factory"], kwargs.get("ssl"))
            return original(self, *args, **kwargs)

        return create_server

    def _wrap(self, factory: Any, context: object) -> Any:
        if isinstance(context, ssl.SSLContext) or (self._plaintext and context is None):
            return track(factory, self.describe)
        return factory

    def describe(self, transport: Any) -> Connection | None:
        """Build the connection a transport carries: its addresses, and its handshake."""
        local = socket_address(transport.get_extra_info("sockname"))
        peer = socket_address(transport.get_extra_info("peername"))
        # An asyncio transport's SSLObject, or a blocking server's own SSLSocket (WSGI).
        sslobj = transport.get_extra_info("ssl_object")
        if not isinstance(sslobj, ssl.SSLObject | ssl.SSLSocket):
            return Connection(local, peer) if self._plaintext else None
        record = connection_record(sslobj)
        connection = Connection(
            local,
            peer,
            record,
            weakref.ref(sslobj),
            self._local.pem(sslobj.context),
        )
        if record.peer_der is not None:
            issuer = self._issuer_of(record, sslobj.context)
            if issuer is not None:
                connection.issuer_sha256 = sha256_hex(issuer)
            if self._revocation is not None:
                connection.revocation = self._revocation.submit(record.peer_der, issuer)
        return connection

    def _issuer_of(self, record: HandshakeRecord, context: ssl.SSLContext) -> bytes | None:
        """Return the DER of the CA that issued the client's certificate (chain, else context)."""
        if len(record.peer_chain) > 1:
            return record.peer_chain[1]
        certificate = record.peer_certificate
        if certificate is None or certificate.issuer is None:
            return None
        issuers = self._issuers.get(context)
        if issuers is None:
            issuers = {}
            for der in context.get_ca_certs(binary_form=True):
                subject = parse_certificate(der).subject
                if subject is not None:
                    issuers[subject] = der
            self._issuers[context] = issuers
        return issuers.get(certificate.issuer)

    def close(self) -> None:
        """Stop the revocation checks this follower started."""
        if self._revocation is not None:
            self._revocation.close()
