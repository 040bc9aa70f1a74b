"""Revocation checks by CRL, from files and loopback HTTP servers, no mocks."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from opentelemetry.instrumentation.mtls._requests.revocation import (
    CRL,
    GOOD,
    REVOKED,
    UNKNOWN,
    RevocationChecker,
)
from revocation_servers import (
    CA,
    DER,
    Reply,
    Server,
    check,
    der,
    make_ca,
)

pytest_plugins = ["revocation_fixtures"]


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, DER])
@pytest.mark.parametrize("with_issuer", [True, False])
def test_crl_file_good_and_revoked(
    tmp_path: Path,
    ca: CA,
    checkers: Callable[..., RevocationChecker],
    encoding: serialization.Encoding,
    with_issuer: bool,
) -> None:
    path = tmp_path / "ca.crl"
    path.write_bytes(ca.crl({2: x509.ReasonFlags.key_compromise}).public_bytes(encoding))
    checker = checkers(crl_files=[str(path)])
    good, revoked = ca.issue(1), ca.issue(2)
    issuer = ca if with_issuer else None

    result = check(checker, good, issuer)
    assert (result.status, result.source, result.reason) == (GOOD, CRL, None)
    assert result.checked_at < result.valid_until
    result = check(checker, revoked, issuer)
    assert (result.status, result.source, result.reason) == (REVOKED, CRL, "keyCompromise")


def test_crl_file_reloaded_when_it_changes(
    tmp_path: Path, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    path = tmp_path / "ca.crl"
    path.write_bytes(ca.crl({}).public_bytes(DER))
    checker = checkers(crl_files=[str(path)])
    first, second = ca.issue(1), ca.issue(2)
    assert check(checker, first, ca).status == GOOD

    path.write_bytes(ca.crl({2: None}).public_bytes(DER))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    result = check(checker, second, ca)
    assert (result.status, result.reason) == (REVOKED, "unspecified")


def test_crl_url_good_and_revoked_downloaded_once(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    crl = ca.crl({2: x509.ReasonFlags.superseded}).public_bytes(DER)
    server.routes["/crl"] = lambda _: Reply(body=crl)
    checker = checkers(crl_urls=[server.url("/crl")])

    assert check(checker, ca.issue(1), ca).status == GOOD
    result = check(checker, ca.issue(2), ca)
    assert (result.status, result.source, result.reason) == (REVOKED, CRL, "superseded")
    assert check(checker, ca.issue(3), None).status == GOOD
    assert server.count("/crl") == 1  # cached until its nextUpdate


def test_concurrent_checks_share_one_download(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    crl = ca.crl({3: x509.ReasonFlags.key_compromise}).public_bytes(DER)
    server.routes["/slow"] = lambda _: Reply(body=crl, delay=0.5)
    server.routes["/other"] = lambda _: Reply(body=crl)
    checker = checkers(timeout=10, max_workers=1)

    futures = [
        checker.submit(der(ca.issue(serial, crl_urls=[server.url("/slow")])), ca.der)
        for serial in range(1, 6)
    ]
    statuses = [future.result(timeout=15).status for future in futures]
    assert statuses == [GOOD, GOOD, REVOKED, GOOD, GOOD]
    assert server.count("/slow") == 1
    # Negative control: another URL is another download.
    assert check(checker, ca.issue(6, crl_urls=[server.url("/other")]), ca).status == GOOD
    assert server.count("/other") == 1


def test_crl_distribution_point(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    crl = ca.crl({2: x509.ReasonFlags.key_compromise}).public_bytes(DER)
    server.routes["/crl"] = lambda _: Reply(body=crl)
    url = server.url("/crl")
    checker = checkers()

    assert check(checker, ca.issue(1, crl_urls=[url]), ca).status == GOOD
    result = check(checker, ca.issue(2, crl_urls=[url]), ca)
    assert (result.status, result.reason) == (REVOKED, "keyCompromise")
    assert server.count("/crl") == 1

    result = check(checkers(use_distribution_points=False), ca.issue(3, crl_urls=[url]), ca)
    assert (result.status, result.reason) == (UNKNOWN, "no CRL source")


def test_crl_signed_by_another_key_is_unknown(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    impostor = make_ca("Somebody else's CA")
    forged = ca.crl({}, signing_key=impostor.key).public_bytes(DER)  # right name, wrong key
    server.routes["/forged"] = lambda _: Reply(body=forged)
    checker = checkers()

    result = check(checker, ca.issue(1, crl_urls=[server.url("/forged")]), ca)
    assert result.status == UNKNOWN
    assert result.reason is not None
    assert "signature does not verify" in result.reason


def test_crl_of_another_issuer_is_ignored(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    other = make_ca("Somebody else's CA")
    other_crl = other.crl({}).public_bytes(DER)
    server.routes["/other"] = lambda _: Reply(body=other_crl)
    checker = checkers(crl_urls=[server.url("/other")])

    result = check(checker, ca.issue(1), ca)
    assert (result.status, result.reason) == (UNKNOWN, "no CRL for the certificate's issuer")
    result = check(checker, ca.issue(2), None)
    assert result.status == UNKNOWN


def test_stale_crl_still_reports_revocations_but_not_good(
    tmp_path: Path, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    path = tmp_path / "stale.crl"
    stale = ca.crl({2: x509.ReasonFlags.key_compromise}, next_update=-datetime.timedelta(days=1))
    path.write_bytes(stale.public_bytes(DER))
    checker = checkers(crl_files=[str(path)])

    result = check(checker, ca.issue(1), ca)
    assert result.status == UNKNOWN
    assert result.reason is not None
    assert "expired" in result.reason
    result = check(checker, ca.issue(2), ca)
    assert result.status == REVOKED
    assert 0 < result.valid_until - result.checked_at <= 60  # stale data: reused briefly


def test_non_http_distribution_point_is_unknown(
    ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    leaf = ca.issue(1, crl_urls=["ldap://ldap.example/cn=CA?certificateRevocationList"])
    result = check(checkers(), leaf, ca)
    assert result.status == UNKNOWN
    assert result.reason is not None
    assert "unsupported URL scheme" in result.reason
