"""A bounded soak: good and bad mTLS clients at a steady mix against uvicorn, RSS over time.

The servers and clients of ``storm.py`` (same directory), with the instrumentation on
(SDK tracer provider with a counting exporter, SDK meter provider with an in-memory
reader): ``--good-clients`` threads make requests with their own certificates (a new
connection every ``--per-connection`` requests) and ``--bad-clients`` threads cycle
through the five kinds of failed handshake, for ``--seconds``. Every ``--every``
seconds a line gives the RSS (VmRSS) and the counts so far; at the end, the RSS growth
(whole run, and over its second half, where a leak would still show once caches and
the allocator have settled), failures counted against sent, good requests right
against sent, and the sizes of the package's bounded state. Exits 0.

Run: ``python benchmarks/soak.py [--seconds N] [--every N]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from collections.abc import Sequence

import storm
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from opentelemetry.instrumentation.mtls import MTLSInstrumentor
from opentelemetry.instrumentation.mtls._cli.demo import uvicorn_thread

_REGISTRY = "live connections"


def bad_client(
    pki: storm.StormPKI,
    *,
    tls_port: int,
    stall_port: int,
    progress: storm.Storm,
    offset: int,
    stop: threading.Event,
) -> None:
    """Fail handshakes of every kind in turn (starting at ``offset``) until ``stop``."""
    kinds = itertools.islice(itertools.cycle(storm.KINDS), offset, None)
    for i, kind in enumerate(kinds):
        if stop.is_set():
            return
        payload = storm.GARBAGE[i % len(storm.GARBAGE)]
        storm.attempt(progress, kind, storm.failing_job(kind, pki, tls_port, stall_port, payload))
        progress.failed(storm.KINDS[kind])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to soak")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between RSS lines")
    parser.add_argument("--good-clients", type=int, default=3, help="good client threads")
    parser.add_argument("--bad-clients", type=int, default=4, help="failing client threads")
    parser.add_argument("--per-connection", type=int, default=10, help="requests a connection")
    parser.add_argument(
        "--stall-timeout", type=float, default=0.25, help="the stalling server's handshake timeout"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pki = storm.make_pki(args.good_clients)
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    spans = storm.CountingExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    instrumentor = MTLSInstrumentor()
    instrumentor.instrument(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        log_rate_limit=storm.LOG_RATE_LIMIT,
        peer_certificate_limit=storm.PEER_CERTIFICATE_LIMIT,
    )
    progress = storm.Storm()
    stop = threading.Event()
    samples: list[tuple[float, float]] = []
    try:
        with (
            uvicorn_thread(storm.instrumented_app(tracer_provider), pki.server, pki.ca) as port,
            storm.stalling_server(pki.server_context(), args.stall_timeout) as stall_port,
        ):
            threads = [
                threading.Thread(
                    target=storm.good_client,
                    args=(port, leaf, pki, progress),
                    kwargs={"minimum": 0, "per_connection": args.per_connection, "stop": stop},
                )
                for leaf in pki.good
            ] + [
                threading.Thread(
                    target=bad_client,
                    args=(pki,),
                    kwargs={
                        "tls_port": port,
                        "stall_port": stall_port,
                        "progress": progress,
                        "offset": offset,
                        "stop": stop,
                    },
                )
                for offset in range(args.bad_clients)
            ]
            rss_start = storm.rss_mb()
            started = time.monotonic()
            for thread in threads:
                thread.start()
            print(f"{'seconds':>7} {'RSS MB':>8} {'good':>8} {'failed':>8} {'registry':>8}")
            while (elapsed := time.monotonic() - started) < args.seconds:
                time.sleep(min(args.every, max(args.seconds - elapsed, 0.0)))
                elapsed = time.monotonic() - started
                samples.append((elapsed, storm.rss_mb()))
                print(
                    f"{elapsed:>7.1f} {samples[-1][1]:>8.1f} {progress.good_sent:>8} "
                    f"{sum(progress.sent.values()):>8} {storm.internals()[_REGISTRY]:>8}",
                    flush=True,
                )
            stop.set()
            for thread in threads:
                thread.join()
            counted = storm.settle(reader, progress.sent)
        rss_end, rss_trimmed = storm.rss_mb(), storm.rss_trimmed_mb()
        sizes = storm.internals()
    finally:
        stop.set()
        instrumentor.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()

    first, middle = samples[0][1], samples[len(samples) // 2][1]
    print()
    print(
        f"soak: {args.seconds:.0f} s, {args.good_clients} good and {args.bad_clients} bad clients"
    )
    print(f"{'failures by error.type':34} {'counted':>8} {'sent':>8}")
    for error_type in sorted(set(progress.sent) | set(counted)):
        print(f"{error_type:34} {counted[error_type]:>8} {progress.sent[error_type]:>8}")
    print(f"{'total':34} {sum(counted.values()):>8} {sum(progress.sent.values()):>8}")
    print(f"good requests succeeded, right identity: {progress.good_right} / {progress.good_sent}")
    print(
        f"server spans with the client's own tls.client.*: "
        f"{spans.server_spans_with_identity} / {spans.server_spans}"
    )
    print(f"client-side problems: {progress.problem_count}")
    for problem in progress.problems:
        print(f"  {problem}")
    print(
        f"RSS: {rss_start:.1f} MB at the start, {first:.1f} MB at the first sample, "
        f"{middle:.1f} MB at mid-run, {rss_end:.1f} MB at the end"
    )
    print(
        f"RSS growth: {rss_end - rss_start:+.1f} MB over the run, {rss_end - first:+.1f} MB "
        f"since the first sample, {rss_end - middle:+.1f} MB over the second half; "
        f"{rss_trimmed - rss_start:+.1f} MB after gc and malloc_trim"
    )
    print("sizes at the end, servers stopped:")
    for name, size in sizes.items():
        print(f"  {name:38} {size:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
