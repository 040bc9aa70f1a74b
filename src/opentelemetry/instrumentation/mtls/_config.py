"""Options of the instrumentation, from ``instrument()`` keyword arguments or the environment.

Every option has an ``OTEL_PYTHON_MTLS_*`` variable so that ``opentelemetry-instrument``
users can set it without code. A keyword argument wins over the variable. An invalid
value logs one warning that names the variable and falls back to the default: a typo in
a deployment must never stop the service from starting.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from opentelemetry.instrumentation.mtls._redaction import HASHED, OMIT, IdentityPolicy
from opentelemetry.instrumentation.mtls._requests.revocation import RevocationChecker
from opentelemetry.instrumentation.mtls._requests.rules import IdentityRules

_logger = logging.getLogger("opentelemetry.instrumentation.mtls")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true or false")


def _positive_int(raw: str) -> int:
    value = int(raw.strip())
    if value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _identity_mode(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("plain", "hashed", "omit"):
        raise ValueError("expected plain, hashed or omit")
    return value


def _revocation_mode(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("off", "observe", "enforce"):
        raise ValueError("expected off, observe or enforce")
    return value


def _text(raw: str) -> str:
    return raw


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    return tuple(
        ipaddress.ip_network(item.strip(), strict=False) for item in raw.split(",") if item.strip()
    )


def _header_name(raw: str) -> str:
    name = raw.strip().lower()
    if not name or any(c.isspace() or c == ":" for c in name):
        raise ValueError("expected an HTTP header name")
    return name


def _positive_float(raw: str) -> float:
    value = float(raw.strip())
    if not value > 0:
        raise ValueError("expected a number above 0")
    return value


@dataclass(frozen=True, slots=True)
class MTLSConfig:
    """What the instrumentation records beyond the defaults, and its bounds."""

    capture_certificate: bool = False
    """Record the peer's PEM leaf as ``tls.*.certificate``."""
    capture_certificate_chain: bool = False
    """Record the peer's PEM chain as ``tls.*.certificate_chain``."""
    log_success: bool = False
    """Write a ``tls.handshake.succeeded`` record for every successful handshake."""
    log_rate_limit: int = 5
    """Security-event records per second per (peer address, ``error.type``)."""
    peer_certificate_limit: int = 1000
    """Distinct peer certificates kept for ``tls.certificate.time_left``."""
    expiry_warning_days: float = 30.0
    """A local certificate this close to expiry gets a ``tls.certificate.expiring`` record."""
    identity_mode: str = "plain"
    """How peer identities appear in telemetry: ``plain``, ``hashed`` or ``omit``."""
    hash_key: str | None = field(default=None, repr=False)
    """The HMAC key of ``hashed`` mode; share it across services to correlate identities."""
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Peers whose client-certificate headers are believed (TLS ends at them)."""
    nginx_cert_header: str = "ssl-client-cert"
    """The request header an nginx in front puts ``$ssl_client_escaped_cert`` in."""
    allowed_issuers: str | None = None
    """Identity policy: issuer DNs (``;``-separated) or CA SHA-256 fingerprints."""
    spiffe_trust_domains: str | None = None
    """Identity policy: SPIFFE trust domains a client's ID must be in (comma-separated)."""
    san_patterns: str | None = None
    """Identity policy: SAN patterns such as ``DNS:*.internal.example.org`` (comma-separated)."""
    enforce_identity_policy: bool = False
    """Answer 403 to requests the identity policy denies (``MTLSMiddleware`` only)."""
    revocation: str = "off"
    """Check client certificates' revocation: ``off``, ``observe`` or ``enforce`` (403)."""
    crl_files: str | None = None
    """CRL files (PEM or DER, comma-separated) to check client certificates against."""
    crl_urls: str | None = None
    """CRL URLs (http, comma-separated) to check client certificates against."""
    revocation_timeout: float = 2.0
    """Seconds a CRL download or OCSP query may take before the answer is ``unknown``."""

    def identity_rules(self) -> IdentityRules:
        """Return the identity policy's rules; invalid rules warn and are dropped."""
        try:
            return IdentityRules.parse(
                self.allowed_issuers, self.spiffe_trust_domains, self.san_patterns
            )
        except ValueError as exc:
            _logger.warning("the identity policy is invalid (%s); no policy applies", exc)
            return IdentityRules()

    def revocation_checker(self) -> RevocationChecker | None:
        """Return a revocation checker when checks are on, else None."""
        if self.revocation == "off":
            return None

        def split(value: str | None) -> tuple[str, ...]:
            return tuple(item.strip() for item in (value or "").split(",") if item.strip())

        return RevocationChecker(
            crl_files=split(self.crl_files),
            crl_urls=split(self.crl_urls),
            timeout=self.revocation_timeout,
        )

    def identity_policy(self) -> IdentityPolicy:
        """Return the identity policy asked for; ``hashed`` without a key omits instead."""
        if self.identity_mode == HASHED and not self.hash_key:
            _logger.warning(
                "OTEL_PYTHON_MTLS_IDENTITY_MODE=hashed needs OTEL_PYTHON_MTLS_HASH_KEY; "
                "omitting identities instead"
            )
            return IdentityPolicy(OMIT)
        key = self.hash_key.encode("utf-8") if self.hash_key else None
        return IdentityPolicy(self.identity_mode, key)

    @classmethod
    def load(cls, options: Mapping[str, Any] | None = None) -> MTLSConfig:
        """Combine keyword arguments (which win, when not None) with the environment."""
        options = options or {}
        values: dict[str, Any] = {}
        for option in fields(cls):
            given = options.get(option.name)
            if given is not None:
                values[option.name] = given
                continue
            name, parse = ENVIRONMENT[option.name]
            raw = os.environ.get(name)
            if raw is None or not raw.strip():
                continue
            try:
                values[option.name] = parse(raw)
            except ValueError as exc:
                _logger.warning(
                    "%s=%r is invalid (%s); using the default, %s", name, raw, exc, option.default
                )
        return cls(**values)


