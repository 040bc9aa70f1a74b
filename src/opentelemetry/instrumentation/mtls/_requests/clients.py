"""The server's identity on every outgoing request, found through the client's own connection.

A ``TLS client handshake`` span is a child of the request that opened its connection;
the requests that reuse the pooled connection later have no handshake of their own. So
:mod:`.client_hooks` hooks the place where each client library (httpx, requests and
urllib3, aiohttp) hands a request its connection, below the library's OpenTelemetry
instrumentation, and passes :func:`enrich_client_span` the connection's ssl object, read
from the library's own connection objects, never looked up by address. The current span
is then the request's HTTP client span, whichever order the instrumentations were
installed in and whatever hooks they were given: it gets the server's identity, a link
to the connection's handshake span, and the client identity policy's verdict.

What a connection gives its requests is derived on its first request and kept on its
ssl object, so it costs a dictionary look-up afterwards and is released with the
connection.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar

from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import Counter
from opentelemetry.semconv._incubating.attributes import tls_attributes as tls
from opentelemetry.semconv.attributes import server_attributes
from opentelemetry.trace import Span, SpanContext, SpanKind
from opentelemetry.util.types import AttributeValue

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._config import MTLSConfig
from opentelemetry.instrumentation.mtls._redaction import NO_REDACTION, PLAIN, Redaction
from opentelemetry.instrumentation.mtls._requests.enrichment import DECISION_EVENT
from opentelemetry.instrumentation.mtls._requests.identity import SOURCE_HANDSHAKE
from opentelemetry.instrumentation.mtls._requests.rules import (
    RULE_NO_CERTIFICATE,
    RULE_SAN_PATTERN,
    Decision,
    IdentityRules,
    decide,
)
from opentelemetry.instrumentation.mtls._signals import audit as _audit
from opentelemetry.instrumentation.mtls._signals.audit import AuditLog
from opentelemetry.instrumentation.mtls._signals.handshake import (
    SERVER_PEER,
    handshake_attributes,
    info_attributes,
)
from opentelemetry.instrumentation.mtls._ssl.hooks import connection_record
from opentelemetry.instrumentation.mtls._ssl.record import HandshakeRecord, SSLEndpoint
from opentelemetry.instrumentation.mtls._x509 import parse_certificate, sha256_hex
from opentelemetry.instrumentation.mtls.attributes import (
    TLS_SERVER_IDENTITY_DECISION,
    TLS_SERVER_IDENTITY_RULE,
    TLS_SERVER_IDENTITY_SOURCE,
)

RULE_SPIFFE_ID: Final = "spiffe_id"
"""The client policy's rule on the server's SPIFFE ID (a URI SAN pattern to ``decide``)."""

_KEY: Final = "_otel_mtls_server_identity"
"""Key of what a client connection gives its requests, in its ssl object's ``__dict__``."""
_LEAN: Final = (
    SERVER_PEER.subject,
    SERVER_PEER.issuer,
    SERVER_PEER.hash_sha256,
    SERVER_PEER.spiffe_id,
)
_SESSION: Final = frozenset({tls.TLS_PROTOCOL_VERSION, tls.TLS_CIPHER, tls.TLS_RESUMED})
_SERVER_PREFIX: Final = "tls.server."
# Request spans never carry PEM certificates, whatever the handshake spans capture.
_NO_CAPTURE: Final = MTLSConfig()

Attributes = dict[str, AttributeValue]
_Source = TypeVar("_Source")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What client request spans carry and are judged by; the instrumentor makes these."""

    full: bool = False
    """Every ``tls.server.*`` attribute and the session's, not just the identity."""
    redaction: Redaction = NO_REDACTION
    rules: IdentityRules = field(default_factory=IdentityRules)
    """The servers this process expects; empty: no client identity policy."""
    decisions: Counter | None = None
    audit: AuditLog | None = None
    """Where denials are recorded (the instrumentation's audit log)."""


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """What one client connection gives each of its requests, derived on its first."""

    settings: ClientSettings
    attributes: Mapping[str, AttributeValue]
    link: SpanContext | None = None
    """The connection's ``TLS client handshake`` span, when one was made."""
    verdict: Mapping[str, AttributeValue] | None = None
    """The identity policy's decision event; None without a policy."""
    denial: tuple[str, Mapping[str, AttributeValue]] | None = None
    """The message and fields of the ``tls.identity.denied`` record, when denied."""
    denial_key: tuple[object, ...] = ()
    """What denial records are rate-limited by: the server and the rule."""


def enrich_client_span(
    settings: ClientSettings, source: _Source, ssl_object_of: Callable[[_Source], object]
) -> None:
    """Give the current HTTP client span the server identity of its request's connection.

    ``ssl_object_of(source)`` reads the connection's ssl object from the library's own
    object, and is called only when something is to be recorded. Never raises.
    """
    try:
        if not is_instrumentation_enabled():
            return
        span = trace.get_current_span()
        client_span = span.is_recording() and getattr(span, "kind", None) is SpanKind.CLIENT
        if not client_span and settings.rules.empty:
            return
        endpoint = _endpoint(ssl_object_of(source))
        if endpoint is None:
            return  # plain HTTP, or TLS that is not Python's
        identity = server_identity(endpoint, settings)
        if client_span:
            span.set_attributes(identity.attributes)
            if identity.link is not None:
                span.add_link(identity.link)
        if identity.verdict is not None:
            _record_verdict(span, client_span, identity)
    except Exception as exc:
        _failsafe.report("enriching a client request", exc)


