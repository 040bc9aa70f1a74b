"""Every option: its OTEL_PYTHON_MTLS_* variable, its keyword, and invalid values of both."""

from __future__ import annotations

import ipaddress
import logging
import pathlib
import threading
from typing import Any, NamedTuple

import pytest

from opentelemetry.instrumentation.mtls import MTLSInstrumentor
from opentelemetry.instrumentation.mtls._config import ENVIRONMENT, MTLSConfig

LOGGER = "opentelemetry.instrumentation.mtls"
ISSUER_DN = "CN=Demo CA"


class Case(NamedTuple):
    text: str
    """A valid value of the variable."""
    parsed: Any
    """What it parses to."""
    invalid: str
    """An invalid value of the variable (and of the keyword); empty when none is."""
    keyword: Any
    """A typed keyword value, and ``parsed_keyword`` what it becomes."""
    parsed_keyword: Any


CASES: dict[str, Case] = {
    "capture_certificate": Case("true", True, "maybe", False, False),
    "capture_certificate_chain": Case("1", True, "2", False, False),
    "capture_ja3": Case("on", True, "md5", False, False),
    "log_success": Case("yes", True, "sometimes", False, False),
    "log_rate_limit": Case("20", 20, "0", 7, 7),
    "peer_certificate_limit": Case("50", 50, "-3", 9, 9),
    "expiry_warning_days": Case("14", 14.0, "soon", 3.0, 3.0),
    "identity_mode": Case("HASHED", "hashed", "scrambled", "omit", "omit"),
    "hash_key": Case("s3cret", b"s3cret", "", b"\xffother", b"\xffother"),
    "trusted_proxies": Case(
        "10.0.0.0/8, 127.0.0.1",
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")),
        "10.0.0.0/33",
        [ipaddress.ip_network("192.0.2.0/24")],
        (ipaddress.ip_network("192.0.2.0/24"),),
    ),
    "proxy_header": Case("RFC9440", "rfc9440", "envoy", "traefik", "traefik"),
    "nginx_cert_header": Case(
        "X-SSL-Client-Cert", "x-ssl-client-cert", "bad header", "x-cert", "x-cert"
    ),
    "allowed_issuers": Case(ISSUER_DN, ISSUER_DN, "CN=a=b,,", "CN=Other", "CN=Other"),
    "spiffe_trust_domains": Case(
        "demo.test", "demo.test", "bad/domain", "other.test", "other.test"
    ),
    "san_patterns": Case(
        "DNS:*.demo.test", "DNS:*.demo.test", "nokind", "URI:spiffe://x/*", "URI:spiffe://x/*"
    ),
    "enforce_identity_policy": Case("true", True, "strict", False, False),
    "revocation": Case("Observe", "observe", "sometimes", "enforce", "enforce"),
    "crl_files": Case(
        "/etc/a.crl, /etc/b.crl", ("/etc/a.crl", "/etc/b.crl"), "", ["/x.crl"], ("/x.crl",)
    ),
    "crl_urls": Case(
        "http://ca.test/crl",
        ("http://ca.test/crl",),
        "ldap://ca.test/crl",
        ("http://x/crl",),
        ("http://x/crl",),
    ),
    "revocation_timeout": Case("0.5", 0.5, "-1", 3, 3.0),
    "request_attributes": Case("FULL", "full", "everything", "lean", "lean"),
    "client_handshake_spans": Case("false", False, "never", True, True),
    "expected_server_spiffe_ids": Case(
        "spiffe://demo.test/ns/shop/sa/backend, spiffe://demo.test/ns/pay/*",
        ("spiffe://demo.test/ns/shop/sa/backend", "spiffe://demo.test/ns/pay/*"),
        "https://demo.test/backend",
        ["spiffe://x.test/a"],
        ("spiffe://x.test/a",),
    ),
    "expected_server_issuers": Case(ISSUER_DN, ISSUER_DN, "CN=a=b,,", "CN=Other", "CN=Other"),
}


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


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
    case = CASES[option]
    monkeypatch.setenv(name, case.text)
    assert getattr(MTLSConfig.load(), option) == case.parsed
    # A keyword argument wins over the variable.
    assert getattr(MTLSConfig.load({option: case.keyword}), option) == case.parsed_keyword


