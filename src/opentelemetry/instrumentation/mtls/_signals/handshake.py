"""Turn handshake records into spans, metrics and security-event log records.

This is the only module that knows the span and attribute names of a handshake. The
peer certificate's attributes are built once per distinct certificate and role, and
reused: a returning client costs a dictionary look-up, not a parse.
"""

from __future__ import annotations

import logging
import ssl
import threading
import weakref
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Meter
from opentelemetry.semconv._incubating.attributes import tls_attributes as tls
from opentelemetry.semconv.attributes import (
    client_attributes,
    error_attributes,
    exception_attributes,
    network_attributes,
    server_attributes,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
)
from opentelemetry.util.types import AttributeValue

from opentelemetry.instrumentation.mtls import _forks
from opentelemetry.instrumentation.mtls import attributes as names
from opentelemetry.instrumentation.mtls._config import ExceptionSignals, MTLSConfig
from opentelemetry.instrumentation.mtls._redaction import NO_REDACTION, Redaction
from opentelemetry.instrumentation.mtls._signals import audit as _audit
from opentelemetry.instrumentation.mtls._signals.expiry import CertificateExpiry
from opentelemetry.instrumentation.mtls._signals.metrics import Instruments
from opentelemetry.instrumentation.mtls._signals.providers import Providers
from opentelemetry.instrumentation.mtls._ssl.client_hello import (
    ClientHello,
    is_grease,
    ja3,
    ja4,
    offered_versions,
)
from opentelemetry.instrumentation.mtls._ssl.record import HandshakeRecord, read_client_hello
from opentelemetry.instrumentation.mtls._ssl.validation import GAPS
from opentelemetry.instrumentation.mtls._ssl.values import CIPHER_SUITES
from opentelemetry.instrumentation.mtls._x509 import (
    CertificateInfo,
    der_to_pem,
    parse_certificate,
)

SERVER_SPAN_NAME: Final = "TLS server handshake"
CLIENT_SPAN_NAME: Final = "TLS client handshake"

# The server handshake happens before any request exists, so its span is a root.
_ROOT: Final = Context()

Attributes = dict[str, AttributeValue]


class _PeerNames:
    """The attribute names for one peer role (``tls.client.*`` or ``tls.server.*``)."""

    __slots__ = (
        "alternative_names",
        "certificate",
        "certificate_chain",
        "chain_hash_sha256",
        "common_name",
        "hash_sha256",
        "issuer",
        "not_after",
        "not_before",
        "parse_error",
        "serial_number",
        "spiffe_id",
        "subject",
        "verify_code",
        "verify_message",
        "verify_result",
    )

    def __init__(self, *, client: bool) -> None:
        self.subject = tls.TLS_CLIENT_SUBJECT if client else tls.TLS_SERVER_SUBJECT
        self.issuer = tls.TLS_CLIENT_ISSUER if client else tls.TLS_SERVER_ISSUER
        self.hash_sha256 = tls.TLS_CLIENT_HASH_SHA256 if client else tls.TLS_SERVER_HASH_SHA256
        self.not_before = tls.TLS_CLIENT_NOT_BEFORE if client else tls.TLS_SERVER_NOT_BEFORE
        self.not_after = tls.TLS_CLIENT_NOT_AFTER if client else tls.TLS_SERVER_NOT_AFTER
        self.certificate = tls.TLS_CLIENT_CERTIFICATE if client else tls.TLS_SERVER_CERTIFICATE
        self.certificate_chain = (
            tls.TLS_CLIENT_CERTIFICATE_CHAIN if client else tls.TLS_SERVER_CERTIFICATE_CHAIN
        )
        self.chain_hash_sha256 = (
            names.TLS_CLIENT_CHAIN_HASH_SHA256 if client else names.TLS_SERVER_CHAIN_HASH_SHA256
        )
        self.serial_number = (
            names.TLS_CLIENT_X509_SERIAL_NUMBER if client else names.TLS_SERVER_X509_SERIAL_NUMBER
        )
        self.common_name = (
            names.TLS_CLIENT_X509_SUBJECT_COMMON_NAME
            if client
            else names.TLS_SERVER_X509_SUBJECT_COMMON_NAME
        )
        self.alternative_names = (
            names.TLS_CLIENT_X509_ALTERNATIVE_NAMES
            if client
            else names.TLS_SERVER_X509_ALTERNATIVE_NAMES
        )
        self.parse_error = (
            names.TLS_CLIENT_X509_PARSE_ERROR if client else names.TLS_SERVER_X509_PARSE_ERROR
        )
        self.spiffe_id = names.TLS_CLIENT_SPIFFE_ID if client else names.TLS_SERVER_SPIFFE_ID
        self.verify_result = (
            names.TLS_CLIENT_VERIFY_RESULT if client else names.TLS_SERVER_VERIFY_RESULT
        )
        self.verify_code = names.TLS_CLIENT_VERIFY_CODE if client else names.TLS_SERVER_VERIFY_CODE
        self.verify_message = (
            names.TLS_CLIENT_VERIFY_MESSAGE if client else names.TLS_SERVER_VERIFY_MESSAGE
        )


