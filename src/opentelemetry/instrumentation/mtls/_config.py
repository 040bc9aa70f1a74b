"""Options of the instrumentation, from ``instrument()`` keyword arguments or the environment.

Every option has an ``OTEL_PYTHON_MTLS_*`` variable so that ``opentelemetry-instrument``
users can set it without code. A keyword argument wins over the variable. Both go through
the option's one parser, so a keyword accepts every text its variable accepts, with the
same meaning, besides the typed value itself (``True``, ``20``, ``b"key"``, a list of
networks). An invalid value logs one warning that names the keyword or the variable and
falls back to the default: a typo in a deployment must never stop the service from
starting.

The module is pure: it parses and validates, and builds nothing that does I/O or starts a
thread (the instrumentor makes the revocation checker from ``crl_files``, ``crl_urls``
and ``revocation_timeout``).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._redaction import HASHED, MODES, OMIT, IdentityPolicy
from opentelemetry.instrumentation.mtls._requests.rules import (
    ISSUER_SEPARATOR,
    LIST_SEPARATOR,
    IdentityRules,
)

_logger = logging.getLogger("opentelemetry.instrumentation.mtls")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REVOCATION_MODES: Final = ("off", "observe", "enforce")
PROXY_HEADERS: Final = ("xfcc", "rfc9440", "traefik", "nginx")
"""The client-certificate header formats, named as ``tls.client.identity.source`` names them."""

_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})
# RFC 9110 token characters: what a header name may be made of.
_TOKEN: Final = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


# Each parser takes the variable's text or the keyword's typed value, and returns the
# option's value or raises ValueError (a bad value) or TypeError (a value of the wrong
# type). bool is an int subclass, so number parsers refuse it explicitly.


def _boolean(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError("expected true or false")
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true or false")


def _positive_int(value: str | int) -> int:
    if isinstance(value, str):
        number = int(value.strip())
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise TypeError("expected a whole number of at least 1")
    if number < 1:
        raise ValueError("expected a whole number of at least 1")
    return number


def _positive_float(value: str | float) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError("expected a number above 0")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except OverflowError:  # float() of an int beyond the float range
        raise ValueError("expected a number above 0") from None
    # Infinity would make timedelta() and timeouts raise later, inside the host's calls.
    if not (number > 0 and math.isfinite(number)):
        raise ValueError("expected a finite number above 0")
    return number


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    expected = "expected " + ", ".join(choices[:-1]) + " or " + choices[-1]

    def parse(value: str) -> str:
        if not isinstance(value, str):
            raise TypeError(expected)
        text = value.strip().lower()
        if text not in choices:
            raise ValueError(expected)
        return text

    return parse


def _hash_key(value: str | bytes) -> bytes:
    # Not stripped: a key is whatever bytes it is; a text key is its UTF-8 encoding.
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        if not value:
            raise ValueError("expected a non-empty key")
        return bytes(value)
    raise TypeError("expected a str or bytes key")


def _network(item: str | IPNetwork | _IPAddress) -> IPNetwork:
    if isinstance(item, str):
        return ipaddress.ip_network(item.strip(), strict=False)
    if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return item
    if isinstance(item, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return item.network  # an interface is also an address: look at it first
    if isinstance(item, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return ipaddress.ip_network(item)
    raise TypeError("expected addresses or CIDRs, as text or ipaddress objects")


def _networks(
    value: str | IPNetwork | _IPAddress | Iterable[str | IPNetwork | _IPAddress],
) -> tuple[IPNetwork, ...]:
    if isinstance(value, str):
        items: Iterable[str | IPNetwork | _IPAddress] = value.split(",")
    elif isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network | _IPAddress):
        # One network or address; a network is iterable, over all its addresses.
        items = (value,)
    elif isinstance(value, Iterable) and not isinstance(value, bytes | bytearray):
        items = value
    else:
        raise TypeError("expected addresses or CIDRs, comma-separated or as a list")
    return tuple(
        _network(item) for item in items if not (isinstance(item, str) and not item.strip())
    )


def _strings(value: str | Iterable[str | os.PathLike[str]]) -> tuple[str, ...]:
    """Split a comma-separated text, or take a list; blank items are skipped."""
    if isinstance(value, str):
        items: Iterable[str | os.PathLike[str]] = value.split(",")
    elif isinstance(value, os.PathLike):
        items = (value,)
    elif isinstance(value, Iterable) and not isinstance(value, bytes | bytearray):
        items = value
    else:
        raise TypeError("expected a comma-separated text or a list")
    result: list[str] = []
    for item in items:
        text = os.fspath(item) if isinstance(item, os.PathLike) else item
        if not isinstance(text, str):
            raise TypeError("expected a comma-separated text or a list of str")
        if text.strip():
            result.append(text.strip())
    return tuple(result)


def _http_urls(value: str | Iterable[str]) -> tuple[str, ...]:
    urls = _strings(value)
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        # Only http is fetched (CRLs are signed, and https could loop back on itself).
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ValueError("expected http:// URLs")
    return urls


def _header_name(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError("expected an HTTP header name")
    name = value.strip().lower()
    if not name or not set(name) <= _TOKEN:
        raise ValueError("expected an HTTP header name")
    return name


def _issuers(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected issuers as text, {ISSUER_SEPARATOR!r}-separated")
    IdentityRules.parse(value, None, None)  # raises ValueError on a malformed entry
    return value


def _trust_domains(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected trust domains as text, {LIST_SEPARATOR!r}-separated")
    IdentityRules.parse(None, value, None)
    return value


def _san_patterns(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected SAN patterns as text, {LIST_SEPARATOR!r}-separated")
    IdentityRules.parse(None, None, value)
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
    hash_key: bytes | None = field(default=None, repr=False)
    """The HMAC key of ``hashed`` mode; share it across services to correlate identities."""
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Peers whose client-certificate headers are believed (TLS ends at them)."""
    proxy_header: str = "xfcc"
    """The one header format believed from a trusted proxy: xfcc, rfc9440, traefik, nginx."""
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
    crl_files: tuple[str, ...] = ()
    """CRL files (PEM or DER) to check client certificates against."""
    crl_urls: tuple[str, ...] = ()
    """CRL URLs (http) to check client certificates against."""
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

    def identity_policy(self) -> IdentityPolicy:
        """Return the identity policy asked for; ``hashed`` without a key omits instead."""
        if self.identity_mode == HASHED and not self.hash_key:
            _logger.warning(
                "identity_mode=hashed (OTEL_PYTHON_MTLS_IDENTITY_MODE) needs hash_key "
                "(OTEL_PYTHON_MTLS_HASH_KEY); omitting identities instead"
            )
            return IdentityPolicy(OMIT)
        return IdentityPolicy(self.identity_mode, self.hash_key)

    @classmethod
    def load(cls, options: Mapping[str, Any] | None = None) -> MTLSConfig:
        """Parse keyword arguments (which win) and the environment alike.

        A keyword that is None or blank text is not given, as a blank variable is unset.
        """
        options = options or {}
        values: dict[str, Any] = {}
        for option in fields(cls):
            variable, parse = ENVIRONMENT[option.name]
            source, value = option.name, options.get(option.name)
            if _unset(value):
                source, value = variable, os.environ.get(variable)
                if _unset(value):
                    continue
            try:
                values[option.name] = parse(value)
            except (TypeError, ValueError) as exc:
                # The hash key is a secret: name it, never show it.
                shown = f"{source}={value!r}" if option.repr else source
                _logger.warning(
                    "%s is invalid (%s); using the default, %s",
                    shown,
                    exc,
                    _describe(option.default),
                )
            except Exception as exc:  # a bug of ours must not stop the host
                _failsafe.report(f"parsing {source}", exc)
        return cls(**values)


