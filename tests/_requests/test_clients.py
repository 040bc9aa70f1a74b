"""The server's identity on every outgoing request's client span, pooled connection or not.

Each client library and protocol is driven by its own OpenTelemetry instrumentation
against real hypercorn servers over loopback TLS: ten requests on one pooled connection,
two servers of different identities behind one pool, a server that goes away and comes
back with another certificate, and plain HTTP, which carries nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import grpc.aio
import httpx
import pytest
import requests
import requests.adapters
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind

from conftest import PKI, Instrumented, handshake_spans, kept_records
from pki import Authority, Leaf

pytestmark = pytest.mark.usefixtures("instrumented")

TIMEOUT = 10.0
AUDIT = "opentelemetry.instrumentation.mtls.audit"
LEAN = {
    "tls.server.subject",
    "tls.server.issuer",
    "tls.server.hash.sha256",
    "tls.server.spiffe_id",
    "tls.server.identity.source",
}
BACKEND_ID = "spiffe://example.org/ns/shop/sa/backend"
IMPOSTOR_ID = "spiffe://example.org/ns/shop/sa/impostor"

Get = Callable[[str], str]
"""Sends one GET through the client's pool; returns the HTTP version that answered."""


@dataclass(frozen=True)
class Servers:
    """Server certificates of this module: two identities from the tests' CA, one foreign."""

    backend: Leaf
    impostor: Leaf
    foreign: Leaf


@pytest.fixture(scope="module")
def servers(pki: PKI) -> Servers:
    names = {"dns": ("localhost",), "ips": ("127.0.0.1",)}
    return Servers(
        backend=pki.ca.issue("backend.test", uris=(BACKEND_ID,), **names),  # type: ignore[arg-type]
        impostor=pki.ca.issue("impostor.test", uris=(IMPOSTOR_ID,), **names),  # type: ignore[arg-type]
        foreign=pki.other_ca.issue("foreign.test", **names),  # type: ignore[arg-type]
    )


# -- servers -----------------------------------------------------------------------


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer every request with a small body (or none, for HEAD and /empty)."""
    if scope["type"] != "http":
        return
    await receive()
    body = b"" if scope["method"] == "HEAD" or scope["path"] == "/empty" else b"ok"
    status = 204 if scope["path"] == "/empty" else 200
    headers = [(b"content-length", b"%d" % len(body))] if status == 200 else []
    if scope["path"] == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _PromptShutdownLoop(asyncio.SelectorEventLoop):
    """A loop whose TLS servers close a connection in 0.2 s, answered or not.

    A blocking client does not read its idle pooled connection, so it never answers the
    server's close_notify; asyncio would wait 30 s for it before closing.
    """

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:  # type: ignore[override]
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_shutdown_timeout", 0.2)
        return await super().create_server(*args, **kwargs)


@contextmanager
def tls_server(leaf: Leaf | None, ca: Authority | None = None, *, port: int = 0) -> Iterator[int]:
    """Serve ``ok_app`` with hypercorn (HTTP/1.1 and HTTP/2), mTLS unless ``leaf`` is None.

    ``port`` asks for a port again: a server that comes back where it was. Stopping the
    server closes its connections, idle keep-alive ones included.
    """
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR, so a restart may rebind
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the descriptor
    config.loglevel = "WARNING"
    config.graceful_timeout = 1.0
    if leaf is not None and ca is not None:
        config.certfile, config.keyfile = leaf.cert_path, leaf.key_path
        config.ca_certs = ca.cert_path
        config.verify_mode = ssl.CERT_REQUIRED
    stop = threading.Event()
    started = threading.Event()

    async def main() -> None:
        async def shutdown_trigger() -> None:
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

        await serve(ok_app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]

    def run() -> None:
        with asyncio.Runner(loop_factory=_PromptShutdownLoop) as runner:
            runner.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not started.wait(TIMEOUT):
        raise RuntimeError("hypercorn did not start")
    time.sleep(0.1)  # the listening socket is served once the trigger runs
    try:
        yield port
    finally:
        stop.set()
        thread.join(TIMEOUT)


# -- clients: each library through its own OpenTelemetry instrumentation ----------------


class _ContextAdapter(requests.adapters.HTTPAdapter):
    """A requests adapter whose pools use one SSLContext (trust and client certificate)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


