"""CPU cost per client request of the server's identity on its span, against the client without it.

One mutual-TLS server runs in a child process (``http.server``, HTTP/1.1 keep-alive, TLS
1.3, ECDSA P-256 certificates from the package's throwaway PKI), so that its CPU time is
not this process's. Here, each client library, instrumented by its OpenTelemetry
instrumentation (httpx's, requests', aiohttp-client's) with an SDK ``TracerProvider``
whose ``SimpleSpanProcessor`` hands every span to an exporter that drops it, sends
``GET /`` one request after another over ONE pooled connection, made while
``MTLSInstrumentor`` was on (so its record has a ``TLS client handshake`` span to link to).

Variants, per library:

* ``otel``: the library's instrumentation, ``MTLSInstrumentor`` off;
* ``otel+mtls``: the same with ``MTLSInstrumentor`` on. No handshake runs on a pooled
  connection, so the difference is the enrichment: finding the connection's record
  through the library's connection, the identity's attributes and the link on the
  client span (and their export).

Blocks alternate ``otel, otel+mtls, otel, otel+mtls, ..., otel``; after each switch one
request is sent untimed (a new instrumentation derives the connection's identity once,
on its first request). A block's figure is this process's CPU time per request; each
``otel+mtls`` block is compared with the mean of the two ``otel`` blocks around it (the
difference in microseconds, and the ratio of CPU times), and each inner ``otel`` block
with its two neighbours (the noise of one comparison). Medians, interquartile ranges,
and distribution-free 95% confidence intervals of the medians are reported. The heap is
frozen after the warm-up and collected before each block.

On a shared machine the noise of a whole request (a millisecond of CPU, most of it
httpx's, requests' or aiohttp's own and the TLS record layer's) is larger than the
enrichment, so the enrichment is also measured alone (row ``alone``): a client span made
as opentelemetry-instrumentation-httpx makes it, exported by the same processor, with
and without ``enrich_client_span`` given a real response of the pooled connection, in
alternating blocks as above. Each library's row ends with that figure as a ratio against
the library's own instrumented request: (request + enrichment) / request.

Run: ``python benchmarks/client_overhead.py [--requests N] [--rounds N] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import httpx
import requests
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from opentelemetry.instrumentation.mtls import MTLSInstrumentor
from opentelemetry.instrumentation.mtls._cli.pki import Authority, Leaf
from opentelemetry.instrumentation.mtls._requests.client_hooks import ssl_object_of_response
from opentelemetry.instrumentation.mtls._requests.clients import ClientSettings, enrich_client_span

if TYPE_CHECKING:  # mypy, run from the repository's root, sees the directory as a package
    from benchmarks.handshake_overhead import median_ci, quartiles, versions
else:  # run as a script, the script's directory is on sys.path
    from handshake_overhead import median_ci, quartiles, versions

BASELINE: Final = "otel"
ENRICHED: Final = "otel+mtls"
IDENTITY: Final = "tls.server.subject"

SERVER: Final = r"""
import http.server, ssl, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

cert, key, ca = sys.argv[1:4]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
context.load_verify_locations(ca)
context.verify_mode = ssl.CERT_REQUIRED
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class Keep(SpanExporter):
    """Drops spans, but keeps the last one, to show what the client spans carried."""

    last: ReadableSpan | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.last = spans[-1]
        return SpanExportResult.SUCCESS


@dataclass
class Pki:
    ca: Authority
    server: Leaf
    client: Leaf

    def client_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(context)
        self.client.configure_cert(context)
        return context


