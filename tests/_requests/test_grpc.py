"""The client's identity on gRPC server spans, from each call's auth context: real grpcio.

Servers are real grpcio servers (sync, and grpc.aio on a loop of its own) with
``ssl_server_credentials(..., require_client_auth=True)``; clients are grpcio channels with
``ssl_channel_credentials(root, key, chain)``. Methods are generic handlers with bytes in
and out, so no code is generated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer, GrpcInstrumentorServer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conftest import PKI, Instrumented, kept_records
from opentelemetry.instrumentation.mtls import client_identity
from opentelemetry.instrumentation.mtls._signals.audit import AUDIT_LOGGER_NAME
from opentelemetry.instrumentation.mtls._x509 import auth_context_certificate
from pki import Leaf

pytestmark = pytest.mark.usefixtures("instrumented")

SERVICE = "mtls.test.Echo"
SUBJECT = "CN=web-client,O=mTLS tests"
SPIFFE_ID = "spiffe://example.org/ns/default/sa/web"
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def answer(context: Any) -> bytes:
    """What the servicer knows of its client: the identity ``client_identity`` gives it."""
    identity = client_identity(context)
    return json.dumps({"subject": identity.subject if identity else None}).encode()


def sync_handlers() -> grpc.GenericRpcHandler:
    def unary_unary(request: bytes, context: Any) -> bytes:
        return answer(context)

    def unary_stream(request: bytes, context: Any) -> Iterator[bytes]:
        yield answer(context)
        yield answer(context)

    def stream_unary(requests: Iterator[bytes], context: Any) -> bytes:
        assert list(requests) == [b"a", b"b"]
        return answer(context)

    def stream_stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for _ in requests:
            yield answer(context)

    return generic(unary_unary, unary_stream, stream_unary, stream_stream)


def aio_handlers() -> grpc.GenericRpcHandler:
    async def unary_unary(request: bytes, context: Any) -> bytes:
        return answer(context)

    async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield answer(context)
        yield answer(context)

    async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
        assert [r async for r in requests] == [b"a", b"b"]
        return answer(context)

    async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield answer(context)

    async def writer(request: bytes, context: Any) -> None:
        # The reader/writer API: a coroutine that writes, not an async generator.
        await context.write(answer(context))
        await context.write(answer(context))

    return generic(unary_unary, unary_stream, stream_unary, stream_stream, writer)


def generic(*behaviors: Callable[..., Any]) -> grpc.GenericRpcHandler:
    factories = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    methods = {
        kind: factories[kind](behavior) for kind, behavior in zip(KINDS, behaviors, strict=False)
    }
    if len(behaviors) > len(KINDS):
        methods["writer"] = grpc.unary_stream_rpc_method_handler(behaviors[-1])
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def server_credentials(pki: PKI, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
    key_pair = (read(pki.server.key_path), read(pki.server.cert_path))
    return grpc.ssl_server_credentials(
        [key_pair], root_certificates=pki.ca.cert_pem, require_client_auth=require_client_auth
    )


Credentials = grpc.ServerCredentials | None


@contextmanager
def sync_server(credentials: Credentials, **options: Any) -> Iterator[int]:
    """A grpcio server on a thread pool, plaintext without ``credentials``; yields the port."""
    with futures.ThreadPoolExecutor(max_workers=4) as pool:
        server = grpc.server(pool, handlers=[sync_handlers()], **options)
        port = add_port(server, credentials)
        server.start()
        try:
            yield port
        finally:
            server.stop(None)


@contextmanager
def aio_server(credentials: Credentials, **options: Any) -> Iterator[int]:
    """A grpc.aio server on an event loop in a thread of its own; yields the port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(handlers=[aio_handlers()], **options)
        port = add_port(server, credentials)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def add_port(server: Any, credentials: Credentials) -> int:
    if credentials is None:
        return int(server.add_insecure_port("127.0.0.1:0"))
    return int(server.add_secure_port("127.0.0.1:0", credentials))


SERVERS = {"sync": sync_server, "aio": aio_server}


@pytest.fixture(params=list(SERVERS))
def serve(request: pytest.FixtureRequest) -> Callable[..., Any]:
    return SERVERS[request.param]


@contextmanager
def contrib_spans(tracer_provider: TracerProvider) -> Iterator[None]:
    """opentelemetry-instrumentation-grpc's server spans, sync and aio, while the block runs."""
    GrpcInstrumentorServer().instrument(tracer_provider=tracer_provider)
    GrpcAioInstrumentorServer().instrument(tracer_provider=tracer_provider)
    try:
        yield
    finally:
        GrpcAioInstrumentorServer().uninstrument()
        GrpcInstrumentorServer().uninstrument()