@contextmanager
def httpx_sync(context: ssl.SSLContext, http2: bool) -> Iterator[Get]:
    with httpx.Client(verify=context, http2=http2, timeout=TIMEOUT) as client:
        yield lambda url: client.get(url).http_version


@contextmanager
def running_loop() -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    """An event loop running in a thread, as an application's is; yield a way to run on it.

    A loop that runs all along, not only during requests, sees a server close its
    connections when it happens, as a real client's would.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(TIMEOUT)

    try:
        yield run
    finally:
        # Closed clients' TLS transports finish closing on the loop (aiohttp's advice).
        run(asyncio.sleep(0.1))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


@contextmanager
def httpx_async(context: ssl.SSLContext, http2: bool) -> Iterator[Get]:
    with running_loop() as run:
        client = httpx.AsyncClient(verify=context, http2=http2, timeout=TIMEOUT)

        async def get(url: str) -> str:
            return (await client.get(url)).http_version

        try:
            yield lambda url: run(get(url))
        finally:
            run(client.aclose())


@contextmanager
def requests_session(context: ssl.SSLContext, http2: bool) -> Iterator[Get]:
    with requests.Session() as session:
        session.mount("https://", _ContextAdapter(context))

        def get(url: str) -> str:
            response = session.get(url, timeout=TIMEOUT)
            return f"HTTP/{response.raw.version // 10}.{response.raw.version % 10}"

        yield get


@contextmanager
def urllib3_pool(context: ssl.SSLContext, http2: bool) -> Iterator[Get]:
    with urllib3.PoolManager(ssl_context=context, timeout=TIMEOUT) as pool:

        def get(url: str) -> str:
            response = pool.request("GET", url)
            return f"HTTP/{response.version // 10}.{response.version % 10}"

        yield get


@contextmanager
def aiohttp_session(context: ssl.SSLContext, http2: bool) -> Iterator[Get]:
    with running_loop() as run:

        async def open_session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(ssl=context)
            timeout = aiohttp.ClientTimeout(TIMEOUT)
            return aiohttp.ClientSession(connector=connector, timeout=timeout)

        session = run(open_session())

        async def get(url: str) -> str:
            async with session.get(url) as response:
                await response.read()
                return f"HTTP/{response.version.major}.{response.version.minor}"

        try:
            yield lambda url: run(get(url))
        finally:
            run(session.close())


@dataclass(frozen=True)
class Client:
    """One client library and protocol, instrumented by its OpenTelemetry instrumentation."""

    open: Callable[[ssl.SSLContext, bool], AbstractContextManager[Get]]
    instrumentor: Callable[[], Any]
    http2: bool = False

    @property
    def protocol(self) -> str:
        return "HTTP/2" if self.http2 else "HTTP/1.1"

    def __call__(self, context: ssl.SSLContext) -> AbstractContextManager[Get]:
        return self.open(context, self.http2)


CLIENTS = {
    "httpx-http1.1": Client(httpx_sync, HTTPXClientInstrumentor),
    "httpx-http2": Client(httpx_sync, HTTPXClientInstrumentor, http2=True),
    "httpx-async-http1.1": Client(httpx_async, HTTPXClientInstrumentor),
    "httpx-async-http2": Client(httpx_async, HTTPXClientInstrumentor, http2=True),
    "requests": Client(requests_session, RequestsInstrumentor),
    "urllib3": Client(urllib3_pool, URLLib3Instrumentor),
    "aiohttp": Client(aiohttp_session, AioHttpClientInstrumentor),
}


@pytest.fixture(params=list(CLIENTS))
def client(request: pytest.FixtureRequest, tracer_provider: TracerProvider) -> Iterator[Client]:
    """Each client, with its OpenTelemetry instrumentation on (after ours)."""
    chosen = CLIENTS[request.param]
    instrumentor = chosen.instrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        yield chosen
    finally:
        instrumentor.uninstrument()


# -- what the spans say --------------------------------------------------------------


def request_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """The HTTP client spans of the client instrumentations, in the order they ended."""
    return [span for span in exporter.get_finished_spans() if span.kind is SpanKind.CLIENT]


def tls_attributes(span: ReadableSpan) -> dict[str, Any]:
    return {k: v for k, v in (span.attributes or {}).items() if k.startswith("tls.")}


def identity_of(leaf: Leaf) -> dict[str, Any]:
    """What a lean client span says of a server presenting ``leaf``."""
    certificate = leaf.certificate
    identity = {
        "tls.server.subject": certificate.subject.rfc4514_string(),
        "tls.server.issuer": certificate.issuer.rfc4514_string(),
        "tls.server.hash.sha256": hashlib.sha256(leaf.der).hexdigest().upper(),
        "tls.server.identity.source": "handshake",
    }
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return identity
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    if uris:
        identity["tls.server.spiffe_id"] = uris[0]
    return identity


def links_of(span: ReadableSpan) -> list[int]:
    return [link.context.span_id for link in span.links]


def handshake_of(exporter: InMemorySpanExporter, leaf: Leaf) -> list[int]:
    """The ids of the client handshake spans with the server presenting ``leaf``."""
    fingerprint = identity_of(leaf)["tls.server.hash.sha256"]
    return [
        span.context.span_id
        for span in handshake_spans(exporter, "client")
        if (span.attributes or {}).get("tls.server.hash.sha256") == fingerprint
    ]


def url(port: int, path: str = "/", scheme: str = "https") -> str:
    return f"{scheme}://localhost:{port}{path}"


# -- every client, every protocol ----------------------------------------------------


def test_ten_requests_on_one_pooled_connection_each_carry_its_identity(
    pki: PKI, client: Client, exporter: InMemorySpanExporter
) -> None:
    with tls_server(pki.server, pki.ca) as port, client(pki.client_context(pki.client)) as get:
        versions = [get(url(port)) for _ in range(10)]
    assert versions == [client.protocol] * 10
    (handshake,) = handshake_spans(exporter, "client")
    spans = request_spans(exporter)
    assert len(spans) == 10
    for span in spans:
        assert tls_attributes(span) == identity_of(pki.server)
        assert links_of(span) == [handshake.context.span_id]
    # The first request made the connection: its handshake is also its child.
    assert handshake.parent is not None
    assert handshake.parent.span_id == spans[0].context.span_id


def test_two_servers_behind_one_pool_are_never_mixed(
    pki: PKI, servers: Servers, client: Client, exporter: InMemorySpanExporter
) -> None:
    context = pki.client_context(pki.client)
    with (
        tls_server(servers.backend, pki.ca) as backend,
        tls_server(servers.impostor, pki.ca) as impostor,
        client(context) as get,
    ):
        order = [backend, impostor, impostor, backend, impostor, backend]
        for port in order:
            get(url(port))
    leaves = {backend: servers.backend, impostor: servers.impostor}
    spans = request_spans(exporter)
    assert len(spans) == len(order)
    assert len(handshake_spans(exporter, "client")) == 2
    for port, span in zip(order, spans, strict=True):
        assert tls_attributes(span) == identity_of(leaves[port])
        assert links_of(span) == handshake_of(exporter, leaves[port])


def test_a_reconnection_carries_the_new_identity(
    pki: PKI, servers: Servers, client: Client, exporter: InMemorySpanExporter
) -> None:
    with client(pki.client_context(pki.client)) as get:
        with tls_server(servers.backend, pki.ca) as port:
            get(url(port))
            get(url(port))
        # The server went away, closing the pooled connection; it is back, rotated.
        with tls_server(servers.impostor, pki.ca, port=port):
            try:
                get(url(port))
            except httpx.TransportError:
                # httpcore reuses an HTTP/2 connection without seeing that the server
                # closed it: that request fails (naming no server), and the next reconnects.
                if not client.http2:
                    raise
                get(url(port))
            get(url(port))
    spans = request_spans(exporter)
    if len(spans) == 5:
        failed = spans.pop(2)
        assert tls_attributes(failed) == {}
        assert failed.links == ()
    assert len(spans) == 4
    old, new = handshake_of(exporter, servers.backend), handshake_of(exporter, servers.impostor)
    assert len(old) == len(new) == 1
    for span in spans[:2]:
        assert tls_attributes(span) == identity_of(servers.backend)
        assert links_of(span) == old
    for span in spans[2:]:
        assert tls_attributes(span) == identity_of(servers.impostor)
        assert links_of(span) == new


def test_plain_http_carries_nothing(
    pki: PKI, client: Client, exporter: InMemorySpanExporter
) -> None:
    with tls_server(None) as port, client(pki.client_context(pki.client)) as get:
        get(url(port, scheme="http"))
        get(url(port, scheme="http"))
    spans = request_spans(exporter)
    assert len(spans) == 2
    for span in spans:
        assert tls_attributes(span) == {}
        assert span.links == ()
    assert handshake_spans(exporter, "client") == []


# -- what the spans carry, and when ------------------------------------------------


@pytest.mark.usefixtures("httpx_instrumented")
def test_full_request_attributes(
    pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    instrumented(request_attributes="full")
    with (
        tls_server(pki.server, pki.ca) as port,
        httpx_sync(pki.client_context(pki.client), False) as get,
    ):
        get(url(port))
        get(url(port))
    (handshake,) = handshake_spans(exporter, "client")
    every = handshake.attributes or {}
    for span in request_spans(exporter):
        attributes = tls_attributes(span)
        assert attributes["tls.server.identity.source"] == "handshake"
        del attributes["tls.server.identity.source"]
        expected = {
            k: v
            for k, v in every.items()
            if k.startswith("tls.server.")
            or k in ("tls.protocol.version", "tls.cipher", "tls.resumed")
        }
        assert attributes == expected
        assert {
            "tls.server.subject",
            "tls.server.issuer",
            "tls.server.hash.sha256",
            "tls.server.not_before",
            "tls.server.not_after",
            "tls.server.x509.serial_number",
            "tls.server.x509.subject.common_name",
            "tls.server.x509.alternative_names",
            "tls.server.verify.result",
            "tls.protocol.version",
            "tls.cipher",
            "tls.resumed",
        } <= set(attributes)


@pytest.mark.usefixtures("httpx_instrumented")
def test_lean_request_attributes_by_default(pki: PKI, exporter: InMemorySpanExporter) -> None:
    with (
        tls_server(pki.server, pki.ca) as port,
        httpx_sync(pki.client_context(pki.client), False) as get,
    ):
        get(url(port))
    (span,) = request_spans(exporter)
    assert set(tls_attributes(span)) == LEAN - {"tls.server.spiffe_id"}  # the server has none


@pytest.mark.usefixtures("httpx_instrumented")
@pytest.mark.parametrize("mode", ["hashed", "omit"])
def test_identity_modes_apply_to_client_spans(
    pki: PKI,
    servers: Servers,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    mode: str,
) -> None:
    instrumented(identity_mode=mode, hash_key="k")
    with (
        tls_server(servers.backend, pki.ca) as port,
        httpx_sync(pki.client_context(pki.client), False) as get,
    ):
        get(url(port))
    (span,) = request_spans(exporter)
    attributes = tls_attributes(span)
    plain = identity_of(servers.backend)
    assert attributes["tls.server.hash.sha256"] == plain["tls.server.hash.sha256"]
    if mode == "omit":
        assert set(attributes) == {"tls.server.hash.sha256", "tls.server.identity.source"}
    else:
        assert attributes["tls.server.spiffe_id"].startswith("hmac-sha256:")
        assert attributes["tls.server.subject"].startswith("hmac-sha256:")
    assert BACKEND_ID not in json.dumps(attributes)


@pytest.mark.usefixtures("httpx_instrumented")
def test_without_client_handshake_spans_the_identity_has_no_link(
    pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    reader = InMemoryMetricReader()
    instrumented(client_handshake_spans="false", meter_provider=MeterProvider([reader]))
    with (
        tls_server(pki.server, pki.ca) as port,
        httpx_sync(pki.client_context(pki.client), False) as get,
    ):
        get(url(port))
        get(url(port))
    assert handshake_spans(exporter, "client") == []
    assert len(handshake_spans(exporter, "server")) == 1  # server spans stay
    for span in request_spans(exporter):
        assert tls_attributes(span) == identity_of(pki.server)
        assert span.links == ()
    data = reader.get_metrics_data()
    assert data is not None
    names = {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    (point,) = names["tls.client.handshake.duration"].data.data_points  # type: ignore[attr-defined]
    assert point.count == 1


@pytest.mark.usefixtures("httpx_instrumented")
def test_without_client_handshake_spans_a_failure_is_still_logged_in_the_request(
    pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    instrumented(client_handshake_spans=False)
    strict = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.other_ca.configure_trust(strict)  # not the CA of the server's certificate
    with (
        tls_server(pki.server, pki.ca) as port,
        kept_records(AUDIT) as records,
        httpx.Client(verify=strict) as http,
        pytest.raises(httpx.ConnectError),
    ):
        http.get(url(port))
    assert handshake_spans(exporter, "client") == []
    (span,) = request_spans(exporter)
    failed = [r for r in records if getattr(r, "event.name", None) == "tls.handshake.failed"]
    client_side = [r for r in failed if "TLS client handshake" in r.getMessage()]
    assert len(client_side) == 1
    assert getattr(client_side[0], "error.type") == "certificate_authority_invalid"
    assert tls_attributes(span) == {}  # no response, no connection to name


# -- the client identity policy ------------------------------------------------------


def decisions(span: ReadableSpan) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == "tls.identity.decision"]


def denials(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if getattr(r, "event.name", None) == "tls.identity.denied"]


@pytest.mark.usefixtures("httpx_instrumented")
def test_a_server_that_is_not_expected_is_recorded_and_still_answered(
    pki: PKI, servers: Servers, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    reader = InMemoryMetricReader()
    instrumented(
        expected_server_spiffe_ids="spiffe://example.org/ns/shop/sa/back*",
        meter_provider=MeterProvider([reader]),
    )
    context = pki.client_context(pki.client)
    with (
        tls_server(servers.backend, pki.ca) as backend,
        tls_server(servers.impostor, pki.ca) as impostor,
        kept_records(AUDIT) as records,
        httpx.Client(verify=context) as http,
    ):
        statuses = [http.get(url(port)).status_code for port in (backend, impostor, impostor)]
    assert statuses == [200, 200, 200]  # observes only
    allowed, denied, denied_again = request_spans(exporter)
    assert decisions(allowed) == [
        {"tls.server.identity.decision": "allowed", "tls.server.identity.rule": "spiffe_id"}
    ]
    for span in (denied, denied_again):
        assert decisions(span) == [
            {"tls.server.identity.decision": "denied", "tls.server.identity.rule": "spiffe_id"}
        ]
    (record,) = denials(records)[:1]
    assert record.levelno == logging.WARNING
    assert IMPOSTOR_ID in record.getMessage()
    assert getattr(record, "tls.server.spiffe_id") == IMPOSTOR_ID
    assert getattr(record, "tls.server.identity.rule") == "spiffe_id"
    assert getattr(record, "server.port") == impostor
    data = reader.get_metrics_data()
    assert data is not None
    counts = {
        (
            point.attributes["tls.server.identity.decision"],
            point.attributes["tls.server.identity.rule"],
        ): point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "tls.identity.decisions"
        for point in metric.data.data_points  # type: ignore[attr-defined]
    }
    assert counts == {("allowed", "spiffe_id"): 1, ("denied", "spiffe_id"): 2}


@pytest.mark.usefixtures("httpx_instrumented")
def test_expected_issuers_by_fingerprint(
    pki: PKI, servers: Servers, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    ca_sha256 = hashlib.sha256(pki.ca.certificate.public_bytes(Encoding.DER)).hexdigest()
    instrumented(expected_server_issuers=ca_sha256)
    context = pki.client_context(pki.client)
    pki.other_ca.configure_trust(context)  # the foreign server's handshake succeeds
    with (
        tls_server(servers.backend, pki.ca) as backend,
        tls_server(servers.foreign, pki.ca) as foreign,
        kept_records(AUDIT) as records,
        httpx.Client(verify=context) as http,
    ):
        http.get(url(backend))
        http.get(url(foreign))
    ours, theirs = request_spans(exporter)
    assert decisions(ours) == [
        {"tls.server.identity.decision": "allowed", "tls.server.identity.rule": "issuer"}
    ]
    assert decisions(theirs) == [
        {"tls.server.identity.decision": "denied", "tls.server.identity.rule": "issuer"}
    ]
    (record,) = denials(records)
    assert "Somebody else's CA" in record.getMessage()


def test_a_denial_is_recorded_when_the_request_is_not_sampled(
    pki: PKI, servers: Servers, instrumented: Instrumented
) -> None:
    unsampled = TracerProvider(sampler=ALWAYS_OFF)
    instrumented(tracer_provider=unsampled, expected_server_spiffe_ids=BACKEND_ID)
    contrib = HTTPXClientInstrumentor()
    contrib.instrument(tracer_provider=unsampled)
    try:
        with (
            tls_server(servers.impostor, pki.ca) as port,
            kept_records(AUDIT) as records,
            httpx_sync(pki.client_context(pki.client), False) as get,
        ):
            get(url(port))
    finally:
        contrib.uninstrument()
    (record,) = denials(records)
    assert getattr(record, "tls.server.spiffe_id") == IMPOSTOR_ID


@pytest.mark.usefixtures("httpx_instrumented")
def test_no_policy_no_decision(pki: PKI, exporter: InMemorySpanExporter) -> None:
    with (
        tls_server(pki.server, pki.ca) as port,
        kept_records(AUDIT) as records,
        httpx_sync(pki.client_context(pki.client), False) as get,
    ):
        get(url(port))
    (span,) = request_spans(exporter)
    assert decisions(span) == []
    assert denials(records) == []


# -- which span, and when not ---------------------------------------------------------


def test_instrumented_in_either_order(
    pki: PKI,
    instrumented: Instrumented,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    instrumented.off()
    contrib = HTTPXClientInstrumentor()
    contrib.instrument(tracer_provider=tracer_provider)  # before us, as an entry point may be
    try:
        instrumented()
        with (
            tls_server(pki.server, pki.ca) as port,
            httpx_sync(pki.client_context(pki.client), False) as get,
        ):
            get(url(port))
            get(url(port))
    finally:
        contrib.uninstrument()
    (handshake,) = handshake_spans(exporter, "client")
    for span in request_spans(exporter):
        assert tls_attributes(span) == identity_of(pki.server)
        assert links_of(span) == [handshake.context.span_id]


def test_only_a_client_span_is_enriched(
    pki: PKI, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # No HTTP client instrumentation: the current span is the application's own.
    tracer = tracer_provider.get_tracer("app")
    with (
        tls_server(pki.server, pki.ca) as port,
        httpx_sync(pki.client_context(pki.client), False) as get,
    ):
        with tracer.start_as_current_span("work"):
            get(url(port))
        with tracer.start_as_current_span("call", kind=SpanKind.CLIENT):
            get(url(port))
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert tls_attributes(spans["work"]) == {}
    assert spans["work"].links == ()
    # The negative control: an application's own client span is a client span.
    assert tls_attributes(spans["call"]) == identity_of(pki.server)


def test_nothing_once_uninstrumented(
    pki: PKI, instrumented: Instrumented, httpx_instrumented: None, exporter: InMemorySpanExporter
) -> None:
    with (
        tls_server(pki.server, pki.ca) as port,
        httpx_sync(pki.client_context(pki.client), False) as get,
    ):
        get(url(port))
        instrumented.off()
        get(url(port))
    enriched, bare = request_spans(exporter)
    assert tls_attributes(enriched) == identity_of(pki.server)
    assert tls_attributes(bare) == {}


def test_a_connection_made_before_instrumenting(
    pki: PKI, instrumented: Instrumented, httpx_instrumented: None, exporter: InMemorySpanExporter
) -> None:
    instrumented.off()
    with (
        tls_server(pki.server, pki.ca) as port,
        httpx_sync(pki.client_context(pki.client), False) as get,
    ):
        get(url(port))
        instrumented()
        get(url(port))  # the same connection: no handshake was recorded, no span to link
    bare, enriched = request_spans(exporter)
    assert tls_attributes(bare) == {}
    assert tls_attributes(enriched) == identity_of(pki.server)
    assert enriched.links == ()
    assert handshake_spans(exporter, "client") == []


def test_zero_code_under_opentelemetry_instrument(pki: PKI, tmp_path: Any) -> None:
    script = tmp_path / "client.py"
    script.write_text(
        "import ssl, sys, httpx, requests\n"
        "port, ca, cert, key = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]\n"
        "ctx = ssl.create_default_context(cafile=ca)\n"
        "ctx.load_cert_chain(cert, key)\n"
        "with httpx.Client(verify=ctx) as c:\n"
        "    c.get(f'https://localhost:{port}/'); c.get(f'https://localhost:{port}/')\n"
        "with requests.Session() as s:\n"
        "    for _ in range(2):\n"
        "        s.get(f'https://localhost:{port}/', verify=ca, cert=(cert, key))\n"
    )
    environment = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    instrument = os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")
    with tls_server(pki.server, pki.ca) as port:
        result = subprocess.run(
            [
                instrument,
                sys.executable,
                str(script),
                str(port),
                pki.ca.cert_path,
                pki.client.cert_path,
                pki.client.key_path,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=environment,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    spans = list(console_spans(result.stdout))
    clients = [s for s in spans if s["kind"] == "SpanKind.CLIENT"]
    handshakes = {s["context"]["span_id"] for s in spans if s["name"] == "TLS client handshake"}
    assert len(clients) == 4
    assert len(handshakes) == 2  # one connection per client library
    for span in clients:
        assert span["attributes"]["tls.server.subject"] == "CN=server.test,O=mTLS tests"
        assert {link["context"]["span_id"] for link in span["links"]} <= handshakes
        assert len(span["links"]) == 1


def console_spans(text: str) -> Iterator[dict[str, Any]]:
    """The spans the console exporter printed: JSON objects, one after another."""
    decoder = json.JSONDecoder()
    index = 0
    while (start := text.find("{", index)) != -1:
        span, index = decoder.raw_decode(text, start)
        yield span


# -- gRPC -----------------------------------------------------------------------------


def test_grpc_clients_are_not_told_the_server_identity(pki: PKI) -> None:
    """grpcio's TLS is its own, and a client's call exposes no ``auth_context()``.

    Only the server's ``ServicerContext`` has one. When this fails, grpcio has given
    clients the server's identity, and client spans can carry it.
    """
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    service = grpc.method_handlers_generic_handler("t", {"M": handler})
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[service])
    credentials = grpc.ssl_server_credentials(
        [(read(pki.server.key_path), read(pki.server.cert_path))],
        root_certificates=read(pki.ca.cert_path),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    client_credentials = grpc.ssl_channel_credentials(
        read(pki.ca.cert_path), read(pki.client.key_path), read(pki.client.cert_path)
    )
    options = [("grpc.ssl_target_name_override", "localhost")]
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", client_credentials, options) as channel:
            method = channel.unary_unary("/t/M")
            answer, call = method.with_call(b"ping", timeout=TIMEOUT)
            future = method.future(b"ping", timeout=TIMEOUT)
            future.result()

        async def aio() -> Any:
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{port}", client_credentials, options
            ) as channel:
                call = channel.unary_unary("/t/M")(b"ping", timeout=TIMEOUT)
                await call
                return call

        aio_call = asyncio.run(aio())
    finally:
        server.stop(None)
    assert answer == b"ping"
    for made in (call, future, aio_call):
        assert not hasattr(made, "auth_context")
        assert not hasattr(made, "peer_identities")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
