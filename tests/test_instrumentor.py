"""The instrumentor's life cycle, its options, and its promise never to break the host."""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.sslproto
import importlib.metadata
import logging
import ssl
from typing import Any

import pytest
import uvloop
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import opentelemetry.instrumentation.mtls as package
from conftest import PKI, handshake_spans
from opentelemetry.instrumentation.mtls import MTLSInstrumentor, _failsafe
from opentelemetry.instrumentation.mtls._ssl import record as _handshake
from tlsrun import blocking, on_loop

PATCHED: list[tuple[type, str]] = [
    (asyncio.base_events.BaseEventLoop, "create_server"),
    (OpenTelemetryMiddleware, "__init__"),
    (ssl.SSLSocket, "do_handshake"),
    (ssl.SSLObject, "do_handshake"),
    (asyncio.sslproto.SSLProtocol, "connection_made"),
    (asyncio.sslproto.SSLProtocol, "connection_lost"),
    (asyncio.sslproto.SSLProtocol, "_on_handshake_complete"),
    (asyncio.sslproto.SSLProtocol, "_check_handshake_timeout"),
]


def test_public_surface() -> None:
    assert sorted(package.__all__) == [
        "ClientIdentity",
        "MTLSInstrumentor",
        "MTLSMiddleware",
        "MTLSWSGIMiddleware",
        "__version__",
        "client_identity",
    ]
    assert all(hasattr(package, name) for name in package.__all__)
    entry_points = importlib.metadata.entry_points(group="opentelemetry_instrumentor", name="mtls")
    assert [ep.load() for ep in entry_points] == [MTLSInstrumentor]


def test_uninstrument_restores_the_identical_originals(tracer_provider: TracerProvider) -> None:
    originals = {(owner, name): vars(owner)[name] for owner, name in PATCHED}
    inherited = [(uvloop.Loop, "create_server"), (ssl.SSLContext, "load_cert_chain")]
    assert not [name for owner, name in inherited if name in vars(owner)]
    instrumentor = MTLSInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        assert all(vars(owner)[name] is not originals[owner, name] for owner, name in PATCHED)
        assert all(name in vars(owner) for owner, name in inherited)
    finally:
        instrumentor.uninstrument()
    assert all(vars(owner)[name] is originals[owner, name] for owner, name in PATCHED)
    assert not [name for owner, name in inherited if name in vars(owner)]


