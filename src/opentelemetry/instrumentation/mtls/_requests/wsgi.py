"""The client's identity on WSGI requests: span attributes, a link, ``client_identity(environ)``.

A WSGI request's connection is its own socket, which the server puts in the environ
under a key no request can write (HTTP headers arrive as ``HTTP_*``): gunicorn's
``gunicorn.socket``, werkzeug's ``werkzeug.socket``. Its handshake record is on the
``SSLSocket`` (the ssl hooks keep it there); the TCP peer, which a proxy's trust is judged
on, is the socket's ``getpeername()``, never ``REMOTE_ADDR``, which proxy-fix middlewares
rewrite from ``X-Forwarded-For``. The identity is resolved once per request and kept in
the environ; everything after reads that.

Two ways in, as for ASGI: the servers we follow open every request for its server span
(:func:`open_requests`, :mod:`.server_spans`), whichever instrumentation makes it; and
:class:`MTLSWSGIMiddleware` in the application's stack enriches the span current there
and enforces the identity policy.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable
from contextvars import Token
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Span

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._requests import identity as _identity
from opentelemetry.instrumentation.mtls._requests import server_spans
from opentelemetry.instrumentation.mtls._requests.connection import Connection, Describe
from opentelemetry.instrumentation.mtls._requests.enrichment import (
    REVOCATION_GRACE_S,
    enrich,
    forbidden,
    record_revocation,
)
from opentelemetry.instrumentation.mtls._requests.identity import (
    ClientIdentity,
    RequestSettings,
    Resolution,
    resolve,
)
from opentelemetry.instrumentation.mtls._requests.revocation import REVOKED

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

SOCKET_KEYS: Final = ("gunicorn.socket", "werkzeug.socket")
"""Where the servers we follow hand the application the request's own socket."""
_RESOLUTION: Final = "otel.mtls.resolution"
"""Environ key holding the request's resolution, made once when it is first asked for."""
_CONNECTION: Final = "_otel_mtls_connection"
"""Key of a socket's :class:`Connection` in its ``__dict__``: one per connection."""
_FORBIDDEN: Final = b"client identity not allowed\n"
_OPENED: Final = "otel_mtls_opens_requests"
"""Marks an application :func:`open_requests` made, so that it is never wrapped twice."""

_describe: Describe | None = None


def configure(describe: Describe | None) -> None:
    """Say how connections are built from sockets (``MTLSInstrumentor`` does, and undoes)."""
    global _describe  # noqa: PLW0603
    _describe = describe


class _SocketTransport:
    """A blocking server socket, described the way asyncio's transports describe theirs."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def get_extra_info(self, name: str) -> object:
        sock = self._sock
        try:
            if name == "sockname":
                return sock.getsockname()
            if name == "peername":
                return sock.getpeername()
        except OSError:  # the peer is gone already
            return None
        if name == "ssl_object" and isinstance(sock, ssl.SSLSocket):
            return sock
        return None


def connection_of(environ: Environ) -> Connection | None:
    """Return the connection of a WSGI request, from the socket its server handed over."""
    describe = _describe
    if describe is None:
        return None
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")  # SOCKET_KEYS
    if not isinstance(sock, socket.socket):
        return None
    # SSLSockets have a __dict__ (plain sockets have slots): one Connection per connection,
    # made on its first request, as asyncio servers make theirs when the connection is made.
    state = getattr(sock, "__dict__", None)
    connection: Connection | None = state.get(_CONNECTION) if state is not None else None
    if connection is None:
        connection = describe(_SocketTransport(sock))
        if state is not None and connection is not None:
            state[_CONNECTION] = connection
    return connection


def resolution_of(environ: Environ) -> Resolution:
    """Return a request's resolution, resolving it now if this is the first to ask."""
    resolution = environ.get(_RESOLUTION)
    if not isinstance(resolution, Resolution):
        resolution = server_spans.opened() or _resolve(environ)
        environ[_RESOLUTION] = resolution
    return resolution


def _resolve(
    environ: Environ,
    connection: Connection | None = None,
    headers: dict[bytes, bytes] | None = None,
) -> Resolution:
    """Resolve a request from its environ and its socket, and keep it in the environ.

    An opened request passes what :func:`_open` found; otherwise both come from here.
    """
    settings = _identity.SETTINGS
    if headers is None:
        headers = _identity_headers(environ, settings)
        connection = connection_of(environ)
    # The environ's SERVER_NAME and SERVER_PORT come from the Host header: not passed.
    resolution = resolve(connection, headers, None, settings)
    environ[_RESOLUTION] = resolution
    return resolution


