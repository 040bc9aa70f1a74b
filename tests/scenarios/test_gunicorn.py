"""Flask and Django under gunicorn's forking sync and gthread workers, with no code of ours.

Each service runs as a user would run it: ``opentelemetry-instrument gunicorn --workers 2
--certfile ... --ca-certs ... --cert-reqs 2 app:app``, exporting over OTLP to a real
receiver on loopback. The instrumentor runs in gunicorn's master; the workers are forked
from it, and each must record its own handshakes (gunicorn's sync worker never calls
``do_handshake()``: OpenSSL runs it inside the first ``recv``) and put each request's
identity on the request span of Flask's or Django's instrumentation. Clients are real
(httpx with keep-alive, requests, curl), with a certificate, another client's, none on
``CERT_OPTIONAL``, or one from a foreign CA.

The helpers here (services, clients, span checks) serve tests/scenarios/test_uvicorn_workers.py
too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from conftest import PKI
from otlp_receiver import OTLPReceiver, ReceivedSpan, otlp_receiver
from pki import Leaf

BIN = Path(sys.executable).parent
INSTRUMENT = BIN / "opentelemetry-instrument"
CURL = shutil.which("curl")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
EXPORT_TIMEOUT = 20.0
CLIENT_TIMEOUT = 10.0
MAX_ROUNDS = 12
"""Rounds of concurrent connections at most, until requests have reached every worker."""
SERVER_HANDSHAKE = "TLS server handshake"

pytestmark = pytest.mark.skipif(
    not INSTRUMENT.exists() or shutil.which("gunicorn", path=str(BIN)) is None,
    reason="opentelemetry-instrument or gunicorn is not installed",
)

FLASK_APP = """
import os, threading, time
from flask import Flask, request
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.instrumentation.mtls import client_identity

app = Flask(__name__)

def answer():
    trace.get_current_span().set_attributes(
        {"app.pid": os.getpid(), "app.who": request.args.get("who", "")}
    )
    identity = client_identity(request.environ)
    return {"pid": os.getpid(), "subject": identity.subject if identity else None}

@app.get("/whoami")
def whoami():
    return answer()

@app.get("/slow")
def slow():
    time.sleep(0.3)
    return answer()

@app.get("/background")
def background():
    # A server span of another instrumentation, where no connection is known.
    def job():
        trace.get_tracer("background.jobs").start_span("background job", kind=SpanKind.SERVER).end()
    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    return {"pid": os.getpid()}
"""

DJANGO_SETTINGS = """
SECRET_KEY = "not a secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "django_app"
INSTALLED_APPS = []
MIDDLEWARE = []
USE_TZ = True
"""

DJANGO_APP = """
import os, time
from django.core.wsgi import get_wsgi_application
from django.http import JsonResponse
from django.urls import path
from opentelemetry import trace
from opentelemetry.instrumentation.mtls import client_identity

def answer(request):
    trace.get_current_span().set_attributes(
        {"app.pid": os.getpid(), "app.who": request.GET.get("who", "")}
    )
    identity = client_identity(request.META)
    return JsonResponse({"pid": os.getpid(), "subject": identity.subject if identity else None})

def slow(request):
    time.sleep(0.3)
    return answer(request)

urlpatterns = [path("whoami", answer), path("slow", slow)]
application = get_wsgi_application()
"""


def write_apps(directory: Path) -> Path:
    """The services' code, as a user would have it in their project."""
    (directory / "flask_app.py").write_text(FLASK_APP)
    (directory / "django_settings.py").write_text(DJANGO_SETTINGS)
    (directory / "django_app.py").write_text(DJANGO_APP)
    return directory


