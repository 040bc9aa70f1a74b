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
* ``lean``: the same, in a process where ``MTLSInstrumentor().instrument()`` ran before
  the server was made: the server opens every request and the middleware's server span
  gets the identity (the default, lean request attributes) and the link
  (``_requests/servers.py``, ``server_spans.py``);
* ``full``: the same with ``request_attributes="full"``
  (``OTEL_PYTHON_MTLS_REQUEST_ATTRIBUTES=full``);
* ``otel sampled-out`` and ``lean sampled-out``: ``otel`` and ``lean`` with a tracer
  provider whose sampler is ``ALWAYS_OFF``: what a request whose span is dropped costs.

Every ``OpenTelemetryMiddleware`` gets an SDK ``TracerProvider`` whose
``BatchSpanProcessor`` feeds a no-op exporter (queue and batch larger than any block,
a delay longer than the run: spans are flushed between blocks, outside the timed region);
gunicorn's access log is off. The inner application answers ``ok``.

A block is ``--requests`` requests to one server; its figure is the server process's
CPU time per request (``time.process_time_ns()`` of the worker process, all its threads,
read by a control request answered outside every middleware before and after the block;
the client's own CPU time is not counted). A round is one block of every variant, in an
order that rotates every round. Per round, each variant's ratio is its throughput (CPU
per request inverted) over the ``bare`` block's, and its added cost the difference in
microseconds; the enrichment's cost (what our instrumentation adds to a request: the ssl
hooks on each read and write, opening the request, the identity, its attributes and the
link) is ``lean`` (``full``) minus ``otel``, and ``lean sampled-out`` minus ``otel
sampled-out``, in the same round. Rounds are added in batches until the 95% confidence
interval of the median of every ratio lies within +-0.01 of it, or the time allowed is
spent (then it says so). The warm-up checks, on every variant's last span, what it records.

The request targets of issue 15 (at most 5 us per request by default, at most 2 us for a
sampled-out request) are printed, met or not; the script exits 0 either way.

Run: ``python benchmarks/wsgi_overhead.py [--requests N] [--max-seconds N] [--quick]``.
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

VARIANTS: Final = ("bare", "otel", "lean", "full", "otel sampled-out", "lean sampled-out")
ENRICHED: Final = ("lean", "full", "lean sampled-out")
SAMPLED_OUT: Final = ("otel sampled-out", "lean sampled-out")
ENRICHMENTS: Final = (("lean", "otel"), ("full", "otel"), ("lean sampled-out", "otel sampled-out"))
"""Each enriched variant and the variant it is compared with, in the same round."""
TARGETS_US: Final = {"lean": 5.0, "lean sampled-out": 2.0}
CI_HALF_WIDTH: Final = 0.01
BATCH: Final = 10
"""Rounds added between two looks at the confidence intervals."""
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
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    from opentelemetry.trace import SpanKind

    from opentelemetry.instrumentation.mtls import MTLSInstrumentor

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
    provider = TracerProvider(sampler=ALWAYS_OFF if variant in SAMPLED_OUT else None)
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=_BIG,
            max_export_batch_size=_BIG,
            schedule_delay_millis=3_600_000,
        )
    )
    if variant in ENRICHED:
        full = "full" if variant == "full" else "lean"
        MTLSInstrumentor().instrument(tracer_provider=provider, request_attributes=full)
    app: WSGIApp = inner_app
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
                "ours": sorted(key for key in attributes if key.startswith("tls.")),
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
        expected = 0 if name == "bare" or name in SAMPLED_OUT else count
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
        if name == "bare" or name in SAMPLED_OUT:
            report.append(f"  {name:<18} {count:,} requests, no spans")
            continue
        subject, ours = last["subject"], last["ours"]
        if name == "otel":
            good = subject is None and not last["links"] and not ours
        else:
            lean = "tls.protocol.version" not in ours
            good = (
                subject is not None
                and CLIENT_NAME in subject
                and last["links"] == 1
                and lean == (name == "lean")
            )
        if not good:
            raise RuntimeError(f"{name}: unexpected last server span: {last}")
        report.append(
            f"  {name:<18} {count:,} requests, {last['attributes']} attributes on the last "
            f"server span, {len(ours)} of them ours, {last['links']} link"
            + (f" ({', '.join(ours)})" if name == "lean" else "")
        )
    return report


def run_round(bench: Bench, r: int, count: int) -> dict[str, Block]:
    """One block of every variant, the order rotated by ``r``."""
    shift = r % len(VARIANTS)
    return {name: bench.block(name, count) for name in VARIANTS[shift:] + VARIANTS[:shift]}


def measure(bench: Bench, count: int, max_seconds: float) -> tuple[list[dict[str, Block]], bool]:
    """Add rounds in batches until every ratio's 95% CI is within +-0.01, or time is up."""
    rounds: list[dict[str, Block]] = []
    converged = False
    started = time.perf_counter()
    while not converged and time.perf_counter() - started < max_seconds:
        for _ in range(BATCH):
            rounds.append(run_round(bench, len(rounds), count))
        converged = all(half_width(values) <= CI_HALF_WIDTH for values in ratios(rounds).values())
    return rounds, converged


