"""The client's identity on ASGI requests: span attributes, a link, the TLS extension.

Where TLS ends at a trusted proxy (Envoy, nginx, Traefik, RFC 9440), the identity comes
from the header it forwards instead; the same headers from any other peer are ignored
and reported. An identity policy, when configured, judges each request's identity.

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

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.metrics import Counter
from opentelemetry.semconv._incubating.attributes import tls_attributes as tls
from opentelemetry.semconv.attributes import client_attributes
from opentelemetry.trace import Span

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._config import IPNetwork
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._redaction import DEFAULT_POLICY, IdentityPolicy
from opentelemetry.instrumentation.mtls._requests.connection import REGISTRY, Connection
from opentelemetry.instrumentation.mtls._requests.proxy_headers import (
    ProxiedIdentity,
    parse_nginx,
    parse_rfc9440,
    parse_traefik,
    parse_xfcc,
)
from opentelemetry.instrumentation.mtls._requests.revocation import REVOKED
from opentelemetry.instrumentation.mtls._requests.rules import Decision, IdentityRules, decide
from opentelemetry.instrumentation.mtls._signals import audit as _audit
from opentelemetry.instrumentation.mtls._signals.audit import RateLimiter
from opentelemetry.instrumentation.mtls._signals.handshake import (
    Attributes,
    info_attributes,
    record_certificate_attributes,
)
from opentelemetry.instrumentation.mtls._ssl.record import HandshakeRecord, peer_chain
from opentelemetry.instrumentation.mtls._ssl.values import iana_cipher_code, version_code
from opentelemetry.instrumentation.mtls._x509 import (
    CertificateInfo,
    der_to_pem,
    first_pem_certificate,
    parse_certificate,
)
from opentelemetry.instrumentation.mtls.attributes import (
    TLS_CLIENT_IDENTITY_DECISION,
    TLS_CLIENT_IDENTITY_RULE,
    TLS_CLIENT_IDENTITY_SOURCE,
    TLS_CLIENT_REVOCATION_SOURCE,
    TLS_CLIENT_REVOCATION_STATUS,
    TLS_CLIENT_VERIFY_RESULT,
    TLS_CLIENT_X509_PARSE_ERROR,
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
_DECISION: Final = "otel.mtls.decision"
"""Scope key holding the identity policy's decision, for enforcement."""
DECISION_EVENT: Final = "tls.identity.decision"
REVOCATION_EVENT: Final = "tls.revocation.checked"
RULE_UNTRUSTED_PROXY_HEADER: Final = "untrusted_proxy_header"

_XFCC: Final = b"x-forwarded-client-cert"
_CLIENT_CERT: Final = b"client-cert"
_CLIENT_CERT_CHAIN: Final = b"client-cert-chain"
_TRAEFIK_CERT: Final = b"x-forwarded-tls-client-cert"
_TRAEFIK_INFO: Final = b"x-forwarded-tls-client-cert-info"


@dataclass(slots=True)
class RequestSettings:
    """What requests are judged by; ``MTLSInstrumentor`` sets them from its options."""

    trusted_proxies: tuple[IPNetwork, ...] = ()
    nginx_header: bytes = b"ssl-client-cert"
    rules: IdentityRules = field(default_factory=IdentityRules)
    enforce: bool = False
    policy: IdentityPolicy = DEFAULT_POLICY
    decisions: Counter | None = None
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(5))
    revocation_enforce: bool = False
    revocation_timeout: float = 2.0
    revocation_checks: Counter | None = None


SETTINGS = RequestSettings()
"""The settings in force; replaced by :func:`configure`."""