# Values recorded when known, by the name they share on the certificate (or record) and
# on _PeerNames; and the session's, with their attribute names.
_CERTIFICATE_FIELDS: Final = (
    "subject",
    "issuer",
    "not_before",
    "not_after",
    "serial_number",
    "common_name",
    "spiffe_id",
    "parse_error",
)
_VERIFY_FIELDS: Final = ("verify_result", "verify_code", "verify_message")
_SESSION_FIELDS: Final = (
    (tls.TLS_PROTOCOL_VERSION, "protocol_version"),
    (tls.TLS_CIPHER, "cipher"),
    (tls.TLS_NEXT_PROTOCOL, "next_protocol"),
    (tls.TLS_CLIENT_SERVER_NAME, "server_name"),
)

CLIENT_PEER: Final = _PeerNames(client=True)
"""Names for the peer of a server: the client."""
SERVER_PEER: Final = _PeerNames(client=False)
"""Names for the peer of a client: the server."""


@lru_cache(maxsize=4096)
def certificate_attributes(
    der: bytes, peer_is_client: bool, redaction: Redaction = NO_REDACTION
) -> Mapping[str, AttributeValue]:
    """Return the attributes of one peer certificate in one role; cached, never mutate."""
    return info_attributes(parse_certificate(der), peer_is_client, redaction)


def info_attributes(
    info: CertificateInfo, peer_is_client: bool, redaction: Redaction = NO_REDACTION
) -> Attributes:
    """Return the attributes of a parsed peer certificate, as the identity policy allows."""
    info = redaction.apply(info)
    n = CLIENT_PEER if peer_is_client else SERVER_PEER
    attrs: Attributes = {n.hash_sha256: info.sha256}
    for name in _CERTIFICATE_FIELDS:
        value = getattr(info, name)
        if value is not None:
            attrs[getattr(n, name)] = value
    if info.alternative_names:
        attrs[n.alternative_names] = info.alternative_names
    return attrs


def record_certificate_attributes(
    record: HandshakeRecord, redaction: Redaction = NO_REDACTION, *, peer_is_client: bool
) -> Mapping[str, AttributeValue]:
    """Return the peer certificate's attributes of a record (which has a peer DER)."""
    info = record.peer_certificate
    if info is not None and info.parse_error is not None:
        # Completed from OpenSSL's view (see _handshake): not the cached parse.
        return info_attributes(info, peer_is_client, redaction)
    return certificate_attributes(record.peer_der or b"", peer_is_client, redaction)


def handshake_attributes(
    record: HandshakeRecord, config: MTLSConfig, redaction: Redaction = NO_REDACTION
) -> Attributes:
    """Return every attribute of a handshake span for one record."""
    peer = CLIENT_PEER if record.server_side else SERVER_PEER
    hello = read_client_hello(record)  # before the session fields: it names the server
    attrs: Attributes = {
        tls.TLS_PROTOCOL_NAME: "tls",
        tls.TLS_ESTABLISHED: record.error is None,
        tls.TLS_RESUMED: record.resumed,
    }
    for key, name in _SESSION_FIELDS:
        value = getattr(record, name)
        if value is not None:
            attrs[key] = value
    _address_attributes(record, attrs)
    # A failed handshake names the certificate the peer presented, unverified.
    der = record.peer_der if record.peer_der is not None else record.presented_der
    if der is not None:
        if record.peer_der is not None:
            attrs.update(
                record_certificate_attributes(record, redaction, peer_is_client=record.server_side)
            )
        else:
            attrs.update(certificate_attributes(der, record.server_side, redaction))
        # A PEM certificate names its subject: recorded in plain mode only.
        show_pem = redaction.shows_certificate
        if show_pem and config.capture_certificate:
            attrs[peer.certificate] = der_to_pem(der)
        if record.peer_chain:
            attrs[peer.chain_hash_sha256] = [
                parse_certificate(der).sha256 for der in record.peer_chain
            ]
            if show_pem and config.capture_certificate_chain:
                attrs[peer.certificate_chain] = [der_to_pem(der) for der in record.peer_chain]
    for name in _VERIFY_FIELDS:
        value = getattr(record, name)
        if value is not None:
            attrs[getattr(peer, name)] = value
    if record.hostname_verified is not None:
        attrs[names.TLS_SERVER_HOSTNAME_VERIFIED] = record.hostname_verified
    if record.validation_gaps:
        attrs[names.TLS_VALIDATION_GAPS] = record.validation_gaps
    if hello is not None:
        _offer_attributes(record, hello, config, attrs)
    if record.alert is not None:
        attrs[names.TLS_ALERT] = record.alert
        attrs[names.TLS_ALERT_SOURCE] = record.alert_source or names.TLS_ALERT_SOURCE_PEER
    if record.error_type is not None:
        attrs[error_attributes.ERROR_TYPE] = record.error_type
    return attrs


