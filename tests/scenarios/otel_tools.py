"""The real OpenTelemetry Collector, Jaeger v2 and promtool, as the scenario tests run them.

``.ci/build-otel-tools`` builds the versions pinned in ``.ci/versions`` into
``${OTEL_MTLS_TOOLS_DIR:-${XDG_CACHE_HOME:-~/.cache}/otel-mtls-tools}/NAME-VERSION/``;
this module finds them there. Where they are missing (no Go on a user's machine), the
tests skip with one reason that names that command; under CI (``CI=true``), which
always builds them, a missing binary fails the test instead.

The processes run on 127.0.0.1, on ports chosen free for each test, with the
repository's own configuration files (``otel-collector-config.yaml``,
``examples/jaeger-config.yaml``) and their addresses set through the environment;
every wait is bounded, and every process is killed on the way out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO / ".ci" / "versions"
MANIFEST = REPO / ".ci" / "collector-manifest.yaml"
COLLECTOR_CONFIG = REPO / "otel-collector-config.yaml"
JAEGER_CONFIG = REPO / "examples" / "jaeger-config.yaml"
BUILD_COMMAND = "bash .ci/build-otel-tools"
HOST = "127.0.0.1"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

T = TypeVar("T")


def versions() -> dict[str, str]:
    """``.ci/versions``: the one file that pins every tool's version."""
    pinned: dict[str, str] = {}
    for raw in VERSIONS_FILE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pinned[key.strip()] = value.strip()
    return pinned


def tools_dir() -> Path:
    """Where ``.ci/build-otel-tools`` puts the binaries (the user's cache by default)."""
    if explicit := os.environ.get("OTEL_MTLS_TOOLS_DIR"):
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "otel-mtls-tools"


def binary_path(tool: str) -> Path:
    """The path of one tool, ``collector``, ``jaeger`` or ``promtool``, built or not."""
    pinned = versions()
    if tool == "collector":
        # The build script names the collector after its manifest too: a changed
        # manifest is another collector.
        manifest_hash = hashlib.sha256(MANIFEST.read_bytes()).hexdigest()[:12]
        return (
            tools_dir() / f"otelcol-mtls-{pinned['OTELCOL_VERSION']}-{manifest_hash}/otelcol-mtls"
        )
    if tool == "jaeger":
        return tools_dir() / f"jaeger-{pinned['JAEGER_MODULE_VERSION']}/jaeger"
    if tool == "promtool":
        return tools_dir() / f"promtool-{pinned['PROMETHEUS_MODULE_VERSION']}/promtool"
    raise ValueError(tool)


def require(tool: str) -> Path:
    """The tool's binary; skip (or fail, under CI) when it has not been built."""
    path = binary_path(tool)
    if os.access(path, os.X_OK):
        return path
    reason = (
        "the pinned OpenTelemetry Collector, Jaeger and promtool are not built: "
        f"run `{BUILD_COMMAND}` (needs Go) to build them into {tools_dir()}"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI builds them in .ci/run: {path} is missing)")
    pytest.skip(reason)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, log: Path | None) -> T:
    """Call ``probe`` until it returns something, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            output = log.read_text(errors="replace")[-4000:] if log else ""
            pytest.fail(f"{what}: not within {timeout}s\n{output}")
        time.sleep(0.2)


@dataclass
class Process:
    """A binary we started, with its output in a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_running(self) -> None:
        if self.popen.poll() is not None:
            pytest.fail(f"{self.name} exited ({self.popen.returncode}):\n{self.output()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bounded wait."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)


@contextmanager
def running(
    name: str, command: list[str], environment: Mapping[str, str], logs: Path
) -> Iterator[Process]:
    """Start ``command``; always stop it when the block ends."""
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **environment},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    process = Process(name, popen, log)
    try:
        yield process
    finally:
        process.stop()


def http_get(url: str, params: Mapping[str, str] | None = None) -> httpx.Response | None:
    """One GET on loopback, or None while nothing answers yet."""
    try:
        return httpx.get(url, params=params, timeout=5.0, trust_env=False)
    except httpx.TransportError:
        return None


@dataclass
class Jaeger:
    """Jaeger v2 all-in-one with memory storage, from ``examples/jaeger-config.yaml``."""

    process: Process
    otlp_grpc_port: int
    query_port: int

    @property
    def otlp_endpoint(self) -> str:
        return f"{HOST}:{self.otlp_grpc_port}"

    @property
    def query_url(self) -> str:
        return f"http://{HOST}:{self.query_port}"

    def traces(self, **params: str) -> list[dict[str, Any]]:
        """``GET /api/traces`` (the query API the UI uses): the traces found."""
        self.process.check_running()
        response = http_get(f"{self.query_url}/api/traces", {"lookback": "1h", **params})
        assert response is not None, "Jaeger's query API does not answer"
        assert response.status_code == 200, response.text
        data: list[dict[str, Any]] = response.json()["data"] or []
        return data

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """``GET /api/traces/ID``: the trace, or None while Jaeger does not have it."""
        self.process.check_running()
        response = http_get(f"{self.query_url}/api/traces/{trace_id}")
        assert response is not None, "Jaeger's query API does not answer"
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        [found] = response.json()["data"]
        trace: dict[str, Any] = found
        return trace

    def services(self) -> list[str] | None:
        response = http_get(f"{self.query_url}/api/services")
        if response is None or response.status_code != 200:
            return None
        names: list[str] = response.json()["data"] or []
        return names


