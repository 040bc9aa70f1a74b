"""Every OTEL_PYTHON_MTLS_* variable: its effect on the options, and invalid values."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest

from opentelemetry.instrumentation.mtls._config import ENVIRONMENT, MTLSConfig

# option -> (a valid value as text, what it parses to, an invalid value, a keyword value)
CASES: dict[str, tuple[str, Any, str, Any]] = {
    "capture_certificate": ("true", True, "maybe", False),
    "capture_certificate_chain": ("1", True, "2", False),
    "log_success": ("yes", True, "sometimes", False),
    "log_rate_limit": ("20", 20, "0", 7),
    "peer_certificate_limit": ("50", 50, "-3", 9),
    "expiry_warning_days": ("14", 14.0, "soon", 3.0),
    "identity_mode": ("HASHED", "hashed", "scrambled", "omit"),
    "hash_key": ("s3cret", "s3cret", "", "other"),
    "trusted_proxies": (
        "10.0.0.0/8, 127.0.0.1",
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")),
        "10.0.0.0/33",
        (),
    ),
    "nginx_cert_header": ("X-SSL-Client-Cert", "x-ssl-client-cert", "bad header", "x-cert"),
    "allowed_issuers": ("CN=Demo CA", "CN=Demo CA", "", "CN=Other"),
    "spiffe_trust_domains": ("demo.test", "demo.test", "", "other.test"),
    "san_patterns": ("DNS:*.demo.test", "DNS:*.demo.test", "", "URI:spiffe://x/*"),
    "enforce_identity_policy": ("true", True, "strict", False),
    "revocation": ("Observe", "observe", "sometimes", "enforce"),
    "crl_files": ("/etc/a.crl,/etc/b.crl", "/etc/a.crl,/etc/b.crl", "", "/x.crl"),
    "crl_urls": ("http://ca.test/crl", "http://ca.test/crl", "", "http://x/crl"),
    "revocation_timeout": ("0.5", 0.5, "-1", 3.0),
}


def test_every_option_has_a_documented_variable() -> None:
    with open("README.md", encoding="utf-8") as f:
        readme = f.read()
    assert set(ENVIRONMENT) == set(CASES)
    for name, _ in ENVIRONMENT.values():
        assert name.startswith("OTEL_PYTHON_MTLS_")
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("option", list(CASES))
def test_variable_sets_its_option(option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, _ = ENVIRONMENT[option]
    valid, parsed, _, keyword = CASES[option]
    monkeypatch.setenv(name, valid)
    assert getattr(MTLSConfig.load(), option) == parsed
    # A keyword argument wins over the variable.
    assert getattr(MTLSConfig.load({option: keyword}), option) == keyword


@pytest.mark.parametrize("option", [o for o in CASES if CASES[o][2]])
def test_invalid_value_warns_once_and_keeps_the_default(
    option: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    name, _ = ENVIRONMENT[option]
    monkeypatch.setenv(name, CASES[option][2])
    with caplog.at_level(logging.WARNING, logger="opentelemetry.instrumentation.mtls"):
        config = MTLSConfig.load()
    assert getattr(config, option) == getattr(MTLSConfig(), option)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert name in warning


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, _ in ENVIRONMENT.values():
        monkeypatch.setenv(name, "  ")
    assert MTLSConfig.load() == MTLSConfig()


def test_the_hash_key_is_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_PYTHON_MTLS_HASH_KEY", "s3cret")
    assert "s3cret" not in repr(MTLSConfig.load())
