"""``otel-mtls demo``: two mTLS services on loopback, good and bad clients, what was captured.

A frontend and a backend run under uvicorn in this process, each requiring client
certificates from the demo CA. The frontend answers ``/order`` by calling the backend's
``/inventory`` with its own certificate, so one trace crosses two mTLS hops. Five
clients call the frontend: one good, one from an unknown CA, one expired, one with no
certificate, and one speaking plain HTTP to the TLS port. Spans, metrics and audit log
records are kept in memory and summarised, or exported over OTLP/HTTP.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.instrumentation.mtls import MTLSInstrumentor, client_identity
from opentelemetry.instrumentation.mtls._cli.pki import Authority, Leaf
from opentelemetry.instrumentation.mtls._signals.audit import AUDIT_LOGGER_NAME
from opentelemetry.instrumentation.mtls._signals.handshake import SERVER_SPAN_NAME

_UTC = datetime.UTC
_TIMEOUT = 10.0
SPIFFE = "spiffe://demo.test/ns/shop/sa/"


@dataclass
class DemoPKI:
    """The demo's CA, services and clients."""

    ca: Authority
    frontend: Leaf
    backend: Leaf
    clients: dict[str, Leaf | None]


def make_pki() -> DemoPKI:
    """Issue the demo's certificates; keys stay in a private temporary directory."""
    ca = Authority("Demo CA", organization="demo")
    unknown = Authority("Unknown CA", organization="elsewhere")
    long_ago = datetime.datetime(2024, 1, 1, tzinfo=_UTC)

    def service(name: str) -> Leaf:
        return ca.issue(name, dns=("localhost",), ips=("127.0.0.1",), uris=(SPIFFE + name,))

    return DemoPKI(
        ca=ca,
        frontend=service("frontend"),
        backend=service("backend"),
        clients={
            "good certificate": ca.issue("web", uris=(SPIFFE + "web",)),
            "certificate from an unknown CA": unknown.issue("intruder"),
            "expired certificate": ca.issue(
                "retired-job",
                uris=(SPIFFE + "retired-job",),
                not_before=long_ago,
                not_after=long_ago + datetime.timedelta(days=30),
            ),
            "no certificate": None,
            "plain HTTP to the TLS port": None,
        },
    )


@contextmanager
def uvicorn_thread(
    app: Any,
    leaf: Leaf | None,
    ca: Authority | None,
    *,
    loop: str = "asyncio",
    cert_reqs: ssl.VerifyMode = ssl.CERT_REQUIRED,
    sock: socket.socket | None = None,
    **options: Any,
) -> Iterator[int]:
    """Serve an ASGI app with uvicorn on loopback, with mTLS unless ``leaf`` is None.

    The server gets a socket already bound to an ephemeral port (``sock``, or a new one on
    127.0.0.1), so nothing races for ports; the tests use this too, with uvicorn
    ``options`` of their own.
    """
    import uvicorn  # noqa: PLC0415  # the demo extra

    sock = sock or socket.create_server(("127.0.0.1", 0))
    tls: dict[str, Any] = {}
    if leaf is not None and ca is not None:
        tls = {
            "ssl_certfile": leaf.cert_path,
            "ssl_keyfile": leaf.key_path,
            "ssl_ca_certs": ca.cert_path,
            "ssl_cert_reqs": int(cert_reqs),
        }
    # WebSockets only where the websockets package is installed (the tests' extra).
    ws = "websockets-sansio" if importlib.util.find_spec("websockets") else "none"
    settings: dict[str, Any] = {"lifespan": "off", "log_level": "warning", "ws": ws, **options}
    config = uvicorn.Config(app, loop=loop, **settings, **tls)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + _TIMEOUT
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(_TIMEOUT)
        sock.close()


