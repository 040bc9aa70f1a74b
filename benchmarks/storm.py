"""A storm of failed mTLS handshakes on a uvicorn server while good clients keep working.

One process: a uvicorn server (asyncio loop, client certificates required) and an asyncio
TLS server with a short ``ssl_handshake_timeout`` (uvicorn has no such option, so the
stalling clients go there), both on 127.0.0.1 with ``MTLSInstrumentor`` on (SDK tracer
provider with a counting exporter, SDK meter provider with an in-memory reader). Worker
threads open ``--failures`` connections that fail their handshakes, evenly across five
kinds, in a shuffled order:

* ``untrusted``: a client certificate from a CA the server does not trust;
* ``no_certificate``: no client certificate at all;
* ``garbage``: plain HTTP, an SSH banner, zeros, TLS records that are no ClientHello;
* ``partial_hello``: the first bytes of a ClientHello, then the connection is closed;
* ``stall``: connect and send nothing, until the server's handshake timeout fires.

The failing clients run with instrumentation suppressed: they stand for other hosts.
Meanwhile good clients (httpx, each with its own certificate, a new connection every
``--per-connection`` requests) make at least ``--good`` requests between them, and go
on until the storm is over; the application answers with the identity
``client_identity()`` found.

Printed: failures counted in ``tls.server.handshake.duration`` against failures sent,
by ``error.type``; failed ``TLS server handshake`` spans; good requests answered with
the right identity and server spans that carry it, against requests sent; audit log
records and suppressed counts; RSS before and after the storm (VmRSS), and after a
garbage collection and ``malloc_trim``; the sizes of the connection registry, the audit
rate limiter, the peer-certificate registry and the certificate cache. Then the same
storm runs without the instrumentation in a fresh process (``--bare``; skip it with
``--no-bare``) for its RSS figures side by side: asyncio's SSL protocol holds a 256 KiB
buffer per connection until the cyclic garbage collector frees a failed one, so RSS grows
during a storm with or without us. Exits 0 whatever the figures; ``tests/test_storm.py``
asserts them for a few hundred failures.

Run: ``python benchmarks/storm.py [--failures N] [--good N] [--workers N] [--no-bare]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import random
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
from cryptography.x509.oid import NameOID
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from opentelemetry.instrumentation.mtls import MTLSInstrumentor, MTLSMiddleware, client_identity
from opentelemetry.instrumentation.mtls._cli.demo import uvicorn_thread
from opentelemetry.instrumentation.mtls._cli.pki import Authority, Leaf
from opentelemetry.instrumentation.mtls._diagnostics import bounded_state
from opentelemetry.instrumentation.mtls._signals.audit import (
    AUDIT_LOGGER_NAME,
    HANDSHAKE_FAILED,
)
from opentelemetry.instrumentation.mtls._x509 import CACHE_SIZE

KINDS: Final[dict[str, str]] = {
    "untrusted": "certificate_authority_invalid",
    "no_certificate": "certificate_required",
    "garbage": "unexpected_message",
    "partial_hello": "peer_connection_closed",
    "stall": "handshake_timeout",
}
"""Each kind of failing client, and the ``error.type`` its handshake must be counted as."""

GARBAGE: Final = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x00" * 64,
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x00\x05hello",  # a handshake record that is no ClientHello
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert before any handshake
    b"\x16\x03\x01\xff\xff" + b"A" * 100,  # a record longer than TLS allows
)
PARTIAL_HELLO: Final = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
CLIENT_TIMEOUT: Final = 30.0
SETTLE_TIMEOUT: Final = 30.0
PEER_CERTIFICATE_LIMIT: Final = 3
LOG_RATE_LIMIT: Final = 5
SERVER_FAILED_PREFIX: Final = "TLS server handshake failed"


# -- certificates -------------------------------------------------------------------------


@dataclass
class StormPKI:
    """The server's CA and certificate, the good clients' certificates, one untrusted one."""

    ca: Authority
    server: Leaf
    good: list[Leaf]
    untrusted: Leaf

    def client_context(self, cert: Leaf | None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        if cert is not None:
            cert.configure_cert(ctx)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.configure_cert(ctx)
        self.ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def make_pki(good_clients: int) -> StormPKI:
    """Issue the storm's certificates: ``good_clients`` distinct good identities."""
    ca = Authority("Storm CA")
    return StormPKI(
        ca=ca,
        server=ca.issue("server.test", dns=("localhost",), ips=("127.0.0.1",)),
        good=[
            ca.issue(f"good-{i}", uris=(f"spiffe://storm.test/good-{i}",))
            for i in range(good_clients)
        ],
        untrusted=Authority("Unknown CA").issue("intruder"),
    )


