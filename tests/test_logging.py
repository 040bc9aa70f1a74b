"""Where our log records go when the application configures no logging.

Configuration warnings and our own failures go to the ``opentelemetry.instrumentation.mtls``
logger, as every contrib instrumentation's do, so with no logging configured Python's
last-resort handler shows them on stderr. Security-event records go to the audit logger,
which is the application's to route: it stays silent until logging is configured.
Each case runs in a fresh interpreter, since pytest configures logging itself.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

SUPPORT = pathlib.Path(__file__).parent / "support"

INSTRUMENT = (
    "from opentelemetry.instrumentation.mtls import MTLSInstrumentor\n"
    "MTLSInstrumentor().instrument()\n"
)

# A failed server handshake (the client presents no certificate), which writes a
# tls.handshake.failed record to the audit logger.
FAILED_HANDSHAKE = """
import ssl, sys, trustme
sys.path.insert(0, {support!r})
from tlsrun import blocking
{configure}
from opentelemetry.instrumentation.mtls import MTLSInstrumentor
MTLSInstrumentor().instrument()
ca = trustme.CA()
server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ca.issue_cert("localhost").configure_cert(server)
ca.configure_trust(server)
server.verify_mode = ssl.CERT_REQUIRED
client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ca.configure_trust(client)
outcome = blocking(server, client)
print(outcome.server)
"""


def run(code: str, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_PYTHON_MTLS_")}
    env.update(variables)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_an_invalid_variable_warns_on_stderr() -> None:
    result = run(INSTRUMENT, OTEL_PYTHON_MTLS_IDENTITY_MODE="bogus")
    assert "OTEL_PYTHON_MTLS_IDENTITY_MODE='bogus' is invalid" in result.stderr
    assert result.stderr.count("is invalid") == 1


def test_hashed_without_a_key_warns_on_stderr() -> None:
    result = run(INSTRUMENT, OTEL_PYTHON_MTLS_IDENTITY_MODE="hashed")
    assert "needs hash_key" in result.stderr
    assert "omitting identities" in result.stderr


@pytest.mark.parametrize(
    "variables",
    [
        {"OTEL_PYTHON_MTLS_IDENTITY_MODE": "hashed", "OTEL_PYTHON_MTLS_HASH_KEY": "k"},
        {"OTEL_PYTHON_MTLS_IDENTITY_MODE": "OMIT"},
        {},
    ],
    ids=repr,
)
def test_valid_options_print_nothing(variables: dict[str, str]) -> None:
    result = run(INSTRUMENT, **variables)
    assert result.stderr == ""


def test_a_failed_handshake_is_silent_without_logging() -> None:
    result = run(FAILED_HANDSHAKE.format(support=str(SUPPORT), configure=""))
    assert result.stdout.startswith("SSLError")  # the handshake did fail
    assert result.stderr == ""


def test_a_failed_handshake_is_written_once_logging_is_configured() -> None:
    # Negative control of the silence above: the record exists, and reaches the
    # application's handlers.
    configure = "import logging; logging.basicConfig(level=logging.INFO)"
    result = run(FAILED_HANDSHAKE.format(support=str(SUPPORT), configure=configure))
    assert result.stdout.startswith("SSLError")
    assert "TLS server handshake failed" in result.stderr
