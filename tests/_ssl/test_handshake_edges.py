"""Handshakes that go wrong in other ways: each outcome has its error.type, once."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import socket
import ssl
import sys
import threading
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import PKI, handshake_spans
from pki import Authority, write
from tlsrun import TIMEOUT, blocking, on_loop, run_loop

pytestmark = pytest.mark.usefixtures("instrumented")
UTC = datetime.UTC


def error_types(exporter: InMemorySpanExporter, side: str) -> list[Any]:
    return [(s.attributes or {}).get("error.type") for s in handshake_spans(exporter, side)]


def test_hostname_mismatch(pki: PKI, exporter: InMemorySpanExporter) -> None:
    outcome = blocking(
        pki.server_context(), pki.client_context(pki.client), server_hostname="other.test"
    )
    assert outcome.client.startswith("SSLCertVerificationError")
    assert error_types(exporter, "client") == ["certificate_hostname_mismatch"]
    client = handshake_spans(exporter, "client")[0].attributes or {}
    assert client["tls.server.verify.code"] == 62
    assert client["tls.client.server_name"] == "other.test"
    assert error_types(exporter, "server") == ["peer_rejected_certificate"]


def test_not_yet_valid_and_self_signed_clients(pki: PKI, exporter: InMemorySpanExporter) -> None:
    future = datetime.datetime.now(UTC) + datetime.timedelta(days=30)
    early = pki.ca.issue("early", not_before=future, not_after=future + datetime.timedelta(days=1))
    blocking(pki.server_context(), pki.client_context(early))
    selfsigned = Authority("Self-signed client")
    leaf = selfsigned.issue("lonely")
    ctx = pki.client_context(None)
    ctx.load_cert_chain(leaf.cert_path, leaf.key_path)
    blocking(pki.server_context(), ctx)
    assert error_types(exporter, "server") == [
        "certificate_not_yet_valid",
        "certificate_authority_invalid",
    ]


def test_revoked_client_with_crl_check(pki: PKI, exporter: InMemorySpanExporter) -> None:
    revoked = pki.ca.issue("revoked-client")
    server_ctx = pki.server_context()
    # OpenSSL reads CRLs from a CA file, not from cadata.
    server_ctx.load_verify_locations(cafile=write(pki.ca.revocation_list(revoked), ".crl"))
    server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    blocking(server_ctx, pki.client_context(revoked))
    blocking(server_ctx, pki.client_context(pki.client))  # negative control: not revoked
    assert error_types(exporter, "server") == ["certificate_revoked", None]


def test_protocol_version_and_cipher_mismatch(pki: PKI, exporter: InMemorySpanExporter) -> None:
    server_ctx = pki.server_context()
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx = pki.client_context(pki.client)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    blocking(server_ctx, client_ctx)
    assert error_types(exporter, "server") == ["protocol_version_unsupported"]
    exporter.clear()

    server_ctx = pki.server_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    server_ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    client_ctx = pki.client_context(pki.client)
    client_ctx.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")
    blocking(server_ctx, client_ctx)
    assert error_types(exporter, "server") == ["cipher_suite_mismatch"]


def raw_client(port: int, payload: bytes, *, stall: float = 0.0) -> None:
    """Connect, send bytes that are not a TLS handshake (or a partial one), close."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        if payload:
            sock.sendall(payload)
        if stall:
            # Stay connected, silent, until the server gives up on us.
            with contextlib.suppress(OSError):
                sock.recv(1)


def blocking_server_with(pki: PKI, client: Any, timeout: float = TIMEOUT) -> str:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=client, args=(port,))
        thread.start()
        conn, _ = listener.accept()
        conn.settimeout(timeout)
        try:
            with pki.server_context().wrap_socket(conn, server_side=True):
                return "ok"
        except OSError as exc:
            return type(exc).__name__
        finally:
            conn.close()
            thread.join(TIMEOUT)


PLAIN_HTTP = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def test_blocking_server_sees_plain_http_partial_hello_and_stall(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    assert blocking_server_with(pki, lambda port: raw_client(port, PLAIN_HTTP)) == "SSLError"
    assert blocking_server_with(pki, lambda port: raw_client(port, PARTIAL_HELLO)) == "SSLEOFError"
    stalled = blocking_server_with(pki, lambda port: raw_client(port, b"", stall=1), timeout=0.2)
    assert stalled == "TimeoutError"
    assert error_types(exporter, "server") == [
        "unexpected_message",
        "peer_connection_closed",
        "handshake_timeout",
    ]


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_event_loop_server_sees_plain_http_partial_hello_and_stall(
    loop_name: str, pki: PKI, exporter: InMemorySpanExporter
) -> None:
    async def main() -> Any:
        handled: list[object] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handled.append(writer)
            writer.close()

        server = await asyncio.start_server(
            handle, "127.0.0.1", 0, ssl=pki.server_context(), ssl_handshake_timeout=0.3
        )
        port = server.sockets[0].getsockname()[1]
        for payload, stall in ((PLAIN_HTTP, 0.0), (PARTIAL_HELLO, 0.0), (b"", 1.0)):
            await asyncio.to_thread(raw_client, port, payload, stall=stall)
            await asyncio.sleep(0.1)
        server.close()
        await server.wait_closed()
        return handled

    assert run_loop(loop_name, main) == []  # type: ignore[arg-type]
    assert error_types(exporter, "server") == [
        "unexpected_message",
        "peer_connection_closed",
        "handshake_timeout",
    ]
    spans = handshake_spans(exporter, "server")
    timeout_span = spans[2]
    assert timeout_span.end_time is not None and timeout_span.start_time is not None
    assert (timeout_span.end_time - timeout_span.start_time) / 1e9 >= 0.25


def test_trio_ssl_stream(pki: PKI, exporter: InMemorySpanExporter) -> None:
    async def main() -> tuple[bytes, str]:
        async def serve(stream: trio.SocketStream, ctx: ssl.SSLContext) -> None:
            tls = trio.SSLStream(stream, ctx, server_side=True)
            try:
                await tls.do_handshake()
                await tls.send_all(b"hi")
            except trio.BrokenResourceError:
                pass
            await stream.aclose()

        async def one(cert: Any) -> bytes | str:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            ctx = pki.server_context()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, lambda s: serve(s, ctx), listeners)
                raw = await trio.open_tcp_stream("127.0.0.1", port)
                tls = trio.SSLStream(raw, pki.client_context(cert), server_hostname="localhost")
                try:
                    await tls.do_handshake()
                    result: bytes | str = await tls.receive_some(2)
                except trio.BrokenResourceError as exc:
                    result = type(exc.__cause__).__name__
                await raw.aclose()
                nursery.cancel_scope.cancel()
            return result

        good = await one(pki.client)
        bad = await one(pki.untrusted_client)
        assert isinstance(good, bytes) and isinstance(bad, str)
        return good, bad

    good, bad = trio.run(main)
    assert good == b"hi"
    assert bad in {"SSLError", "SSLEOFError"}
    assert error_types(exporter, "server") == [None, "certificate_authority_invalid"]
    server = handshake_spans(exporter, "server")[0].attributes or {}
    assert server["tls.client.x509.subject.common_name"] == "web-client"
    assert error_types(exporter, "client") == [None, None]


