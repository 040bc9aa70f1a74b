"""Whether anything records what we emit, asked of the providers through the public API.

With the API alone, spans and metrics are no-ops, so the ssl hooks skip building records
for successful handshakes. The global providers may be set after ``instrument()`` (and
only once), so until one is, each handshake asks again; once one records, the answer is
kept.
"""

from __future__ import annotations

from opentelemetry import metrics, trace

_API_MODULES = ("opentelemetry.trace", "opentelemetry.metrics")


def _records(provider: object) -> bool:
    """Whether a provider records: the API's own no-op and proxy providers do not."""
    return not type(provider).__module__.startswith(_API_MODULES)


class Providers:
    """The tracer and meter providers ``instrument()`` was given, or the global ones."""

    __slots__ = ("_meter_provider", "_metering", "_tracer_provider", "_tracing")

    def __init__(self, tracer_provider: object | None, meter_provider: object | None) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._tracing = tracer_provider is not None and _records(tracer_provider)
        self._metering = meter_provider is not None and _records(meter_provider)

    def recording(self) -> bool:
        """Whether spans or metrics are recorded; this runs on every handshake entry."""
        if self._tracing or self._metering:
            return True
        if self._tracer_provider is None and _records(trace.get_tracer_provider()):
            self._tracing = True
            return True
        if self._meter_provider is None and _records(metrics.get_meter_provider()):
            self._metering = True
            return True
        return False
