"""Bounded HTTP fetching (``revocation.fetch``) against a real loopback HTTP server."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

from opentelemetry.instrumentation.mtls._requests.revocation.fetch import (
    MAX_FETCHES_PER_URL,
    Fetcher,
    FetchError,
    fetch,
)
from revocation_servers import (
    HANG,
    Reply,
    Server,
    revocation_threads,
    wait_until,
)

pytest_plugins = ["revocation_fixtures"]

# Padding makes a dripped header block long: 300 bytes at 4 a second is over a minute.
_PAD = {"X-Padding": "p" * 240}


def test_get_and_post(server: Server) -> None:
    server.routes["/echo"] = lambda body: Reply(body=b"got " + body)

    assert fetch(server.url("/echo"), timeout=5) == b"got "
    posted = fetch(server.url("/echo"), timeout=5, body=b"x", content_type="application/x")
    assert posted == b"got x"
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(server.url("/missing"), timeout=5)


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_dripping_server_cannot_outlast_the_timeout(server: Server, part: str) -> None:
    """One byte every 0.25 s: each read is well within 1 s, the download is not."""
    body = b"x" * 300
    server.routes["/quick-drip"] = lambda _: Reply(
        body=body[:20], headers=_PAD, drip=part, interval=0.001
    )
    server.routes["/drip"] = lambda _: Reply(body=body, headers=_PAD, drip=part, interval=0.25)
    # Negative control: dripping as such is fine while it fits in the timeout.
    assert fetch(server.url("/quick-drip"), timeout=10) == body[:20]

    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out") as caught:
        fetch(server.url("/drip"), timeout=1)
    elapsed = time.monotonic() - start
    assert caught.value.timed_out
    assert elapsed < 6  # the whole drip takes over a minute


def test_redirects_share_one_deadline(server: Server) -> None:
    """Six hops of 0.4 s each: every one fits in 1 s, together they do not."""

    def hops(delay: float) -> str:
        prefix = f"/{delay}"
        for i in range(6):
            target = server.url(f"{prefix}/hop{i + 1}")
            server.routes[f"{prefix}/hop{i}"] = lambda _, t=target: Reply(
                302, headers={"Location": t}, delay=delay
            )
        server.routes[f"{prefix}/hop6"] = lambda _: Reply(body=b"arrived")
        return server.url(f"{prefix}/hop0")

    assert fetch(hops(0.0), timeout=1) == b"arrived"  # negative control: quick hops

    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch(hops(0.4), timeout=1)
    assert time.monotonic() - start < 6


def test_a_redirect_body_is_not_read(server: Server) -> None:
    """urllib reads a redirect's body to its end; a dripped one would never end."""
    server.routes["/end"] = lambda _: Reply(body=b"arrived")
    location = {"Location": server.url("/end")}
    server.routes["/moved"] = lambda _: Reply(
        302, body=b"x" * 300, headers=location, drip="body", interval=0.25
    )
    server.routes["/dripping"] = lambda _: Reply(body=b"x" * 300, drip="body", interval=0.25)

    assert fetch(server.url("/moved"), timeout=2) == b"arrived"
    with pytest.raises(FetchError, match="timed out"):  # negative control: that body hangs
        fetch(server.url("/dripping"), timeout=1)


def test_fetcher_bounds_downloads_per_url_and_keeps_others_moving(server: Server) -> None:
    server.routes["/hang"] = lambda _: HANG
    server.routes["/fast"] = lambda _: Reply(body=b"ok")
    fetcher = Fetcher(timeout=30)
    far = time.monotonic() + 60
    try:
        hanging = [
            fetcher.submit(server.url("/hang"), b"%d" % i, wanted_until=far) for i in range(5)
        ]
        fast = fetcher.submit(server.url("/fast"), wanted_until=far)
        assert fast.result(timeout=10) == b"ok"
        assert wait_until(lambda: server.count("/hang") == MAX_FETCHES_PER_URL)
        assert not any(future.done() for future in hanging)
        time.sleep(0.2)  # a third download to /hang, were it allowed, would show by now
        assert server.count("/hang") == MAX_FETCHES_PER_URL
    finally:
        start = time.monotonic()
        fetcher.close(wait=True)  # aborts the hanging downloads: no 30 s wait
    assert time.monotonic() - start < 6
    for future in hanging:
        error = future.exception(timeout=1)
        assert isinstance(error, FetchError)
        assert str(error) == "revocation checker closed"
    assert not [t for t in revocation_threads() if "fetch" in t.name]


def test_fetcher_drops_a_download_nobody_waits_for(server: Server) -> None:
    """A download still queued when its requester's deadline passes is never started."""
    server.routes["/slow"] = lambda _: Reply(body=b"late but fine", delay=1.0)
    fetcher = Fetcher(timeout=10)
    try:
        far = time.monotonic() + 60
        busy = [fetcher.submit(server.url("/slow"), b"%d" % i, wanted_until=far) for i in (1, 2)]
        soon = time.monotonic() + 0.1
        late: Future[bytes] = fetcher.submit(server.url("/slow"), b"3", wanted_until=soon)
        wanted: Future[bytes] = fetcher.submit(server.url("/slow"), b"4", wanted_until=far)

        assert [future.result(timeout=10) for future in busy] == [b"late but fine"] * 2
        assert wanted.result(timeout=10) == b"late but fine"  # negative control: queued too
        error = late.exception(timeout=10)
        assert isinstance(error, FetchError)
        assert str(error) == "timed out waiting for a download slot"
        assert not error.attempted
        assert server.count("/slow") == 3
    finally:
        fetcher.close(wait=True)


def test_unsupported_scheme_fails_at_once() -> None:
    fetcher = Fetcher(timeout=1)
    try:
        error = fetcher.submit("ldap://ldap.example/", wanted_until=time.monotonic() + 1)
        assert "unsupported URL scheme" in str(error.exception(timeout=0))
    finally:
        fetcher.close(wait=True)
