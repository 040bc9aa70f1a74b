"""The revocation checker as a whole: failures, deadlines, fairness, bounds and closing.

Real loopback HTTP servers, no mocks; the CRL and OCSP specifics have their own modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from opentelemetry.instrumentation.mtls._requests.revocation import (
    CRL,
    GOOD,
    MAX_DOWNLOAD_BYTES,
    MAX_PENDING,
    OCSP,
    UNKNOWN,
    RevocationChecker,
)
from opentelemetry.instrumentation.mtls._requests.revocation.fetch import (
    MAX_FETCHES,
    MAX_FETCHES_PER_URL,
)
from revocation_servers import (
    CA,
    DER,
    HANG,
    Reply,
    Responder,
    Server,
    check,
    closed_port_url,
    der,
    make_ca,
    revocation_threads,
    wait_until,
)

pytest_plugins = ["revocation_fixtures"]

_CLOSED = "revocation checker closed"


def _issue(ca: CA, kind: str, serial: int, url: str) -> x509.Certificate:
    """A leaf whose revocation data for ``kind`` (CRL or OCSP) is at ``url``."""
    return ca.issue(serial, ocsp_urls=[url]) if kind == OCSP else ca.issue(serial, crl_urls=[url])


# --- failures --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [OCSP, CRL])
@pytest.mark.parametrize("path", ["/garbage", "/error", "/huge", "/missing", "closed-port"])
def test_failures_give_unknown(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker], kind: str, path: str
) -> None:
    server.routes["/garbage"] = lambda _: Reply(body=b"this is not DER at all")
    server.routes["/error"] = lambda _: Reply(500, b"oops")
    server.routes["/huge"] = lambda _: Reply(content_length=MAX_DOWNLOAD_BYTES + 1)
    url = closed_port_url("/") if path == "closed-port" else server.url(path)

    result = check(checkers(timeout=2.0), _issue(ca, kind, 1, url), ca)
    assert (result.status, result.source) == (UNKNOWN, kind)
    assert result.reason
    assert result.valid_until - result.checked_at <= 60


def test_slow_drip_gives_unknown(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    server.routes["/drip"] = lambda _: Reply(body=b"x" * 1000, drip="body")
    leaf = ca.issue(1, crl_urls=[server.url("/drip")])

    result = check(checkers(timeout=0.5), leaf, ca)
    assert result.status == UNKNOWN
    assert result.reason is not None
    assert "timed out" in result.reason


@pytest.mark.parametrize(
    ("location", "status"),
    [("/crl", GOOD), ("file:///etc/hosts", UNKNOWN), ("https://127.0.0.1:1/crl", UNKNOWN)],
)
def test_redirects_are_followed_to_http_only(
    server: Server,
    ca: CA,
    checkers: Callable[..., RevocationChecker],
    location: str,
    status: str,
) -> None:
    crl = ca.crl({}).public_bytes(DER)
    server.routes["/crl"] = lambda _: Reply(body=crl)
    target = server.url(location) if location.startswith("/") else location
    server.routes["/moved"] = lambda _: Reply(302, headers={"Location": target})
    leaf = ca.issue(1, crl_urls=[server.url("/moved")])

    result = check(checkers(), leaf, ca)
    assert result.status == status
    if status == UNKNOWN:
        assert result.reason is not None
        assert "refused" in result.reason


def test_malformed_inputs_give_unknown(ca: CA, checkers: Callable[..., RevocationChecker]) -> None:
    checker = checkers()
    future = checker.submit(b"not a certificate", None)
    assert future.done()
    assert future.result().status == UNKNOWN

    leaf = ca.issue(1)
    assert checker.submit(der(leaf), b"junk").result(timeout=10).status == UNKNOWN
    result = check(checker, leaf, make_ca("Somebody else's CA"))
    assert (result.status, result.reason) == (
        UNKNOWN,
        "the issuer certificate did not issue this certificate",
    )
    # The caller's mistake is not cached: the next submit checks again, for real this time.
    again = checker.submit(der(leaf), ca.der)
    result = again.result(timeout=10)
    assert (result.status, result.reason) == (UNKNOWN, "no CRL source")
    assert checker.submit(der(leaf), ca.der).result(timeout=0) == result  # now cached


# --- caching and sharing ---------------------------------------------------------------


def test_cached_result_makes_no_second_request(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    responder = Responder(ca)
    server.routes["/ocsp"] = responder
    leaf = ca.issue(1, ocsp_urls=[server.url("/ocsp")])
    responder.statuses[1] = (leaf, ocsp.OCSPCertStatus.REVOKED)
    checker = checkers()

    first = checker.submit(der(leaf), ca.der)
    result = first.result(timeout=10)
    again = checker.submit(der(leaf), ca.der)
    assert again.done()
    assert again is not first
    assert again.result() == result
    assert server.count("/ocsp") == 1


def test_hanging_responder_gives_unknown_and_submit_does_not_wait(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    server.routes["/hang"] = lambda _: HANG
    leaf = ca.issue(1, ocsp_urls=[server.url("/hang")])
    checker = checkers(timeout=0.5)

    future = checker.submit(der(leaf), ca.der)
    assert not future.done()
    assert checker.submit(der(leaf), ca.der) is future  # shared while in flight
    assert not future.cancel()  # nobody can cancel a shared check
    result = future.result(timeout=10)
    assert (result.status, result.source) == (UNKNOWN, OCSP)
    assert result.reason == f"ocsp {server.url('/hang')}: timed out"
    cached = checker.submit(der(leaf), ca.der)
    assert cached.done()
    assert cached.result() == result
    assert server.count("/hang") == 1


def test_timed_out_url_is_skipped_for_a_while(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    server.routes["/hang"] = lambda _: HANG
    checker = checkers(timeout=0.5)
    reasons: list[str] = []
    for serial in range(1, 6):  # the first times out; a later one finds the URL skipped
        result = check(checker, ca.issue(serial, ocsp_urls=[server.url("/hang")]), ca)
        # Its download has given up too once the responder sees the connection go.
        assert wait_until(lambda: server.count_gone("/hang") == server.count("/hang"))
        assert result.status == UNKNOWN
        assert result.reason is not None
        reasons.append(result.reason)
        if "skipped: timed out" in result.reason:
            break
    assert "timed out" in reasons[0]
    assert "skipped: timed out" in reasons[-1]
    assert server.count("/hang") == len(reasons) - 1 <= 2


# --- deadlines and fairness ------------------------------------------------------------


def test_timeout_bounds_the_whole_check(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    """A CRL server dripping its headers, one byte per 0.5 s, then more slow URLs.

    Each read is within the 1 s timeout, and so is each URL's first byte: only one
    deadline for the whole check ends it in about a second, not in minutes.
    """
    crl = ca.crl({}).public_bytes(DER)
    server.routes["/drip"] = lambda _: Reply(body=crl, drip="headers", interval=0.5)
    server.routes["/prompt"] = lambda _: Reply(body=crl)
    server.fallback = lambda _: Reply(body=crl, delay=0.9)
    slow = [server.url(f"/slow{i}") for i in range(6)]
    checker = checkers(timeout=1.0)

    # Negative control: the same CRL sent at once, with the same slow URLs behind it.
    assert check(checker, ca.issue(1, crl_urls=[server.url("/prompt"), *slow]), ca).status == GOOD

    start = time.monotonic()
    result = check(checker, ca.issue(2, crl_urls=[server.url("/drip"), *slow]), ca)
    elapsed = time.monotonic() - start
    assert result.status == UNKNOWN
    assert result.reason is not None
    assert result.reason.startswith(f"crl {server.url('/drip')}: timed out")
    assert elapsed < 6  # the drip alone takes over a minute


@pytest.mark.parametrize("kind", [CRL, OCSP])
def test_checks_stuck_on_a_slow_url_do_not_delay_others(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker], kind: str
) -> None:
    """Two certificates name a hanging URL, a third a fast one: the third is answered now.

    With one worker thread, a check that held its thread while waiting would make the
    third wait the whole timeout.
    """
    timeout = 4.0
    responder = Responder(ca)
    crl = ca.crl({}).public_bytes(DER)
    server.routes["/hang"] = lambda _: HANG
    server.routes["/fast"] = responder if kind == OCSP else (lambda _: Reply(body=crl))
    checker = checkers(timeout=timeout, max_workers=1)
    stuck = [checker.submit(der(_issue(ca, kind, i, server.url("/hang"))), ca.der) for i in (1, 2)]
    fast_leaf = _issue(ca, kind, 3, server.url("/fast"))
    responder.statuses[3] = (fast_leaf, ocsp.OCSPCertStatus.GOOD)

    start = time.monotonic()
    fast = checker.submit(der(fast_leaf), ca.der).result(timeout=timeout)
    fast_elapsed = time.monotonic() - start
    assert (fast.status, fast.source) == (GOOD, kind)
    assert not any(future.done() for future in stuck)  # negative control: they do hang
    assert fast_elapsed < timeout / 2

    for future in stuck:
        result = future.result(timeout=timeout + 10)
        assert (result.status, result.source) == (UNKNOWN, kind)
        assert result.reason == f"{kind} {server.url('/hang')}: timed out"
    # A CRL is downloaded once for both; OCSP requests differ, at most two run per URL.
    assert server.count("/hang") == (1 if kind == CRL else MAX_FETCHES_PER_URL)


def test_a_flood_of_checks_stays_bounded(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    """More distinct certificates than checks may be in flight, each with its own hanging CRL."""
    server.fallback = lambda _: HANG
    flood = MAX_PENDING + 40
    leaves = [
        der(ca.issue(serial, crl_urls=[server.url(f"/hang/{serial}")]))
        for serial in range(1, flood + 1)
    ]
    before = set(revocation_threads())
    checker = checkers(timeout=3.0)

    start = time.monotonic()
    futures = [checker.submit(leaf, ca.der) for leaf in leaves]
    refused = [f for f in futures if f.done() and f.result().reason == "too many checks in flight"]
    peak = 0
    limit = time.monotonic() + 30
    while not all(f.done() for f in futures) and time.monotonic() < limit:
        peak = max(peak, len(set(revocation_threads()) - before))
        time.sleep(0.05)
    elapsed = time.monotonic() - start

    assert all(f.done() for f in futures)  # every check answered, none left pending
    assert len(refused) >= flood - MAX_PENDING
    assert all(f.result().status == UNKNOWN for f in futures)
    assert elapsed < 20
    assert peak <= 2 + MAX_FETCHES + 1  # workers, downloads, the deadline thread
    # Downloads nobody waits for any more are dropped, not started one after another.
    assert server.count_under("/hang/") <= 3 * MAX_FETCHES


# --- closing ---------------------------------------------------------------------------


def test_close_answers_every_check_and_leaves_nothing_running(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    server.routes["/hang"] = lambda _: HANG
    before = set(revocation_threads())
    checker = checkers(timeout=30, max_workers=1)
    pending = [
        checker.submit(der(_issue(ca, kind, serial, server.url("/hang"))), ca.der)
        for serial, kind in enumerate([OCSP, CRL, OCSP, CRL], 1)
    ]
    assert wait_until(lambda: server.count("/hang") >= 2)
    assert not any(future.done() for future in pending)  # negative control: they hang

    start = time.monotonic()
    checker.close()
    assert all(future.done() for future in pending)
    assert {future.result().reason for future in pending} == {_CLOSED}
    assert wait_until(lambda: not set(revocation_threads()) - before)
    assert time.monotonic() - start < 6  # downloads aborted, not waited for (30 s)
    after = checker.submit(der(ca.issue(9)), ca.der)
    assert after.done()
    assert (after.result().status, after.result().reason) == (UNKNOWN, _CLOSED)
