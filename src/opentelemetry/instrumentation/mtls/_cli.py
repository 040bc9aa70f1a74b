"""``otel-mtls``: see what the instrumentation records, with no collector.

``otel-mtls demo`` runs an mTLS server on loopback, sends it a good client and the usual
bad ones, and prints the handshake spans that were captured. ``otel-mtls inspect
HOST:PORT`` performs one handshake and prints the attributes the instrumentation would
record for it: a telemetry-minded ``openssl s_client``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import socket
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.instrumentation.mtls import MTLSInstrumentor
from opentelemetry.instrumentation.mtls._pki import Authority, Leaf
from opentelemetry.instrumentation.mtls._telemetry import CLIENT_SPAN_NAME, SERVER_SPAN_NAME

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_UTC = datetime.timezone.utc
_TIMEOUT = 10.0


@dataclass
class _DemoPKI:
    ca: Authority
    other_ca: Authority
    server: Leaf
    clients: dict[str, Leaf | None]


def _demo_pki() -> _DemoPKI:
    ca = Authority("Demo CA", organization="demo")
    other = Authority("Unknown CA", organization="elsewhere")
    long_ago = datetime.datetime(2024, 1, 1, tzinfo=_UTC)
    return _DemoPKI(
        ca=ca,
        other_ca=other,
        server=ca.issue("api.demo.test", dns=("localhost",), ips=("127.0.0.1",)),
        clients={
            "good certificate": ca.issue("web", uris=("spiffe://demo.test/ns/shop/sa/web",)),
            "certificate from an unknown CA": other.issue("intruder"),
            "expired certificate": ca.issue(
                "retired-batch-job",
                uris=("spiffe://demo.test/ns/batch/sa/old",),
                not_before=long_ago,
                not_after=long_ago + datetime.timedelta(days=30),
            ),
            "no certificate": None,
            "plain HTTP to the TLS port": None,
        },
    )


def _sdk() -> tuple[TracerProvider, InMemorySpanExporter]:
    try:
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
            InMemorySpanExporter,
        )
    except ImportError:
        sys.exit(
            "otel-mtls needs the OpenTelemetry SDK: "
            "pip install 'opentelemetry-instrumentation-mtls[demo]'"
        )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one HTTP/1.1 request, greeting the client by its certificate's CN."""
    peer = writer.get_extra_info("peercert") or {}
    names = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
    body = f"hello, {names[0] if names else 'anonymous'}\n".encode()
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _TIMEOUT)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()


async def _client(port: int, pki: _DemoPKI, name: str) -> str:
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    if name.startswith("plain HTTP"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
    else:
        ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
        cert = pki.clients[name]
        if cert is not None:
            cert.configure_cert(ctx)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"),
                _TIMEOUT,
            )
        except (OSError, ssl.SSLError) as exc:
            return f"handshake failed: {type(exc).__name__}"
        writer.write(request)
    try:
        response = await asyncio.wait_for(reader.read(), _TIMEOUT)
    except (OSError, ssl.SSLError) as exc:
        return f"rejected after the handshake: {type(exc).__name__}"
    finally:
        writer.close()
    if not response:
        return "connection closed by the server"
    lines = response.decode(errors="replace").splitlines()
    return f"{lines[0]} ... {lines[-1]!r}"


async def _run_demo(pki: _DemoPKI) -> list[tuple[str, str]]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.server.configure_cert(server_ctx)
    pki.ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server = await asyncio.start_server(_serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    print(f"mTLS server on 127.0.0.1:{port} (CERT_REQUIRED, trusts 'Demo CA')\n")
    results = []
    for name in pki.clients:
        results.append((name, await _client(port, pki, name)))
        await asyncio.sleep(0.05)  # let the server finish its side
    server.close()
    await server.wait_closed()
    return results


def _summary(span: ReadableSpan) -> str:
    attrs = dict(span.attributes or {})
    who = attrs.get("tls.client.spiffe_id") or attrs.get("tls.client.subject")
    if attrs.get("tls.established"):
        version, cipher = attrs.get("tls.protocol.version"), attrs.get("tls.cipher")
        return f"ok, client {who or '(no certificate)'}, TLS {version} {cipher}"
    text = f"error.type={attrs.get('error.type')}"
    if "tls.client.verify.message" in attrs:
        text += f" ({attrs['tls.client.verify.code']}: {attrs['tls.client.verify.message']})"
    return text


def demo(_: argparse.Namespace) -> int:
    """Run the loopback demo and print what was captured."""
    provider, exporter = _sdk()
    pki = _demo_pki()
    instrumentor = MTLSInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        results = asyncio.run(_run_demo(pki))
    finally:
        instrumentor.uninstrument()
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.name == SERVER_SPAN_NAME]
    clients = [s for s in spans if s.name == CLIENT_SPAN_NAME]
    print(f"{'client':32} {'what the client saw':44} TLS server handshake span")
    for (name, result), span in zip(results, servers, strict=False):
        print(f"{name:32} {result[:44]:44} {_summary(span)}")
    print(
        f"\n{len(spans)} spans: {len(servers)} '{SERVER_SPAN_NAME}', "
        f"{len(clients)} '{CLIENT_SPAN_NAME}'"
    )
    if servers:
        print(f"\nThe '{SERVER_SPAN_NAME}' span of the good client:")
        print(_span_json(servers[0]))
    return 0 if len(servers) == len(results) else 1


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
    provider, exporter = _sdk()
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
    commands.add_parser("demo", help="run an mTLS server and clients on loopback").set_defaults(
        run=demo
    )
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
