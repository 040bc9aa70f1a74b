"""Metrics, certificate expiry, security-event logs and TLS 1.3 late rejection."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.instrumentation.logging.handler import LoggingHandler
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import PKI, Instrumented, handshake_spans, kept_records
from opentelemetry.instrumentation.mtls import MTLSInstrumentor
from opentelemetry.instrumentation.mtls._signals.audit import AUDIT_LOGGER_NAME
from pki import Leaf
from tlsrun import TIMEOUT, blocking, run_loop

UTC = datetime.UTC


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def monitored(
    instrumented: Instrumented, reader: InMemoryMetricReader, request: pytest.FixtureRequest
) -> MTLSInstrumentor:
    """Instrumented with metrics read by ``reader`` (and the test's parametrized options)."""
    options = getattr(request, "param", {})
    return instrumented(meter_provider=MeterProvider(metric_readers=[reader]), **options)


@pytest.fixture
def audit() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger(AUDIT_LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    try:
        with kept_records(AUDIT_LOGGER_NAME) as records:
            yield records
    finally:
        logger.setLevel(logging.NOTSET)


def points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    found = []
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found.extend(metric.data.data_points)
    return found


def counts(reader: InMemoryMetricReader, name: str) -> dict[frozenset[Any], int]:
    result = {}
    for point in points(reader, name):
        assert isinstance(point, HistogramDataPoint)
        result[frozenset(point.attributes.items())] = point.count
    return result


def test_duration_histograms_count_every_outcome(
    pki: PKI, reader: InMemoryMetricReader, monitored: MTLSInstrumentor
) -> None:
    clients = [pki.client] * 3 + [pki.untrusted_client] * 2 + [pki.expired_client, None]
    for cert in clients:
        blocking(pki.server_context(), pki.client_context(cert))
    ok = frozenset({("tls.protocol.version", "1.3"), ("tls.resumed", False)})

    def failed(error_type: str) -> frozenset[Any]:
        return frozenset({("error.type", error_type), ("tls.resumed", False)})

    assert counts(reader, "tls.server.handshake.duration") == {
        ok: 3,
        failed("certificate_authority_invalid"): 2,
        failed("certificate_expired"): 1,
        failed("certificate_required"): 1,
    }
    # TLS 1.3 clients finish before the server judges them: all 7 succeed on their side.
    assert counts(reader, "tls.client.handshake.duration") == {ok: 7}
    server_points = points(reader, "tls.server.handshake.duration")
    assert server_points[0].explicit_bounds[0] == 0.0005
    assert [p.value for p in points(reader, "tls.server.active_handshakes")] == [0]


def test_no_metrics_without_instrumentation(pki: PKI, reader: InMemoryMetricReader) -> None:
    MeterProvider(metric_readers=[reader])
    blocking(pki.server_context(), pki.client_context(pki.client))
    assert points(reader, "tls.server.handshake.duration") == []


PLAIN_HTTP = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


def garbage_flood(pki: PKI, count: int) -> None:
    """``count`` clients from 127.0.0.1 send plain HTTP to a blocking TLS server."""
    ctx = pki.server_context()
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(count):
                conn, _ = listener.accept()
                try:
                    ctx.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    pass
                finally:
                    conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                sock.sendall(PLAIN_HTTP)
                with contextlib.suppress(OSError):
                    sock.recv(1)  # until the server has given up on us
        thread.join(TIMEOUT * 6)
        assert not thread.is_alive()


@pytest.mark.parametrize("monitored", [{"log_rate_limit": 5}], indirect=True)
def test_flood_is_counted_exactly_and_logged_within_the_limit(
    pki: PKI,
    reader: InMemoryMetricReader,
    exporter: InMemorySpanExporter,
    monitored: MTLSInstrumentor,
    audit: list[logging.LogRecord],
) -> None:
    tracemalloc.start()
    started = time.monotonic()
    garbage_flood(pki, 2000)
    seconds = time.monotonic() - started
    time.sleep(1.1)
    garbage_flood(pki, 1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    failed = frozenset({("error.type", "unexpected_message"), ("tls.resumed", False)})
    assert counts(reader, "tls.server.handshake.duration") == {failed: 2001}
    assert len(handshake_spans(exporter, "server")) == 2001
    records = [r for r in audit if getattr(r, "event.name") == "tls.handshake.failed"]
    # At most 5 a second while the flood lasted, plus the one after the pause.
    assert 5 <= len(records) <= 5 * (int(seconds) + 1) + 1
    suppressed = [getattr(r, "tls.log.suppressed_count", 0) for r in records]
    assert suppressed[-1] > 0
    assert len(records) + sum(suppressed) == 2001  # every failure logged or counted
    assert all(getattr(r, "client.address") == "127.0.0.1" for r in records)
    # The in-memory exporter keeps 2001 spans; what the flood itself allocated beyond
    # them is bounded: no per-failure state is kept.
    assert peak < 64 * 1024 * 1024


def test_failure_records_carry_their_span_ids_through_the_logging_bridge(
    pki: PKI, exporter: InMemorySpanExporter, monitored: MTLSInstrumentor
) -> None:
    logs = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    handler = LoggingHandler(logger_provider=provider)
    logger = logging.getLogger(AUDIT_LOGGER_NAME)
    logger.addHandler(handler)
    try:
        blocking(pki.server_context(), pki.client_context(pki.expired_client))
        blocking(pki.server_context(), pki.client_context(pki.client))  # control: no record
    finally:
        logger.removeHandler(handler)
    # The client loaded an expired certificate and was rejected: those have records too.
    (log,) = [
        log
        for log in logs.get_finished_logs()
        if log.log_record.event_name == "tls.handshake.failed"
    ]
    span = handshake_spans(exporter, "server")[0]
    record = log.log_record
    assert record.trace_id == span.context.trace_id
    assert record.span_id == span.context.span_id
    attributes = dict(record.attributes or {})
    # The bridge promotes the record's event.name to the log record's event name.
    assert record.event_name == "tls.handshake.failed"
    assert attributes["error.type"] == "certificate_expired"
    assert attributes["tls.client.verify.code"] == 10
    assert attributes["tls.client.verify.message"] == "certificate has expired"
    assert attributes["client.address"] == "127.0.0.1"
    assert record.severity_text == "WARN"


@pytest.mark.parametrize("monitored", [{"log_success": True}], indirect=True)
def test_success_records_on_request(
    pki: PKI, monitored: MTLSInstrumentor, audit: list[logging.LogRecord]
) -> None:
    blocking(pki.server_context(), pki.client_context(pki.client))
    events = sorted(getattr(r, "event.name") for r in audit)
    assert events == ["tls.handshake.succeeded", "tls.handshake.succeeded"]
    server = next(r for r in audit if hasattr(r, "tls.client.subject"))
    assert getattr(server, "tls.client.subject") == "CN=web-client,O=mTLS tests"
    assert server.levelno == logging.INFO


def gauge(reader: InMemoryMetricReader) -> dict[tuple[str, str], float]:
    return {
        (
            p.attributes["tls.certificate.role"],
            p.attributes["tls.certificate.subject.common_name"],
        ): (p.value)
        for p in points(reader, "tls.certificate.time_left")
    }


def test_time_left_of_local_certificates_and_expiry_warning(
    pki: PKI, reader: InMemoryMetricReader, monitored: MTLSInstrumentor, audit: list[Any]
) -> None:
    now = datetime.datetime.now(UTC)
    soon = pki.ca.issue("soon", not_after=now + datetime.timedelta(days=10))
    later = pki.ca.issue("later", not_after=now + datetime.timedelta(days=300))
    for leaf in (soon, later, pki.expired_client):
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(leaf.cert_path, leaf.key_path)
    left = gauge(reader)
    assert abs(left["local", "soon"] - 10 * 86400) < 120
    assert abs(left["local", "later"] - 300 * 86400) < 120
    assert left["local", "old-client"] < -5 * 365 * 86400
    warned = [getattr(r, "tls.certificate.subject.common_name") for r in audit]
    assert sorted(warned) == ["old-client", "soon"]  # not "later": outside 30 days
    gauge(reader)
    assert len(audit) == 2  # once per certificate


@pytest.mark.parametrize("monitored", [{"peer_certificate_limit": 3}], indirect=True)
def test_peer_certificates_are_bounded(
    pki: PKI, reader: InMemoryMetricReader, monitored: MTLSInstrumentor
) -> None:
    clients = [pki.ca.issue(f"client-{i}") for i in range(5)]
    for leaf in clients:
        blocking(pki.server_context(), pki.client_context(leaf))
    peers = {name for role, name in gauge(reader) if role == "peer"}
    # The 3 most recent clients, and the server (seen by each client) refreshed each time.
    assert peers == {"client-3", "client-4", "server.test"}


def late_rejection_outcome(pki: PKI, cert: Leaf | None) -> str:
    """A TLS 1.3 client against a blocking CERT_REQUIRED server: what its first read sees."""
    return blocking(pki.server_context(), pki.client_context(cert)).client_read


@pytest.mark.parametrize("cert_name", ["untrusted_client", "none"])
def test_late_rejection_seen_by_a_blocking_client(
    cert_name: str,
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    reader: InMemoryMetricReader,
    audit: list[logging.LogRecord],
    instrumented: Instrumented,
) -> None:
    instrumented.off()
    cert = getattr(pki, cert_name) if cert_name != "none" else None
    bare = late_rejection_outcome(pki, cert)
    instrumented(meter_provider=MeterProvider(metric_readers=[reader]))
    try:
        with tracer_provider.get_tracer("test").start_as_current_span("GET /"):
            seen = late_rejection_outcome(pki, cert)
            good = late_rejection_outcome(pki, pki.client)  # control
    finally:
        instrumented.off()
    assert seen == bare and seen.startswith("SSLError")
    assert good == "b'hello'"
    (request,) = [s for s in exporter.get_finished_spans() if s.name == "GET /"]
    events = [e for e in request.events if e.name == "tls.peer_rejected"]
    assert [dict(e.attributes or {})["error.type"] for e in events] == ["peer_rejected_certificate"]
    assert "tls.server.hash.sha256" in (events[0].attributes or {})
    rejections = points(reader, "tls.client.peer_rejections")
    assert [(dict(p.attributes), p.value) for p in rejections] == [
        ({"error.type": "peer_rejected_certificate"}, 1)
    ]
    logged = [r for r in audit if getattr(r, "event.name") == "tls.peer_rejected"]
    assert len(logged) == 1


def test_late_rejection_seen_by_an_asyncio_client(
    pki: PKI, reader: InMemoryMetricReader, monitored: MTLSInstrumentor
) -> None:
    """An asyncio server closes without an alert; a blocking one sends it."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()  # Python 3.13 warns about a writer left open

    async def main() -> list[str]:
        outcomes = []
        for cert in (pki.untrusted_client, pki.client):
            server = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=pki.server_context())
            port = server.sockets[0].getsockname()[1]
            reader_, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=pki.client_context(cert), server_hostname="localhost"
            )
            try:
                outcomes.append(repr(await asyncio.wait_for(reader_.read(5), TIMEOUT)))
            except (OSError, ssl.SSLError) as exc:
                outcomes.append(type(exc).__name__)
            writer.close()
            server.close()
            await server.wait_closed()
            await asyncio.sleep(0.05)
        return outcomes

    outcomes = run_loop("asyncio", main)  # type: ignore[arg-type]
    assert outcomes[1] == "b'hello'"
    rejections = points(reader, "tls.client.peer_rejections")
    assert [(dict(p.attributes), p.value) for p in rejections] == [
        ({"error.type": "peer_connection_closed"}, 1)
    ]


def test_rate_limits_are_kept_per_kind_of_record(audit: list[logging.LogRecord]) -> None:
    from opentelemetry import metrics, trace

    from opentelemetry.instrumentation.mtls._config import MTLSConfig
    from opentelemetry.instrumentation.mtls._signals.handshake import HandshakeTelemetry
    from opentelemetry.instrumentation.mtls._signals.providers import Providers
    from opentelemetry.instrumentation.mtls._ssl.record import HandshakeRecord, fill_failure

    telemetry = HandshakeTelemetry(
        trace.NoOpTracer(),
        metrics.NoOpMeter("test"),
        MTLSConfig(log_rate_limit=1),
        Providers(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider()),
    )
    client = HandshakeRecord(server_side=False, start_ns=0, end_ns=0)
    client.peer_address = ("127.0.0.1", 443)
    for _ in range(3):  # one written, two held back
        telemetry.peer_rejected(client, "peer_connection_closed", "closed")
    server = HandshakeRecord(server_side=True, start_ns=0, end_ns=1)
    server.peer_address = ("127.0.0.1", 50000)
    fill_failure(server, ConnectionResetError("closed"))
    telemetry.emit(server)
    failed = [r for r in audit if getattr(r, "event.name") == "tls.handshake.failed"]
    # The server's record does not count the client's held-back rejections.
    assert [getattr(r, "tls.log.suppressed_count", 0) for r in failed] == [0]


def test_late_rejection_seen_when_the_client_writes_first(
    pki: PKI, reader: InMemoryMetricReader, monitored: MTLSInstrumentor
) -> None:
    """HTTP clients write first; a rejection that already arrived makes the write fail."""
    ctx = pki.server_context()
    failures = 0
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            for _ in range(5):
                conn, _ = listener.accept()
                with contextlib.suppress(OSError):
                    ctx.wrap_socket(conn, server_side=True)
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        for _ in range(5):
            with (
                socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw,
                pki.client_context(pki.untrusted_client).wrap_socket(
                    raw, server_hostname="localhost"
                ) as tls,
            ):
                time.sleep(0.1)  # the server's verdict arrives before we write
                try:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    tls.recv(1)
                except (OSError, ssl.SSLError):
                    failures += 1
        thread.join(TIMEOUT)
    assert failures == 5
    rejections = points(reader, "tls.client.peer_rejections")
    assert sum(p.value for p in rejections) == 5


@pytest.mark.parametrize(
    ("opt_in", "span_event", "log_fields"),
    [("", True, False), ("logs", False, True), ("logs/dup", True, True)],
)
def test_exceptions_go_where_the_semconv_opt_in_says(
    opt_in: str,
    span_event: bool,
    log_fields: bool,
    pki: PKI,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    instrumented: Instrumented,
) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_EXCEPTION_SIGNAL_OPT_IN", opt_in)
    with kept_records(AUDIT_LOGGER_NAME, logging.WARNING) as records:
        instrumented()  # the opt-in is read when instrumenting
        try:
            blocking(pki.server_context(), pki.client_context(pki.untrusted_client))
        finally:
            instrumented.off()
    (span,) = handshake_spans(exporter, "server")
    assert span.status.is_ok is False  # the control: a failure either way
    assert [e.name for e in span.events].count("exception") == int(span_event)
    (record,) = [r for r in records if getattr(r, "event.name") == "tls.handshake.failed"]
    assert hasattr(record, "exception.type") is log_fields
    if log_fields:
        assert getattr(record, "exception.type") == "ssl.SSLCertVerificationError"
