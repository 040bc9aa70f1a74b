"""CPU cost per request of the mTLS enrichment of ASGI server spans, against OTel's alone.

No server and no sockets: the ASGI applications are called directly on one asyncio event
loop, one request after another, each with a fresh ``http`` scope (GET ``/`` over https
from ``127.0.0.1:50000`` to ``127.0.0.1:8443``), a ``receive`` that returns one
``http.request`` message and a ``send`` that discards. The inner application answers
with ``http.response.start`` and ``http.response.body``.

Before anything is timed, ONE connection is made current (``CURRENT``, the context
variable that a followed server's protocol callbacks set, and that every request task
inherits), built as the ssl hooks and ``ServerConnections.describe`` build it: from a
real TLS 1.3 mutual-TLS handshake (ECDSA P-256 on both sides, over memory BIOs), its
record linked to a real SDK span, as if that span were the connection's
``TLS server handshake`` span. Every request is thus a keep-alive request on a known
connection: the steady state that the target is about (the first request of a
connection also derives and caches its attributes and TLS extension; that one-off cost
is not measured here).

Variants:

* ``bare``: the inner application alone;
* ``otel``: ``OpenTelemetryMiddleware(inner)`` (opentelemetry-instrumentation-asgi);
* ``otel+middleware``: ``OpenTelemetryMiddleware(MTLSMiddleware(inner))``;
* ``otel+hook``: ``OpenTelemetryMiddleware(inner, server_request_hook=...)`` with the
  package's composed hook, which is what ``MTLSInstrumentor`` (zero-code) installs.

Every ``OpenTelemetryMiddleware`` gets an SDK ``TracerProvider`` whose
``BatchSpanProcessor`` feeds a no-op exporter, and ``exclude_spans=["receive", "send"]``,
so each request makes exactly one span, its server span. The processor's queue and batch
are larger than any block and its worker never wakes during a block: spans are exported
by a flush after each block, outside the timed region (what is timed includes ending the
span and queueing it). No meter provider is passed: the middleware's metrics go to the
global one, the API's no-op unless something set it. After the warm-up, the heap is
frozen (``gc.freeze``) and each block starts after a full collection, so no block pays
for collecting what an earlier one left or for scanning the long-lived heap.

Blocks alternate in time, an ``otel`` block between every two others:
``otel, A, otel, B, otel, C, otel, ...`` with the order of ``bare``, ``otel+middleware``
and ``otel+hook`` rotating every round. A block's figure is its process CPU time per
request; each non-``otel`` block is compared with the mean of the two ``otel`` blocks
around it (the difference in microseconds, and the ratio of throughputs). The medians
and interquartile ranges over the rounds are reported, with a distribution-free 95%
confidence interval of each median. The ASGI instrumentation's own cost is ``otel``
minus ``bare``; the enrichment's cost is ``otel+middleware`` (or ``otel+hook``) minus
``otel``, and its share of the ASGI instrumentation's cost is taken round by round (each
round has one block of every variant). The ``otel`` row of the table compares every
inner ``otel`` block with the two ``otel`` blocks around it: the noise of one difference.

Targets (from the issue): the enrichment costs at most 5 us per request, and at most 2%
of what the ASGI instrumentation itself costs. Both are reported, met or not; the script
exits 0 either way.

Run: ``python benchmarks/asgi_overhead.py [--seconds N] [--blocks N] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ssl
import statistics
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanContext, SpanKind

from opentelemetry.instrumentation.mtls import MTLSMiddleware
from opentelemetry.instrumentation.mtls._requests.asgi import compose_server_request_hook
from opentelemetry.instrumentation.mtls._requests.connection import CURRENT, Connection
from opentelemetry.instrumentation.mtls._ssl.record import HandshakeRecord, fill_success

if TYPE_CHECKING:  # mypy, run from the repository's root, sees the directory as a package
    from benchmarks.handshake_overhead import (
        handshake,
        make_pki,
        median_ci,
        quartiles,
        versions,
    )
else:  # run as a script, the script's directory is on sys.path
    from handshake_overhead import (
        handshake,
        make_pki,
        median_ci,
        quartiles,
        versions,
    )

SERVER_ADDRESS: Final = ("127.0.0.1", 8443)
CLIENT_ADDRESS: Final = ("127.0.0.1", 50000)
BASELINE: Final = "otel"
OTHERS: Final = ("bare", "otel+middleware", "otel+hook")
ENRICHED: Final = ("otel+middleware", "otel+hook")
VARIANTS: Final = ("bare", BASELINE, *ENRICHED)
TARGET_US: Final = 5.0
TARGET_SHARE: Final = 0.02
SUBJECT: Final = "tls.client.subject"
_CHUNK: Final = 32
"""Requests between two looks at the clock."""
_BIG: Final = 1 << 22
"""Queue and batch size of the span processor: more than any block makes."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEADERS: Final = [
    (b"host", b"server.bench.example:8443"),
    (b"user-agent", b"bench/1.0"),
    (b"accept", b"*/*"),
]
_REQUEST: Final = {"type": "http.request", "body": b"", "more_body": False}


