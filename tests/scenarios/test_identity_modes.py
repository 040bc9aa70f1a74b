"""Identity modes: plain, hashed (keyed, correlatable) and omitted, alike in every signal."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import PKI, Instrumented, handshake_spans
from opentelemetry.instrumentation.mtls._signals.audit import AUDIT_LOGGER_NAME
from tlsrun import blocking

# What must not appear anywhere in hashed or omit mode: the client's names.
SECRETS = ("web-client", "web.example.org", "spiffe://example.org/ns/default/sa/web")


def capture(
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    **options: Any,
) -> str:
    """Run a good and an expired client; return every exported span, log and metric as text."""
    instrumented.off()
    exporter.clear()
    caplog.clear()
    reader = InMemoryMetricReader()
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER_NAME):
        instrumented(
            meter_provider=MeterProvider(metric_readers=[reader]), log_success=True, **options
        )
        try:
            blocking(pki.server_context(), pki.client_context(pki.client))
            blocking(pki.server_context(), pki.client_context(pki.expired_client))
        finally:
            instrumented.off()
    spans = [dict(span.attributes or {}) for span in exporter.get_finished_spans()]
    logs = [vars(record) for record in caplog.records if record.name == AUDIT_LOGGER_NAME]
    metrics = reader.get_metrics_data()
    return repr((spans, logs, metrics.to_json() if metrics else None))


def server_attributes(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return dict(handshake_spans(exporter, "server")[0].attributes or {})


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    yield caplog


def test_plain_mode_shows_the_identity(
    pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter, quiet: Any
) -> None:
    text = capture(pki, instrumented, exporter, quiet)
    assert all(secret in text for secret in SECRETS)  # control for the tests below


def test_hashed_mode_hides_names_but_correlates(
    pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter, quiet: Any
) -> None:
    text = capture(pki, instrumented, exporter, quiet, identity_mode="hashed", hash_key="k1")
    assert not [secret for secret in SECRETS if secret in text]
    first = server_attributes(exporter)
    assert str(first["tls.client.subject"]).startswith("hmac-sha256:")
    assert first["tls.client.hash.sha256"]  # the fingerprint names no one
    capture(pki, instrumented, exporter, quiet, identity_mode="hashed", hash_key="k1")
    again = server_attributes(exporter)
    assert again["tls.client.spiffe_id"] == first["tls.client.spiffe_id"]
    capture(pki, instrumented, exporter, quiet, identity_mode="hashed", hash_key="k2")
    other_key = server_attributes(exporter)
    assert other_key["tls.client.spiffe_id"] != first["tls.client.spiffe_id"]


def test_omit_mode_keeps_fingerprint_and_verify_result_only(
    pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter, quiet: Any
) -> None:
    text = capture(pki, instrumented, exporter, quiet, identity_mode="omit")
    assert not [secret for secret in SECRETS if secret in text]
    client_keys = {k for k in server_attributes(exporter) if k.startswith("tls.client.")}
    # The fingerprints, the verify result, and what the hello says of the server and of
    # the client's TLS stack (the name it asked for, JA4): none of them names the client.
    fingerprints = {
        "tls.client.hash.sha256",
        "tls.client.verify.result",
        "tls.client.server_name",
        "tls.client.ja4",
    }
    if sys.version_info >= (3, 13):
        fingerprints.add("tls.client.chain.hash.sha256")  # the chain's: they name no one
    assert client_keys == fingerprints


def test_hashed_mode_without_a_key_omits_and_warns(
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_MTLS_IDENTITY_MODE", "hashed")
    monkeypatch.delenv("OTEL_PYTHON_MTLS_HASH_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="opentelemetry.instrumentation.mtls"):
        text = capture(pki, instrumented, exporter, caplog)
        warnings = [r.getMessage() for r in caplog.records if "HASH_KEY" in r.getMessage()]
    assert len(warnings) == 1
    assert not [secret for secret in SECRETS if secret in text]


def test_invalid_mode_warns_and_stays_plain(
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_MTLS_IDENTITY_MODE", "scrambled")
    with caplog.at_level(logging.WARNING, logger="opentelemetry.instrumentation.mtls"):
        instrumented()
    (warning,) = [r.getMessage() for r in caplog.records if "IDENTITY_MODE" in r.getMessage()]
    assert "scrambled" in warning and "plain" in warning


def denied_request_text(
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    **options: Any,
) -> str:
    """A request the identity policy denies; every span, event and log record as text."""
    import httpx
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    from opentelemetry.instrumentation.mtls import MTLSMiddleware
    from servers import identity_app, uvicorn_server

    evil = pki.ca.issue("evil-client", uris=("spiffe://evil.test/ns/x/sa/y",))
    exporter.clear()
    caplog.clear()
    instrumented(spiffe_trust_domains="example.org", **options)
    app = OpenTelemetryMiddleware(
        MTLSMiddleware(identity_app),
        tracer_provider=instrumented.tracer_provider,
        exclude_spans=["receive"],
    )
    try:
        with (
            caplog.at_level(logging.INFO, logger=AUDIT_LOGGER_NAME),
            uvicorn_server(app, pki) as port,
            httpx.Client(verify=pki.client_context(evil), timeout=10) as http,
        ):
            http.get(f"https://localhost:{port}/")
    finally:
        instrumented.off()
    spans = [
        (dict(s.attributes or {}), [(e.name, dict(e.attributes or {})) for e in s.events])
        for s in exporter.get_finished_spans()
    ]
    logs = [(r.getMessage(), vars(r)) for r in caplog.records if r.name == AUDIT_LOGGER_NAME]
    assert [r for r in caplog.records if getattr(r, "event.name", "") == "tls.identity.denied"]
    return repr((spans, logs))


@pytest.mark.parametrize("mode", ["hashed", "omit"])
def test_denial_records_name_no_identity_in_hashed_and_omit_modes(
    mode: str,
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = denied_request_text(
        pki, instrumented, exporter, caplog, identity_mode=mode, hash_key="k"
    )
    for secret in ("evil.test", "evil-client"):
        assert secret not in text
    assert "spiffe_trust_domain" in text  # the rule that denied is still said


def test_denial_records_name_the_identity_in_plain_mode(
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = denied_request_text(pki, instrumented, exporter, caplog)
    assert "SPIFFE trust domain evil.test is not allowed" in text
