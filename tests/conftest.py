"""Shared fixtures: a test PKI made by trustme, and an instrumentor with in-memory exporters."""

from __future__ import annotations

import datetime
import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from opentelemetry.instrumentation.mtls import MTLSInstrumentor
from pki import Authority, Leaf

UTC = datetime.UTC


@dataclass
class PKI:
    """A CA with a server and client certificates, and a second CA nobody trusts."""

    ca: Authority
    other_ca: Authority
    server: Leaf
    client: Leaf
    untrusted_client: Leaf
    expired_client: Leaf

    def server_context(
        self,
        verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED,
        maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.configure_cert(ctx)
        self.ca.configure_trust(ctx)
        ctx.verify_mode = verify_mode
        ctx.maximum_version = maximum_version
        return ctx

    def client_context(self, cert: Leaf | None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        if cert is not None:
            cert.configure_cert(ctx)
        return ctx


# What a request span carries of its connection's handshake: the lean identity by
# default, and what OTEL_PYTHON_MTLS_REQUEST_ATTRIBUTES=full adds (the contract's rows).
LEAN = frozenset(
    {
        "tls.client.subject",
        "tls.client.issuer",
        "tls.client.hash.sha256",
        "tls.client.spiffe_id",
        "tls.client.identity.source",
    }
)
FULL_ONLY = frozenset(
    {
        "tls.client.not_before",
        "tls.client.not_after",
        "tls.client.x509.serial_number",
        "tls.client.x509.subject.common_name",
        "tls.client.x509.alternative_names",
        "tls.client.verify.result",
        "tls.protocol.version",
        "tls.cipher",
        "tls.resumed",
    }
)


@pytest.fixture(scope="session")
def pki() -> PKI:
    ca = Authority("mTLS test CA")
    other = Authority("Somebody else's CA")
    return PKI(
        ca=ca,
        other_ca=other,
        server=ca.issue("server.test", dns=("localhost",), ips=("127.0.0.1",)),
        client=ca.issue(
            "web-client",
            uris=("spiffe://example.org/ns/default/sa/web",),
            dns=("web.example.org",),
            serial=0x1234ABCD,
        ),
        untrusted_client=other.issue("intruder", dns=("intruder.example.org",)),
        expired_client=ca.issue(
            "old-client",
            dns=("old.example.org",),
            not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC),
            not_after=datetime.datetime(2021, 1, 1, tzinfo=UTC),
        ),
    )


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
def httpx_instrumented(tracer_provider: TracerProvider) -> Iterator[None]:
    """opentelemetry-instrumentation-httpx's client spans, exported with ours."""
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        yield
    finally:
        instrumentor.uninstrument()


class Instrumented:
    """The instrumentation as a test wants it: on with defaults, or with its own options.

    ``instrumented(**options)`` turns it on again with ``instrument()`` options (the test's
    ``tracer_provider`` unless another is given); ``instrumented.off()`` turns it off, for
    a bare run to compare with. It is always off when the test ends.
    """

    def __init__(self, tracer_provider: TracerProvider) -> None:
        self.tracer_provider = tracer_provider
        self.instrumentor = MTLSInstrumentor()
        self.on = False

    def __call__(self, **options: Any) -> MTLSInstrumentor:
        self.off()
        options.setdefault("tracer_provider", self.tracer_provider)
        self.instrumentor.instrument(**options)
        self.on = True
        return self.instrumentor

    def off(self) -> None:
        if self.on:
            self.instrumentor.uninstrument()
            self.on = False


@pytest.fixture
def instrumented(tracer_provider: TracerProvider) -> Iterator[Instrumented]:
    """The one way tests instrument the process: on with defaults; call it for options."""
    state = Instrumented(tracer_provider)
    state()
    try:
        yield state
    finally:
        state.off()


@contextmanager
def kept_records(logger_name: str, level: int = logging.DEBUG) -> Iterator[list[logging.LogRecord]]:
    """Keep what a logger emits at ``level`` and above, for as long as the block runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def handshake_spans(exporter: InMemorySpanExporter, side: str) -> list[ReadableSpan]:
    """The finished handshake spans of one side, ``server`` or ``client``."""
    name = f"TLS {side} handshake"
    return [span for span in exporter.get_finished_spans() if span.name == name]


def decision_counts(reader: InMemoryMetricReader) -> dict[str, int]:
    """The ``tls.identity.decisions`` counter's points, by decision."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        str(point.attributes["tls.client.identity.decision"]): int(point.value)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "tls.identity.decisions"
        for point in metric.data.data_points  # type: ignore[attr-defined]
    }


LAZY_RESOLUTION_CASES = pytest.mark.parametrize(
    ("sampled", "header", "eager"),
    [(False, False, False), (False, True, True), (True, False, True)],
    ids=["sampled-out", "sampled-out-with-header", "sampled"],
)
"""Whether a request's span is sampled, whether it sends a forged identity header, and
whether its identity is then resolved before the application asks for it."""


def sampled_instrumentation(
    sampled: bool, exporter: InMemorySpanExporter, instrumented: Instrumented
) -> tuple[TracerProvider, InMemoryMetricReader]:
    """Instrument with a tracer provider that samples every span, or none, and a reader."""
    provider = TracerProvider(**({} if sampled else {"sampler": ALWAYS_OFF}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    instrumented(tracer_provider=provider, meter_provider=MeterProvider([reader]))
    return provider, reader
