"""The collector configuration at the repository root holds together.

No collector runs here (no Docker), so the checks a collector makes at start-up are
made on the YAML: every pipeline names only components that are defined, every
defined component is used, each connector joins two pipelines; and the parts that
matter for mTLS are there: failed handshakes always kept by tail sampling, handshake
spans turned into metrics before sampling, with the dimensions the alerts need.
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

CONFIG = Path(__file__).resolve().parent.parent / "otel-collector-config.yaml"
KINDS = ("receivers", "processors", "exporters", "connectors")
# What each connector consumes (as an exporter) and produces (as a receiver).
CONNECTOR_SIGNALS = {"spanmetrics": ("traces", "metrics")}
ERROR_TYPES = {
    value
    for name, value in vars(_errors).items()
    if name.isupper() and not name.startswith("_") and isinstance(value, str)
}


def load(path: Path = CONFIG) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


def component_type(component_id: str) -> str:
    """``otlp/jaeger`` -> ``otlp``: a component id is ``type[/name]``."""
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
    """The regular expression of an OTTL ``IsMatch(name, "...")`` condition."""
    match = re.search(r'IsMatch\(name, "([^"]+)"\)', condition)
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
            lambda c: c["service"]["pipelines"]["metrics"]["receivers"].remove("spanmetrics"),
            "connector 'spanmetrics' must export from one pipeline and feed another",
            id="connector-feeds-nothing",
        ),
        pytest.param(
            lambda c: c["exporters"].update({"otlp/unused": {"endpoint": "x:4317"}}),
            "exporter 'otlp/unused' is defined but not used",
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
    assert "otlp/jaeger" in traces["exporters"]
    policies = {p["type"]: p for p in config["processors"]["tail_sampling"]["policies"]}

    ottl = policies["ottl_condition"]["ottl_condition"]["span"]
    [condition] = ottl
    assert "status.code == STATUS_CODE_ERROR" in condition
    pattern = span_name_pattern(condition)
    assert re.fullmatch(pattern, SERVER_SPAN_NAME)
    assert re.fullmatch(pattern, CLIENT_SPAN_NAME)
    assert not re.fullmatch(pattern, "GET /order")

    by_reason = policies["string_attribute"]["string_attribute"]
    assert by_reason["key"] == "error.type"
    # Every reason the instrumentation can report, and nothing it cannot.
    assert set(by_reason["values"]) == ERROR_TYPES
    assert {"certificate_authority_invalid", "certificate_expired"} <= ERROR_TYPES

    # The rest is sampled, not all kept and not all dropped.
    percentage = policies["probabilistic"]["probabilistic"]["sampling_percentage"]
    assert 0 < percentage < 100


def test_handshake_spans_become_metrics_before_sampling(config: dict[str, Any]) -> None:
    pipelines = config["service"]["pipelines"]
    feeding = [p for p in pipelines.values() if "spanmetrics" in p["exporters"]]
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
    dimensions = {d["name"] for d in config["connectors"]["spanmetrics"]["dimensions"]}
    assert {"error.type", "tls.protocol.version"} <= dimensions
    metrics = pipelines["metrics"]
    assert {"otlp", "spanmetrics"} <= set(metrics["receivers"])
    assert "prometheus" in metrics["exporters"]


def test_every_signal_is_received_and_logged(config: dict[str, Any]) -> None:
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    pipelines = config["service"]["pipelines"]
    for signal in ("traces", "metrics", "logs"):
        assert "otlp" in pipelines[signal]["receivers"]
        assert "debug" in pipelines[signal]["exporters"]
    jaeger = config["exporters"]["otlp/jaeger"]
    assert jaeger["endpoint"] == "jaeger:4317"
    assert jaeger["tls"]["insecure"] is True


def test_compose_mounts_this_config() -> None:
    compose = yaml.safe_load((CONFIG.parent / "examples" / "docker-compose.yaml").read_text())
    collector = compose["services"]["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib")
    [volume] = collector["volumes"]
    source, target, *_ = volume.split(":")
    assert (CONFIG.parent / "examples" / source).resolve() == CONFIG
    assert f"--config={target}" in collector["command"]
    assert {"4317:4317", "4318:4318"} <= set(collector["ports"])
    jaeger = compose["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one")
    assert "16686:16686" in jaeger["ports"]
