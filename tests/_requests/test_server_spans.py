"""The identity on every server span, whichever instrumentation made it (ASGI servers)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer, SpanKind
from opentelemetry.trace import TracerProvider as APITracerProvider
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import PKI, Instrumented, handshake_spans, kept_records
from opentelemetry.instrumentation.mtls import client_identity
from opentelemetry.instrumentation.mtls._requests import server_spans
from opentelemetry.instrumentation.mtls._requests.identity import Resolution
from pki import Leaf
from servers import hypercorn_server, uvicorn_server

pytestmark = pytest.mark.usefixtures("instrumented")

SUBJECT = "CN=web-client,O=mTLS tests"
WARNING = "mTLS identity could not be attached to server spans made by"


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    server_spans.reset_warnings()
    yield
    server_spans.reset_warnings()


def client(pki: PKI, cert: Leaf | None) -> httpx.Client:
    return httpx.Client(verify=pki.client_context(cert), timeout=10)


def server_spans_of(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def identity_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [
        s for s in server_spans_of(exporter) if "tls.client.identity.source" in (s.attributes or {})
    ]


def fastapi_native(tracer_provider: TracerProvider) -> FastAPI:
    """FastAPI 0.165+'s own telemetry: its server span, no contrib instrumentation."""
    app = FastAPI(telemetry={"tracer_provider": tracer_provider, "metrics": False, "logs": False})

    @app.get("/whoami/{n}")
    def whoami(n: int, request: Request) -> dict[str, Any]:
        identity = client_identity(request.scope)
        return {"n": n, "subject": identity.subject if identity else None}

    return app


def requires_native_telemetry() -> None:
    pytest.importorskip("fastapi.telemetry", reason="FastAPI has no telemetry of its own")