def _endpoint(ssl_object: object) -> SSLEndpoint | None:
    """Return the ``ssl`` module's object of a connection from what a library hands out."""
    if isinstance(ssl_object, ssl.SSLSocket | ssl.SSLObject):
        return ssl_object
    # httpcore's blocking streams hand out SSLSocket._sslobj, the C object, whose owner
    # is the SSLSocket our hooks kept the record on.
    owner = getattr(ssl_object, "owner", None)
    return owner if isinstance(owner, ssl.SSLSocket | ssl.SSLObject) else None


def server_identity(endpoint: SSLEndpoint, settings: ClientSettings) -> ServerIdentity:
    """Return what a client connection gives its requests; derived once per settings."""
    state = endpoint.__dict__
    identity: ServerIdentity | None = state.get(_KEY)
    if identity is None or identity.settings is not settings:
        identity = state[_KEY] = _derive(connection_record(endpoint), endpoint, settings)
    return identity


def request_attributes(record: HandshakeRecord, redaction: Redaction, *, full: bool) -> Attributes:
    """Return what a client request span carries of its connection's handshake.

    Lean: the server's subject, issuer, fingerprint and SPIFFE ID. Full: every
    ``tls.server.*`` attribute of the handshake span, its version, cipher and resumption.
    """
    handshake = handshake_attributes(record, _NO_CAPTURE, redaction)
    if full:
        chosen = {
            name: value
            for name, value in handshake.items()
            if name.startswith(_SERVER_PREFIX) or name in _SESSION
        }
    else:
        chosen = {name: handshake[name] for name in _LEAN if name in handshake}
    chosen[TLS_SERVER_IDENTITY_SOURCE] = SOURCE_HANDSHAKE
    return chosen


def _derive(
    record: HandshakeRecord, endpoint: SSLEndpoint, settings: ClientSettings
) -> ServerIdentity:
    attributes = request_attributes(record, settings.redaction, full=settings.full)
    link = record.span_context
    if link is not None and not link.is_valid:
        link = None
    if settings.rules.empty:
        return ServerIdentity(settings, attributes, link)
    # An issuer entry without "=" is a CA fingerprint (see rules.py); only those need one.
    fingerprints = any("=" not in entry for entry in settings.rules.allowed_issuers)
    issuer = _issuer_sha256(record, endpoint) if fingerprints else None
    decision = decide(settings.rules, record.peer_certificate, issuer)
    rule = RULE_SPIFFE_ID if decision.rule == RULE_SAN_PATTERN else decision.rule
    verdict = {
        TLS_SERVER_IDENTITY_DECISION: "allowed" if decision.allowed else "denied",
        TLS_SERVER_IDENTITY_RULE: rule,
    }
    server = _server_name(record)
    denial = None if decision.allowed else _denial(record, decision, rule, server, settings)
    return ServerIdentity(settings, attributes, link, verdict, denial, (server, rule))


def _issuer_sha256(record: HandshakeRecord, endpoint: SSLEndpoint) -> str | None:
    """Return the fingerprint of the CA that issued the server's certificate, when known.

    From the verified chain (Python 3.13+), else the client context's own trusted CA of
    that name: what fingerprint rules compare with.
    """
    if len(record.peer_chain) > 1:
        return sha256_hex(record.peer_chain[1])
    certificate = record.peer_certificate
    if certificate is None or certificate.issuer is None:
        return None
    for der in endpoint.context.get_ca_certs(binary_form=True):
        if parse_certificate(der).subject == certificate.issuer:
            return sha256_hex(der)
    return None


def _server_name(record: HandshakeRecord) -> str:
    if record.peer_address is not None:
        return f"{record.peer_address[0]}:{record.peer_address[1]}"
    return record.server_name or "an unknown server"


def _denial(
    record: HandshakeRecord,
    decision: Decision,
    rule: str,
    server: str,
    settings: ClientSettings,
) -> tuple[str, Mapping[str, AttributeValue]]:
    """Build the message and fields of a denial record (identities only where they may be)."""
    fields: Attributes = {TLS_SERVER_IDENTITY_DECISION: "denied", TLS_SERVER_IDENTITY_RULE: rule}
    if record.peer_address is not None:
        fields[server_attributes.SERVER_ADDRESS] = record.peer_address[0]
        fields[server_attributes.SERVER_PORT] = record.peer_address[1]
    certificate = record.peer_certificate
    if certificate is not None:
        fields.update(info_attributes(certificate, False, settings.redaction))
    if settings.redaction.mode != PLAIN:
        why = f"rule {rule}"
    elif decision.rule == RULE_SAN_PATTERN:
        spiffe_id = certificate.spiffe_id if certificate is not None else None
        why = f"SPIFFE ID {spiffe_id} is not expected" if spiffe_id else "it has no SPIFFE ID"
    elif decision.rule == RULE_NO_CERTIFICATE:
        why = "it presented no certificate"
    else:
        why = decision.reason  # the issuer rule's reason names only CA-level values
    return f"identity policy: server {server} is not one this client expects: {why}", fields


def _record_verdict(span: Span, client_span: bool, identity: ServerIdentity) -> None:
    """Record a request's verdict: an event on its span, a count, a record if denied."""
    verdict = identity.verdict
    assert verdict is not None
    if client_span:
        span.add_event(DECISION_EVENT, verdict)
    settings = identity.settings
    if settings.decisions is not None:
        settings.decisions.add(1, verdict)
    denial = identity.denial
    if denial is not None and settings.audit is not None:
        settings.audit.write(
            logging.WARNING,
            _audit.IDENTITY_DENIED,
            lambda: denial,
            key=identity.denial_key,
            span=span,
        )
