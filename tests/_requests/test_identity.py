"""A request's identity is its connection's: attacks that name another connection fail.

Each attack is a real client with its own valid certificate (mallory) against a real
server, trying to be taken for another client (admin) through what a request can say:
``X-Forwarded-For`` (which uvicorn, by default, and hypercorn's ProxyFixMiddleware turn
into ``scope["client"]``), proxy headers, and reconnecting from the same port. Each has
its negative control: the same request without the attack, or the genuine client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conftest import PKI, Instrumented
from opentelemetry.instrumentation.mtls import MTLSMiddleware, client_identity
from pki import Leaf, write
from servers import answer_json, hypercorn_server, uvicorn_server

pytestmark = pytest.mark.usefixtures("instrumented")

ADMIN = "spiffe://example.org/ns/ops/sa/admin"
MALLORY = "spiffe://example.org/ns/guest/sa/mallory"


async def whoami(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer with the identity the request carries, and the client address it was given."""
    identity = client_identity(scope)
    payload = {
        "spiffe_id": identity.spiffe_id if identity else None,
        "source": identity.source if identity else None,
        "client": list(scope["client"]) if scope.get("client") else None,
    }
    body = json.dumps(payload).encode()
    await answer_json(scope, receive, send, body)


@pytest.fixture(scope="module")
def people(pki: PKI) -> dict[str, Leaf]:
    return {
        "admin": pki.ca.issue("admin", uris=(ADMIN,)),
        "mallory": pki.ca.issue("mallory", uris=(MALLORY,)),
    }


def app(tracer_provider: TracerProvider) -> Any:
    return OpenTelemetryMiddleware(
        MTLSMiddleware(whoami), tracer_provider=tracer_provider, exclude_spans=["receive", "send"]
    )


Server = Callable[..., AbstractContextManager[int]]
SERVERS: dict[str, Server] = {
    "uvicorn-asyncio": lambda a, pki, **o: uvicorn_server(a, pki, loop="asyncio", **o),
    "uvicorn-uvloop": lambda a, pki, **o: uvicorn_server(a, pki, loop="uvloop", **o),
    "uvicorn-any-proxy": lambda a, pki, **o: uvicorn_server(a, pki, forwarded_allow_ips="*", **o),
    "hypercorn": lambda a, pki, **o: hypercorn_server(a, pki),
}


@pytest.fixture(params=list(SERVERS))
def serve(request: pytest.FixtureRequest) -> Server:
    return SERVERS[request.param]


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    exporter.clear()
    return spans


def client(pki: PKI, leaf: Leaf, **options: Any) -> httpx.Client:
    return httpx.Client(verify=pki.client_context(leaf), timeout=10, **options)


def local_port(http: httpx.Client, url: str) -> int:
    """The client port of the live pooled connection to ``url``: admin's address."""
    response = http.get(url)
    stream = response.extensions["network_stream"]
    return int(stream.get_extra_info("client_addr")[1])