def _unset(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _describe(default: object) -> str:
    if default is None or default == ():
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


ENVIRONMENT: Final[dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "capture_certificate": ("OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE", _boolean),
    "capture_certificate_chain": ("OTEL_PYTHON_MTLS_CAPTURE_CERTIFICATE_CHAIN", _boolean),
    "log_success": ("OTEL_PYTHON_MTLS_LOG_SUCCESS", _boolean),
    "log_rate_limit": ("OTEL_PYTHON_MTLS_LOG_RATE_LIMIT", _positive_int),
    "peer_certificate_limit": ("OTEL_PYTHON_MTLS_PEER_CERTIFICATE_LIMIT", _positive_int),
    "expiry_warning_days": ("OTEL_PYTHON_MTLS_EXPIRY_WARNING_DAYS", _positive_float),
    "identity_mode": ("OTEL_PYTHON_MTLS_IDENTITY_MODE", _choice(MODES)),
    "hash_key": ("OTEL_PYTHON_MTLS_HASH_KEY", _hash_key),
    "trusted_proxies": ("OTEL_PYTHON_MTLS_TRUSTED_PROXIES", _networks),
    "proxy_header": ("OTEL_PYTHON_MTLS_PROXY_HEADER", _choice(PROXY_HEADERS)),
    "nginx_cert_header": ("OTEL_PYTHON_MTLS_NGINX_CERT_HEADER", _header_name),
    "allowed_issuers": ("OTEL_PYTHON_MTLS_ALLOWED_ISSUERS", _issuers),
    "spiffe_trust_domains": ("OTEL_PYTHON_MTLS_SPIFFE_TRUST_DOMAINS", _trust_domains),
    "san_patterns": ("OTEL_PYTHON_MTLS_SAN_PATTERNS", _san_patterns),
    "enforce_identity_policy": ("OTEL_PYTHON_MTLS_ENFORCE_IDENTITY_POLICY", _boolean),
    "revocation": ("OTEL_PYTHON_MTLS_REVOCATION", _choice(REVOCATION_MODES)),
    "crl_files": ("OTEL_PYTHON_MTLS_CRL_FILES", _strings),
    "crl_urls": ("OTEL_PYTHON_MTLS_CRL_URLS", _http_urls),
    "revocation_timeout": ("OTEL_PYTHON_MTLS_REVOCATION_TIMEOUT", _positive_float),
}
"""Each option's environment variable and parser (the keyword's parser too)."""


EXCEPTION_SIGNAL_OPT_IN: Final = "OTEL_SEMCONV_EXCEPTION_SIGNAL_OPT_IN"
"""OpenTelemetry's own opt-in (not ours): where exceptions are recorded."""


@dataclass(frozen=True, slots=True)
class ExceptionSignals:
    """Where a failed handshake's exception goes, as the semantic conventions' opt-in says.

    The default is a span ``exception`` event. ``logs`` records it on the failure's log
    record instead (``exception.type`` and ``exception.message`` on
    ``tls.handshake.failed``), as the current conventions recommend; ``logs/dup`` does both.
    """

    span_event: bool = True
    log_record: bool = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> ExceptionSignals:
        """Read the opt-in; any other value keeps the default."""
        values = {v.strip().lower() for v in environ.get(EXCEPTION_SIGNAL_OPT_IN, "").split(",")}
        if "logs/dup" in values:
            return cls(span_event=True, log_record=True)
        if "logs" in values:
            return cls(span_event=False, log_record=True)
        return cls()
