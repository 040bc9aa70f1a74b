"""Map a failed handshake's exception to the contract's low-cardinality ``error.type``.

OpenSSL reports failures as a reason string (``SSLError.reason``) and, when the
peer's certificate failed verification, an X509 verify code. The values follow
gRPC proposal A118's taxonomy so that dashboards can group by cause. Everything
here is a dictionary look-up: it runs on every failed handshake, including floods.
"""

from __future__ import annotations

import ssl
from typing import Final

from opentelemetry.instrumentation.mtls.attributes import TLS_ALERT_SOURCE_PEER as _PEER

CERTIFICATE_REQUIRED: Final = "certificate_required"
CERTIFICATE_AUTHORITY_INVALID: Final = "certificate_authority_invalid"
CERTIFICATE_EXPIRED: Final = "certificate_expired"
CERTIFICATE_NOT_YET_VALID: Final = "certificate_not_yet_valid"
CERTIFICATE_REVOKED: Final = "certificate_revoked"
CERTIFICATE_HOSTNAME_MISMATCH: Final = "certificate_hostname_mismatch"
CERTIFICATE_VERIFICATION_FAILED: Final = "certificate_verification_failed"
CERTIFICATE_MALFORMED: Final = "certificate_malformed"
PEER_REJECTED_CERTIFICATE: Final = "peer_rejected_certificate"
PROTOCOL_VERSION_UNSUPPORTED: Final = "protocol_version_unsupported"
CIPHER_SUITE_MISMATCH: Final = "cipher_suite_mismatch"
NO_APPLICATION_PROTOCOL: Final = "no_application_protocol"
UNEXPECTED_MESSAGE: Final = "unexpected_message"
HANDSHAKE_TIMEOUT: Final = "handshake_timeout"
PEER_CONNECTION_CLOSED: Final = "peer_connection_closed"
UNKNOWN_FAILURE: Final = "unknown_failure"

# X509 verify codes (OpenSSL's X509_V_ERR_*, include/openssl/x509_vfy.h) that
# name a cause more precisely than "verification failed".
_VERIFY_CODES: Final[dict[int, str]] = {
    2: CERTIFICATE_AUTHORITY_INVALID,  # UNABLE_TO_GET_ISSUER_CERT
    9: CERTIFICATE_NOT_YET_VALID,  # CERT_NOT_YET_VALID
    10: CERTIFICATE_EXPIRED,  # CERT_HAS_EXPIRED
    13: CERTIFICATE_MALFORMED,  # ERROR_IN_CERT_NOT_BEFORE_FIELD
    14: CERTIFICATE_MALFORMED,  # ERROR_IN_CERT_NOT_AFTER_FIELD
    18: CERTIFICATE_AUTHORITY_INVALID,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: CERTIFICATE_AUTHORITY_INVALID,  # SELF_SIGNED_CERT_IN_CHAIN
    20: CERTIFICATE_AUTHORITY_INVALID,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: CERTIFICATE_AUTHORITY_INVALID,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: CERTIFICATE_REVOKED,  # CERT_REVOKED
    24: CERTIFICATE_AUTHORITY_INVALID,  # INVALID_CA
    62: CERTIFICATE_HOSTNAME_MISMATCH,  # HOSTNAME_MISMATCH
    63: CERTIFICATE_HOSTNAME_MISMATCH,  # EMAIL_MISMATCH
    64: CERTIFICATE_HOSTNAME_MISMATCH,  # IP_ADDRESS_MISMATCH
}

# OpenSSL reason strings (``SSLError.reason``), as OpenSSL 3 spells them.
_REASONS: Final[dict[str, str]] = {
    # We asked for a certificate and got none (TLS 1.2 and 1.3 alike).
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": CERTIFICATE_REQUIRED,
    # Alerts the peer sent about the certificate we presented.
    "TLSV1_ALERT_UNKNOWN_CA": PEER_REJECTED_CERTIFICATE,
    "SSLV3_ALERT_BAD_CERTIFICATE": PEER_REJECTED_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": PEER_REJECTED_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": PEER_REJECTED_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": PEER_REJECTED_CERTIFICATE,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": PEER_REJECTED_CERTIFICATE,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": PEER_REJECTED_CERTIFICATE,
    "TLSV1_ALERT_ACCESS_DENIED": PEER_REJECTED_CERTIFICATE,
    # Versions.
    "UNSUPPORTED_PROTOCOL": PROTOCOL_VERSION_UNSUPPORTED,
    "TLSV1_ALERT_PROTOCOL_VERSION": PROTOCOL_VERSION_UNSUPPORTED,
    "NO_PROTOCOLS_AVAILABLE": PROTOCOL_VERSION_UNSUPPORTED,
    "VERSION_TOO_LOW": PROTOCOL_VERSION_UNSUPPORTED,
    "VERSION_TOO_HIGH": PROTOCOL_VERSION_UNSUPPORTED,
    # Ciphers and key exchange groups.
    "NO_SHARED_CIPHER": CIPHER_SUITE_MISMATCH,
    "NO_CIPHERS_AVAILABLE": CIPHER_SUITE_MISMATCH,
    "NO_SUITABLE_KEY_SHARE": CIPHER_SUITE_MISMATCH,
    "NO_SHARED_GROUPS": CIPHER_SUITE_MISMATCH,
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": CIPHER_SUITE_MISMATCH,
    # ALPN.
    "NO_APPLICATION_PROTOCOL": NO_APPLICATION_PROTOCOL,
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": NO_APPLICATION_PROTOCOL,
    # Bytes that are not a TLS handshake: plain HTTP, probes, garbage.
    "HTTP_REQUEST": UNEXPECTED_MESSAGE,
    "HTTPS_PROXY_REQUEST": UNEXPECTED_MESSAGE,
    "WRONG_VERSION_NUMBER": UNEXPECTED_MESSAGE,
    "UNEXPECTED_MESSAGE": UNEXPECTED_MESSAGE,
    "UNEXPECTED_RECORD": UNEXPECTED_MESSAGE,
    "PACKET_LENGTH_TOO_LONG": UNEXPECTED_MESSAGE,
    "RECORD_LENGTH_MISMATCH": UNEXPECTED_MESSAGE,
    "SSLV3_ALERT_UNEXPECTED_MESSAGE": UNEXPECTED_MESSAGE,
    "UNKNOWN_PROTOCOL": UNEXPECTED_MESSAGE,
    # The peer went away in the middle.
    "UNEXPECTED_EOF_WHILE_READING": PEER_CONNECTION_CLOSED,
    # The certificate could not be decoded at all.
    "BAD_CERTIFICATE": CERTIFICATE_MALFORMED,
    "CERTIFICATE_VERIFY_FAILED": CERTIFICATE_VERIFICATION_FAILED,
}


