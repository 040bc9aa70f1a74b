"""The examples end to end: two mTLS services under ``opentelemetry-instrument``, over OTLP.

What ``examples/README.md`` tells a user to run, run here with no code of ours in the
services' processes: the demo PKI from ``examples/make_pki.py``, the backend and the
frontend under ``opentelemetry-instrument uvicorn ... --ssl-cert-reqs 2``, exporting
traces, metrics and logs over OTLP (gRPC, then HTTP/protobuf) to a real receiver on
loopback. Clients with good, untrusted and expired certificates call the frontend (the
test's own, and ``examples/clients.py`` and ``clients.sh``); the services are stopped
with SIGTERM, and the test reads what arrived, down to the last request's telemetry.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from otlp_receiver import OTLPReceiver, ReceivedLog, ReceivedSpan, otlp_receiver

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
BIN = Path(sys.executable).parent
INSTRUMENT = BIN / "opentelemetry-instrument"
CURL = shutil.which("curl")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
CLIENT_TIMEOUT = 10.0

WEB = "spiffe://demo.test/ns/shop/sa/web"
FRONTEND = "spiffe://demo.test/ns/shop/sa/frontend"
SERVER_HANDSHAKE = "TLS server handshake"
CLIENT_HANDSHAKE = "TLS client handshake"
HANDSHAKE_FAILED = "tls.handshake.failed"

pytestmark = pytest.mark.skipif(
    not INSTRUMENT.exists(), reason="opentelemetry-instrument is not installed"
)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo PKI, made the README's way: ``python examples/make_pki.py DIR``."""
    directory = tmp_path_factory.mktemp("pki")
    subprocess.run(
        [sys.executable, str(EXAMPLES / "make_pki.py"), str(directory)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return directory


def free_port() -> int:
    """A port free on loopback now (bound and released: uvicorn binds it again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    """One example service running under ``opentelemetry-instrument``."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self, deadline: float) -> None:
        """Wait for uvicorn's "running" line: it binds only after the app has started."""
        while "Uvicorn running on" not in self.output():
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.process.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not start in {START_TIMEOUT}s:\n{self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)


def service_environment(
    receiver: OTLPReceiver, protocol: str, pki: Path, extra: dict[str, str]
) -> dict[str, str]:
    """The environment of the README's commands, pointed at the receiver."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environment.update(
        # opentelemetry-instrument finds uvicorn on PATH: this virtualenv's.
        PATH=f"{BIN}{os.pathsep}{environment.get('PATH', '')}",
        PKI_DIR=str(pki),
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_EXPORTER_OTLP_ENDPOINT=(
            receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
        ),
        OTEL_BSP_SCHEDULE_DELAY="200",
        OTEL_METRIC_EXPORT_INTERVAL="500",
        OTEL_BLRP_SCHEDULE_DELAY="200",
        OTEL_EXPORTER_OTLP_TIMEOUT="2",  # as the README's commands set it
        OTEL_PYTHON_LOGGING_AUTO_INSTRUMENTATION_ENABLED="true",
        # Everything is on loopback: no proxy may get in between (gRPC honours them too).
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    environment.update(extra)
    return environment


def start_service(
    name: str, port: int, pki: Path, environment: dict[str, str], logs: Path
) -> Service:
    """``opentelemetry-instrument ... uvicorn --app-dir examples NAME:app`` with mTLS."""
    command = [
        str(INSTRUMENT),
        "--traces_exporter", "otlp",
        "--metrics_exporter", "otlp",
        "--logs_exporter", "otlp",
        "uvicorn", "--app-dir", str(EXAMPLES), f"{name}:app",
        "--host", "127.0.0.1", "--port", str(port),
        "--ssl-keyfile", str(pki / f"{name}.key"),
        "--ssl-certfile", str(pki / f"{name}.crt"),
        "--ssl-ca-certs", str(pki / "ca.crt"),
        "--ssl-cert-reqs", "2",
    ]  # fmt: skip
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**environment, "OTEL_SERVICE_NAME": name},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Service(name, port, process, log)


@dataclass
class Demo:
    """The two services, and how to reach the frontend."""

    frontend: Service
    backend: Service
    pki: Path

    @property
    def url(self) -> str:
        return f"https://localhost:{self.frontend.port}/order"

    def stop(self) -> None:
        """SIGTERM both, as docker or Kubernetes would; the apps flush as uvicorn stops."""
        services = (self.frontend, self.backend)
        for service in services:
            service.process.send_signal(signal.SIGTERM)
        for service in services:
            try:
                service.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                service.kill()
                pytest.fail(f"{service.name} ignored SIGTERM:\n{service.output()}")
            # uvicorn re-raises the signal once it has shut down cleanly.
            assert service.process.returncode in (0, -signal.SIGTERM), service.output()
            assert "Finished server process" in service.output(), service.output()


@contextmanager
def demo(
    receiver: OTLPReceiver, protocol: str, pki: Path, logs: Path, **extra: str
) -> Iterator[Demo]:
    """Run backend and frontend as the README says; kill whatever is left on the way out."""
    backend_port, frontend_port = free_port(), free_port()
    environment = service_environment(
        receiver, protocol, pki, {"BACKEND_URL": f"https://localhost:{backend_port}", **extra}
    )
    backend = start_service("backend", backend_port, pki, environment, logs)
    try:
        frontend = start_service("frontend", frontend_port, pki, environment, logs)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            backend.wait_started(deadline)
            frontend.wait_started(deadline)
            yield Demo(frontend, backend, pki)
        finally:
            frontend.kill()
    finally:
        backend.kill()


def client(pki: Path, certificate: str | None) -> httpx.Client:
    """An httpx client trusting the Demo CA and presenting ``certificate``, if any."""
    context = ssl.create_default_context(cafile=pki / "ca.crt")
    if certificate is not None:
        context.load_cert_chain(pki / f"{certificate}.crt", pki / f"{certificate}.key")
    return httpx.Client(verify=context, timeout=CLIENT_TIMEOUT, trust_env=False)


def curl(demo: Demo, certificate: str) -> subprocess.CompletedProcess[str]:
    """One curl request to the frontend, presenting ``certificate``."""
    assert CURL is not None
    pki = demo.pki
    command = [
        CURL, "--silent", "--show-error", "--fail", "--noproxy", "*",
        "--max-time", str(CLIENT_TIMEOUT),
        "--cacert", str(pki / "ca.crt"),
        "--cert", str(pki / f"{certificate}.crt"),
        "--key", str(pki / f"{certificate}.key"),
        demo.url,
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=CLIENT_TIMEOUT * 2, check=False
    )


def run_example_clients(demo: Demo, command: list[str]) -> list[str]:
    """Run ``examples/clients.py`` or ``clients.sh`` against the frontend; its lines."""
    result = subprocess.run(
        [*command, demo.url],
        cwd=REPO,
        env={**os.environ, "PKI_DIR": str(demo.pki)},
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT * 6,
        check=True,
    )
    return result.stdout.splitlines()


def assert_example_clients_output(lines: list[str]) -> None:
    assert len(lines) == 4, lines
    good, *bad = lines
    assert good.startswith("good certificate:"), good
    assert json.loads(good[good.index("{") :])["caller"] == WEB, good
    assert [line.split(":")[0] for line in bad] == ["wrong CA", "expired", "no certificate"]
    assert all("rejected" in line for line in bad), bad


def is_failed_handshake_log(record: ReceivedLog) -> bool:
    return HANDSHAKE_FAILED in (record.event_name, record.attributes.get("event.name"))


def server_spans(spans: list[ReceivedSpan], service: str, name: str) -> list[ReceivedSpan]:
    return [
        s
        for s in spans
        if s.service == service and s.kind == Span.SPAN_KIND_SERVER and s.name == name
    ]


def send_clients(services: Demo) -> tuple[int, int]:
    """Call the frontend with good and bad certificates; return (accepted, rejected).

    The example clients first, the test's own last: the final request's telemetry is
    still in the services' exporters when they are stopped, and must be flushed.
    """
    assert_example_clients_output(
        run_example_clients(services, [sys.executable, str(EXAMPLES / "clients.py")])
    )
    accepted, rejected = 1, 3  # good; wrong CA, expired, none

    if CURL is not None:
        assert_example_clients_output(
            run_example_clients(services, ["bash", str(EXAMPLES / "clients.sh")])
        )
        accepted, rejected = accepted + 1, rejected + 3
        ok = curl(services, "client")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["caller"] == WEB
        accepted += 1
        untrusted = curl(services, "wrong-ca")
        assert untrusted.returncode != 0, untrusted.stdout
        rejected += 1
    else:  # no curl: the untrusted client with httpx instead
        with client(services.pki, "wrong-ca") as wrong, pytest.raises(httpx.TransportError):
            wrong.get(services.url)
        rejected += 1

    with client(services.pki, "expired") as expired, pytest.raises(httpx.TransportError):
        expired.get(services.url)
    rejected += 1
    with client(services.pki, "client") as good:
        response = good.get(services.url)
    assert response.status_code == 200, response.text
    assert response.json()["caller"] == WEB
    assert response.json()["backend_saw"] == FRONTEND
    accepted += 1
    return accepted, rejected


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_examples_export_handshakes_and_identities(
    protocol: str, pki_dir: Path, tmp_path: Path
) -> None:
    with otlp_receiver() as receiver:
        with demo(receiver, protocol, pki_dir, tmp_path) as services:
            accepted, rejected = send_clients(services)
            # Straight away: what the services still hold must be flushed on the way out.
            services.stop()

        spans = receiver.spans()
        # One span per handshake, whatever its outcome: every client shows up, once.
        handshakes = [s for s in spans if s.name == SERVER_HANDSHAKE]
        frontend_ok = [
            s for s in handshakes if s.service == "frontend" and s.attributes["tls.established"]
        ]
        failed = [
            s
            for s in handshakes
            if s.service == "frontend" and s.status_code == Status.STATUS_CODE_ERROR
        ]
        assert len(frontend_ok) == accepted
        assert len(failed) == rejected
        assert {s.attributes.get("tls.client.spiffe_id") for s in frontend_ok} == {WEB}
        assert {"certificate_authority_invalid", "certificate_expired"} <= {
            s.attributes.get("error.type") for s in failed
        }
        assert all(s.attributes["tls.established"] is False for s in failed)
        # The backend's view: its client is the frontend, over one pooled connection or more.
        backend_ok = [s for s in handshakes if s.service == "backend"]
        assert backend_ok
        assert {s.attributes.get("tls.client.spiffe_id") for s in backend_ok} == {FRONTEND}

        # Request spans carry the caller's identity and link to their connection's handshake.
        handshake_ids = {(s.service, s.trace_id, s.span_id) for s in handshakes}
        orders = server_spans(spans, "frontend", "GET /order")
        inventories = server_spans(spans, "backend", "GET /inventory")
        assert len(orders) == accepted
        assert len(inventories) == accepted
        for span, caller in [*((s, WEB) for s in orders), *((s, FRONTEND) for s in inventories)]:
            assert span.attributes.get("tls.client.spiffe_id") == caller, span
            assert span.links, span
            assert all((span.service, *link) in handshake_ids for link in span.links), span

        # One trace per order, from the frontend's request through httpx (and its client
        # handshake) to the backend's request.
        assert {s.trace_id for s in orders} == {s.trace_id for s in inventories}
        client_handshakes = [
            s for s in spans if s.service == "frontend" and s.name == CLIENT_HANDSHAKE
        ]
        assert client_handshakes
        assert {s.trace_id for s in client_handshakes} <= {s.trace_id for s in orders}

        for service in ("frontend", "backend"):
            assert "tls.server.handshake.duration" in receiver.metric_names(service)

        # Security events, exported as logs inside their handshake span's context.
        failures = [r for r in receiver.log_records() if is_failed_handshake_log(r)]
        assert {"certificate_authority_invalid", "certificate_expired"} <= {
            r.attributes.get("error.type") for r in failures
        }
        failed_ids = {(s.trace_id, s.span_id) for s in failed}
        assert {(r.trace_id, r.span_id) for r in failures} <= failed_ids


def test_disabled_mtls_instrumentation_records_nothing(pki_dir: Path, tmp_path: Path) -> None:
    """Negative control: ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=mtls`` leaves no TLS trace."""
    with otlp_receiver() as receiver:
        with demo(
            receiver,
            "http/protobuf",
            pki_dir,
            tmp_path,
            OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="mtls",
        ) as services:
            with client(pki_dir, "client") as good:
                response = good.get(services.url)
            assert response.status_code == 200, response.text
            # Without the instrumentation nobody knows the caller (uvicorn gives no TLS info).
            assert response.json()["caller"] is None
            assert response.json()["backend_saw"] is None
            with client(pki_dir, "expired") as expired, pytest.raises(httpx.TransportError):
                expired.get(services.url)
            services.stop()

        spans = receiver.spans()
        # The services did export: the request spans arrived, one trace across both hops.
        orders = server_spans(spans, "frontend", "GET /order")
        inventories = server_spans(spans, "backend", "GET /inventory")
        assert orders
        assert inventories
        assert {s.trace_id for s in orders} & {s.trace_id for s in inventories}
        assert receiver.metric_names(), "no metrics at all: the control proves nothing"
        # ... but nothing of ours.
        assert not [s for s in spans if s.name in (SERVER_HANDSHAKE, CLIENT_HANDSHAKE)]
        for span in [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]:
            assert not [key for key in span.attributes if key.startswith("tls.")], span
            assert not span.links, span
        assert not {n for n in receiver.metric_names() if n.startswith("tls.")}
        assert not [r for r in receiver.log_records() if is_failed_handshake_log(r)]