# -- the server side ----------------------------------------------------------------------


async def identity_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer every request with the subject of the client certificate the request has."""
    if scope["type"] != "http":
        return
    identity = client_identity(scope)
    body = json.dumps({"subject": identity.subject if identity else None}).encode()
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def instrumented_app(tracer_provider: TracerProvider) -> Any:
    """``identity_app`` inside the mTLS middleware, inside OpenTelemetry's ASGI middleware."""
    return OpenTelemetryMiddleware(
        MTLSMiddleware(identity_app),
        tracer_provider=tracer_provider,
        exclude_spans=["receive", "send"],
    )


@contextlib.contextmanager
def stalling_server(context: ssl.SSLContext, handshake_timeout: float) -> Iterator[int]:
    """An asyncio TLS server on loopback that gives up on handshakes after a short while.

    uvicorn passes no ``ssl_handshake_timeout`` to its loop (the default is 60 s), so the
    stalling clients are sent here. Yields the port.
    """
    started = threading.Event()
    where: dict[str, Any] = {}

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(
            handle, "127.0.0.1", 0, ssl=context, ssl_handshake_timeout=handshake_timeout
        )
        stop = asyncio.Event()
        where.update(port=server.sockets[0].getsockname()[1], loop=asyncio.get_running_loop())
        where["stop"] = stop
        started.set()
        await stop.wait()
        server.close()
        await server.wait_closed()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    if not started.wait(CLIENT_TIMEOUT):
        raise RuntimeError("the stalling server did not start")
    try:
        yield where["port"]
    finally:
        where["loop"].call_soon_threadsafe(where["stop"].set)
        thread.join(CLIENT_TIMEOUT)


# -- failing clients ----------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)


def _until_closed(sock: socket.socket | ssl.SSLSocket) -> None:
    """Read until the server hangs up; a reset or an alert is a hang-up too.

    A timeout is not: it would mean the server never decided, so it propagates.
    """
    try:
        while sock.recv(1024):
            pass
    except TimeoutError:
        raise
    except OSError:
        pass


def rejected_client(port: int, context: ssl.SSLContext) -> None:
    """Finish our side of a TLS 1.3 handshake that the server rejects; wait for its verdict."""
    with _connect(port) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="localhost")
        except TimeoutError:
            raise
        except OSError:
            return  # rejected before our side finished
        with tls:
            _until_closed(tls)


def garbage_client(port: int, payload: bytes) -> None:
    """Send bytes that are not a TLS handshake; wait for the server to hang up."""
    with _connect(port) as sock:
        sock.sendall(payload)
        _until_closed(sock)


def partial_hello_client(port: int) -> None:
    """Send the first bytes of a ClientHello and close the connection."""
    with _connect(port) as sock:
        sock.sendall(PARTIAL_HELLO)


def stalling_client(port: int) -> None:
    """Connect and say nothing until the server's handshake timeout closes the connection."""
    with _connect(port) as sock:
        _until_closed(sock)


# -- the storm ----------------------------------------------------------------------------


@dataclass
class Storm:
    """What was sent, and what the clients saw."""

    sent: Counter[str] = field(default_factory=Counter)
    """Failing connections by the ``error.type`` each must be counted as."""
    good_sent: int = 0
    good_right: int = 0
    """Good requests answered 200 with the subject of their own client certificate."""
    problems: list[str] = field(default_factory=list)
    """What went wrong on the client side that should not have (the first few)."""
    problem_count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def problem(self, text: str) -> None:
        with self._lock:
            self.problem_count += 1
            if len(self.problems) < 20:
                self.problems.append(text)

    def failed(self, error_type: str) -> None:
        with self._lock:
            self.sent[error_type] += 1

    def good(self, *, right: bool) -> None:
        with self._lock:
            self.good_sent += 1
            self.good_right += right


def plan(failures: int, seed: int = 0) -> list[str]:
    """``failures`` kinds, as even across KINDS as the number allows, in a shuffled order."""
    kinds = list(KINDS)
    order = [kinds[i % len(kinds)] for i in range(failures)]
    random.Random(seed).shuffle(order)
    return order


