"""``otel-collector-config.yaml`` loads in the pinned collector, built from our manifest.

The collector is the one ``.ci/build-otel-tools`` builds from
``.ci/collector-manifest.yaml``: ``validate`` resolves the ``${env:...}`` variables,
builds every component and checks every pipeline, as the collector does at start-up.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from otel_tools import COLLECTOR_CONFIG, REPO, require, versions

TIMEOUT = 60.0


def validate(config: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(require("collector")), "validate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", **environment},
    )


@pytest.mark.parametrize(
    "environment",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {
                "OTLP_GRPC_ENDPOINT": "127.0.0.1:14317",
                "OTLP_HTTP_ENDPOINT": "127.0.0.1:14318",
                "JAEGER_OTLP_ENDPOINT": "127.0.0.1:24317",
                "PROMETHEUS_ENDPOINT": "127.0.0.1:18889",
                "SAMPLING_PERCENTAGE": "0",
                "TAIL_SAMPLING_DECISION_WAIT": "1s",
                "SPAN_METRICS_FLUSH_INTERVAL": "1s",
            },
            id="as-the-tests-set-it",
        ),
    ],
)
def test_the_config_validates(environment: dict[str, str]) -> None:
    result = validate(COLLECTOR_CONFIG, **environment)
    assert result.returncode == 0, result.stdout + result.stderr
    # Not even a warning: no deprecated component name or setting is left.
    assert "deprecated" not in (result.stdout + result.stderr).lower()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # A component that is not in our build.
        ("otlp_grpc/jaeger", "zipkin/jaeger", "zipkin"),
        # A value that the variable turns into the wrong type.
        (
            "${env:SAMPLING_PERCENTAGE:-10}",
            "${env:SAMPLING_PERCENTAGE:-ten}",
            "sampling_percentage",
        ),
    ],
)
def test_broken_copies_do_not_validate(tmp_path: Path, old: str, new: str, message: str) -> None:
    """Negative controls: ``validate`` does refuse what the collector would refuse."""
    text = COLLECTOR_CONFIG.read_text()
    assert old in text
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(old, new))
    result = validate(broken)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_the_build_has_exactly_the_components_the_config_uses() -> None:
    """The manifest lists nothing the config does not use, and misses nothing it uses."""
    result = subprocess.run(
        [str(require("collector")), "components"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    built = yaml.safe_load(result.stdout)
    assert built["buildinfo"]["version"] == versions()["OTELCOL_VERSION"]
    config = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    for kind in ("receivers", "processors", "exporters", "connectors", "extensions"):
        used = {name.split("/", 1)[0] for name in config.get(kind) or {}}
        assert {c["name"] for c in built.get(kind) or []} == used, kind
        for component in built.get(kind) or []:
            assert component["module"].endswith(f" v{versions()['OTELCOL_VERSION']}"), component
