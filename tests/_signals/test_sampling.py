"""Handshake spans under a sampler: what it sees, and what sampling out leaves unchanged.

The span of a handshake starts once the attempt has ended, so a rule-based sampler can
be given its outcome (``tls.established``, ``error.type``) and keep every failure while
it drops most successes. A span it drops must cost little (no attributes are built for
it) and must change nothing else: metrics and security-event records stay the same.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from conftest import PKI, Instrumented, handshake_spans, kept_records
from opentelemetry.instrumentation.mtls._signals.audit import AUDIT_LOGGER_NAME
from opentelemetry.instrumentation.mtls._signals.handshake import certificate_attributes
from opentelemetry.instrumentation.mtls._ssl.hooks import connection_record
from opentelemetry.instrumentation.mtls._ssl.record import HandshakeRecord
from tlsrun import blocking

# Per-connection values (ephemeral ports) that differ between any two runs.
_PER_CONNECTION = ("client.port", "network.peer.port", "network.local.port", "server.port")


class FailuresOnly(Sampler):
    """A rule-based sampler: keep failed handshakes, drop the rest; remember what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def should_sample(  # the SDK's signature
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        given = dict(attributes or {})
        self.seen.append((name, given))
        keep = given.get("tls.established") is False
        return SamplingResult(Decision.RECORD_AND_SAMPLE if keep else Decision.DROP, given)

    def get_description(self) -> str:
        return "FailuresOnly"


def provider(sampler: Sampler, exporter: InMemorySpanExporter) -> TracerProvider:
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracer_provider


@pytest.fixture
def audit() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger(AUDIT_LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    try:
        with kept_records(AUDIT_LOGGER_NAME) as records:
            yield records
    finally:
        logger.setLevel(logging.NOTSET)


def test_a_rule_based_sampler_sees_the_outcome_at_start(
    pki: PKI, instrumented: Instrumented
) -> None:
    sampler, exporter = FailuresOnly(), InMemorySpanExporter()
    instrumented(tracer_provider=provider(sampler, exporter))
    blocking(pki.server_context(), pki.client_context(pki.client))
    blocking(pki.server_context(), pki.client_context(pki.untrusted_client))

    server = [given for name, given in sampler.seen if name == "TLS server handshake"]
    assert len(server) == 2
    succeeded, failed = server
    assert succeeded["tls.established"] is True
    assert "error.type" not in succeeded  # the control: a success names no error
    assert succeeded["tls.protocol.version"] == "1.3"
    assert failed["tls.established"] is False
    assert failed["error.type"] == "certificate_authority_invalid"
    # What the sampler kept records the full span; what it dropped left nothing.
    (kept,) = handshake_spans(exporter, "server")
    attributes = kept.attributes or {}
    assert attributes["error.type"] == "certificate_authority_invalid"
    assert attributes["tls.client.subject"] == "CN=intruder,O=mTLS tests"
    # TLS 1.3: both clients completed their side, so the sampler dropped both.
    assert [given["tls.established"] for name, given in sampler.seen if "client" in name] == [
        True,
        True,
    ]
    assert handshake_spans(exporter, "client") == []


def run(
    pki: PKI, instrumented: Instrumented, sampler: Sampler, audit: list[logging.LogRecord]
) -> tuple[Mapping[Any, int], list[dict[str, Any]], int]:
    """One success and two failures; return metric counts, log records and spans made."""
    reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
    instrumented(
        tracer_provider=provider(sampler, exporter),
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    audit.clear()
    for cert in (pki.client, pki.untrusted_client, None):
        blocking(pki.server_context(), pki.client_context(cert))
    instrumented.off()
    counts: dict[Any, int] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "tls.certificate.time_left":
                    continue  # seconds from now: moves between the runs
                for point in metric.data.data_points:
                    key = (metric.name, frozenset((point.attributes or {}).items()))
                    # A histogram's count, a counter's value.
                    counts[key] = int(getattr(point, "count", None) or getattr(point, "value", 0))
    records = [
        {
            "level": record.levelno,
            **{
                key: value
                for key, value in vars(record).items()
                if "." in key and key not in _PER_CONNECTION
            },
        }
        for record in audit
        # A late rejection's record (client side, after the handshake) races the close.
        if getattr(record, "event.name", None) != "tls.peer_rejected"
    ]
    return counts, records, len(exporter.get_finished_spans())


def test_a_sampled_out_span_leaves_metrics_and_logs_unchanged(
    pki: PKI, instrumented: Instrumented, audit: list[logging.LogRecord]
) -> None:
    sampled = run(pki, instrumented, ALWAYS_ON, audit)
    dropped = run(pki, instrumented, ALWAYS_OFF, audit)
    assert sampled[2] == 6  # the premise: one run records every span, the other none
    assert dropped[2] == 0
    metrics, records = dropped[0], dropped[1]
    assert metrics == sampled[0]
    assert any(name == "tls.server.handshake.duration" for name, _ in metrics)
    assert records == sampled[1]
    # The failures' records still carry what only the ClientHello tells.
    events = [record["event.name"] for record in records]
    assert events == ["tls.handshake.failed", "tls.handshake.failed"]
    for record in records:
        assert record["tls.client.ja4"].startswith("t13")
        assert record["server.address"] == "localhost"


def server_record(pki: PKI) -> HandshakeRecord:
    """One handshake over memory BIOs; the server side's record, as its requests see it."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = pki.client_context(pki.client).wrap_bio(c_in, c_out, server_hostname="localhost")
    server = pki.server_context().wrap_bio(s_in, s_out, server_side=True)
    done: set[ssl.SSLObject] = set()
    for _ in range(8):
        for tls, inbox, outbox in ((client, s_in, c_out), (server, c_in, s_out)):
            if tls not in done:
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.do_handshake()
                    done.add(tls)
            inbox.write(outbox.read())
    assert len(done) == 2
    return connection_record(server)


def test_no_attributes_are_built_for_a_span_that_does_not_record(
    pki: PKI, instrumented: Instrumented
) -> None:
    exporter = InMemorySpanExporter()
    instrumented(tracer_provider=provider(ALWAYS_OFF, exporter))
    certificate_attributes.cache_clear()
    for _ in range(3):
        blocking(pki.server_context(), pki.client_context(pki.client))
    info = certificate_attributes.cache_info()
    assert info.hits + info.misses == 0
    # Nor is the ClientHello parsed (for JA4 and the SNI): no span, no log record needs it.
    dropped = server_record(pki)
    assert dropped.client_hello is None
    assert dropped.server_name is None
    # The control: the same handshakes with spans that record build them (once each).
    instrumented(tracer_provider=provider(ALWAYS_ON, exporter))
    for _ in range(3):
        blocking(pki.server_context(), pki.client_context(pki.client))
    info = certificate_attributes.cache_info()
    assert (info.misses, info.hits) == (2, 4)  # one per certificate and role, then reused
    recorded = server_record(pki)
    assert recorded.client_hello is not None
    assert recorded.server_name == "localhost"
    assert len(exporter.get_finished_spans()) == 8
