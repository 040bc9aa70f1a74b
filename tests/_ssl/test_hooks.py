"""Every TLS version, client certificate and I/O model: one span per side, the host unchanged.

Each case runs twice, without and with the instrumentation, and what the host saw
(results and exception messages, on both sides) must be the same.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from conftest import PKI, Instrumented, handshake_spans
from pki import Leaf
from tlsrun import Outcome, blocking, on_loop

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# case -> (client certificate, server verify mode)
CASES: dict[str, tuple[Callable[[PKI], Leaf | None], ssl.VerifyMode]] = {
    "valid": (lambda p: p.client, ssl.CERT_REQUIRED),
    "other_ca": (lambda p: p.untrusted_client, ssl.CERT_REQUIRED),
    "expired": (lambda p: p.expired_client, ssl.CERT_REQUIRED),
    "none_required": (lambda p: None, ssl.CERT_REQUIRED),
    "none_optional": (lambda p: None, ssl.CERT_OPTIONAL),
}

# case -> server span's (error.type, verify.result, verify.code)
SERVER_EXPECTED: dict[str, tuple[str | None, str, int | None]] = {
    "valid": (None, "success", None),
    "other_ca": ("certificate_authority_invalid", "failed", 20),
    "expired": ("certificate_expired", "failed", 10),
    "none_required": ("certificate_required", "none", None),
    "none_optional": (None, "none", None),
}

# (case, version) -> client span's error.type. TLS 1.3 clients finish their handshake
# before the server has judged their certificate: the rejection comes later.
CLIENT_EXPECTED: dict[tuple[str, str], str | None] = {
    ("other_ca", "1.2"): "peer_rejected_certificate",
    ("expired", "1.2"): "peer_rejected_certificate",
    # OpenSSL answers a missing certificate in TLS 1.2 with the generic
    # handshake_failure alert: after our empty Certificate, it is about our certificate.
    ("none_required", "1.2"): "peer_rejected_certificate",
}


def client_expected(case: str, version: str, mode: str) -> str | None:
    """The client span's error.type; asyncio's and uvloop's servers send no alert."""
    expected = CLIENT_EXPECTED.get((case, version))
    if expected is not None and mode != "blocking":
        # They close the connection without flushing the alert OpenSSL wrote.
        return "peer_connection_closed"
    return expected


MODES = ["blocking", "asyncio", "uvloop"]

# case -> the certificate a rejected client presented
PRESENTED: dict[str, Callable[[PKI], Leaf]] = {
    "other_ca": lambda p: p.untrusted_client,
    "expired": lambda p: p.expired_client,
}


def run(mode: str, pki: PKI, case: str, version: str) -> Outcome:
    cert_of, verify_mode = CASES[case]
    server_ctx = pki.server_context(verify_mode, maximum_version=VERSIONS[version])
    client_ctx = pki.client_context(cert_of(pki))
    if mode == "blocking":
        return blocking(server_ctx, client_ctx)
    return on_loop(mode, server_ctx, client_ctx)


def only(spans: list[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [dict(s.attributes or {}) for s in spans]
    return spans[0]


def check_common(span: ReadableSpan, error_type: str | None, version: str) -> dict[str, Any]:
    attrs = dict(span.attributes or {})
    assert attrs["tls.protocol.name"] == "tls"
    assert attrs["tls.established"] is (error_type is None)
    assert attrs.get("error.type") == error_type
    if error_type is None:
        assert span.status.status_code is StatusCode.UNSET
        assert attrs["tls.protocol.version"] == version
        assert str(attrs["tls.cipher"]).startswith("TLS_")
        assert attrs["tls.resumed"] is False
        assert "tls.next_protocol" not in attrs  # no ALPN offered here
        assert not span.events
    else:
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description
        assert [event.name for event in span.events] == ["exception"]
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= span.end_time
    return attrs


def check_client_certificate(server: Mapping[str, Any], case: str, pki: PKI) -> None:
    """What the server span names of the client's certificate, verified or not."""
    if case == "valid":
        assert server["tls.client.subject"] == "CN=web-client,O=mTLS tests"
        assert server["tls.client.issuer"] == "CN=mTLS test CA root,O=mTLS test CA"
        assert (
            server["tls.client.hash.sha256"] == hashlib.sha256(pki.client.der).hexdigest().upper()
        )
        assert server["tls.client.x509.serial_number"] == "1234ABCD"
        assert server["tls.client.x509.subject.common_name"] == "web-client"
        assert server["tls.client.spiffe_id"] == "spiffe://example.org/ns/default/sa/web"
        assert server["tls.client.x509.alternative_names"] == (
            "DNS:web.example.org",
            "URI:spiffe://example.org/ns/default/sa/web",
        )
        assert str(server["tls.client.not_after"]).endswith(".000Z")
    elif case in PRESENTED:
        # A rejected certificate is named, unverified, with why it was rejected.
        presented = PRESENTED[case](pki)
        assert server["tls.client.hash.sha256"] == hashlib.sha256(presented.der).hexdigest().upper()
        assert server["tls.client.subject"] == presented.certificate.subject.rfc4514_string()
    else:
        # Negative control: no certificate presented, none named.
        assert not [key for key in server if key.startswith("tls.client.x509")]
        assert "tls.client.subject" not in server


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_one_span_per_side(
    mode: str,
    version: str,
    case: str,
    pki: PKI,
    exporter: InMemorySpanExporter,
    instrumented: Instrumented,
) -> None:
    instrumented.off()
    bare = run(mode, pki, case, version)
    assert not exporter.get_finished_spans()

    instrumented()
    try:
        seen = run(mode, pki, case, version)
    finally:
        instrumented.off()
    assert seen == bare

    server_error, verify_result, verify_code = SERVER_EXPECTED[case]
    server = check_common(only(handshake_spans(exporter, "server")), server_error, version)
    assert server["tls.client.verify.result"] == verify_result
    assert server.get("tls.client.verify.code") == verify_code
    assert ("tls.client.verify.message" in server) is (verify_code is not None)
    assert only(handshake_spans(exporter, "server")).parent is None

    check_client_certificate(server, case, pki)

    # The server reads the name the client asked for from its ClientHello.
    assert server["server.address"] == server["tls.client.server_name"] == "localhost"
    assert str(server["tls.client.ja4"]).startswith("t13d")  # a TLS 1.3-capable client
    if mode != "uvloop":
        # uvloop's compiled SSL protocol hides the transport from us (README: limits).
        assert server["client.address"] == server["network.peer.address"] == "127.0.0.1"
        assert server["client.port"] == server["network.peer.port"]
        assert server["network.local.address"] == "127.0.0.1"
        assert server["server.port"] == server["network.local.port"]

    client_error = client_expected(case, version, mode)
    client = check_common(only(handshake_spans(exporter, "client")), client_error, version)
    assert client["tls.client.server_name"] == "localhost"
    assert client["server.address"] == "localhost"
    # The server's certificate is named whether or not the handshake then failed.
    assert client["tls.server.subject"] == "CN=server.test,O=mTLS tests"
    assert client["tls.server.x509.alternative_names"] == ("DNS:localhost", "IP:127.0.0.1")
    if client_error is None:
        assert client["tls.server.verify.result"] == "success"
    if "network.peer.address" in client:
        # (A blocking socket the server has already reset has no peer address to read.)
        assert client["network.peer.address"] == "127.0.0.1"
        assert client["server.port"] == client["network.peer.port"]
    # The client span never describes the client's own certificate.
    assert not [
        key for key in client if key.startswith("tls.client.") and key != "tls.client.server_name"
    ]
