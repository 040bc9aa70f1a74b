"""The client's identity on ASGI requests: span attributes, a link, the TLS extension.

A request finds its connection through the connection itself (:mod:`.connection`): its
task was created while the connection's protocol callback ran. Its identity is resolved
once, when the request starts, and kept in the scope; everything after reads that.

Two ways in: :class:`MTLSMiddleware` in the application's stack, or, with no code, the
``server_request_hook`` of opentelemetry-instrumentation-asgi's ``OpenTelemetryMiddleware``
(used by the FastAPI and Starlette instrumentations), which ``MTLSInstrumentor`` composes
with the user's own hook.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import Token
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Span

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._requests import identity as _identity
from opentelemetry.instrumentation.mtls._requests import server_spans
from opentelemetry.instrumentation.mtls._requests.connection import CURRENT, Connection
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
from opentelemetry.instrumentation.mtls._requests.server_spans import OpenRequest
from opentelemetry.instrumentation.mtls._ssl.record import peer_chain, socket_address
from opentelemetry.instrumentation.mtls._ssl.values import iana_cipher_code, version_code
from opentelemetry.instrumentation.mtls._x509 import der_to_pem, first_pem_certificate

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_RESOLUTION: Final = "otel.mtls.resolution"
"""Scope key holding the request's resolution, made once when the request starts."""
_KINDS: Final = ("http", "websocket")
_OPENED: Final = "otel_mtls_opens_requests"
"""Marks an application :func:`open_requests` made, so that it is never wrapped twice."""
_NAME: Final = operator.itemgetter(0)


def client_identity(scope: Scope) -> ClientIdentity | None:
    """Return the identity of the client certificate of an ASGI request, if it had one."""
    try:
        resolution = resolution_of(scope)
    except Exception as exc:
        _failsafe.report("reading a request's identity", exc)
        return None
    return resolution.identity if resolution is not None else None


def resolution_of(scope: Scope) -> Resolution | None:
    """Return a request's resolution, resolving it now if this is the first to ask."""
    resolution: Resolution | None = scope.get(_RESOLUTION)
    if resolution is not None or scope.get("type") not in _KINDS:
        return resolution
    resolution = server_spans.opened()
    if resolution is None:
        return _resolve(scope)
    _keep(scope, resolution)
    return resolution


def _identity_headers(scope: Scope, wanted: frozenset[bytes]) -> dict[bytes, bytes]:
    """Return a request's client-certificate headers, of any format (most have none)."""
    lines = scope.get("headers") or ()
    headers: dict[bytes, bytes] = {}
    if wanted.isdisjoint(map(_NAME, lines)):  # one pass in C: the common case
        return headers
    for name, value in lines:
        if name in wanted:
            # Repeated lines combine as HTTP combines them: a list, or a malformed value.
            headers[name] = headers[name] + b"," + value if name in headers else value
    return headers


def _own(scope: Scope, connection: Connection | None) -> Connection | None:
    """Return the request's connection, unless the scope names another listening address.

    The address may only rule the connection out (a request handed in from elsewhere),
    never choose one.
    """
    if connection is None:
        return None
    server = scope.get("server")
    if server == connection.local:  # the steady state
        return connection
    address = socket_address(server)
    return connection if address is None or address == connection.local else None


def _resolve(
    scope: Scope,
    connection: Connection | None = None,
    headers: dict[bytes, bytes] | None = None,
) -> Resolution:
    """Resolve a request from its scope and connection, and keep it in the scope.

    An opened request passes what :func:`_open` found; otherwise both come from here.
    """
    settings = _identity.SETTINGS
    if headers is None:
        headers = _identity_headers(scope, settings.identity_header_names)
        connection = _own(scope, CURRENT.get())
    resolution = resolve(
        connection,
        headers,
        _extension_leaf(scope) if connection is None else None,
        settings,
    )
    _keep(scope, resolution)
    return resolution


def _keep(scope: Scope, resolution: Resolution) -> None:
    scope[_RESOLUTION] = resolution
    if resolution.connection is not None and resolution.connection.record is not None:
        _fill_extension(scope, resolution.connection)


def enrich_request(span: Span, scope: Scope) -> Resolution | None:
    """Put the client's identity on a request's server span and fill the TLS extension."""
    try:
        resolution = resolution_of(scope)
        if resolution is not None:
            enrich(span, resolution, _identity.SETTINGS)
        return resolution
    except Exception as exc:
        _failsafe.report("enriching a request", exc)
        return None


def tls_extension(connection: Connection) -> dict[str, Any]:
    """Return a connection's ASGI TLS extension (v0.2), as a server would fill it."""
    record = connection.record
    assert record is not None
    chain: list[str] = []
    if record.peer_der is not None:
        sslobj = connection.ssl_object() if connection.ssl_object is not None else None
        ders = record.peer_chain
        if not ders:
            ders = peer_chain(sslobj, record.peer_der) if sslobj is not None else (record.peer_der,)
        chain = [der_to_pem(der) for der in ders]
    certificate = record.peer_certificate
    return {
        "server_cert": connection.server_certificate,
        "client_cert_chain": chain,
        "client_cert_name": certificate.subject if certificate is not None else None,
        # Connections whose client certificate failed verification never get here.
        "client_cert_error": None,
        "tls_version": version_code(record.protocol_version),
        "cipher_suite": iana_cipher_code(record.cipher) if record.cipher else None,
    }


def _fill_extension(scope: Scope, connection: Connection) -> None:
    extensions = scope.get("extensions")
    if extensions is None:
        extensions = scope["extensions"] = {}
    if "tls" in extensions:
        return
    extension = connection.cache.get("extension")
    if extension is None:
        extension = connection.cache["extension"] = tls_extension(connection)
    # Each request its own copy: applications may change what they are given.
    extensions["tls"] = {**extension, "client_cert_chain": list(extension["client_cert_chain"])}


