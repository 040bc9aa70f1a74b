"""Our own failures: caught at every boundary with the host, reported once, never raised.

An instrumentation that breaks a handshake is worse than none. Every place where our
code runs inside the host's call catches ``Exception`` and reports it here. The first
time a failure (its type and message) is seen it is logged with its traceback; repeats,
and anything past a handful of distinct failures, go to debug level, so that one bug
met at several places on the hot path cannot flood the host's logs.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Final

logger = logging.getLogger("opentelemetry.instrumentation.mtls")

MAX_DISTINCT: Final = 10
"""Distinct failures logged as warnings; past these, every failure is a debug record."""
_reported: set[tuple[str, str]] = set()
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at the fork: the child's is free.
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def report(where: str, exc: BaseException) -> None:
    """Log the first occurrence of a failure of our code; later ones at debug level."""
    key = (type(exc).__qualname__, str(exc))
    with _lock:
        first = key not in _reported and len(_reported) < MAX_DISTINCT
        if first:  # bounded: messages may carry addresses, so keys are unbounded
            _reported.add(key)
    if first:
        logger.warning(
            "opentelemetry-instrumentation-mtls failed in %s; the host is unaffected "
            "and repeats of this failure are logged at debug level",
            where,
            exc_info=exc,
        )
    else:
        logger.debug("opentelemetry-instrumentation-mtls failed in %s", where, exc_info=exc)


def reported() -> int:
    """Return how many distinct failures have been reported (for tests)."""
    return len(_reported)


def reset() -> None:
    """Forget the failures reported so far, so the next of each warns again (for tests)."""
    with _lock:
        _reported.clear()
