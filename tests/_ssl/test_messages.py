"""The observer of handshake messages (_ssl/messages.py), over real TLS on loopback.

It shares the SSL context's message callback with the host, so the host's callback must
see exactly what it saw without us; and what it keeps of each connection (the hello, the
peer's leaf, the alerts) must name the peer on failed spans, on both sides, and be gone
when the attempt ends.
"""

from __future__ import annotations

import _ssl
import contextlib
import gc
import hashlib
import logging
import socket
import ssl
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider

from conftest import PKI, Instrumented, handshake_spans, kept_records
from opentelemetry.instrumentation.mtls import _diagnostics, _failsafe
from opentelemetry.instrumentation.mtls._signals.audit import AUDIT_LOGGER_NAME, consumed
from opentelemetry.instrumentation.mtls._ssl import messages
from opentelemetry.instrumentation.mtls._x509 import parse_certificate
from tlsrun import TIMEOUT, blocking

pytestmark = pytest.mark.skipif(not messages.AVAILABLE, reason="no _msg_callback slot")

# What only a ClientHello (or an alert) can put on a span.
HELLO_KEYS = (
    "tls.client.ja4",
    "tls.client.ja3",
    "tls.client.server_name",
    "tls.client.supported_ciphers",
    "tls.client.offered_versions",
    "tls.client.offered_next_protocols",
    "tls.alert",
    "tls.alert.source",
)
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_SLOT: Any = vars(_ssl._SSLContext)["_msg_callback"]


def only(spans: list[Any]) -> dict[str, Any]:
    (span,) = spans
    return dict(span.attributes or {})


# -- the host's own callback ---------------------------------------------------------------


def memory_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> list[Any]:
    """One handshake and one record each way over memory BIOs: deterministic, no threads."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(8):
        for name, tls, bio in (("client", client, s_in), ("server", server, c_in)):
            if not done[name]:
                try:
                    tls.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            bio.write((c_out if name == "client" else s_out).read())
        if all(done.values()):
            break
    assert all(done.values())
    server.write(b"ping")
    c_in.write(s_out.read())
    assert client.read(4) == b"ping"
    client.write(b"pong")
    s_in.write(c_out.read())
    assert server.read(4) == b"pong"
    return [server, client]


class HostCallback:
    """What a host's message callback was called with: each call's arguments, data aside.

    The data itself differs between runs (randoms, key shares, signatures); its type and,
    for handshake messages, its first byte (the message type) are kept.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.connections: list[Any] = []

    def __call__(  # CPython's signature
        self, conn: Any, direction: Any, version: Any, content_type: Any, msg_type: Any, data: Any
    ) -> None:
        self.connections.append(conn)
        first = data[0] if int(content_type) == 22 and data else None
        self.calls.append(
            (conn.server_side, direction, version, content_type, msg_type, type(data), first)
        )


def set_host(ctx: ssl.SSLContext, host: HostCallback, way: str) -> None:
    """Install the host's callback as hosts do: the public property, or the C slot itself."""
    if way == "property":
        ctx._msg_callback = host  # type: ignore[attr-defined]
    else:
        _SLOT.__set__(ctx, host)


def run_with_host(pki: PKI, when: str, way: str, instrumented: Instrumented) -> HostCallback:
    """A handshake with the host's callback set before or after instrumenting."""
    server_ctx, client_ctx = pki.server_context(), pki.client_context(pki.client)
    host = HostCallback()
    if when == "before":
        for ctx in (server_ctx, client_ctx):
            set_host(ctx, host, way)
        instrumented()
    else:
        instrumented()
        memory_handshake(server_ctx, client_ctx)  # the observer is on these contexts now
        for ctx in (server_ctx, client_ctx):
            set_host(ctx, host, way)
    ends = memory_handshake(server_ctx, client_ctx)
    assert all(conn in ends for conn in host.connections)  # the conn argument: this one
    if way == "property":
        # What the host reads back is its own callback, as without us.
        assert server_ctx._msg_callback is host  # type: ignore[attr-defined]
    instrumented.off()
    # Uninstrumented, the host's callback is back alone on the slot.
    assert _SLOT.__get__(server_ctx) is not None
    bare = HostCallback()
    set_host(server_ctx, bare, way)
    set_host(client_ctx, bare, way)
    memory_handshake(server_ctx, client_ctx)
    assert host.calls == bare.calls
    return host