def test_instrument_twice_still_one_span_per_side(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    instrumentor = MTLSInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        blocking(pki.server_context(), pki.client_context(pki.client))
    finally:
        instrumentor.uninstrument()
    assert len(handshake_spans(exporter, "server")) == 1
    assert len(handshake_spans(exporter, "client")) == 1
    # Negative control: after uninstrument(), nothing is recorded.
    blocking(pki.server_context(), pki.client_context(pki.client))
    assert len(exporter.get_finished_spans()) == 2


@pytest.mark.usefixtures("instrumented")
def test_suppressed_instrumentation_records_nothing(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    with suppress_instrumentation():
        on_loop("asyncio", pki.server_context(), pki.client_context(pki.client))
        # The blocking server runs in a thread of its own, outside this context.
        blocking(pki.server_context(), pki.client_context(pki.client))
    assert handshake_spans(exporter, "client") == []
    assert len(handshake_spans(exporter, "server")) == 1
    exporter.clear()
    blocking(pki.server_context(), pki.client_context(pki.client))
    assert len(exporter.get_finished_spans()) == 2


def test_api_only_without_sdk_changes_nothing(pki: PKI) -> None:
    bare = blocking(pki.server_context(), pki.client_context(pki.untrusted_client))
    instrumentor = MTLSInstrumentor()
    instrumentor.instrument(tracer_provider=trace.NoOpTracerProvider())
    try:
        seen = blocking(pki.server_context(), pki.client_context(pki.untrusted_client))
        good = blocking(pki.server_context(), pki.client_context(pki.client))
    finally:
        instrumentor.uninstrument()
    assert seen == bare
    assert good.client == "ok TLSv1.3"


@pytest.fixture
def our_warnings(caplog: pytest.LogCaptureFixture) -> Any:
    _failsafe.reset()
    caplog.set_level(logging.DEBUG, logger="opentelemetry.instrumentation.mtls")

    def warnings() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "opentelemetry.instrumentation.mtls" and r.levelno >= logging.WARNING
        ]

    yield warnings
    _failsafe.reset()


@pytest.mark.usefixtures("instrumented")
def test_failing_certificate_parser_leaves_handshakes_alone(
    pki: PKI, monkeypatch: pytest.MonkeyPatch, our_warnings: Any
) -> None:
    bare = [blocking(pki.server_context(), pki.client_context(pki.client)) for _ in range(3)]

    def broken(der: bytes) -> Any:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(_handshake, "parse_certificate", broken)
    seen = [blocking(pki.server_context(), pki.client_context(pki.client)) for _ in range(3)]
    seen.append(on_loop("uvloop", pki.server_context(), pki.client_context(pki.client)))
    assert seen == [*bare, bare[0]]
    assert len(our_warnings()) == 1
    assert "parser bug" in (our_warnings()[0].exc_text or "")


def test_failing_tracer_leaves_handshakes_alone(pki: PKI, our_warnings: Any) -> None:
    class BrokenTracer(trace.NoOpTracer):
        def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
            raise RuntimeError("tracer bug")

    class BrokenProvider(trace.NoOpTracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
            return BrokenTracer()

    bare = blocking(pki.server_context(), pki.client_context(pki.expired_client))
    instrumentor = MTLSInstrumentor()
    instrumentor.instrument(tracer_provider=BrokenProvider())
    try:
        seen = [
            blocking(pki.server_context(), pki.client_context(pki.expired_client)),
            blocking(pki.server_context(), pki.client_context(pki.expired_client)),
        ]
        loop_seen = on_loop("asyncio", pki.server_context(), pki.client_context(pki.client))
    finally:
        instrumentor.uninstrument()
    assert seen == [bare, bare]
    assert loop_seen.client_read == "b'hello'"
    # Our failure is said once; and once, that such a provider's spans get no identity.
    failures, unreached = [], []
    for record in our_warnings():
        (failures if "failed in" in record.msg else unreached).append(record)
    assert len(failures) == 1
    assert "tracer bug" in (failures[0].exc_text or "")
    assert [r.getMessage() for r in unreached] == [
        "mTLS identity could not be attached to server spans made by "
        f"{__name__}.{BrokenProvider.__qualname__}: "
        "the tracer provider given to instrument() is not the OpenTelemetry SDK's"
    ]


def test_capture_certificate_by_keyword_and_environment(
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def captured() -> dict[str, Any]:
        instrumentor = MTLSInstrumentor()
        exporter.clear()
        instrumentor.instrument(tracer_provider=tracer_provider)
        try:
            blocking(pki.server_context(), pki.client_context(pki.client))
        finally:
            instrumentor.uninstrument()
        return dict(handshake_spans(exporter, "server")[0].attributes or {})

    assert "tls.client.certificate" not in captured()  # off by default
    monkeypatch.setenv("OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE", "true")
    monkeypatch.setenv("OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE_CHAIN", "true")
    attrs = captured()
    pem = ssl.DER_cert_to_PEM_cert(pki.client.der)
    assert attrs["tls.client.certificate"] == pem
    chain = attrs["tls.client.certificate_chain"]
    assert isinstance(chain, tuple) and chain[0] == pem
    assert "PRIVATE KEY" not in str(attrs)


def test_invalid_environment_value_warns_once_and_uses_default(
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE", "maybe")
    instrumentor = MTLSInstrumentor()
    with caplog.at_level(logging.WARNING, logger="opentelemetry.instrumentation.mtls"):
        instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        blocking(pki.server_context(), pki.client_context(pki.client))
    finally:
        instrumentor.uninstrument()
    messages = [r.getMessage() for r in caplog.records if "MTLS" in r.getMessage()]
    assert len(messages) == 1 and "OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE" in messages[0]
    assert "tls.client.certificate" not in (handshake_spans(exporter, "server")[0].attributes or {})
