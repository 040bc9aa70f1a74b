"""``otel-mtls``: see what the instrumentation records, with no collector.

``otel-mtls demo`` runs two mTLS services on loopback, sends them a good client and the
usual bad ones, and prints what was captured (see ``_demo``). ``otel-mtls inspect
HOST:PORT`` connects once as a client and says whether the server accepts it, and if
not why (see ``inspect``). ``otel-mtls pki DIR`` writes the demo's certificates for the
examples. ``inspect`` lives in its own module; this one wires the commands to argparse.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.instrumentation.mtls._cli import inspect as _inspect
from opentelemetry.instrumentation.mtls._cli.pki import Leaf
from opentelemetry.instrumentation.mtls._signals.handshake import SERVER_SPAN_NAME


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
    probe = commands.add_parser(
        "inspect",
        help="connect to HOST:PORT as a client; say whether and why it is rejected",
        description=_inspect.__doc__.splitlines()[0] if _inspect.__doc__ else None,
        epilog=_inspect.EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probe.add_argument("target", metavar="HOST:PORT", help="[v6]:PORT for an IPv6 address")
    probe.add_argument("--cert", help="client certificate (PEM) to present")
    probe.add_argument("--key", help="its private key (PEM; default: in --cert)")
    probe.add_argument("--ca", help="CA bundle to verify the server with (default: the system's)")
    probe.add_argument(
        "--servername", help="name to verify and send as SNI (default: HOST; none for an IP)"
    )
    probe.add_argument("--insecure", action="store_true", help="do not verify the server")
    probe.add_argument("--json", action="store_true", help="print the handshake span as JSON")
    probe.add_argument(
        "--timeout",
        type=float,
        default=_inspect.TIMEOUT,
        metavar="SECONDS",
        help="to connect and handshake (default: %(default)s)",
    )
    probe.add_argument(
        "--wait",
        type=float,
        default=_inspect.WAIT,
        metavar="SECONDS",
        help="for a TLS 1.3 server's verdict after the handshake (default: %(default)s)",
    )
    probe.set_defaults(run=_inspect.run)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
