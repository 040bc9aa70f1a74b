"""Clients the issue names that the other tests do not drive: requests and openssl s_client."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading

import pytest
import requests
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_asgi import instrumented_app

from conftest import PKI, handshake_spans
from servers import uvicorn_server

pytestmark = pytest.mark.usefixtures("instrumented")


def test_requests_with_a_client_certificate(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    with uvicorn_server(instrumented_app(tracer_provider), pki) as port:
        url = f"https://localhost:{port}/"
        cert = (pki.client.cert_path, pki.client.key_path)
        # Connection: close, or uvicorn's shutdown waits for requests' idle connection.
        close = {"Connection": "close"}
        answer = requests.get(url, cert=cert, verify=pki.ca.cert_path, timeout=10, headers=close)
        # Negative control: a certificate from a CA the server does not trust.
        untrusted = (pki.untrusted_client.cert_path, pki.untrusted_client.key_path)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url, cert=untrusted, verify=pki.ca.cert_path, timeout=10)
    assert answer.json()["subject"] == "CN=web-client,O=mTLS tests"
    servers = [s.attributes or {} for s in handshake_spans(exporter, "server")]
    assert [a.get("error.type") for a in servers] == [None, "certificate_authority_invalid"]
    clients = [s.attributes or {} for s in handshake_spans(exporter, "client")]
    assert clients[0]["tls.server.subject"] == "CN=server.test,O=mTLS tests"


def s_client(port: int, pki: PKI, *, with_certificate: bool) -> subprocess.CompletedProcess[str]:
    command = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
        "-CAfile", pki.ca.cert_path, "-brief",
    ]  # fmt: skip
    if with_certificate:
        command += ["-cert", pki.client.cert_path, "-key", pki.client.key_path]
    else:
        # TLS 1.2: the server's refusal ends s_client's handshake. Under TLS 1.3 it
        # arrives after s_client's handshake, which may exit 0 before reading it.
        command += ["-tls1_2"]
    return subprocess.run(
        command, input="", capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_with_and_without_a_certificate(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    ctx = pki.server_context()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"hello\n")
                except (OSError, ssl.SSLError):
                    conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        with_cert = s_client(port, pki, with_certificate=True)
        without = s_client(port, pki, with_certificate=False)
        thread.join(30)
    assert "Verification: OK" in with_cert.stderr + with_cert.stdout
    assert without.returncode != 0 or "alert" in (without.stderr + without.stdout).lower()
    servers = [s.attributes or {} for s in handshake_spans(exporter, "server")]
    assert servers[0]["tls.client.subject"] == "CN=web-client,O=mTLS tests"
    assert servers[1]["error.type"] == "certificate_required"
