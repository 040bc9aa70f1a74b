"""The alert rules in ``examples/alerts.yaml``, evaluated by Prometheus's own ``promtool``.

``promtool check rules`` parses every expression; ``promtool test rules`` runs
``examples/alerts-test.yaml``, where each alert fires on synthetic series when it should
and stays silent when it should not. Negative controls: a rule with a wrong threshold
or a wrong metric name fails those same unit tests.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from otel_tools import REPO, require

EXAMPLES = REPO / "examples"
RULES = EXAMPLES / "alerts.yaml"
RULE_TESTS = EXAMPLES / "alerts-test.yaml"
TIMEOUT = 60.0


def promtool(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(require("promtool")), *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout + result.stderr


def test_each_alert_fires_when_it_should_and_only_then() -> None:
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    """Each rule of alerts.yaml has a case where it fires and one where it does not."""
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [check for case in cases for check in case.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in checks if c["exp_alerts"]}
    silent = {c["alertname"] for c in checks if not c["exp_alerts"]}
    assert firing == alerts
    assert silent == alerts


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("> 0.05", "> 0.5", id="threshold-too-high"),
        pytest.param("for: 10m", "for: 1m", id="fires-too-early"),
        pytest.param("< 14 * 86400", "< 7 * 86400", id="expiry-window-too-short"),
        pytest.param(
            "tls_client_peer_rejections_total", "tls_client_peer_rejections", id="wrong-name"
        ),
    ],
)
def test_wrong_rules_fail_the_unit_tests(tmp_path: Path, old: str, new: str) -> None:
    """Negative controls: the unit tests catch a rule that says something else."""
    rules = RULES.read_text()
    assert old in rules
    (tmp_path / "alerts.yaml").write_text(rules.replace(old, new, 1))
    shutil.copy(RULE_TESTS, tmp_path / "alerts-test.yaml")
    result = promtool("test", "rules", tmp_path / "alerts-test.yaml")
    assert result.returncode != 0, result.stdout + result.stderr
    assert "FAILED" in result.stdout + result.stderr