def _extension_leaf(scope: Scope) -> bytes | None:
    extension = (scope.get("extensions") or {}).get("tls")
    if not isinstance(extension, dict):
        return None
    chain = extension.get("client_cert_chain") or []
    if not chain or not isinstance(chain[0], str):
        return None
    return first_pem_certificate(chain[0].encode("ascii", "replace"))


async def _revoked(resolution: Resolution, settings: RequestSettings) -> bool:
    """Wait (bounded) for this connection's own revocation check; whether it says revoked."""
    future = resolution.revocation
    if future is None:
        return False
    if not future.done():
        try:
            await asyncio.wait_for(
                asyncio.wrap_future(future), settings.revocation_timeout + REVOCATION_GRACE_S
            )
        except Exception:
            return False  # no answer in time: the check says unknown, which is not revoked
        record_revocation(trace.get_current_span(), resolution, settings)
    return bool(future.result().status == REVOKED)


class MTLSMiddleware:
    """ASGI middleware: the client's identity on the current server span, and in the scope.

    For ``http`` and ``websocket`` requests on TLS connections it sets the client
    certificate's attributes on the current span (the server span, when this runs inside
    OpenTelemetry's ASGI middleware), links the span to its connection's
    ``TLS server handshake`` span, and fills ``scope["extensions"]["tls"]`` when the
    server did not. Behind a trusted proxy the identity comes from its header instead.
    With ``OTEL_PYTHON_MTLS_ENFORCE_IDENTITY_POLICY`` it answers 403 to requests the
    identity policy denies, and with ``OTEL_PYTHON_MTLS_REVOCATION=enforce`` to requests
    whose client certificate is revoked, or whose identity headers cannot be checked.
    Everything else passes through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Enrich, enforce the identity policy if asked to, then call the application."""
        if scope.get("type") in _KINDS:
            settings = _identity.SETTINGS
            resolution = enrich_request(trace.get_current_span(), scope)
            if forbidden(resolution, settings) or (
                settings.revocation_enforce
                and resolution is not None
                and await _revoked(resolution, settings)
            ):
                await _forbid(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _forbid(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer 403 (HTTP) or refuse the WebSocket handshake (which servers turn into 403)."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})
        return
    body = b"client identity not allowed\n"
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def open_requests(app: ASGIApp) -> ASGIApp:
    """Wrap a server's ASGI application: each request on a known connection is opened.

    While the application runs, the first server span any SDK tracer starts for the
    request gets its identity (:mod:`.server_spans`): FastAPI's and Starlette's own
    telemetry, contrib's middleware, the application's own span. Servers wrap their
    application with this (:mod:`.servers`); other requests pass through untouched.
    """
    if getattr(app, _OPENED, False):
        return app

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        connection = CURRENT.get()
        if connection is None or scope.get("type") not in _KINDS:
            await app(scope, receive, send)
            return
        try:
            token = _open(scope, connection)
        except Exception as exc:
            _failsafe.report("opening a request", exc)
            await app(scope, receive, send)
            return
        try:
            await app(scope, receive, send)
        finally:
            server_spans.end(token)

    setattr(application, _OPENED, True)
    return application


def _open(scope: Scope, connection: Connection) -> Token[OpenRequest | None]:
    """Open a request on a known connection for its server span (:func:`.server_spans.begin`).

    The TLS extension goes into the scope now, before the application runs, whether or
    not any span records. The identity is resolved when a span or the application first
    needs it; a request whose span is sampled out resolves it only if something other than
    the span records it: a policy's verdict, a revocation check, identity headers to report.
    """
    settings = _identity.SETTINGS
    own = _own(scope, connection)
    if own is not None and own.record is not None:
        _fill_extension(scope, own)
    headers = _identity_headers(scope, settings.identity_header_names)
    eager = _identity.eager(own, headers, settings)
    return server_spans.begin(_resolve, scope, own, headers, eager=eager, in_span=False)


def compose_server_request_hook(
    user_hook: Callable[[Span, Scope], None] | None,
) -> Callable[[Span, Scope], None]:
    """Return a ``server_request_hook`` that enriches the span, then calls the user's."""

    def server_request_hook(span: Span, scope: Scope) -> None:
        if scope.get("type") in _KINDS:
            request = server_spans.REQUEST.get()
            if request is None:  # a server we do not follow: the scope is all there is
                enrich_request(span, scope)
            elif not request.done:  # a span no SDK tracer started: this hook's is it
                request.enrich(span)
        if user_hook is not None:
            user_hook(span, scope)

    return server_request_hook


def install_asgi_hook(patches: Patches) -> None:
    """Compose our hook into every ``OpenTelemetryMiddleware`` made from now on."""
    try:
        from opentelemetry.instrumentation.asgi import (  # noqa: PLC0415
            OpenTelemetryMiddleware,
        )
    except ImportError:
        return
    patches.replace(OpenTelemetryMiddleware, "__init__", _middleware_init)


# Position of server_request_hook among OpenTelemetryMiddleware's arguments after self.
_HOOK_POSITION: Final = 3


def _middleware_init(original: Method) -> Method:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > _HOOK_POSITION:
            args = (
                *args[:_HOOK_POSITION],
                compose_server_request_hook(args[_HOOK_POSITION]),
                *args[_HOOK_POSITION + 1 :],
            )
        else:
            kwargs["server_request_hook"] = compose_server_request_hook(
                kwargs.get("server_request_hook")
            )
        original(self, *args, **kwargs)

    return __init__
