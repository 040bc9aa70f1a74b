"""What a CRL or an OCSP response says about one certificate, shared by both evaluators.

The evaluators (``crl``, ``ocsp``) answer with a ``Verdict``, or a string saying why they
cannot; the checker turns it into a cached ``RevocationResult``. Keeping this apart lets
the evaluators stay free of the checker and of each other.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

CLOCK_SKEW = 300.0
"""Tolerated clock difference with CRL and OCSP issuers, in seconds."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Revoked (with its reason code, ``keyCompromise`` ...) or not, per data valid until.

    ``next_update`` is when the data may be replaced (None: unknown); it may have passed
    for a revocation found in a stale CRL, which stays a revocation.
    """

    revoked: bool
    reason: str | None
    next_update: datetime.datetime | None
