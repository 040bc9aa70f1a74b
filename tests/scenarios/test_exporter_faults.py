"""A broken trace backend never reaches the application: exports fail, handshakes do not.

The OTLP/HTTP span exporter, behind a ``BatchSpanProcessor`` with a small queue, points
at a closed port, at a server that accepts and never answers, or at one that answers
500 and 503. Many mTLS handshakes run through the instrumentation meanwhile, blocking
and as HTTP requests to uvicorn: each must end exactly as it ends without it, nothing
may raise into the application, and the processor's queue must stay within its bound
(spans it cannot send are dropped, not accumulated).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from conftest import PKI, Instrumented, kept_records
from opentelemetry.instrumentation.mtls import MTLSMiddleware
from pki import Leaf
from servers import identity_app, uvicorn_server
from tlsrun import Outcome, blocking

MAX_QUEUE = 32
BATCH = 8
ROUNDS = 25
REQUESTS = 20
TIMEOUT = 10.0


@dataclass
class Backend:
    """Where the exporter sends spans, and what arrived there."""

    url: str
    arrivals: list[str] = field(default_factory=list)
    name: str = ""


@contextlib.contextmanager
def closed_port() -> Iterator[Backend]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there now: every connection is refused.
    yield Backend(f"http://127.0.0.1:{port}/v1/traces")


@contextlib.contextmanager
def never_answers() -> Iterator[Backend]:
    """Accepts connections, reads nothing, answers nothing, until the test is over."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    backend = Backend(f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces")
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            backend.arrivals.append("connection")

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        yield backend
    finally:
        stop.set()
        thread.join(TIMEOUT)
        for conn in held:
            conn.close()
        listener.close()


@contextlib.contextmanager
def server_errors() -> Iterator[Backend]:
    """Answers every export with 500 or 503, in turn."""
    arrivals: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = 503 if len(arrivals) % 2 else 500
            arrivals.append(f"POST {self.path} -> {status}")
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = False  # server_close() joins them
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Backend(f"http://127.0.0.1:{server.server_address[1]}/v1/traces", arrivals)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


BACKENDS = {
    "closed_port": closed_port,
    "never_answers": never_answers,
    "server_errors": server_errors,
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    with BACKENDS[request.param]() as backend:
        backend.name = request.param
        yield backend


@pytest.fixture
def export_failures() -> Iterator[list[logging.LogRecord]]:
    """What the OTLP exporter logged: its failures go there, not to the application."""
    with kept_records("opentelemetry.exporter.otlp", logging.WARNING) as records:
        yield records


def handshakes(reader: InMemoryMetricReader) -> int:
    """Handshakes counted by both sides' duration histograms."""
    data = reader.get_metrics_data()
    total = 0
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name.endswith(".handshake.duration"):
                    for point in metric.data.data_points:
                        assert isinstance(point, HistogramDataPoint)
                        total += point.count
    return total


def test_a_broken_backend_changes_nothing_for_the_application(
    pki: PKI,
    backend: Backend,
    export_failures: list[logging.LogRecord],
    instrumented: Instrumented,
) -> None:
    instrumented.off()
    clients: dict[str, Leaf | None] = {
        "good": pki.client,
        "untrusted": pki.untrusted_client,
        "expired": pki.expired_client,
        "none": None,
    }
    bare: dict[str, Outcome] = {
        name: blocking(pki.server_context(), pki.client_context(cert))
        for name, cert in clients.items()
    }
    assert bare["good"].client_read == "b'hello'"  # the control

    processor = BatchSpanProcessor(
        OTLPSpanExporter(endpoint=backend.url, timeout=1),
        max_queue_size=MAX_QUEUE,
        max_export_batch_size=BATCH,
        schedule_delay_millis=50,
    )
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(processor)
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    instrumented(tracer_provider=tracer_provider, meter_provider=meter_provider)
    queue = processor._batch_processor._queue  # a bounded deque
    queue_lengths: list[int] = []
    answers: list[tuple[int, Any]] = []
    tracemalloc.start()
    try:
        for _ in range(ROUNDS):
            for name, cert in clients.items():
                seen = blocking(pki.server_context(), pki.client_context(cert))
                assert seen == bare[name], name
                queue_lengths.append(len(queue))
        app = OpenTelemetryMiddleware(
            MTLSMiddleware(identity_app),
            tracer_provider=tracer_provider,
            exclude_spans=["receive", "send"],
        )
        with uvicorn_server(app, pki) as port:
            for i in range(REQUESTS):
                # A new connection each time: a handshake on each side.
                with httpx.Client(verify=pki.client_context(pki.client), timeout=TIMEOUT) as http:
                    response = http.get(f"https://127.0.0.1:{port}/{i}")
                    answers.append((response.status_code, response.json()["subject"]))
                queue_lengths.append(len(queue))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        instrumented.off()
        # Short: an export to the silent server takes up to the exporter's timeout, and
        # BatchSpanProcessor.shutdown() takes no timeout (its batch processor does).
        processor._batch_processor.shutdown(timeout_millis=2000)
        tracer_provider.shutdown()
        meter_provider.shutdown()
        worker = processor._batch_processor._worker_thread
        worker.join(TIMEOUT)
        assert not worker.is_alive()

    assert answers == [(200, "CN=web-client,O=mTLS tests")] * REQUESTS
    # Every handshake was recorded, so made its span: both sides of every blocking run
    # and of every request's connection (the requests' own spans come on top).
    produced = 2 * ROUNDS * len(clients) + 2 * REQUESTS
    assert handshakes(reader) == produced
    assert produced > MAX_QUEUE
    assert max(queue_lengths) <= MAX_QUEUE
    # What the exporter could not send was dropped, not kept: memory stays small.
    assert peak < 32 * 1024 * 1024
    # The backend was really tried, and the failures stayed in the exporter's log.
    assert export_failures, "the exporter never reported a failure"
    if backend.name != "closed_port":
        assert backend.arrivals