@contextmanager
def jaeger(logs: Path, free_port: Callable[[], int]) -> Iterator[Jaeger]:
    binary = require("jaeger")
    otlp_grpc_port, query_port, query_grpc_port = free_port(), free_port(), free_port()
    environment = {
        "JAEGER_OTLP_GRPC_ENDPOINT": f"{HOST}:{otlp_grpc_port}",
        "JAEGER_QUERY_HTTP_ENDPOINT": f"{HOST}:{query_port}",
        "JAEGER_QUERY_GRPC_ENDPOINT": f"{HOST}:{query_grpc_port}",
    }
    command = [str(binary), "--config", str(JAEGER_CONFIG)]
    with running("jaeger", command, environment, logs) as process:
        started = Jaeger(process, otlp_grpc_port, query_port)

        def ready() -> bool | None:
            process.check_running()
            return True if started.services() is not None else None

        wait_for("Jaeger's query API", ready, START_TIMEOUT, process.log)
        yield started


@dataclass
class Collector:
    """The collector built from ``.ci/collector-manifest.yaml``, running our config."""

    process: Process
    grpc_port: int
    http_port: int
    prometheus_port: int
    telemetry_port: int

    def scrape(self, port: int | None = None) -> str:
        """The Prometheus exposition of the exporter (or of the collector's own telemetry)."""
        self.process.check_running()
        response = http_get(f"http://{HOST}:{port or self.prometheus_port}/metrics")
        assert response is not None, "the collector's Prometheus endpoint does not answer"
        assert response.status_code == 200, response.text
        return response.text

    def telemetry(self) -> str:
        return self.scrape(self.telemetry_port)


def collector_environment(
    free_port: Callable[[], int], jaeger_endpoint: str, **settings: str
) -> tuple[dict[str, str], dict[str, int]]:
    """The variables ``otel-collector-config.yaml`` reads, for a collector on loopback."""
    ports = {
        name: free_port()
        for name in ("grpc_port", "http_port", "prometheus_port", "telemetry_port")
    }
    environment = {
        "OTLP_GRPC_ENDPOINT": f"{HOST}:{ports['grpc_port']}",
        "OTLP_HTTP_ENDPOINT": f"{HOST}:{ports['http_port']}",
        "PROMETHEUS_ENDPOINT": f"{HOST}:{ports['prometheus_port']}",
        "COLLECTOR_TELEMETRY_HOST": HOST,
        "COLLECTOR_TELEMETRY_PORT": str(ports["telemetry_port"]),
        "JAEGER_OTLP_ENDPOINT": jaeger_endpoint,
        **settings,
    }
    return environment, ports


@contextmanager
def collector(
    logs: Path, free_port: Callable[[], int], jaeger_endpoint: str, **settings: str
) -> Iterator[Collector]:
    """Run ``otel-collector-config.yaml`` itself; ``settings`` are more of its variables."""
    binary = require("collector")
    environment, ports = collector_environment(free_port, jaeger_endpoint, **settings)
    command = [str(binary), "--config", str(COLLECTOR_CONFIG)]
    with running("collector", command, environment, logs) as process:
        started = Collector(process, **ports)

        def ready() -> bool | None:
            process.check_running()
            if "Everything is ready" not in process.output():
                return None
            return True if http_get(f"http://{HOST}:{started.prometheus_port}/metrics") else None

        wait_for("the collector", ready, START_TIMEOUT, process.log)
        yield started


def tags(span: Mapping[str, Any]) -> dict[str, Any]:
    """A span's tags in a Jaeger ``/api/traces`` answer, as a dict."""
    return {tag["key"]: tag["value"] for tag in span.get("tags", [])}


def tag_query(**attributes: str) -> str:
    """The ``tags`` parameter of ``/api/traces``: JSON of attribute -> value."""
    return json.dumps(attributes)


@dataclass(frozen=True)
class Sample:
    """One line of a Prometheus text exposition."""

    name: str
    labels: dict[str, str]
    value: float


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(exposition: str) -> list[Sample]:
    """Parse the text format (enough of it for the collector's exporters)."""
    parsed: list[Sample] = []
    for line in exposition.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(_LABEL.findall(match.group(2) or ""))
            parsed.append(Sample(match.group(1), labels, float(match.group(3))))
    return parsed


def total(found: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in found
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
