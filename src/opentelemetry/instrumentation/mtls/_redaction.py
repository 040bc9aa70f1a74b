"""How much of a peer's identity the telemetry may show: plain, hashed or omitted.

``plain`` shows the certificate as it is. ``hashed`` replaces the subject, common name,
SANs and SPIFFE ID with a keyed HMAC-SHA256, so one identity still correlates across
services that share the key, but cannot be read back. ``omit`` keeps only what names no
one: the fingerprint (and, elsewhere, the verify result). The same redaction is applied to
spans, logs and metrics, because they all take certificate fields from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from opentelemetry.instrumentation.mtls._x509 import CertificateInfo

PLAIN: Final = "plain"
HASHED: Final = "hashed"
OMIT: Final = "omit"
MODES: Final = (PLAIN, HASHED, OMIT)
_HASH_PREFIX: Final = "hmac-sha256:"


@dataclass(frozen=True, slots=True)
class Redaction:
    """The identity mode in force, with its key for ``hashed``."""

    mode: str = PLAIN
    key: bytes | None = None

    @property
    def shows_certificate(self) -> bool:
        """Whether PEM certificates may be recorded (only in ``plain``)."""
        return self.mode == PLAIN

    def protect(self, value: str) -> str:
        """Return a keyed hash of an identifying value."""
        digest = hmac.new(self.key or b"", value.encode("utf-8"), hashlib.sha256).hexdigest()
        return _HASH_PREFIX + digest

    def apply(self, info: CertificateInfo) -> CertificateInfo:
        """Return the certificate as this redaction lets telemetry show it."""
        if self.mode == PLAIN:
            return info
        if self.mode == OMIT:
            return CertificateInfo(
                sha256=info.sha256,
                not_after_timestamp=info.not_after_timestamp,
                parse_error=info.parse_error,
            )
        protect = self.protect
        return dataclasses.replace(
            info,
            subject=protect(info.subject) if info.subject is not None else None,
            common_name=protect(info.common_name) if info.common_name is not None else None,
            alternative_names=tuple(protect(name) for name in info.alternative_names),
            spiffe_id=protect(info.spiffe_id) if info.spiffe_id is not None else None,
        )


NO_REDACTION: Final = Redaction()