@pytest.fixture
def contrib(tracer_provider: TracerProvider, instrumented: Instrumented) -> Iterator[None]:
    """Contrib's server spans on top of ours, torn down first (each restores what it found)."""
    with contrib_spans(tracer_provider):
        yield


@contextmanager
def channel(pki: PKI, port: int, cert: Leaf | None) -> Iterator[grpc.Channel]:
    if cert is None:
        credentials = grpc.ssl_channel_credentials(pki.ca.cert_pem)
    else:
        credentials = grpc.ssl_channel_credentials(
            pki.ca.cert_pem, read(cert.key_path), read(cert.cert_path)
        )
    with grpc.secure_channel(f"localhost:{port}", credentials) as opened:
        yield opened


def call_all(opened: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[str | None]:
    """Call each kind of method once; return the subjects the servicer saw, in order."""
    path = f"/{SERVICE}/"
    answers = [
        opened.unary_unary(path + "unary_unary")(b"x", timeout=10, metadata=metadata),
        *opened.unary_stream(path + "unary_stream")(b"x", timeout=10, metadata=metadata),
        opened.stream_unary(path + "stream_unary")(
            iter([b"a", b"b"]), timeout=10, metadata=metadata
        ),
        *opened.stream_stream(path + "stream_stream")(iter([b"a"]), timeout=10, metadata=metadata),
    ]
    return [json.loads(a)["subject"] for a in answers]


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_every_kind_of_call_carries_the_verified_identity(
    serve: Callable[..., Any], pki: PKI, exporter: InMemorySpanExporter, instrumented: Instrumented
) -> None:
    # Full request attributes: every certificate attribute and the session's, as gRPC tells.
    instrumented(request_attributes="full")
    with (
        contrib_spans(instrumented.tracer_provider),
        serve(server_credentials(pki)) as port,
        channel(pki, port, pki.client) as opened,
    ):
        seen = call_all(opened) + call_all(opened)  # two rounds on one connection
    assert seen == [SUBJECT] * len(seen)
    spans = server_spans(exporter)
    assert sorted(s.name for s in spans) == sorted(f"/{SERVICE}/{kind}" for kind in KINDS * 2)
    fingerprint = hashlib.sha256(pki.client.der).hexdigest().upper()
    for span in spans:
        attrs = attributes(span)
        assert attrs["tls.client.subject"] == SUBJECT
        assert attrs["tls.client.issuer"] == "CN=mTLS test CA root,O=mTLS test CA"
        assert attrs["tls.client.x509.subject.common_name"] == "web-client"
        assert attrs["tls.client.spiffe_id"] == SPIFFE_ID
        assert set(attrs["tls.client.x509.alternative_names"]) == {
            "DNS:web.example.org",
            f"URI:{SPIFFE_ID}",
        }
        assert attrs["tls.client.hash.sha256"] == fingerprint
        assert attrs["tls.client.identity.source"] == "grpc_auth_context"
        assert attrs["tls.client.verify.result"] == "success"
        assert attrs["tls.protocol.version"] == "1.3"
        assert attrs["tls.resumed"] is False
        assert span.links == ()  # gRPC's handshake is not Python's: nothing to link to


@pytest.mark.usefixtures("contrib")
def test_two_clients_are_never_mixed_up(
    serve: Callable[..., Any], pki: PKI, exporter: InMemorySpanExporter
) -> None:
    other = pki.ca.issue("other-client", uris=("spiffe://example.org/ns/other/sa/batch",))
    with (
        serve(server_credentials(pki)) as port,
        channel(pki, port, pki.client) as web,
        channel(pki, port, other) as batch,
    ):
        for i in range(6):
            opened, expected = (web, "web-client") if i % 2 else (batch, "other-client")
            seen = json.loads(opened.unary_unary(f"/{SERVICE}/unary_unary")(b"x", timeout=10))
            assert seen["subject"] == f"CN={expected},O=mTLS tests"
    spans = server_spans(exporter)
    names = [attributes(s)["tls.client.subject"] for s in spans]
    assert sorted(names) == ["CN=other-client,O=mTLS tests"] * 3 + [SUBJECT] * 3
    # Lean by default: the identity, not the certificate's other fields nor the session.
    assert all("tls.client.x509.subject.common_name" not in attributes(s) for s in spans)
    assert all("tls.protocol.version" not in attributes(s) for s in spans)


def test_metadata_cannot_claim_an_identity(
    serve: Callable[..., Any], pki: PKI, exporter: InMemorySpanExporter, instrumented: Instrumented
) -> None:
    # Even with loopback as a trusted proxy: a call's identity comes from its auth context,
    # and metadata (every key of it a client can write) plays no part.
    instrumented(trusted_proxies="127.0.0.0/8")
    forged = pki.untrusted_client.certificate.public_bytes(Encoding.PEM).decode()
    metadata = (
        ("x509_common_name", "intruder"),
        ("x509_pem_cert", forged.replace("\n", "")),
        ("peer_spiffe_id", "spiffe://example.org/ns/admin/sa/root"),
        ("x-forwarded-client-cert", 'Hash=00;Subject="CN=intruder";URI=spiffe://evil/sa/root'),
        ("x-forwarded-for", "10.9.9.9"),
    )
    with (
        contrib_spans(instrumented.tracer_provider),
        serve(server_credentials(pki)) as port,
        channel(pki, port, pki.client) as opened,
    ):
        seen = call_all(opened, metadata)
    assert seen == [SUBJECT] * len(seen)
    spans = server_spans(exporter)
    assert len(spans) == 4
    for span in spans:
        attrs = attributes(span)
        assert attrs["tls.client.subject"] == SUBJECT
        assert attrs["tls.client.spiffe_id"] == SPIFFE_ID
        assert attrs["tls.client.identity.source"] == "grpc_auth_context"


@pytest.mark.usefixtures("contrib")
@pytest.mark.parametrize("cert", ["none", "foreign CA"])
def test_clients_the_server_rejects_reach_no_servicer(
    cert: str, serve: Callable[..., Any], pki: PKI, exporter: InMemorySpanExporter
) -> None:
    leaf = None if cert == "none" else pki.untrusted_client
    with (
        serve(server_credentials(pki)) as port,
        channel(pki, port, leaf) as opened,
        pytest.raises(grpc.RpcError) as failure,
    ):
        opened.unary_unary(f"/{SERVICE}/unary_unary")(b"x", timeout=10)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
    assert server_spans(exporter) == []


@pytest.mark.usefixtures("contrib")
def test_a_server_that_does_not_ask_for_certificates_has_no_identity(
    serve: Callable[..., Any], pki: PKI, exporter: InMemorySpanExporter
) -> None:
    # grpcio either requires and verifies a client certificate, or does not ask for one:
    # the client's certificate is then never sent.
    credentials = server_credentials(pki, require_client_auth=False)
    with serve(credentials) as port, channel(pki, port, pki.client) as opened:
        seen = call_all(opened)
    assert seen == [None] * len(seen)
    spans = server_spans(exporter)
    assert len(spans) == 4
    for span in spans:
        attrs = attributes(span)
        # Lean: the source alone says the auth context was read and named no one.
        assert attrs["tls.client.identity.source"] == "grpc_auth_context"
        assert "tls.client.subject" not in attrs
        assert "tls.client.verify.result" not in attrs


@pytest.mark.usefixtures("contrib")
def test_plaintext_calls_are_left_alone(
    serve: Callable[..., Any], exporter: InMemorySpanExporter
) -> None:
    with serve(None) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as opened:
        seen = call_all(opened)
    assert seen == [None] * len(seen)
    spans = server_spans(exporter)
    assert len(spans) == 4
    assert not [k for s in spans for k in attributes(s) if k.startswith("tls.")]


def test_without_mtls_instrumentation_spans_have_no_identity(
    serve: Callable[..., Any],
    pki: PKI,
    exporter: InMemorySpanExporter,
    instrumented: Instrumented,
) -> None:
    instrumented.off()  # negative control: contrib alone
    with (
        contrib_spans(instrumented.tracer_provider),
        serve(server_credentials(pki)) as port,
        channel(pki, port, pki.client) as opened,
    ):
        call_all(opened)
    spans = server_spans(exporter)
    assert len(spans) == 4
    assert not [k for s in spans for k in attributes(s) if k.startswith("tls.")]


def test_contrib_instrumented_first_is_enriched_too(
    serve: Callable[..., Any], pki: PKI, exporter: InMemorySpanExporter, instrumented: Instrumented
) -> None:
    # opentelemetry-instrument loads instrumentors in no set order.
    instrumented.off()
    with contrib_spans(instrumented.tracer_provider):
        instrumented()
        try:
            with serve(server_credentials(pki)) as port, channel(pki, port, pki.client) as opened:
                call_all(opened)
        finally:
            instrumented.off()  # in reverse order, so that each restores what it found
    spans = server_spans(exporter)
    assert [attributes(s)["tls.client.subject"] for s in spans] == [SUBJECT] * 4


def test_client_identity_without_a_server_span(
    serve: Callable[..., Any], pki: PKI, exporter: InMemorySpanExporter
) -> None:
    # No gRPC instrumentation: no span to enrich, yet the servicer knows its client.
    with serve(server_credentials(pki)) as port, channel(pki, port, pki.client) as opened:
        seen = call_all(opened)
    assert seen == [SUBJECT] * len(seen)
    assert server_spans(exporter) == []


def test_aio_reader_writer_streams_keep_working(pki: PKI) -> None:
    # grpc.aio runs a coroutine handler with context.write(), an async generator by
    # iterating it: the interceptor's stand-in must be of the same kind.
    with aio_server(server_credentials(pki)) as port, channel(pki, port, pki.client) as opened:
        answers = list(opened.unary_stream(f"/{SERVICE}/writer")(b"x", timeout=10))
    assert [json.loads(a)["subject"] for a in answers] == [SUBJECT, SUBJECT]


def test_an_interceptor_of_the_application_given_by_position_gets_the_identity(
    pki: PKI, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    # The application's own server span, from its own interceptor, passed by position:
    # ours is appended after it, so its span is the current one when ours runs.
    tracer = tracer_provider.get_tracer("app")

    class OwnSpans(grpc.ServerInterceptor):  # type: ignore[misc]
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            handler = continuation(details)
            behavior = handler.unary_unary

            def traced(request: bytes, context: Any) -> Any:
                with tracer.start_as_current_span(details.method, kind=SpanKind.SERVER):
                    return behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(traced)

    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        server = grpc.server(pool, [sync_handlers()], [OwnSpans()])
        port = add_port(server, server_credentials(pki))
        server.start()
        try:
            with channel(pki, port, pki.client) as opened:
                for _ in range(3):
                    opened.unary_unary(f"/{SERVICE}/unary_unary")(b"x", timeout=10)
        finally:
            server.stop(None)
    spans = server_spans(exporter)
    assert [attributes(s)["tls.client.subject"] for s in spans] == [SUBJECT] * 3


@pytest.mark.parametrize("mode", ["hashed", "omit"])
def test_identity_modes_apply(
    mode: str, pki: PKI, exporter: InMemorySpanExporter, instrumented: Instrumented
) -> None:
    instrumented(identity_mode=mode, hash_key="k1")
    with (
        contrib_spans(instrumented.tracer_provider),
        sync_server(server_credentials(pki)) as port,
        channel(pki, port, pki.client) as opened,
    ):
        call_all(opened)
    spans = server_spans(exporter)
    text = repr([attributes(s) for s in spans])
    for secret in ("web-client", "web.example.org", SPIFFE_ID):
        assert secret not in text
    attrs = attributes(spans[0])
    assert attrs["tls.client.hash.sha256"] == hashlib.sha256(pki.client.der).hexdigest().upper()
    if mode == "hashed":
        assert str(attrs["tls.client.spiffe_id"]).startswith("hmac-sha256:")
    else:
        assert "tls.client.spiffe_id" not in attrs


@pytest.mark.parametrize(
    ("domain", "decision"), [("example.org", "allowed"), ("other.org", "denied")]
)
def test_identity_policy_is_applied_to_each_call(
    domain: str,
    decision: str,
    serve: Callable[..., Any],
    pki: PKI,
    exporter: InMemorySpanExporter,
    instrumented: Instrumented,
) -> None:
    instrumented(spiffe_trust_domains=domain)
    with (
        kept_records(AUDIT_LOGGER_NAME, logging.WARNING) as records,
        contrib_spans(instrumented.tracer_provider),
        serve(server_credentials(pki)) as port,
        channel(pki, port, pki.client) as opened,
    ):
        seen = call_all(opened)
    assert seen == [SUBJECT] * len(seen)  # observed only: every call is served
    spans = server_spans(exporter)
    assert len(spans) == 4
    for span in spans:
        (event,) = [e for e in span.events if e.name == "tls.identity.decision"]
        assert dict(event.attributes or {}) == {
            "tls.client.identity.decision": decision,
            "tls.client.identity.rule": "spiffe_trust_domain",
        }
    denials = [r for r in records if getattr(r, "event.name", None) == "tls.identity.denied"]
    assert bool(denials) is (decision == "denied")


def test_auth_context_certificate_reads_only_the_pem_property(pki: PKI) -> None:
    pem = pki.client.certificate.public_bytes(Encoding.PEM)
    assert auth_context_certificate({"x509_pem_cert": [pem]}) == pki.client.der
    assert auth_context_certificate({"x509_common_name": [b"web-client"]}) is None
    assert auth_context_certificate({"x509_pem_cert": [b"not a certificate"]}) is None
    assert auth_context_certificate({}) is None
