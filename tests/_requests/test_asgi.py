"""The client's identity on ASGI request spans, under real servers, loops and protocols."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest
from fastapi import Request  # at module level: FastAPI resolves the annotation here
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind

from conftest import (
    FULL_ONLY,
    LAZY_RESOLUTION_CASES,
    LEAN,
    PKI,
    Instrumented,
    decision_counts,
    handshake_spans,
    sampled_instrumentation,
)
from opentelemetry.instrumentation.mtls import MTLSMiddleware, client_identity
from opentelemetry.instrumentation.mtls._requests.asgi import resolution_of
from pki import Leaf
from servers import answer_json, hypercorn_server, uvicorn_server

pytestmark = pytest.mark.usefixtures("instrumented")


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer with what the request knows of its client: identity and TLS extension."""
    if scope["type"] == "lifespan":
        # The scope must reach us untouched: no TLS extension, no identity.
        assert "tls" not in (scope.get("extensions") or {})
        assert client_identity(scope) is None
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    identity = client_identity(scope)
    body = json.dumps(
        {
            "subject": identity.subject if identity else None,
            "source": identity.source if identity else None,
            "tls": (scope.get("extensions") or {}).get("tls"),
            "http_version": scope.get("http_version"),
        }
    ).encode()
    await answer_json(scope, receive, send, body)


def instrumented_app(tracer_provider: TracerProvider, *, middleware: bool = True) -> Any:
    inner: Any = MTLSMiddleware(echo_app) if middleware else echo_app
    return OpenTelemetryMiddleware(
        inner, tracer_provider=tracer_provider, exclude_spans=["receive", "send"]
    )


Server = Callable[[Any, PKI], AbstractContextManager[int]]
SERVERS: dict[str, Server] = {
    "uvicorn-asyncio": lambda app, pki: uvicorn_server(app, pki, loop="asyncio"),
    "uvicorn-uvloop": lambda app, pki: uvicorn_server(app, pki, loop="uvloop"),
    "hypercorn": hypercorn_server,
}


def client(pki: PKI, cert: Leaf | None, **options: Any) -> httpx.Client:
    return httpx.Client(verify=pki.client_context(cert), timeout=10, **options)


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


@pytest.fixture(params=list(SERVERS))
def serve(request: pytest.FixtureRequest) -> Server:
    return SERVERS[request.param]


