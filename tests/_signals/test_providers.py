"""The global providers may be set after instrument(): recording starts when they are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from opentelemetry.instrumentation.mtls._signals.providers import Providers

SUPPORT = Path(__file__).resolve().parent.parent / "support"

SCRIPT = """
import sys
sys.path[:0] = [{support!r}]
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.instrumentation.mtls import MTLSInstrumentor
from pki import Authority
from tlsrun import blocking
import ssl

ca = Authority("late CA")
server, client = ca.issue("server", dns=("localhost",)), ca.issue("client")
def contexts():
    s = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); server.configure_cert(s)
    ca.configure_trust(s); s.verify_mode = ssl.CERT_REQUIRED
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ca.configure_trust(c); client.configure_cert(c)
    return s, c

MTLSInstrumentor().instrument()
blocking(*contexts())  # the API alone: nothing records
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
blocking(*contexts())
print(sorted(span.name for span in exporter.get_finished_spans()))
"""


def test_recording_starts_when_the_global_provider_is_set_later() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(support=str(SUPPORT))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['TLS client handshake', 'TLS server handshake']"


def test_api_providers_do_not_record_and_sdk_providers_do() -> None:
    assert not Providers(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider()).recording()
    assert Providers(TracerProvider(), metrics.NoOpMeterProvider()).recording()
    assert Providers(trace.NoOpTracerProvider(), MeterProvider()).recording()
