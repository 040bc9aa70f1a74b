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
from collections.abc import Mapping
from time import monotonic
from typing import Final

from opentelemetry.util.types import AttributeValue

from opentelemetry.instrumentation.mtls.attributes import TLS_LOG_SUPPRESSED_COUNT

AUDIT_LOGGER_NAME: Final = "opentelemetry.instrumentation.mtls.audit"
EVENT_NAME: Final = "event.name"
SUPPRESSED_COUNT: Final = TLS_LOG_SUPPRESSED_COUNT

HANDSHAKE_FAILED: Final = "tls.handshake.failed"
HANDSHAKE_SUCCEEDED: Final = "tls.handshake.succeeded"
PEER_REJECTED: Final = "tls.peer_rejected"
CERTIFICATE_EXPIRING: Final = "tls.certificate.expiring"
IDENTITY_DENIED: Final = "tls.identity.denied"

audit_logger = logging.getLogger(AUDIT_LOGGER_NAME)
# A library's loggers stay silent until the application configures logging (or the
# OpenTelemetry logging bridge): without this, Python's last-resort handler would print
# every failed handshake to stderr.
audit_logger.addHandler(logging.NullHandler())

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

    def admit(self, key: tuple[object, ...]) -> int | None:
        """Return None to suppress this record, else how many were suppressed before it."""
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
            if window.emitted >= self.limit:
                window.suppressed += 1
                return None
            window.emitted += 1
            suppressed, window.suppressed = window.suppressed, 0
            return suppressed

    def __len__(self) -> int:
        return len(self._windows)


def emit(
    level: int,
    event_name: str,
    message: str,
    fields: Mapping[str, AttributeValue],
    *,
    suppressed: int = 0,
) -> None:
    """Write one security-event record with ``fields`` as ``extra`` attributes."""
    extra: dict[str, object] = {EVENT_NAME: event_name, **fields}
    if suppressed:
        extra[SUPPRESSED_COUNT] = suppressed
    audit_logger.log(level, message, extra=extra)
