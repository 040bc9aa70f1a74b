"""The client's identity on ASGI requests: span attributes, a link, the TLS extension.

A request finds its connection in the registry by the ``server`` and ``client``
addresses of its scope. Everything a request needs of the handshake is derived once per
connection and cached on it: a keep-alive connection's second and later requests cost a
dictionary look-up, a ``set_attributes`` and an ``add_link``.

Two ways in: :class:`MTLSMiddleware` in the application's stack, or, with no code, the
``server_request_hook`` of opentelemetry-instrumentation-asgi's ``OpenTelemetryMiddleware``
(used by the FastAPI and Starlette instrumentations), which ``MTLSInstrumentor`` composes
with the user's own hook.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes import tls_attributes as tls
from opentelemetry.trace import Span

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._certificate import (
    CertificateInfo,
    der_to_pem,
    first_pem_certificate,
    parse_certificate,
)
from opentelemetry.instrumentation.mtls._handshake import HandshakeRecord, peer_chain
from opentelemetry.instrumentation.mtls._identity import DEFAULT_POLICY, IdentityPolicy
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._registry import REGISTRY, Connection
from opentelemetry.instrumentation.mtls._telemetry import Attributes, certificate_attributes
from opentelemetry.instrumentation.mtls._tls_values import iana_cipher_code, version_code
from opentelemetry.instrumentation.mtls.attributes import (
    TLS_CLIENT_IDENTITY_SOURCE,
    TLS_CLIENT_VERIFY_RESULT,
    VERIFY_RESULT_NONE,
    VERIFY_RESULT_SUCCESS,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SOURCE_HANDSHAKE: Final = "handshake"
SOURCE_ASGI_EXTENSION: Final = "asgi_extension"
_ENRICHED: Final = "otel.mtls.enriched"
"""Scope key marking a request already enriched (both ways in may be active)."""


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who the client of a request is, by the certificate it presented."""

    certificate: CertificateInfo
    """The parsed leaf certificate: subject, issuer, SANs, SPIFFE ID, fingerprint."""
    certificate_pem: str
    """The leaf certificate, PEM."""
    source: str
    """Where it came from: ``handshake`` (our record) or ``asgi_extension`` (the server)."""

    @property
    def subject(self) -> str | None:
        """RFC 4514 subject, e.g. ``CN=web,O=demo``."""
        return self.certificate.subject

    @property
    def spiffe_id(self) -> str | None:
        """The first ``spiffe://`` URI SAN."""
        return self.certificate.spiffe_id


def client_identity(scope: Scope) -> ClientIdentity | None:
    """Return the identity of the client certificate of an ASGI request, if it had one."""
    connection = _connection(scope)
    if connection is not None:
        record = connection.record
        if record.peer_der is None or record.peer_certificate is None:
            return None
        return ClientIdentity(
            record.peer_certificate, der_to_pem(record.peer_der), SOURCE_HANDSHAKE
        )
    der = _extension_leaf(scope)
    if der is None:
        return None
    return ClientIdentity(parse_certificate(der), der_to_pem(der), SOURCE_ASGI_EXTENSION)


def enrich(span: Span, scope: Scope) -> None:
    """Put the client's identity on a request's server span and fill the TLS extension."""
    try:
        if scope.get("type") not in ("http", "websocket") or scope.get(_ENRICHED):
            return
        connection = _connection(scope)
        if connection is None:
            _enrich_from_extension(span, scope)
            return
        scope[_ENRICHED] = True
        cache = connection.cache
        attributes = cache.get("attributes")
        if attributes is None:
            attributes = cache["attributes"] = request_attributes(
                connection.record, connection.policy
            )
        if span.is_recording():
            span.set_attributes(attributes)
            span_context = connection.record.span_context
            if span_context is not None and span_context.is_valid:
                span.add_link(span_context)
        extensions = scope.get("extensions")
        if extensions is None:
            extensions = scope["extensions"] = {}
        if "tls" not in extensions:
            extension = cache.get("extension")
            if extension is None:
                extension = cache["extension"] = tls_extension(connection)
            extensions["tls"] = {
                **extension,
                "client_cert_chain": list(extension["client_cert_chain"]),
            }
    except Exception as exc:
        _failsafe.report("enriching a request", exc)


def request_attributes(
    record: HandshakeRecord, policy: IdentityPolicy = DEFAULT_POLICY
) -> Attributes:
    """Return the attributes that every request span of a connection carries."""
    attributes: Attributes = {
        TLS_CLIENT_IDENTITY_SOURCE: SOURCE_HANDSHAKE,
        tls.TLS_RESUMED: record.resumed,
        TLS_CLIENT_VERIFY_RESULT: record.verify_result or VERIFY_RESULT_NONE,
    }
    if record.protocol_version is not None:
        attributes[tls.TLS_PROTOCOL_VERSION] = record.protocol_version
    if record.cipher is not None:
        attributes[tls.TLS_CIPHER] = record.cipher
    if record.peer_der is not None:
        attributes.update(certificate_attributes(record.peer_der, True, policy))
    return attributes


def tls_extension(connection: Connection) -> dict[str, Any]:
    """Return a connection's ASGI TLS extension (v0.2), as a server would fill it."""
    record = connection.record
    chain: list[str] = []
    if record.peer_der is not None:
        sslobj = connection.ssl_object() if connection.ssl_object is not None else None
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


def _connection(scope: Scope) -> Connection | None:
    server, client = scope.get("server"), scope.get("client")
    if not server or not client:
        return None
    return REGISTRY.get(((server[0], server[1]), (client[0], client[1])))


def _extension_leaf(scope: Scope) -> bytes | None:
    extension = (scope.get("extensions") or {}).get("tls")
    if not isinstance(extension, dict):
        return None
    chain = extension.get("client_cert_chain") or []
    if not chain or not isinstance(chain[0], str):
        return None
    return first_pem_certificate(chain[0].encode("ascii", "replace"))


def _enrich_from_extension(span: Span, scope: Scope) -> None:
    """Take the identity from a server that fills the TLS extension itself."""
    der = _extension_leaf(scope)
    if der is None or not span.is_recording():
        return
    scope[_ENRICHED] = True
    span.set_attributes(
        {
            **certificate_attributes(der, True),
            TLS_CLIENT_IDENTITY_SOURCE: SOURCE_ASGI_EXTENSION,
            TLS_CLIENT_VERIFY_RESULT: VERIFY_RESULT_SUCCESS,
        }
    )


class MTLSMiddleware:
    """ASGI middleware: the client's identity on the current server span, and in the scope.

    For ``http`` and ``websocket`` requests on TLS connections it sets the client
    certificate's attributes on the current span (the server span, when this runs inside
    OpenTelemetry's ASGI middleware), links the span to its connection's
    ``TLS server handshake`` span, and fills ``scope["extensions"]["tls"]`` when the
    server did not. Everything else passes through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Enrich, then call the application."""
        if scope.get("type") in ("http", "websocket"):
            enrich(trace.get_current_span(), scope)
        await self.app(scope, receive, send)


def compose_server_request_hook(
    user_hook: Callable[[Span, Scope], None] | None,
) -> Callable[[Span, Scope], None]:
    """Return a ``server_request_hook`` that enriches the span, then calls the user's."""

    def server_request_hook(span: Span, scope: Scope) -> None:
        enrich(span, scope)
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