def _address_attributes(record: HandshakeRecord, attrs: Attributes) -> None:
    """Add the contract's address rows: the server as the client named it, and the sockets."""
    local, peer = record.local_address, record.peer_address
    server = local if record.server_side else peer
    if record.server_name is not None:
        attrs[server_attributes.SERVER_ADDRESS] = record.server_name
    elif server is not None:
        attrs[server_attributes.SERVER_ADDRESS] = server[0]
    if server is not None:
        attrs[server_attributes.SERVER_PORT] = server[1]
    if peer is not None:
        if record.server_side:
            attrs[client_attributes.CLIENT_ADDRESS] = peer[0]
            attrs[client_attributes.CLIENT_PORT] = peer[1]
        attrs[network_attributes.NETWORK_PEER_ADDRESS] = peer[0]
        attrs[network_attributes.NETWORK_PEER_PORT] = peer[1]
    if local is not None:
        attrs[network_attributes.NETWORK_LOCAL_ADDRESS] = local[0]
        attrs[network_attributes.NETWORK_LOCAL_PORT] = local[1]


_CIPHER_NAMES: Final[dict[int, str]] = {
    **{code: iana for iana, code in CIPHER_SUITES.values()},
    0x00FF: "TLS_EMPTY_RENEGOTIATION_INFO_SCSV",
    0x5600: "TLS_FALLBACK_SCSV",
}
MAX_OFFERED: Final = 64
"""Entries kept of each list a ClientHello offered: the message bounds them, this bounds a span."""


def _offer_attributes(
    record: HandshakeRecord, hello: ClientHello, config: MTLSConfig, attrs: Attributes
) -> None:
    """Add what the client's ClientHello offered: its fingerprints, and on failures its lists."""
    attrs[names.TLS_CLIENT_JA4] = ja4(hello)
    if config.capture_ja3:
        attrs[tls.TLS_CLIENT_JA3] = ja3(hello)
    failed = record.error is not None
    if failed:
        ciphers = [c for c in hello.cipher_suites if not is_grease(c)][:MAX_OFFERED]
        attrs[tls.TLS_CLIENT_SUPPORTED_CIPHERS] = [
            _CIPHER_NAMES.get(code) or f"0x{code:04x}" for code in ciphers
        ]
        attrs[names.TLS_CLIENT_OFFERED_VERSIONS] = list(offered_versions(hello)[:MAX_OFFERED])
    if hello.alpn and (failed or record.next_protocol is None):
        attrs[names.TLS_CLIENT_OFFERED_NEXT_PROTOCOLS] = [
            protocol.decode("ascii", "backslashreplace") for protocol in hello.alpn[:MAX_OFFERED]
        ]