async def _respond(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def backend_app() -> Any:
    """``GET /inventory``: says which identity called."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        identity = client_identity(scope)
        await _respond(send, 200, {"caller": identity.spiffe_id if identity else None})

    return app


def frontend_app(pki: DemoPKI, backend_port: int) -> Any:
    """``GET /order``: calls the backend with the frontend's own certificate."""
    import httpx  # noqa: PLC0415  # the demo extra
    from opentelemetry.propagate import inject  # noqa: PLC0415

    context = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    pki.frontend.configure_cert(context)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        identity = client_identity(scope)
        headers: dict[str, str] = {}
        inject(headers)  # one trace across both hops
        async with httpx.AsyncClient(verify=context, timeout=_TIMEOUT) as http:
            backend = await http.get(f"https://localhost:{backend_port}/inventory", headers=headers)
        await _respond(
            send,
            200,
            {
                "caller": identity.spiffe_id if identity else None,
                "backend saw": backend.json()["caller"],
            },
        )

    return app


def call(pki: DemoPKI, port: int, name: str) -> str:
    """One client's request to the frontend; what it saw, in a line."""
    import httpx  # noqa: PLC0415  # the demo extra

    if name.startswith("plain HTTP"):
        with socket.create_connection(("127.0.0.1", port), timeout=_TIMEOUT) as sock:
            sock.sendall(b"GET /order HTTP/1.1\r\nHost: localhost\r\n\r\n")
            reply = sock.recv(100)
        return f"connection closed{' after ' + repr(reply[:20]) if reply else ''}"
    context = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    cert = pki.clients[name]
    if cert is not None:
        cert.configure_cert(context)
    try:
        with httpx.Client(verify=context, timeout=_TIMEOUT) as http:
            response = http.get(f"https://localhost:{port}/order")
    except httpx.HTTPError as exc:
        return f"refused: {type(exc).__name__}"
    return f"{response.status_code} {response.text}"


@dataclass
class Captured:
    """What the in-memory exporters and the audit logger received."""

    spans: list[Any]
    metrics: Any
    logs: list[logging.LogRecord]


def run(otlp_endpoint: str | None = None) -> tuple[list[tuple[str, str]], Captured, DemoPKI]:
    """Run the services and clients with instrumentation on; return results and telemetry."""
    from opentelemetry.instrumentation.asgi import (  # noqa: PLC0415  # the demo extra
        OpenTelemetryMiddleware,
    )
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
        InMemorySpanExporter,
    )

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    readers: list[Any] = [reader]
    if otlp_endpoint:
        readers.append(_add_otlp(tracer_provider, otlp_endpoint))
    meter_provider = MeterProvider(metric_readers=readers)
    logs: list[logging.LogRecord] = []
    keeper = _Keep(logs)
    audit = logging.getLogger(AUDIT_LOGGER_NAME)
    audit.addHandler(keeper)
    audit.setLevel(logging.INFO)

    instrumentor = MTLSInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    # The frontend's call to the backend gets a client span, which gets the backend's identity.
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor  # noqa: PLC0415

    client_instrumentor = HTTPXClientInstrumentor()
    client_instrumentor.instrument(tracer_provider=tracer_provider)
    pki = make_pki()
    results: list[tuple[str, str]] = []
    try:

        def instrumented(app: Any) -> Any:
            return OpenTelemetryMiddleware(
                app, tracer_provider=tracer_provider, exclude_spans=["receive", "send"]
            )

        with (
            uvicorn_thread(instrumented(backend_app()), pki.backend, pki.ca) as backend,
            uvicorn_thread(instrumented(frontend_app(pki, backend)), pki.frontend, pki.ca) as port,
        ):
            for name in pki.clients:
                results.append((name, call(pki, port, name)))
            time.sleep(0.1)  # the servers finish their side of the last connection
    finally:
        client_instrumentor.uninstrument()
        instrumentor.uninstrument()
        audit.removeHandler(keeper)
        audit.setLevel(logging.NOTSET)
        tracer_provider.force_flush()
        metrics = reader.get_metrics_data()
        meter_provider.shutdown()
        tracer_provider.shutdown()
    return results, Captured(list(spans.get_finished_spans()), metrics, logs), pki


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _add_otlp(tracer_provider: Any, endpoint: str) -> Any:
    """Also export spans and metrics over OTLP/HTTP to a collector or Jaeger."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )
    except ImportError as exc:
        raise SystemExit(
            "--otlp-endpoint needs opentelemetry-exporter-otlp-proto-http: "
            "pip install 'opentelemetry-instrumentation-mtls[demo]'"
        ) from exc
    from opentelemetry.sdk.metrics.export import (  # noqa: PLC0415
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    base = endpoint.rstrip("/")
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{base}/v1/traces")))
    return PeriodicExportingMetricReader(OTLPMetricExporter(f"{base}/v1/metrics"))


def summarise(results: list[tuple[str, str]], captured: Captured) -> str:
    """Describe what the demo captured: clients, handshakes, the trace, metrics, logs."""
    spans = captured.spans
    lines = ["Clients of the frontend, and what its TLS server handshake span says:", ""]
    handshakes = [s for s in spans if s.name == SERVER_SPAN_NAME]
    frontend_port = _frontend_port(spans)
    frontend_handshakes = [
        s for s in handshakes if (s.attributes or {}).get("server.port") == frontend_port
    ]
    for (name, seen), span in zip(results, frontend_handshakes, strict=False):
        lines.append(f"  {name}")
        lines.append(f"      client saw: {seen}")
        lines.append(f"      span:       {_handshake_summary(span)}")
    lines += ["", *_trace_lines(spans), "", *_metric_lines(captured.metrics), ""]
    lines.append(f"Audit log records ({AUDIT_LOGGER_NAME}):")
    for record in captured.logs:
        lines.append(
            f"  {record.levelname:7} {getattr(record, 'event.name', '')}: {record.getMessage()}"
        )
    return "\n".join(lines)


def _path(span: Any) -> Any:
    """Return the request path, under the old or the stable HTTP semantic conventions."""
    attrs = span.attributes or {}
    return attrs.get("url.path", attrs.get("http.target"))


def _frontend_port(spans: list[Any]) -> int | None:
    for span in spans:
        if _path(span) == "/order":
            attrs = span.attributes or {}
            port = attrs.get("server.port", attrs.get("net.host.port"))
            return int(port) if port is not None else None
    return None


def _handshake_summary(span: Any) -> str:
    attrs = dict(span.attributes or {})
    if attrs.get("tls.established"):
        who = attrs.get("tls.client.spiffe_id") or attrs.get("tls.client.subject")
        return (
            f"established, client {who}, TLS {attrs.get('tls.protocol.version')} "
            f"{attrs.get('tls.cipher')}"
        )
    text = f"failed, error.type={attrs.get('error.type')}"
    if "tls.client.subject" in attrs:  # the certificate it presented, rejected
        text += f", presented {attrs['tls.client.subject']}"
    if "tls.client.verify.message" in attrs:
        text += f" (verify {attrs['tls.client.verify.code']}: {attrs['tls.client.verify.message']})"
    return text


def _trace_lines(spans: list[Any]) -> list[str]:
    orders = [s for s in spans if _path(s) == "/order"]
    if not orders:
        return ["No request reached the services."]
    trace_id = orders[0].context.trace_id
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in in_trace}

    def depth(span: Any) -> int:
        level = 0
        while span.parent is not None and span.parent.span_id in by_id:
            span, level = by_id[span.parent.span_id], level + 1
        return level

    lines = [f"One trace, two mTLS hops (trace id {trace_id:032x}):"]
    for span in sorted(in_trace, key=lambda s: s.start_time or 0):
        attrs = dict(span.attributes or {})
        who = attrs.get("tls.client.spiffe_id") or attrs.get("tls.server.spiffe_id")
        role = "client" if "tls.client.spiffe_id" in attrs else "server"
        link = f", linked to handshake {span.links[0].context.span_id:016x}" if span.links else ""
        lines.append(f"  {'  ' * depth(span)}{span.name}: {role} identity {who}{link}")
    return lines


def _metric_lines(metrics: Any) -> list[str]:
    lines = ["Metrics:"]
    for resource in metrics.resource_metrics if metrics else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if not metric.name.startswith("tls."):
                    continue
                for point in metric.data.data_points:
                    value = getattr(point, "count", None)
                    value = value if value is not None else round(point.value)
                    labels = ", ".join(f"{k}={v}" for k, v in point.attributes.items())
                    lines.append(f"  {metric.name}{{{labels}}} {value}")
    return lines
