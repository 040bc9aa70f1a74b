"""The handshake record: what one TLS handshake attempt established, or why it failed.

The ssl hooks build one record per attempt and hand it to the telemetry; nothing
downstream touches an ``ssl`` object again. Reading the ssl object happens here,
once, so that spans, metrics, logs and the connection registry all agree.
"""

from __future__ import annotations

import dataclasses
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from opentelemetry.context import Context
from opentelemetry.trace import SpanContext

from opentelemetry.instrumentation.mtls._ssl import errors as _errors
from opentelemetry.instrumentation.mtls._ssl.client_hello import ClientHello, parse_client_hello
from opentelemetry.instrumentation.mtls._ssl.messages import Observed
from opentelemetry.instrumentation.mtls._ssl.validation import (
    PEER_CERTIFICATE_EXPIRING,
    peer_certificate_expiring,
    validation,
)
from opentelemetry.instrumentation.mtls._ssl.values import IANA_CIPHER_NAMES, PROTOCOL_VERSIONS
from opentelemetry.instrumentation.mtls._x509 import CertificateInfo, parse_certificate
from opentelemetry.instrumentation.mtls.attributes import (
    TLS_ALERT_SOURCE_LOCAL,
    TLS_ALERT_SOURCE_PEER,
    VERIFY_RESULT_FAILED,
    VERIFY_RESULT_NONE,
)

VERIFIED_CHAIN: Final = sys.version_info >= (3, 13)
"""Python 3.13 gives the verified chain (``get_verified_chain``); before, only the leaf."""

_verify_mode: Final[Callable[[ssl.SSLContext], int]] = ssl._SSLContext.verify_mode.__get__  # type: ignore[attr-defined]
"""A context's verify mode as an int: the C getter, without ``SSLContext``'s enum."""

Address = tuple[str, int]
SSLEndpoint = ssl.SSLSocket | ssl.SSLObject


def socket_address(value: object) -> Address | None:
    """Return (host, port) of an IP socket address (or an ASGI scope's); None otherwise."""
    if isinstance(value, tuple | list) and len(value) >= 2:
        host, port = value[0], value[1]
        if isinstance(host, str) and isinstance(port, int):
            return host, port
    return None


@dataclass(slots=True)
class HandshakeRecord:
    """One handshake attempt on one side, from its first entry to its outcome."""

    server_side: bool
    start_ns: int
    end_ns: int
    parent: Context | None = None
    """Client side: the context that was current when the handshake began."""
    error: BaseException | None = None
    error_type: str | None = None
    protocol_version: str | None = None
    cipher: str | None = None
    resumed: bool = False
    next_protocol: str | None = None
    server_name: str | None = None
    local_address: Address | None = None
    peer_address: Address | None = None
    peer_der: bytes | None = None
    peer_certificate: CertificateInfo | None = None
    peer_chain: tuple[bytes, ...] = ()
    verify_result: str | None = None
    verify_code: int | None = None
    verify_message: str | None = None
    span_context: SpanContext | None = None
    """The handshake span's context, for request spans to link to (kept by the hooks)."""
    client_hello: ClientHello | None = None
    """Server side: what the client's ClientHello offered (see :func:`read_client_hello`)."""
    hello_message: bytes | None = None
    """Server side: the ClientHello as read, until :func:`read_client_hello` parses it."""
    presented_der: bytes | None = None
    """The leaf the peer presented in its Certificate message, on failures (unverified)."""
    alert: str | None = None
    alert_source: str | None = None
    sent_no_certificate: bool = False
    """Client side: we answered the server's certificate request with no certificate."""
    ssl_context: ssl.SSLContext | None = None
    """The handshake's SSL context, once known (validation gaps are logged per context)."""
    hostname_verified: bool | None = None
    """Client side, on success: whether the context checked the server's name."""
    validation_gaps: tuple[str, ...] = ()
    """What a successful handshake did not check (see ``_ssl/validation.py``)."""


def fill_observed(record: HandshakeRecord, observed: Observed | None) -> None:
    """Take in what the handshake messages showed: the ClientHello, the peer's leaf, alerts."""
    if observed is None:
        return
    if record.server_side:
        # Parsed only for what needs it (a recording span, a log record): not on the
        # handshake path of a span that is sampled out or of metrics alone.
        record.hello_message = observed.hello
    record.presented_der = observed.leaf
    if observed.alert is not None:
        record.alert = _errors.alert_name(observed.alert)
        sent = observed.alert_sent
        record.alert_source = TLS_ALERT_SOURCE_LOCAL if sent else TLS_ALERT_SOURCE_PEER
    record.sent_no_certificate = observed.sent_no_certificate


def read_client_hello(record: HandshakeRecord) -> ClientHello | None:
    """Return what a server's peer offered, parsing its ClientHello on the first call.

    The parse also gives the record the server name the client sent (SNI).
    """
    message = record.hello_message
    if message is not None:
        record.hello_message = None
        hello = record.client_hello = parse_client_hello(message)
        if hello is not None and hello.server_name is not None:
            record.server_name = hello.server_name
    return record.client_hello


