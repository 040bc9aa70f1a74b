"""The collector configuration at the repository root holds together, read as YAML.

The real collector loads and runs this file in tests/scenarios (``validate``, and
traffic through to Jaeger); these checks need no binary, so they run everywhere and
say which part is wrong: every pipeline names only components that are defined, every
defined component is used, each connector joins two pipelines; the parts that matter
for mTLS are there: failed handshakes always kept by tail sampling, handshake spans
turned into metrics before sampling, with the dimensions the alerts need. The
``${env:NAME:-default}`` variables have defaults that docker compose relies on, and
the versions in the compose file and the builder manifest are those of .ci/versions.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from opentelemetry.instrumentation.mtls._signals.handshake import CLIENT_SPAN_NAME, SERVER_SPAN_NAME
from opentelemetry.instrumentation.mtls._ssl import errors as _errors

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "otel-collector-config.yaml"
VERSIONS = REPO / ".ci" / "versions"
MANIFEST = REPO / ".ci" / "collector-manifest.yaml"
COMPOSE = REPO / "examples" / "docker-compose.yaml"
# ``${env:NAME:-default}``: the collector's environment variable syntax.
ENV_VARIABLE = re.compile(r"\$\{env:([A-Z0-9_]+)(?::-([^}]*))?\}")
KINDS = ("receivers", "processors", "exporters", "connectors")
# What each connector consumes (as an exporter) and produces (as a receiver).
CONNECTOR_SIGNALS = {"span_metrics": ("traces", "metrics")}
ERROR_TYPES = {
    value
    for name, value in vars(_errors).items()
    if name.isupper() and not name.startswith("_") and isinstance(value, str)
}


def load(path: Path = CONFIG) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


def default(value: str) -> str:
    """The value of ``${env:NAME:-default}`` when NAME is not set (as under docker compose)."""
    return ENV_VARIABLE.sub(lambda m: m.group(2) or "", value)


def pinned_versions() -> dict[str, str]:
    lines = (line.strip() for line in VERSIONS.read_text().splitlines())
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def component_type(component_id: str) -> str:
    """``otlp_grpc/jaeger`` -> ``otlp_grpc``: a component id is ``type[/name]``."""
    return component_id.split("/", 1)[0]


def pipeline_problems(config: dict[str, Any]) -> list[str]:
    """What a collector would refuse at start-up, or silently leave idle."""
    problems: list[str] = []
    defined = {kind: set(config.get(kind) or {}) for kind in KINDS}
    pipelines: dict[str, dict[str, list[str]]] = config["service"]["pipelines"]
    used: dict[str, set[str]] = {kind: set() for kind in KINDS}
    connector_roles: dict[str, dict[str, set[str]]] = {
        c: {"exporters": set(), "receivers": set()} for c in defined["connectors"]
    }
    for name, pipeline in pipelines.items():
        signal = component_type(name)
        if signal not in ("traces", "metrics", "logs"):
            problems.append(f"pipeline {name}: unknown signal {signal!r}")
        if not pipeline.get("receivers") or not pipeline.get("exporters"):
            problems.append(f"pipeline {name}: needs receivers and exporters")
        for role in ("receivers", "processors", "exporters"):
            for component in pipeline.get(role) or []:
                if component in defined[role]:
                    used[role].add(component)
                elif role != "processors" and component in defined["connectors"]:
                    used["connectors"].add(component)
                    connector_roles[component][role].add(name)
                else:
                    problems.append(f"pipeline {name}: {role[:-1]} {component!r} is not defined")
        processors = pipeline.get("processors") or []
        # The collector's own advice: refuse data first, batch last.
        if processors and processors[0] != "memory_limiter":
            problems.append(f"pipeline {name}: memory_limiter is not first")
        if processors and component_type(processors[-1]) != "batch":
            problems.append(f"pipeline {name}: batch is not last")
    for kind in KINDS:
        for component in sorted(defined[kind] - used[kind]):
            problems.append(f"{kind[:-1]} {component!r} is defined but not used")
    for connector, roles in connector_roles.items():
        if not roles["exporters"] or not roles["receivers"]:
            problems.append(
                f"connector {connector!r} must export from one pipeline and feed another"
            )
        if roles["exporters"] & roles["receivers"]:
            problems.append(f"connector {connector!r} feeds the pipeline it exports from")
        signals = CONNECTOR_SIGNALS.get(component_type(connector))
        if signals is not None:
            for role, signal in zip(("exporters", "receivers"), signals, strict=True):
                for pipeline_name in roles[role]:
                    if component_type(pipeline_name) != signal:
                        problems.append(
                            f"connector {connector!r} in {pipeline_name}: "
                            f"its {role[:-1]} side takes {signal}"
                        )
    return problems


def span_name_pattern(condition: str) -> str:
    """The regular expression of an OTTL ``IsMatch(span.name, "...")`` condition."""
    match = re.search(r'IsMatch\(span\.name, "([^"]+)"\)', condition)
    assert match, condition
    return match.group(1)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load()


def test_pipelines_hold_together(config: dict[str, Any]) -> None:
    assert pipeline_problems(config) == []


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        pytest.param(
            lambda c: c["service"]["pipelines"]["logs"]["exporters"].append("otlp/nowhere"),
            "exporter 'otlp/nowhere' is not defined",
            id="undefined-exporter",
        ),
        pytest.param(
            lambda c: c["service"]["pipelines"]["metrics"]["receivers"].remove("span_metrics"),
            "connector 'span_metrics' must export from one pipeline and feed another",
            id="connector-feeds-nothing",
        ),
        pytest.param(
            lambda c: c["exporters"].update({"otlp_grpc/unused": {"endpoint": "x:4317"}}),
            "exporter 'otlp_grpc/unused' is defined but not used",
            id="unused-exporter",
        ),
        pytest.param(
            lambda c: c["service"]["pipelines"]["traces"]["processors"].reverse(),
            "pipeline traces: memory_limiter is not first",
            id="memory-limiter-late",
        ),
    ],
)
def test_broken_copies_are_caught(config: dict[str, Any], mutate: Any, problem: str) -> None:
    """Negative controls: the same check fails on a mutated copy of the file."""
    broken = copy.deepcopy(config)
    mutate(broken)
    problems = pipeline_problems(broken)
    assert any(problem in p for p in problems), problems


def test_failed_handshakes_are_always_kept(config: dict[str, Any]) -> None:
    traces = config["service"]["pipelines"]["traces"]
    assert "tail_sampling" in traces["processors"]
    assert "otlp_grpc/jaeger" in traces["exporters"]
    policies = {p["type"]: p for p in config["processors"]["tail_sampling"]["policies"]}

    ottl = policies["ottl_condition"]["ottl_condition"]["span"]
    [condition] = ottl
    assert "span.status.code == STATUS_CODE_ERROR" in condition
    pattern = span_name_pattern(condition)
    assert re.fullmatch(pattern, SERVER_SPAN_NAME)
    assert re.fullmatch(pattern, CLIENT_SPAN_NAME)
    assert not re.fullmatch(pattern, "GET /order")

    by_reason = policies["string_attribute"]["string_attribute"]
    assert by_reason["key"] == "error.type"
    # Every reason the instrumentation can report, and nothing it cannot.
    assert set(by_reason["values"]) == ERROR_TYPES
    assert {"certificate_authority_invalid", "certificate_expired"} <= ERROR_TYPES

    # The rest is sampled, not all kept and not all dropped (unless a test says so).
    percentage = policies["probabilistic"]["probabilistic"]["sampling_percentage"]
    assert ENV_VARIABLE.fullmatch(percentage)
    assert 0 < float(default(percentage)) < 100


def test_handshake_spans_become_metrics_before_sampling(config: dict[str, Any]) -> None:
    pipelines = config["service"]["pipelines"]
    feeding = [p for p in pipelines.values() if "span_metrics" in p["exporters"]]
    assert feeding
    for pipeline in feeding:
        # Counting sampled spans would count every failure but a tenth of successes.
        assert "tail_sampling" not in pipeline["processors"]
        [handshakes_only] = [p for p in pipeline["processors"] if p.startswith("filter/")]
        [condition] = config["processors"][handshakes_only]["traces"]["span"]
        assert condition.startswith("not "), "the filter drops what is not a handshake"
        pattern = span_name_pattern(condition)
        assert re.fullmatch(pattern, SERVER_SPAN_NAME)
        assert re.fullmatch(pattern, CLIENT_SPAN_NAME)
    dimensions = {d["name"] for d in config["connectors"]["span_metrics"]["dimensions"]}
    assert {"error.type", "tls.protocol.version"} <= dimensions
    metrics = pipelines["metrics"]
    assert {"otlp", "span_metrics"} <= set(metrics["receivers"])
    assert "prometheus" in metrics["exporters"]


def test_every_signal_is_received_and_logged(config: dict[str, Any]) -> None:
    protocols = config["receivers"]["otlp"]["protocols"]
    assert default(protocols["grpc"]["endpoint"]) == "0.0.0.0:4317"
    assert default(protocols["http"]["endpoint"]) == "0.0.0.0:4318"
    pipelines = config["service"]["pipelines"]
    for signal in ("traces", "metrics", "logs"):
        assert "otlp" in pipelines[signal]["receivers"]
        assert "debug" in pipelines[signal]["exporters"]
    jaeger = config["exporters"]["otlp_grpc/jaeger"]
    assert default(jaeger["endpoint"]) == "jaeger:4317"
    assert jaeger["tls"]["insecure"] is True


def test_every_variable_has_a_default() -> None:
    """docker compose sets none of them: the file must work as it is."""
    text = CONFIG.read_text()
    variables = ENV_VARIABLE.findall(text)
    assert len(variables) >= 8, variables
    assert [name for name, value in variables if not value] == []
    # Every ``${`` is one of them (a typo would be left for the collector to choke on).
    assert text.count("${") == len(variables)
    assert default("${env:X:-0.0.0.0:4317}") == "0.0.0.0:4317"


def mounted(service: dict[str, Any]) -> dict[Path, str]:
    """A compose service's volumes: host path (resolved) -> path in the container."""
    volumes: dict[Path, str] = {}
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        volumes[(COMPOSE.parent / source).resolve()] = target
    return volumes