# -- the ASGI side ------------------------------------------------------------------------


def new_scope() -> Scope:
    """A fresh scope per request, as a server makes one (the enrichment writes to it)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "https",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": HEADERS,
        "server": SERVER_ADDRESS,
        "client": CLIENT_ADDRESS,
        "state": {},
    }


async def receive() -> Message:
    return _REQUEST


async def send(message: Message) -> None:
    pass


async def inner_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def serve(app: ASGIApp, *, seconds: float = 0.0, count: int = 0) -> Block:
    """Run requests through ``app``: for ``seconds`` of wall time, or ``count`` requests."""
    clock, cpu_clock = time.perf_counter, time.process_time
    n = 0
    scope = new_scope()
    wall0, cpu0 = clock(), cpu_clock()
    if count:
        for _ in range(count):
            scope = new_scope()
            await app(scope, receive, send)
        n = count
    else:
        deadline = wall0 + seconds
        while True:
            for _ in range(_CHUNK):
                scope = new_scope()
                await app(scope, receive, send)
            n += _CHUNK
            if clock() >= deadline:
                break
    cpu1, wall1 = cpu_clock(), clock()
    return Block("", n, cpu1 - cpu0, wall1 - wall0, scope)


# -- telemetry plumbing -------------------------------------------------------------------


class CountingExporter(SpanExporter):
    """A no-op exporter that counts spans (and keeps them while ``keep`` is set)."""

    def __init__(self) -> None:
        self.count = 0
        self.keep = False
        self.kept: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        if self.keep:
            self.kept.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def sdk_tracer_provider() -> tuple[TracerProvider, CountingExporter]:
    exporter = CountingExporter()
    provider = TracerProvider()
    # The worker never wakes during a block (queue and batch larger than any block, a
    # delay longer than the run): spans are exported by ``force_flush``, between blocks.
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=_BIG,
            max_export_batch_size=_BIG,
            schedule_delay_millis=3_600_000,
        )
    )
    return provider, exporter


def flush(provider: TracerProvider) -> None:
    if not provider.force_flush(30_000):
        raise RuntimeError("force_flush timed out")


@dataclass
class Fixture:
    """The registered connection and what keeps it alive for the run."""

    record: HandshakeRecord
    ssl_objects: tuple[ssl.SSLObject, ssl.SSLObject]
    handshake_span: SpanContext
    subject: str
    """The client certificate's subject, which enriched server spans must carry."""


def register_connection(provider: TracerProvider) -> Fixture:
    """Make one connection current, as a followed server's callbacks do for its requests."""
    server, client = handshake(make_pki())
    if server.version() != "TLSv1.3" or not server.getpeercert(True):
        raise RuntimeError("not a TLS 1.3 mutual-TLS handshake")
    record = HandshakeRecord(server_side=True, start_ns=0, end_ns=0)
    fill_success(record, server, capture_chain=False)
    subject = record.peer_certificate.subject if record.peer_certificate else None
    if record.verify_result != "success" or subject is None:
        raise RuntimeError(f"no verified client subject: {record}")
    span = provider.get_tracer("bench.asgi_overhead").start_span(
        "TLS server handshake", kind=SpanKind.SERVER
    )
    span.end()
    record.span_context = span.get_span_context()
    record.local_address, record.peer_address = SERVER_ADDRESS, CLIENT_ADDRESS
    connection = Connection(SERVER_ADDRESS, CLIENT_ADDRESS, record, weakref.ref(server))
    CURRENT.set(connection)  # the loop's tasks copy this context: each request sees it
    return Fixture(record, (server, client), record.span_context, subject)