@contextmanager
def server(pki: Pki) -> Iterator[str]:
    """Run the server in a child process; yield its URL."""
    command = [sys.executable, "-c", SERVER, pki.server.cert_path, pki.server.key_path]
    process = subprocess.Popen([*command, pki.ca.cert_path], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield f"https://localhost:{process.stdout.readline().strip()}/"
    finally:
        process.terminate()
        process.wait(10)


# -- the clients: each sends ``n`` requests over its one pooled connection -------------

Send = Callable[[int], None]


@contextmanager
def httpx_client(pki: Pki, url: str) -> Iterator[Send]:
    with httpx.Client(verify=pki.client_context()) as client:

        def send(n: int) -> None:
            for _ in range(n):
                client.get(url).raise_for_status()

        yield send


@contextmanager
def requests_session(pki: Pki, url: str) -> Iterator[Send]:
    # Per request: a session's own verify loses to REQUESTS_CA_BUNDLE.
    trust, cert = pki.ca.cert_path, (pki.client.cert_path, pki.client.key_path)
    with requests.Session() as session:

        def send(n: int) -> None:
            for _ in range(n):
                session.get(url, verify=trust, cert=cert, timeout=10).raise_for_status()

        yield send


@contextmanager
def aiohttp_session(pki: Pki, url: str) -> Iterator[Send]:
    with asyncio.Runner() as runner:

        async def open_session() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context()))

        session = runner.run(open_session())

        async def requests_(n: int) -> None:
            for _ in range(n):
                async with session.get(url) as response:
                    response.raise_for_status()
                    await response.read()

        try:
            yield lambda n: runner.run(requests_(n))
        finally:
            runner.run(session.close())


CLIENTS: Final[dict[str, tuple[Callable[[Pki, str], Any], Callable[[], Any]]]] = {
    "httpx": (httpx_client, HTTPXClientInstrumentor),
    "requests": (requests_session, RequestsInstrumentor),
    "aiohttp": (aiohttp_session, AioHttpClientInstrumentor),
}


# -- measuring ---------------------------------------------------------------------------


@dataclass
class Result:
    """The per-request figures of one library, over the rounds."""

    baseline_us: list[float]
    enriched_us: list[float]
    difference_us: list[float]
    ratio: list[float]
    noise: list[float]


def block(send: Send, n: int) -> float:
    """CPU microseconds per request of ``n`` requests."""
    gc.collect()
    cpu = time.process_time()
    send(n)
    return (time.process_time() - cpu) / n * 1e6


def measure(
    send: Send, switch: Callable[[bool], None], requests_per_block: int, rounds: int
) -> Result:
    """Alternate ``otel`` and ``otel+mtls`` blocks; compare each with its neighbours."""
    figures: list[tuple[str, float]] = []
    for index in range(2 * rounds + 1):
        enriched = index % 2 == 1
        switch(enriched)
        send(1)  # untimed: a new instrumentation derives the connection's identity once
        figures.append((ENRICHED if enriched else BASELINE, block(send, requests_per_block)))
    switch(False)
    baseline = [value for name, value in figures if name == BASELINE]
    enriched_values = [value for name, value in figures if name == ENRICHED]
    difference, ratio, noise = [], [], []
    for i in range(1, len(figures), 2):
        reference = (figures[i - 1][1] + figures[i + 1][1]) / 2
        difference.append(figures[i][1] - reference)
        ratio.append(figures[i][1] / reference)
    for i in range(2, len(figures) - 2, 2):
        noise.append(figures[i][1] / ((figures[i - 2][1] + figures[i + 2][1]) / 2))
    return Result(baseline, enriched_values, difference, ratio, noise)


def run(name: str, pki: Pki, url: str, args: argparse.Namespace, exporter: Keep) -> Result:
    open_client, instrumentor_class = CLIENTS[name]
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    contrib = instrumentor_class()
    contrib.instrument(tracer_provider=provider)
    mtls = MTLSInstrumentor()

    def switch(on: bool) -> None:
        if on and not mtls.is_instrumented_by_opentelemetry:
            mtls.instrument(tracer_provider=provider)
        elif not on and mtls.is_instrumented_by_opentelemetry:
            mtls.uninstrument()

    try:
        with open_client(pki, url) as send:
            switch(True)
            send(args.warmup)  # the connection, made with its handshake recorded
            enriched = exporter.last
            switch(False)
            send(args.warmup)
            gc.freeze()
            result = measure(send, switch, args.requests, args.rounds)
            gc.unfreeze()
    finally:
        switch(False)
        contrib.uninstrument()
    attributes = (enriched.attributes or {}) if enriched is not None else {}
    if IDENTITY not in attributes or not enriched or not enriched.links:
        raise SystemExit(f"{name}: the enriched client span has no server identity or link")
    return result


