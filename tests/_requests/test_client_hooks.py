"""Each client library's hook point: what only that library does, beyond test_clients' cases.

httpx: a client instrumented on its own, concurrent HTTP/2 streams on one connection.
requests and urllib3: both instrumentations at once, a response that closes its
connection, requests without an instrumentation. aiohttp: responses without a body,
which give their connection back before the response is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
import requests
import urllib3
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_clients import (
    TIMEOUT,
    handshake_of,
    identity_of,
    links_of,
    request_spans,
    requests_session,
    running_loop,
    tls_attributes,
    tls_server,
    url,
)

from conftest import PKI, handshake_spans

pytestmark = pytest.mark.usefixtures("instrumented")

# -- httpx ------------------------------------------------------------------------------


def test_a_client_instrumented_on_its_own(
    pki: PKI, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with (
        tls_server(pki.server, pki.ca) as port,
        httpx.Client(verify=pki.client_context(pki.client)) as client,
    ):
        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=tracer_provider)
        client.get(url(port))
        client.get(url(port))
        # The negative control: a client nobody instrumented makes no span to enrich.
        with httpx.Client(verify=pki.client_context(pki.client)) as bare:
            bare.get(url(port))
    (handshake, _) = handshake_spans(exporter, "client")
    spans = request_spans(exporter)
    assert len(spans) == 2
    for span in spans:
        assert tls_attributes(span) == identity_of(pki.server)
        assert links_of(span) == [handshake.context.span_id]


@pytest.mark.usefixtures("httpx_instrumented")
def test_concurrent_http2_streams_on_one_connection(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    async def main(port: int) -> list[str]:
        context = pki.client_context(pki.client)
        async with httpx.AsyncClient(verify=context, http2=True) as client:
            await client.get(url(port))  # the connection, so the rest share it
            answers = await asyncio.gather(*(client.get(url(port)) for _ in range(10)))
        return [answer.http_version for answer in answers]

    with tls_server(pki.server, pki.ca) as port:
        versions = asyncio.run(main(port))
    assert versions == ["HTTP/2"] * 10
    (handshake,) = handshake_spans(exporter, "client")
    spans = request_spans(exporter)
    assert len(spans) == 11
    for span in spans:
        assert tls_attributes(span) == identity_of(pki.server)
        assert links_of(span) == [handshake.context.span_id]


# -- requests and urllib3 ----------------------------------------------------------------


@pytest.fixture
def both(tracer_provider: TracerProvider) -> Iterator[None]:
    """requests' and urllib3's instrumentations together, as opentelemetry-instrument does."""
    instrumentors = (RequestsInstrumentor(), URLLib3Instrumentor())
    for instrumentor in instrumentors:
        instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        yield
    finally:
        for instrumentor in instrumentors:
            instrumentor.uninstrument()


@pytest.mark.usefixtures("both")
def test_one_span_per_request_with_both_instrumentations(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    with (
        tls_server(pki.server, pki.ca) as port,
        requests_session(pki.client_context(pki.client), False) as get,
    ):
        get(url(port))
        get(url(port))
    (handshake,) = handshake_spans(exporter, "client")
    spans = request_spans(exporter)
    assert [span.instrumentation_scope.name for span in spans] == [
        "opentelemetry.instrumentation.requests"
    ] * 2
    for span in spans:
        assert tls_attributes(span) == identity_of(pki.server)
        assert links_of(span) == [handshake.context.span_id]


@pytest.mark.usefixtures("both")
def test_a_response_that_closes_its_connection(pki: PKI, exporter: InMemorySpanExporter) -> None:
    # http.client lets go of the socket of a "Connection: close" response as it reads it.
    with (
        tls_server(pki.server, pki.ca) as port,
        urllib3.PoolManager(ssl_context=pki.client_context(pki.client)) as pool,
    ):
        closing = pool.request("GET", url(port, "/close"))
        again = pool.request("GET", url(port))
    assert closing.headers["connection"] == "close"
    assert again.status == 200
    first, second = request_spans(exporter)
    ids = handshake_of(exporter, pki.server)
    assert len(ids) == 2  # the second request needed a connection of its own
    for span, handshake in ((first, ids[0]), (second, ids[1])):
        assert tls_attributes(span) == identity_of(pki.server)
        assert links_of(span) == [handshake]


def test_requests_without_an_instrumentation_are_left_alone(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    with tls_server(pki.server, pki.ca) as port:
        answer = requests.get(
            url(port),
            verify=pki.ca.cert_path,
            cert=(pki.client.cert_path, pki.client.key_path),
            timeout=10,
        )
    assert answer.status_code == 200
    assert request_spans(exporter) == []
    assert len(handshake_spans(exporter, "client")) == 1


# -- aiohttp ------------------------------------------------------------------------------


@pytest.fixture
def aiohttp_instrumented(tracer_provider: TracerProvider) -> Iterator[None]:
    instrumentor = AioHttpClientInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        yield
    finally:
        instrumentor.uninstrument()


@pytest.mark.usefixtures("aiohttp_instrumented")
def test_responses_without_a_body(pki: PKI, exporter: InMemorySpanExporter) -> None:
    async def main(port: int) -> list[int]:
        connector = aiohttp.TCPConnector(ssl=pki.client_context(pki.client))
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(TIMEOUT)
        ) as session:
            statuses = []
            for method, path in (("HEAD", "/"), ("GET", "/empty"), ("GET", "/")):
                async with session.request(method, url(port, path)) as response:
                    statuses.append(response.status)
            return statuses

    with tls_server(pki.server, pki.ca) as port, running_loop() as run:
        assert run(main(port)) == [200, 204, 200]
    (handshake,) = handshake_spans(exporter, "client")
    spans = request_spans(exporter)
    assert len(spans) == 3
    for span in spans:
        assert tls_attributes(span) == identity_of(pki.server)
        assert links_of(span) == [handshake.context.span_id]