def _identity_headers(environ: Environ, settings: RequestSettings) -> dict[bytes, bytes]:
    """Return a request's client-certificate headers, of any format (most have none)."""
    keys, names = _header_keys(settings)
    headers: dict[bytes, bytes] = {}
    if names.isdisjoint(environ):  # one pass in C: the common case
        return headers
    for key, name in keys:
        value = environ.get(key)
        if isinstance(value, str):
            # PEP 3333: header values are latin-1 decoded bytes; repeated lines are joined.
            headers[name] = value.encode("latin-1", "replace")
    return headers


HeaderKeys = tuple[tuple[tuple[str, bytes], ...], frozenset[str]]


def _header_keys(settings: RequestSettings) -> HeaderKeys:
    """Return the environ key (``HTTP_X_FORWARDED_CLIENT_CERT``) of every identity header."""
    cached = _header_cache.get(id(settings))
    if cached is None or cached[0] is not settings:
        keys = tuple(
            ("HTTP_" + name.decode("latin-1").upper().replace("-", "_"), name)
            for name in sorted(settings.identity_header_names)
        )
        _header_cache.clear()
        cached = _header_cache[id(settings)] = (settings, (keys, frozenset(k for k, _ in keys)))
    return cached[1]


_header_cache: dict[int, tuple[RequestSettings, HeaderKeys]] = {}


def client_identity(environ: Environ) -> ClientIdentity | None:
    """Return the identity of the client certificate of a WSGI request, if it had one."""
    try:
        return resolution_of(environ).identity
    except Exception as exc:
        _failsafe.report("reading a request's identity", exc)
        return None


def enrich_request(span: Span, environ: Environ) -> Resolution | None:
    """Put the client's identity on a WSGI request's span (once per request)."""
    try:
        resolution = resolution_of(environ)
        enrich(span, resolution, _identity.SETTINGS)
        return resolution
    except Exception as exc:
        _failsafe.report("enriching a request", exc)
        return None


def open_requests(app: WSGIApp) -> WSGIApp:
    """Wrap a server's WSGI application: each request is opened for its server span."""
    if getattr(app, _OPENED, False):
        return app

    def application(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            token = _open(environ)
        except Exception as exc:
            _failsafe.report("opening a request", exc)
            return app(environ, start_response)
        try:
            return app(environ, start_response)
        finally:
            server_spans.end(token)

    setattr(application, _OPENED, True)
    return application


def _open(environ: Environ) -> Token[server_spans.OpenRequest | None]:
    """Open a request for its server span (:func:`.server_spans.begin`): resolved lazily.

    A request whose span is sampled out resolves its identity only if something other than
    the span records it: a policy's verdict, a revocation check, identity headers to report.
    """
    settings = _identity.SETTINGS
    connection = connection_of(environ)
    headers = _identity_headers(environ, settings)
    eager = _identity.eager(connection, headers, settings)
    return server_spans.begin(_resolve, environ, connection, headers, eager=eager, in_span=False)


def _refused(resolution: Resolution, settings: RequestSettings) -> bool:
    """Whether the identity policy or a revocation refuses the request (never raises)."""
    try:
        return forbidden(resolution, settings) or (
            settings.revocation_enforce and _revoked(resolution, settings)
        )
    except Exception as exc:
        _failsafe.report("enforcing the identity policy", exc)
        return False


def _revoked(resolution: Resolution, settings: RequestSettings) -> bool:
    """Wait (bounded) for this connection's own revocation check; whether it says revoked."""
    future = resolution.revocation
    if future is None:
        return False
    if not future.done():
        try:
            future.result(settings.revocation_timeout + REVOCATION_GRACE_S)
        except Exception:
            return False  # no answer in time: the check says unknown, which is not revoked
        record_revocation(trace.get_current_span(), resolution, settings)
    return bool(future.result().status == REVOKED)


class MTLSWSGIMiddleware:
    """WSGI middleware: the client's identity on the current span, and 403 where enforced.

    The WSGI sibling of :class:`~opentelemetry.instrumentation.mtls.MTLSMiddleware`. It
    sets the client certificate's attributes on the current span (the server span, when
    this runs inside OpenTelemetry's WSGI middleware or Flask's or Django's
    instrumentation) and links it to its connection's ``TLS server handshake`` span,
    unless the request's server span already has them. With
    ``OTEL_PYTHON_MTLS_ENFORCE_IDENTITY_POLICY`` it answers 403 to requests the identity
    policy denies, and with ``OTEL_PYTHON_MTLS_REVOCATION=enforce`` to requests whose
    client certificate is revoked, or whose identity headers cannot be checked.
    """

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Enrich, enforce the identity policy if asked to, then call the application."""
        settings = _identity.SETTINGS
        resolution = enrich_request(trace.get_current_span(), environ)
        if resolution is not None and _refused(resolution, settings):
            headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(_FORBIDDEN)))]
            start_response("403 Forbidden", headers)
            return [_FORBIDDEN]
        return self.app(environ, start_response)