def verify_details(exc: BaseException) -> tuple[int, str] | None:
    """Return the X509 verify code and message of a certificate verification failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_code, exc.verify_message
    return None


def error_type(exc: BaseException) -> str:
    """Return the ``error.type`` for the exception a handshake raised."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(exc.verify_code, CERTIFICATE_VERIFICATION_FAILED)
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason
        if reason is not None:
            return _REASONS.get(reason, UNKNOWN_FAILURE)
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return PEER_CONNECTION_CLOSED
        return UNKNOWN_FAILURE
    if isinstance(exc, TimeoutError):
        return HANDSHAKE_TIMEOUT
    if isinstance(exc, (ConnectionError, EOFError)):
        return PEER_CONNECTION_CLOSED
    return UNKNOWN_FAILURE


# -- alerts ------------------------------------------------------------------------------

ALERTS: Final[dict[int, str]] = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    21: "decryption_failed",
    22: "record_overflow",
    30: "decompression_failure",
    40: "handshake_failure",
    41: "no_certificate",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    60: "export_restriction",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    100: "no_renegotiation",
    109: "missing_extension",
    110: "unsupported_extension",
    111: "certificate_unobtainable",
    112: "unrecognized_name",
    113: "bad_certificate_status_response",
    114: "bad_certificate_hash_value",
    115: "unknown_psk_identity",
    116: "certificate_required",
    120: "no_application_protocol",
}
"""TLS alert descriptions by code (RFC 8446 6, with RFC 5246's and RFC 6066's older ones)."""

_ALERT_NAMES: Final = frozenset(ALERTS.values())
# OpenSSL names a received fatal alert as the exception's reason: SSL_AD_REASON_OFFSET
# plus the alert's code, spelt e.g. TLSV1_ALERT_UNKNOWN_CA (ssl/ssl_err.c).
_ALERT_REASON_PREFIXES: Final = ("SSLV3_ALERT_", "TLSV13_ALERT_", "TLSV1_ALERT_", "TLSV1_")

# What a received alert says of a failure that OpenSSL's exception does not name.
_PEER_ALERT_TYPES: Final[dict[str, str]] = {
    "unexpected_message": UNEXPECTED_MESSAGE,
    "bad_certificate": PEER_REJECTED_CERTIFICATE,
    "unsupported_certificate": PEER_REJECTED_CERTIFICATE,
    "certificate_revoked": PEER_REJECTED_CERTIFICATE,
    "certificate_expired": PEER_REJECTED_CERTIFICATE,
    "certificate_unknown": PEER_REJECTED_CERTIFICATE,
    "unknown_ca": PEER_REJECTED_CERTIFICATE,
    "access_denied": PEER_REJECTED_CERTIFICATE,
    "certificate_required": PEER_REJECTED_CERTIFICATE,
    "protocol_version": PROTOCOL_VERSION_UNSUPPORTED,
    "insufficient_security": CIPHER_SUITE_MISMATCH,
    "no_application_protocol": NO_APPLICATION_PROTOCOL,
}


def alert_name(code: int) -> str:
    """Return an alert's RFC 8446 description; an unregistered code as its number."""
    return ALERTS.get(code) or str(code)


def received_alert(exc: BaseException) -> str | None:
    """Return the alert a peer sent, as OpenSSL named it in the exception's reason."""
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
    if not isinstance(reason, str):
        return None
    for prefix in _ALERT_REASON_PREFIXES:
        if reason.startswith(prefix):
            name = reason[len(prefix) :].lower()
            return name if name in _ALERT_NAMES else None
    return None


def refine(
    error_type: str, alert: str | None, alert_source: str | None, *, sent_no_certificate: bool
) -> str:
    """Return a more precise ``error.type`` from the alert of the attempt, where it has one.

    Only a failure OpenSSL's exception does not name is refined: a TLS 1.2 server that
    asked for a certificate and got none answers with the generic ``handshake_failure``,
    which is about our (missing) certificate when we sent none.
    """
    if error_type != UNKNOWN_FAILURE or alert is None or alert_source != _PEER:
        return error_type
    if alert == "handshake_failure" and sent_no_certificate:
        return PEER_REJECTED_CERTIFICATE
    return _PEER_ALERT_TYPES.get(alert, error_type)
