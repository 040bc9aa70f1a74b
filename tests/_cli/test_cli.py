"""The ``otel-mtls`` command: the demo, the PKI writer and ``inspect``, run as a user would."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

from conftest import PKI

OTEL_MTLS = [sys.executable, "-m", "opentelemetry.instrumentation.mtls._cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OTEL_MTLS, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_demo_runs_and_names_identities_and_failures() -> None:
    result = run("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in (
        "established, client spiffe://demo.test/ns/shop/sa/web",
        "error.type=certificate_authority_invalid",
        "error.type=certificate_expired",
        "error.type=certificate_required",
        "error.type=unexpected_message",
        "One trace, two mTLS hops",
        "GET /inventory: client identity spiffe://demo.test/ns/shop/sa/frontend",
        "tls.server.handshake.duration",
        "tls.handshake.failed",
    ):
        assert expected in out, expected


def test_pki_writes_the_example_certificates(tmp_path: Path) -> None:
    result = run("pki", str(tmp_path))
    assert result.returncode == 0, result.stderr
    names = {p.name for p in tmp_path.iterdir()}
    for stem in ("frontend", "backend", "client", "wrong-ca", "expired"):
        assert {f"{stem}.crt", f"{stem}.key"} <= names
    assert "ca.crt" in names
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    ctx.load_cert_chain(tmp_path / "client.crt", tmp_path / "client.key")


def serve_once(pki: PKI) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    ctx = pki.server_context(ssl.CERT_NONE)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except OSError:
                conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    return listener.getsockname()[1], thread


def test_inspect_prints_the_span_of_one_handshake(pki: PKI) -> None:
    port, thread = serve_once(pki)
    result = run(
        "inspect", f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, "--servername", "localhost"
    )
    thread.join(10)
    assert result.returncode == 0, result.stderr
    span = json.loads(result.stdout)
    assert span["name"] == "TLS client handshake"
    assert span["attributes"]["tls.server.subject"] == "CN=server.test,O=mTLS tests"

    # Negative control: a server the given CA does not vouch for.
    port, thread = serve_once(pki)
    result = run("inspect", f"127.0.0.1:{port}", "--ca", pki.other_ca.cert_path)
    thread.join(10)
    assert result.returncode == 1
    assert "certificate_authority_invalid" in result.stdout