def common_name(leaf: Leaf) -> str:
    return str(leaf.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def good_client(
    port: int,
    leaf: Leaf,
    pki: StormPKI,
    storm: Storm,
    *,
    minimum: int,
    per_connection: int,
    stop: threading.Event,
    identified: bool = True,
) -> None:
    """Make requests as ``leaf`` until ``stop`` is set and ``minimum`` were made.

    A new connection (and handshake) every ``per_connection`` requests. Each answer must
    name ``leaf``'s subject, unless ``identified`` is false (no instrumentation).
    """
    context = pki.client_context(leaf)
    name = common_name(leaf)
    done = 0
    while done < minimum or not stop.is_set():
        with httpx.Client(verify=context, timeout=CLIENT_TIMEOUT) as http:
            for _ in range(per_connection):
                path = f"/{name}/{done}"
                done += 1
                try:
                    response = http.get(f"https://127.0.0.1:{port}{path}")
                except httpx.HTTPError as exc:
                    storm.good(right=False)
                    storm.problem(f"good request {path}: {exc!r}")
                    continue
                subject = response.json().get("subject") if response.status_code == 200 else None
                right = response.status_code == 200 and (
                    not identified or (subject is not None and subject.startswith(f"CN={name},"))
                )
                storm.good(right=right)
                if not right:
                    storm.problem(f"good request {path}: {response.status_code} {subject}")


def failing_job(
    kind: str, pki: StormPKI, tls_port: int, stall_port: int, payload: bytes
) -> Callable[[], None]:
    """The client of one failure of ``kind``."""
    if kind == "untrusted":
        return lambda: rejected_client(tls_port, pki.client_context(pki.untrusted))
    if kind == "no_certificate":
        return lambda: rejected_client(tls_port, pki.client_context(None))
    if kind == "garbage":
        return lambda: garbage_client(tls_port, payload)
    if kind == "partial_hello":
        return lambda: partial_hello_client(tls_port)
    return lambda: stalling_client(stall_port)


def attempt(storm: Storm, kind: str, job: Callable[[], None]) -> None:
    """Run one failing client; anything unexpected is noted, never raised."""
    # The failing clients stand for other hosts: their own TLS client handshakes are
    # not this server's telemetry (nor keys of its audit log's rate limiter).
    try:
        with suppress_instrumentation():
            job()
    except Exception as exc:
        storm.problem(f"{kind}: {exc!r}")


def run(
    pki: StormPKI,
    *,
    tls_port: int,
    stall_port: int,
    failures: int,
    good_requests: int,
    workers: int = 12,
    per_connection: int = 10,
    identified: bool = True,
) -> Storm:
    """Send the storm while good clients make requests; return once every client is done.

    Each good client makes its share of ``good_requests``, and goes on until the storm
    is over.
    """
    storm = Storm()
    jobs = []
    for i, kind in enumerate(plan(failures)):
        storm.sent[KINDS[kind]] += 1
        jobs.append((kind, failing_job(kind, pki, tls_port, stall_port, GARBAGE[i % len(GARBAGE)])))
    stop = threading.Event()
    good_threads = [
        threading.Thread(
            target=good_client,
            args=(tls_port, leaf, pki, storm),
            kwargs={
                "minimum": good_requests // len(pki.good),
                "per_connection": per_connection,
                "stop": stop,
                "identified": identified,
            },
        )
        for leaf in pki.good
    ]
    for thread in good_threads:
        thread.start()
    # Stalling clients only wait: they get their own, many threads, so that they do
    # not hold back the others.
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="storm") as pool,
        ThreadPoolExecutor(workers * 4, thread_name_prefix="stall") as stalls,
    ):
        for kind, job in jobs:
            (stalls if kind == "stall" else pool).submit(attempt, storm, kind, job)
    stop.set()
    for thread in good_threads:
        thread.join()
    return storm


# -- what was recorded --------------------------------------------------------------------


def handshake_counts(reader: InMemoryMetricReader) -> tuple[Counter[str], int]:
    """Server handshakes in ``tls.server.handshake.duration``: failures by error.type, successes."""
    failed: Counter[str] = Counter()
    succeeded = 0
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name != "tls.server.handshake.duration":
                    continue
                for point in metric.data.data_points:
                    assert isinstance(point, HistogramDataPoint)
                    error_type = point.attributes.get("error.type")
                    if error_type is None:
                        succeeded += point.count
                    else:
                        failed[str(error_type)] += point.count
    return failed, succeeded


