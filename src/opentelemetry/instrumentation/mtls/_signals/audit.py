"""Security-event log records, with a per-peer rate limit that loses no count.

Records go through Python ``logging`` (logger ``opentelemetry.instrumentation.mtls.audit``)
with their fields as ``extra`` attributes, so they read well in a plain log file and the
OpenTelemetry logging bridge turns the fields into log attributes. The caller emits them
inside the handshake span's context, which is how the bridge attaches trace and span ids.

A flood of failures from one peer would otherwise flood the log: per (peer address,
``error.type``) at most ``limit`` records a second are written; the next record written
for that key carries ``tls.log.suppressed_count``, the number held back since the last
one. Metrics count every attempt regardless.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from time import monotonic
from typing import Final

from opentelemetry import context, trace
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue

from opentelemetry.instrumentation.mtls import _forks
from opentelemetry.instrumentation.mtls.attributes import TLS_LOG_SUPPRESSED_COUNT

AUDIT_LOGGER_NAME: Final = "opentelemetry.instrumentation.mtls.audit"
EVENT_NAME: Final = "event.name"
SUPPRESSED_COUNT: Final = TLS_LOG_SUPPRESSED_COUNT

HANDSHAKE_FAILED: Final = "tls.handshake.failed"
HANDSHAKE_SUCCEEDED: Final = "tls.handshake.succeeded"
PEER_REJECTED: Final = "tls.peer_rejected"
CERTIFICATE_EXPIRING: Final = "tls.certificate.expiring"
IDENTITY_DENIED: Final = "tls.identity.denied"
VALIDATION_GAP: Final = "tls.validation.gap"

audit_logger = logging.getLogger(AUDIT_LOGGER_NAME)
# A library's loggers stay silent until the application configures logging (or the
# OpenTelemetry logging bridge): without this, Python's last-resort handler would print
# every failed handshake to stderr.
_SILENT: Final = logging.NullHandler()
audit_logger.addHandler(_SILENT)


def consumed() -> bool:
    """Whether a failed handshake's record would reach a handler, ours excepted.

    With the API alone nothing else records a handshake, so the ssl hooks ask this (once
    per new connection) before they observe its handshake messages for such a record.
    """
    if not audit_logger.isEnabledFor(logging.WARNING):
        return False
    logger: logging.Logger | None = audit_logger
    while logger is not None:
        if any(handler is not _SILENT for handler in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


# Keys remembered by the rate limiter; past this the least recently seen are dropped,
# so a flood from many addresses cannot grow memory.
_MAX_KEYS: Final = 4096
_WINDOW: Final = 1.0


class _Window:
    __slots__ = ("emitted", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.emitted = 0
        self.suppressed = 0


class RateLimiter:
    """Allow ``limit`` records a second per key; say how many were held back."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._windows: OrderedDict[tuple[object, ...], _Window] = OrderedDict()
        self._lock = threading.Lock()
        _forks.rebuild_in_child(self._forked)

    def _forked(self) -> None:
        self._lock = threading.Lock()  # no thread of the child holds it

    def admit(self, key: tuple[object, ...], *, always: bool = False) -> int | None:
        """Return None to suppress this record, else how many were suppressed before it.

        ``always`` admits the record whatever the window holds (it still counts in it).
        """
        now = monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(now)
                if len(self._windows) > _MAX_KEYS:
                    self._windows.popitem(last=False)
            else:
                self._windows.move_to_end(key)
                if now - window.start >= _WINDOW:
                    window.start = now
                    window.emitted = 0
            if window.emitted >= self.limit and not always:
                window.suppressed += 1
                return None
            window.emitted += 1
            suppressed, window.suppressed = window.suppressed, 0
            return suppressed

    def __len__(self) -> int:
        return len(self._windows)


Build = Callable[[], tuple[str, Mapping[str, AttributeValue]]]
"""Makes a record's message and fields: called only for records that are written."""


class AuditLog:
    """The one way security-event records are written: level, rate limit, span context.

    Each kind of record is limited per key (its event name and, e.g., the peer address
    and ``error.type``); records with no key (a local certificate's expiry, opt-in
    successes) are not limited. A record is built only when it is written.
    """

    def __init__(self, limit: int) -> None:
        self._limiter = RateLimiter(limit)

    def write(
        self,
        level: int,
        event_name: str,
        build: Build,
        *,
        key: tuple[object, ...] | None = None,
        span: Span | None = None,
        always: bool = False,
    ) -> None:
        """Write one record inside ``span``'s context (if given), unless it is held back.

        ``always`` writes it even past its key's limit (a first of its kind), counting it.
        """
        if not audit_logger.isEnabledFor(level):
            return
        suppressed = 0
        if key is not None:
            admitted = self._limiter.admit((event_name, *key), always=always)
            if admitted is None:
                return
            suppressed = admitted
        message, fields = build()
        extra: dict[str, object] = {EVENT_NAME: event_name, **fields}
        if suppressed:
            extra[SUPPRESSED_COUNT] = suppressed
        if span is None:
            audit_logger.log(level, message, extra=extra)
            return
        # The OpenTelemetry logging bridge takes trace and span ids from the context.
        token = context.attach(trace.set_span_in_context(span))
        try:
            audit_logger.log(level, message, extra=extra)
        finally:
            context.detach(token)

    def keys(self) -> int:
        """Return how many rate-limit keys are remembered (bounded; for the storm tests)."""
        return len(self._limiter)