def build_apps(provider: TracerProvider) -> dict[str, ASGIApp]:
    def otel(app: ASGIApp, **kwargs: Any) -> ASGIApp:
        middleware: ASGIApp = OpenTelemetryMiddleware(
            app, tracer_provider=provider, exclude_spans=["receive", "send"], **kwargs
        )
        return middleware

    return {
        "bare": inner_app,
        "otel": otel(inner_app),
        "otel+middleware": otel(MTLSMiddleware(inner_app)),
        "otel+hook": otel(inner_app, server_request_hook=compose_server_request_hook(None)),
    }


# -- measurement --------------------------------------------------------------------------


@dataclass
class Block:
    variant: str
    requests: int
    cpu: float
    wall: float
    last_scope: Scope | None = None

    @property
    def us(self) -> float:
        """Process CPU time per request, microseconds."""
        return self.cpu / self.requests * 1e6


@dataclass
class Bench:
    loop: asyncio.AbstractEventLoop
    apps: dict[str, ASGIApp]
    provider: TracerProvider
    exporter: CountingExporter
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VARIANTS, 0))
    spans: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VARIANTS, 0))

    def block(self, name: str, *, seconds: float = 0.0, count: int = 0) -> Block:
        before = self.exporter.count
        gc.collect()
        block = self.loop.run_until_complete(serve(self.apps[name], seconds=seconds, count=count))
        block.variant = name
        flush(self.provider)
        made = self.exporter.count - before
        expected = 0 if name == "bare" else block.requests
        if made != expected:
            raise RuntimeError(f"{name}: {block.requests} requests made {made} spans")
        self.requests[name] += block.requests
        self.spans[name] += made
        return block


def warm_up(bench: Bench, fixture: Fixture) -> list[str]:
    """Run every variant, and check on its spans that it enriches or does not."""
    report = []
    for name in VARIANTS:
        bench.exporter.keep, bench.exporter.kept = True, []
        block = bench.block(name, count=2000)
        bench.exporter.keep = False
        spans = bench.exporter.kept
        extension = ((block.last_scope or {}).get("extensions") or {}).get("tls")
        if name == "bare":
            if spans:
                raise RuntimeError("bare: made spans")
            report.append(f"  {name:<16} {block.requests:,} requests, no spans")
            continue
        server = [s for s in spans if s.kind is SpanKind.SERVER]
        if len(server) != len(spans) or len(spans) != block.requests:
            raise RuntimeError(f"{name}: {len(spans)} spans for {block.requests} requests")
        enriched = name in ENRICHED
        for span in server:
            attributes = span.attributes or {}
            links = [link.context for link in span.links]
            if enriched and (
                attributes.get(SUBJECT) != fixture.subject or links != [fixture.handshake_span]
            ):
                raise RuntimeError(f"{name}: a server span is not enriched: {span.to_json()}")
            if not enriched and (SUBJECT in attributes or links):
                raise RuntimeError(f"{name}: a server span is enriched: {span.to_json()}")
        if enriched != isinstance(extension, dict):
            raise RuntimeError(f"{name}: scope TLS extension is {extension!r}")
        last = server[-1]
        what = (
            f"{SUBJECT}={(last.attributes or {})[SUBJECT]!r}, 1 link to the handshake span, "
            f"TLS extension in the scope"
            if enriched
            else f"no {SUBJECT}, no link, no TLS extension"
        )
        report.append(
            f"  {name:<16} {len(server):,} server spans of {block.requests:,} requests, "
            f"{len(last.attributes or {})} attributes on the last: {what}"
        )
    return report


