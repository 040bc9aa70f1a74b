"""Revocation checks by OCSP against real loopback responders, no mocks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.x509 import ocsp

from opentelemetry.instrumentation.mtls._requests.revocation import (
    CRL,
    GOOD,
    OCSP,
    REVOKED,
    UNKNOWN,
    RevocationChecker,
)
from revocation_servers import (
    CA,
    DER,
    LEAF_KEY,
    Reply,
    Responder,
    Server,
    check,
    make_ca,
)

pytest_plugins = ["revocation_fixtures"]


@pytest.mark.parametrize("use_rsa", [False, True], ids=["ec", "rsa"])
def test_ocsp_good_revoked_unknown(
    server: Server, checkers: Callable[..., RevocationChecker], use_rsa: bool
) -> None:
    ca = make_ca("OCSP test CA", use_rsa=use_rsa)
    responder = Responder(ca)
    server.routes["/ocsp"] = responder
    url = server.url("/ocsp")
    leaves = {
        status: ca.issue(serial, ocsp_urls=[url])
        for serial, status in enumerate(ocsp.OCSPCertStatus, 1)
    }
    responder.statuses = {leaf.serial_number: (leaf, status) for status, leaf in leaves.items()}
    checker = checkers()

    result = check(checker, leaves[ocsp.OCSPCertStatus.GOOD], ca)
    assert (result.status, result.source, result.reason) == (GOOD, OCSP, None)
    assert result.valid_until > result.checked_at
    result = check(checker, leaves[ocsp.OCSPCertStatus.REVOKED], ca)
    assert (result.status, result.source, result.reason) == (REVOKED, OCSP, "keyCompromise")
    result = check(checker, leaves[ocsp.OCSPCertStatus.UNKNOWN], ca)
    assert (result.status, result.source) == (UNKNOWN, OCSP)
    assert result.reason is not None
    assert "does not know" in result.reason


@pytest.mark.parametrize("ocsp_signing", [True, False], ids=["delegated", "no-eku"])
def test_ocsp_delegated_responder(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker], ocsp_signing: bool
) -> None:
    delegate = ca.issue(99, ocsp_signing=ocsp_signing)
    responder = Responder(ca, signer_cert=delegate, signer_key=LEAF_KEY)
    server.routes["/ocsp"] = responder
    leaf = ca.issue(1, ocsp_urls=[server.url("/ocsp")])
    responder.statuses[1] = (leaf, ocsp.OCSPCertStatus.GOOD)

    result = check(checkers(), leaf, ca)
    if ocsp_signing:
        assert (result.status, result.source) == (GOOD, OCSP)
    else:
        assert result.status == UNKNOWN
        assert result.reason is not None
        assert "OCSPSigning" in result.reason


def test_ocsp_response_signed_by_another_ca_is_unknown(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    impostor = make_ca("Somebody else's CA")
    responder = Responder(ca, signer_cert=impostor.cert, signer_key=impostor.key)
    server.routes["/ocsp"] = responder
    leaf = ca.issue(1, ocsp_urls=[server.url("/ocsp")])
    responder.statuses[1] = (leaf, ocsp.OCSPCertStatus.GOOD)

    result = check(checkers(), leaf, ca)
    assert (result.status, result.source) == (UNKNOWN, OCSP)


def test_ocsp_response_about_another_certificate_is_unknown(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    responder = Responder(ca)
    server.routes["/ocsp"] = responder
    leaf = ca.issue(1, ocsp_urls=[server.url("/ocsp")])
    responder.statuses[1] = (ca.issue(2), ocsp.OCSPCertStatus.GOOD)

    result = check(checkers(), leaf, ca)
    assert (result.status, result.reason) == (
        UNKNOWN,
        f"ocsp {server.url('/ocsp')}: OCSP response is not about this certificate",
    )


def test_ocsp_needs_the_issuer_else_crl(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    crl = ca.crl({}).public_bytes(DER)
    server.routes["/crl"] = lambda _: Reply(body=crl)
    server.routes["/ocsp"] = Responder(ca)
    leaf = ca.issue(1, crl_urls=[server.url("/crl")], ocsp_urls=[server.url("/ocsp")])

    result = check(checkers(), leaf, None)
    assert (result.status, result.source) == (GOOD, CRL)
    result = check(checkers(use_ocsp=False), leaf, ca)
    assert (result.status, result.source) == (GOOD, CRL)
    assert server.count("/ocsp") == 0


def test_next_responder_is_asked_when_one_fails(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    responder = Responder(ca)
    server.routes["/ocsp"] = responder
    server.routes["/broken"] = lambda _: Reply(500, b"oops")
    leaf = ca.issue(1, ocsp_urls=[server.url("/broken"), server.url("/ocsp")])
    responder.statuses[1] = (leaf, ocsp.OCSPCertStatus.REVOKED)

    result = check(checkers(), leaf, ca)
    assert (result.status, result.source) == (REVOKED, OCSP)
    assert (server.count("/broken"), server.count("/ocsp")) == (1, 1)