def ratios(rounds: list[dict[str, Block]]) -> dict[str, list[float]]:
    """Per round: each variant's throughput over the ``bare`` block's."""
    return {
        name: [r["bare"].us / r[name].us for r in rounds] for name in VARIANTS if name != "bare"
    }


def added(rounds: list[dict[str, Block]], name: str, reference: str = "bare") -> list[float]:
    """Per round: a variant's server CPU time per request minus its reference's, us."""
    return [r[name].us - r[reference].us for r in rounds]


def half_width(values: list[float]) -> float:
    """How far the 95% confidence interval of the median reaches from it."""
    median = statistics.median(values)
    low, high = median_ci(values)
    return max(median - low, high - median)


def spread(values: list[float], fmt: str) -> str:
    q1, q3 = quartiles(values)
    c1, c3 = median_ci(values)
    median = statistics.median(values)
    return f"{median:{fmt}} (IQR {q1:{fmt}}..{q3:{fmt}}, 95% CI {c1:{fmt}}..{c3:{fmt}})"


def report(rounds: list[dict[str, Block]], count: int, converged: bool) -> list[tuple[str, bool]]:
    ratio = ratios(rounds)
    print(f"\n{len(rounds)} rounds of {len(VARIANTS)} blocks of {count} requests")
    header = (
        f"  {'variant':<18} {'us/request':>10} {'+us vs bare':>11} {'ratio':>7} "
        f"{'ratio 95% CI':>15} {'+-':>6}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name in VARIANTS:
        us = statistics.median(r[name].us for r in rounds)
        if name == "bare":
            print(f"  {name:<18} {us:>10.2f} {'':>11} {1.0:>7.4f}")
            continue
        values = ratio[name]
        c1, c3 = median_ci(values)
        print(
            f"  {name:<18} {us:>10.2f} {statistics.median(added(rounds, name)):>+11.2f} "
            f"{statistics.median(values):>7.4f} {f'{c1:.4f}..{c3:.4f}':>15} "
            f"{half_width(values):>6.4f}"
        )
    widest = max(half_width(v) for v in ratio.values())
    verdict = "within" if converged else "NOT within"
    print(
        f"  (ratio: throughput over bare's, median of the rounds; +-: how far its 95% CI "
        f"reaches;\n   every ratio's CI {verdict} +-{CI_HALF_WIDTH}: widest +-{widest:.4f})"
    )
    wsgi = added(rounds, "otel")
    print(f"\nWSGI instrumentation's own cost (otel - bare): {spread(wsgi, '.2f')} us per request")
    checks: list[tuple[str, bool]] = []
    for name, reference in ENRICHMENTS:
        diffs = added(rounds, name, reference)
        median = statistics.median(diffs)
        print(f"enrichment, {name} - {reference}: {spread(diffs, '+.2f')} us per request")
        target = TARGETS_US.get(name)
        if target is not None:
            checks.append(
                (
                    f"{name}: enrichment <= {target:.0f} us per request: {median:.2f} us "
                    f"(95% CI upper bound {median_ci(diffs)[1]:.2f} us)",
                    median <= target,
                )
            )
    return checks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per block (default 400; --quick: 100)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="time allowed for the timed rounds before giving up on the +-0.01 intervals "
        "(default 600; --quick: 20)",
    )
    parser.add_argument("--quick", action="store_true", help="a ~40 s smoke run")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 100 if args.quick else 400
    if args.max_seconds is None:
        args.max_seconds = 20.0 if args.quick else 600.0
    if args.requests < 1 or args.max_seconds <= 0:
        parser.error("--requests must be at least 1 and --max-seconds positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.certs, args.port)
        return 0
    print(versions(("opentelemetry-instrumentation-wsgi", "gunicorn")))
    print(
        f"rounds of {len(VARIANTS)} blocks of {args.requests} requests, in batches of {BATCH}, "
        f"until every ratio's 95% CI is within +-{CI_HALF_WIDTH} (at most "
        f"{args.max_seconds:.0f} s); time = the worker process's CPU time per request, "
        "gunicorn gthread (1 worker), "
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
            rounds, converged = measure(bench, args.requests, args.max_seconds)
        finally:
            for server in servers.values():
                stop(server)
    print("requests and spans, warm-up included:")
    for name in VARIANTS:
        print(f"  {name:<22} {bench.requests[name]:>10,} requests, {bench.spans[name]:>10,} spans")
    checks = report(rounds, args.requests, converged)
    print("targets:")
    for text, met in checks:
        print(f"  [{'MET   ' if met else 'MISSED'}] {text}")
    print(f"\n{time.perf_counter() - started:.0f} s including warm-up and start-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