def configure(settings: RequestSettings) -> None:
    """Put new request settings in force (``MTLSInstrumentor`` does, and undoes)."""
    global SETTINGS  # noqa: PLW0603
    SETTINGS = settings


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who the client of a request is, by the certificate it presented."""

    certificate: CertificateInfo
    """The parsed leaf certificate: subject, issuer, SANs, SPIFFE ID, fingerprint."""
    certificate_pem: str | None
    """The leaf certificate, PEM (None when a proxy forwarded only its fields)."""
    source: str
    """Where it came from: ``handshake``, ``asgi_extension``, or a proxy's header
    (``xfcc``, ``rfc9440``, ``traefik``, ``nginx``)."""

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
    settings = SETTINGS
    headers = _identity_headers(scope, settings.nginx_header)
    client = scope.get("client")
    if headers and _trusted(client[0] if client else None, settings.trusted_proxies):
        proxied = _parse_headers(headers, settings.nginx_header)
        if proxied.error is not None or (proxied.leaf_der is None and proxied.subject is None):
            return None
        pem = der_to_pem(proxied.leaf_der) if proxied.leaf_der is not None else None
        return ClientIdentity(_proxied_certificate(proxied), pem, proxied.source)
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


def enrich(span: Span, scope: Scope) -> Decision | None:
    """Put the client's identity on a request's server span and fill the TLS extension.

    Returns the identity policy's decision, or None when no policy is configured.
    """
    try:
        if scope.get("type") not in ("http", "websocket"):
            return None
        if scope.get(_ENRICHED):
            decision: Decision | None = scope.get(_DECISION)
            return decision
        scope[_ENRICHED] = True
        settings = SETTINGS
        certificate, cache = _identify(span, scope, settings)
        decision = _judge(span, scope, certificate, cache, settings)
        scope[_DECISION] = decision
        return decision
    except Exception as exc:
        _failsafe.report("enriching a request", exc)
        return None


def _identify(
    span: Span, scope: Scope, settings: RequestSettings
) -> tuple[CertificateInfo | None, dict[str, Any] | None]:
    """Find the client's certificate: a trusted proxy's header, our handshake, the server's."""
    proxied = _proxied(span, scope, settings)
    if proxied is not None:
        return proxied, None
    connection = _connection(scope)
    if connection is None:
        return _enrich_from_extension(span, scope, settings.policy), None
    cache = connection.cache
    attributes = cache.get("attributes")
    if attributes is None:
        attributes = cache["attributes"] = request_attributes(connection.record, connection.policy)
    if span.is_recording():
        span.set_attributes(attributes)
        span_context = connection.record.span_context
        if span_context is not None and span_context.is_valid:
            span.add_link(span_context)
    revocation = connection.revocation
    if revocation is not None and revocation.done():
        record_revocation(span, connection, settings)
    extensions = scope.get("extensions")
    if extensions is None:
        extensions = scope["extensions"] = {}
    if "tls" not in extensions:
        extension = cache.get("extension")
        if extension is None:
            extension = cache["extension"] = tls_extension(connection)
        # Each request its own copy: applications may change what they are given.
        chain = list(extension["client_cert_chain"])
        extensions["tls"] = {**extension, "client_cert_chain": chain}
    return connection.record.peer_certificate, cache


def _proxied(span: Span, scope: Scope, settings: RequestSettings) -> CertificateInfo | None:
    """Return the client identity a trusted proxy forwarded in a header, if any.

    The same headers from any other peer are ignored and reported: someone may be
    trying to claim an identity they did not prove.
    """
    headers = _identity_headers(scope, settings.nginx_header)
    if not headers:
        return None
    client = scope.get("client")
    peer = client[0] if client else None
    if not _trusted(peer, settings.trusted_proxies):
        _record_decision(
            span,
            scope,
            Decision(
                False,
                RULE_UNTRUSTED_PROXY_HEADER,
                f"client certificate header from {peer}, which is not a trusted proxy: ignored",
            ),
            None,
            settings,
        )
        return None
    identity = _parse_headers(headers, settings.nginx_header)
    if identity.error is not None or (identity.leaf_der is None and identity.subject is None):
        if span.is_recording():
            span.set_attributes(
                {
                    TLS_CLIENT_IDENTITY_SOURCE: identity.source,
                    TLS_CLIENT_X509_PARSE_ERROR: identity.error or "no identity in header",
                }
            )
        return None
    certificate = _proxied_certificate(identity)
    if span.is_recording():
        span.set_attributes(
            {
                **info_attributes(certificate, True, settings.policy),
                TLS_CLIENT_IDENTITY_SOURCE: identity.source,
            }
        )
    return certificate


def _identity_headers(scope: Scope, nginx_header: bytes) -> dict[bytes, bytes]:
    wanted = (_XFCC, _CLIENT_CERT, _CLIENT_CERT_CHAIN, _TRAEFIK_CERT, _TRAEFIK_INFO, nginx_header)
    return {name: value for name, value in scope.get("headers") or () if name in wanted}


def _trusted(peer: Any, networks: tuple[IPNetwork, ...]) -> bool:
    if not networks or not isinstance(peer, str):
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _parse_headers(headers: dict[bytes, bytes], nginx_header: bytes) -> ProxiedIdentity:
    if _XFCC in headers:
        return parse_xfcc(headers[_XFCC])
    if _CLIENT_CERT in headers:
        return parse_rfc9440(headers[_CLIENT_CERT], headers.get(_CLIENT_CERT_CHAIN))
    if _TRAEFIK_CERT in headers or _TRAEFIK_INFO in headers:
        return parse_traefik(headers.get(_TRAEFIK_CERT), headers.get(_TRAEFIK_INFO))
    return parse_nginx(headers[nginx_header])


def _proxied_certificate(identity: ProxiedIdentity) -> CertificateInfo:
    if identity.leaf_der is not None:
        return parse_certificate(identity.leaf_der)
    names = tuple(f"URI:{uri}" for uri in identity.uris) + tuple(f"DNS:{d}" for d in identity.dns)
    spiffe = next((uri for uri in identity.uris if uri.startswith("spiffe://")), None)
    return CertificateInfo(
        sha256=identity.hash_sha256 or "",
        subject=identity.subject,
        alternative_names=names,
        spiffe_id=spiffe,
    )