@pytest.mark.parametrize("serve", ["uvicorn", "hypercorn"])
def test_fastapi_native_spans_get_the_identity_once_per_request(
    serve: str, pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    requires_native_telemetry()
    app = fastapi_native(tracer_provider)
    server = uvicorn_server(app, pki) if serve == "uvicorn" else hypercorn_server(app, pki)
    with server as port, client(pki, pki.client) as http:
        answers = [http.get(f"https://localhost:{port}/whoami/{i}").json() for i in range(5)]
    assert [a["subject"] for a in answers] == [SUBJECT] * 5
    (handshake,) = handshake_spans(exporter, "server")
    spans = server_spans_of(exporter)
    assert len(spans) == 5  # one keep-alive connection, five requests
    for span in spans:
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "fastapi"
        attributes = span.attributes or {}
        assert attributes["tls.client.subject"] == SUBJECT
        assert attributes["tls.client.identity.source"] == "handshake"
        assert [link.context.span_id for link in span.links] == [handshake.context.span_id]
    # FastAPI's own operation spans (INTERNAL) are left alone.
    internal = [s for s in exporter.get_finished_spans() if s.name.startswith("fastapi.")]
    assert internal
    assert not [s for s in internal if "tls.client.identity.source" in (s.attributes or {})]


def test_fastapi_with_contrib_instrumentation_is_enriched_once(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    app = fastapi_native(tracer_provider)
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=tracer_provider, exclude_spans=["receive", "send"]
    )
    with uvicorn_server(app, pki) as port, client(pki, pki.client) as http:
        for i in range(3):
            assert http.get(f"https://localhost:{port}/whoami/{i}").json()["subject"] == SUBJECT
    spans = server_spans_of(exporter)
    assert len(spans) == 3  # FastAPI steps back when contrib's middleware is in its stack
    for span in spans:
        assert (span.attributes or {})["tls.client.subject"] == SUBJECT
        assert len(span.links) == 1


def starlette_app(tracer_provider: TracerProvider) -> Starlette:
    telemetry = pytest.importorskip("starlette.middleware.opentelemetry")

    async def whoami(request: Any) -> JSONResponse:
        identity = client_identity(request.scope)
        return JSONResponse({"subject": identity.subject if identity else None})

    return Starlette(
        routes=[Route("/whoami", whoami)],
        middleware=[Middleware(telemetry.OpenTelemetryMiddleware, tracer_provider=tracer_provider)],
    )


@pytest.mark.parametrize("with_contrib", [False, True], ids=["native", "native-in-contrib"])
def test_starlette_native_spans_nested_or_not_are_enriched_once(
    with_contrib: bool,
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    app: Any = starlette_app(tracer_provider)
    if with_contrib:
        app = OpenTelemetryMiddleware(
            app, tracer_provider=tracer_provider, exclude_spans=["receive", "send"]
        )
    with uvicorn_server(app, pki) as port, client(pki, pki.client) as http:
        for _ in range(3):
            assert http.get(f"https://localhost:{port}/whoami").json()["subject"] == SUBJECT
    spans = server_spans_of(exporter)
    assert len(spans) == (6 if with_contrib else 3)
    enriched = identity_spans(exporter)
    assert len(enriched) == 3  # one per request: the outermost server span
    expected = "opentelemetry.instrumentation.asgi" if with_contrib else "starlette"
    assert {s.instrumentation_scope.name for s in enriched if s.instrumentation_scope} == {expected}
    assert all(len(s.links) == 1 for s in enriched)
    assert all(not s.links for s in spans if s not in enriched)


def own_span_app(tracer_provider: TracerProvider) -> Any:
    tracer = tracer_provider.get_tracer("the.application")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        with (
            tracer.start_as_current_span("outer", kind=SpanKind.SERVER),
            tracer.start_as_current_span("work"),
            tracer.start_as_current_span("nested", kind=SpanKind.SERVER),
        ):
            body = b"ok"
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def test_the_applications_own_server_span_and_not_its_nested_one(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    with uvicorn_server(own_span_app(tracer_provider), pki) as port, client(pki, pki.client) as h:
        for _ in range(2):
            assert h.get(f"https://localhost:{port}/").status_code == 200
    spans = exporter.get_finished_spans()
    outer = [s for s in spans if s.name == "outer"]
    nested = [s for s in spans if s.name == "nested"]
    assert len(outer) == len(nested) == 2
    assert all((s.attributes or {})["tls.client.subject"] == SUBJECT for s in outer)
    assert all(len(s.links) == 1 for s in outer)
    assert all(not s.attributes and not s.links for s in nested)


def test_no_certificate_on_cert_optional_and_a_foreign_ca(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    requires_native_telemetry()
    app = fastapi_native(tracer_provider)
    with uvicorn_server(app, pki, cert_reqs=ssl.CERT_OPTIONAL) as port:
        with client(pki, None) as http:
            assert http.get(f"https://localhost:{port}/whoami/1").json()["subject"] is None
        with client(pki, pki.untrusted_client) as http, pytest.raises(httpx.HTTPError):
            http.get(f"https://localhost:{port}/whoami/2")
    (span,) = server_spans_of(exporter)  # the foreign CA's handshake failed: no request
    attributes = span.attributes or {}
    # Lean: with no certificate the source alone; the verify result is the handshake's.
    assert attributes["tls.client.identity.source"] == "handshake"
    assert "tls.client.verify.result" not in attributes
    assert "tls.client.subject" not in attributes
    (link,) = span.links
    (linked,) = [
        s for s in handshake_spans(exporter, "server") if s.context.span_id == link.context.span_id
    ]
    assert (linked.attributes or {})["tls.client.verify.result"] == "none"
    failed = [
        s
        for s in handshake_spans(exporter, "server")
        if s.attributes and not s.attributes["tls.established"]
    ]
    assert [(s.attributes or {})["error.type"] for s in failed] == ["certificate_authority_invalid"]


def test_spans_where_no_connection_is_known_are_left_alone(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    requires_native_telemetry()
    with kept_records("opentelemetry.instrumentation.mtls", logging.WARNING) as records:
        # A plaintext server (not followed without trusted proxies), and a span of no server.
        with (
            uvicorn_server(fastapi_native(tracer_provider), pki, tls=False) as port,
            httpx.Client(timeout=10) as http,
        ):
            assert http.get(f"http://127.0.0.1:{port}/whoami/1").status_code == 200
        tracer_provider.get_tracer("elsewhere").start_span("job", kind=SpanKind.SERVER).end()
    spans = server_spans_of(exporter)
    assert len(spans) == 2
    assert all(not s.links for s in spans)
    assert all(not [k for k in (s.attributes or {}) if k.startswith("tls.")] for s in spans)
    assert not [r for r in records if WARNING in r.getMessage()]


def test_a_server_span_already_current_gets_the_identity_when_the_request_opens(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """The interface for integrations whose span starts first (gRPC, aiohttp)."""
    resolution = Resolution(None, None, {"tls.client.identity.source": "test"})
    calls: list[int] = []

    def resolve() -> Resolution:
        calls.append(1)
        return resolution

    tracer = tracer_provider.get_tracer("an.integration")
    with tracer.start_as_current_span("call", kind=SpanKind.SERVER):
        token = server_spans.begin(resolve)
        try:
            with tracer.start_as_current_span("inner", kind=SpanKind.SERVER):
                pass
            assert server_spans.opened() is resolution
        finally:
            server_spans.end(token)
    assert server_spans.opened() is None
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    assert (by_name["call"].attributes or {})["tls.client.identity.source"] == "test"
    assert "tls.client.identity.source" not in (by_name["inner"].attributes or {})
    assert calls == [1]


def test_a_request_opened_before_its_span_enriches_the_next_server_span_only(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    resolution = Resolution(None, None, {"tls.client.identity.source": "test"})
    tracer = tracer_provider.get_tracer("an.integration")
    token = server_spans.begin(lambda: resolution)
    try:
        tracer.start_span("client call", kind=SpanKind.CLIENT).end()
        tracer.start_span("first", kind=SpanKind.SERVER).end()
        tracer.start_span("second", kind=SpanKind.SERVER).end()
    finally:
        server_spans.end(token)
    tracer.start_span("after", kind=SpanKind.SERVER).end()
    enriched = [s.name for s in exporter.get_finished_spans() if s.attributes]
    assert enriched == ["first"]


class VendorProvider(APITracerProvider):
    """A tracer provider that is not the SDK's: its spans cannot be reached."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> NoOpTracer:
        return NoOpTracer()


def test_a_provider_that_is_not_the_sdks_is_named_once(instrumented: Instrumented) -> None:
    with kept_records("opentelemetry.instrumentation.mtls", logging.WARNING) as records:
        instrumented(tracer_provider=VendorProvider())
        instrumented(tracer_provider=VendorProvider())
    warnings = [r.getMessage() for r in records if WARNING in r.getMessage()]
    assert len(warnings) == 1
    assert "VendorProvider" in warnings[0]


def test_a_server_span_on_a_known_connection_outside_any_request_is_named(
    pki: PKI, tracer_provider: TracerProvider
) -> None:
    """An asyncio server that opens no requests: its spans are reached, but warned about."""
    tracer = tracer_provider.get_tracer("a.custom.server")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        tracer.start_span("request", kind=SpanKind.SERVER).end()
        writer.write(b"ok\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=pki.server_context())
        port = server.sockets[0].getsockname()[1]
        context = pki.client_context(pki.client)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
        writer.write(b"hello\n")
        assert await reader.readline() == b"ok\n"
        writer.close()
        server.close()
        await server.wait_closed()

    with kept_records("opentelemetry.instrumentation.mtls", logging.WARNING) as records:
        thread = threading.Thread(target=asyncio.run, args=(main(),))
        thread.start()
        thread.join(20)
    warnings = [r.getMessage() for r in records if WARNING in r.getMessage()]
    reason = "its server does not open requests for them (see docs/servers.md)"
    assert warnings == [f"{WARNING} a.custom.server: {reason}"]


def test_the_global_provider_is_reachable_under_the_sdk() -> None:
    assert server_spans.reachable(trace.get_tracer_provider())
    assert server_spans.reachable(TracerProvider())
    assert not server_spans.reachable(VendorProvider())
