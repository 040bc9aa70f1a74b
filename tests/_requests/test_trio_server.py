"""hypercorn's trio worker: each request's identity on its server span, over mTLS.

trio has no protocol callbacks for a connection to be followed through: the connection
is made current in the task that completes its server handshake (``_requests/trio.py``),
and hypercorn's trio worker starts each connection's request tasks from that task. The
server runs in a thread of this process, with ``trio.run``, so that its spans reach the
test's in-memory exporter; the clients are httpx, with keep-alive.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conftest import PKI, Instrumented, handshake_spans
from opentelemetry.instrumentation.mtls import client_identity
from pki import Leaf
from servers import answer_json

pytestmark = pytest.mark.usefixtures("instrumented")

START_TIMEOUT = 10.0
REQUESTS_PER_CONNECTION = 4


async def whoami(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer with the identity ``client_identity(scope)`` gives, and the request's path."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    identity = client_identity(scope)
    body = {"subject": identity.subject if identity else None, "path": scope["path"]}
    await answer_json(scope, receive, send, json.dumps(body).encode())


def contrib_app(tracer_provider: TracerProvider) -> Any:
    """The ASGI app under contrib's ``OpenTelemetryMiddleware``, as the ASGI tests use it."""
    return OpenTelemetryMiddleware(
        whoami, tracer_provider=tracer_provider, exclude_spans=["receive", "send"]
    )


def own_span_app(tracer_provider: TracerProvider) -> Any:
    """The application's own ``SERVER`` span, no instrumentation: reached only by opening."""
    tracer = tracer_provider.get_tracer("the.application")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await whoami(scope, receive, send)
            return
        with tracer.start_as_current_span(f"own {scope['path']}", kind=SpanKind.SERVER):
            await whoami(scope, receive, send)

    return app


