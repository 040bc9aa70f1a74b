"""Concurrent handshakes on a thread-per-connection server never mix up their attributes.

A ``ThreadingHTTPServer`` accepts TLS connections and performs each handshake in the
connection's own thread; 50 clients, each with a different certificate, connect at
once, and 10 more with an untrusted certificate (the negative control). Each handshake
span must say who connected from its ``client.port``, and each client's span must be
the parent of its own client handshake: nothing crosses between threads.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import PKI, handshake_spans
from pki import Leaf

pytestmark = pytest.mark.usefixtures("instrumented")

GOOD = 50
UNTRUSTED = 10
TIMEOUT = 30.0


class TLSHTTPServer(ThreadingHTTPServer):
    """Wraps each accepted socket in TLS; the handshake runs in the connection's thread."""

    daemon_threads = False  # so that server_close() joins every connection's thread
    block_on_close = True
    request_queue_size = 128  # every client connects at once

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.context = context
        self.errors: list[BaseException] = []

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        sock.settimeout(TIMEOUT)
        # Not on accept: the handshake of one client must not wait for another's.
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return tls, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(sys.exc_info()[1] or RuntimeError("no exception"))


class Handler(BaseHTTPRequestHandler):
    """Answers with the common name of the client certificate, and the client's port."""

    def setup(self) -> None:
        self.request.do_handshake()
        super().setup()

    def do_GET(self) -> None:
        subject = self.request.getpeercert()["subject"]
        common_name = next(value for rdn in subject for key, value in rdn if key == "commonName")
        body = json.dumps({"cn": common_name, "port": self.client_address[1]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def threading_server(context: ssl.SSLContext) -> Iterator[TLSHTTPServer]:
    server = TLSHTTPServer(context)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()  # joins the connections' threads
        thread.join(TIMEOUT)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    """What one client saw: its local port, its span, and the server's answer."""

    name: str
    port: int
    span_id: int
    answer: dict[str, Any] | None = None
    error: str | None = None
    failed_on: str | None = None
    """``write`` or ``read``: which operation saw the server's rejection."""


def client(
    name: str,
    leaf: Leaf,
    pki: PKI,
    server_port: int,
    tracer_provider: TracerProvider,
    start: threading.Barrier,
    end: threading.Barrier,
) -> Seen:
    """One request under a span of the client's own; the connection stays open until
    every client has its answer, so no two connections share a client port."""
    context = pki.client_context(leaf)
    tracer = tracer_provider.get_tracer("test")
    start.wait(TIMEOUT)
    with (
        tracer.start_as_current_span(name) as span,
        socket.create_connection(("127.0.0.1", server_port), timeout=TIMEOUT) as raw,
    ):
        seen = Seen(name, raw.getsockname()[1], span.get_span_context().span_id)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            try:
                seen.failed_on = "write"
                tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
                seen.failed_on = "read"
                response = b""
                while chunk := tls.recv(4096):
                    response += chunk
                seen.failed_on = None
                seen.answer = json.loads(response.partition(b"\r\n\r\n")[2])
            except OSError as exc:
                seen.error = type(exc).__name__
            end.wait(TIMEOUT)
    return seen


def test_fifty_clients_at_once_each_get_their_own_attributes(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    leaves = {f"client-{i}": pki.ca.issue(f"client-{i}") for i in range(GOOD)}
    leaves.update({f"intruder-{i}": pki.other_ca.issue(f"intruder-{i}") for i in range(UNTRUSTED)})
    start, end = threading.Barrier(len(leaves)), threading.Barrier(len(leaves))
    with (
        threading_server(pki.server_context()) as server,
        ThreadPoolExecutor(len(leaves)) as pool,
    ):
        port = server.server_address[1]
        runs = [
            pool.submit(client, name, leaf, pki, port, tracer_provider, start, end)
            for name, leaf in leaves.items()
        ]
        seen = {run.result().name: run.result() for run in runs}
    assert len({s.port for s in seen.values()}) == len(seen)

    # The clients: the good ones got their own name back, seen from their own port.
    for name, s in seen.items():
        if name.startswith("client-"):
            assert (s.error, s.answer) == (None, {"cn": name, "port": s.port})
        else:
            # Rejected: the alert on the first read, or the request's write already
            # found the connection closed (EOF, reset or broken pipe).
            assert s.answer is None
            assert s.error is not None
            assert s.failed_on in {"write", "read"}
    assert len(server.errors) == UNTRUSTED
    assert all(isinstance(e, ssl.SSLCertVerificationError) for e in server.errors)

    # One server span per connection, naming the client that connected from its port.
    servers = handshake_spans(exporter, "server")
    assert len(servers) == GOOD + UNTRUSTED
    by_port = {(span.attributes or {})["client.port"]: span.attributes or {} for span in servers}
    assert len(by_port) == len(servers)
    for name, s in seen.items():
        attributes = by_port[s.port]
        if name.startswith("client-"):
            assert attributes["tls.established"] is True
            assert attributes["tls.client.x509.subject.common_name"] == name
            assert attributes["tls.client.subject"] == f"CN={name},O=mTLS tests"
            assert attributes["tls.client.hash.sha256"] == sha256(leaves[name].der).upper()
        else:
            assert attributes["tls.established"] is False
            assert attributes["error.type"] == "certificate_authority_invalid"
            # The certificate it presented, read from its own handshake's messages.
            assert attributes["tls.client.subject"] == f"CN={name},O=mTLS tests"
            assert attributes["tls.client.hash.sha256"] == sha256(leaves[name].der).upper()

    # One client span per connection, each the child of its own client's span.
    clients = handshake_spans(exporter, "client")
    assert len(clients) == GOOD + UNTRUSTED
    parents = {span.parent.span_id for span in clients if span.parent is not None}
    assert parents == {s.span_id for s in seen.values()}
    for span in clients:
        attributes = span.attributes or {}
        assert attributes["tls.established"] is True  # TLS 1.3: the server judges later
        assert attributes["tls.server.x509.subject.common_name"] == "server.test"

    # The late rejections landed on the intruders' own spans, and only there, whether
    # the rejection met their first write or their first read.
    rejected = {
        span.name
        for span in exporter.get_finished_spans()
        if any(event.name == "tls.peer_rejected" for event in span.events)
    }
    assert rejected == {name for name, s in seen.items() if s.failed_on in {"read", "write"}}