def settle(reader: InMemoryMetricReader, sent: Counter[str]) -> Counter[str]:
    """Wait (bounded) until the server has recorded every failure it is due; return counts.

    A client that closes mid-handshake is done before the server has noticed.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        failed, _ = handshake_counts(reader)
        if failed == sent or time.monotonic() > deadline:
            return failed
        time.sleep(0.05)


class AuditLog(logging.Handler):
    """Keep the server's ``tls.handshake.failed`` records: (time, error.type, suppressed)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event.name", None) != HANDSHAKE_FAILED:
            return
        if not record.getMessage().startswith(SERVER_FAILED_PREFIX):
            return
        error_type = str(getattr(record, "error.type", ""))
        suppressed = int(getattr(record, "tls.log.suppressed_count", 0))
        self.records.append((record.created, error_type, suppressed))

    @contextlib.contextmanager
    def attached(self) -> Iterator[AuditLog]:
        logger = logging.getLogger(AUDIT_LOGGER_NAME)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)

    def by_type(self) -> dict[str, tuple[int, int]]:
        """error.type -> (records, suppressed counts they carry)."""
        result: dict[str, tuple[int, int]] = {}
        for _, error_type, suppressed in self.records:
            records, held = result.get(error_type, (0, 0))
            result[error_type] = (records + 1, held + suppressed)
        return result

    def over_the_limit(self, limit: int) -> dict[str, tuple[int, int]]:
        """error.type -> (records, allowed) where more were written than the limit allows.

        Each window of the limiter lasts at least a second and admits ``limit`` records,
        so records first..last fit in ``floor(last - first) + 1`` windows; one more is
        granted because ``created`` is taken a little after the limiter's clock.
        """
        times: dict[str, list[float]] = {}
        for created, error_type, _ in self.records:
            times.setdefault(error_type, []).append(created)
        over = {}
        for error_type, moments in times.items():
            allowed = limit * (int(max(moments) - min(moments)) + 2)
            if len(moments) > allowed:
                over[error_type] = (len(moments), allowed)
        return over


class CountingExporter(SpanExporter):
    """Count spans instead of keeping them: handshake outcomes, good requests' identities."""

    def __init__(self) -> None:
        self.failed_handshakes = 0
        self.server_spans = 0
        self.server_spans_with_identity = 0
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            for span in spans:
                attributes = span.attributes or {}
                if span.name == "TLS server handshake" and "error.type" in attributes:
                    self.failed_handshakes += 1
                elif span.kind is SpanKind.SERVER:
                    self.server_spans += 1
                    path = str(attributes.get("url.path", attributes.get("http.target", "")))
                    name = attributes.get("tls.client.x509.subject.common_name")
                    if "tls.client.subject" in attributes and path.split("/")[1] == name:
                        self.server_spans_with_identity += 1
        return SpanExportResult.SUCCESS


def internals() -> dict[str, int]:
    """Sizes of the package's bounded state: connections, rate limiter, peers, cache."""
    return bounded_state()


def rss_mb() -> float:
    """This process's resident set size (VmRSS), in MB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- the script ---------------------------------------------------------------------------


def rss_trimmed_mb() -> float:
    """RSS once garbage is collected and glibc has returned free heap pages to the system.

    asyncio's SSL protocol allocates a 256 KiB buffer per connection and a failed one
    is freed by the cyclic garbage collector, so many live at once during a storm; the
    allocator keeps their pages afterwards. This figure separates that from live memory.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mb()


@dataclass
class Result:
    """One storm's figures."""

    storm: Storm
    seconds: float
    rss_before: float
    rss_after: float
    rss_trimmed: float
    counted: Counter[str] = field(default_factory=Counter)
    succeeded: int = 0
    spans: CountingExporter | None = None
    audit: AuditLog | None = None
    sizes: dict[str, int] = field(default_factory=dict)


def measure(args: argparse.Namespace, *, instrumented: bool) -> Result:
    """Run the storm against uvicorn, with or without the instrumentation."""
    pki = make_pki(args.good_clients)
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    spans = CountingExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    instrumentor = MTLSInstrumentor()
    if instrumented:
        instrumentor.instrument(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            log_rate_limit=LOG_RATE_LIMIT,
            peer_certificate_limit=PEER_CERTIFICATE_LIMIT,
        )
    audit = AuditLog()
    app = instrumented_app(tracer_provider) if instrumented else identity_app
    try:
        with (
            uvicorn_thread(app, pki.server, pki.ca) as port,
            stalling_server(pki.server_context(), args.stall_timeout) as stall_port,
        ):
            # Warm up (imports, first allocations, caches) before the baseline.
            warm_up = run(
                pki,
                tls_port=port,
                stall_port=stall_port,
                failures=50,
                good_requests=8,
                identified=instrumented,
            )
            counted_before = settle(reader, warm_up.sent) if instrumented else Counter()
            rss_before = rss_mb()
            started = time.monotonic()
            with audit.attached():
                storm = run(
                    pki,
                    tls_port=port,
                    stall_port=stall_port,
                    failures=args.failures,
                    good_requests=args.good,
                    workers=args.workers,
                    per_connection=args.per_connection,
                    identified=instrumented,
                )
                if instrumented:
                    settle(reader, storm.sent + counted_before)
            seconds = time.monotonic() - started
        result = Result(storm, seconds, rss_before, rss_mb(), rss_trimmed_mb())
        if instrumented:
            counted, succeeded = handshake_counts(reader)
            result.counted = counted - counted_before
            result.succeeded = succeeded
            result.spans, result.audit, result.sizes = spans, audit, internals()
        return result
    finally:
        if instrumented:
            instrumentor.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()


