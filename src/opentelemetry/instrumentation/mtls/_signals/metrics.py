"""The metric instruments: names, units and bucket advice, made once per ``instrument()``.

Handshake counts by outcome are the duration histograms' counts by ``error.type``, so
there is no separate counter to keep in step. Active handshakes and certificate expiry
are observed asynchronously: the handshake path only moves an integer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Final

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from opentelemetry.instrumentation.mtls import _forks
from opentelemetry.instrumentation.mtls._signals.expiry import CertificateExpiry

SERVER_HANDSHAKE_DURATION: Final = "tls.server.handshake.duration"
CLIENT_HANDSHAKE_DURATION: Final = "tls.client.handshake.duration"
SERVER_ACTIVE_HANDSHAKES: Final = "tls.server.active_handshakes"
CLIENT_PEER_REJECTIONS: Final = "tls.client.peer_rejections"
CERTIFICATE_TIME_LEFT: Final = "tls.certificate.time_left"
IDENTITY_DECISIONS: Final = "tls.identity.decisions"
REVOCATION_CHECKS: Final = "tls.revocation.checks"
VALIDATION_GAPS: Final = "tls.validation.gaps"

# A resumed handshake on loopback takes a fraction of a millisecond, a full one over a
# WAN link tens of milliseconds, a stalled one up to the server's timeout.
DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class ActiveHandshakes:
    """Server handshakes begun and not yet ended, observed by an up-down counter."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()
        _forks.rebuild_in_child(self._forked)

    def _forked(self) -> None:
        # A forked child runs none of its parent's handshakes, and no thread holds its lock.
        self.value = 0
        self._lock = threading.Lock()

    def add(self, delta: int) -> None:
        """Move the count; handshakes run on many threads, so under a lock."""
        with self._lock:
            self.value += delta

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        """Report the current count."""
        return [Observation(self.value)]


class Instruments:
    """Every instrument of the contract, bound to one meter."""

    def __init__(self, meter: Meter, expiry: CertificateExpiry) -> None:
        self.active = ActiveHandshakes()
        self.server_duration = meter.create_histogram(
            SERVER_HANDSHAKE_DURATION,
            unit="s",
            description="Duration of TLS handshakes this process served, by outcome.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.client_duration = meter.create_histogram(
            CLIENT_HANDSHAKE_DURATION,
            unit="s",
            description="Duration of TLS handshakes this process made as a client, by outcome.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.peer_rejections = meter.create_counter(
            CLIENT_PEER_REJECTIONS,
            unit="{rejection}",
            description="TLS 1.3 servers that rejected our certificate after our handshake.",
        )
        self.identity_decisions = meter.create_counter(
            IDENTITY_DECISIONS,
            unit="{request}",
            description="Requests judged by the identity policy, by decision and rule.",
        )
        self.revocation_checks = meter.create_counter(
            REVOCATION_CHECKS,
            unit="{check}",
            description="Client certificates checked for revocation, by status and source.",
        )
        self.validation_gaps = meter.create_counter(
            VALIDATION_GAPS,
            unit="{handshake}",
            description="Successful handshakes with a validation gap, by gap and side.",
        )
        meter.create_observable_up_down_counter(
            SERVER_ACTIVE_HANDSHAKES,
            callbacks=[self.active.observe],
            unit="{handshake}",
            description="Server-side TLS handshakes in progress.",
        )
        meter.create_observable_gauge(
            CERTIFICATE_TIME_LEFT,
            callbacks=[expiry.observe],
            unit="s",
            description="Seconds until a certificate expires; negative once it has.",
        )