ENVIRONMENT: Final[dict[str, tuple[str, Callable[[str], Any]]]] = {
    "capture_certificate": ("OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE", _boolean),
    "capture_certificate_chain": ("OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE_CHAIN", _boolean),
    "log_success": ("OTEL_PYTHON_MTLS_LOG_SUCCESS", _boolean),
    "log_rate_limit": ("OTEL_PYTHON_MTLS_LOG_RATE_LIMIT", _positive_int),
    "peer_certificate_limit": ("OTEL_PYTHON_MTLS_PEER_CERTIFICATE_LIMIT", _positive_int),
    "expiry_warning_days": ("OTEL_PYTHON_MTLS_EXPIRY_WARNING_DAYS", _positive_float),
    "identity_mode": ("OTEL_PYTHON_MTLS_IDENTITY_MODE", _identity_mode),
    "hash_key": ("OTEL_PYTHON_MTLS_HASH_KEY", _text),
    "trusted_proxies": ("OTEL_PYTHON_MTLS_TRUSTED_PROXIES", _networks),
    "nginx_cert_header": ("OTEL_PYTHON_MTLS_NGINX_CERT_HEADER", _header_name),
    "allowed_issuers": ("OTEL_PYTHON_MTLS_ALLOWED_ISSUERS", _text),
    "spiffe_trust_domains": ("OTEL_PYTHON_MTLS_SPIFFE_TRUST_DOMAINS", _text),
    "san_patterns": ("OTEL_PYTHON_MTLS_SAN_PATTERNS", _text),
    "enforce_identity_policy": ("OTEL_PYTHON_MTLS_ENFORCE_IDENTITY_POLICY", _boolean),
    "revocation": ("OTEL_PYTHON_MTLS_REVOCATION", _revocation_mode),
    "crl_files": ("OTEL_PYTHON_MTLS_CRL_FILES", _text),
    "crl_urls": ("OTEL_PYTHON_MTLS_CRL_URLS", _text),
    "revocation_timeout": ("OTEL_PYTHON_MTLS_REVOCATION_TIMEOUT", _positive_float),
}
"""Each option's environment variable and parser."""