@pytest.mark.parametrize("option", list(CASES))
def test_keyword_accepts_the_variable_text_with_its_meaning(
    option: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    name, _ = ENVIRONMENT[option]
    text = CASES[option].text
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        from_keyword = MTLSConfig.load({option: text})
        monkeypatch.setenv(name, text)
        from_variable = MTLSConfig.load()
    assert from_keyword == from_variable
    assert getattr(from_keyword, option) == CASES[option].parsed
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("option", [o for o in CASES if CASES[o].invalid])
def test_invalid_value_warns_once_and_keeps_the_default(
    option: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    name, _ = ENVIRONMENT[option]
    monkeypatch.setenv(name, CASES[option].invalid)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = MTLSConfig.load()
    assert getattr(config, option) == getattr(MTLSConfig(), option)
    (warning,) = warnings_of(caplog)
    assert name in warning


@pytest.mark.parametrize("option", [o for o in CASES if CASES[o].invalid])
def test_invalid_keyword_warns_once_naming_the_keyword(
    option: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The variable holds a valid value: an invalid keyword falls back to the default,
    # not to the variable, so what the code asked for is never silently replaced.
    name, _ = ENVIRONMENT[option]
    monkeypatch.setenv(name, CASES[option].text)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = MTLSConfig.load({option: CASES[option].invalid})
    assert getattr(config, option) == getattr(MTLSConfig(), option)
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"{option}={CASES[option].invalid!r} is invalid (")
    assert "using the default" in warning
    assert name not in warning


def test_invalid_keyword_message_names_the_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        MTLSConfig.load({"identity_mode": "bogus"})
    assert warnings_of(caplog) == [
        "identity_mode='bogus' is invalid (expected plain, hashed or omit); "
        "using the default, plain"
    ]


WRONG_TYPES: list[tuple[str, Any]] = [
    ("capture_certificate", [True]),
    ("capture_certificate", 1),
    ("log_rate_limit", [1]),
    ("log_rate_limit", 2.5),
    ("log_rate_limit", True),
    ("peer_certificate_limit", "1.5"),
    ("expiry_warning_days", True),
    ("expiry_warning_days", float("inf")),
    ("expiry_warning_days", 10**400),
    ("revocation_timeout", float("nan")),
    ("identity_mode", 3),
    ("revocation", True),
    ("proxy_header", ["xfcc"]),
    ("hash_key", 12345),
    ("hash_key", b""),
    ("trusted_proxies", [167772160]),
    ("trusted_proxies", b"10.0.0.0/8"),
    ("trusted_proxies", ["10.0.0.5", "not-an-address"]),
    ("trusted_proxies", 10),
    ("nginx_cert_header", b"x-cert"),
    ("nginx_cert_header", "x-c\u00e9rt"),
    ("allowed_issuers", ["CN=Demo CA"]),
    ("crl_files", [1]),
    ("crl_files", 1),
    ("crl_urls", ["http://ok.test/crl", "https://ca.test/crl"]),
]


@pytest.mark.parametrize(("option", "value"), WRONG_TYPES)
def test_wrong_keyword_warns_once_and_keeps_the_default(
    option: str, value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = MTLSConfig.load({option: value})
    assert getattr(config, option) == getattr(MTLSConfig(), option)
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"{option}")
    assert "is invalid" in warning


def test_identity_mode_keyword_is_case_insensitive(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = MTLSConfig.load({"identity_mode": "Hashed", "hash_key": "k1"})
        policy = config.redaction()
    assert config.identity_mode == "hashed"
    assert policy.mode == "hashed"
    assert policy.key == b"k1"
    assert warnings_of(caplog) == []


def test_hashed_without_a_key_warns_and_omits(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        policy = MTLSConfig.load({"identity_mode": "Hashed"}).redaction()
    assert policy.mode == "omit"
    (warning,) = warnings_of(caplog)
    assert "hash_key" in warning


def test_revocation_keyword_is_case_insensitive() -> None:
    assert MTLSConfig.load({"revocation": "ENFORCE"}).revocation == "enforce"
    assert MTLSConfig.load({"revocation": " Observe "}).revocation == "observe"


def test_hash_key_as_bytes_or_text_gives_one_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from_text = MTLSConfig.load({"identity_mode": "hashed", "hash_key": "k\u00e9y"})
    from_bytes = MTLSConfig.load({"identity_mode": "hashed", "hash_key": "k\u00e9y".encode()})
    monkeypatch.setenv("OTEL_PYTHON_MTLS_IDENTITY_MODE", "hashed")
    monkeypatch.setenv("OTEL_PYTHON_MTLS_HASH_KEY", "k\u00e9y")
    from_variable = MTLSConfig.load()
    assert from_text.hash_key == from_bytes.hash_key == from_variable.hash_key == b"k\xc3\xa9y"
    hashes = {
        config.redaction().protect("CN=client") for config in (from_text, from_bytes, from_variable)
    }
    assert len(hashes) == 1
    # A different key gives a different hash: the key is really used.
    other = MTLSConfig.load({"identity_mode": "hashed", "hash_key": b"\x00\xff"})
    assert other.redaction().protect("CN=client") not in hashes


NETWORK = ipaddress.ip_network("10.0.0.5/32")


@pytest.mark.parametrize(
    "value",
    [
        "10.0.0.5/32",
        "10.0.0.5",
        " 10.0.0.5/32 , ",
        ["10.0.0.5/32"],
        ("10.0.0.5",),
        [NETWORK],
        NETWORK,
        ipaddress.ip_address("10.0.0.5"),
        [ipaddress.ip_address("10.0.0.5")],
        [ipaddress.ip_interface("10.0.0.5/32")],
        {"10.0.0.5"},
    ],
    ids=repr,
)
def test_trusted_proxies_keyword_forms(value: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = MTLSConfig.load({"trusted_proxies": value})
    assert config.trusted_proxies == (NETWORK,)
    assert warnings_of(caplog) == []


def test_trusted_proxies_mixed_and_ipv6() -> None:
    config = MTLSConfig.load(
        {"trusted_proxies": ["10.0.0.0/8", ipaddress.ip_network("::1/128"), "fd00::/8"]}
    )
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("fd00::/8"),
    )


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("capture_certificate", "true", True),
        ("capture_certificate", " Off ", False),
        ("log_success", "on", True),
        ("enforce_identity_policy", True, True),
        ("log_rate_limit", "20", 20),
        ("log_rate_limit", 20, 20),
        ("peer_certificate_limit", " 50 ", 50),
        ("expiry_warning_days", 14, 14.0),
        ("expiry_warning_days", "1e1", 10.0),
        ("revocation_timeout", 1, 1.0),
        ("revocation_timeout", "0.25", 0.25),
        ("crl_files", "/a.crl,/b.crl", ("/a.crl", "/b.crl")),
        ("crl_files", ["/a.crl", " /b.crl ", ""], ("/a.crl", "/b.crl")),
        ("crl_files", pathlib.PurePosixPath("/a.crl"), ("/a.crl",)),
        ("crl_files", [pathlib.PurePosixPath("/a.crl")], ("/a.crl",)),
        (
            "crl_urls",
            "http://a.test/1.crl, http://b.test/2.crl",
            ("http://a.test/1.crl", "http://b.test/2.crl"),
        ),
        ("crl_urls", ["http://a.test/1.crl"], ("http://a.test/1.crl",)),
        ("proxy_header", "NGINX", "nginx"),
        ("hash_key", bytearray(b"k"), b"k"),
    ],
    ids=repr,
)
def test_keyword_is_read_as_its_variable_would_be(option: str, value: Any, expected: Any) -> None:
    parsed = getattr(MTLSConfig.load({option: value}), option)
    assert parsed == expected
    assert type(parsed) is type(expected)


def test_proxy_header_defaults_to_xfcc(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MTLSConfig.load().proxy_header == "xfcc"
    for header in ("xfcc", "rfc9440", "traefik", "nginx"):
        monkeypatch.setenv("OTEL_PYTHON_MTLS_PROXY_HEADER", header.upper())
        assert MTLSConfig.load().proxy_header == header


def test_an_invalid_identity_rule_drops_only_its_option(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = MTLSConfig.load({"allowed_issuers": ISSUER_DN, "san_patterns": "nokind"})
    assert config.allowed_issuers == ISSUER_DN
    assert config.san_patterns is None
    (warning,) = warnings_of(caplog)
    assert warning.startswith("san_patterns='nokind' is invalid")
    assert config.identity_rules().allowed_issuers == (ISSUER_DN,)


def test_a_blank_keyword_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_PYTHON_MTLS_REVOCATION", "observe")
    assert MTLSConfig.load({"revocation": "  ", "identity_mode": None}) == MTLSConfig(
        revocation="observe"
    )


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, _ in ENVIRONMENT.values():
        monkeypatch.setenv(name, "  ")
    assert MTLSConfig.load() == MTLSConfig()


def test_other_keywords_are_ignored() -> None:
    assert MTLSConfig.load({"tracer_provider": object(), "meter_provider": 1}) == MTLSConfig()


def test_the_hash_key_is_never_printed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_MTLS_HASH_KEY", "s3cret")
    assert "s3cret" not in repr(MTLSConfig.load())
    assert "s3cret" not in repr(MTLSConfig.load({"hash_key": b"s3cret"}))
    # Nor when it is invalid.
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        MTLSConfig.load({"hash_key": 918273645})
    (warning,) = warnings_of(caplog)
    assert "918273645" not in warning
    assert warning.startswith("hash_key is invalid")


def test_loading_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Configuration is pure: revocation on, with CRLs, starts no thread and opens nothing.
    before = threading.active_count()
    monkeypatch.setenv("OTEL_PYTHON_MTLS_REVOCATION", "enforce")
    config = MTLSConfig.load({"crl_files": "/nonexistent/a.crl", "crl_urls": "http://ca.test/crl"})
    assert threading.active_count() == before
    assert config.crl_files == ("/nonexistent/a.crl",)
    assert config.crl_urls == ("http://ca.test/crl",)
    assert not hasattr(config, "revocation_checker")


def test_instrument_never_raises_on_bad_options(caplog: pytest.LogCaptureFixture) -> None:
    # What used to raise AttributeError (bytes key) or break requests (a str of proxies).
    instrumentor = MTLSInstrumentor()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        instrumentor.instrument(
            identity_mode="Hashed",
            hash_key=b"k",
            trusted_proxies="10.0.0.5/32",
            revocation="ENFORCE",
            log_rate_limit=[1],
        )
    try:
        (warning,) = warnings_of(caplog)
        assert warning.startswith("log_rate_limit=[1] is invalid")
    finally:
        instrumentor.uninstrument()
