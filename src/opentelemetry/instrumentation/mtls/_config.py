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
from typing import Any, Final, TypeVar

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._redaction import HASHED, MODES, OMIT, Redaction
from opentelemetry.instrumentation.mtls._requests.rules import (
    ISSUER_SEPARATOR,
    LIST_SEPARATOR,
    IdentityRules,
)

_logger = logging.getLogger("opentelemetry.instrumentation.mtls")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REVOCATION_MODES: Final = ("off", "observe", "enforce")
REQUEST_ATTRIBUTES: Final = ("lean", "full")
"""How much of a connection's handshake its request spans carry."""
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


_SPIFFE: Final = "spiffe://"


def _spiffe_ids(value: str | Iterable[str]) -> tuple[str, ...]:
    ids = _strings(value)
    if not all(spiffe_id.lower().startswith(_SPIFFE) for spiffe_id in ids):
        raise ValueError("expected spiffe:// IDs, comma-separated, where * matches anything")
    IdentityRules(san_patterns=_uri_patterns(ids))  # raises ValueError on a malformed one
    return ids


def _uri_patterns(spiffe_ids: tuple[str, ...]) -> tuple[str, ...]:
    """SPIFFE IDs as the identity policy's SAN patterns: a SPIFFE ID is a URI SAN."""
    return tuple(f"URI:{spiffe_id}" for spiffe_id in spiffe_ids)


_PREFIX: Final = "OTEL_PYTHON_MTLS_"
_PARSE: Final = "parse"
_T = TypeVar("_T")


def _option(default: _T, parse: Callable[[Any], _T], *, repr: bool = True) -> _T:
    """Declare an option: its default, and the one parser of its keyword and its variable.

    The variable is ``OTEL_PYTHON_MTLS_`` and the option's name in capitals.
    """
    declared: _T = field(default=default, repr=repr, metadata={_PARSE: parse})
    return declared


@dataclass(frozen=True, slots=True)
class MTLSConfig:
    """What the instrumentation records beyond the defaults, and its bounds."""

    capture_certificate: bool = _option(False, _boolean)
    """Record the peer's PEM leaf as ``tls.*.certificate``."""
    capture_certificate_chain: bool = _option(False, _boolean)
    """Record the peer's PEM chain as ``tls.*.certificate_chain``."""
    capture_ja3: bool = _option(False, _boolean)
    """Record the JA3 fingerprint of each client's ClientHello as ``tls.client.ja3``."""
    log_success: bool = _option(False, _boolean)
    """Write a ``tls.handshake.succeeded`` record for every successful handshake."""
    log_rate_limit: int = _option(5, _positive_int)
    """Security-event records per second per (peer address, ``error.type``)."""
    peer_certificate_limit: int = _option(1000, _positive_int)
    """Distinct peer certificates kept for ``tls.certificate.time_left``."""
    expiry_warning_days: float = _option(30.0, _positive_float)
    """A local certificate this close to expiry gets a ``tls.certificate.expiring`` record;
    a peer's is a ``peer_certificate_expiring`` validation gap."""
    identity_mode: str = _option("plain", _choice(MODES))
    """How peer identities appear in telemetry: ``plain``, ``hashed`` or ``omit``."""
    hash_key: bytes | None = _option(None, _hash_key, repr=False)
    """The HMAC key of ``hashed`` mode; share it across services to correlate identities."""
    trusted_proxies: tuple[IPNetwork, ...] = _option((), _networks)
    """Peers whose client-certificate headers are believed (TLS ends at them)."""
    proxy_header: str = _option("xfcc", _choice(PROXY_HEADERS))
    """The one header format believed from a trusted proxy: xfcc, rfc9440, traefik, nginx."""
    nginx_cert_header: str = _option("ssl-client-cert", _header_name)
    """The request header an nginx in front puts ``$ssl_client_escaped_cert`` in."""
    allowed_issuers: str | None = _option(None, _issuers)
    """Identity policy: issuer DNs (``;``-separated) or CA SHA-256 fingerprints."""
    spiffe_trust_domains: str | None = _option(None, _trust_domains)
    """Identity policy: SPIFFE trust domains a client's ID must be in (comma-separated)."""
    san_patterns: str | None = _option(None, _san_patterns)
    """Identity policy: SAN patterns such as ``DNS:*.internal.example.org`` (comma-separated)."""
    enforce_identity_policy: bool = _option(False, _boolean)
    """Answer 403 to requests the identity policy denies (``MTLSMiddleware`` only)."""
    revocation: str = _option("off", _choice(REVOCATION_MODES))
    """Check client certificates' revocation: ``off``, ``observe`` or ``enforce`` (403)."""
    crl_files: tuple[str, ...] = _option((), _strings)
    """CRL files (PEM or DER) to check client certificates against."""
    crl_urls: tuple[str, ...] = _option((), _http_urls)
    """CRL URLs (http) to check client certificates against."""
    revocation_timeout: float = _option(2.0, _positive_float)
    """Seconds a whole revocation check may take (every download and redirect) before the
    answer is ``unknown``."""
    request_attributes: str = _option("lean", _choice(REQUEST_ATTRIBUTES))
    """What request spans carry of their connection's handshake: ``lean``, the peer's
    identity; ``full``, every peer certificate attribute, the version, cipher, resumption."""
    client_handshake_spans: bool = _option(True, _boolean)
    """Make ``TLS client handshake`` spans; client metrics and logs are made either way."""
    expected_server_spiffe_ids: tuple[str, ...] = _option((), _spiffe_ids)
    """Client identity policy: the SPIFFE IDs servers may have (``*`` matches anything)."""
    expected_server_issuers: str | None = _option(None, _issuers)
    """Client identity policy: servers' issuer DNs (``;``-separated) or CA SHA-256s."""

    def server_identity_rules(self) -> IdentityRules:
        """Return the client side's identity policy: the servers this process expects."""
        issuers = IdentityRules.parse(self.expected_server_issuers, None, None).allowed_issuers
        spiffe_ids = _uri_patterns(self.expected_server_spiffe_ids)
        return IdentityRules(allowed_issuers=issuers, san_patterns=spiffe_ids)

    def identity_rules(self) -> IdentityRules:
        """Return the identity policy's rules; invalid rules warn and are dropped."""
        try:
            return IdentityRules.parse(
                self.allowed_issuers, self.spiffe_trust_domains, self.san_patterns
            )
        except ValueError as exc:
            _logger.warning("the identity policy is invalid (%s); no policy applies", exc)
            return IdentityRules()

    def redaction(self) -> Redaction:
        """Return the identity policy asked for; ``hashed`` without a key omits instead."""
        if self.identity_mode == HASHED and not self.hash_key:
            _logger.warning(
                "identity_mode=hashed (OTEL_PYTHON_MTLS_IDENTITY_MODE) needs hash_key "
                "(OTEL_PYTHON_MTLS_HASH_KEY); omitting identities instead"
            )
            return Redaction(OMIT)
        return Redaction(self.identity_mode, self.hash_key)

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
    option.name: (_PREFIX + option.name.upper(), option.metadata[_PARSE])
    for option in fields(MTLSConfig)
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
