"""The client's identity on aiohttp server request spans: real aiohttp servers, real clients.

Each server runs aiohttp's own ``AppRunner`` and ``SockSite`` with ``ssl_context=`` on a
loop of its own; its request spans come from opentelemetry-instrumentation-aiohttp-server.
Clients are httpx, aiohttp's own client and websockets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conftest import PKI, Instrumented, handshake_spans
from opentelemetry.instrumentation.mtls import client_identity
from pki import Leaf

pytestmark = pytest.mark.usefixtures("instrumented")

SUBJECT = "CN=web-client,O=mTLS tests"
SPIFFE_ID = "spiffe://example.org/ns/default/sa/web"
Middleware = Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]], Any]


async def whoami(request: web.Request) -> web.StreamResponse:
    identity = client_identity(request)
    return web.json_response(
        {
            "subject": identity.subject if identity else None,
            "source": identity.source if identity else None,
        }
    )


async def websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    identity = client_identity(request)
    await ws.send_str(json.dumps({"subject": identity.subject if identity else None}))
    await ws.close()
    return ws


def application(*middlewares: Middleware) -> web.Application:
    app = web.Application(middlewares=list(middlewares))
    app.router.add_get("/ws", websocket)
    app.router.add_get("/{tail:.*}", whoami)
    return app


@contextmanager
def aiohttp_server(ssl_context: ssl.SSLContext | None, *middlewares: Middleware) -> Iterator[int]:
    """Serve :func:`application` on 127.0.0.1 from a loop in a thread; yield the port."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(application(*middlewares))
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        # Connections the clients closed last may still be closing their transports:
        # let them finish on the loop, or they are collected unclosed (ResourceWarning).
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        sock.close()


@pytest.fixture
def contrib(tracer_provider: TracerProvider, instrumented: Instrumented) -> Iterator[None]:
    """opentelemetry-instrumentation-aiohttp-server's spans on top of ours, torn down first."""
    with contrib_spans(tracer_provider):
        yield


@contextmanager
def contrib_spans(tracer_provider: TracerProvider) -> Iterator[None]:
    AioHttpServerInstrumentor().instrument(tracer_provider=tracer_provider)
    try:
        yield
    finally:
        AioHttpServerInstrumentor().uninstrument()


def client(pki: PKI, cert: Leaf | None) -> httpx.Client:
    return httpx.Client(verify=pki.client_context(cert), timeout=10)


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


@pytest.mark.usefixtures("contrib")
def test_keep_alive_requests_share_one_handshake(pki: PKI, exporter: InMemorySpanExporter) -> None:
    with aiohttp_server(pki.server_context()) as port, client(pki, pki.client) as http:
        answers = [http.get(f"https://localhost:{port}/{i}").json() for i in range(10)]
    assert answers == [{"subject": SUBJECT, "source": "handshake"}] * 10
    (handshake,) = handshake_spans(exporter, "server")
    spans = server_spans(exporter)
    assert len(spans) == 10
    for span in spans:
        attrs = attributes(span)
        assert attrs["tls.client.subject"] == SUBJECT
        assert attrs["tls.client.spiffe_id"] == SPIFFE_ID
        assert attrs["tls.client.identity.source"] == "handshake"
        assert "tls.protocol.version" not in attrs  # lean: the session stays on the handshake
        assert [link.context.span_id for link in span.links] == [handshake.context.span_id]


@pytest.mark.usefixtures("contrib")
def test_aiohttp_client_and_websocket(pki: PKI, exporter: InMemorySpanExporter) -> None:
    async def talk(port: int) -> tuple[list[Any], Any]:
        connector = aiohttp.TCPConnector(ssl=pki.client_context(pki.client))
        async with aiohttp.ClientSession(connector=connector) as session:
            answers = []
            for i in range(3):
                async with session.get(f"https://localhost:{port}/{i}") as response:
                    answers.append(await response.json())
            async with session.ws_connect(f"wss://localhost:{port}/ws") as ws:
                message = json.loads(await ws.receive_str())
        # aiohttp closes a session's TLS transports on later loop iterations: give them
        # those before asyncio.run closes the loop (aiohttp's "graceful shutdown" advice).
        await asyncio.sleep(0.25)
        return answers, message

    with aiohttp_server(pki.server_context()) as port:
        answers, message = asyncio.run(talk(port))
    assert [a["subject"] for a in answers] == [SUBJECT] * 3
    assert message == {"subject": SUBJECT}
    spans = server_spans(exporter)
    assert len(spans) == 4
    assert {attributes(s)["tls.client.subject"] for s in spans} == {SUBJECT}
    (handshake,) = handshake_spans(exporter, "server")  # one keep-alive connection
    assert {link.context.span_id for s in spans for link in s.links} == {handshake.context.span_id}


