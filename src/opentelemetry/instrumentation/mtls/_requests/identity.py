"""Who the client of one request is: resolved once, when the request starts.

The identity comes from the request's connection (:mod:`.connection`), never from an
address the request names. Where TLS ends at a trusted proxy, the proxy's header in the
one configured format is believed instead, and trust is judged on the connection's TCP
peer. Every other client-certificate header is ignored and reported. The resolution is
kept for the whole request: its span, ``client_identity()``, the TLS extension, the
identity policy and revocation all read this one object.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.metrics import Counter
from opentelemetry.semconv._incubating.attributes import tls_attributes as tls
from opentelemetry.trace import SpanContext
from opentelemetry.util.types import AttributeValue

from opentelemetry.instrumentation.mtls._redaction import NO_REDACTION, Redaction
from opentelemetry.instrumentation.mtls._requests.connection import Connection
from opentelemetry.instrumentation.mtls._requests.proxy_headers import (
    FORMATS,
    header_names,
    parse_proxy_headers,
)
from opentelemetry.instrumentation.mtls._requests.rules import Decision, IdentityRules, decide
from opentelemetry.instrumentation.mtls._signals.audit import AuditLog
from opentelemetry.instrumentation.mtls._signals.handshake import (
    CLIENT_PEER,
    certificate_attributes,
    info_attributes,
    record_certificate_attributes,
)
from opentelemetry.instrumentation.mtls._ssl.record import Address
from opentelemetry.instrumentation.mtls._x509 import (
    CertificateInfo,
    der_to_pem,
    parse_certificate,
    sha256_hex,
)
from opentelemetry.instrumentation.mtls.attributes import (
    TLS_CLIENT_IDENTITY_SOURCE,
    TLS_CLIENT_VERIFY_RESULT,
    TLS_CLIENT_X509_PARSE_ERROR,
    VERIFY_RESULT_NONE,
    VERIFY_RESULT_SUCCESS,
)

SOURCE_HANDSHAKE: Final = "handshake"
SOURCE_ASGI_EXTENSION: Final = "asgi_extension"
SOURCE_GRPC_AUTH_CONTEXT: Final = "grpc_auth_context"
RULE_UNTRUSTED_PROXY_HEADER: Final = "untrusted_proxy_header"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Attributes = dict[str, AttributeValue]
Headers = Mapping[bytes, bytes]

LEAN: Final = (
    CLIENT_PEER.subject,
    CLIENT_PEER.issuer,
    CLIENT_PEER.hash_sha256,
    CLIENT_PEER.spiffe_id,
    TLS_CLIENT_X509_PARSE_ERROR,
)
"""The certificate attributes a request span carries by default (the parse error says why
a certificate that could not be read has no subject); the rest stays on the handshake span."""
_CACHE_LIMIT: Final = 1024
"""Distinct certificates whose request attributes are kept (per settings)."""


@dataclass(slots=True)
class RequestSettings:
    """What requests are judged by; the instrumentor puts them in force."""

    trusted_proxies: tuple[IPNetwork, ...] = ()
    proxy_header: str = "xfcc"
    nginx_header: bytes = b"ssl-client-cert"
    rules: IdentityRules = field(default_factory=IdentityRules)
    enforce: bool = False
    redaction: Redaction = NO_REDACTION
    decisions: Counter | None = None
    audit: AuditLog | None = None
    """Where denials are recorded (the instrumentation's audit log)."""
    revocation_enforce: bool = False
    revocation_timeout: float = 2.0
    revocation_checks: Counter | None = None
    full: bool = False
    """``OTEL_PYTHON_MTLS_REQUEST_ATTRIBUTES=full``: request spans get every peer certificate
    attribute and the session's version, cipher and resumption, not just the identity."""

    attribute_cache: dict[Any, Mapping[str, AttributeValue]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    """Request attributes of certificates that came without a connection of ours (a proxy's
    header, a server's own TLS), built once per distinct certificate under these settings."""
    identity_header_names: frozenset[bytes] = field(init=False)
    """Every client-certificate header name of every format."""
    believed_header_names: tuple[bytes, ...] = field(init=False)
    """The header names of the one format believed from a trusted proxy."""
    judged: bool = field(init=False)
    """Whether an identity policy is configured (read on every request)."""

    def __post_init__(self) -> None:
        self.judged = not self.rules.empty
        self.identity_header_names = frozenset(
            name for kind in FORMATS for name in header_names(kind, self.nginx_header)
        )
        self.believed_header_names = header_names(self.proxy_header, self.nginx_header)


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


@functools.singledispatch
def client_identity(request: object) -> ClientIdentity | None:
    """Return the identity of the client certificate of a request, if it had one.

    ``request`` is what the server hands the application: an ASGI scope, an aiohttp
    request, a gRPC servicer context. Each integration registers the type of its own;
    anything else has no identity.
    """
    return None


@dataclass(slots=True)
class Resolution:
    """One request's identity and everything derived from it, fixed when it starts."""

    connection: Connection | None
    """The connection the request arrived on, when a followed server made it."""
    identity: ClientIdentity | None
    """The client's identity; None when it presented none (or none can be believed)."""
    attributes: Mapping[str, AttributeValue]
    """What the request's server span gets (see :meth:`span_attributes`)."""
    link: SpanContext | None = None
    """The connection's handshake span."""
    decision: Decision | None = None
    """The identity policy's verdict; None when no policy is configured."""
    reports: tuple[Decision, ...] = ()
    """Client-certificate headers ignored, each reported as ``untrusted_proxy_header``."""
    unverifiable: bool = False
    """Identity headers arrived where no connection is known: revocation cannot be checked."""
    issuer_sha256: str | None = None
    """SHA-256 of the issuing CA of a proxy-forwarded identity, when its chain came along."""
    enriched: bool = False
    """Whether a server span already carries this resolution."""
    build: Callable[[], Mapping[str, AttributeValue]] | None = None
    """Builds :attr:`attributes` when a recording span first needs them: a request whose
    span is sampled out builds none."""

    def span_attributes(self) -> Mapping[str, AttributeValue]:
        """Return what the request's server span gets, building it on the first call."""
        build = self.build
        if build is not None:
            self.build = None
            self.attributes = build()
        return self.attributes

    def __deepcopy__(self, memo: dict[int, Any]) -> Resolution:
        # Middlewares deep-copy scopes (hypercorn's ProxyFixMiddleware does): the copy is
        # the same request, and a check's Future cannot be copied.
        return self

    def __copy__(self) -> Resolution:
        return self

    @property
    def revocation(self) -> Future[Any] | None:
        """The connection's revocation check, when one runs."""
        return self.connection.revocation if self.connection is not None else None

    @property
    def peer(self) -> str | None:
        """The TCP peer's address, when known: what denial records name."""
        connection = self.connection
        return connection.peer[0] if connection is not None and connection.peer else None


def resolve(
    connection: Connection | None,
    headers: Headers,
    extension_leaf: bytes | None,
    settings: RequestSettings,
) -> Resolution:
    """Resolve a request's identity from its connection (and a trusted proxy's header).

    ``headers`` holds only the request's client-certificate headers, of any format.
    ``connection`` is the request's own, found through the connection itself, never
    through an address the request names. ``extension_leaf`` is the client certificate of
    a server that filled the ASGI TLS extension itself.
    """
    if not headers and connection is not None and connection.record is not None:
        # The steady state, a request on a known TLS connection: the shortest way.
        handshake = _from_handshake(connection, settings)
        if settings.judged:
            handshake.decision = _decide(handshake, settings)
        return handshake
    resolution: Resolution | None = None
    reports: tuple[Decision, ...] = ()
    if headers:
        trusted = connection is not None and _trusted(connection.peer, settings.trusted_proxies)
        believed = settings.believed_header_names if trusted else ()
        ignored = [name for name in headers if name not in believed]
        if ignored:
            reports = (_untrusted(connection, ignored, trusted, settings.proxy_header),)
        if len(ignored) < len(headers):  # the trusted proxy's own format is there
            resolution = _from_proxy(connection, headers, settings)
    if resolution is None:
        if connection is not None and connection.record is not None:
            resolution = _from_handshake(connection, settings)
        elif connection is None and extension_leaf is not None:
            resolution = _from_verified(extension_leaf, SOURCE_ASGI_EXTENSION, settings)
        else:
            resolution = Resolution(connection, None, {})
    resolution.reports = reports
    resolution.unverifiable = connection is None and (bool(headers) or extension_leaf is not None)
    if settings.judged:
        resolution.decision = _decide(resolution, settings)
    return resolution


def eager(connection: Connection | None, headers: Headers, settings: RequestSettings) -> bool:
    """Whether a request's resolution records something even where its span does not.

    A policy's verdict, a revocation check and client-certificate headers to report are
    counted whether or not the request's span is sampled; anything else only a span shows.
    """
    return (
        bool(headers)
        or settings.judged
        or (connection is not None and connection.revocation is not None)
    )


def resolve_verified(
    leaf: bytes | None,
    session: Mapping[str, AttributeValue] | None,
    source: str,
    settings: RequestSettings,
) -> Resolution:
    """Resolve a call's identity from what a server whose TLS is not Python's verified itself.

    gRPC's TLS is its own (BoringSSL in gRPC core), so no connection of ours and no
    handshake span exist: the server hands over the verified ``leaf`` (None when the client
    presented none) and ``session``, its attributes of the TLS session, or None when the
    call did not come over TLS (then there is no identity and nothing to add to the span).
    """
    if session is None:
        resolution = Resolution(None, None, {})
    elif leaf is None:
        attributes: Attributes = {TLS_CLIENT_IDENTITY_SOURCE: source}
        if settings.full:
            attributes.update(session)
            attributes[TLS_CLIENT_VERIFY_RESULT] = VERIFY_RESULT_NONE
        resolution = Resolution(None, None, attributes)
    else:
        resolution = _from_verified(leaf, source, settings)
        if settings.full and session:
            resolution.attributes = {**session, **resolution.attributes}
    if settings.judged:
        resolution.decision = _decide(resolution, settings)
    return resolution


def _trusted(peer: Address | None, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether a TCP peer is a trusted proxy; IPv4-mapped IPv6 peers match IPv4 ranges."""
    if not networks or peer is None:
        return False
    try:
        address = ipaddress.ip_address(peer[0].partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _untrusted(
    connection: Connection | None, names: list[bytes], trusted: bool, believed: str
) -> Decision:
    peer = connection.peer[0] if connection is not None and connection.peer else "an unknown peer"
    headers = ", ".join(sorted(name.decode("latin-1") for name in names))
    if trusted:
        reason = f"client certificate header {headers} from trusted proxy {peer} is not the "
        reason += f"configured format ({believed}): ignored"
    else:
        reason = f"client certificate header {headers} from {peer}, not a trusted proxy: ignored"
    return Decision(False, RULE_UNTRUSTED_PROXY_HEADER, reason)


def _from_handshake(connection: Connection, settings: RequestSettings) -> Resolution:
    """Resolve the identity the client proved in the connection's own handshake."""
    cache = connection.cache
    known = cache.get("handshake")
    if known is None:
        record = connection.record
        assert record is not None
        identity = None
        if record.peer_der is not None and record.peer_certificate is not None:
            identity = ClientIdentity(
                record.peer_certificate, der_to_pem(record.peer_der), SOURCE_HANDSHAKE
            )
        link = record.span_context
        if link is not None and not link.is_valid:
            link = None
        known = cache["handshake"] = (identity, link)
    cached = cache.get("attributes")
    if cached is not None and cached[0] is settings:
        return Resolution(connection, known[0], cached[1], known[1])
    # Built when a recording span first asks (:meth:`Resolution.span_attributes`).
    build = functools.partial(_connection_attributes, connection, settings)
    return Resolution(connection, known[0], {}, known[1], build=build)


def _connection_attributes(
    connection: Connection, settings: RequestSettings
) -> Mapping[str, AttributeValue]:
    """Return the request attributes of a connection's handshake: once per connection."""
    cached = connection.cache.get("attributes")
    if cached is None or cached[0] is not settings:
        cached = connection.cache["attributes"] = (
            settings,
            _handshake_attributes(connection, settings),
        )
    attributes: Mapping[str, AttributeValue] = cached[1]
    return attributes


def _handshake_attributes(connection: Connection, settings: RequestSettings) -> Attributes:
    """Lean: the client certificate's identity and the source. Full: all the handshake's."""
    record = connection.record
    assert record is not None
    attributes: Attributes = {TLS_CLIENT_IDENTITY_SOURCE: SOURCE_HANDSHAKE}
    if settings.full:
        attributes[tls.TLS_RESUMED] = record.resumed
        attributes[TLS_CLIENT_VERIFY_RESULT] = record.verify_result or VERIFY_RESULT_NONE
        if record.protocol_version is not None:
            attributes[tls.TLS_PROTOCOL_VERSION] = record.protocol_version
        if record.cipher is not None:
            attributes[tls.TLS_CIPHER] = record.cipher
    if record.peer_der is not None:
        certificate = record_certificate_attributes(record, settings.redaction, peer_is_client=True)
        attributes.update(_chosen(certificate, settings.full))
    return attributes


def _chosen(certificate: Mapping[str, AttributeValue], full: bool) -> Mapping[str, AttributeValue]:
    """Return the certificate attributes a request span carries: :data:`LEAN`, or all."""
    if full:
        return certificate
    return {name: certificate[name] for name in LEAN if name in certificate}


def _cached(
    settings: RequestSettings, key: Any, build: Callable[[], Mapping[str, AttributeValue]]
) -> Mapping[str, AttributeValue]:
    """Return the request attributes of one certificate, built once per distinct one."""
    cache = settings.attribute_cache
    attributes = cache.get(key)
    if attributes is None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()  # a flood of distinct certificates: start again, bounded
        attributes = cache[key] = build()
    return attributes


def _from_proxy(
    connection: Connection | None, headers: Headers, settings: RequestSettings
) -> Resolution:
    """Resolve the identity a trusted proxy forwarded, in the one format believed."""
    proxied = parse_proxy_headers(settings.proxy_header, headers, settings.nginx_header)
    source = settings.proxy_header
    certificate = proxied.certificate_info() if proxied is not None else None
    if proxied is None or certificate is None:
        error = (proxied.error if proxied is not None else None) or "no identity in header"
        return Resolution(
            connection,
            None,
            {TLS_CLIENT_IDENTITY_SOURCE: source, TLS_CLIENT_X509_PARSE_ERROR: error},
        )
    pem = der_to_pem(proxied.leaf_der) if proxied.leaf_der is not None else None

    def build() -> Mapping[str, AttributeValue]:
        info = info_attributes(certificate, True, settings.redaction)
        return {**_chosen(info, settings.full), TLS_CLIENT_IDENTITY_SOURCE: source}

    attributes = _cached(settings, (source, certificate), build)
    resolution = Resolution(connection, ClientIdentity(certificate, pem, source), attributes)
    if proxied.chain_der:
        resolution.issuer_sha256 = sha256_hex(proxied.chain_der[0])
    return resolution


def _from_verified(leaf: bytes, source: str, settings: RequestSettings) -> Resolution:
    """Resolve the identity of a certificate the server verified itself (``source`` says how)."""
    certificate = parse_certificate(leaf)

    def build() -> Mapping[str, AttributeValue]:
        info = certificate_attributes(leaf, True, settings.redaction)
        attributes: Attributes = {
            **_chosen(info, settings.full),
            TLS_CLIENT_IDENTITY_SOURCE: source,
        }
        if settings.full:
            attributes[TLS_CLIENT_VERIFY_RESULT] = VERIFY_RESULT_SUCCESS
        return attributes

    attributes = _cached(settings, (source, leaf), build)
    identity = ClientIdentity(certificate, der_to_pem(leaf), source)
    return Resolution(None, identity, attributes)


def _decide(resolution: Resolution, settings: RequestSettings) -> Decision:
    """Apply the identity redaction, once per connection when the identity is the connection's."""
    identity = resolution.identity
    connection = resolution.connection
    from_handshake = identity is None or identity.source == SOURCE_HANDSHAKE
    cache = connection.cache if connection is not None and from_handshake else None
    decision: Decision | None = cache.get("decision") if cache is not None else None
    if decision is None:
        if identity is not None and identity.source == SOURCE_HANDSHAKE:
            issuer = connection.issuer_sha256 if connection is not None else None
        else:
            issuer = resolution.issuer_sha256
        decision = decide(
            settings.rules, identity.certificate if identity is not None else None, issuer
        )
        if cache is not None:
            cache["decision"] = decision
    return decision