@dataclass
class Service:
    """One server under ``opentelemetry-instrument``, and its output."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, workers: int, marker: str) -> None:
        """Wait until every worker said ``marker`` (no probe: it would be a handshake too)."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.output().count(marker) < workers:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.process.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not start in {START_TIMEOUT}s:\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, as a container runtime stops a service; then the workers flush."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
                pytest.fail(f"{self.name} ignored SIGTERM:\n{self.output()}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def environment(receiver: OTLPReceiver, name: str, apps: Path, **extra: str) -> dict[str, str]:
    """What ``opentelemetry-instrument`` reads, pointed at the receiver; nothing of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DJANGO_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(apps),
        OTEL_SERVICE_NAME=name,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.http_endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_EXPORTER_OTLP_TIMEOUT="2",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


@contextmanager
def running(
    name: str, command: list[str], env: dict[str, str], port: int, logs: Path
) -> Iterator[Service]:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(INSTRUMENT), *command],
            cwd=env["PYTHONPATH"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    service = Service(name, port, process, log)
    try:
        yield service
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT)


def gunicorn_command(
    app: str, worker: str, port: int, pki: PKI, cert_reqs: int = 2, *options: str
) -> list[str]:
    return [
        "gunicorn", "--workers", "2", "--worker-class", worker,
        "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5",
        "--certfile", pki.server.cert_path, "--keyfile", pki.server.key_path,
        "--ca-certs", pki.ca.cert_path, "--cert-reqs", str(cert_reqs),
        *options, app,
    ]  # fmt: skip


# -- clients ------------------------------------------------------------------------------


def httpx_client(pki: PKI, leaf: Leaf | None) -> httpx.Client:
    """Keep-alive: the requests of one client share its connection where the server lets it."""
    return httpx.Client(verify=pki.client_context(leaf), timeout=CLIENT_TIMEOUT, trust_env=False)


def requests_get(pki: PKI, leaf: Leaf, url: str) -> dict[str, Any]:
    with requests.Session() as http:
        http.trust_env = False
        http.verify = pki.ca.cert_path
        http.cert = (leaf.cert_path, leaf.key_path)
        answer: dict[str, Any] = http.get(url, timeout=CLIENT_TIMEOUT).json()
        return answer


def curl_get(pki: PKI, leaf: Leaf, *urls: str) -> str:
    """One curl invocation: several URLs over one connection (curl keeps it alive)."""
    assert CURL is not None
    result = subprocess.run(
        [
            CURL,
            "--silent",
            "--show-error",
            "--fail",
            "--noproxy",
            "*",
            "--max-time",
            str(CLIENT_TIMEOUT),
            "--cacert",
            pki.ca.cert_path,
            "--cert",
            leaf.cert_path,
            "--key",
            leaf.key_path,
            *urls,
        ],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT * 3,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@dataclass
class Sent:
    """What the clients sent and were answered."""

    answers: list[tuple[str, dict[str, Any]]]
    """(who, answer) per request, ``who`` the common name of the certificate presented."""

    def pids(self) -> set[int]:
        return {answer["pid"] for _, answer in self.answers}


def spread_over_workers(
    base: str, pki: PKI, clients: dict[str, Leaf], *, per_connection: int = 3
) -> Sent:
    """Concurrent keep-alive clients, round after round, until two workers have answered.

    Each round opens one connection per client at once, and sends ``per_connection``
    requests on it, the first a slow one, so that busy workers leave the next connection to
    another. Bounded: at most ``MAX_ROUNDS`` rounds.
    """
    sent = Sent([])
    lock = threading.Lock()
    errors: list[BaseException] = []

    def connection(who: str, leaf: Leaf) -> None:
        try:
            with httpx_client(pki, leaf) as http:
                for i in range(per_connection):
                    path = "slow" if i == 0 else "whoami"
                    response = http.get(f"{base}/{path}?who={who}")
                    response.raise_for_status()
                    with lock:
                        sent.answers.append((who, response.json()))
        except BaseException as exc:  # re-raised below, in the test
            errors.append(exc)

    for _ in range(MAX_ROUNDS):
        threads = [threading.Thread(target=connection, args=item) for item in clients.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT * per_connection)
        if errors:
            raise errors[0]
        if len(sent.pids()) >= 2:
            break
    return sent


# -- what arrived -------------------------------------------------------------------------


def wait_for_spans(
    receiver: OTLPReceiver, service: str, predicate: Any, count: int
) -> list[ReceivedSpan]:
    """The service's spans, once ``count`` of them satisfy ``predicate`` (bounded wait)."""
    deadline = time.monotonic() + EXPORT_TIMEOUT
    while True:
        spans = [s for s in receiver.spans() if s.service == service]
        if sum(1 for s in spans if predicate(s)) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def is_request(span: ReceivedSpan) -> bool:
    return "app.who" in span.attributes


def server_span_of(span: ReceivedSpan, spans: list[ReceivedSpan]) -> ReceivedSpan:
    """The request's server span: ``span`` itself, or its nearest SERVER ancestor."""
    by_id = {(s.trace_id, s.span_id): s for s in spans}
    current: ReceivedSpan | None = span
    while current is not None and current.kind != Span.SPAN_KIND_SERVER:
        current = by_id.get((current.trace_id, current.parent_span_id))
    assert current is not None, f"no server span above {span.name}"
    return current


def check_requests(spans: list[ReceivedSpan], sent: Sent, subjects: dict[str, str]) -> None:
    """Every request's server span: its client's identity, and a link to a handshake."""
    handshakes = {
        (s.trace_id, s.span_id): s
        for s in spans
        if s.name == SERVER_HANDSHAKE and s.attributes.get("tls.established")
    }
    requests_seen = [s for s in spans if is_request(s)]
    assert len(requests_seen) == len(sent.answers)
    pids: set[int] = set()
    for marked in requests_seen:
        span = server_span_of(marked, spans)
        who = marked.attributes["app.who"]
        assert span.attributes["tls.client.subject"] == subjects[who], span
        assert span.attributes["tls.client.identity.source"] == "handshake"
        (link,) = span.links
        assert link in handshakes, "the request span links to no recorded handshake"
        pids.add(marked.attributes["app.pid"])
        # exactly once: no other server span of the request carries the identity
        others = [
            s
            for s in spans
            if s.trace_id == span.trace_id
            and s is not span
            and s.kind == Span.SPAN_KIND_SERVER
            and "tls.client.identity.source" in s.attributes
        ]
        assert not others
    assert pids == sent.pids()
    assert len(pids) >= 2, "the requests reached one worker only"
    for who, answer in sent.answers:
        assert answer["subject"] == subjects[who]


# -- the tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_apps(tmp_path_factory.mktemp("apps"))


def clients_of(pki: PKI) -> tuple[dict[str, Leaf], dict[str, str]]:
    other = pki.ca.issue("other-client", uris=("spiffe://example.org/ns/default/sa/batch",))
    clients = {"web-client": pki.client, "other-client": other}
    return clients, {who: f"CN={who},O=mTLS tests" for who in clients}


WSGI_CASES = {
    "flask-sync": ("flask_app:app", "sync"),
    "flask-gthread": ("flask_app:app", "gthread"),
    "django-sync": ("django_app:application", "sync"),
    "django-gthread": ("django_app:application", "gthread"),
}


@pytest.mark.parametrize("case", list(WSGI_CASES))
def test_every_worker_records_handshakes_and_identities(
    case: str, apps: Path, pki: PKI, tmp_path: Path
) -> None:
    app, worker = WSGI_CASES[case]
    clients, subjects = clients_of(pki)
    port = free_port()
    extra = {"DJANGO_SETTINGS_MODULE": "django_settings"} if "django" in case else {}
    threads = ("--threads", "2") if worker == "gthread" else ()
    with otlp_receiver() as receiver:
        env = environment(receiver, case, apps, **extra)
        command = gunicorn_command(app, worker, port, pki, 2, *threads)
        with running(case, command, env, port, tmp_path) as service:
            service.wait_ready(2, "Booting worker with pid")
            base = f"https://localhost:{port}"
            sent = spread_over_workers(base, pki, clients)
            # requests and curl too, with one request each (curl: two on one connection)
            sent.answers.append(
                ("web-client", requests_get(pki, pki.client, f"{base}/whoami?who=web-client"))
            )
            if CURL is not None:
                output = curl_get(pki, pki.client, *(f"{base}/whoami?who=web-client",) * 2)
                assert output.count("web-client") == 2
                pid = int(output.split('"pid":')[1].split(",")[0].strip())
                sent.answers += [
                    ("web-client", {"pid": pid, "subject": subjects["web-client"]})
                ] * 2
            spans = wait_for_spans(receiver, case, is_request, len(sent.answers))
            service.stop()
        check_requests(spans, sent, subjects)
        handshakes = [s for s in spans if s.name == SERVER_HANDSHAKE]
        links = {link for s in spans if is_request(s) for link in server_span_of(s, spans).links}
        if worker == "sync":
            # gunicorn's sync worker closes every connection: one handshake per request,
            # each performed by OpenSSL inside the worker's first recv.
            assert len(links) == len(sent.answers)
        else:
            assert len(links) < len(sent.answers)  # keep-alive: requests share handshakes
        assert len(handshakes) >= len(links)


def test_no_certificate_a_foreign_ca_and_a_span_of_no_connection(
    apps: Path, pki: PKI, tmp_path: Path
) -> None:
    """CERT_OPTIONAL: a client without a certificate is served; a foreign CA's is not."""
    name = "flask-optional"
    port = free_port()
    with otlp_receiver() as receiver:
        env = environment(receiver, name, apps)
        command = gunicorn_command("flask_app:app", "gthread", port, pki, 1)
        with running(name, command, env, port, tmp_path) as service:
            service.wait_ready(2, "Booting worker with pid")
            base = f"https://localhost:{port}"
            with httpx_client(pki, None) as http:
                assert http.get(f"{base}/whoami?who=nobody").json()["subject"] is None
                assert http.get(f"{base}/background").status_code == 200
            with httpx_client(pki, pki.untrusted_client) as http, pytest.raises(httpx.HTTPError):
                http.get(f"{base}/whoami?who=intruder")
            spans = wait_for_spans(
                receiver, name, lambda s: s.name in ("background job", SERVER_HANDSHAKE), 3
            )
            service.stop()
    (request,) = [s for s in spans if is_request(s)]
    assert request.attributes["app.who"] == "nobody"
    # Lean request attributes: the source alone; the verify result is the handshake's.
    assert request.attributes["tls.client.identity.source"] == "handshake"
    assert "tls.client.verify.result" not in request.attributes
    assert "tls.client.subject" not in request.attributes
    ((_, linked_id),) = request.links
    (linked,) = [s for s in spans if s.span_id == linked_id]
    assert linked.attributes["tls.client.verify.result"] == "none"
    (job,) = [s for s in spans if s.name == "background job"]
    assert not [k for k in job.attributes if k.startswith("tls.")] and not job.links
    failed = [
        s for s in spans if s.name == SERVER_HANDSHAKE and not s.attributes["tls.established"]
    ]
    assert [s.attributes["error.type"] for s in failed] == ["certificate_authority_invalid"]
    assert "tls.client.subject" not in [k for s in spans if is_request(s) for k in s.attributes]


def test_a_gunicorn_worker_is_ssl_wrapped_like_a_real_one(pki: PKI) -> None:
    """What the scenario relies on: gunicorn wraps without handshaking on connect."""
    from gunicorn import sock as gunicorn_sock
    from gunicorn.config import Config

    config = Config()
    config.set("certfile", pki.server.cert_path)
    config.set("keyfile", pki.server.key_path)
    left, right = socket.socketpair()
    with left, right:
        wrapped = gunicorn_sock.ssl_wrap_socket(left, config)
        assert isinstance(wrapped, ssl.SSLSocket)
        assert wrapped.do_handshake_on_connect is False
        wrapped.close()