def run(bench: Bench, rounds: int, block_seconds: float) -> list[Block]:
    """Blocks ``otel, A, otel, B, otel, C, otel, ...``; A-C rotate one step each round."""
    blocks = [bench.block(BASELINE, seconds=block_seconds)]
    for r in range(rounds):
        shift = r % len(OTHERS)
        for name in OTHERS[shift:] + OTHERS[:shift]:
            blocks.append(bench.block(name, seconds=block_seconds))
            blocks.append(bench.block(BASELINE, seconds=block_seconds))
    return blocks


# -- statistics and report ----------------------------------------------------------------


@dataclass
class Summary:
    variant: str
    us: float
    """Median CPU time per request of the variant's blocks."""
    diffs: list[float]
    """Per block: its time per request minus its ``otel`` neighbours' mean, us."""
    ratios: list[float]
    """Per block: its throughput over its ``otel`` neighbours' mean throughput."""

    @property
    def diff(self) -> float:
        return statistics.median(self.diffs)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def spread(values: list[float], fmt: str) -> str:
    q1, q3 = quartiles(values)
    c1, c3 = median_ci(values)
    median = statistics.median(values)
    return f"{median:{fmt}} (IQR {q1:{fmt}}..{q3:{fmt}}, 95% CI {c1:{fmt}}..{c3:{fmt}})"


def summarize(blocks: list[Block]) -> dict[str, Summary]:
    """Compare each non-baseline block with the mean of the two ``otel`` blocks around it."""
    base = [i for i, b in enumerate(blocks) if b.variant == BASELINE]
    diffs: dict[str, list[float]] = {name: [] for name in OTHERS}
    ratios: dict[str, list[float]] = {name: [] for name in OTHERS}
    for i, b in enumerate(blocks):
        if b.variant == BASELINE:
            continue
        before, after = blocks[i - 1], blocks[i + 1]
        reference = (before.us + after.us) / 2
        diffs[b.variant].append(b.us - reference)
        ratios[b.variant].append(_ratio(b, before, after))
    noise = [
        (blocks[j].us - (blocks[i].us + blocks[k].us) / 2, _ratio(blocks[j], blocks[i], blocks[k]))
        for i, j, k in zip(base, base[1:], base[2:], strict=False)
    ] or [(0.0, 1.0)]
    result = {
        BASELINE: Summary(
            BASELINE,
            statistics.median(blocks[i].us for i in base),
            [d for d, _ in noise],
            [r for _, r in noise],
        )
    }
    for name in OTHERS:
        result[name] = Summary(
            name,
            statistics.median(b.us for b in blocks if b.variant == name),
            diffs[name],
            ratios[name],
        )
    return result


def _ratio(block: Block, before: Block, after: Block) -> float:
    """Throughput of ``block`` over the mean throughput of its two neighbours."""
    rate = 1 / block.us
    return rate / ((1 / before.us + 1 / after.us) / 2)


def shares(summary: dict[str, Summary]) -> dict[str, list[float]]:
    """Per round: each enriched variant's cost as a share of that round's ASGI cost.

    Every round has one block of each variant, so the ``i``-th differences of two
    variants come from the same round.
    """
    asgi = [-d for d in summary["bare"].diffs]
    return {
        name: [
            enrichment / cost
            for enrichment, cost in zip(summary[name].diffs, asgi, strict=True)
            if cost > 0
        ]
        for name in ENRICHED
    }


