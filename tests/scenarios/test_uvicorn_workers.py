"""A FastAPI service in forked or spawned ASGI workers, with no code of ours.

Each service runs as a user would run it, under ``opentelemetry-instrument`` (which
instruments FastAPI through opentelemetry-instrumentation-fastapi), exporting over OTLP
to a real receiver on loopback, with two workers:

* ``gunicorn --worker-class uvicorn.workers.UvicornWorker`` (the uvicorn-worker
  package's ``uvicorn_worker.UvicornWorker`` when it is installed): workers forked from
  gunicorn's instrumented master;
* ``uvicorn --workers 2 --ssl-cert-reqs 2``: workers spawned by uvicorn's supervisor,
  each instrumented by ``opentelemetry-instrument``'s ``sitecustomize`` anew;
* ``gunicorn --worker-class gunicorn.workers.gasgi.ASGIWorker``: gunicorn's own asyncio
  ASGI worker, when the installed gunicorn has one.

Every worker must record its own handshakes and put each request's identity on its
request span, exactly once, over keep-alive connections of several requests each (httpx
and curl). Negative controls: a foreign CA's client is refused (a failed handshake
span, no request), and on ``CERT_OPTIONAL`` a client without a certificate is served
with no identity, while a server span of no connection is left alone.

Helpers (services, clients, span checks) are test_gunicorn.py's.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import httpx
import pytest
from test_gunicorn import (
    BIN,
    CURL,
    INSTRUMENT,
    SERVER_HANDSHAKE,
    Sent,
    Service,
    check_requests,
    clients_of,
    curl_get,
    environment,
    free_port,
    gunicorn_command,
    httpx_client,
    is_request,
    running,
    server_span_of,
    spread_over_workers,
    wait_for_spans,
    write_apps,
)

from conftest import PKI
from otlp_receiver import OTLPReceiver, ReceivedSpan, otlp_receiver

pytestmark = pytest.mark.skipif(
    not INSTRUMENT.exists()
    or shutil.which("gunicorn", path=str(BIN)) is None
    or shutil.which("uvicorn", path=str(BIN)) is None,
    reason="opentelemetry-instrument, gunicorn or uvicorn is not installed",
)

FASTAPI_APP = """
import asyncio, os, threading
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.instrumentation.mtls import client_identity

app = FastAPI()

def answer(request: Request, who: str) -> dict:
    trace.get_current_span().set_attributes({"app.pid": os.getpid(), "app.who": who})
    identity = client_identity(request.scope)
    return {"pid": os.getpid(), "subject": identity.subject if identity else None}

@app.get("/whoami")
async def whoami(request: Request, who: str = "") -> dict:
    return answer(request, who)

@app.get("/slow")
async def slow(request: Request, who: str = "") -> dict:
    await asyncio.sleep(0.3)
    return answer(request, who)

@app.get("/background")
async def background() -> dict:
    # A server span of another instrumentation, where no connection is known.
    def job() -> None:
        trace.get_tracer("background.jobs").start_span("background job", kind=SpanKind.SERVER).end()
    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    return {"pid": os.getpid()}
"""

APP = "fastapi_app:app"


def uvicorn_worker_class() -> str:
    """The uvicorn-worker package's worker if installed, else uvicorn's own (deprecated)."""
    if importlib.util.find_spec("uvicorn_worker") is not None:
        return "uvicorn_worker.UvicornWorker"
    return "uvicorn.workers.UvicornWorker"


def has_gasgi() -> bool:
    return importlib.util.find_spec("gunicorn.workers.gasgi") is not None


def command_of(server: str, port: int, pki: PKI, cert_reqs: int) -> tuple[list[str], str]:
    """The server's command line, and what each of its workers logs once it serves."""
    if server == "gunicorn-uvicorn-worker":
        command = gunicorn_command(APP, uvicorn_worker_class(), port, pki, cert_reqs)
        return command, "Application startup complete"
    if server == "gunicorn-gasgi":
        if not has_gasgi():
            pytest.skip("the installed gunicorn has no ASGI worker (gunicorn.workers.gasgi)")
        command = gunicorn_command(APP, "gunicorn.workers.gasgi.ASGIWorker", port, pki, cert_reqs)
        return command, "ASGI server listening on"
    command = [
        "uvicorn", APP, "--workers", "2", "--host", "127.0.0.1", "--port", str(port),
        "--ssl-certfile", pki.server.cert_path, "--ssl-keyfile", pki.server.key_path,
        "--ssl-ca-certs", pki.ca.cert_path, "--ssl-cert-reqs", str(cert_reqs),
        "--timeout-graceful-shutdown", "5",
    ]  # fmt: skip
    return command, "Application startup complete"


SERVERS = ["gunicorn-uvicorn-worker", "uvicorn-workers", "gunicorn-gasgi"]


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = write_apps(tmp_path_factory.mktemp("apps"))
    (directory / "fastapi_app.py").write_text(FASTAPI_APP)
    return directory