@contextmanager
def hypercorn_trio_server(
    app: Any, pki: PKI, verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED
) -> Iterator[int]:
    """Serve ``app`` with hypercorn's trio worker in a thread; yield the port."""
    sock = socket.create_server(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the descriptor
    config.certfile = pki.server.cert_path
    config.keyfile = pki.server.key_path
    config.ca_certs = pki.ca.cert_path
    config.verify_mode = verify_mode
    config.loglevel = "WARNING"
    started, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    async def shutdown_trigger() -> None:
        started.set()
        while not stop.is_set():
            await trio.sleep(0.02)

    def run() -> None:
        try:
            trio.run(lambda: serve(app, config, shutdown_trigger=shutdown_trigger))
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not started.wait(START_TIMEOUT) or errors:
        raise RuntimeError(f"hypercorn (trio) did not start: {errors}")
    try:
        yield port
    finally:
        stop.set()
        thread.join(START_TIMEOUT)
        assert not thread.is_alive(), "hypercorn (trio) did not stop"
        assert not errors, errors


def client(pki: PKI, cert: Leaf | None) -> httpx.Client:
    return httpx.Client(verify=pki.client_context(cert), timeout=10, trust_env=False)


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def path_of(span: ReadableSpan) -> str:
    attributes = span.attributes or {}
    return str(attributes.get("url.path", attributes.get("http.target", span.name.split()[-1])))


def two_clients_keep_alive(pki: PKI, port: int) -> dict[str, list[dict[str, Any]]]:
    """Two clients, each on its own kept-alive connection, their requests interleaved."""
    other = pki.ca.issue("other-client", uris=("spiffe://example.org/ns/other/sa/batch",))
    answers: dict[str, list[dict[str, Any]]] = {"web-client": [], "other-client": []}
    with client(pki, pki.client) as web, client(pki, other) as batch:
        for i in range(REQUESTS_PER_CONNECTION):
            for who, http in (("web-client", web), ("other-client", batch)):
                answers[who].append(http.get(f"https://localhost:{port}/{who}/{i}").json())
    return answers


def check_two_clients(
    answers: dict[str, list[dict[str, Any]]],
    spans: list[ReadableSpan],
    handshakes: list[ReadableSpan],
) -> None:
    """Each request span: its own client's identity, linked to its own connection's handshake."""
    for who, seen in answers.items():
        assert [a["subject"] for a in seen] == [f"CN={who},O=mTLS tests"] * len(seen)
    assert len(handshakes) == 2  # keep-alive: one handshake per client
    assert all((h.attributes or {})["tls.established"] for h in handshakes)
    assert len(spans) == 2 * REQUESTS_PER_CONNECTION
    links: dict[str, set[int]] = {"web-client": set(), "other-client": set()}
    for span in spans:
        who = path_of(span).split("/")[1]
        attributes = span.attributes or {}
        assert attributes["tls.client.subject"] == f"CN={who},O=mTLS tests", span.to_json()
        assert attributes["tls.client.identity.source"] == "handshake"
        (link,) = span.links
        links[who].add(link.context.span_id)
    handshake_ids = {h.context.span_id for h in handshakes}
    assert all(len(ids) == 1 for ids in links.values())  # one connection per client
    assert links["web-client"] | links["other-client"] == handshake_ids
    assert links["web-client"] != links["other-client"]


def test_contrib_asgi_spans_carry_each_requests_identity(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    with hypercorn_trio_server(contrib_app(tracer_provider), pki) as port:
        answers = two_clients_keep_alive(pki, port)
    check_two_clients(answers, server_spans(exporter), handshake_spans(exporter, "server"))


def test_the_applications_own_server_span_is_reached_by_opening_the_request(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """No contrib hook here: only the request opened on the trio connection reaches it."""
    with hypercorn_trio_server(own_span_app(tracer_provider), pki) as port:
        answers = two_clients_keep_alive(pki, port)
    spans = [s for s in server_spans(exporter) if s.name.startswith("own ")]
    check_two_clients(answers, spans, handshake_spans(exporter, "server"))


def test_no_certificate_on_cert_optional_and_a_foreign_ca(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    app = contrib_app(tracer_provider)
    with hypercorn_trio_server(app, pki, ssl.CERT_OPTIONAL) as port:
        with client(pki, None) as http:
            answers = [http.get(f"https://localhost:{port}/nobody/{i}").json() for i in range(2)]
        with client(pki, pki.untrusted_client) as http, pytest.raises(httpx.HTTPError):
            http.get(f"https://localhost:{port}/intruder/0")
    assert [a["subject"] for a in answers] == [None, None]
    spans = server_spans(exporter)
    assert [path_of(s) for s in spans] == ["/nobody/0", "/nobody/1"]  # the intruder's: none
    handshakes = handshake_spans(exporter, "server")
    established = [h for h in handshakes if (h.attributes or {})["tls.established"]]
    failed = [h for h in handshakes if not (h.attributes or {})["tls.established"]]
    for span in spans:
        attributes = span.attributes or {}
        # Lean: with no certificate the source alone; the verify result is the handshake's.
        assert attributes["tls.client.identity.source"] == "handshake"
        assert "tls.client.verify.result" not in attributes
        assert "tls.client.subject" not in attributes
        assert [link.context.span_id for link in span.links] == [established[0].context.span_id]
    assert len(established) == 1
    assert (established[0].attributes or {})["tls.client.verify.result"] == "none"
    assert [(h.attributes or {})["error.type"] for h in failed] == ["certificate_authority_invalid"]


def test_without_the_instrumentation_no_span_carries_an_identity(
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    instrumented.off()
    with hypercorn_trio_server(contrib_app(tracer_provider), pki) as port:
        answers = two_clients_keep_alive(pki, port)
    assert {a["subject"] for seen in answers.values() for a in seen} == {None}
    spans = server_spans(exporter)
    assert len(spans) == 2 * REQUESTS_PER_CONNECTION
    assert all(not s.links for s in spans)
    assert all(not [k for k in (s.attributes or {}) if k.startswith("tls.")] for s in spans)
    assert not handshake_spans(exporter, "server")


def test_http2_streams_of_one_connection_share_its_identity(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """HTTP/2: every stream's request task is started from the connection's task."""

    async def many(port: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(
            verify=pki.client_context(pki.client), http2=True, timeout=10, trust_env=False
        ) as http:
            return list(
                await asyncio.gather(
                    *(http.get(f"https://localhost:{port}/h2/{i}") for i in range(8))
                )
            )

    with hypercorn_trio_server(contrib_app(tracer_provider), pki) as port:
        responses = asyncio.run(many(port))
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert {r.json()["subject"] for r in responses} == {"CN=web-client,O=mTLS tests"}
    (handshake,) = handshake_spans(exporter, "server")
    assert (handshake.attributes or {})["tls.next_protocol"] == "h2"
    spans = server_spans(exporter)
    assert len(spans) == 8
    assert {(s.attributes or {})["tls.client.subject"] for s in spans} == {
        "CN=web-client,O=mTLS tests"
    }
    assert {link.context.span_id for s in spans for link in s.links} == {handshake.context.span_id}