def print_table(summary: dict[str, Summary], blocks: list[Block], block_seconds: float) -> None:
    base = [b.us for b in blocks if b.variant == BASELINE]
    q1, q3 = quartiles(base)
    requests = statistics.median(b.requests for b in blocks if b.variant == BASELINE)
    print(
        f"\n{len(blocks)} blocks of {block_seconds * 1e3:.0f} ms (~{requests:,.0f} otel "
        f"requests each); otel blocks: {statistics.median(base):.2f} us per request, "
        f"IQR {q1:.2f}..{q3:.2f}"
    )
    header = (
        f"  {'variant':<16} {'us/request':>10} {'- otel us':>9} {'IQR':>13} "
        f"{'median 95% CI':>13} {'ratio':>7} {'ratio IQR':>15}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name in VARIANTS:
        s = summary[name]
        d1, d3 = quartiles(s.diffs)
        c1, c3 = median_ci(s.diffs)
        r1, r3 = quartiles(s.ratios)
        print(
            f"  {name:<16} {s.us:>10.2f} {s.diff:>+9.2f} {f'{d1:+.2f}..{d3:+.2f}':>13} "
            f"{f'{c1:+.2f}..{c3:+.2f}':>13} {s.ratio:>7.4f} {f'{r1:.4f}..{r3:.4f}':>15}"
        )
    print(
        "  (- otel: the block's CPU time per request minus the mean of its two otel "
        "neighbours';\n   ratio: its throughput over theirs; otel row: each inner otel block "
        "against\n   the two otel blocks around it, i.e. the noise floor of one difference)"
    )


def print_costs(
    summary: dict[str, Summary], share: dict[str, list[float]]
) -> list[tuple[str, bool]]:
    asgi = [-d for d in summary["bare"].diffs]
    asgi_us = statistics.median(asgi)
    print(f"\nASGI instrumentation's own cost (otel - bare): {spread(asgi, '.2f')} us per request")
    checks: list[tuple[str, bool]] = []
    for name in ENRICHED:
        s = summary[name]
        shares_pct = [100 * x for x in share[name]]
        share_pct = statistics.median(shares_pct)
        print(f"enrichment cost, {name} - otel: {spread(s.diffs, '+.2f')} us per request")
        print(
            f"  = {spread(shares_pct, '.2f')} % of the ASGI instrumentation's cost, "
            f"round by round ({100 * s.diff / asgi_us:.2f} % as a ratio of the medians)"
        )
        checks.append(
            (
                f"{name}: enrichment <= {TARGET_US:.0f} us per request: {s.diff:.2f} us "
                f"(95% CI upper bound {median_ci(s.diffs)[1]:.2f} us)",
                s.diff <= TARGET_US,
            )
        )
        checks.append(
            (
                f"{name}: enrichment <= {100 * TARGET_SHARE:.0f}% of the ASGI "
                f"instrumentation's cost: {share_pct:.2f} % "
                f"(95% CI upper bound {median_ci(shares_pct)[1]:.2f} %)",
                share_pct <= 100 * TARGET_SHARE,
            )
        )
    return checks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="total time of the timed blocks (default 50; --quick: 7)",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="block rounds; each round is one block of bare, otel+middleware and otel+hook, "
        "each followed by an otel block (default 400; --quick: 60)",
    )
    parser.add_argument("--quick", action="store_true", help="a ~10 s smoke run")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 7.0 if args.quick else 50.0
    if args.blocks is None:
        args.blocks = 60 if args.quick else 400
    if args.seconds <= 0 or args.blocks < 1:
        parser.error("--seconds must be positive and --blocks at least 1")
    return args


class _OldRegistry:
    """The address-keyed registry this tie replaced (its ``get``, as it was)."""

    def __init__(self) -> None:
        self._entries: dict[Any, Connection] = {}

    def get(self, key: Any) -> Connection | None:
        return self._entries.get(key)


