"""Validation gaps: each one provoked over real TLS, next to the same handshake with the check on.

A gap is a handshake that succeeded without a check that makes mTLS an identity; it
shows as ``tls.validation.gaps`` on the span, one ``tls.validation.gaps`` count per gap
and side, and a ``tls.validation.gap`` WARNING record. The pure decision
(``_ssl/validation.py``) is tested on its own at the end.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util.types import Attributes

from conftest import PKI, Instrumented, handshake_spans, kept_records
from opentelemetry.instrumentation.mtls._signals.audit import AUDIT_LOGGER_NAME
from opentelemetry.instrumentation.mtls._ssl.validation import (
    CLIENT_CERTIFICATE_OPTIONAL,
    HOSTNAME_NOT_VERIFIED,
    LEGACY_PROTOCOL_VERSION,
    PEER_CERTIFICATE_EXPIRING,
    PEER_NOT_VERIFIED,
    WEAK_CIPHER,
    peer_certificate_expiring,
    validation,
    weak_cipher,
)
from pki import Leaf
from tlsrun import Outcome, blocking

UTC = datetime.UTC
GAP_EVENT = "tls.validation.gap"


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def metered(instrumented: Instrumented, reader: InMemoryMetricReader) -> Instrumented:
    """Instrumented with metrics read by ``reader``."""
    instrumented(meter_provider=MeterProvider(metric_readers=[reader]))
    return instrumented


@pytest.fixture
def audit() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger(AUDIT_LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    try:
        with kept_records(AUDIT_LOGGER_NAME) as records:
            yield records
    finally:
        logger.setLevel(logging.NOTSET)


@pytest.fixture(scope="module")
def foreign_server(pki: PKI) -> Leaf:
    """A server certificate from a CA the clients do not trust, for another host name."""
    return pki.other_ca.issue("elsewhere", dns=("elsewhere.example.org",))


def gap_counts(reader: InMemoryMetricReader) -> dict[tuple[Any, Any], int]:
    """The ``tls.validation.gaps`` counter, as {(gap, side): count}."""
    data = reader.get_metrics_data()
    found: dict[tuple[Any, Any], int] = {}
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name != "tls.validation.gaps":
                    continue
                assert metric.unit == "{handshake}"
                for point in metric.data.data_points:
                    assert isinstance(point, NumberDataPoint)
                    attrs = dict(point.attributes or {})
                    key = (attrs.pop("tls.validation.gap"), attrs.pop("tls.side"))
                    assert attrs == {}  # exactly the contract's two attributes
                    found[key] = int(point.value)
    return found


def gap_records(audit: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in audit if getattr(r, "event.name", None) == GAP_EVENT]


def span_attributes(exporter: InMemorySpanExporter, side: str) -> Attributes:
    (span,) = handshake_spans(exporter, side)
    return span.attributes


def not_verifying_client() -> ssl.SSLContext:
    """A client context that checks nothing about the server: ``CERT_NONE``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def plain_server(leaf: Leaf) -> ssl.SSLContext:
    """A server context presenting ``leaf`` and asking for no client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    return ctx


def established(outcome: Outcome) -> None:
    assert outcome.server.startswith("ok"), outcome
    assert outcome.client.startswith("ok"), outcome


# -- peer_not_verified -------------------------------------------------------------------


def test_cert_none_client_skips_a_foreign_wrong_host_certificate(
    pki: PKI,
    foreign_server: Leaf,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    metered: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    """The issue's example: nothing checked the server, and the span now says so."""
    established(blocking(plain_server(foreign_server), not_verifying_client()))
    client = span_attributes(exporter, "client")
    assert client["tls.established"] is True
    assert client["tls.server.subject"] == "CN=elsewhere,O=mTLS tests"
    assert client["tls.server.verify.result"] == "skipped"
    assert client["tls.server.hostname_verified"] is False
    assert client["tls.validation.gaps"] == (PEER_NOT_VERIFIED,)
    # The server asked for no certificate: plain TLS on its side, no gap and none presented.
    server = span_attributes(exporter, "server")
    assert server["tls.client.verify.result"] == "none"
    assert "tls.validation.gaps" not in server
    assert gap_counts(reader) == {(PEER_NOT_VERIFIED, "client"): 1}
    (record,) = gap_records(audit)
    assert record.levelno == logging.WARNING
    fields = record.__dict__
    assert fields["tls.validation.gap"] == PEER_NOT_VERIFIED
    assert fields["tls.side"] == "client"
    assert fields["network.peer.address"] == "127.0.0.1"
    assert fields["network.peer.port"] == client["network.peer.port"]
    assert fields["tls.server.hash.sha256"] == client["tls.server.hash.sha256"]
    assert "peer_not_verified" in record.getMessage()


