"""Fixtures of the revocation tests: a loopback HTTP server, a throwaway CA, checkers.

A pytest plugin, loaded by the ``test_revocation*`` modules with
``pytest_plugins = ["revocation_fixtures"]``; the helpers are in ``revocation_servers``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from opentelemetry.instrumentation.mtls._requests.revocation import RevocationChecker
from revocation_servers import CA, Server, make_ca, revocation_threads


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def ca() -> CA:
    return make_ca("Revocation test CA")


@pytest.fixture
def checkers() -> Iterator[Callable[..., RevocationChecker]]:
    """Make checkers; at the end close them and check that none left a thread running."""
    before = set(revocation_threads())
    made: list[RevocationChecker] = []

    def make(**kwargs: Any) -> RevocationChecker:
        checker = RevocationChecker(**kwargs)
        made.append(checker)
        return checker

    yield make
    for checker in made:
        checker.close(wait=True)
    assert set(revocation_threads()) - before == set()
