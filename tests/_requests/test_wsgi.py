"""The client's identity on WSGI request spans, and implicit handshakes of blocking sockets.

Servers run in this process (werkzeug's development server, in threads) so that their
spans reach the in-memory exporter; gunicorn's forking workers are tested end to end in
tests/scenarios/test_gunicorn.py.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
from flask import Flask, request
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import make_server

from conftest import (
    FULL_ONLY,
    LAZY_RESOLUTION_CASES,
    LEAN,
    PKI,
    Instrumented,
    decision_counts,
    handshake_spans,
    sampled_instrumentation,
)
from opentelemetry.instrumentation.mtls import client_identity
from opentelemetry.instrumentation.mtls._requests.wsgi import MTLSWSGIMiddleware, resolution_of
from pki import Leaf

pytestmark = pytest.mark.usefixtures("instrumented")

SUBJECT = "CN=web-client,O=mTLS tests"
TIMEOUT = 10.0


def identity_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Answer with the client's subject, as ``client_identity(environ)`` finds it."""
    identity = client_identity(environ)
    body = json.dumps(
        {
            "subject": identity.subject if identity else None,
            "source": identity.source if identity else None,
            "remote_addr": environ.get("REMOTE_ADDR"),
        }
    ).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


@contextmanager
def werkzeug_server(
    app: Any, pki: PKI, *, cert_reqs: ssl.VerifyMode = ssl.CERT_REQUIRED
) -> Iterator[int]:
    """werkzeug's threaded development server with ``ssl_context`` (as ``flask run --cert``)."""
    server = make_server(
        "127.0.0.1", 0, app, threaded=True, ssl_context=pki.server_context(cert_reqs)
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@contextmanager
def session(pki: PKI, cert: Leaf | None) -> Iterator[requests.Session]:
    """A requests session (keep-alive) presenting ``cert``."""
    http = requests.Session()
    http.trust_env = False  # REQUESTS_CA_BUNDLE would win over the session's own CA
    http.verify = pki.ca.cert_path
    if cert is not None:
        http.cert = (cert.cert_path, cert.key_path)
    with http:
        yield http


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def flask_app(tracer_provider: TracerProvider) -> Flask:
    app = Flask("identity")

    @app.get("/whoami/<int:n>")
    def whoami(n: int) -> dict[str, Any]:
        identity = client_identity(request.environ)
        return {"n": n, "subject": identity.subject if identity else None}

    FlaskInstrumentor().instrument_app(app, tracer_provider=tracer_provider)
    return app


@pytest.fixture
def flask_instrumented(tracer_provider: TracerProvider) -> Iterator[Flask]:
    app = flask_app(tracer_provider)
    try:
        yield app
    finally:
        FlaskInstrumentor().uninstrument_app(app)


def test_flask_spans_under_werkzeug(
    flask_instrumented: Flask, pki: PKI, exporter: InMemorySpanExporter
) -> None:
    # werkzeug's server closes every connection after its response: five handshakes.
    with werkzeug_server(flask_instrumented, pki) as port, session(pki, pki.client) as http:
        answers = [http.get(f"https://localhost:{port}/whoami/{i}").json() for i in range(5)]
    assert [a["subject"] for a in answers] == [SUBJECT] * 5
    handshakes = {s.context.span_id for s in handshake_spans(exporter, "server")}
    spans = server_spans(exporter)
    assert len(spans) == len(handshakes) == 5
    for span in spans:
        attributes = span.attributes or {}
        assert attributes["tls.client.subject"] == SUBJECT
        assert attributes["tls.client.spiffe_id"] == "spiffe://example.org/ns/default/sa/web"
        assert attributes["tls.client.identity.source"] == "handshake"
        assert len(span.links) == 1
    assert {link.context.span_id for s in spans for link in s.links} == handshakes


def test_two_clients_are_never_mixed_up(
    flask_instrumented: Flask, pki: PKI, exporter: InMemorySpanExporter
) -> None:
    other = pki.ca.issue("other-client")
    with (
        werkzeug_server(flask_instrumented, pki) as port,
        session(pki, pki.client) as first,
        session(pki, other) as second,
    ):
        seen = [
            (expected, http.get(f"https://localhost:{port}/whoami/{i}").json()["subject"])
            for i in range(8)
            for http, expected in [(first, "web-client") if i % 2 else (second, "other-client")]
        ]
    assert all(subject == f"CN={name},O=mTLS tests" for name, subject in seen)
    names = sorted(str((s.attributes or {})["tls.client.subject"]) for s in server_spans(exporter))
    assert names == ["CN=other-client,O=mTLS tests"] * 4 + ["CN=web-client,O=mTLS tests"] * 4


def test_no_certificate_on_cert_optional_and_a_foreign_ca(
    flask_instrumented: Flask, pki: PKI, exporter: InMemorySpanExporter
) -> None:
    with werkzeug_server(flask_instrumented, pki, cert_reqs=ssl.CERT_OPTIONAL) as port:
        with session(pki, None) as http:
            assert http.get(f"https://localhost:{port}/whoami/1").json()["subject"] is None
        with session(pki, pki.untrusted_client) as http, pytest.raises(requests.ConnectionError):
            http.get(f"https://localhost:{port}/whoami/2")
    (span,) = server_spans(exporter)
    attributes = span.attributes or {}
    # Lean: with no certificate the source alone; the verify result is the handshake's.
    assert attributes["tls.client.identity.source"] == "handshake"
    assert "tls.client.verify.result" not in attributes
    assert "tls.client.subject" not in attributes
    (link,) = span.links
    (linked,) = [
        s for s in handshake_spans(exporter, "server") if s.context.span_id == link.context.span_id
    ]
    assert (linked.attributes or {})["tls.client.verify.result"] == "none"
    errors = {(s.attributes or {}).get("error.type") for s in handshake_spans(exporter, "server")}
    assert errors == {"certificate_authority_invalid", None}


def contrib_wsgi(tracer_provider: TracerProvider, inner: Any) -> Any:
    return OpenTelemetryMiddleware(MTLSWSGIMiddleware(inner), tracer_provider=tracer_provider)


def test_contrib_middleware_with_the_wsgi_sibling_is_enriched_once(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    app = contrib_wsgi(tracer_provider, identity_app)
    with werkzeug_server(app, pki) as port, session(pki, pki.client) as http:
        answers = [http.get(f"https://localhost:{port}/{i}").json() for i in range(3)]
    assert {a["subject"] for a in answers} == {SUBJECT}
    spans = server_spans(exporter)
    assert len(spans) == 3
    assert all((s.attributes or {})["tls.client.subject"] == SUBJECT for s in spans)
    assert all(len(s.links) == 1 for s in spans)  # the server's opening and the sibling: once


def test_the_sibling_alone_enriches_the_current_span_of_any_server(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """Where no followed server opens the request, the sibling still finds the socket."""
    tracer = tracer_provider.get_tracer("app")
    inner = MTLSWSGIMiddleware(identity_app)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        with tracer.start_as_current_span("handler"):  # INTERNAL: the sibling's choice
            return inner(environ, start_response)

    with werkzeug_server(app, pki) as port, session(pki, pki.client) as http:
        assert http.get(f"https://localhost:{port}/").json()["subject"] == SUBJECT
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "handler"]
    assert (span.attributes or {})["tls.client.subject"] == SUBJECT


@pytest.mark.parametrize("mode", ["lean", "full"])
def test_request_attributes_are_lean_by_default_and_full_when_asked(
    mode: str,
    instrumented: Instrumented,
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    if mode == "full":
        instrumented(request_attributes="full")
    app = OpenTelemetryMiddleware(identity_app, tracer_provider=tracer_provider)
    with werkzeug_server(app, pki) as port, session(pki, pki.client) as http:
        for i in range(2):
            http.get(f"https://localhost:{port}/{i}")
    # werkzeug's server speaks HTTP/1.0: a connection, and a handshake, per request.
    handshakes = {s.context.span_id: s for s in handshake_spans(exporter, "server")}
    spans = server_spans(exporter)
    assert len(spans) == 2
    for span in spans:
        attributes = span.attributes or {}
        ours = {name for name in attributes if name.startswith("tls.")}
        assert ours == (LEAN | FULL_ONLY if mode == "full" else LEAN)
        (link,) = span.links
        shake = handshakes[link.context.span_id].attributes or {}
        assert all(attributes[name] == shake[name] for name in ours & set(shake))


def probe_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Answer with the request's identity and whether its span attributes were built."""
    resolution = resolution_of(environ)
    assert resolution.connection is not None
    body = json.dumps(
        {
            "subject": resolution.identity.subject if resolution.identity else None,
            "built": "attributes" in resolution.connection.cache,
        }
    ).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


@pytest.mark.parametrize("sampled", [False, True])
def test_a_sampled_out_request_builds_no_attributes_but_keeps_its_identity(
    sampled: bool, instrumented: Instrumented, pki: PKI, exporter: InMemorySpanExporter
) -> None:
    provider = TracerProvider(**({} if sampled else {"sampler": ALWAYS_OFF}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumented(tracer_provider=provider, request_attributes="full")
    app = OpenTelemetryMiddleware(probe_app, tracer_provider=provider)
    with werkzeug_server(app, pki) as port, session(pki, pki.client) as http:
        answers = [http.get(f"https://localhost:{port}/{i}").json() for i in range(3)]
    assert answers == [{"subject": SUBJECT, "built": sampled}] * 3
    spans = server_spans(exporter)
    assert len(spans) == (3 if sampled else 0)
    assert all((s.attributes or {})["tls.client.subject"] == SUBJECT for s in spans)


def lazy_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Answer with whether the identity was resolved before the application asked for it."""
    resolved_before = "otel.mtls.resolution" in environ
    identity = client_identity(environ)
    body = json.dumps(
        {"resolved_before": resolved_before, "subject": identity.subject if identity else None}
    ).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


@LAZY_RESOLUTION_CASES
def test_a_sampled_out_request_resolves_nothing_unless_something_records_it(
    sampled: bool,
    header: bool,
    eager: bool,
    instrumented: Instrumented,
    pki: PKI,
    exporter: InMemorySpanExporter,
) -> None:
    provider, reader = sampled_instrumentation(sampled, exporter, instrumented)
    app = OpenTelemetryMiddleware(lazy_app, tracer_provider=provider)
    with werkzeug_server(app, pki) as port, session(pki, pki.client) as http:
        if header:
            http.headers["X-Forwarded-Client-Cert"] = 'Subject="CN=admin"'
        answers = [http.get(f"https://localhost:{port}/{i}").json() for i in range(3)]
    assert answers == [{"resolved_before": eager, "subject": SUBJECT}] * 3
    # A client's forged identity header is reported whether or not its span records.
    assert denials(reader) == (3 if header else 0)
    assert len(server_spans(exporter)) == (3 if sampled else 0)


def denials(reader: InMemoryMetricReader) -> int:
    return decision_counts(reader).get("denied", 0)


@pytest.mark.parametrize("trusted", [True, False])
def test_proxy_headers_are_judged_on_the_socket_peer_not_remote_addr(
    trusted: bool,
    instrumented: Instrumented,
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    # The trusted network is never the TCP peer (127.0.0.1); ProxyFix makes REMOTE_ADDR
    # one of its addresses when the client asks, which must not make it trusted.
    networks = "127.0.0.0/8" if trusted else "10.0.0.0/8"
    instrumented(trusted_proxies=[ipaddress.ip_network(networks)])
    app = contrib_wsgi(tracer_provider, ProxyFix(identity_app, x_for=1))
    forwarded = pki.ca.issue("behind-the-proxy")
    xfcc = f'Subject="CN=behind-the-proxy,O=mTLS tests";Cert="{quote(forwarded)}"'
    headers = {"X-Forwarded-Client-Cert": xfcc, "X-Forwarded-For": "10.1.2.3"}
    with werkzeug_server(app, pki) as port, session(pki, pki.client) as http:
        answer = http.get(f"https://localhost:{port}/", headers=headers).json()
    assert answer["remote_addr"] == "10.1.2.3"  # what a proxy-fix middleware believes
    (span,) = server_spans(exporter)
    attributes = span.attributes or {}
    if trusted:
        assert answer["source"] == "xfcc"
        assert attributes["tls.client.subject"] == "CN=behind-the-proxy,O=mTLS tests"
    else:
        assert answer["source"] == "handshake"
        assert attributes["tls.client.subject"] == SUBJECT
        (event,) = [e for e in span.events if e.name == "tls.identity.decision"]
        assert (event.attributes or {})["tls.client.identity.rule"] == "untrusted_proxy_header"


def quote(leaf: Leaf) -> str:
    from urllib.parse import quote as url_quote

    return url_quote(ssl.DER_cert_to_PEM_cert(leaf.der))


def test_the_wsgi_sibling_enforces_the_identity_policy(
    instrumented: Instrumented, pki: PKI, tracer_provider: TracerProvider
) -> None:
    instrumented(spiffe_trust_domains="example.org", enforce_identity_policy=True)
    app = contrib_wsgi(tracer_provider, identity_app)
    outsider = pki.ca.issue("outsider", uris=("spiffe://elsewhere.test/ns/x/sa/y",))
    with werkzeug_server(app, pki) as port:
        with session(pki, pki.client) as http:
            assert http.get(f"https://localhost:{port}/").status_code == 200
        with session(pki, outsider) as http:
            refused = http.get(f"https://localhost:{port}/")
    assert refused.status_code == 403
    assert refused.text == "client identity not allowed\n"


# -- implicit handshakes ------------------------------------------------------------------


def implicit_server(
    pki: PKI, cert: Leaf | None, verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED
) -> tuple[str, str, Any]:
    """A server wrapped as gunicorn's sync worker wraps: the handshake in its first recv.

    Returns what each side saw, and the server's socket (closed) for a look at it.
    """
    server_ctx = pki.server_context(verify_mode)
    client_ctx = pki.client_context(cert)
    seen = {"server": "not reached", "client": "not reached"}
    kept: list[ssl.SSLSocket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            tls = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                with tls:
                    data = tls.recv(1024)
                    tls.sendall(data.upper())
                    seen["server"] = f"read {data!r}"
                    kept.append(tls)
            except (OSError, ssl.SSLError) as exc:
                seen["server"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw:
                try:
                    with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                        tls.sendall(b"hello")
                        seen["client"] = f"read {tls.recv(1024)!r}"
                except (OSError, ssl.SSLError) as exc:
                    seen["client"] = f"{type(exc).__name__}: {exc}"
        finally:
            thread.join(TIMEOUT)
    return seen["server"], seen["client"], kept[0] if kept else None


CASES = {
    "valid": (lambda p: p.client, ssl.CERT_REQUIRED, None),
    "other_ca": (lambda p: p.untrusted_client, ssl.CERT_REQUIRED, "certificate_authority_invalid"),
    "none_required": (lambda p: None, ssl.CERT_REQUIRED, "certificate_required"),
    "none_optional": (lambda p: None, ssl.CERT_OPTIONAL, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_implicit_handshake_of_the_first_recv_is_recorded(
    case: str, instrumented: Instrumented, pki: PKI, exporter: InMemorySpanExporter
) -> None:
    cert, mode, error = CASES[case]
    instrumented.off()
    bare = implicit_server(pki, cert(pki), mode)[:2]
    instrumented()
    server_saw, client_saw, sock = implicit_server(pki, cert(pki), mode)
    assert server_saw == bare[0]  # the host sees exactly what it saw bare
    # A rejected TLS 1.3 client reads the server's alert, or finds the connection reset
    # if the server has already closed: a race of the two sides, bare or not.
    assert client_saw.startswith("read") is bare[1].startswith("read")
    if client_saw.startswith("read"):
        assert client_saw == bare[1]
    (span,) = handshake_spans(exporter, "server")
    attributes = span.attributes or {}
    assert attributes.get("error.type") == error
    assert attributes["tls.established"] is (error is None)
    assert attributes["client.address"] == "127.0.0.1"
    if case == "valid":
        assert attributes["tls.client.subject"] == SUBJECT
        # Once established, the connection's methods are the class's own again.
        assert sock.read.__func__ is ssl.SSLSocket.read
        assert sock.send.__func__ is ssl.SSLSocket.send


def test_a_peer_that_closes_before_the_implicit_handshake(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    server_ctx = pki.server_context()
    result: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT):
            conn, _ = listener.accept()
        conn.settimeout(TIMEOUT)
        with server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False) as tls:
            result.append(tls.recv(1024))  # a ragged EOF, suppressed by default: b""
    assert result == [b""]
    (span,) = handshake_spans(exporter, "server")
    assert (span.attributes or {})["error.type"] == "peer_connection_closed"


def test_memory_bio_reads_and_writes_perform_the_handshake(
    pki: PKI, exporter: InMemorySpanExporter
) -> None:
    """SSLObjects whose owner never calls do_handshake: read and write do it."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = pki.server_context().wrap_bio(server_in, server_out, server_side=True)
    client = pki.client_context(pki.client).wrap_bio(
        client_in, client_out, server_hostname="localhost"
    )
    received = b""
    for _ in range(20):
        for endpoint, payload in ((client, b"ping"), (server, b"")):
            try:
                if endpoint is client:
                    endpoint.write(payload)
                else:
                    received += endpoint.read(1024)
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if received:
            break
    assert received == b"ping"
    (server_span,) = handshake_spans(exporter, "server")
    (client_span,) = handshake_spans(exporter, "client")
    assert (server_span.attributes or {})["tls.client.subject"] == SUBJECT
    assert (client_span.attributes or {})["tls.established"] is True
    assert server.read.__func__ is ssl.SSLObject.read
