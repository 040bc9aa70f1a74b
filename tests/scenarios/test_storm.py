"""A storm of failed handshakes on a uvicorn mTLS server while good clients keep working.

Concurrent clients fail their handshakes in five ways while good clients make requests.
Every failure must be counted once, by reason; every good request must succeed with its
client's identity; the audit log must stay within its rate limit; and the package's
registries must drain, or stay within their bounds. ``benchmarks/storm.py`` is the same
storm at 10,000 failures, with RSS figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conftest import PKI, Instrumented, handshake_spans, kept_records
from opentelemetry.instrumentation.mtls import MTLSInstrumentor, MTLSMiddleware
from opentelemetry.instrumentation.mtls._diagnostics import (
    AUDIT_KEYS,
    LIVE_CONNECTIONS,
    PARSE_CACHE,
    PEER_CERTIFICATES,
    bounded_state,
)
from opentelemetry.instrumentation.mtls._requests.connection import live_connections
from opentelemetry.instrumentation.mtls._signals.audit import (
    AUDIT_LOGGER_NAME,
    HANDSHAKE_FAILED,
)
from opentelemetry.instrumentation.mtls._x509 import CACHE_SIZE
from pki import Leaf
from servers import identity_app, uvicorn_server

# Each kind of failing client, and the error.type its handshake must be counted as.
KINDS = {
    "untrusted": "certificate_authority_invalid",
    "no_certificate": "certificate_required",
    "garbage": "unexpected_message",
    "partial_hello": "peer_connection_closed",
    "stall": "handshake_timeout",
}
PER_KIND = 60
GARBAGE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x00" * 64,
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x00\x05hello",  # a handshake record that is no ClientHello
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert before any handshake
)
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
GOOD_CLIENTS = 4
REQUESTS_PER_CLIENT = 20
REQUESTS_PER_CONNECTION = 5
WORKERS = 10
STALL_TIMEOUT = 0.3
LOG_RATE_LIMIT = 5
PEER_CERTIFICATE_LIMIT = 3
TIMEOUT = 30.0


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def monitored(instrumented: Instrumented, reader: InMemoryMetricReader) -> MTLSInstrumentor:
    return instrumented(
        meter_provider=MeterProvider(metric_readers=[reader]),
        log_rate_limit=LOG_RATE_LIMIT,
        peer_certificate_limit=PEER_CERTIFICATE_LIMIT,
    )


@pytest.fixture
def failure_records() -> Iterator[list[logging.LogRecord]]:
    """The audit log's records (the storm checks its ``tls.handshake.failed`` ones)."""
    with kept_records(AUDIT_LOGGER_NAME) as records:
        yield records


# -- servers ----------------------------------------------------------------------------


@contextlib.contextmanager
def stalling_server(context: ssl.SSLContext) -> Iterator[int]:
    """An asyncio TLS server that gives up on a handshake after STALL_TIMEOUT.

    uvicorn passes no ``ssl_handshake_timeout`` to its loop (60 s by default), so the
    stalling clients are sent here.
    """
    started = threading.Event()
    where: dict[str, Any] = {}

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(
            handle, "127.0.0.1", 0, ssl=context, ssl_handshake_timeout=STALL_TIMEOUT
        )
        stop = asyncio.Event()
        where.update(port=server.sockets[0].getsockname()[1], loop=asyncio.get_running_loop())
        where["stop"] = stop
        started.set()
        await stop.wait()
        server.close()
        await server.wait_closed()

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    assert started.wait(TIMEOUT)
    try:
        yield where["port"]
    finally:
        where["loop"].call_soon_threadsafe(where["stop"].set)
        thread.join(TIMEOUT)


# -- clients ----------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def until_closed(sock: socket.socket) -> None:
    """Read until the server hangs up (a reset or an alert too); a timeout propagates."""
    try:
        while sock.recv(1024):
            pass
    except TimeoutError:
        raise
    except OSError:
        pass


def rejected_client(port: int, context: ssl.SSLContext) -> None:
    """Finish our side of a TLS 1.3 handshake that the server rejects; await its verdict."""
    with connect(port) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="localhost")
        except TimeoutError:
            raise
        except OSError:
            return
        with tls:
            until_closed(tls)