def failed_handshakes(spans: list[ReceivedSpan]) -> list[str]:
    return [
        s.attributes["error.type"]
        for s in spans
        if s.name == SERVER_HANDSHAKE and not s.attributes["tls.established"]
    ]


@pytest.mark.parametrize("server", SERVERS)
def test_every_worker_records_handshakes_and_identities(
    server: str, apps: Path, pki: PKI, tmp_path: Path
) -> None:
    clients, subjects = clients_of(pki)
    port = free_port()
    with otlp_receiver() as receiver:
        env = environment(receiver, server, apps)
        command, marker = command_of(server, port, pki, 2)
        with running(server, command, env, port, tmp_path) as service:
            service.wait_ready(2, marker)
            base = f"https://localhost:{port}"
            sent = spread_over_workers(base, pki, clients, per_connection=4)
            if CURL is not None:  # curl: three requests on one connection
                output = curl_get(pki, pki.client, *(f"{base}/whoami?who=web-client",) * 3)
                assert output.count("web-client") == 3
                pid = int(output.split('"pid":')[1].split(",")[0].strip())
                sent.answers += [
                    ("web-client", {"pid": pid, "subject": subjects["web-client"]})
                ] * 3
            # negative control: a foreign CA's client never gets a request through
            with httpx_client(pki, pki.untrusted_client) as http, pytest.raises(httpx.HTTPError):
                http.get(f"{base}/whoami?who=intruder")
            spans = wait_for_spans(receiver, server, is_request, len(sent.answers))
            spans = wait_for_failure(receiver, service, spans)
            service.stop()
    check_requests(spans, sent, subjects)
    requests_per_handshake = count_per_handshake(spans, sent)
    # keep-alive: every connection carried several requests, each with its own identity
    assert min(requests_per_handshake.values()) >= 3, requests_per_handshake
    # every worker recorded the handshakes of its own connections (check_requests: every
    # link is to a received handshake span), and no two workers' requests share one
    linked: dict[tuple[bytes, bytes], set[int]] = {}
    for marked in (s for s in spans if is_request(s)):
        (link,) = server_span_of(marked, spans).links
        linked.setdefault(link, set()).add(marked.attributes["app.pid"])
    assert all(len(pids) == 1 for pids in linked.values())
    assert set().union(*linked.values()) == sent.pids()
    assert failed_handshakes(spans) == ["certificate_authority_invalid"]
    assert "intruder" not in [s.attributes.get("app.who") for s in spans]


def wait_for_failure(
    receiver: OTLPReceiver, service: Service, spans: list[ReceivedSpan]
) -> list[ReceivedSpan]:
    """The spans once the foreign CA's failed handshake span has arrived too (bounded)."""
    if failed_handshakes(spans):
        return spans
    return wait_for_spans(
        receiver,
        service.name,
        lambda s: s.name == SERVER_HANDSHAKE and not s.attributes["tls.established"],
        1,
    )


def count_per_handshake(spans: list[ReceivedSpan], sent: Sent) -> dict[tuple[bytes, bytes], int]:
    """How many requests each linked handshake (connection) carried."""
    counts: dict[tuple[bytes, bytes], int] = {}
    for marked in (s for s in spans if is_request(s)):
        (link,) = server_span_of(marked, spans).links
        counts[link] = counts.get(link, 0) + 1
    assert sum(counts.values()) == len(sent.answers)
    return counts


@pytest.mark.parametrize("server", SERVERS)
def test_no_certificate_on_cert_optional_and_a_span_of_no_connection(
    server: str, apps: Path, pki: PKI, tmp_path: Path
) -> None:
    port = free_port()
    with otlp_receiver() as receiver:
        env = environment(receiver, server, apps)
        command, marker = command_of(server, port, pki, 1)
        with running(server, command, env, port, tmp_path) as service:
            service.wait_ready(2, marker)
            base = f"https://localhost:{port}"
            with httpx_client(pki, None) as http:
                for _ in range(2):
                    assert http.get(f"{base}/whoami?who=nobody").json()["subject"] is None
                assert http.get(f"{base}/background").status_code == 200
            spans = wait_for_spans(receiver, server, lambda s: s.name == "background job", 1)
            spans = wait_for_spans(receiver, server, is_request, 2)
            service.stop()
    marked = [s for s in spans if is_request(s)]
    assert [s.attributes["app.who"] for s in marked] == ["nobody", "nobody"]
    links = set()
    for span in (server_span_of(s, spans) for s in marked):
        # Lean request attributes: the source alone (the verify result is the handshake's).
        assert span.attributes["tls.client.identity.source"] == "handshake"
        assert "tls.client.verify.result" not in span.attributes
        assert "tls.client.subject" not in span.attributes
        (link,) = span.links
        links.add(link)
    assert len(links) == 1  # one kept-alive connection, its handshake recorded
    (job,) = [s for s in spans if s.name == "background job"]
    assert not [k for k in job.attributes if k.startswith("tls.")] and not job.links
