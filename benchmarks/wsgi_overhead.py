"""CPU cost per request of the mTLS enrichment of WSGI server spans, against OTel's alone.

The WSGI sibling of ``asgi_overhead.py``, over real TLS servers: the instrumentation is
process-wide (the ssl hooks, the SDK's ``Tracer.start_span``, the server's patched
``load_wsgi``), so each variant is its own server, all running at once, and this
process is their one client. Each server is gunicorn (as a library, ``BaseApplication``)
with one ``gthread`` worker of two threads, forked from a master where the variant's
telemetry was set up, on 127.0.0.1 with ``--cert-reqs 2`` (TLS 1.3, ECDSA P-256) and a
keep-alive timeout longer than the run; the client keeps one mutual-TLS connection
(``http.client.HTTPSConnection`` with a client certificate) to each for the whole run,
so every timed request is a keep-alive request on a known connection: the steady state
(the connection's handshake and first request, which also describes the connection, are
in the warm-up). werkzeug's development server could not serve here: it closes every
connection after its response (``Connection: close``), so each request would pay a
handshake, which ``handshake_overhead.py`` measures.

Variants, one server process each:

* ``bare``: the inner WSGI application alone;
* ``otel``: ``OpenTelemetryMiddleware(inner)`` (opentelemetry-instrumentation-wsgi);
* ``otel+mtls``: the same, in a process where ``MTLSInstrumentor().instrument()`` ran
  before the server was made: the server opens every request and the middleware's server
  span gets the identity and the link (``_requests/servers.py``, ``server_spans.py``);
* ``otel+mtls+middleware``: the same with ``MTLSWSGIMiddleware`` inside
  ``OpenTelemetryMiddleware``, which finds the span already enriched.

Every ``OpenTelemetryMiddleware`` gets an SDK ``TracerProvider`` whose
``BatchSpanProcessor`` feeds a no-op exporter (queue and batch larger than any block,
a delay longer than the run: spans are flushed between blocks, outside the timed region);
gunicorn's access log is off. The inner application answers ``ok``.

A block is ``--requests`` requests to one server; its figure is the server process's
CPU time per request (``time.process_time_ns()`` of the worker process, all its threads, read by a
control request answered outside every middleware before and after the block; the
client's own CPU time is not counted). Blocks alternate in time, an ``otel`` block
between every two others, ``otel, A, otel, B, otel, C, otel, ...``, the order of
``bare``, ``otel+mtls`` and ``otel+mtls+middleware`` rotating every round; each
non-``otel`` block is compared with the mean of the two ``otel`` blocks around it: the
difference in microseconds and the ratio of throughputs (CPU per request inverted).
Medians, interquartile ranges and distribution-free 95% confidence intervals of the
medians are reported. The WSGI instrumentation's own cost is ``otel`` minus ``bare``;
the enrichment's (what our instrumentation adds to a request: the ssl hooks on each
read and write, opening the request, the identity, its attributes and the link) is
``otel+mtls`` minus ``otel``, also as a share of the WSGI instrumentation's cost, round
by round. The warm-up checks, on every variant's last span, that it is enriched or not.

ASGI's targets (at most 5 us per request, at most 2% of the instrumentation's own
cost) are printed for comparison, met or not; the script exits 0 either way.

Run: ``python benchmarks/wsgi_overhead.py [--blocks N] [--requests N] [--quick]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trustme

if TYPE_CHECKING:  # mypy, run from the repository's root, sees the directory as a package
    from benchmarks.handshake_overhead import (
        CLIENT_NAME,
        SERVER_NAME,
        median_ci,
        quartiles,
        versions,
    )
else:  # run as a script, the script's directory is on sys.path
    from handshake_overhead import CLIENT_NAME, SERVER_NAME, median_ci, quartiles, versions

BASELINE: Final = "otel"
OTHERS: Final = ("bare", "otel+mtls", "otel+mtls+middleware")
ENRICHED: Final = ("otel+mtls", "otel+mtls+middleware")
VARIANTS: Final = ("bare", BASELINE, *ENRICHED)
TARGET_US: Final = 5.0
TARGET_SHARE: Final = 0.02
SUBJECT: Final = "tls.client.subject"
HANDSHAKE: Final = "TLS server handshake"
CONTROL: Final = "/_bench/"
"""Paths under this are the bench's control requests, answered outside every middleware."""
START_TIMEOUT: Final = 30.0
_BIG: Final = 1 << 22

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


