"""Our own failures: caught at every boundary with the host, reported once, never raised.

An instrumentation that breaks a handshake is worse than none. Every place where our
code runs inside the host's call catches ``Exception`` and reports it here; the first
failure of each kind is logged with its traceback, later ones only at debug level, so
a bug on the hot path cannot flood the host's logs either.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("opentelemetry.instrumentation.mtls")

_reported: set[str] = set()
_lock = threading.Lock()


def report(where: str, exc: BaseException) -> None:
    """Log the first failure of our code at ``where``; later ones at debug level."""
    with _lock:
        first = where not in _reported
        _reported.add(where)
    if first:
        logger.warning(
            "opentelemetry-instrumentation-mtls failed in %s; the host is unaffected "
            "and further failures here are logged at debug level",
            where,
            exc_info=exc,
        )
    else:
        logger.debug("opentelemetry-instrumentation-mtls failed in %s", where, exc_info=exc)
