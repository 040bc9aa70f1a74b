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

Variants, one block of each per round:

* ``bare``: the inner application alone;
* ``otel``: ``OpenTelemetryMiddleware(inner)`` (opentelemetry-instrumentation-asgi);
* ``lean``: what a followed server runs under ``MTLSInstrumentor`` (zero-code): its
  application opened for its server span (``open_requests``), around
  ``OpenTelemetryMiddleware(inner, server_request_hook=...)`` with the package's composed
  hook, the SDK's ``Tracer.start_span`` patched as the package patches it (for the
  package's variants' blocks only: ``otel`` runs unpatched), and the default request
  attributes (the identity: subject, issuer, hash, SPIFFE ID, source);
* ``full``: the same with ``OTEL_PYTHON_MTLS_REQUEST_ATTRIBUTES=full`` (every peer
  certificate attribute, version, cipher, resumption);
* ``sdk floor``: ``otel`` with a ``server_request_hook`` that only sets the attributes
  ``lean`` sets (the same dictionary) and adds the link, on a span that records: what
  the SDK itself costs for what ``lean`` puts on a span; ``lean`` minus ``sdk floor`` is
  what remains ours;
* ``otel sampled-out`` and ``lean sampled-out``: ``otel`` and ``lean`` with a tracer
  provider whose sampler is ``ALWAYS_OFF``: what a request whose span is dropped costs.

Every ``OpenTelemetryMiddleware`` gets an SDK ``TracerProvider`` whose
``BatchSpanProcessor`` feeds a no-op exporter, and ``exclude_spans=["receive", "send"]``,
so each request makes exactly one span, its server span. The processor's queue and batch
are larger than any block and its worker never wakes during a block: spans are exported
by a flush after each block, outside the timed region (what is timed includes ending the
span and queueing it). No meter provider is passed: the middleware's metrics go to the
global one, the API's no-op unless something set it. After the warm-up, the heap is
frozen (``gc.freeze``) and each block starts after a full collection, so no block pays
for collecting what an earlier one left or for scanning the long-lived heap.

A round is one block of every variant, in an order that rotates every round; a block's
figure is its process CPU time per request. Per round, each variant's ratio is the
throughput of its block over the ``bare`` block's (CPU per request inverted) and its added
cost the difference in microseconds; the enrichment's cost is ``lean`` (``full``) minus
``otel``, and ``lean sampled-out`` minus ``otel sampled-out``, in the same round. Rounds
are added in batches until the distribution-free 95% confidence interval of the median of
every ratio lies within +-0.01 of it, or the time allowed is spent (then it says so).

Targets (issue 15): the enrichment costs at most 5 us per request in the default
configuration, and at most 2 us for a sampled-out request. Both are reported, met or not;
the script exits 0 either way.

Run: ``python benchmarks/asgi_overhead.py [--block-ms N] [--max-seconds N] [--quick]``.
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
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler
from opentelemetry.trace import SpanContext, SpanKind

from opentelemetry.instrumentation.mtls._patch import Patches
from opentelemetry.instrumentation.mtls._requests import identity as _identity
from opentelemetry.instrumentation.mtls._requests import server_spans
from opentelemetry.instrumentation.mtls._requests.asgi import (
    compose_server_request_hook,
    open_requests,
)
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
VARIANTS: Final = (
    "bare",
    "otel",
    "lean",
    "full",
    "sdk floor",
    "otel sampled-out",
    "lean sampled-out",
)
ENRICHMENTS: Final = (
    ("lean", "otel"),
    ("full", "otel"),
    ("sdk floor", "otel"),
    ("lean sampled-out", "otel sampled-out"),
)
"""Each enriched variant and the variant it is compared with, in the same round."""
SAMPLED_OUT: Final = ("otel sampled-out", "lean sampled-out")
OURS: Final = ("lean", "full", "lean sampled-out")
"""The variants that run the package's request path (the others run without its patch)."""
TARGETS_US: Final = {"lean": 5.0, "lean sampled-out": 2.0}
CI_HALF_WIDTH: Final = 0.01
BATCH: Final = 20
"""Rounds added between two looks at the confidence intervals."""
SUBJECT: Final = "tls.client.subject"
LEAN_NAMES: Final = frozenset(
    {
        "tls.client.subject",
        "tls.client.issuer",
        "tls.client.hash.sha256",
        "tls.client.spiffe_id",
        "tls.client.identity.source",
    }
)
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


def sdk_tracer_provider(
    exporter: CountingExporter, sampler: Sampler | None = None
) -> TracerProvider:
    provider = TracerProvider(sampler=sampler)
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
    return provider


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