@pytest.mark.parametrize("http2", [False, True])
def test_x_forwarded_for_naming_a_live_connection_keeps_the_own_identity(
    serve: Server,
    http2: bool,
    pki: PKI,
    people: dict[str, Leaf],
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    with (
        serve(app(tracer_provider), pki) as port,
        client(pki, people["admin"], http2=http2) as admin,
        client(pki, people["mallory"], http2=http2) as mallory,
    ):
        url = f"https://localhost:{port}/"
        admin_port = local_port(admin, url)  # admin's connection stays open in its pool
        forged = {"x-forwarded-for": f"127.0.0.1:{admin_port}"}
        attack = mallory.get(url, headers=forged).json()
        control = admin.get(url).json()
    # The forgery did reach the scope (the server believed the header)...
    assert attack["client"][0].startswith("127.0.0.1")
    # ...and still the request is mallory's, everywhere.
    assert attack["spiffe_id"] == MALLORY
    assert control["spiffe_id"] == ADMIN
    spans = server_spans(exporter)
    ids = sorted(str((s.attributes or {}).get("tls.client.spiffe_id")) for s in spans)
    assert ids == sorted([ADMIN, MALLORY, ADMIN])


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_identity_policy_follows_the_connection_not_x_forwarded_for(
    loop: str,
    pki: PKI,
    people: dict[str, Leaf],
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    instrumented(san_patterns="URI:spiffe://example.org/ns/ops/*", enforce_identity_policy=True)
    with (
        uvicorn_server(app(tracer_provider), pki, loop=loop) as port,
        client(pki, people["admin"]) as admin,
        client(pki, people["mallory"]) as mallory,
    ):
        url = f"https://localhost:{port}/"
        admin_port = local_port(admin, url)
        forged = mallory.get(url, headers={"x-forwarded-for": f"127.0.0.1:{admin_port}"})
        plain = mallory.get(url)
        allowed = admin.get(url)
    assert (forged.status_code, plain.status_code, allowed.status_code) == (403, 403, 200)


def test_a_closed_websocket_leaves_nothing_to_impersonate_under_uvloop(
    pki: PKI, people: dict[str, Leaf], tracer_provider: TracerProvider
) -> None:
    from websockets.sync.client import connect

    with uvicorn_server(app(tracer_provider), pki, loop="uvloop") as port:
        # Our own socket: its port is known before the server may close the WebSocket.
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        admin_port = raw.getsockname()[1]
        url = f"wss://localhost:{port}/ws"
        with connect(url, sock=raw, ssl=pki.client_context(people["admin"])) as ws:
            seen = json.loads(ws.recv())
        assert seen["spiffe_id"] == ADMIN  # the control: the WebSocket had admin's identity
        time.sleep(0.2)
        with client(pki, people["mallory"]) as mallory:
            forged = {"x-forwarded-for": f"127.0.0.1:{admin_port}"}
            attack = mallory.get(f"https://localhost:{port}/", headers=forged).json()
    assert attack["spiffe_id"] == MALLORY


def xfcc_for(uri: str) -> dict[str, str]:
    return {"x-forwarded-client-cert": f'Hash={"AB" * 32};Subject="CN=forged";URI={uri}'}


def test_x_forwarded_for_naming_a_trusted_proxy_does_not_make_it_one(
    pki: PKI,
    people: dict[str, Leaf],
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    instrumented(trusted_proxies="10.0.0.5/32", spiffe_trust_domains="trusted.test")
    forged = {"x-forwarded-for": "10.0.0.5", **xfcc_for("spiffe://trusted.test/ns/x/sa/root")}
    with uvicorn_server(app(tracer_provider), pki) as port, client(pki, people["mallory"]) as m:
        attack = m.get(f"https://localhost:{port}/", headers=forged).json()
    assert attack["client"][0] == "10.0.0.5"  # the server believed the header
    assert (attack["spiffe_id"], attack["source"]) == (MALLORY, "handshake")
    (span,) = server_spans(exporter)
    rules = [
        dict(e.attributes or {})["tls.client.identity.rule"]
        for e in span.events
        if e.name == "tls.identity.decision"
    ]
    assert rules == ["untrusted_proxy_header", "spiffe_trust_domain"]


def test_a_genuine_trusted_proxy_keeps_its_identity_with_x_forwarded_for(
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    instrumented(trusted_proxies="127.0.0.1/32")
    headers = {"x-forwarded-for": "203.0.113.7", **xfcc_for(ADMIN)}
    with uvicorn_server(app(tracer_provider), pki, tls=False) as port, httpx.Client() as http:
        answer = http.get(f"http://127.0.0.1:{port}/", headers=headers).json()
        without = http.get(f"http://127.0.0.1:{port}/").json()
    assert answer["client"][0] == "203.0.113.7"
    assert (answer["spiffe_id"], answer["source"]) == (ADMIN, "xfcc")
    assert without["spiffe_id"] is None  # the control: no header, no identity
    first, _ = server_spans(exporter)
    assert not [e for e in first.events if e.name == "tls.identity.decision"]


def nginx_header(leaf: Leaf) -> dict[str, str]:
    pem = leaf.certificate.public_bytes(encoding=Encoding.PEM).decode()
    return {"ssl-client-cert": urllib.parse.quote(pem)}


def test_only_the_configured_header_format_is_believed(
    pki: PKI,
    people: dict[str, Leaf],
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    instrumented(trusted_proxies="127.0.0.1/32", proxy_header="nginx")
    # nginx sets its own header, and passes the client's forged XFCC through.
    headers = {**nginx_header(people["mallory"]), **xfcc_for(ADMIN)}
    with uvicorn_server(app(tracer_provider), pki, tls=False) as port, httpx.Client() as http:
        attack = http.get(f"http://127.0.0.1:{port}/", headers=headers).json()
        control = http.get(f"http://127.0.0.1:{port}/", headers=nginx_header(people["admin"]))
    assert (attack["spiffe_id"], attack["source"]) == (MALLORY, "nginx")
    assert control.json()["spiffe_id"] == ADMIN
    attacked, controlled = server_spans(exporter)
    reported = [
        dict(e.attributes or {})["tls.client.identity.rule"]
        for e in attacked.events
        if e.name == "tls.identity.decision"
    ]
    assert reported == ["untrusted_proxy_header"]
    assert not [e for e in controlled.events if e.name == "tls.identity.decision"]


def test_revocation_enforce_is_not_bypassed_by_x_forwarded_for(
    pki: PKI, tracer_provider: TracerProvider, instrumented: Instrumented
) -> None:
    revoked = pki.ca.issue("revoked-client")
    instrumented(revocation="enforce", crl_files=write(pki.ca.revocation_list(revoked), ".crl"))
    with uvicorn_server(app(tracer_provider), pki) as port:
        url = f"https://localhost:{port}/"
        with client(pki, revoked) as http:
            forged = http.get(url, headers={"x-forwarded-for": "127.0.0.1:1"})
        with client(pki, pki.client) as http:
            good = http.get(url, headers={"x-forwarded-for": "127.0.0.1:1"})
    assert (forged.status_code, good.status_code) == (403, 200)


def test_revocation_enforce_fails_closed_for_identity_headers_without_a_connection(
    pki: PKI, people: dict[str, Leaf], instrumented: Instrumented
) -> None:
    # A plaintext server is not followed when no proxy is trusted: no connection is known.
    instrumented(revocation="enforce")
    with uvicorn_server(MTLSMiddleware(whoami), pki, tls=False) as port, httpx.Client() as http:
        with_headers = http.get(f"http://127.0.0.1:{port}/", headers=xfcc_for(ADMIN))
        without = http.get(f"http://127.0.0.1:{port}/")
    assert (with_headers.status_code, without.status_code) == (403, 200)


class Gate:
    """Holds a request in its handler until the test has reconnected from its port."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[str | None] = []

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        first = client_identity(scope)
        if scope["path"] == "/hold":
            self.entered.set()
            while not self.release.is_set():
                await asyncio.sleep(0.01)
            again = client_identity(scope)
            self.seen = [i.spiffe_id if i else None for i in (first, again)]
        await whoami(scope, receive, send)


def tls_socket(pki: PKI, leaf: Leaf, port: int, local_port: int = 0) -> ssl.SSLSocket:
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    raw.bind(("127.0.0.1", local_port))
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    return pki.client_context(leaf).wrap_socket(raw, server_hostname="localhost")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_identity_stays_stable_across_a_reset_and_reconnect_from_the_same_port(
    loop: str, pki: PKI, people: dict[str, Leaf]
) -> None:
    gate = Gate()
    with uvicorn_server(MTLSMiddleware(gate.app), pki, loop=loop) as port:
        held = tls_socket(pki, people["admin"], port)
        held_port = held.getsockname()[1]
        held.sendall(b"GET /hold HTTP/1.1\r\nhost: localhost\r\n\r\n")
        assert gate.entered.wait(10)
        # Reset admin's connection, and come back from the same port as mallory.
        held.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        held.close()
        again = tls_socket(pki, people["mallory"], port, held_port)
        again.sendall(b"GET /now HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        answer = b""
        while chunk := again.recv(65536):
            answer += chunk
        again.close()
        gate.release.set()
        deadline = time.monotonic() + 10
        while not gate.seen and time.monotonic() < deadline:
            time.sleep(0.01)
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["spiffe_id"] == MALLORY
    assert gate.seen == [ADMIN, ADMIN]


def test_an_ipv4_mapped_peer_matches_an_ipv4_trusted_range(
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    sock = socket.socket(socket.AF_INET6)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::ffff:127.0.0.1", 0))
    sock.listen()
    instrumented(trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")])
    with (
        uvicorn_server(app(tracer_provider), pki, tls=False, sock=sock) as port,
        httpx.Client() as http,
    ):
        answer = http.get(f"http://127.0.0.1:{port}/", headers=xfcc_for(ADMIN)).json()
    assert answer["client"][0] == "::ffff:127.0.0.1"
    assert (answer["spiffe_id"], answer["source"]) == (ADMIN, "xfcc")
    instrumented(trusted_proxies="10.0.0.0/8")  # the control: the same peer, not trusted
    sock = socket.socket(socket.AF_INET6)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::ffff:127.0.0.1", 0))
    sock.listen()
    with (
        uvicorn_server(app(tracer_provider), pki, tls=False, sock=sock) as port,
        httpx.Client() as http,
    ):
        control = http.get(f"http://127.0.0.1:{port}/", headers=xfcc_for(ADMIN)).json()
    assert control["spiffe_id"] is None


def ca_fingerprint(authority: Any) -> str:
    from cryptography.hazmat.primitives import hashes

    return authority.certificate.fingerprint(hashes.SHA256()).hex().upper()


@pytest.mark.parametrize("allowed_ca", ["ours", "theirs"])
def test_identity_policy_by_issuing_ca_fingerprint(
    allowed_ca: str, pki: PKI, tracer_provider: TracerProvider, instrumented: Instrumented
) -> None:
    authority = pki.ca if allowed_ca == "ours" else pki.other_ca
    instrumented(allowed_issuers=ca_fingerprint(authority), enforce_identity_policy=True)
    with uvicorn_server(app(tracer_provider), pki) as port, client(pki, pki.client) as http:
        status = http.get(f"https://localhost:{port}/").status_code
    assert status == (200 if allowed_ca == "ours" else 403)
