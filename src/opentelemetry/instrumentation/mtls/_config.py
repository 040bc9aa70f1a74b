"""Options of the instrumentation, from ``instrument()`` keyword arguments or the environment.

Every option has an ``OTEL_PYTHON_MTLS_*`` variable so that ``opentelemetry-instrument``
users can set it without code. A keyword argument wins over the variable. An invalid
value logs one warning that names the variable and falls back to the default: a typo in
a deployment must never stop the service from starting.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Final

_logger = logging.getLogger("opentelemetry.instrumentation.mtls")

OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE: Final = "OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE"
"""``true`` records the peer's PEM leaf certificate as ``tls.*.certificate``."""

OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE_CHAIN: Final = "OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE_CHAIN"
"""``true`` records the peer's PEM chain as ``tls.*.certificate_chain``."""

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


def env_bool(name: str, default: bool) -> bool:
    """Read a boolean variable; warn once and use ``default`` when it is not a boolean."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    _logger.warning(
        "%s=%r is not a boolean (true/false); using the default, %s", name, raw, default
    )
    return default


@dataclass(frozen=True, slots=True)
class MTLSConfig:
    """What the instrumentation records beyond the defaults."""

    capture_certificate: bool = False
    capture_certificate_chain: bool = False

    @classmethod
    def load(
        cls,
        *,
        capture_certificate: bool | None = None,
        capture_certificate_chain: bool | None = None,
    ) -> MTLSConfig:
        """Combine keyword arguments (which win) with the environment."""
        return cls(
            capture_certificate=(
                capture_certificate
                if capture_certificate is not None
                else env_bool(OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE, False)
            ),
            capture_certificate_chain=(
                capture_certificate_chain
                if capture_certificate_chain is not None
                else env_bool(OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE_CHAIN, False)
            ),
        )
