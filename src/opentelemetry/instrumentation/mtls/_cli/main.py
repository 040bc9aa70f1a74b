"""``otel-mtls``: see what the instrumentation records, with no collector.

``otel-mtls demo`` runs two mTLS services on loopback, sends them a good client and the
usual bad ones, and prints what was captured (see ``_demo``). ``otel-mtls inspect
HOST:PORT`` performs one handshake and prints the attributes the instrumentation would
record for it: a telemetry-minded ``openssl s_client``. ``otel-mtls pki DIR`` writes the
demo's certificates for the examples.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.instrumentation.mtls import MTLSInstrumentor
from opentelemetry.instrumentation.mtls._cli.pki import Leaf
from opentelemetry.instrumentation.mtls._signals.handshake import SERVER_SPAN_NAME

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

_TIMEOUT = 10.0


def _require_sdk() -> None:
    try:
        import opentelemetry.sdk  # noqa: F401, PLC0415
        import uvicorn  # noqa: F401, PLC0415
    except ImportError:
        sys.exit(
            "otel-mtls needs the demo extra: pip install 'opentelemetry-instrumentation-mtls[demo]'"
        )


def demo(args: argparse.Namespace) -> int:
    """Run two mTLS services and five clients on loopback; print what was captured."""
    _require_sdk()
    from opentelemetry.instrumentation.mtls._cli import demo as _demo  # noqa: PLC0415

    print("otel-mtls demo: a frontend and a backend with mTLS on 127.0.0.1, five clients\n")
    results, captured, _ = _demo.run(args.otlp_endpoint)
    print(_demo.summarise(results, captured))
    if args.otlp_endpoint:
        print(f"\nSpans and metrics were also exported to {args.otlp_endpoint}.")
    handshakes = [s for s in captured.spans if s.name == SERVER_SPAN_NAME]
    return 0 if len(handshakes) >= len(results) else 1


def write_pki(args: argparse.Namespace) -> int:
    """Write the demo PKI as PEM files into a directory, for the examples."""
    from opentelemetry.instrumentation.mtls._cli import demo as _demo  # noqa: PLC0415

    pki = _demo.make_pki()
    target = Path(args.directory)
    target.mkdir(parents=True, exist_ok=True)
    (target / "ca.crt").write_bytes(pki.ca.cert_pem)
    leaves: dict[str, Leaf | None] = {"frontend": pki.frontend, "backend": pki.backend}
    leaves.update(
        {
            "client": pki.clients["good certificate"],
            "wrong-ca": pki.clients["certificate from an unknown CA"],
            "expired": pki.clients["expired certificate"],
        }
    )
    for name, leaf in leaves.items():
        if leaf is not None:
            shutil.copyfile(leaf.cert_path, target / f"{name}.crt")
            key = target / f"{name}.key"
            shutil.copyfile(leaf.key_path, key)
            key.chmod(0o600)  # private keys: readable by their owner only
    print(f"wrote the demo PKI to {target}: ca.crt and {', '.join(leaves)} (.crt, .key)")
    return 0


def _span_json(span: ReadableSpan) -> str:
    return json.dumps(
        {
            "name": span.name,
            "kind": span.kind.name,
            "status": span.status.status_code.name,
            "duration_ms": round(((span.end_time or 0) - (span.start_time or 0)) / 1e6, 3),
            "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
            "events": [event.name for event in span.events],
        },
        indent=2,
    )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def inspect(args: argparse.Namespace) -> int:
    """Handshake once with HOST:PORT and print the span the instrumentation records."""
    _require_sdk()
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    host, _, port = args.target.rpartition(":")
    ctx = ssl.create_default_context(cafile=args.ca)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    if args.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    instrumentor = MTLSInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_TIMEOUT) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname=args.servername or host.strip("[]")):
                    pass
            except (OSError, ssl.SSLError) as exc:
                print(f"handshake failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        instrumentor.uninstrument()
    spans = exporter.get_finished_spans()
    for span in spans:
        print(_span_json(span))
    return 0 if spans and (spans[0].attributes or {}).get("tls.established") else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otel-mtls`` command."""
    parser = argparse.ArgumentParser(prog="otel-mtls", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="run two mTLS services and clients on loopback")
    run_demo.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="also export over OTLP/HTTP, e.g. http://localhost:4318 (a collector or Jaeger)",
    )
    run_demo.set_defaults(run=demo)
    pki = commands.add_parser("pki", help="write the demo PKI (PEM files) into a directory")
    pki.add_argument("directory")
    pki.set_defaults(run=write_pki)
    probe = commands.add_parser("inspect", help="handshake with HOST:PORT, print the span")
    probe.add_argument("target", metavar="HOST:PORT")
    probe.add_argument("--cert", help="client certificate (PEM) to present")
    probe.add_argument("--key", help="its private key (PEM)")
    probe.add_argument("--ca", help="CA bundle to verify the server with")
    probe.add_argument("--servername", help="SNI and hostname to verify (default: HOST)")
    probe.add_argument("--insecure", action="store_true", help="do not verify the server")
    probe.set_defaults(run=inspect)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
