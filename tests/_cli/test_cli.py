"""The ``otel-mtls`` command: the demo and the PKI writer, run as a user would.

``otel-mtls inspect`` has its own tests: test_inspect.py.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

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