def print_rss(label: str, result: Result) -> None:
    print(
        f"RSS {label}: {result.rss_before:.1f} MB before the storm, {result.rss_after:.1f} MB "
        f"after, growth {result.rss_after - result.rss_before:+.1f} MB "
        f"({result.rss_trimmed - result.rss_before:+.1f} MB after gc and malloc_trim)"
    )


def report(args: argparse.Namespace, result: Result) -> None:
    storm, counted = result.storm, result.counted
    print(
        f"storm: {sum(storm.sent.values())} failed handshakes from {args.workers} client "
        f"threads (+{args.workers * 4} stalling), {args.good_clients} good clients, "
        f"{result.seconds:.1f} s"
    )
    print()
    print(f"{'failures by error.type':34} {'counted':>8} {'sent':>8}")
    for error_type in sorted(set(storm.sent) | set(counted)):
        print(f"{error_type:34} {counted[error_type]:>8} {storm.sent[error_type]:>8}")
    print(f"{'total':34} {sum(counted.values()):>8} {sum(storm.sent.values()):>8}")
    if result.spans is not None:
        print(f"failed TLS server handshake spans (+50 warm-up): {result.spans.failed_handshakes}")
    print(f"successful server handshakes (warm-up included): {result.succeeded}")
    print()
    print(f"good requests succeeded, right identity: {storm.good_right} / {storm.good_sent} sent")
    if result.spans is not None:
        spans = result.spans
        print(
            f"server spans with the client's own tls.client.* (warm-up included): "
            f"{spans.server_spans_with_identity} / {spans.server_spans}"
        )
    print(f"client-side problems: {storm.problem_count}")
    for problem in storm.problems:
        print(f"  {problem}")
    print()
    if result.audit is not None:
        print(
            f"audit tls.handshake.failed records (limit {LOG_RATE_LIMIT}/s per peer, error.type):"
        )
        for error_type, (written, held) in sorted(result.audit.by_type().items()):
            print(
                f"  {error_type:32} {written:>6} written + {held:>6} suppressed "
                f"<= {storm.sent[error_type]:>6} failures"
            )
        print(f"  over the rate limit: {result.audit.over_the_limit(LOG_RATE_LIMIT) or 'none'}")
        print()
    print_rss("instrumented", result)
    limits = {
        "audit rate limiter keys": 4096,
        "peer certificates observed": PEER_CERTIFICATE_LIMIT,
        "certificate parse cache": CACHE_SIZE,
    }
    print("sizes after the storm, servers stopped:")
    for name, size in result.sizes.items():
        bound = limits.get(name)
        print(f"  {name:38} {size:>6}" + (f" (bound {bound})" if bound else ""))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--failures", type=int, default=10_000, help="failed handshakes")
    parser.add_argument("--good", type=int, default=400, help="good requests, at least")
    parser.add_argument("--good-clients", type=int, default=4, help="distinct good identities")
    parser.add_argument("--per-connection", type=int, default=10, help="requests a connection")
    parser.add_argument("--workers", type=int, default=12, help="failing client threads")
    parser.add_argument(
        "--stall-timeout", type=float, default=0.25, help="the stalling server's handshake timeout"
    )
    parser.add_argument(
        "--bare", action="store_true", help="without instrumentation: RSS and clients only"
    )
    parser.add_argument(
        "--no-bare", action="store_true", help="skip the uninstrumented run for comparison"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare:
        result = measure(args, instrumented=False)
        print_rss("without instrumentation", result)
        print(
            f"good requests succeeded, right identity: {result.storm.good_right} / "
            f"{result.storm.good_sent} sent; client-side problems: {result.storm.problem_count}"
        )
        return 0
    report(args, measure(args, instrumented=True))
    if not args.no_bare:
        # The same storm in a fresh process without the instrumentation: the RSS the
        # servers and clients themselves take, side by side with the figure above.
        argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-bare"]
        subprocess.run([sys.executable, __file__, *argv, "--bare"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