def garbage_client(port: int, payload: bytes) -> None:
    with connect(port) as sock:
        sock.sendall(payload)
        until_closed(sock)


def partial_hello_client(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(PARTIAL_HELLO)


def stalling_client(port: int) -> None:
    with connect(port) as sock:
        until_closed(sock)


def failing_clients(pki: PKI, tls_port: int, stall_port: int) -> list[Callable[[], None]]:
    """PER_KIND clients of each kind, in a shuffled (reproducible) order."""
    untrusted, anonymous = pki.client_context(pki.untrusted_client), pki.client_context(None)
    by_kind: dict[str, Callable[[int], Callable[[], None]]] = {
        "untrusted": lambda i: lambda: rejected_client(tls_port, untrusted),
        "no_certificate": lambda i: lambda: rejected_client(tls_port, anonymous),
        "garbage": lambda i: lambda: garbage_client(tls_port, GARBAGE[i % len(GARBAGE)]),
        "partial_hello": lambda i: lambda: partial_hello_client(tls_port),
        "stall": lambda i: lambda: stalling_client(stall_port),
    }
    assert by_kind.keys() == KINDS.keys()
    jobs = [make(i) for make in by_kind.values() for i in range(PER_KIND)]
    random.Random(0).shuffle(jobs)
    return jobs


def good_client(port: int, pki: PKI, leaf: Leaf, name: str) -> dict[str, Any]:
    """REQUESTS_PER_CLIENT requests as ``name``; path -> (status, subject answered)."""
    answers: dict[str, Any] = {}
    context = pki.client_context(leaf)
    for start in range(0, REQUESTS_PER_CLIENT, REQUESTS_PER_CONNECTION):
        with httpx.Client(verify=context, timeout=TIMEOUT) as http:
            for i in range(start, start + REQUESTS_PER_CONNECTION):
                path = f"/{name}/{i}"
                try:
                    response = http.get(f"https://127.0.0.1:{port}{path}")
                    answers[path] = (response.status_code, response.json()["subject"])
                except httpx.HTTPError as exc:
                    answers[path] = (0, repr(exc))
    return answers


# -- what was recorded ------------------------------------------------------------------


def server_handshakes(reader: InMemoryMetricReader) -> tuple[Counter[str], int]:
    """``tls.server.handshake.duration`` counts: failures by error.type, and successes."""
    failed: Counter[str] = Counter()
    succeeded = 0
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "tls.server.handshake.duration":
                    for point in metric.data.data_points:
                        assert isinstance(point, HistogramDataPoint)
                        error_type = point.attributes.get("error.type")
                        if error_type is None:
                            succeeded += point.count
                        else:
                            failed[str(error_type)] += point.count
    return failed, succeeded


def active_handshakes(reader: InMemoryMetricReader) -> list[float]:
    data = reader.get_metrics_data()
    return [
        point.value
        for resource_metrics in (data.resource_metrics if data else ())
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
        if metric.name == "tls.server.active_handshakes"
        for point in metric.data.data_points
    ]


def settled(reader: InMemoryMetricReader, expected: Counter[str]) -> Counter[str]:
    """The failure counts, once they reach ``expected`` or a deadline passes.

    A client that hangs up mid-handshake is done before the server has noticed.
    """
    deadline = time.monotonic() + TIMEOUT
    failed, _ = server_handshakes(reader)
    while failed != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        failed, _ = server_handshakes(reader)
    return failed


def check_requests(
    exporter: InMemorySpanExporter, answers: dict[str, Any], handshakes: list[ReadableSpan]
) -> None:
    """Every good request succeeded, and both it and its server span saw its client."""
    assert len(answers) == GOOD_CLIENTS * REQUESTS_PER_CLIENT
    for path, (status, subject) in answers.items():
        assert (status, subject) == (200, f"CN={path.split('/')[1]},O=mTLS tests"), path
    spans = {
        str((s.attributes or {}).get("url.path", (s.attributes or {}).get("http.target"))): s
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.SERVER
    }
    assert set(spans) == set(answers)
    established = {s.context.span_id for s in handshakes if (s.attributes or {})["tls.established"]}
    for path, span in spans.items():
        attributes = span.attributes or {}
        assert attributes["tls.client.subject"] == f"CN={path.split('/')[1]},O=mTLS tests"
        assert "tls.client.verify.result" not in attributes  # lean: the handshake's
        (link,) = span.links  # to its connection's handshake, a successful one
        assert link.context.span_id in established


def check_audit_log(records: list[logging.LogRecord], sent: Counter[str]) -> None:
    """Within the rate limit, and never more records and suppressed counts than failures."""
    by_type: dict[str, list[logging.LogRecord]] = {}
    for record in records:
        assert getattr(record, "client.address") == "127.0.0.1"
        by_type.setdefault(str(getattr(record, "error.type")), []).append(record)
    assert set(by_type) == set(sent)
    for error_type, kept in by_type.items():
        suppressed = sum(getattr(r, "tls.log.suppressed_count", 0) for r in kept)
        assert min(LOG_RATE_LIMIT, sent[error_type]) <= len(kept)
        assert len(kept) + suppressed <= sent[error_type]
        # A limiter window lasts at least a second: first..last fit in floor(span) + 1
        # of them; one more because ``created`` is read a little after the limiter's clock.
        span_s = max(r.created for r in kept) - min(r.created for r in kept)
        assert len(kept) <= LOG_RATE_LIMIT * (int(span_s) + 2), error_type


def test_storm_is_counted_exactly_while_good_clients_keep_their_identity(
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    reader: InMemoryMetricReader,
    monitored: MTLSInstrumentor,
    failure_records: list[logging.LogRecord],
) -> None:
    gc.collect()
    assert live_connections() == 0
    good = {f"storm-{i}": pki.ca.issue(f"storm-{i}") for i in range(GOOD_CLIENTS)}
    app = OpenTelemetryMiddleware(
        MTLSMiddleware(identity_app),
        tracer_provider=tracer_provider,
        exclude_spans=["receive", "send"],
    )
    problems: list[str] = []

    def fail(job: Callable[[], None]) -> None:
        # These clients stand for other hosts: their own client handshakes are not
        # this server's telemetry.
        try:
            with suppress_instrumentation():
                job()
        except Exception as exc:
            problems.append(repr(exc))

    with (
        uvicorn_server(app, pki) as port,
        stalling_server(pki.server_context()) as stall_port,
        ThreadPoolExecutor(GOOD_CLIENTS) as good_pool,
    ):
        good_runs = [
            good_pool.submit(good_client, port, pki, leaf, name) for name, leaf in good.items()
        ]
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(fail, failing_clients(pki, port, stall_port)))
        answers = {path: answer for run in good_runs for path, answer in run.result().items()}
        sent = Counter({error_type: PER_KIND for error_type in KINDS.values()})
        failed = settled(reader, sent)

    # Every failure counted once, by its reason; nothing else failed.
    assert problems == []
    assert failed == sent
    handshakes = handshake_spans(exporter, "server")
    reasons = Counter(str((s.attributes or {}).get("error.type")) for s in handshakes)
    established = reasons.pop("None")
    assert reasons == sent  # one span per handshake
    _, succeeded = server_handshakes(reader)
    # A connection per REQUESTS_PER_CONNECTION requests (more if the server closed one).
    assert succeeded == established >= GOOD_CLIENTS * REQUESTS_PER_CLIENT // REQUESTS_PER_CONNECTION
    assert active_handshakes(reader) == [0]

    check_requests(exporter, answers, handshakes)
    failed = [r for r in failure_records if getattr(r, "event.name", None) == HANDSHAKE_FAILED]
    check_audit_log(failed, sent)

    # The registries: drained once the clients are gone and the server stopped, or bounded.
    gc.collect()
    state = bounded_state()
    assert state[LIVE_CONNECTIONS] == 0
    assert state[AUDIT_KEYS] == len(KINDS)  # (127.0.0.1, reason) each
    assert state[PEER_CERTIFICATES] == PEER_CERTIFICATE_LIMIT
    assert state[PARSE_CACHE] <= CACHE_SIZE
