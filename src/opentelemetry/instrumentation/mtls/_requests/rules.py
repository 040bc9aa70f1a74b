r"""Decide whether a client identity is expected at this service, from its parsed certificate.

A service states which clients it expects with :class:`IdentityRules`: issuing CAs, SPIFFE
trust domains and subjectAltName patterns.  :func:`decide` checks a client's
:class:`~opentelemetry.instrumentation.mtls._x509.CertificateInfo` (and, when known,
the SHA-256 of the CA certificate that issued it) against them and returns a
:class:`Decision` that says which rule decided and why, in one line fit for logs.  The module
imports nothing from OpenTelemetry: it only compares strings.

Semantics
---------
* No rules at all: allowed, rule ``no_policy``.
* Rules but no client certificate: denied, rule ``no_certificate``.
* Otherwise every configured kind of rule must pass (AND across kinds); within one kind any
  entry of its list may match (OR).  Kinds are checked in this order and the first one that
  fails decides, named by its rule: ``issuer``, then ``spiffe_trust_domain``, then
  ``san_pattern``.  When all pass, the rule is the last kind checked.
* ``issuer``: an entry is either an RFC 4514 DN, compared with the certificate's issuer, or
  the SHA-256 fingerprint of the issuing CA certificate (hex, any case, colons allowed),
  compared with ``issuer_sha256``.  An entry containing ``=`` is a DN.  DNs are compared
  normalised: attribute types case-insensitively (``commonName``, ``cn`` and ``2.5.4.3`` are
  one type), whitespace around ``,``, ``+`` and ``=`` ignored, escapes (``\,``, ``\2C``)
  decoded, attributes of a multi-valued RDN in any order; values and RDN order are exact.
  An unknown issuer or fingerprint matches nothing.
* ``spiffe_trust_domain``: the certificate's SPIFFE ID must be ``spiffe://<domain>/...`` with
  ``<domain>`` one of the entries, exactly and case-insensitively.  A certificate without a
  SPIFFE ID, with more than one, or with a malformed one (userinfo, port, query, fragment,
  percent-encoding, empty or ``.``/``..`` path segments, characters the SPIFFE ID
  specification forbids) is denied.  Entries may be given as ``example.org`` or
  ``spiffe://example.org``.
* ``san_pattern``: passes when any SAN matches any pattern.  A pattern is ``KIND:glob`` with
  the parser's kinds (``DNS``, ``URI``, ``IP``, ``email``, ``DirName``, ``RID``,
  ``othername``; the kind is case-insensitive) and an :mod:`fnmatch` glob over the value.
  ``*`` matches any characters, ``.`` and ``/`` included, so ``DNS:*.example.org`` also
  matches ``a.b.example.org``.  DNS values compare case-insensitively, others exactly.

Decisions are a pure function of their inputs, so callers may cache them (for instance by
certificate fingerprint).  Reasons name only CA-level values (issuer DN, CA fingerprint,
trust domain) and configured patterns, never the client's subject, SANs or SPIFFE path, so
they are safe to log whatever the identity mode.  Pass the parser's ``CertificateInfo``,
not one whose identities :class:`Redaction` has hashed: hashes match no rule.

Invalid rules (an unparsable DN, a fingerprint that is not 64 hex digits, a malformed trust
domain, a pattern without a known kind) raise :class:`ValueError` when the rules are built,
so a configuration error surfaces at start-up rather than as denials.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from opentelemetry.instrumentation.mtls._x509 import CertificateInfo

__all__ = [
    "RULE_ISSUER",
    "RULE_NO_CERTIFICATE",
    "RULE_NO_POLICY",
    "RULE_SAN_PATTERN",
    "RULE_SPIFFE_TRUST_DOMAIN",
    "Decision",
    "IdentityRules",
    "decide",
]

RULE_NO_POLICY: Final = "no_policy"
RULE_NO_CERTIFICATE: Final = "no_certificate"
RULE_ISSUER: Final = "issuer"
RULE_SPIFFE_TRUST_DOMAIN: Final = "spiffe_trust_domain"
RULE_SAN_PATTERN: Final = "san_pattern"

ISSUER_SEPARATOR: Final = ";"
"""Separates DNs in :meth:`IdentityRules.parse`'s issuer list, since a DN contains commas."""
LIST_SEPARATOR: Final = ","
"""Separates trust domains and SAN patterns in :meth:`IdentityRules.parse`."""

