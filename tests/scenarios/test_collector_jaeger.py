"""The examples through a real OpenTelemetry Collector into a real Jaeger, on loopback.

The two example services (``examples/``, under ``opentelemetry-instrument``, started as
``tests/test_examples_otlp.py`` starts them) export over OTLP gRPC or HTTP to the
collector built from ``.ci/collector-manifest.yaml``, running
``otel-collector-config.yaml`` itself; the collector exports to Jaeger v2 (memory
storage, ``examples/jaeger-config.yaml``). The test then asks Jaeger's HTTP query API
for the two-hop trace and for the failed handshakes by ``error.type``, reads the
collector's Prometheus endpoint, and, with good traces sampled at 0%, shows that tail
sampling keeps every failed handshake and drops the rest.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from otel_tools import (
    REPO,
    Collector,
    Jaeger,
    Sample,
    collector,
    jaeger,
    samples,
    tag_query,
    tags,
    total,
    wait_for,
)

from otlp_receiver import OTLPReceiver
from test_examples_otlp import EXAMPLES, FRONTEND, WEB, demo, free_port, send_clients

# What the example clients' rejections are reported as (send_clients: wrong CA,
# expired, no certificate).
REJECTIONS = ("certificate_authority_invalid", "certificate_expired", "certificate_required")
BACKEND = "spiffe://demo.test/ns/shop/sa/backend"
SERVER_HANDSHAKE = "TLS server handshake"
ARRIVAL_TIMEOUT = 60.0
# Short waits, so that a test takes seconds: one second of tail-sampling decision wait
# (the services' spans of one trace are all exported well within it), one second
# between span metrics flushes.
NEW_TRACES = "otelcol_processor_tail_sampling_new_trace_id_received"
DECISIONS = "otelcol_processor_tail_sampling_global_count_traces_sampled"
POLICY_DECISIONS = "otelcol_processor_tail_sampling_count_traces_sampled"
FAST = {"TAIL_SAMPLING_DECISION_WAIT": "1s", "SPAN_METRICS_FLUSH_INTERVAL": "1s"}


@dataclass
class Run:
    """What one run of the examples through the collector left behind."""

    jaeger: Jaeger
    collector: Collector
    accepted: int
    rejected: int


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo PKI, made the README's way: ``python examples/make_pki.py DIR``."""
    directory = tmp_path_factory.mktemp("pki")
    subprocess.run(
        [sys.executable, str(EXAMPLES / "make_pki.py"), str(directory)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return directory


@contextmanager
def examples_through_collector(
    pki_dir: Path, logs: Path, protocol: str, sampling_percentage: int
) -> Iterator[Run]:
    """Jaeger, the collector, then the examples and their clients; everything stopped after."""
    with (
        jaeger(logs, free_port) as jaeger_,
        collector(
            logs,
            free_port,
            jaeger_.otlp_endpoint,
            SAMPLING_PERCENTAGE=str(sampling_percentage),
            **FAST,
        ) as collector_,
    ):
        # An OTLPReceiver that is never started: demo() only reads its two endpoints.
        endpoints = OTLPReceiver(grpc_port=collector_.grpc_port, http_port=collector_.http_port)
        with demo(endpoints, protocol, pki_dir, logs) as services:
            accepted, rejected = send_clients(services)
            services.stop()
        yield Run(jaeger_, collector_, accepted, rejected)


def process_service(trace: dict[str, Any], span: dict[str, Any]) -> str:
    name: str = trace["processes"][span["processID"]]["serviceName"]
    return name


def failed_handshakes(jaeger_: Jaeger, error_type: str) -> list[dict[str, Any]]:
    """The frontend's failed server handshakes with this ``error.type``, by tag search."""
    found = jaeger_.traces(
        service="frontend",
        operation="TLS server handshake",
        tags=tag_query(**{"error.type": error_type}),
        limit="1000",
    )
    return [
        span
        for trace in found
        for span in trace["spans"]
        if span["operationName"] == "TLS server handshake"
        and tags(span).get("error.type") == error_type
    ]


def wait_for_failed_handshakes(run: Run) -> dict[str, list[dict[str, Any]]]:
    """Every rejected client's handshake span, found in Jaeger by its ``error.type``."""

    def all_arrived() -> dict[str, list[dict[str, Any]]] | None:
        by_type = {
            error_type: failed_handshakes(run.jaeger, error_type) for error_type in REJECTIONS
        }
        return by_type if sum(map(len, by_type.values())) >= run.rejected else None

    return wait_for(
        "the failed handshakes in Jaeger", all_arrived, ARRIVAL_TIMEOUT, run.collector.process.log
    )


def collector_metrics(run: Run, ready: Any) -> list[Sample]:
    """The collector's Prometheus exposition, once ``ready(samples)`` says it is complete."""

    def complete() -> list[Sample] | None:
        found = samples(run.collector.scrape())
        return found if ready(found) else None

    return wait_for(
        "the metrics on the collector's Prometheus endpoint",
        complete,
        ARRIVAL_TIMEOUT,
        run.collector.process.log,
    )


def handshake_counts(found: list[Sample], name: str) -> tuple[float, float]:
    """(successes, failures) of the frontend's server handshakes in a count series.

    The SDK's ``tls_server_handshake_duration_seconds_count`` counts server handshakes
    only; span_metrics' ``traces_span_metrics_calls_total`` counts every span that the
    filter let through, so its server handshakes are those with that span name.
    """
    frontend = [
        s
        for s in found
        if s.name == name
        and s.labels.get("job") == "frontend"
        and s.labels.get("span_name", SERVER_HANDSHAKE) == SERVER_HANDSHAKE
    ]
    failed = sum(s.value for s in frontend if s.labels.get("error_type"))
    return sum(s.value for s in frontend) - failed, failed


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_jaeger_shows_the_two_hop_trace_and_the_failed_handshakes(
    protocol: str, pki_dir: Path, tmp_path: Path
) -> None:
    with examples_through_collector(pki_dir, tmp_path, protocol, 100) as run:
        # The two-hop trace: the frontend's request, its call to the backend, and the
        # backend's request, each request span carrying its caller's identity.
        def orders_arrived() -> list[dict[str, Any]] | None:
            found = run.jaeger.traces(service="frontend", operation="GET /order", limit="1000")
            complete = [
                t for t in found if {s["operationName"] for s in t["spans"]} >= {"GET /inventory"}
            ]
            return complete if len(complete) >= run.accepted else None

        orders = wait_for(
            "the two-hop traces in Jaeger",
            orders_arrived,
            ARRIVAL_TIMEOUT,
            run.collector.process.log,
        )
        assert len(orders) == run.accepted
        # The frontend's connection to the backend, in the trace of the order that opened
        # it (httpx may reuse it for later orders): the backend's identity.
        client_handshakes = [
            s
            for t in orders
            for s in t["spans"]
            if s["operationName"] == "TLS client handshake" and process_service(t, s) == "frontend"
        ]
        assert client_handshakes
        for span in client_handshakes:
            assert tags(span)["tls.server.spiffe_id"] == BACKEND
        for trace in orders:
            spans = trace["spans"]
            by_name = {(process_service(trace, s), s["operationName"]): s for s in spans}
            order = by_name["frontend", "GET /order"]
            inventory = by_name["backend", "GET /inventory"]
            assert tags(order)["tls.client.spiffe_id"] == WEB
            assert tags(inventory)["tls.client.spiffe_id"] == FRONTEND
            # Each request span links to its connection's handshake, in a trace of its own
            # that was kept too (100%): Jaeger shows the link as a reference.
            [link] = [r for r in order["references"] if r["traceID"] != trace["traceID"]]
            # That trace is decided and exported on its own: it may arrive later.
            linked = wait_for(
                "the linked handshake's trace in Jaeger",
                partial(run.jaeger.trace, link["traceID"]),
                ARRIVAL_TIMEOUT,
                run.collector.process.log,
            )
            [handshake] = [s for s in linked["spans"] if s["spanID"] == link["spanID"]]
            assert handshake["operationName"] == "TLS server handshake"
            assert tags(handshake)["tls.client.spiffe_id"] == WEB

        # The failed handshakes, searchable by the tag error.type.
        by_type = wait_for_failed_handshakes(run)
        assert sum(map(len, by_type.values())) == run.rejected
        assert all(by_type.values()), by_type.keys()
        for error_type, spans in by_type.items():
            for span in spans:
                span_tags = tags(span)
                assert span_tags["error.type"] == error_type
                assert span_tags["tls.established"] is False
                assert span_tags["otel.status_code"] == "ERROR"
                assert span_tags["error"] is True
        # Negative control: a reason none of the clients caused finds nothing.
        assert failed_handshakes(run.jaeger, "certificate_revoked") == []

        # Prometheus: the SDK's histograms and span_metrics' counts by error_type.
        def metrics_complete(found: list[Sample]) -> bool:
            sdk = handshake_counts(found, "tls_server_handshake_duration_seconds_count")
            spans = handshake_counts(found, "traces_span_metrics_calls_total")
            return sdk == spans == (run.accepted, run.rejected)

        found = collector_metrics(run, metrics_complete)
        names = {s.name for s in found}
        assert "tls_server_handshake_duration_seconds_bucket" in names
        assert "tls_client_handshake_duration_seconds_bucket" in names
        for error_type in REJECTIONS:
            assert total(
                found, "tls_server_handshake_duration_seconds_count", error_type=error_type
            ) == len(by_type[error_type])
            assert total(
                found,
                "traces_span_metrics_calls_total",
                job="frontend",
                span_name="TLS server handshake",
                error_type=error_type,
            ) == len(by_type[error_type])
        # The metric names the alert rules use are the ones the collector exports.
        assert alert_metric_names() & names == {
            "tls_server_handshake_duration_seconds_count",
            "tls_certificate_time_left_seconds",
        }


def test_tail_sampling_keeps_every_failed_handshake_and_drops_good_traces(
    pki_dir: Path, tmp_path: Path
) -> None:
    """Good traces sampled at 0%: only the failed handshakes' traces reach Jaeger."""
    with examples_through_collector(pki_dir, tmp_path, "http/protobuf", 0) as run:
        # Every trace the collector received has been decided, kept or dropped (the
        # collector's own metrics, as its telemetry exporter names them: no _total).
        def decided() -> list[Sample] | None:
            found = samples(run.collector.telemetry())
            received = total(found, NEW_TRACES)
            decisions = total(found, DECISIONS)
            return found if received and decisions >= received else None

        telemetry = wait_for(
            "the tail sampling decisions", decided, ARRIVAL_TIMEOUT, run.collector.process.log
        )
        received = total(telemetry, NEW_TRACES)
        kept = total(telemetry, DECISIONS, sampled="true")
        dropped = total(telemetry, DECISIONS, sampled="false")
        # One trace per failed handshake kept; every good one (each order's, each
        # successful handshake's own) dropped.
        assert kept == run.rejected
        assert dropped == received - run.rejected
        assert dropped > run.accepted
        assert total(telemetry, POLICY_DECISIONS, policy="the-rest", sampled="true") == 0
        assert total(
            telemetry, POLICY_DECISIONS, policy="failed-tls-handshakes", sampled="true"
        ) == (run.rejected)

        by_type = wait_for_failed_handshakes(run)
        assert sum(map(len, by_type.values())) == run.rejected
        # ... and nothing else: no order, no successful handshake, no backend at all.
        assert run.jaeger.traces(service="frontend", operation="GET /order") == []
        assert (
            run.jaeger.traces(service="frontend", tags=tag_query(**{"tls.established": "true"}))
            == []
        )
        assert run.jaeger.services() == ["frontend"]

        # Span metrics are made before sampling: they still count every handshake.
        def counted(found: list[Sample]) -> bool:
            return handshake_counts(found, "traces_span_metrics_calls_total") == (
                run.accepted,
                run.rejected,
            )

        collector_metrics(run, counted)


def alert_metric_names() -> set[str]:
    """Every metric name that the expressions of ``examples/alerts.yaml`` use."""
    rules = yaml.safe_load((REPO / "examples" / "alerts.yaml").read_text())
    expressions = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    return {word for word in re.findall(r"[a-z_]+", expressions) if word.startswith("tls_")}