def fill_success(
    record: HandshakeRecord,
    endpoint: SSLEndpoint,
    *,
    capture_chain: bool,
    expiry_warning_s: float = 0.0,
) -> None:
    """Read what a completed handshake negotiated, who the peer was, and what was not checked.

    ``expiry_warning_s`` is the window in which a peer certificate's coming expiry is a
    validation gap (0: only once expired).
    """
    record.presented_der = None  # the verified certificate, read below, names the peer
    # Both SSLSocket and SSLObject delegate each of these to the same methods of their
    # ``_sslobj`` (the C object); calling it directly saves a Python frame per value.
    tls = getattr(endpoint, "_sslobj", None) or endpoint
    # Table look-ups rather than calls: this runs on every handshake (see _hooks).
    version = tls.version()
    if version is not None:
        record.protocol_version = PROTOCOL_VERSIONS.get(version)
    cipher = tls.cipher()
    if cipher is not None:
        record.cipher = IANA_CIPHER_NAMES.get(cipher[0], cipher[0])
    record.resumed = bool(tls.session_reused)
    record.next_protocol = tls.selected_alpn_protocol()
    der = tls.getpeercert(True)
    # The context's own settings at this handshake (the application may change them after
    # making it), read through the C getter: ``SSLContext.verify_mode`` builds an enum.
    context = record.ssl_context = tls.context
    checked = validation(
        record.server_side,
        _verify_mode(context),
        context.check_hostname,
        bool(der),
        record.protocol_version,
        record.cipher,
    )
    record.verify_result = checked.verify_result
    record.hostname_verified = checked.hostname_verified
    record.validation_gaps = checked.gaps
    if der:
        record.peer_der = der
        certificate = parse_certificate(der)
        if certificate.parse_error is not None:
            certificate = _complete_from_openssl(certificate, tls)
        record.peer_certificate = certificate
        if peer_certificate_expiring(
            certificate.not_after_timestamp, record.end_ns / 1e9, expiry_warning_s
        ):
            record.validation_gaps += (PEER_CERTIFICATE_EXPIRING,)
        if capture_chain or VERIFIED_CHAIN:
            record.peer_chain = peer_chain(endpoint, der)


_OPENSSL_SAN_KINDS: Final = {"DNS": "DNS", "URI": "URI", "IP Address": "IP", "email": "email"}


def _complete_from_openssl(certificate: CertificateInfo, tls: Any) -> CertificateInfo:
    """Fill in the SANs of a certificate ``cryptography`` could not fully read.

    cryptography decodes all extensions at once, so one malformed extension hides the
    SANs (and the SPIFFE ID) of a certificate OpenSSL has just verified; OpenSSL's own
    reading of the verified peer certificate still has them.
    """
    if certificate.alternative_names:
        return certificate
    try:
        peer = tls.getpeercert()
    except (ValueError, OSError):
        return certificate
    names = tuple(
        f"{_OPENSSL_SAN_KINDS[kind]}:{value}"
        for kind, value in (peer or {}).get("subjectAltName", ())
        if kind in _OPENSSL_SAN_KINDS
    )
    if not names:
        return certificate
    spiffe = next((n[4:] for n in names if n.startswith("URI:spiffe://")), None)
    return dataclasses.replace(certificate, alternative_names=names, spiffe_id=spiffe)


def fill_failure(
    record: HandshakeRecord, exc: BaseException, error_type: str | None = None
) -> None:
    """Classify a failed or abandoned handshake."""
    record.error = exc
    record.error_type = _errors.refine(
        error_type or _errors.error_type(exc),
        record.alert,
        record.alert_source,
        sent_no_certificate=record.sent_no_certificate,
    )
    details = _errors.verify_details(exc)
    if details is not None:
        record.verify_result = VERIFY_RESULT_FAILED
        record.verify_code, record.verify_message = details
    elif record.error_type == _errors.CERTIFICATE_REQUIRED:
        record.verify_result = VERIFY_RESULT_NONE


def peer_chain(endpoint: SSLEndpoint, leaf: bytes) -> tuple[bytes, ...]:
    """Return the peer's verified chain (Python 3.13+) as DER, leaf first; else the leaf."""
    getter = getattr(endpoint, "get_verified_chain", None)
    if getter is None:
        return (leaf,)
    chain = getter()
    return tuple(
        cert if isinstance(cert, bytes) else cert.public_bytes(ssl_der_encoding()) for cert in chain
    ) or (leaf,)


def ssl_der_encoding() -> int:
    """Return the ``_ssl`` constant for DER output of ``Certificate.public_bytes``."""
    import _ssl  # noqa: PLC0415  # private module, only reached on Python 3.13+

    return int(_ssl.ENCODING_DER)