def test_compose_mounts_this_config_at_the_pinned_versions() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    versions = pinned_versions()
    collector = compose["services"]["otel-collector"]
    # The image's tag defaults to the pinned release: ${OTELCOL_VERSION:-0.161.0}.
    assert collector["image"] == (
        f"otel/opentelemetry-collector-contrib:${{OTELCOL_VERSION:-{versions['OTELCOL_VERSION']}}}"
    )
    [target] = mounted(collector).values()
    assert mounted(collector) == {CONFIG: target}
    assert f"--config={target}" in collector["command"]
    assert {"4317:4317", "4318:4318", "8889:8889"} <= set(collector["ports"])
    jaeger = compose["services"]["jaeger"]
    assert (
        jaeger["image"] == f"jaegertracing/jaeger:${{JAEGER_VERSION:-{versions['JAEGER_VERSION']}}}"
    )
    [target] = mounted(jaeger).values()
    assert mounted(jaeger) == {REPO / "examples" / "jaeger-config.yaml": target}
    assert f"--config={target}" in jaeger["command"]
    assert "16686:16686" in jaeger["ports"]
    # Inside the compose network Jaeger listens on every interface, where the collector
    # sends to it (jaeger:4317).
    assert jaeger["environment"]["JAEGER_OTLP_GRPC_ENDPOINT"] == "0.0.0.0:4317"


def test_the_manifest_takes_every_version_from_the_versions_file() -> None:
    """One release for every component, named only in .ci/versions."""
    manifest = yaml.safe_load(MANIFEST.read_text())
    modules = [
        entry["gomod"]
        for kind in ("receivers", "processors", "exporters", "connectors", "providers")
        for entry in manifest.get(kind) or []
    ]
    assert modules
    for module in modules:
        _, version = module.split(" ")
        assert version in ("v${OTELCOL_VERSION}", "v${OTELCOL_STABLE_VERSION}"), module
    assert manifest["dist"]["version"] == "${OTELCOL_VERSION}"
    assert {"OTELCOL_VERSION", "OTELCOL_STABLE_VERSION", "OTELCOL_BUILDER_VERSION"} <= set(
        pinned_versions()
    )