# -- the server processes -----------------------------------------------------------------


def inner_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def serve(variant: str, certs: Path, port: int) -> None:
    """Run one variant's gunicorn until it is sent SIGTERM."""
    from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.trace import SpanKind

    from opentelemetry.instrumentation.mtls import MTLSInstrumentor
    from opentelemetry.instrumentation.mtls._requests.wsgi import MTLSWSGIMiddleware

    class LastSpanExporter(SpanExporter):
        """A no-op exporter that counts spans and keeps the last one."""

        def __init__(self) -> None:
            self.count = 0
            self.last: ReadableSpan | None = None
            self.names: dict[str, int] = {}

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            for span in spans:
                self.names[span.name] = self.names.get(span.name, 0) + 1
                if span.kind is SpanKind.SERVER and span.name != HANDSHAKE:
                    self.count += 1
                    self.last = span
            return SpanExportResult.SUCCESS

    exporter = LastSpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=_BIG,
            max_export_batch_size=_BIG,
            schedule_delay_millis=3_600_000,
        )
    )
    if variant in ENRICHED:
        MTLSInstrumentor().instrument(tracer_provider=provider)
    app: WSGIApp = inner_app
    if variant == "otel+mtls+middleware":
        app = MTLSWSGIMiddleware(app)
    if variant != "bare":
        app = OpenTelemetryMiddleware(app, tracer_provider=provider)

    def control(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        if not path.startswith(CONTROL):
            return app(environ, start_response)
        if path == f"{CONTROL}cpu":
            answer: dict[str, Any] = {"cpu_ns": time.process_time_ns()}
        else:  # flush: export what the block made, and describe the last span
            provider.force_flush(30_000)
            last = exporter.last
            attributes = dict(last.attributes or {}) if last is not None else {}
            answer = {
                "spans": exporter.count,
                "subject": attributes.get(SUBJECT),
                "links": len(last.links) if last is not None else 0,
                "attributes": len(attributes),
                "names": exporter.names,
            }
        body = json.dumps(answer).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]

    class Service(BaseApplication):  # type: ignore[misc]  # gunicorn is untyped
        """gunicorn as a library: one gthread worker, forked from this instrumented master."""

        def load_config(self) -> None:
            for key, value in {
                "bind": f"127.0.0.1:{port}",
                "workers": 1,
                "worker_class": "gthread",
                "threads": 2,
                "keepalive": 3600,  # a block's connection never times out between its blocks
                "certfile": str(certs / "server.pem"),
                "keyfile": str(certs / "server.pem"),
                "ca_certs": str(certs / "ca.pem"),
                "cert_reqs": ssl.CERT_REQUIRED,
                "loglevel": "warning",
                "accesslog": None,
            }.items():
                self.cfg.set(key, value)

        def load(self) -> WSGIApp:
            return control

    Service().run()


# -- the client ---------------------------------------------------------------------------


@dataclass
class Server:
    variant: str
    process: subprocess.Popen[bytes]
    connection: http.client.HTTPSConnection

    def get(self, path: str) -> bytes:
        self.connection.request("GET", path, headers={"Host": SERVER_NAME})
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{self.variant}: {path} answered {response.status}")
        return body

    def control(self, what: str) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(self.get(f"{CONTROL}{what}"))
        return answer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(variant: str, certs: Path, client: ssl.SSLContext) -> Server:
    """Start one variant's gunicorn; connect once it answers (its first handshake)."""
    port = free_port()
    command = [sys.executable, __file__, "--serve", variant, "--certs", str(certs)]
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
    )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", port, context=client, timeout=START_TIMEOUT
        )
        server = Server(variant, process, connection)
        try:
            server.control("cpu")
            return server
        except OSError:
            connection.close()
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{variant}: the server did not start") from None
            time.sleep(0.2)


def stop(server: Server) -> None:
    server.connection.close()
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def write_certs(directory: Path) -> ssl.SSLContext:
    """Write the servers' certificate and CA; return the client's mutual-TLS context."""
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    server_cert = ca.issue_cert(SERVER_NAME, "127.0.0.1", key_type=trustme.KeyType.ECDSA)
    client_cert = ca.issue_cert(
        CLIENT_NAME, common_name=CLIENT_NAME, key_type=trustme.KeyType.ECDSA
    )
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = client.maximum_version = ssl.TLSVersion.TLSv1_3
    client_cert.configure_cert(client)
    ca.configure_trust(client)
    client.check_hostname = False  # connected by address; the certificate is still verified
    return client


