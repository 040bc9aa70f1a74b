"""The one table from OpenSSL reasons and verify codes to error.type.

The entries that a real handshake can provoke are also met in test_handshake_*.py;
here every entry is checked, with controls for what the table does not know.
"""

from __future__ import annotations

import ssl

import pytest

from opentelemetry.instrumentation.mtls._ssl import errors as _errors

CONTRACT = {
    "certificate_required",
    "certificate_authority_invalid",
    "certificate_expired",
    "certificate_not_yet_valid",
    "certificate_revoked",
    "certificate_hostname_mismatch",
    "certificate_verification_failed",
    "certificate_malformed",
    "peer_rejected_certificate",
    "protocol_version_unsupported",
    "cipher_suite_mismatch",
    "no_application_protocol",
    "unexpected_message",
    "handshake_timeout",
    "peer_connection_closed",
    "unknown_failure",
}


def ssl_error(reason: str | None, cls: type[ssl.SSLError] = ssl.SSLError) -> ssl.SSLError:
    exc = cls(1, f"[SSL: {reason}] test")
    exc.reason = reason  # type: ignore[misc]
    return exc


def verify_error(code: int, message: str = "test") -> ssl.SSLCertVerificationError:
    exc = ssl_error("CERTIFICATE_VERIFY_FAILED", ssl.SSLCertVerificationError)
    assert isinstance(exc, ssl.SSLCertVerificationError)
    exc.verify_code = code
    exc.verify_message = message
    return exc


def test_every_value_is_in_the_contract() -> None:
    values = set(_errors._REASONS.values()) | set(_errors._VERIFY_CODES.values())
    assert values <= CONTRACT


@pytest.mark.parametrize(("reason", "expected"), sorted(_errors._REASONS.items()))
def test_reasons(reason: str, expected: str) -> None:
    assert _errors.error_type(ssl_error(reason)) == expected


@pytest.mark.parametrize(("code", "expected"), sorted(_errors._VERIFY_CODES.items()))
def test_verify_codes(code: int, expected: str) -> None:
    exc = verify_error(code, "why")
    assert _errors.error_type(exc) == expected
    assert _errors.verify_details(exc) == (code, "why")


def test_unknowns_and_other_exceptions() -> None:
    assert _errors.error_type(ssl_error("SOMETHING_NEW")) == "unknown_failure"
    assert _errors.error_type(verify_error(99)) == "certificate_verification_failed"
    assert _errors.error_type(ssl_error(None, ssl.SSLEOFError)) == "peer_connection_closed"
    assert _errors.error_type(ssl_error(None)) == "unknown_failure"
    assert _errors.error_type(TimeoutError()) == "handshake_timeout"
    assert _errors.error_type(ConnectionResetError()) == "peer_connection_closed"
    assert _errors.error_type(BrokenPipeError()) == "peer_connection_closed"
    assert _errors.error_type(ValueError()) == "unknown_failure"
    assert _errors.verify_details(ssl_error("NO_SHARED_CIPHER")) is None