_SPIFFE_SCHEME: Final = "spiffe://"
_SPIFFE_SAN: Final = "URI:" + _SPIFFE_SCHEME
_SPIFFE_MAX_LENGTH: Final = 2048
_TRUST_DOMAIN_MAX_LENGTH: Final = 255
_TRUST_DOMAIN: Final = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT: Final = re.compile(r"[A-Za-z0-9._-]+")
_FINGERPRINT: Final = re.compile(r"[0-9A-F]{64}")
_ATTRIBUTE_TYPE: Final = re.compile(r"[a-z][a-z0-9-]*|[0-9]+(?:\.[0-9]+)+")
_HEX: Final = frozenset("0123456789abcdefABCDEF")

# Long names and OIDs of the attribute types, mapped to the form cryptography's
# rfc4514_string() writes (lowercased), so that any spelling of a type compares equal.
_TYPE_ALIASES: Final[dict[str, str]] = {
    "commonname": "cn",
    "2.5.4.3": "cn",
    "localityname": "l",
    "2.5.4.7": "l",
    "stateorprovincename": "st",
    "2.5.4.8": "st",
    "organizationname": "o",
    "2.5.4.10": "o",
    "organizationalunitname": "ou",
    "2.5.4.11": "ou",
    "countryname": "c",
    "2.5.4.6": "c",
    "streetaddress": "street",
    "2.5.4.9": "street",
    "domaincomponent": "dc",
    "0.9.2342.19200300.100.1.25": "dc",
    "userid": "uid",
    "0.9.2342.19200300.100.1.1": "uid",
    "emailaddress": "1.2.840.113549.1.9.1",
    "serialnumber": "2.5.4.5",
}

# SAN kinds as the certificate parser labels them, by their lowercased spelling.
_SAN_KINDS: Final[dict[str, str]] = {
    kind.lower(): kind for kind in ("DNS", "URI", "IP", "email", "DirName", "RID", "othername")
}