@dataclass
class Block:
    variant: str
    requests: int
    cpu_ns: int

    @property
    def us(self) -> float:
        """The server's CPU time per request, microseconds."""
        return self.cpu_ns / self.requests / 1e3


class Bench:
    def __init__(self, servers: dict[str, Server]) -> None:
        self.servers = servers
        self.spans = dict.fromkeys(VARIANTS, 0)
        self.requests = dict.fromkeys(VARIANTS, 0)

    def block(self, name: str, count: int) -> Block:
        """``count`` requests on the server's kept-alive connection, its CPU time around them."""
        server = self.servers[name]
        before = server.control("cpu")["cpu_ns"]
        for _ in range(count):
            server.get("/")
        after = server.control("cpu")["cpu_ns"]
        flushed = server.control("flush")
        made = flushed["spans"] - self.spans[name]
        expected = 0 if name == "bare" else count
        if made != expected:
            raise RuntimeError(f"{name}: {count} requests made {made} spans: {flushed}")
        self.spans[name] = flushed["spans"]
        self.requests[name] += count
        return Block(name, count, after - before)


def warm_up(bench: Bench, count: int) -> list[str]:
    """Run every variant, and check on its last span that it is enriched or is not."""
    report = []
    for name in VARIANTS:
        bench.block(name, count)
        last = bench.servers[name].control("flush")
        if name == "bare":
            report.append(f"  {name:<22} {count:,} requests, no spans")
            continue
        enriched = name in ENRICHED
        subject = last["subject"]
        if enriched and (subject is None or CLIENT_NAME not in subject or last["links"] != 1):
            raise RuntimeError(f"{name}: the last server span is not enriched: {last}")
        if not enriched and (subject is not None or last["links"]):
            raise RuntimeError(f"{name}: the last server span is enriched: {last}")
        what = (
            f"{SUBJECT}={subject!r}, 1 link to the handshake span"
            if enriched
            else f"no {SUBJECT}, no link"
        )
        report.append(
            f"  {name:<22} {count:,} requests, {last['attributes']} attributes on the last "
            f"server span: {what}"
        )
    return report


def run(bench: Bench, rounds: int, count: int) -> list[Block]:
    """Blocks ``otel, A, otel, B, otel, C, otel, ...``; A-C rotate one step each round."""
    blocks = [bench.block(BASELINE, count)]
    for r in range(rounds):
        shift = r % len(OTHERS)
        for name in OTHERS[shift:] + OTHERS[:shift]:
            blocks.append(bench.block(name, count))
            blocks.append(bench.block(BASELINE, count))
    return blocks


# -- statistics and report ----------------------------------------------------------------


def _ratio(block: Block, before: Block, after: Block) -> float:
    """Throughput of ``block`` over the mean throughput of its two neighbours."""
    return (1 / block.us) / ((1 / before.us + 1 / after.us) / 2)


def summarize(blocks: list[Block]) -> dict[str, tuple[list[float], list[float]]]:
    """Per variant: (differences in us, throughput ratios) against its ``otel`` neighbours."""
    result: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in VARIANTS}
    base = [i for i, b in enumerate(blocks) if b.variant == BASELINE]
    for i, b in enumerate(blocks):
        if b.variant != BASELINE:
            before, after = blocks[i - 1], blocks[i + 1]
            result[b.variant][0].append(b.us - (before.us + after.us) / 2)
            result[b.variant][1].append(_ratio(b, before, after))
    for i, j, k in zip(base, base[1:], base[2:], strict=False):  # the noise of one difference
        result[BASELINE][0].append(blocks[j].us - (blocks[i].us + blocks[k].us) / 2)
        result[BASELINE][1].append(_ratio(blocks[j], blocks[i], blocks[k]))
    return result


def spread(values: list[float], fmt: str) -> str:
    q1, q3 = quartiles(values)
    c1, c3 = median_ci(values)
    median = statistics.median(values)
    return f"{median:{fmt}} (IQR {q1:{fmt}}..{q3:{fmt}}, 95% CI {c1:{fmt}}..{c3:{fmt}})"


