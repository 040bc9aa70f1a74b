"""The sizes of the running instrumentation's bounded state, for tests and benchmarks.

Every structure that grows with traffic is bounded; :func:`bounded_state` says how full
each one is, so a storm or soak run can show that they stay within their bounds and that
what should drain does. The instrumentor tells this module which telemetry is running.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.instrumentation.mtls._requests.connection import live_connections
from opentelemetry.instrumentation.mtls._signals.handshake import HandshakeTelemetry
from opentelemetry.instrumentation.mtls._x509 import parse_certificate

LIVE_CONNECTIONS: Final = "live connections"
AUDIT_KEYS: Final = "audit rate-limit keys"
PEER_CERTIFICATES: Final = "peer certificates observed"
PARSE_CACHE: Final = "certificate parse cache"

_running: list[HandshakeTelemetry] = []


def watch(telemetry: HandshakeTelemetry | None) -> None:
    """Say which telemetry is running (None once uninstrumented)."""
    _running[:] = [telemetry] if telemetry is not None else []


def bounded_state() -> dict[str, int]:
    """Return how full each bounded structure is; empty when nothing is instrumented."""
    if not _running:
        return {}
    telemetry = _running[0]
    return {
        LIVE_CONNECTIONS: live_connections(),
        AUDIT_KEYS: telemetry.audit.keys(),
        PEER_CERTIFICATES: telemetry.expiry.peer_count(),
        PARSE_CACHE: parse_certificate.cache_info().currsize,
    }