def _judge(
    span: Span,
    scope: Scope,
    certificate: CertificateInfo | None,
    cache: dict[str, Any] | None,
    settings: RequestSettings,
) -> Decision | None:
    """Apply the identity policy, once per connection when the identity is the connection's."""
    if settings.rules.empty:
        return None
    decision: Decision | None = cache.get("decision") if cache is not None else None
    if decision is None:
        decision = decide(settings.rules, certificate)
        if cache is not None:
            cache["decision"] = decision
    _record_decision(span, scope, decision, certificate, settings)
    return decision


def _record_decision(
    span: Span,
    scope: Scope,
    decision: Decision,
    certificate: CertificateInfo | None,
    settings: RequestSettings,
) -> None:
    """Record a decision: span event, count, and for denials a security-event record."""
    verdict = "allowed" if decision.allowed else "denied"
    attributes: Attributes = {
        TLS_CLIENT_IDENTITY_DECISION: verdict,
        TLS_CLIENT_IDENTITY_RULE: decision.rule,
    }
    if span.is_recording():
        span.add_event(DECISION_EVENT, attributes)
    if settings.decisions is not None:
        settings.decisions.add(1, attributes)
    if decision.allowed or not _audit.audit_logger.isEnabledFor(logging.WARNING):
        return
    client = scope.get("client")
    peer = client[0] if client else None
    suppressed = settings.limiter.admit((_audit.IDENTITY_DENIED, peer, decision.rule))
    if suppressed is None:
        return
    fields: Attributes = dict(attributes)
    if peer is not None:
        fields[client_attributes.CLIENT_ADDRESS] = peer
    if certificate is not None:
        fields.update(info_attributes(certificate, True, settings.policy))
    _audit.emit(
        logging.WARNING,
        _audit.IDENTITY_DENIED,
        f"identity policy denied a request from {peer}: {decision.reason}",
        fields,
        suppressed=suppressed,
    )


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
        attributes.update(record_certificate_attributes(record, policy, peer_is_client=True))
    return attributes


def tls_extension(connection: Connection) -> dict[str, Any]:
    """Return a connection's ASGI TLS extension (v0.2), as a server would fill it."""
    record = connection.record
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


def _enrich_from_extension(
    span: Span, scope: Scope, policy: IdentityPolicy
) -> CertificateInfo | None:
    """Take the identity from a server that fills the TLS extension itself."""
    der = _extension_leaf(scope)
    if der is None:
        return None
    certificate = parse_certificate(der)
    if span.is_recording():
        span.set_attributes(
            {
                **info_attributes(certificate, True, policy),
                TLS_CLIENT_IDENTITY_SOURCE: SOURCE_ASGI_EXTENSION,
                TLS_CLIENT_VERIFY_RESULT: VERIFY_RESULT_SUCCESS,
            }
        )
    return certificate


def record_revocation(span: Span, connection: Connection, settings: RequestSettings) -> None:
    """Put a finished revocation check on the request span; count it once per connection."""
    if connection.revocation is None:
        return
    result = connection.revocation.result()
    attributes: Attributes = {
        TLS_CLIENT_REVOCATION_STATUS: result.status,
        TLS_CLIENT_REVOCATION_SOURCE: result.source,
    }
    if span.is_recording():
        span.add_event(REVOCATION_EVENT, attributes)
    if settings.revocation_checks is not None and not connection.cache.get("revocation counted"):
        connection.cache["revocation counted"] = True
        settings.revocation_checks.add(1, attributes)


async def _revoked(scope: Scope, settings: RequestSettings) -> bool:
    """Wait (bounded) for the connection's revocation check; whether it says revoked."""
    connection = _connection(scope)
    if connection is None or connection.revocation is None:
        return False
    future = connection.revocation
    if not future.done():
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), settings.revocation_timeout * 2)
        except (asyncio.TimeoutError, Exception):
            return False  # no answer in time: observe, do not block
        record_revocation(trace.get_current_span(), connection, settings)
    return future.result().status == REVOKED


class MTLSMiddleware:
    """ASGI middleware: the client's identity on the current server span, and in the scope.

    For ``http`` and ``websocket`` requests on TLS connections it sets the client
    certificate's attributes on the current span (the server span, when this runs inside
    OpenTelemetry's ASGI middleware), links the span to its connection's
    ``TLS server handshake`` span, and fills ``scope["extensions"]["tls"]`` when the
    server did not. Behind a trusted proxy the identity comes from its header instead.
    With ``OTEL_PYTHON_MTLS_ENFORCE_IDENTITY_POLICY`` it answers 403 to requests the
    identity policy denies, and with ``OTEL_PYTHON_MTLS_REVOCATION=enforce`` to requests
    whose client certificate is revoked. Everything else passes through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Enrich, enforce the identity policy if asked to, then call the application."""
        if scope.get("type") in ("http", "websocket"):
            settings = SETTINGS
            decision = enrich(trace.get_current_span(), scope)
            if (decision is not None and not decision.allowed and settings.enforce) or (
                settings.revocation_enforce and await _revoked(scope, settings)
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