@pytest.mark.parametrize("way", ["property", "slot"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_host_callback_is_still_called_with_the_same_arguments(
    when: str, way: str, pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    host = run_with_host(pki, when, way, instrumented)
    # Every record of the handshake and of the data that followed, both directions.
    assert len(host.calls) > 20
    assert {call[1] for call in host.calls} == {"read", "write"}
    assert any(call[6] == 1 for call in host.calls)  # the ClientHello among them
    # Our observer ran beside it: the server span has what the ClientHello said.
    server = handshake_spans(exporter, "server")[-1].attributes or {}
    assert str(server["tls.client.ja4"]).startswith("t13d")
    # Negative control: the bare run (inside run_with_host) made no span.
    assert len(handshake_spans(exporter, "server")) == (2 if when == "after" else 1)


def test_a_failing_host_callback_fails_the_hosts_call_as_without_us(
    pki: PKI, instrumented: Instrumented
) -> None:
    """The host's exception is the host's: it reaches its TLS call, with or without us."""

    def broken(*args: Any) -> None:
        raise LookupError("host callback")

    for on in (True, False):
        if not on:
            instrumented.off()
        server_ctx, client_ctx = pki.server_context(), pki.client_context(pki.client)
        client_ctx._msg_callback = broken  # type: ignore[attr-defined]
        with pytest.raises(LookupError, match="host callback"):
            memory_handshake(server_ctx, client_ctx)


# -- alerts --------------------------------------------------------------------------------


def client_reads_in_a_span(
    pki: PKI, tracer_provider: TracerProvider, client_cert: Any, version: str
) -> tuple[str, str]:
    """A blocking handshake whose client then reads inside a span; return both outcomes."""
    server_ctx = pki.server_context(maximum_version=VERSIONS[version])
    client_ctx = pki.client_context(client_cert)
    tracer = tracer_provider.get_tracer("test")
    outcome = {"server": "not reached", "client": "not reached"}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
                    outcome["server"] = "ok"
            except (OSError, ssl.SSLError) as exc:
                outcome["server"] = type(exc).__name__
            finally:
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                tracer.start_as_current_span("request"),
                socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw,
            ):
                try:
                    with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                        tls.recv(16)
                        outcome["client"] = "ok"
                except (OSError, ssl.SSLError) as exc:
                    outcome["client"] = type(exc).__name__
        finally:
            thread.join(TIMEOUT)
    return outcome["server"], outcome["client"]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_alerts_on_both_sides(
    version: str,
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    """The server's unknown_ca: sent on its span; received on the client's (1.3: late)."""
    server_seen, client_seen = client_reads_in_a_span(
        pki, tracer_provider, pki.untrusted_client, version
    )
    assert server_seen == "SSLCertVerificationError"
    assert client_seen == "SSLError"
    server = only(handshake_spans(exporter, "server"))
    assert server["tls.alert"] == "unknown_ca"
    assert server["tls.alert.source"] == "local"
    client = only(handshake_spans(exporter, "client"))
    (request,) = [span for span in exporter.get_finished_spans() if span.name == "request"]
    if version == "1.2":
        assert client["tls.alert"] == "unknown_ca"
        assert client["tls.alert.source"] == "peer"
        assert client["error.type"] == "peer_rejected_certificate"
        assert not request.events
    else:
        # The client's handshake was over before the server judged it: the alert
        # arrives on its first read, as the late rejection's event.
        assert client["tls.established"] is True
        assert "tls.alert" not in client
        (event,) = [event for event in request.events if event.name == "tls.peer_rejected"]
        assert (event.attributes or {})["tls.alert"] == "unknown_ca"
        assert (event.attributes or {})["tls.alert.source"] == "peer"
        assert (event.attributes or {})["error.type"] == "peer_rejected_certificate"

    # Negative control: a trusted client, no alert anywhere.
    exporter.clear()
    assert client_reads_in_a_span(pki, tracer_provider, pki.client, version) == ("ok", "ok")
    for side in ("server", "client"):
        assert "tls.alert" not in only(handshake_spans(exporter, side))
    (request,) = [span for span in exporter.get_finished_spans() if span.name == "request"]
    assert not request.events


def test_protocol_version_alert_on_both_sides(
    pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    server_ctx = pki.server_context()
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx = pki.client_context(pki.client)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    blocking(server_ctx, client_ctx)
    server = only(handshake_spans(exporter, "server"))
    client = only(handshake_spans(exporter, "client"))
    assert (server["tls.alert"], server["tls.alert.source"]) == ("protocol_version", "local")
    assert (client["tls.alert"], client["tls.alert.source"]) == ("protocol_version", "peer")
    assert client["error.type"] == server["error.type"] == "protocol_version_unsupported"


# -- the certificate a client refused ------------------------------------------------------


def test_a_client_span_names_the_server_certificate_it_refused(
    pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    """Hostname mismatch: the client span names the certificate, with why it failed."""
    outcome = blocking(
        pki.server_context(), pki.client_context(pki.client), server_hostname="wrong.example"
    )
    assert outcome.client.startswith("SSLCertVerificationError")
    client = only(handshake_spans(exporter, "client"))
    assert client["error.type"] == "certificate_hostname_mismatch"
    assert client["tls.server.verify.result"] == "failed"
    assert "wrong.example" in str(client["tls.server.verify.message"])
    assert client["tls.server.subject"] == "CN=server.test,O=mTLS tests"
    assert client["tls.server.hash.sha256"] == hashlib.sha256(pki.server.der).hexdigest().upper()
    assert client["tls.server.x509.alternative_names"] == ("DNS:localhost", "IP:127.0.0.1")
    assert client["tls.alert.source"] == "local"  # we told the server why
    # The server names no client certificate: the client never got to send one.
    assert "tls.client.subject" not in only(handshake_spans(exporter, "server"))

    # Negative control: the right name, a verified certificate.
    exporter.clear()
    blocking(pki.server_context(), pki.client_context(pki.client))
    client = only(handshake_spans(exporter, "client"))
    assert client["tls.server.verify.result"] == "success"
    assert "error.type" not in client


# -- identity modes ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "hashed"])
def test_hashed_mode_hides_presented_identities(
    mode: str, pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    """A rejected client's certificate is named in plain mode, and only there."""
    options = {"identity_mode": "hashed", "hash_key": "k"} if mode == "hashed" else {}
    instrumented(**options)
    with kept_records(AUDIT_LOGGER_NAME) as records:
        blocking(pki.server_context(), pki.client_context(pki.untrusted_client))
    server = only(handshake_spans(exporter, "server"))
    assert server["tls.established"] is False
    assert server["tls.client.verify.result"] == "failed"
    failed = [r for r in records if getattr(r, "event.name", None) == "tls.handshake.failed"]
    assert failed
    text = repr((server, [vars(record) for record in failed]))
    expected_hash = hashlib.sha256(pki.untrusted_client.der).hexdigest().upper()
    assert server["tls.client.hash.sha256"] == expected_hash  # the fingerprint names no one
    if mode == "plain":
        assert server["tls.client.subject"] == "CN=intruder,O=mTLS tests"
        assert "intruder.example.org" in text
    else:
        assert str(server["tls.client.subject"]).startswith("hmac-sha256:")
        assert "intruder" not in text


# -- no ClientHello ------------------------------------------------------------------------


def plain_http(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass  # the server gives up on it as it should


def tcp_probe(port: int) -> None:
    socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


def serve_once(ctx: ssl.SSLContext, client: Callable[[int], None]) -> str:
    """A blocking TLS server for one connection; return what its handshake raised."""
    seen = ["not reached"]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    seen[0] = "ok"
            except (OSError, ssl.SSLError) as exc:
                seen[0] = type(exc).__name__
            finally:
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            client(listener.getsockname()[1])
        finally:
            thread.join(TIMEOUT)
    return seen[0]


@pytest.mark.parametrize("client", [plain_http, tcp_probe], ids=["plain HTTP", "TCP probe"])
def test_no_client_hello_no_hello_attributes(
    client: Callable[[int], None],
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
) -> None:
    """Plain HTTP or a bare connect to the TLS port: a failed span, none of the hello's rows."""
    _failsafe.reset()
    server_ctx = pki.server_context()
    assert serve_once(server_ctx, client) != "ok"
    server = only(handshake_spans(exporter, "server"))
    assert server["tls.established"] is False
    assert not [key for key in HELLO_KEYS if key in server]
    assert "tls.client.subject" not in server
    assert _failsafe.reported() == 0

    # Nothing broke: the same context then serves a real client, whose hello is read.
    exporter.clear()
    outcome = blocking(server_ctx, pki.client_context(pki.client))
    assert outcome.server.startswith("ok")
    assert "tls.client.ja4" in only(handshake_spans(exporter, "server"))
    assert _failsafe.reported() == 0


# -- bounded state -------------------------------------------------------------------------


def rejected_attempt(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, connections: list[Any]
) -> None:
    """One connection the server rejects; a weak reference to its server side is kept."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            with conn:
                tls = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                connections.append(tls if not connections else weakref.ref(tls))
                with contextlib.suppress(OSError, ssl.SSLError):
                    tls.do_handshake()
                tls.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw,
                contextlib.suppress(OSError, ssl.SSLError),
            ):
                client_ctx.wrap_socket(raw, server_hostname="localhost").close()
        finally:
            thread.join(TIMEOUT)


def test_nothing_is_kept_per_connection_after_failed_attempts(
    pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    """Rejected attempts: each one's state ends with it; one bad certificate, one parse."""
    attempts = 30
    client_ctx = pki.client_context(pki.untrusted_client)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # rejected inside the handshake
    connections: list[Any] = []  # the first connection itself, weak references to the rest
    contexts: list[weakref.ref[ssl.SSLContext]] = []
    attempt = partial(rejected_attempt, client_ctx=client_ctx, connections=connections)
    logging.getLogger(AUDIT_LOGGER_NAME).setLevel(logging.CRITICAL)  # no need of the records

    try:
        attempt(pki.server_context())  # the first: its certificates enter the parse cache
        misses = parse_certificate.cache_info().misses
        before = _diagnostics.bounded_state()
        for _ in range(attempts):
            server_ctx = pki.server_context()
            contexts.append(weakref.ref(server_ctx))
            attempt(server_ctx)
            del server_ctx
        gc.collect()
        after = _diagnostics.bounded_state()
    finally:
        logging.getLogger(AUDIT_LOGGER_NAME).setLevel(logging.NOTSET)

    servers = handshake_spans(exporter, "server")
    assert len(servers) == attempts + 1
    # Each failed span named the presented certificate, from one parse of it.
    assert all(
        (span.attributes or {})["tls.client.subject"] == "CN=intruder,O=mTLS tests"
        for span in servers
    )
    assert parse_certificate.cache_info().misses == misses
    # No connection and no context outlived its attempt: the observer holds none.
    assert all(ref() is None for ref in connections[1:])
    assert all(ref() is None for ref in contexts)
    assert after == before
    # What an ended attempt leaves on its connection: nothing to take.
    assert messages.take(connections[0]) is None

    # Negative control: a connection whose attempt is under way has state to take.
    server_ctx = pki.server_context()
    memory = server_ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    messages.watch(memory)
    assert messages.take(memory) is not None


# -- connections nothing would observe for --------------------------------------------


@contextlib.contextmanager
def audit_handlers(*handlers: logging.Handler) -> Any:
    """The security-event logger with only ``handlers`` (and ours), cut off from the root's.

    pytest puts its own capture handler on the root logger; a service without logging
    configured has none.
    """
    logger = logging.getLogger(AUDIT_LOGGER_NAME)
    logger.propagate = False
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.propagate = True


def server_hello_seen(pki: PKI) -> bool:
    """Whether the observer kept a new server connection's ClientHello as it was read."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = pki.client_context(pki.client).wrap_bio(c_in, c_out, server_hostname="localhost")
    server = pki.server_context().wrap_bio(s_in, s_out, server_side=True)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    s_in.write(c_out.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        server.do_handshake()  # reads the ClientHello: the observer, if on, keeps it
    state = server.__dict__.get("_otel_mtls_messages")
    return isinstance(state, messages.Observed) and state.hello is not None


def test_with_the_api_alone_only_a_consumed_record_is_worth_observing(
    pki: PKI, instrumented: Instrumented
) -> None:
    instrumented(tracer_provider=NoOpTracerProvider())
    with audit_handlers():
        assert not consumed()
        assert not server_hello_seen(pki)  # nothing records it: OpenSSL never calls us
    records: list[logging.LogRecord] = []
    keep = logging.Handler()
    keep.emit = records.append  # type: ignore[method-assign]
    with audit_handlers(keep):
        assert consumed()
        assert server_hello_seen(pki)  # the control: a failure's record would use it
        blocking(pki.server_context(), pki.client_context(pki.untrusted_client))
    (record,) = [r for r in records if getattr(r, "event.name") == "tls.handshake.failed"]
    assert getattr(record, "tls.client.ja4").startswith("t13")
    # With an SDK provider the spans record it, whatever the logging.
    instrumented(tracer_provider=TracerProvider())
    with audit_handlers():
        assert server_hello_seen(pki)