def report(blocks: list[Block], count: int) -> list[tuple[str, bool]]:
    summary = summarize(blocks)
    base = [b.us for b in blocks if b.variant == BASELINE]
    q1, q3 = quartiles(base)
    print(
        f"\n{len(blocks)} blocks of {count:,} requests; otel blocks: "
        f"{statistics.median(base):.2f} us of server CPU per request, IQR {q1:.2f}..{q3:.2f}"
    )
    header = (
        f"  {'variant':<22} {'us/request':>10} {'- otel us':>9} {'IQR':>13} "
        f"{'median 95% CI':>13} {'ratio':>7} {'ratio IQR':>15}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name in VARIANTS:
        diffs, ratios = summary[name]
        us = statistics.median(b.us for b in blocks if b.variant == name)
        d1, d3 = quartiles(diffs)
        c1, c3 = median_ci(diffs)
        r1, r3 = quartiles(ratios)
        print(
            f"  {name:<22} {us:>10.2f} {statistics.median(diffs):>+9.2f} "
            f"{f'{d1:+.2f}..{d3:+.2f}':>13} {f'{c1:+.2f}..{c3:+.2f}':>13} "
            f"{statistics.median(ratios):>7.4f} {f'{r1:.4f}..{r3:.4f}':>15}"
        )
    print(
        "  (- otel: the block's server CPU time per request minus the mean of its two otel\n"
        "   neighbours'; ratio: its throughput over theirs; otel row: each inner otel block\n"
        "   against the two otel blocks around it, i.e. the noise floor of one difference)"
    )
    wsgi = [-d for d in summary["bare"][0]]
    print(f"\nWSGI instrumentation's own cost (otel - bare): {spread(wsgi, '.2f')} us per request")
    checks = []
    for name in ENRICHED:
        diffs = summary[name][0]
        share = [100 * d / c for d, c in zip(diffs, wsgi, strict=True) if c > 0]
        diff = statistics.median(diffs)
        print(f"enrichment cost, {name} - otel: {spread(diffs, '+.2f')} us per request")
        print(f"  = {spread(share, '.2f')} % of the WSGI instrumentation's cost, round by round")
        checks.append(
            (
                f"{name}: enrichment <= {TARGET_US:.0f} us per request: {diff:.2f} us "
                f"(95% CI upper bound {median_ci(diffs)[1]:.2f} us)",
                diff <= TARGET_US,
            )
        )
        checks.append(
            (
                f"{name}: enrichment <= {100 * TARGET_SHARE:.0f}% of the WSGI instrumentation's "
                f"cost: {statistics.median(share):.2f} % "
                f"(95% CI upper bound {median_ci(share)[1]:.2f} %)",
                statistics.median(share) <= 100 * TARGET_SHARE,
            )
        )
    return checks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="block rounds; each round is one block of bare, otel+mtls and "
        "otel+mtls+middleware, each followed by an otel block (default 40; --quick: 8)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per block (default 400; --quick: 200)",
    )
    parser.add_argument("--quick", action="store_true", help="a ~15 s smoke run")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.blocks is None:
        args.blocks = 8 if args.quick else 40
    if args.requests is None:
        args.requests = 200 if args.quick else 400
    if args.blocks < 1 or args.requests < 1:
        parser.error("--blocks and --requests must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.certs, args.port)
        return 0
    print(versions(("opentelemetry-instrumentation-wsgi", "gunicorn")))
    print(
        f"{args.blocks} rounds x {2 * len(OTHERS)} blocks (+1) of {args.requests} requests; "
        "time = the worker process's CPU time per request, gunicorn gthread (1 worker), "
        "one kept-alive mutual-TLS 1.3 connection per server"
    )
    sys.stdout.flush()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        client = write_certs(Path(tmp))
        servers: dict[str, Server] = {}
        try:
            for name in VARIANTS:
                servers[name] = start(name, Path(tmp), client)
            bench = Bench(servers)
            print("sanity (warm-up, checked on each variant's last exported span):")
            print("\n".join(warm_up(bench, args.requests)))
            sys.stdout.flush()
            blocks = run(bench, args.blocks, args.requests)
        finally:
            for server in servers.values():
                stop(server)
    print("requests and spans, warm-up included:")
    for name in VARIANTS:
        print(f"  {name:<22} {bench.requests[name]:>10,} requests, {bench.spans[name]:>10,} spans")
    checks = report(blocks, args.requests)
    print("ASGI's targets, for comparison:")
    for text, met in checks:
        print(f"  [{'MET   ' if met else 'MISSED'}] {text}")
    print(f"\n{time.perf_counter() - started:.0f} s including warm-up and start-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