def build_apps(provider: TracerProvider, sampled_out: TracerProvider) -> dict[str, ASGIApp]:
    def otel(app: ASGIApp, tracer_provider: TracerProvider, **kwargs: Any) -> ASGIApp:
        middleware: ASGIApp = OpenTelemetryMiddleware(
            app, tracer_provider=tracer_provider, exclude_spans=["receive", "send"], **kwargs
        )
        return middleware

    hook = compose_server_request_hook(None)
    # What a followed server runs under MTLSInstrumentor: its application opened
    # (open_requests), contrib's middleware with the composed hook inside it.
    enriched = open_requests(otel(inner_app, provider, server_request_hook=hook))
    lean = _identity.RequestSettings()
    floor: list[Any] = []

    def sdk_only(span: Any, scope: Scope) -> None:
        # The lean attributes, as the enrichment sets them, and the link: the SDK's part.
        if not floor:
            connection = CURRENT.get()
            assert connection is not None and connection.record is not None
            resolution = _identity.resolve(connection, {}, None, lean)
            floor.extend((resolution.span_attributes(), resolution.link))
        if span.is_recording():
            span.set_attributes(floor[0])
            span.add_link(floor[1])

    return {
        "bare": inner_app,
        "otel": otel(inner_app, provider),
        "lean": enriched,
        "full": enriched,
        "sdk floor": otel(inner_app, provider, server_request_hook=sdk_only),
        "otel sampled-out": otel(inner_app, sampled_out),
        "lean sampled-out": open_requests(otel(inner_app, sampled_out, server_request_hook=hook)),
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


LEAN_SETTINGS: Final = _identity.RequestSettings()
FULL_SETTINGS: Final = _identity.RequestSettings(full=True)


@dataclass
class Bench:
    loop: asyncio.AbstractEventLoop
    apps: dict[str, ASGIApp]
    providers: tuple[TracerProvider, TracerProvider]
    exporter: CountingExporter
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VARIANTS, 0))
    spans: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VARIANTS, 0))

    def block(self, name: str, *, seconds: float = 0.0, count: int = 0) -> Block:
        """One block of one variant; the request settings are the variant's (lean or full)."""
        _identity.configure(FULL_SETTINGS if name == "full" else LEAN_SETTINGS)
        before = self.exporter.count
        patches = Patches()
        if name in OURS:  # the SDK's start_span, patched for our variants' blocks only
            server_spans.install(patches, None)
        gc.collect()
        try:
            block = self.loop.run_until_complete(
                serve(self.apps[name], seconds=seconds, count=count)
            )
        finally:
            patches.restore()
        block.variant = name
        for provider in self.providers:
            flush(provider)
        made = self.exporter.count - before
        expected = 0 if name == "bare" or name in SAMPLED_OUT else block.requests
        if made != expected:
            raise RuntimeError(f"{name}: {block.requests} requests made {made} spans")
        self.requests[name] += block.requests
        self.spans[name] += made
        return block


def warm_up(bench: Bench, fixture: Fixture) -> list[str]:
    """Run every variant, and check on its spans and scopes what it records."""
    report = []
    for name in VARIANTS:
        bench.exporter.keep, bench.exporter.kept = True, []
        block = bench.block(name, count=2000)
        bench.exporter.keep = False
        spans = bench.exporter.kept
        extension = ((block.last_scope or {}).get("extensions") or {}).get("tls")
        hooked = name in ("lean", "full", "lean sampled-out")
        if hooked != isinstance(extension, dict):
            raise RuntimeError(f"{name}: scope TLS extension is {extension!r}")
        if name == "bare" or name in SAMPLED_OUT:
            if spans:
                raise RuntimeError(f"{name}: made spans")
            what = "TLS extension in the scope" if hooked else "no TLS extension"
            report.append(f"  {name:<18} {block.requests:,} requests, no spans, {what}")
            continue
        server = [s for s in spans if s.kind is SpanKind.SERVER]
        if len(server) != len(spans) or len(spans) != block.requests:
            raise RuntimeError(f"{name}: {len(spans)} spans for {block.requests} requests")
        for span in server:
            attributes = span.attributes or {}
            links = [link.context for link in span.links]
            ours = {key for key in attributes if key.startswith("tls.")}
            if name == "otel":
                good = not ours and not links
            else:
                # Lean: the identity alone (the bench certificate has no SPIFFE ID).
                lean = ours <= LEAN_NAMES
                good = attributes.get(SUBJECT) == fixture.subject and (
                    lean
                    if name in ("lean", "sdk floor")
                    else not lean and "tls.protocol.version" in ours
                )
                good = good and links == [fixture.handshake_span]
            if not good:
                raise RuntimeError(f"{name}: unexpected server span: {span.to_json()}")
        last = (server[-1].attributes or {}).keys()
        ours_last = sorted(key for key in last if key.startswith("tls."))
        report.append(
            f"  {name:<18} {len(server):,} server spans of {block.requests:,} requests, "
            f"{len(last)} attributes on the last, {len(ours_last)} of them ours"
            + (f" ({', '.join(ours_last)})" if name == "lean" else "")
        )
    return report


def run_round(bench: Bench, r: int, block_seconds: float) -> dict[str, Block]:
    """One block of every variant, the order rotated by ``r``."""
    shift = r % len(VARIANTS)
    order = VARIANTS[shift:] + VARIANTS[:shift]
    return {name: bench.block(name, seconds=block_seconds) for name in order}