class HandshakeTelemetry:
    """Emit the telemetry of handshake records: a span, metrics and security-event logs."""

    def __init__(
        self,
        tracer: Tracer,
        meter: Meter,
        config: MTLSConfig,
        providers: Providers,
        exceptions: ExceptionSignals = ExceptionSignals(),  # noqa: B008  # frozen
    ) -> None:
        self._tracer = tracer
        self._config = config
        self._providers = providers
        self._exceptions = exceptions
        self.redaction = config.redaction()
        self.audit = _audit.AuditLog(config.log_rate_limit)
        self.expiry = CertificateExpiry(
            self.audit,
            peer_limit=config.peer_certificate_limit,
            warning_window_s=config.expiry_warning_days * 86400,
            redaction=self.redaction,
        )
        self.instruments = Instruments(meter, self.expiry)
        self.active = self.instruments.active
        self._metric_attributes: dict[tuple[object, ...], Attributes] = {}
        self._start_attributes: dict[tuple[object, ...], Attributes] = {}
        self._gap_attributes: dict[tuple[str, str], Attributes] = {
            (gap, side): {names.TLS_VALIDATION_GAP: gap, names.TLS_SIDE: side}
            for gap in GAPS
            for side in (names.TLS_SIDE_SERVER, names.TLS_SIDE_CLIENT)
        }
        # The gaps each SSL context has had a record of: its first of each is always written.
        self._gaps_logged: weakref.WeakKeyDictionary[ssl.SSLContext, set[str]] = (
            weakref.WeakKeyDictionary()
        )
        self._gaps_lock = threading.Lock()
        _forks.rebuild_in_child(self._forked)

    def _forked(self) -> None:
        self._gaps_lock = threading.Lock()  # no thread of the child holds it

    def recording(self) -> bool:
        """Whether a successful handshake would be recorded at all.

        With the API alone spans and metrics are no-ops, so the hooks skip building
        records for successes; failures are still recorded for the security-event logs.
        This runs on every entry into a handshake.
        """
        return self._config.log_success or self._providers.recording()

    def emit(self, record: HandshakeRecord) -> SpanContext | None:
        """Emit the span, the metrics and, for failures, the log record of one attempt.

        Returns the span's context when it records: a connection's requests link to it.
        """
        parent: Context | None
        if record.server_side:
            name, parent, histogram = SERVER_SPAN_NAME, _ROOT, self.instruments.server_duration
        else:
            name, parent = CLIENT_SPAN_NAME, record.parent
            histogram = self.instruments.client_duration
        span: Span
        if record.server_side or self._config.client_handshake_spans:
            # The sampler sees the outcome; the rest is built only if the span records.
            span = self._tracer.start_span(
                name,
                context=parent,
                kind=SpanKind.INTERNAL,
                attributes=dict(self._sampler_attributes(record)),
                start_time=record.start_ns,
                record_exception=False,
                set_status_on_exception=False,
            )
        else:
            # No client handshake spans: a failure's log record still belongs to the
            # request whose span was current when the connection was made.
            span = NonRecordingSpan(trace.get_current_span(parent).get_span_context())
        attributes: Attributes | None = None
        error = record.error
        span_context: SpanContext | None = None
        if span.is_recording():
            span_context = span.get_span_context()
            attributes = handshake_attributes(record, self._config, self.redaction)
            span.set_attributes(attributes)
            if error is not None:
                message = str(error)
                span.set_status(Status(StatusCode.ERROR, message))
                if self._exceptions.span_event:
                    # The stack of a handshake failure says nothing about its cause, and
                    # formatting one would make every failure (and a flood) costly.
                    span.add_event(
                        "exception", _exception_attributes(error), timestamp=record.end_ns
                    )
        histogram.record((record.end_ns - record.start_ns) / 1e9, self._duration_attributes(record))
        if record.peer_certificate is not None:
            self.expiry.add_peer(record.peer_certificate)
        if error is not None or self._config.log_success:
            self._log(record, span, attributes)
        if record.validation_gaps:
            self._validation_gaps(record, span, attributes)
        span.end(end_time=record.end_ns)
        return span_context

    def _sampler_attributes(self, record: HandshakeRecord) -> Attributes:
        """Return what a rule-based sampler needs of a handshake, made once per outcome.

        The span starts when the attempt has ended, so its outcome is known: a sampler
        can keep every failure (``tls.established``, ``error.type``) and drop successes.
        The caller copies it, for a sampler may keep or change what it is given.
        """
        established = record.error is None
        key = (record.protocol_version, record.resumed, record.error_type, established)
        attributes = self._start_attributes.get(key)
        if attributes is None:
            attributes = {
                tls.TLS_ESTABLISHED: established,
                **self._duration_attributes(record),
            }
            self._start_attributes[key] = attributes
        return attributes

    def _duration_attributes(self, record: HandshakeRecord) -> Attributes:
        key = (record.protocol_version, record.resumed, record.error_type)
        attributes = self._metric_attributes.get(key)
        if attributes is None:
            attributes = {tls.TLS_RESUMED: record.resumed}
            if record.protocol_version is not None:
                attributes[tls.TLS_PROTOCOL_VERSION] = record.protocol_version
            if record.error_type is not None:
                attributes[error_attributes.ERROR_TYPE] = record.error_type
            # Versions and error types come from fixed tables: this stays small.
            self._metric_attributes[key] = attributes
        return attributes

    def _log(self, record: HandshakeRecord, span: Span, attributes: Attributes | None) -> None:
        """Write the security-event record of a handshake, inside its span's context."""
        peer = record.peer_address
        side = "server" if record.server_side else "client"
        where = f" with {peer[0]}:{peer[1]}" if peer else ""
        error = record.error

        def build() -> tuple[str, Attributes]:
            fields = attributes or handshake_attributes(record, self._config, self.redaction)
            if error is None:
                return f"TLS {side} handshake succeeded{where}", fields
            if self._exceptions.log_record:
                fields = {**fields, **_exception_attributes(error)}
            return f"TLS {side} handshake failed{where}: {record.error_type} ({error})", fields

        if error is None:
            self.audit.write(logging.INFO, _audit.HANDSHAKE_SUCCEEDED, build, span=span)
            return
        key = (peer[0] if peer else None, record.error_type)
        self.audit.write(logging.WARNING, _audit.HANDSHAKE_FAILED, build, key=key, span=span)

    def _validation_gaps(
        self, record: HandshakeRecord, span: Span, attributes: Attributes | None
    ) -> None:
        """Count each validation gap of a successful handshake and write its record."""
        side = names.TLS_SIDE_SERVER if record.server_side else names.TLS_SIDE_CLIENT
        gaps = record.validation_gaps
        for gap in gaps:
            attrs = self._gap_attributes.get((gap, side))
            if attrs is None:  # not one of GAPS: a bug of ours, still counted
                attrs = {names.TLS_VALIDATION_GAP: gap, names.TLS_SIDE: side}
            self.instruments.validation_gaps.add(1, attrs)
        first = self._first_gaps(record.ssl_context, gaps)
        fields: list[Attributes] = [] if attributes is None else [attributes]

        def handshake_fields() -> Attributes:
            # Built once for all the gaps of the record, and only if one is written.
            if not fields:
                fields.append(handshake_attributes(record, self._config, self.redaction))
            return fields[0]

        for gap in gaps:
            self._log_gap(record, span, side, gap, handshake_fields, always=gap in first)

    def _first_gaps(self, context: ssl.SSLContext | None, gaps: tuple[str, ...]) -> list[str]:
        """Return the gaps ``context`` has had no record of yet, and remember them."""
        if context is None:
            return []
        with self._gaps_lock:
            logged = self._gaps_logged.get(context)
            if logged is None:
                logged = self._gaps_logged[context] = set()
            new = [gap for gap in gaps if gap not in logged]
            logged.update(new)
        return new

    def _log_gap(
        self,
        record: HandshakeRecord,
        span: Span,
        side: str,
        gap: str,
        handshake_fields: Callable[[], Attributes],
        *,
        always: bool,
    ) -> None:
        """Write the ``tls.validation.gap`` record of one gap, rate-limited per peer and gap."""
        peer = record.peer_address
        where = f" with {peer[0]}:{peer[1]}" if peer else ""

        def build() -> tuple[str, Attributes]:
            fields = {
                **handshake_fields(),
                names.TLS_VALIDATION_GAP: gap,
                names.TLS_SIDE: side,
            }
            return f"TLS {side} handshake{where} succeeded with a validation gap: {gap}", fields

        key = (peer[0] if peer else None, gap)
        self.audit.write(
            logging.WARNING, _audit.VALIDATION_GAP, build, key=key, span=span, always=always
        )

    def peer_rejected(
        self, record: HandshakeRecord, error_type: str, message: str, *, alert: str | None = None
    ) -> None:
        """Record a TLS 1.3 server's rejection of our certificate after our handshake."""
        attributes: Attributes = {error_attributes.ERROR_TYPE: error_type}
        if record.peer_certificate is not None:
            attributes[tls.TLS_SERVER_HASH_SHA256] = record.peer_certificate.sha256
        if alert is not None:
            attributes[names.TLS_ALERT] = alert
            attributes[names.TLS_ALERT_SOURCE] = names.TLS_ALERT_SOURCE_PEER
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(_audit.PEER_REJECTED, attributes)
        self.instruments.peer_rejections.add(1, {error_attributes.ERROR_TYPE: error_type})
        peer = record.peer_address

        def build() -> tuple[str, Attributes]:
            fields = {**handshake_attributes(record, self._config, self.redaction), **attributes}
            where = f" {peer[0]}:{peer[1]}" if peer else ""
            return (
                f"TLS server{where} rejected our certificate after the handshake: "
                f"{error_type} ({message})",
                fields,
            )

        key = (peer[0] if peer else None, error_type)
        self.audit.write(logging.WARNING, _audit.PEER_REJECTED, build, key=key)


def _exception_attributes(error: BaseException) -> Attributes:
    return {
        exception_attributes.EXCEPTION_TYPE: _qualified_name(error),
        exception_attributes.EXCEPTION_MESSAGE: str(error),
    }


def _qualified_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
