"""Ctrl-C stops the example services in seconds, even with no collector listening.

Both services export what the SDK still holds in their lifespan's shutdown. With nobody
on the OTLP port every export retries with backoff, and the exporters' own warnings are
log records to export in turn: the lifespan must still end, bounded by the README's
``OTEL_EXPORTER_OTLP_TIMEOUT``, and not minutes later. The services run as
``examples/README.md`` says (``test_examples_otlp``'s helpers), pointed at loopback ports
nobody listens on, and each is sent SIGINT, as Ctrl-C in its terminal would.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from otlp_receiver import OTLPReceiver
from test_examples_otlp import (
    INSTRUMENT,
    WEB,
    Service,
    client,
    demo,
    free_port,
    pki_dir,  # noqa: F401  (the module-scoped fixture: the README's demo PKI)
)

# What examples/README.md sets in steps 3 and 4 (seconds, in the Python exporters).
EXPORT_TIMEOUT = "2"
# Generous: the bound is a few seconds, the failure this catches is many minutes.
STOP_BOUND = 15.0

pytestmark = pytest.mark.skipif(
    not INSTRUMENT.exists(), reason="opentelemetry-instrument is not installed"
)


def stop_with_sigint(service: Service) -> float:
    """Send SIGINT and wait for the process to end; how long it took, in seconds."""
    service.process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        service.process.wait(STOP_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{service.name} still running {STOP_BOUND}s after SIGINT:\n{service.output()}")
    return time.monotonic() - sent


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_sigint_stops_services_without_collector(
    protocol: str,
    pki_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Never started: its ports were free a moment ago, and nothing listens on them.
    nobody = OTLPReceiver(grpc_port=free_port(), http_port=free_port())
    with demo(
        nobody, protocol, pki_dir, tmp_path, OTEL_EXPORTER_OTLP_TIMEOUT=EXPORT_TIMEOUT
    ) as services:
        # Both serve (the frontend called the backend), and hold spans, logs and metrics.
        with client(pki_dir, "client") as good:
            response = good.get(services.url)
        assert response.status_code == 200, response.text
        assert response.json()["caller"] == WEB

        for service in (services.frontend, services.backend):
            elapsed = stop_with_sigint(service)
            output = service.output()
            # uvicorn turns SIGINT into a clean exit once the lifespan has finished.
            assert service.process.returncode in (0, -signal.SIGINT), output
            assert "Application shutdown complete" in output, output
            assert "Finished server process" in output, output
            assert elapsed < STOP_BOUND, f"{service.name}: {elapsed:.1f}s"