def test_verifying_client_rejects_the_same_server(
    pki: PKI,
    foreign_server: Leaf,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    metered: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    """Negative control: the same server, the client verifying: a failure, not a gap."""
    outcome = blocking(plain_server(foreign_server), pki.client_context(None))
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.client
    client = span_attributes(exporter, "client")
    assert client["error.type"] == "certificate_authority_invalid"
    assert client["tls.server.verify.result"] == "failed"
    assert "tls.validation.gaps" not in client
    assert "tls.server.hostname_verified" not in client  # said of established handshakes
    assert gap_counts(reader) == {}
    assert gap_records(audit) == []


# -- hostname_not_verified ---------------------------------------------------------------


def test_client_without_check_hostname_accepts_another_name(
    pki: PKI,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    metered: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    client_ctx = pki.client_context(pki.client)
    client_ctx.check_hostname = False
    outcome = blocking(pki.server_context(), client_ctx, server_hostname="not-the-server.test")
    established(outcome)
    client = span_attributes(exporter, "client")
    assert client["tls.server.verify.result"] == "success"  # the chain was verified
    assert client["tls.server.hostname_verified"] is False
    assert client["tls.validation.gaps"] == (HOSTNAME_NOT_VERIFIED,)
    assert "tls.validation.gaps" not in span_attributes(exporter, "server")
    assert gap_counts(reader) == {(HOSTNAME_NOT_VERIFIED, "client"): 1}
    assert [getattr(r, "tls.validation.gap") for r in gap_records(audit)] == [HOSTNAME_NOT_VERIFIED]


def test_client_with_check_hostname(
    pki: PKI,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    metered: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    """Negative controls: the other name is refused; the right name is verified, no gap."""
    outcome = blocking(
        pki.server_context(), pki.client_context(pki.client), server_hostname="not-the-server.test"
    )
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.client
    (refused,) = handshake_spans(exporter, "client")
    assert refused.attributes["error.type"] == "certificate_hostname_mismatch"
    assert "tls.validation.gaps" not in refused.attributes
    exporter.clear()
    established(blocking(pki.server_context(), pki.client_context(pki.client)))
    client = span_attributes(exporter, "client")
    assert client["tls.server.hostname_verified"] is True
    assert client["tls.server.verify.result"] == "success"
    assert "tls.validation.gaps" not in client
    assert gap_counts(reader) == {}
    assert gap_records(audit) == []


def test_settings_changed_after_a_handshake_are_seen_at_the_next(
    pki: PKI, exporter: InMemorySpanExporter, metered: Instrumented
) -> None:
    """Gaps are decided on the context's settings at each handshake, not its first."""
    client_ctx = pki.client_context(pki.client)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    established(blocking(pki.server_context(), client_ctx))
    client_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx.check_hostname = True
    established(blocking(pki.server_context(), client_ctx))
    first, second = handshake_spans(exporter, "client")
    assert first.attributes["tls.validation.gaps"] == (PEER_NOT_VERIFIED,)
    assert first.attributes["tls.server.verify.result"] == "skipped"
    assert "tls.validation.gaps" not in second.attributes
    assert second.attributes["tls.server.verify.result"] == "success"


# -- client_certificate_optional ---------------------------------------------------------


def test_optional_client_certificate_not_sent(
    pki: PKI,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    metered: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    established(blocking(pki.server_context(ssl.CERT_OPTIONAL), pki.client_context(None)))
    server = span_attributes(exporter, "server")
    assert server["tls.client.verify.result"] == "none"
    assert server["tls.validation.gaps"] == (CLIENT_CERTIFICATE_OPTIONAL,)
    assert "tls.validation.gaps" not in span_attributes(exporter, "client")
    assert gap_counts(reader) == {(CLIENT_CERTIFICATE_OPTIONAL, "server"): 1}
    (record,) = gap_records(audit)
    assert getattr(record, "tls.side") == "server"
    assert getattr(record, "client.address") == "127.0.0.1"
    assert isinstance(getattr(record, "client.port"), int)


@pytest.mark.parametrize("verify_mode", [ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED])
def test_client_certificate_sent_is_no_gap(
    verify_mode: ssl.VerifyMode,
    pki: PKI,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    metered: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    """Negative control: the same server with a client that sends its certificate."""
    established(blocking(pki.server_context(verify_mode), pki.client_context(pki.client)))
    server = span_attributes(exporter, "server")
    assert server["tls.client.verify.result"] == "success"
    assert "tls.validation.gaps" not in server
    assert gap_counts(reader) == {}
    assert gap_records(audit) == []


def test_required_client_certificate_not_sent_is_a_failure(
    pki: PKI, exporter: InMemorySpanExporter, reader: InMemoryMetricReader, metered: Instrumented
) -> None:
    """Negative control: with the check on (CERT_REQUIRED) the same client is refused."""
    blocking(pki.server_context(ssl.CERT_REQUIRED), pki.client_context(None))
    server = span_attributes(exporter, "server")
    assert server["error.type"] == "certificate_required"
    assert "tls.validation.gaps" not in server
    assert gap_counts(reader) == {}


# -- weak_cipher and legacy_protocol_version (gaps of the session: on both sides) ---------


def tls12_with_cipher(pki: PKI, cipher: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_ctx = pki.server_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    server_ctx.set_ciphers(cipher)
    return server_ctx, pki.client_context(pki.client)


def test_weak_cipher_on_both_sides(
    pki: PKI,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    metered: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    # ECDHE-ECDSA-AES128-SHA256: forward secret but CBC with HMAC, not AEAD. OpenSSL 3.0
    # still negotiates it at its default security level. (The suites without forward
    # secrecy, such as AES128-GCM-SHA256, need an RSA certificate; the test PKI's keys
    # are ECDSA. weak_cipher() is checked on those names below.)
    established(blocking(*tls12_with_cipher(pki, "ECDHE-ECDSA-AES128-SHA256")))
    for side in ("server", "client"):
        attributes = span_attributes(exporter, side)
        assert attributes["tls.cipher"] == "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256"
        assert attributes["tls.validation.gaps"] == (WEAK_CIPHER,)
    assert gap_counts(reader) == {(WEAK_CIPHER, "server"): 1, (WEAK_CIPHER, "client"): 1}
    sides = sorted(getattr(r, "tls.side") for r in gap_records(audit))
    assert sides == ["client", "server"]


def test_aead_forward_secret_cipher_is_no_gap(
    pki: PKI,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    metered: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    """Negative control: the same TLS 1.2 handshake with an ECDHE + GCM suite."""
    established(blocking(*tls12_with_cipher(pki, "ECDHE-ECDSA-AES128-GCM-SHA256")))
    for side in ("server", "client"):
        attributes = span_attributes(exporter, side)
        assert attributes["tls.cipher"] == "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
        assert "tls.validation.gaps" not in attributes
    assert gap_counts(reader) == {}
    assert gap_records(audit) == []


def pinned_contexts(pki: PKI, version: ssl.TLSVersion) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Both sides pinned to ``version`` at security level 0, where OpenSSL allows TLS 1.0/1.1."""
    server_ctx, client_ctx = pki.server_context(), pki.client_context(pki.client)
    for ctx in (server_ctx, client_ctx):
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            # Python deprecates TLS 1.0/1.1 (a DeprecationWarning on setting them).
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = version
            ctx.maximum_version = version
    return server_ctx, client_ctx


@pytest.mark.skipif(not ssl.HAS_TLSv1_1, reason="this OpenSSL was built without TLS 1.1")
def test_legacy_protocol_version_on_both_sides(
    pki: PKI,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    metered: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    outcome = blocking(*pinned_contexts(pki, ssl.TLSVersion.TLSv1_1))
    if not outcome.client.startswith("ok"):
        pytest.skip(f"{ssl.OPENSSL_VERSION} refuses TLS 1.1 even at @SECLEVEL=0: {outcome}")
    established(outcome)
    # No TLS 1.1 suite is AEAD: a legacy session always has a weak cipher too.
    expected = (LEGACY_PROTOCOL_VERSION, WEAK_CIPHER)
    for side in ("server", "client"):
        attributes = span_attributes(exporter, side)
        assert attributes["tls.protocol.version"] == "1.1"
        assert attributes["tls.validation.gaps"] == expected
    assert gap_counts(reader) == {
        (gap, side): 1 for gap in expected for side in ("server", "client")
    }
    assert len(gap_records(audit)) == 4  # one per gap and side


def test_tls12_at_the_same_security_level_is_no_gap(
    pki: PKI,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    metered: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    """Negative control: the same contexts pinned to TLS 1.2."""
    established(blocking(*pinned_contexts(pki, ssl.TLSVersion.TLSv1_2)))
    for side in ("server", "client"):
        attributes = span_attributes(exporter, side)
        assert attributes["tls.protocol.version"] == "1.2"
        assert "tls.validation.gaps" not in attributes
    assert gap_counts(reader) == {}
    assert gap_records(audit) == []


# -- peer_certificate_expiring -----------------------------------------------------------


@pytest.fixture(scope="module")
def expiring_server(pki: PKI) -> Leaf:
    """A server certificate that expires in ten days."""
    soon = datetime.datetime.now(UTC) + datetime.timedelta(days=10)
    return pki.ca.issue("server.test", dns=("localhost",), not_after=soon)


@pytest.mark.parametrize(("days", "gap"), [(30, True), (5, False)])
def test_peer_certificate_expiring_within_the_warning_window(
    days: int,
    gap: bool,
    pki: PKI,
    expiring_server: Leaf,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    instrumented: Instrumented,
) -> None:
    """Ten days left: a gap with a 30-day window; the control, a 5-day window, has none."""
    instrumented(meter_provider=MeterProvider(metric_readers=[reader]), expiry_warning_days=days)
    server_ctx = pki.server_context()
    expiring_server.configure_cert(server_ctx)
    established(blocking(server_ctx, pki.client_context(pki.client)))
    client = span_attributes(exporter, "client")
    assert client["tls.server.verify.result"] == "success"
    if gap:
        assert client["tls.validation.gaps"] == (PEER_CERTIFICATE_EXPIRING,)
        assert gap_counts(reader) == {(PEER_CERTIFICATE_EXPIRING, "client"): 1}
    else:
        assert "tls.validation.gaps" not in client
        assert gap_counts(reader) == {}
    # The server's peer, the client certificate, is years from expiry.
    assert "tls.validation.gaps" not in span_attributes(exporter, "server")


# -- counts and rate limits ----------------------------------------------------------------


def test_every_gap_counted_records_rate_limited_first_per_context_written(
    pki: PKI,
    foreign_server: Leaf,
    reader: InMemoryMetricReader,
    instrumented: Instrumented,
    audit: list[logging.LogRecord],
) -> None:
    """Five gaps from one context and one more from a second, all from one peer address.

    At one record a second per (peer, gap), the first context's first record is written
    and the next four are held back; the second context's first is written anyway, and
    carries the count held back. The counter counts all six. (Six loopback handshakes
    take milliseconds: they all fall in the limiter's one-second window.)
    """
    instrumented(meter_provider=MeterProvider(metric_readers=[reader]), log_rate_limit=1)
    first_ctx = not_verifying_client()
    for _ in range(5):
        established(blocking(plain_server(foreign_server), first_ctx))
    established(blocking(plain_server(foreign_server), not_verifying_client()))
    assert gap_counts(reader) == {(PEER_NOT_VERIFIED, "client"): 6}
    records = gap_records(audit)
    assert [getattr(r, "tls.log.suppressed_count", 0) for r in records] == [0, 4]
    assert {getattr(r, "tls.validation.gap") for r in records} == {PEER_NOT_VERIFIED}


# -- the decision itself (pure) ------------------------------------------------------------

CERT_NONE, CERT_OPTIONAL, CERT_REQUIRED = ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED
TLS13 = "TLS_AES_128_GCM_SHA256"


@pytest.mark.parametrize(
    ("server_side", "verify_mode", "check_hostname", "presented", "expected"),
    [
        (False, CERT_REQUIRED, True, True, ("success", True, ())),
        (False, CERT_REQUIRED, False, True, ("success", False, (HOSTNAME_NOT_VERIFIED,))),
        (False, CERT_NONE, False, True, ("skipped", False, (PEER_NOT_VERIFIED,))),
        (False, CERT_NONE, False, False, ("none", False, (PEER_NOT_VERIFIED,))),
        (True, CERT_REQUIRED, False, True, ("success", None, ())),
        (True, CERT_OPTIONAL, False, True, ("success", None, ())),
        (True, CERT_OPTIONAL, False, False, ("none", None, (CLIENT_CERTIFICATE_OPTIONAL,))),
        (True, CERT_NONE, False, False, ("none", None, ())),
        (True, CERT_NONE, False, True, ("skipped", None, (PEER_NOT_VERIFIED,))),
    ],
)
def test_context_decision(
    server_side: bool,
    verify_mode: int,
    check_hostname: bool,
    presented: bool,
    expected: tuple[str, bool | None, tuple[str, ...]],
) -> None:
    checked = validation(server_side, verify_mode, check_hostname, presented, "1.3", TLS13)
    assert (checked.verify_result, checked.hostname_verified, checked.gaps) == expected


@pytest.mark.parametrize(
    ("version", "cipher", "gaps"),
    [
        ("1.3", TLS13, ()),
        ("1.2", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", ()),
        ("1.2", "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256", ()),
        ("1.2", "TLS_RSA_WITH_AES_128_GCM_SHA256", (WEAK_CIPHER,)),  # no forward secrecy
        ("1.2", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", (WEAK_CIPHER,)),  # not AEAD
        ("1.1", "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", (LEGACY_PROTOCOL_VERSION, WEAK_CIPHER)),
        ("1.2", None, ()),
    ],
)
def test_session_decision(version: str, cipher: str | None, gaps: tuple[str, ...]) -> None:
    assert validation(True, CERT_REQUIRED, False, True, version, cipher).gaps == gaps


@pytest.mark.parametrize(
    ("cipher", "weak"),
    [
        ("ECDHE-RSA-AES128-GCM-SHA256", False),
        ("DHE-RSA-AES256-CCM", False),
        ("ECDHE-ECDSA-CHACHA20-POLY1305", False),
        ("AES128-GCM-SHA256", True),  # OpenSSL names, as for a suite missing from the table
        ("ECDHE-RSA-AES128-SHA256", True),
        ("TLS_DH_anon_WITH_AES_128_GCM_SHA256", True),
        ("TLS_RSA_WITH_NULL_SHA256", True),
    ],
)
def test_weak_cipher_names(cipher: str, weak: bool) -> None:
    assert weak_cipher(cipher) is weak


def test_expiring_window() -> None:
    day = 86400.0
    assert peer_certificate_expiring(10 * day, 0.0, 30 * day)
    assert not peer_certificate_expiring(10 * day, 0.0, 5 * day)
    assert peer_certificate_expiring(-1.0, 0.0, 0.0)  # expired: within any window
    assert not peer_certificate_expiring(None, 0.0, 30 * day)