def isolated(pki: Pki, url: str, args: argparse.Namespace) -> Result:
    """The enrichment alone: a client span with and without it, over one real connection.

    The span is made as opentelemetry-instrumentation-httpx makes it (current, CLIENT,
    six attributes) and exported by the same processor; the enrichment is given a real
    httpx response of the pooled connection, as the hook on httpcore's pool is.
    """
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Keep()))
    tracer = provider.get_tracer("bench")
    mtls = MTLSInstrumentor()
    mtls.instrument(tracer_provider=provider)
    settings = ClientSettings()  # what instrument() makes by default: lean, no policy
    attributes = {
        "http.method": "GET",
        "http.url": url,
        "http.status_code": 200,
        "http.flavor": "1.1",
        "net.peer.name": "localhost",
        "net.peer.port": 443,
    }
    try:
        with httpx.Client(verify=pki.client_context()) as client, tracer.start_as_current_span("x"):
            response = client.get(url)  # the connection, its handshake recorded
    finally:
        mtls.uninstrument()

    def send(enrich: bool) -> Send:
        def requests_(n: int) -> None:
            for _ in range(n):
                with tracer.start_as_current_span(
                    "GET", kind=SpanKind.CLIENT, attributes=attributes
                ):
                    if enrich:
                        enrich_client_span(settings, response, ssl_object_of_response)

        return requests_

    with_, without = send(True), send(False)
    chosen = without

    def switch(on: bool) -> None:
        nonlocal chosen
        chosen = with_ if on else without

    gc.freeze()
    result = measure(lambda n: chosen(n), switch, args.requests * 20, args.rounds * 4)  # noqa: PLW0108  # chosen changes
    gc.unfreeze()
    return result


def summary(values: list[float], digits: int = 2) -> str:
    low, high = median_ci(values)
    q1, q3 = quartiles(values)
    median = statistics.median(values)
    d = digits
    return f"{median:.{d}f} [CI {low:.{d}f}..{high:.{d}f}, IQR {q1:.{d}f}..{q3:.{d}f}]"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per block")
    parser.add_argument("--rounds", type=int, default=15, help="otel+mtls blocks per library")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests first")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few small blocks")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.warmup = 30, 3, 20
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ca = Authority("client bench CA")
    pki = Pki(
        ca,
        ca.issue("server.bench", dns=("localhost",), ips=("127.0.0.1",)),
        ca.issue("client.bench", uris=("spiffe://bench.test/client",)),
    )
    print(__doc__.splitlines()[0])
    print(versions(("httpx", "requests", "aiohttp")))
    print(f"{args.rounds} rounds of {args.requests} requests per block, one pooled connection")
    print()
    print(
        f"{'client':9} {'otel us/req':>12} {'+mtls us/req':>13}  "
        "enrichment us/req, median [95% CI, IQR]"
    )
    print(f"{'':9} {'':>12} {'':>13}  ratio otel+mtls/otel; noise otel/otel")
    exporter = Keep()
    with server(pki) as url:
        alone = isolated(pki, url, args)
        enrichment_us = statistics.median(alone.difference_us)
        print(
            f"{'alone':9} {statistics.median(alone.baseline_us):12.1f} "
            f"{statistics.median(alone.enriched_us):13.1f}  {summary(alone.difference_us)}"
        )
        for name in args.clients.split(","):
            result = run(name, pki, url, args, exporter)
            print(
                f"{name:9} {statistics.median(result.baseline_us):12.1f} "
                f"{statistics.median(result.enriched_us):13.1f}  {summary(result.difference_us)}"
            )
            print(f"{'':9} {'':>12} {'':>13}  ratio {summary(result.ratio, 4)}")
            if result.noise:
                print(f"{'':9} {'':>12} {'':>13}  noise {summary(result.noise, 4)}")
            baseline = statistics.median(result.baseline_us)
            print(
                f"{'':9} {'':>12} {'':>13}  the enrichment alone against this client: "
                f"{enrichment_us:.2f} us, ratio {(baseline + enrichment_us) / baseline:.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