def measure(
    bench: Bench, block_seconds: float, max_seconds: float
) -> tuple[list[dict[str, Block]], bool]:
    """Add rounds in batches until every ratio's 95% CI is within +-0.01, or time is up."""
    rounds: list[dict[str, Block]] = []
    converged = False
    started = time.perf_counter()
    while not converged and time.perf_counter() - started < max_seconds:
        for _ in range(BATCH):
            rounds.append(run_round(bench, len(rounds), block_seconds))
        every = [*ratios(rounds).values(), *enrichment_ratios(rounds).values()]
        converged = all(half_width(values) <= CI_HALF_WIDTH for values in every)
    return rounds, converged


# -- statistics and report ----------------------------------------------------------------


def ratios(rounds: list[dict[str, Block]]) -> dict[str, list[float]]:
    """Per round: each variant's throughput over the ``bare`` block's."""
    return {
        name: [r["bare"].us / r[name].us for r in rounds] for name in VARIANTS if name != "bare"
    }


def enrichment_ratios(rounds: list[dict[str, Block]]) -> dict[str, list[float]]:
    """Per round: each enriched variant's throughput over its reference's."""
    return {
        f"{name} / {reference}": [r[reference].us / r[name].us for r in rounds]
        for name, reference in ENRICHMENTS
    }


def added(rounds: list[dict[str, Block]], name: str, reference: str = "bare") -> list[float]:
    """Per round: a variant's CPU time per request minus its reference's, us."""
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


def print_table(rounds: list[dict[str, Block]], block_seconds: float, converged: bool) -> None:
    ratio = ratios(rounds)
    requests = statistics.median(r["otel"].requests for r in rounds)
    print(
        f"\n{len(rounds)} rounds of {len(VARIANTS)} blocks of {block_seconds * 1e3:.0f} ms "
        f"(~{requests:,.0f} otel requests each)"
    )
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
    for name, values in enrichment_ratios(rounds).items():
        c1, c3 = median_ci(values)
        print(
            f"  {name:<35} ratio {statistics.median(values):.4f} "
            f"(95% CI {c1:.4f}..{c3:.4f}, +-{half_width(values):.4f})"
        )
    every = [*ratio.values(), *enrichment_ratios(rounds).values()]
    widest = max(half_width(v) for v in every)
    verdict = "within" if converged else "NOT within"
    print(
        f"  (ratio: throughput over bare's, median of the rounds; +-: how far its 95% CI "
        f"reaches;\n   every ratio's CI {verdict} +-{CI_HALF_WIDTH}: widest +-{widest:.4f})"
    )


def print_costs(rounds: list[dict[str, Block]]) -> list[tuple[str, bool]]:
    asgi = added(rounds, "otel")
    print(f"\nASGI instrumentation's own cost (otel - bare): {spread(asgi, '.2f')} us per request")
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
        "--block-ms", type=float, default=None, help="length of one block (default 20; --quick: 10)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="time allowed for the timed rounds before giving up on the +-0.01 intervals "
        "(default 300; --quick: 20)",
    )
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    args = parser.parse_args(argv)
    if args.block_ms is None:
        args.block_ms = 10.0 if args.quick else 20.0
    if args.max_seconds is None:
        args.max_seconds = 20.0 if args.quick else 300.0
    if args.block_ms <= 0 or args.max_seconds <= 0:
        parser.error("--block-ms and --max-seconds must be positive")
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
    block_seconds: float = args.block_ms / 1e3
    print(versions(("opentelemetry-instrumentation-asgi", "asgiref")))
    print(
        f"rounds of {len(VARIANTS)} blocks of {args.block_ms:.0f} ms, in batches of {BATCH}, "
        f"until every ratio's 95% CI is within +-{CI_HALF_WIDTH} (at most "
        f"{args.max_seconds:.0f} s); time = process CPU time per request, ASGI apps called "
        "directly on one asyncio loop"
    )
    sys.stdout.flush()

    started = time.perf_counter()
    exporter = CountingExporter()
    provider = sdk_tracer_provider(exporter)
    sampled_out = sdk_tracer_provider(exporter, ALWAYS_OFF)
    loop = asyncio.new_event_loop()
    settings = _identity.SETTINGS
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
        bench = Bench(loop, build_apps(provider, sampled_out), (provider, sampled_out), exporter)
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
            rounds, converged = measure(bench, block_seconds, args.max_seconds)
        finally:
            gc.unfreeze()
        if CURRENT.get() is None:
            raise RuntimeError("the connection was lost during the run")
    finally:
        _identity.configure(settings)
        loop.close()
        provider.shutdown()
        sampled_out.shutdown()
        CURRENT.set(None)

    print("requests and spans, warm-up included:")
    for name in VARIANTS:
        print(f"  {name:<18} {bench.requests[name]:>10,} requests, {bench.spans[name]:>10,} spans")

    print_table(rounds, block_seconds, converged)
    tie_costs(Connection(SERVER_ADDRESS, CLIENT_ADDRESS, fixture.record))
    checks = print_costs(rounds)
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