def tie_costs(connection: Connection, rounds: int = 15, loops: int = 200_000) -> None:
    """Print what finding a request's connection costs: the old look-up against the new tie.

    ``registry``: what the address-keyed registry did per request, as it was: a function
    that builds the key from the scope's ``server`` and ``client`` and calls the
    registry's ``get``. ``context``: what the new tie does per request: one call of a
    followed protocol's shadowed ``data_received`` (the package's own stand-in, around a
    protocol method that does nothing; a request takes at least one chunk of bytes), and
    the request's ``current()`` with the cross-check of the scope's ``server``. Rounds
    alternate; the medians are printed side by side, each less an empty loop's.
    """
    from opentelemetry.instrumentation.mtls._requests.connection import current, track

    scope = {"server": SERVER_ADDRESS, "client": CLIENT_ADDRESS}
    registry = _OldRegistry()
    registry._entries[(SERVER_ADDRESS, CLIENT_ADDRESS)] = connection

    def old_connection(scope: dict[str, Any]) -> Connection | None:
        server, client = scope.get("server"), scope.get("client")
        if not server or not client:
            return None
        return registry.get(((server[0], server[1]), (client[0], client[1])))

    class Protocol:
        def connection_made(self, transport: Any) -> None:
            pass

        def data_received(self, data: bytes) -> None:
            pass

        def connection_lost(self, exc: BaseException | None) -> None:
            pass

    protocol = track(Protocol, lambda transport: connection)()
    protocol.connection_made(None)
    data = b"GET / HTTP/1.1"

    def old() -> None:
        for _ in range(loops):
            Protocol.data_received(protocol, data)  # the unshadowed callback
            old_connection(scope)

    def new() -> None:
        token = CURRENT.set(connection)  # what the request's task inherited
        for _ in range(loops):
            protocol.data_received(data)
            found = current()
            if found is None or scope["server"] != found.local:
                raise RuntimeError("the tie found no connection")
        CURRENT.reset(token)

    def empty() -> None:
        for _ in range(loops):
            pass

    results: dict[str, list[float]] = {"registry": [], "context": [], "loop": []}
    for _ in range(rounds):
        for name, body in (("registry", old), ("context", new), ("loop", empty)):
            start = time.process_time()
            body()
            results[name].append((time.process_time() - start) / loops * 1e9)
    floor = statistics.median(results["loop"])
    old_ns = statistics.median(results["registry"]) - floor
    new_ns = statistics.median(results["context"]) - floor
    print("finding the request's connection (per request, an empty loop's cost subtracted):")
    print(f"  registry look-up by scope addresses (replaced): {old_ns:6.0f} ns")
    print(f"  connection context (callback stand-in, get):    {new_ns:6.0f} ns")
    print(f"  ratio context / registry: {new_ns / old_ns:.2f}")
    protocol.connection_lost(None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rounds: int = args.blocks
    block_count = 1 + rounds * 2 * len(OTHERS)
    block_seconds = args.seconds / block_count
    print(versions(("opentelemetry-instrumentation-asgi", "asgiref")))
    print(
        f"{rounds} rounds x {2 * len(OTHERS)} blocks (+1) of {block_seconds * 1e3:.1f} ms; "
        "time = process CPU time per request, ASGI apps called directly on one asyncio loop"
    )
    sys.stdout.flush()

    started = time.perf_counter()
    provider, exporter = sdk_tracer_provider()
    loop = asyncio.new_event_loop()
    try:
        fixture = register_connection(provider)
        flush(provider)
        record = fixture.record
        print(
            f"connection: {SERVER_ADDRESS[0]}:{SERVER_ADDRESS[1]} <- "
            f"{CLIENT_ADDRESS[0]}:{CLIENT_ADDRESS[1]}, TLS {record.protocol_version} "
            f"{record.cipher}, client {fixture.subject!r}, "
            f"verify {record.verify_result}"
        )
        bench = Bench(loop, build_apps(provider), provider, exporter)
        sanity = warm_up(bench, fixture)
        print("sanity (warm-up, checked on every exported span and on the last scope):")
        print("\n".join(sanity))
        sys.stdout.flush()
        # Everything made so far lives for the run: out of the collector's sight, so that
        # the full collection before each block costs nothing and no block pays for a
        # collection of the whole heap.
        gc.collect()
        gc.freeze()
        try:
            blocks = run(bench, rounds, block_seconds)
        finally:
            gc.unfreeze()
        if CURRENT.get() is None:
            raise RuntimeError("the connection was lost during the run")
    finally:
        loop.close()
        provider.shutdown()
        CURRENT.set(None)

    print("requests and spans, warm-up included:")
    for name in VARIANTS:
        print(f"  {name:<16} {bench.requests[name]:>10,} requests, {bench.spans[name]:>10,} spans")

    summary = summarize(blocks)
    print_table(summary, blocks, block_seconds)
    tie_costs(Connection(SERVER_ADDRESS, CLIENT_ADDRESS, fixture.record))
    checks = print_costs(summary, shares(summary))
    print("targets:")
    for text, met in checks:
        print(f"  [{'MET   ' if met else 'MISSED'}] {text}")
    print(
        f"\n{sum(met for _, met in checks)} of {len(checks)} targets met; "
        f"{time.perf_counter() - started:.0f} s including warm-up and flushes"
    )
    del fixture
    return 0


if __name__ == "__main__":
    sys.exit(main())