async def forwarded_for(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """What aiohttp-remotes' X-Forwarded-For middlewares do: a clone with another remote."""
    claimed = request.headers.get("X-Forwarded-For")
    return await handler(request.clone(remote=claimed) if claimed else request)


forwarded_for.__middleware_version__ = 1  # type: ignore[attr-defined]


@pytest.mark.usefixtures("contrib")
def test_forwarded_addresses_never_name_another_connection(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    other = pki.ca.issue("other-client")
    with (
        aiohttp_server(pki.server_context(), forwarded_for) as port,
        client(pki, pki.client) as web_client,
        client(pki, other) as other_client,
    ):
        web_client.get(f"https://localhost:{port}/first")  # the connection to be named
        (handshake,) = handshake_spans(exporter, "server")
        victim = attributes(handshake)
        address = f"{victim['client.address']}:{victim['client.port']}"
        claims = {
            "X-Forwarded-For": str(victim["client.address"]),
            "Forwarded": f'for="{address}";proto=https',
            "X-Real-IP": str(victim["client.address"]),
        }
        answers = [
            other_client.get(f"https://localhost:{port}/claim", headers=claims).json()
            for _ in range(3)
        ]
    assert [a["subject"] for a in answers] == ["CN=other-client,O=mTLS tests"] * 3
    claimed = [s for s in server_spans(exporter) if s.name.endswith("{tail}") and s is not None]
    names = [attributes(s)["tls.client.subject"] for s in claimed]
    assert names == [SUBJECT] + ["CN=other-client,O=mTLS tests"] * 3


@pytest.mark.usefixtures("contrib")
def test_optional_client_certificates(pki: PKI, exporter: InMemorySpanExporter) -> None:
    context = pki.server_context(ssl.CERT_OPTIONAL)
    with aiohttp_server(context) as port:
        with client(pki, None) as http:
            anonymous = http.get(f"https://localhost:{port}/").json()
        with client(pki, pki.untrusted_client) as http, pytest.raises(httpx.HTTPError):
            http.get(f"https://localhost:{port}/")  # presented, so verified: rejected
    assert anonymous == {"subject": None, "source": None}
    (span,) = server_spans(exporter)
    attrs = attributes(span)
    # Lean: the source says where the (absent) identity was looked for; the verify
    # result stays on the linked handshake span.
    assert attrs["tls.client.identity.source"] == "handshake"
    assert "tls.client.subject" not in attrs
    assert "tls.client.verify.result" not in attrs
    (link,) = span.links
    (linked,) = [
        h for h in handshake_spans(exporter, "server") if h.context.span_id == link.context.span_id
    ]
    assert attributes(linked)["tls.client.verify.result"] == "none"


@pytest.mark.usefixtures("contrib")
def test_plaintext_requests_are_left_alone(pki: PKI, exporter: InMemorySpanExporter) -> None:
    with aiohttp_server(None) as port, httpx.Client(timeout=10) as http:
        answer = http.get(f"http://127.0.0.1:{port}/").json()
    assert answer == {"subject": None, "source": None}
    (span,) = server_spans(exporter)
    assert not [k for k in attributes(span) if k.startswith("tls.")]
    assert span.links == ()


def test_without_mtls_instrumentation_spans_have_no_identity(
    pki: PKI, exporter: InMemorySpanExporter, instrumented: Instrumented
) -> None:
    instrumented.off()  # negative control: contrib alone
    with (
        contrib_spans(instrumented.tracer_provider),
        aiohttp_server(pki.server_context()) as port,
        client(pki, pki.client) as http,
    ):
        assert http.get(f"https://localhost:{port}/").json()["subject"] is None
    (span,) = server_spans(exporter)
    assert not [k for k in attributes(span) if k.startswith("tls.")]


def test_an_untrusted_client_certificate_header_is_ignored_and_reported(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    pem = pki.untrusted_client.certificate.public_bytes(Encoding.PEM).decode()
    forged = {"x-forwarded-client-cert": f'Cert="{urllib.parse.quote(pem)}";Subject="CN=x"'}
    with (
        contrib_spans(pki_provider := exporter_provider(exporter)),
        aiohttp_server(pki.server_context()) as port,
        client(pki, pki.client) as http,
    ):
        answer = http.get(f"https://localhost:{port}/", headers=forged).json()
    del pki_provider
    assert answer == {"subject": SUBJECT, "source": "handshake"}
    (span,) = server_spans(exporter)
    assert attributes(span)["tls.client.subject"] == SUBJECT
    (event,) = [e for e in span.events if e.name == "tls.identity.decision"]
    assert dict(event.attributes or {}) == {
        "tls.client.identity.decision": "denied",
        "tls.client.identity.rule": "untrusted_proxy_header",
    }


def exporter_provider(exporter: InMemorySpanExporter) -> TracerProvider:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def test_identity_from_a_trusted_proxy_on_a_plaintext_server(
    pki: PKI, exporter: InMemorySpanExporter, instrumented: Instrumented
) -> None:
    instrumented(trusted_proxies="127.0.0.0/8")
    pem = pki.client.certificate.public_bytes(Encoding.PEM).decode()
    headers = {"x-forwarded-client-cert": f'Cert="{urllib.parse.quote(pem)}"'}
    with (
        contrib_spans(instrumented.tracer_provider),
        aiohttp_server(None) as port,
        httpx.Client(timeout=10) as http,
    ):
        answer = http.get(f"http://127.0.0.1:{port}/", headers=headers).json()
    assert answer == {"subject": SUBJECT, "source": "xfcc"}
    (span,) = server_spans(exporter)
    assert attributes(span)["tls.client.identity.source"] == "xfcc"
    assert attributes(span)["tls.client.spiffe_id"] == SPIFFE_ID