# One attribute: (type, value is a "#" hex BER encoding, value).
_Attribute = tuple[str, bool, str]
_DistinguishedName = tuple[tuple[_Attribute, ...], ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a client identity is expected, the rule that decided, and a one-line reason."""

    allowed: bool
    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """The client identities a service expects; empty tuples mean "no rule of that kind".

    Construction validates every entry and raises :class:`ValueError` on a malformed one.
    """

    allowed_issuers: tuple[str, ...] = ()
    """RFC 4514 DNs of issuers, or SHA-256 fingerprints of issuing CA certificates."""
    spiffe_trust_domains: tuple[str, ...] = ()
    """Trust domains (``example.org``) the client's SPIFFE ID must belong to."""
    san_patterns: tuple[str, ...] = ()
    """``KIND:glob`` patterns, e.g. ``DNS:*.internal.example.org``; one SAN must match."""

    def __post_init__(self) -> None:
        _compile(self)  # validate now, so a bad rule fails at configuration time

    @classmethod
    def parse(
        cls,
        allowed_issuers: str | None,
        spiffe_trust_domains: str | None,
        san_patterns: str | None,
    ) -> IdentityRules:
        r"""Build rules from environment-style lists; blank items are skipped.

        Issuers are separated by ``;`` because a DN contains commas (a ``;`` inside a DN
        is escaped as ``\;``, as RFC 4514 writes it); trust domains and SAN patterns are
        separated by ``,``, so a SAN pattern cannot contain a comma.
        """
        return cls(
            allowed_issuers=_split(allowed_issuers, ISSUER_SEPARATOR),
            spiffe_trust_domains=_split(spiffe_trust_domains, LIST_SEPARATOR),
            san_patterns=_split(san_patterns, LIST_SEPARATOR),
        )

    @property
    def empty(self) -> bool:
        """Whether no rule is configured, so that every client is allowed."""
        return not (self.allowed_issuers or self.spiffe_trust_domains or self.san_patterns)


@dataclass(frozen=True, slots=True)
class _CompiledRules:
    """Rules in the normalised form they are compared in."""

    issuer_names: frozenset[_DistinguishedName]
    issuer_fingerprints: frozenset[str]
    trust_domains: frozenset[str]
    san_patterns: tuple[tuple[str, str, re.Pattern[str]], ...]  # (kind, pattern, value glob)


def decide(
    rules: IdentityRules,
    certificate: CertificateInfo | None,
    issuer_sha256: str | None = None,
) -> Decision:
    """Decide whether the client holding ``certificate`` is expected under ``rules``.

    ``issuer_sha256`` is the fingerprint of the CA certificate that issued ``certificate``,
    when the caller knows it; fingerprint rules match nothing without it.
    """
    if rules.empty:
        return Decision(True, RULE_NO_POLICY, "no client identity rules are configured")
    if certificate is None:
        return Decision(False, RULE_NO_CERTIFICATE, "the client presented no certificate")
    compiled = _compile(rules)
    checks: tuple[tuple[bool, str, Callable[[], tuple[bool, str]]], ...] = (
        (
            bool(rules.allowed_issuers),
            RULE_ISSUER,
            lambda: _check_issuer(compiled, certificate, issuer_sha256),
        ),
        (
            bool(rules.spiffe_trust_domains),
            RULE_SPIFFE_TRUST_DOMAIN,
            lambda: _check_trust_domain(compiled, certificate),
        ),
        (bool(rules.san_patterns), RULE_SAN_PATTERN, lambda: _check_san(compiled, certificate)),
    )
    passed: list[str] = []
    rule = RULE_NO_POLICY
    for configured, kind, check in checks:
        if not configured:
            continue
        rule = kind
        allowed, reason = check()
        if not allowed:
            return Decision(False, rule, reason)
        passed.append(reason)
    return Decision(True, rule, "; ".join(passed))


def _check_issuer(
    compiled: _CompiledRules, certificate: CertificateInfo, issuer_sha256: str | None
) -> tuple[bool, str]:
    """Match the issuer DN or the issuing CA's fingerprint against the allowed issuers."""
    issuer = certificate.issuer
    if compiled.issuer_names and issuer is not None:
        name = _issuer_name(issuer)
        if name is not None and name in compiled.issuer_names:
            return True, f"issuer {issuer} is allowed"
    fingerprint = _clean_fingerprint(issuer_sha256) if issuer_sha256 is not None else None
    if fingerprint is not None and fingerprint in compiled.issuer_fingerprints:
        return True, f"issuer CA SHA-256 {fingerprint} is allowed"
    reason = f"issuer {issuer if issuer is not None else '(unreadable)'} is not allowed"
    if compiled.issuer_fingerprints:
        reason += f" (CA SHA-256 {fingerprint or 'unknown'})"
    return False, reason


def _check_trust_domain(compiled: _CompiledRules, certificate: CertificateInfo) -> tuple[bool, str]:
    """Match the SPIFFE ID's trust domain against the allowed ones."""
    if certificate.spiffe_id is None:
        return False, "the client certificate has no SPIFFE ID"
    if sum(name.startswith(_SPIFFE_SAN) for name in certificate.alternative_names) > 1:
        return False, "the client certificate has more than one SPIFFE ID"
    trust_domain, problem = _spiffe_trust_domain(certificate.spiffe_id)
    if trust_domain is None:
        return False, f"the client's SPIFFE ID is malformed ({problem})"
    if trust_domain not in compiled.trust_domains:
        return False, f"SPIFFE trust domain {trust_domain} is not allowed"
    return True, f"SPIFFE trust domain {trust_domain} is allowed"


def _check_san(compiled: _CompiledRules, certificate: CertificateInfo) -> tuple[bool, str]:
    """Pass when any subjectAltName matches any pattern."""
    names = certificate.alternative_names
    for entry in names:
        kind, separator, value = entry.partition(":")
        if not separator:
            continue
        if kind == "DNS":
            value = value.lower()
        for pattern_kind, pattern, glob in compiled.san_patterns:
            if kind == pattern_kind and glob.fullmatch(value):
                return True, f"a SAN matches {pattern}"
    if not names:
        return False, "the client certificate has no subject alternative names"
    count = f"{len(names)} SAN" + ("" if len(names) == 1 else "s")
    return False, f"none of the client certificate's {count} matches an allowed pattern"


@functools.lru_cache(maxsize=64)
def _compile(rules: IdentityRules) -> _CompiledRules:
    """Validate and normalise ``rules``; cached because rules rarely change."""
    names: set[_DistinguishedName] = set()
    fingerprints: set[str] = set()
    for entry in rules.allowed_issuers:
        if "=" in entry:
            names.add(_parse_dn(entry))
            continue
        fingerprint = _clean_fingerprint(entry)
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(f"issuer {entry!r} is neither a DN nor a SHA-256 fingerprint")
        fingerprints.add(fingerprint)
    return _CompiledRules(
        issuer_names=frozenset(names),
        issuer_fingerprints=frozenset(fingerprints),
        trust_domains=frozenset(_trust_domain_rule(d) for d in rules.spiffe_trust_domains),
        san_patterns=tuple(_san_pattern(p) for p in rules.san_patterns),
    )


def _split(raw: str | None, separator: str) -> tuple[str, ...]:
    """Split an environment-style list on unescaped ``separator``; strip and drop blanks."""
    if raw is None:
        return ()
    return tuple(item.strip() for item in _split_unescaped(raw, separator) if item.strip())


def _split_unescaped(text: str, separator: str, maxsplit: int = -1) -> list[str]:
    """Split ``text`` on ``separator`` characters not escaped by a backslash."""
    pieces: list[str] = []
    start = index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == separator and maxsplit != 0:
            pieces.append(text[start:index])
            start = index + 1
            maxsplit -= 1
        index += 1
    pieces.append(text[start:])
    return pieces


def _clean_fingerprint(text: str) -> str:
    """Return a fingerprint as uppercase hex without colons or whitespace."""
    return "".join(text.split()).replace(":", "").upper()


def _trust_domain_rule(entry: str) -> str:
    """Normalise a configured trust domain (``example.org`` or ``spiffe://example.org``)."""
    domain = entry.strip().lower()
    if domain.startswith(_SPIFFE_SCHEME):
        domain = domain[len(_SPIFFE_SCHEME) :].removesuffix("/")
    if not _TRUST_DOMAIN.fullmatch(domain) or len(domain) > _TRUST_DOMAIN_MAX_LENGTH:
        raise ValueError(f"{entry!r} is not a SPIFFE trust domain")
    return domain


def _san_pattern(entry: str) -> tuple[str, str, re.Pattern[str]]:
    """Split a ``KIND:glob`` pattern into the parser's kind label and a compiled glob."""
    kind, separator, glob = entry.strip().partition(":")
    canonical = _SAN_KINDS.get(kind.strip().lower())
    if not separator or canonical is None or not glob:
        kinds = ", ".join(_SAN_KINDS.values())
        raise ValueError(f"SAN pattern {entry!r} is not KIND:pattern with KIND one of {kinds}")
    if canonical == "DNS":
        glob = glob.lower()
    return canonical, f"{canonical}:{glob}", re.compile(fnmatch.translate(glob))


def _spiffe_trust_domain(spiffe_id: str) -> tuple[str | None, str]:
    """Return a SPIFFE ID's lowercased trust domain, or None and what is malformed."""
    if not spiffe_id.startswith(_SPIFFE_SCHEME):
        return None, "not a spiffe:// URI"
    if len(spiffe_id.encode("utf-8")) > _SPIFFE_MAX_LENGTH:
        return None, f"longer than {_SPIFFE_MAX_LENGTH} bytes"
    rest = spiffe_id[len(_SPIFFE_SCHEME) :]
    for char, problem in (("?", "query"), ("#", "fragment"), ("%", "percent-encoding")):
        if char in rest:
            return None, f"has a {problem}"
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        return None, "has userinfo"
    if ":" in authority:
        return None, "has a port"
    domain = authority.lower()
    if not domain:
        return None, "has no trust domain"
    if not _TRUST_DOMAIN.fullmatch(domain) or len(domain) > _TRUST_DOMAIN_MAX_LENGTH:
        return None, "invalid trust domain"
    if slash:
        for segment in path.split("/"):
            if not segment or segment in (".", ".."):
                return None, "empty, '.' or '..' path segment"
            if not _PATH_SEGMENT.fullmatch(segment):
                return None, "invalid path character"
    return domain, ""


@functools.lru_cache(maxsize=256)
def _issuer_name(text: str) -> _DistinguishedName | None:
    """Return the normalised form of a certificate's issuer DN, or None if unparsable."""
    try:
        return _parse_dn(text)
    except ValueError:
        return None


def _parse_dn(text: str) -> _DistinguishedName:
    """Parse an RFC 4514 DN into a comparable tuple of RDNs; raise ValueError if malformed."""
    rdns: list[tuple[_Attribute, ...]] = []
    for rdn in _split_unescaped(text, ","):
        attributes = [_parse_attribute(ava, text) for ava in _split_unescaped(rdn, "+")]
        rdns.append(tuple(sorted(attributes)))
    return tuple(rdns)


def _parse_attribute(ava: str, dn: str) -> _Attribute:
    """Parse one ``type=value`` of a DN into (canonical type, is hex, unescaped value)."""
    pieces = _split_unescaped(ava, "=", maxsplit=1)
    if len(pieces) != 2:
        raise ValueError(f"DN {dn!r} has an attribute without '=': {ava.strip()!r}")
    raw_type, raw_value = pieces
    attribute_type = raw_type.strip().lower()
    if not _ATTRIBUTE_TYPE.fullmatch(attribute_type):
        raise ValueError(f"DN {dn!r} has an invalid attribute type {raw_type.strip()!r}")
    attribute_type = _TYPE_ALIASES.get(attribute_type, attribute_type)
    value = _strip_value(raw_value)
    if value.startswith("#"):
        return attribute_type, True, value[1:].lower()
    return attribute_type, False, _unescape(value, dn)


def _strip_value(raw: str) -> str:
    r"""Strip whitespace around a raw value, keeping an escaped trailing space (``\ ``)."""
    value = raw.strip()
    backslashes = len(value) - len(value.rstrip("\\"))
    if backslashes % 2:  # the last character stripped was escaped: put it back
        start = len(raw) - len(raw.lstrip())
        value = raw[start : start + len(value) + 1]
    return value


def _unescape(value: str, dn: str) -> str:
    r"""Decode RFC 4514 escapes: ``\`` with a special character, or with two hex digits."""
    if "\\" not in value:
        return value
    decoded = bytearray()
    index = 0
    while index < len(value):
        char = value[index]
        if char != "\\":
            decoded += char.encode("utf-8")
            index += 1
            continue
        pair = value[index + 1 : index + 3]
        if len(pair) == 2 and set(pair) <= _HEX:
            decoded.append(int(pair, 16))
            index += 3
        elif pair:
            decoded += pair[0].encode("utf-8")
            index += 2
        else:
            raise ValueError(f"DN {dn!r} ends with a lone backslash")
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"DN {dn!r} has escapes that are not UTF-8") from None
