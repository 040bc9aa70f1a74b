"""Identities forwarded by trusted proxies, spoofing attempts, and the identity policy.

Real uvicorn servers on loopback; the "proxy" is the test client itself, so the
application's TCP peer is 127.0.0.1, trusted or not depending on the configuration.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import urllib.parse
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
from opentelemetry.instrumentation.mtls._signals.audit import AUDIT_LOGGER_NAME
from pki import Leaf
from servers import uvicorn_server

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


async def whoami(scope: dict[str, Any], receive: Any, send: Any) -> None:
    identity = client_identity(scope)
    body = json.dumps(
        {
            "spiffe_id": identity.spiffe_id if identity else None,
            "source": identity and identity.source,
        }
    ).encode()
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def app(tracer_provider: TracerProvider) -> Any:
    return OpenTelemetryMiddleware(
        MTLSMiddleware(whoami), tracer_provider=tracer_provider, exclude_spans=["receive", "send"]
    )


def server_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    exporter.clear()
    return span


def pem(leaf: Leaf) -> str:
    return leaf.certificate.public_bytes(encoding=Encoding.PEM).decode()


def headers_for(kind: str, leaf: Leaf) -> dict[str, str]:
    """The header each proxy would send for this client certificate."""
    if kind == "xfcc":
        return {
            "x-forwarded-client-cert": f'By=spiffe://proxy;Cert="{urllib.parse.quote(pem(leaf))}";'
            'Subject="CN=web-client,O=mTLS tests"'
        }
    if kind == "rfc9440":
        return {"client-cert": f":{base64.b64encode(leaf.der).decode()}:"}
    if kind == "traefik":
        body = "".join(pem(leaf).splitlines()[1:-1])
        return {"x-forwarded-tls-client-cert": urllib.parse.quote(body)}
    return {"ssl-client-cert": urllib.parse.quote(pem(leaf))}


@pytest.mark.parametrize("kind", ["xfcc", "rfc9440", "traefik", "nginx"])
def test_identity_from_a_trusted_proxy(
    kind: str,
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    instrumented(trusted_proxies=LOOPBACK, proxy_header=kind)
    with uvicorn_server(app(tracer_provider), pki, tls=False) as port, httpx.Client() as http:
        answer = http.get(f"http://127.0.0.1:{port}/", headers=headers_for(kind, pki.client))
    assert answer.json() == {"spiffe_id": "spiffe://example.org/ns/default/sa/web", "source": kind}
    attributes = server_span(exporter).attributes or {}
    assert attributes["tls.client.spiffe_id"] == "spiffe://example.org/ns/default/sa/web"
    assert attributes["tls.client.identity.source"] == kind


def test_the_same_header_from_an_untrusted_peer_is_ignored_and_reported(
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
    caplog: pytest.LogCaptureFixture,
) -> None:
    instrumented(trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    with (
        caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER_NAME),
        uvicorn_server(app(tracer_provider), pki, tls=False) as port,
        httpx.Client() as http,
    ):
        answer = http.get(f"http://127.0.0.1:{port}/", headers=headers_for("xfcc", pki.client))
    assert answer.json() == {"spiffe_id": None, "source": None}
    span = server_span(exporter)
    assert not [k for k in (span.attributes or {}) if k.startswith("tls.client.")]
    (event,) = [e for e in span.events if e.name == "tls.identity.decision"]
    assert dict(event.attributes or {}) == {
        "tls.client.identity.decision": "denied",
        "tls.client.identity.rule": "untrusted_proxy_header",
    }
    (record,) = [r for r in caplog.records if getattr(r, "event.name", "") == "tls.identity.denied"]
    assert getattr(record, "client.address") == "127.0.0.1"


def test_malformed_header_from_a_trusted_proxy_is_a_clear_outcome(
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    instrumented(trusted_proxies=LOOPBACK)
    with uvicorn_server(app(tracer_provider), pki, tls=False) as port, httpx.Client() as http:
        answer = http.get(
            f"http://127.0.0.1:{port}/", headers={"x-forwarded-client-cert": 'Cert="%ZZ;Hash=1'}
        )
    assert answer.status_code == 200 and answer.json()["spiffe_id"] is None
    attributes = server_span(exporter).attributes or {}
    assert attributes["tls.client.identity.source"] == "xfcc"
    assert attributes["tls.client.x509.parse_error"]


def policy_run(pki: PKI, tracer_provider: TracerProvider, cert: Leaf) -> int:
    with (
        uvicorn_server(app(tracer_provider), pki) as port,
        httpx.Client(verify=pki.client_context(cert), timeout=10) as http,
    ):
        return http.get(f"https://localhost:{port}/").status_code


@pytest.mark.parametrize("enforce", [False, True])
def test_identity_policy_observes_or_enforces(
    enforce: bool,
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
    caplog: pytest.LogCaptureFixture,
) -> None:
    instrumented(spiffe_trust_domains="example.org", enforce_identity_policy=enforce)
    stranger = pki.ca.issue("stranger", uris=("spiffe://elsewhere.test/ns/x/sa/y",))
    with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER_NAME):
        allowed = policy_run(pki, tracer_provider, pki.client)
        allowed_span = server_span(exporter)
        denied = policy_run(pki, tracer_provider, stranger)
        denied_span = server_span(exporter)
    assert allowed == 200
    assert denied == (403 if enforce else 200)
    decisions = [
        dict(e.attributes or {})["tls.client.identity.decision"]
        for span in (allowed_span, denied_span)
        for e in span.events
        if e.name == "tls.identity.decision"
    ]
    assert decisions == ["allowed", "denied"]
    denials = [r for r in caplog.records if getattr(r, "event.name", "") == "tls.identity.denied"]
    assert [getattr(r, "tls.client.identity.rule") for r in denials] == ["spiffe_trust_domain"]


def crl_file(pki: PKI, revoked: Leaf) -> str:
    from pki import write

    return write(pki.ca.revocation_list(revoked), ".crl")


@pytest.mark.parametrize("mode", ["observe", "enforce"])
def test_revocation_is_observed_or_enforced(
    mode: str,
    pki: PKI,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    instrumented: Instrumented,
) -> None:
    revoked = pki.ca.issue("revoked-client")
    instrumented(revocation=mode, crl_files=crl_file(pki, revoked))
    statuses = []
    for cert in (pki.client, revoked):
        with (
            uvicorn_server(app(tracer_provider), pki) as port,
            httpx.Client(verify=pki.client_context(cert), timeout=10) as http,
        ):
            codes = [http.get(f"https://localhost:{port}/").status_code for _ in range(2)]
        spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
        exporter.clear()
        events = [
            dict(e.attributes or {})
            for s in spans
            for e in s.events
            if e.name == "tls.revocation.checked"
        ]
        statuses.append((codes, events[-1] if events else None))
    good, bad = statuses
    assert good == (
        [200, 200],
        {"tls.client.revocation.status": "good", "tls.client.revocation.source": "crl"},
    )
    expected = [403, 403] if mode == "enforce" else [200, 200]
    assert bad[0] == expected
    assert bad[1] == {
        "tls.client.revocation.status": "revoked",
        "tls.client.revocation.source": "crl",
    }