def test_keep_alive_requests_share_one_handshake(
    serve: Server, pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    with serve(instrumented_app(tracer_provider), pki) as port, client(pki, pki.client) as http:
        answers = [http.get(f"https://localhost:{port}/{i}").json() for i in range(20)]
    assert {a["subject"] for a in answers} == {"CN=web-client,O=mTLS tests"}
    (handshake,) = handshake_spans(exporter, "server")
    spans = server_spans(exporter)
    assert len(spans) == 20
    for span in spans:
        attributes = span.attributes or {}
        assert attributes["tls.client.subject"] == "CN=web-client,O=mTLS tests"
        assert attributes["tls.client.spiffe_id"] == "spiffe://example.org/ns/default/sa/web"
        assert attributes["tls.client.identity.source"] == "handshake"
        assert "tls.protocol.version" not in attributes  # lean: it stays on the handshake
        assert [link.context.span_id for link in span.links] == [handshake.context.span_id]


def test_two_clients_are_never_mixed_up(
    serve: Server, pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    other = pki.ca.issue("other-client", uris=("spiffe://example.org/ns/other/sa/batch",))
    with (
        serve(instrumented_app(tracer_provider), pki) as port,
        client(pki, pki.client) as first,
        client(pki, other) as second,
    ):
        seen = []
        for i in range(10):
            http, expected = (first, "web-client") if i % 2 else (second, "other-client")
            answer = http.get(f"https://localhost:{port}/{expected}").json()
            seen.append((expected, answer["subject"]))
    assert all(subject == f"CN={expected},O=mTLS tests" for expected, subject in seen)
    by_target = {
        (s.attributes or {}).get("url.path", (s.attributes or {}).get("http.target")): (
            s.attributes or {}
        )["tls.client.subject"]
        for s in server_spans(exporter)
    }
    assert by_target == {
        "/web-client": "CN=web-client,O=mTLS tests",
        "/other-client": "CN=other-client,O=mTLS tests",
    }


@pytest.mark.parametrize("mode", ["lean", "full"])
def test_request_attributes_are_lean_by_default_and_full_when_asked(
    mode: str,
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    if mode == "full":
        instrumented(request_attributes="full")
    app = instrumented_app(tracer_provider, middleware=False)  # the zero-code path
    with uvicorn_server(app, pki) as port, client(pki, pki.client) as http:
        for i in range(2):
            http.get(f"https://localhost:{port}/{i}")
    (handshake,) = handshake_spans(exporter, "server")
    shake = handshake.attributes or {}
    for span in server_spans(exporter):
        attributes = span.attributes or {}
        ours = {name for name in attributes if name.startswith("tls.")}
        expected = LEAN | FULL_ONLY if mode == "full" else LEAN
        assert ours == expected
        # The same values as the linked handshake span's, wherever it has them.
        assert all(attributes[name] == shake[name] for name in ours & set(shake))
        assert [link.context.span_id for link in span.links] == [handshake.context.span_id]


async def probe_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer with the request's identity and whether its span attributes were built."""
    resolution = resolution_of(scope)
    assert resolution is not None and resolution.connection is not None
    body = json.dumps(
        {
            "subject": resolution.identity.subject if resolution.identity else None,
            "built": "attributes" in resolution.connection.cache,
        }
    ).encode()
    await answer_json(scope, receive, send, body)


@pytest.mark.parametrize("sampled", [False, True])
def test_a_sampled_out_request_builds_no_attributes_but_keeps_its_identity_and_counts(
    sampled: bool, pki: PKI, exporter: InMemorySpanExporter, instrumented: Instrumented
) -> None:
    provider = TracerProvider(**({} if sampled else {"sampler": ALWAYS_OFF}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    instrumented(
        tracer_provider=provider,
        meter_provider=MeterProvider([reader]),
        spiffe_trust_domains="example.org",
        request_attributes="full",
    )
    app = OpenTelemetryMiddleware(
        probe_app, tracer_provider=provider, exclude_spans=["receive", "send"]
    )
    with uvicorn_server(app, pki) as port, client(pki, pki.client) as http:
        answers = [http.get(f"https://localhost:{port}/{i}").json() for i in range(3)]
    # The identity is the request's whether its span records or not (the application,
    # the policy and its counter read it); only a recording span's attributes are built.
    assert answers == [{"subject": "CN=web-client,O=mTLS tests", "built": sampled}] * 3
    assert decision_counts(reader) == {"allowed": 3}
    spans = server_spans(exporter)
    assert len(spans) == (3 if sampled else 0)
    assert all((s.attributes or {})["tls.client.subject"] for s in spans)


async def lazy_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer with whether the identity was resolved before the application asked for it."""
    resolved_before = "otel.mtls.resolution" in scope
    extension = (scope.get("extensions") or {}).get("tls")
    identity = client_identity(scope)
    body = json.dumps(
        {
            "resolved_before": resolved_before,
            "extension": extension["client_cert_name"] if extension else None,
            "subject": identity.subject if identity else None,
        }
    ).encode()
    await answer_json(scope, receive, send, body)


@LAZY_RESOLUTION_CASES
def test_a_sampled_out_request_resolves_nothing_unless_something_records_it(
    sampled: bool,
    header: bool,
    eager: bool,
    pki: PKI,
    exporter: InMemorySpanExporter,
    instrumented: Instrumented,
) -> None:
    provider, reader = sampled_instrumentation(sampled, exporter, instrumented)
    app = OpenTelemetryMiddleware(lazy_app, tracer_provider=provider, exclude_spans=["receive"])
    headers = {"x-forwarded-client-cert": 'Subject="CN=admin"'} if header else {}
    with uvicorn_server(app, pki) as port, client(pki, pki.client, headers=headers) as http:
        answers = [http.get(f"https://localhost:{port}/{i}").json() for i in range(3)]
    subject = "CN=web-client,O=mTLS tests"
    # Without a policy, a revocation check or headers to report, a request whose span is
    # sampled out resolves its identity only when the application asks; the TLS extension
    # is filled either way, and the identity is the connection's whenever it is asked for.
    expected = {"resolved_before": eager, "extension": subject, "subject": subject}
    assert answers == [expected] * 3
    # A client's forged identity header is reported whether or not its span records.
    assert decision_counts(reader) == ({"denied": 3} if header else {})
    assert len(server_spans(exporter)) == (3 if sampled else 0)


def raw_request(pki: PKI, port: int, cert: Leaf | None, client_port: int) -> dict[str, Any]:
    """One HTTP/1.1 request from a fixed client port; the socket is reset, not closed."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", client_port))
    sock.settimeout(10)
    # Closed with RST instead of FIN: no TIME_WAIT, so the same port can connect again.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.connect(("127.0.0.1", port))
    with pki.client_context(cert).wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    result: dict[str, Any] = json.loads(response.split(b"\r\n\r\n", 1)[1])
    return result


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_port_reuse_never_shows_the_previous_identity(
    loop: str, pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    other = pki.ca.issue("second-client")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        client_port = probe.getsockname()[1]
    app = instrumented_app(tracer_provider)
    with uvicorn_server(app, pki, loop=loop, cert_reqs=ssl.CERT_OPTIONAL) as port:
        answers = [
            raw_request(pki, port, cert, client_port) for cert in (pki.client, other, None, other)
        ]
    assert [a["subject"] for a in answers] == [
        "CN=web-client,O=mTLS tests",
        "CN=second-client,O=mTLS tests",
        None,
        "CN=second-client,O=mTLS tests",
    ]
    names = [(s.attributes or {}).get("tls.client.subject") for s in server_spans(exporter)]
    assert names == [
        "CN=web-client,O=mTLS tests",
        "CN=second-client,O=mTLS tests",
        None,
        "CN=second-client,O=mTLS tests",
    ]
    hashes = [(s.attributes or {}).get("tls.client.hash.sha256") for s in server_spans(exporter)]
    assert [h is not None for h in hashes] == [True, True, False, True]
    assert hashes[1] == hashes[3] != hashes[0]


def test_http2_streams_share_one_handshake(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async def many(port: int) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(
            verify=pki.client_context(pki.client), http2=True, timeout=10
        ) as http:
            responses = await asyncio.gather(
                *(http.get(f"https://localhost:{port}/{i}") for i in range(12))
            )
        assert {r.http_version for r in responses} == {"HTTP/2"}
        return [r.json() for r in responses]

    with hypercorn_server(instrumented_app(tracer_provider), pki) as port:
        answers = asyncio.run(many(port))
    assert {a["subject"] for a in answers} == {"CN=web-client,O=mTLS tests"}
    assert {a["http_version"] for a in answers} == {"2"}
    (handshake,) = handshake_spans(exporter, "server")
    assert (handshake.attributes or {})["tls.next_protocol"] == "h2"
    spans = server_spans(exporter)
    assert len(spans) == 12
    assert {link.context.span_id for s in spans for link in s.links} == {handshake.context.span_id}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_websocket_over_tls(
    loop: str, pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    from websockets.sync.client import connect

    with uvicorn_server(instrumented_app(tracer_provider), pki, loop=loop) as port:
        ctx = pki.client_context(pki.client)
        with connect(f"wss://localhost:{port}/ws", ssl=ctx) as ws:
            answer = json.loads(ws.recv(timeout=10))
    assert answer["subject"] == "CN=web-client,O=mTLS tests"
    (span,) = server_spans(exporter)
    assert (span.attributes or {})["tls.client.subject"] == "CN=web-client,O=mTLS tests"
    assert len(span.links) == 1


def test_tls_extension_field_by_field(
    serve: Server, pki: PKI, tracer_provider: TracerProvider
) -> None:
    with serve(instrumented_app(tracer_provider), pki) as port, client(pki, pki.client) as http:
        tls = http.get(f"https://localhost:{port}/").json()["tls"]
    assert tls["server_cert"] == ssl.DER_cert_to_PEM_cert(pki.server.der)
    assert tls["client_cert_chain"][0] == ssl.DER_cert_to_PEM_cert(pki.client.der)
    assert tls["client_cert_name"] == "CN=web-client,O=mTLS tests"
    assert tls["client_cert_error"] is None
    assert tls["tls_version"] == 0x0304
    assert tls["cipher_suite"] in {0x1301, 0x1302, 0x1303}


def test_plain_http_and_lifespan_pass_through(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    with (
        uvicorn_server(instrumented_app(tracer_provider), pki, tls=False) as port,
        httpx.Client(timeout=10) as http,
    ):
        answer = http.get(f"http://127.0.0.1:{port}/").json()
    assert answer["subject"] is None and answer["tls"] is None
    (span,) = server_spans(exporter)
    assert not [k for k in (span.attributes or {}) if k.startswith("tls.")]
    assert span.links == ()


def fastapi_app(tracer_provider: TracerProvider, hook_calls: list[str]) -> Any:
    from fastapi import FastAPI
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    app = FastAPI()

    @app.get("/whoami")
    def whoami(request: Request) -> dict[str, Any]:
        identity = client_identity(request.scope)
        return {"spiffe_id": identity.spiffe_id if identity else None}

    def server_request_hook(span: Any, scope: dict[str, Any]) -> None:
        hook_calls.append(scope["path"])
        span.set_attribute("user.hook", True)

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracer_provider,
        server_request_hook=server_request_hook,
        exclude_spans=["receive", "send"],
    )
    return app


def test_fastapi_instrumentation_is_enriched_with_no_code(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    hook_calls: list[str] = []
    app = fastapi_app(tracer_provider, hook_calls)
    with uvicorn_server(app, pki, loop="uvloop") as port, client(pki, pki.client) as http:
        answer = http.get(f"https://localhost:{port}/whoami").json()
    assert answer == {"spiffe_id": "spiffe://example.org/ns/default/sa/web"}
    assert hook_calls == ["/whoami"]  # the user's own hook still runs
    (span,) = server_spans(exporter)
    attributes = span.attributes or {}
    assert attributes["user.hook"] is True
    assert attributes["tls.client.spiffe_id"] == "spiffe://example.org/ns/default/sa/web"
    (handshake,) = handshake_spans(exporter, "server")
    assert [link.context.span_id for link in span.links] == [handshake.context.span_id]


def test_fastapi_without_mtls_instrumentation_is_not_enriched(
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    instrumented.off()  # negative control: the same app, no MTLSInstrumentor
    hook_calls: list[str] = []
    app = fastapi_app(tracer_provider, hook_calls)
    with uvicorn_server(app, pki) as port, client(pki, pki.client) as http:
        assert http.get(f"https://localhost:{port}/whoami").json() == {"spiffe_id": None}
    assert hook_calls == ["/whoami"]
    (span,) = server_spans(exporter)
    assert not [k for k in (span.attributes or {}) if k.startswith("tls.")]