def test_client_span_is_child_of_current_span(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: Any
) -> None:
    tracer = tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("HTTP GET") as parent:
        blocking(pki.server_context(), pki.client_context(pki.client))
        on_loop("asyncio", pki.server_context(), pki.client_context(pki.client))
    parent_id = parent.get_span_context().span_id
    clients = handshake_spans(exporter, "client")
    assert [s.parent.span_id if s.parent else None for s in clients] == [parent_id, parent_id]
    # Negative control: server spans are roots, whatever is current.
    assert [s.parent for s in handshake_spans(exporter, "server")] == [None, None]


def test_resumed_handshake_and_alpn(pki: PKI, exporter: InMemorySpanExporter) -> None:
    server_ctx = pki.server_context()
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    client_ctx = pki.client_context(pki.client)
    client_ctx.set_alpn_protocols(["h2"])
    session: ssl.SSLSession | None = None
    resumed: list[bool] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"x")  # TLS 1.3 tickets travel after the handshake
                    tls.recv(1)

        thread = threading.Thread(target=serve)
        thread.start()
        for _ in range(2):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
                client_ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
            ):
                tls.recv(1)
                resumed.append(tls.session_reused)
                session = tls.session
                tls.sendall(b"y")
        thread.join(TIMEOUT)
    assert resumed == [False, True]
    for side in ("server", "client"):
        spans = [s.attributes or {} for s in handshake_spans(exporter, side)]
        assert [a["tls.resumed"] for a in spans] == [False, True]
        assert [a["tls.next_protocol"] for a in spans] == ["h2", "h2"]
    servers = [s.attributes or {} for s in handshake_spans(exporter, "server")]
    # The resumed session still names the client it was first established with.
    assert servers[1]["tls.client.subject"] == servers[0]["tls.client.subject"]


def test_verified_chain_fingerprints_on_python_3_13(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    blocking(pki.server_context(), pki.client_context(pki.client))
    server = handshake_spans(exporter, "server")[0].attributes or {}
    if sys.version_info < (3, 13):
        # Before 3.13 Python does not give the verified chain: nothing is claimed.
        assert "tls.client.chain.hash.sha256" not in server
        return
    ca_der = pki.ca.certificate.public_bytes(serialization.Encoding.DER)
    assert server["tls.client.chain.hash.sha256"] == (
        hashlib.sha256(pki.client.der).hexdigest().upper(),
        hashlib.sha256(ca_der).hexdigest().upper(),
    )


def test_sans_of_a_verified_certificate_survive_a_malformed_extension(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    """cryptography rejects all extensions for one bad one; OpenSSL verified the SANs."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://example.org/odd")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        # An SCT list extension whose content is not an SCT list.
        .add_extension(
            x509.UnrecognizedExtension(
                ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2"), b"\x04\x03\x00\x01\x00"
            ),
            critical=False,
        )
        .sign(pki.ca.key, hashes.SHA256())
    )
    client = pki.client_context(None)
    client.load_cert_chain(
        write(certificate.public_bytes(serialization.Encoding.PEM), ".crt"),
        write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            ".key",
        ),
    )
    assert blocking(pki.server_context(), client).client_read == "b'hello'"
    server = handshake_spans(exporter, "server")[0].attributes or {}
    assert server["tls.client.x509.parse_error"] == "ValueError"
    assert server["tls.client.spiffe_id"] == "spiffe://example.org/odd"
    assert server["tls.client.x509.alternative_names"] == ("URI:spiffe://example.org/odd",)


def test_do_handshake_on_an_unconnected_socket_passes_through_silently(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """CPython's test_ssl does this: not a handshake attempt, and not our failure."""
    with (
        socket.socket() as raw,
        pki.client_context(None).wrap_socket(
            raw, server_hostname="localhost", do_handshake_on_connect=False
        ) as tls,
        caplog.at_level(logging.DEBUG, logger="opentelemetry.instrumentation.mtls"),
        pytest.raises(OSError),
    ):
        tls.do_handshake()
    ours = [r for r in caplog.records if r.name.startswith("opentelemetry.instrumentation.mtls")]
    assert not [r for r in ours if "handshake record" in r.getMessage()]
