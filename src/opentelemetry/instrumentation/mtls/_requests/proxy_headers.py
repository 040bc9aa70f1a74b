"""Parse the client-certificate headers that TLS-terminating proxies add to requests.

When mTLS ends at a proxy in front of an ASGI app, the app never sees the handshake: the
proxy forwards the client's certificate, or a few fields of it, in a request header.  This
module turns those headers into a :class:`ProxiedIdentity` so the app can record the same
identity it would record from its own handshake.  Supported formats:

* Envoy ``x-forwarded-client-cert`` (XFCC), :func:`parse_xfcc`:
  https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/headers#x-forwarded-client-cert
* RFC 9440 ``Client-Cert`` / ``Client-Cert-Chain`` (Structured Field byte sequences),
  :func:`parse_rfc9440`: https://www.rfc-editor.org/rfc/rfc9440 and
  https://www.rfc-editor.org/rfc/rfc8941#section-3.3.5
* Traefik ``passTLSClientCert`` (``X-Forwarded-Tls-Client-Cert`` and ``-Info``),
  :func:`parse_traefik`:
  https://doc.traefik.io/traefik/middlewares/http/passtlsclientcert/
* nginx ``$ssl_client_escaped_cert`` / ``$ssl_client_cert``, :func:`parse_nginx`:
  https://nginx.org/en/docs/http/ngx_http_ssl_module.html#var_ssl_client_escaped_cert

The request side calls one entry point, :func:`parse_proxy_headers`, with the one format
the trusted proxy is configured to send (:data:`HEADER_NAMES` says which headers each
format uses), then :meth:`ProxiedIdentity.certificate_info` for the identity to record.

Every parser takes the raw header value (``str``, or the ``bytes`` an ASGI scope holds) and
never raises: a malformed value yields an identity whose :attr:`ProxiedIdentity.error`
says why, with every other field empty, so a half-parsed header is never mistaken for an
identity.  What a header may cost is bounded: values over :data:`MAX_HEADER_SIZE` are
refused unread, and so are certificates over :data:`MAX_CERTIFICATE_SIZE` and chains of
more than :data:`MAX_CHAIN_LENGTH` intermediates.  Certificates are only checked to be
DER X.509 *shaped* while parsing; decoding them waits for ``certificate_info()``.  These
headers are only as trustworthy as the proxy that sets them: the app must accept them
solely from it.  The module imports nothing from OpenTelemetry.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeAlias

from opentelemetry.instrumentation.mtls._x509 import (
    PEM_BEGIN,
    PEM_END,
    CertificateEncodingError,
    CertificateInfo,
    bounded_names,
    decode_base64,
    first_spiffe_id,
    parse_forwarded_certificate,
    pem_certificates,
    sha256_hex,
)

__all__ = [
    "DEFAULT_NGINX_HEADER",
    "FORMATS",
    "HEADER_NAMES",
    "MAX_CERTIFICATE_SIZE",
    "MAX_CHAIN_LENGTH",
    "MAX_HEADER_SIZE",
    "ProxiedIdentity",
    "header_names",
    "parse_nginx",
    "parse_proxy_headers",
    "parse_rfc9440",
    "parse_traefik",
    "parse_xfcc",
]

MAX_HEADER_SIZE: Final = 64 * 1024
"""Longest header value parsed, in characters; longer ones get error "header too large"."""
MAX_CERTIFICATE_SIZE: Final = 16 * 1024
"""Largest forwarded certificate, DER bytes; larger ones get error "certificate too large".
Client certificates are 1-3 KiB; this leaves room for many SANs, not for padding."""
MAX_CHAIN_LENGTH: Final = 4
"""Most certificates forwarded after the leaf; more get error "chain too long"."""

FORMATS: Final = ("xfcc", "rfc9440", "traefik", "nginx")
"""The proxy header formats, as ``OTEL_PYTHON_MTLS_PROXY_HEADER`` names them."""
DEFAULT_NGINX_HEADER: Final = b"ssl-client-cert"
"""The header nginx is configured to put the client certificate in, unless told otherwise."""
HEADER_NAMES: Final[Mapping[str, tuple[bytes, ...]]] = MappingProxyType(
    {
        "xfcc": (b"x-forwarded-client-cert",),
        "rfc9440": (b"client-cert", b"client-cert-chain"),
        "traefik": (b"x-forwarded-tls-client-cert", b"x-forwarded-tls-client-cert-info"),
        "nginx": (DEFAULT_NGINX_HEADER,),
    }
)
"""The lowercase request headers each format uses (nginx's is configurable:
:func:`header_names`)."""

_HASH: Final = re.compile(r"[0-9A-Fa-f]{64}")
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 8941 sf-binary (":" base64 ":") with optional, ignored parameters (";key[=value]").
_SF_BINARY: Final = re.compile(
    r":([A-Za-z0-9+/=]*):((?:[ \t]*;[ \t]*[a-z*][a-z0-9_.*-]*(?:=[^;,]*)?)*)"
)
# A double-quoted run (backslash escapes the next character; group 1 is empty when the
# closing quote is missing) or a separator.  Unrolled so that it stays linear on any input.
_QUOTED_OR: Final = {
    separator: re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*("?)|' + separator, re.DOTALL)
    for separator in (",", ";")
}
# tbsCertificate children: [0] version (optional), serial INTEGER, then signature,
# issuer, validity, subject, subjectPublicKeyInfo SEQUENCEs.  Telling a certificate from a
# CSR, CRL or key needs no more than these tags.
_TBS_TAGS: Final = (0x02, 0x30, 0x30, 0x30, 0x30, 0x30)
_SEQUENCE: Final = 0x30
_BIT_STRING: Final = 0x03
_VERSION_TAG: Final = 0xA0

# XFCC keys with one value per element; URI= and DNS= may repeat.
_XFCC_SINGLE_KEYS: Final = frozenset({"by", "hash", "cert", "chain", "subject"})


@dataclass(frozen=True, slots=True)
class ProxiedIdentity:
    """The client identity a proxy forwarded in a header, or why it could not be read."""

    source: str
    """Which header format it came from: "xfcc", "rfc9440", "traefik" or "nginx"."""
    leaf_der: bytes | None = None
    """The client's leaf certificate (DER), when the header carried it."""
    chain_der: tuple[bytes, ...] = ()
    """Certificates after the leaf (intermediates, DER), when the header carried them."""
    subject: str | None = None
    """The leaf's subject as the proxy wrote it, when carried as a field."""
    uris: tuple[str, ...] = ()
    """URI SANs carried as fields (XFCC ``URI=``, Traefik ``SAN=``)."""
    dns: tuple[str, ...] = ()
    """DNS SANs carried as fields (XFCC ``DNS=``, Traefik ``SAN=``)."""
    hash_sha256: str | None = None
    """Uppercase hex SHA-256 of the leaf: the XFCC ``Hash=``, else computed from the leaf."""
    error: str | None = None
    """None when the header parsed; else a short reason such as "bad base64"."""

    def certificate_info(self) -> CertificateInfo | None:
        """Return the identity as the package records it; None if unreadable or absent.

        The forwarded leaf, parsed, when there is one.  Otherwise the fields the proxy
        wrote: Envoy writes ``Hash`` and, as configured, ``Subject``, ``URI`` and ``DNS``
        without the certificate, as Istio's sidecars do, and a SPIFFE ID with its
        fingerprint identifies the client as well as the certificate would.
        """
        if self.error is not None:
            return None
        if self.leaf_der is not None:
            return parse_forwarded_certificate(self.leaf_der)
        return _field_certificate(self)


def _field_certificate(identity: ProxiedIdentity) -> CertificateInfo | None:
    """Return the certificate the proxy described by fields alone; None without any."""
    names = [f"URI:{uri}" for uri in identity.uris] + [f"DNS:{name}" for name in identity.dns]
    if not (names or identity.hash_sha256 or identity.subject):
        return None  # e.g. an XFCC element with only By=: no client identity
    return CertificateInfo(
        sha256=identity.hash_sha256 or "",
        subject=identity.subject,
        alternative_names=bounded_names(names),
        spiffe_id=first_spiffe_id(names),
    )


class _MalformedError(Exception):
    """A header value that cannot be parsed; the argument is the public error reason."""


_Value: TypeAlias = "str | bytes"
_Parser: TypeAlias = "Callable[..., ProxiedIdentity]"


def _text(value: _Value) -> str:
    """Return a header value as text (ASGI header bytes are latin-1), refusing huge ones."""
    if len(value) > MAX_HEADER_SIZE:
        raise _MalformedError("header too large")
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _present(value: _Value | None) -> str | None:
    """Return a header value as stripped text, or None when absent or blank."""
    if value is None:
        return None
    text = _text(value).strip()
    return text or None


def _guarded(source: str, parse: _Parser, *values: _Value | None) -> ProxiedIdentity:
    """Run ``parse`` on ``values``, turning any failure into an identity with ``error`` set."""
    try:
        return parse(*values)
    except (_MalformedError, CertificateEncodingError) as exc:
        return ProxiedIdentity(source, error=str(exc))
    except Exception as exc:  # a parser bug must not break the request it describes
        return ProxiedIdentity(source, error=f"internal error: {type(exc).__name__}")


# --- shared decoders -----------------------------------------------------------------------


def _split_quoted(text: str, separator: str) -> list[str]:
    r"""Split ``text`` at ``separator`` outside double-quoted runs (``\"`` stays quoted)."""
    if '"' not in text:
        return text.split(separator)
    parts: list[str] = []
    start = 0
    for match in _QUOTED_OR[separator].finditer(text):
        if match.group(0) == separator:
            parts.append(text[start : match.start()])
            start = match.end()
        elif not match.group(1):
            raise _MalformedError("unbalanced quotes")
    parts.append(text[start:])
    return parts


def _unquote_value(raw: str, malformed: str) -> str:
    r"""Return a ``key=value`` value without its surrounding quotes and ``\"`` escapes."""
    raw = raw.strip()
    if raw.startswith('"'):
        inner = raw[1:-1]
        if len(raw) < 2 or not raw.endswith('"') or '"' in inner.replace('\\"', ""):
            raise _MalformedError(malformed)
        return inner.replace('\\"', '"')
    if '"' in raw:
        raise _MalformedError(malformed)
    return raw


def _pairs(element: str, malformed: str) -> list[tuple[str, str]]:
    """Split a ``;``-separated list of ``key=value`` pairs; keys lowercased, blanks skipped."""
    pairs: list[tuple[str, str]] = []
    for pair in _split_quoted(element, ";"):
        if not pair.strip():
            continue
        key, equals, raw = pair.partition("=")
        key = key.strip().lower()
        if not equals or not key or '"' in key:
            raise _MalformedError(malformed)
        pairs.append((key, _unquote_value(raw, malformed)))
    return pairs


def _url_unescape(text: str, *, plus_is_space: bool = False) -> bytes:
    """Undo %XX escapes (and ``+`` for space in query escaping); reject stray ``%``."""
    if _BAD_ESCAPE.search(text):
        raise _MalformedError("bad url escape")
    if plus_is_space:
        text = text.replace("+", " ")
    return urllib.parse.unquote_to_bytes(text)


def _der_element(data: bytes, offset: int, limit: int) -> tuple[int, int, int]:
    """Return the tag, content start and content end of the DER element at ``offset``."""
    if offset + 2 > limit:
        raise _MalformedError("not a certificate")
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or start + count > limit:
            raise _MalformedError("not a certificate")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > limit:
        raise _MalformedError("not a certificate")
    return tag, start, start + length


def _child_tags(data: bytes, start: int, end: int, most: int) -> list[int]:
    """Return the tags of up to ``most`` consecutive DER elements in ``data[start:end]``."""
    tags: list[int] = []
    offset = start
    while offset < end and len(tags) < most:
        tag, _, offset = _der_element(data, offset, end)
        tags.append(tag)
    return tags


def _certificate(der: bytes) -> bytes:
    """Return ``der`` if it is shaped like a DER X.509 certificate and not too large; else error."""
    if len(der) > MAX_CERTIFICATE_SIZE:
        raise _MalformedError("certificate too large")
    tag, start, end = _der_element(der, 0, len(der))
    if tag != _SEQUENCE or end != len(der):
        raise _MalformedError("not a certificate")
    if _child_tags(der, start, end, 4) != [_SEQUENCE, _SEQUENCE, _BIT_STRING]:
        raise _MalformedError("not a certificate")
    _, tbs_start, tbs_end = _der_element(der, start, end)
    tags = _child_tags(der, tbs_start, tbs_end, len(_TBS_TAGS) + 1)
    if tags[:1] == [_VERSION_TAG]:
        tags = tags[1:]
    if tuple(tags[: len(_TBS_TAGS)]) != _TBS_TAGS:
        raise _MalformedError("not a certificate")
    return der


def _pem(pem: bytes) -> list[bytes]:
    """Return every certificate in PEM text, each checked to be one."""
    return [_certificate(der) for der in pem_certificates(pem)]


def _intermediates(ders: Sequence[bytes]) -> tuple[bytes, ...]:
    """Return the certificates after the leaf, refusing more than :data:`MAX_CHAIN_LENGTH`."""
    if len(ders) > MAX_CHAIN_LENGTH:
        raise _MalformedError("chain too long")
    return tuple(ders)


def _leaf_hash(leaf: bytes | None) -> str | None:
    """Return the leaf's SHA-256 as :attr:`ProxiedIdentity.hash_sha256` has it, if a leaf."""
    return sha256_hex(leaf) if leaf is not None else None


def _classify_sans(names: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split untyped SAN strings into URIs and DNS names; IPs and emails are dropped."""
    uris: list[str] = []
    dns: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            continue
        if ":" in name:  # DNS names and emails have no scheme; IPv6 was handled above
            uris.append(name)
        elif "@" not in name:
            dns.append(name)
    return tuple(uris), tuple(dns)


# --- Envoy XFCC ----------------------------------------------------------------------------


@dataclass(slots=True)
class _XfccElement:
    """The keys of one XFCC element: the single-valued ones, then the URI and DNS SANs."""

    single: dict[str, str] = field(default_factory=dict)
    uris: list[str] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)

    def add(self, key: str, value: str) -> bool:
        """Record one ``key=value`` pair; return whether ``key`` is an XFCC key."""
        if key in ("uri", "dns"):
            if value:  # Envoy writes a bare "URI=" when the certificate has no URI SAN
                (self.uris if key == "uri" else self.dns).append(value)
            return True
        if key not in _XFCC_SINGLE_KEYS:
            return False  # a key this parser does not know (a newer Envoy's): ignored
        if key in self.single:
            raise _MalformedError("duplicate xfcc key")
        self.single[key] = value
        return True


def _xfcc_element(text: str) -> _XfccElement:
    """Parse one XFCC element; it must hold at least one XFCC key (``By=`` is enough)."""
    element = _XfccElement()
    # A list, not any(): every pair must be recorded, and a duplicate key refused.
    known = [element.add(key, value) for key, value in _pairs(text, "malformed xfcc element")]
    if not any(known):
        raise _MalformedError("malformed xfcc element")
    return element


def _xfcc_certificates(
    cert: str | None, chain: str | None
) -> tuple[bytes | None, tuple[bytes, ...]]:
    """Return the leaf and the intermediates of XFCC's ``Cert=`` and ``Chain=`` values."""
    # Envoy URL-encodes PEM with %XX only ("+" stays %2B), so no plus-as-space here.
    certs = _pem(_url_unescape(cert)) if cert else []
    chained = _pem(_url_unescape(chain)) if chain else []
    leaf = certs[0] if certs else next(iter(chained), None)
    # Envoy's Chain= is the whole chain *including* the leaf (its docs say so).
    if chained and chained[0] == leaf:
        chained = chained[1:]
    return leaf, _intermediates(chained or certs[1:])


def _xfcc_hash(digest: str | None, leaf: bytes | None) -> str | None:
    """Return XFCC's ``Hash=``, checked against the forwarded leaf; else the leaf's own."""
    if not digest:
        return _leaf_hash(leaf)
    if not _HASH.fullmatch(digest):
        raise _MalformedError("bad hash")
    # Envoy writes lowercase hex; we keep CertificateInfo's uppercase everywhere.
    digest = digest.upper()
    if leaf is not None and digest != sha256_hex(leaf):
        raise _MalformedError("hash does not match cert")
    return digest


def _xfcc(value: _Value | None) -> ProxiedIdentity:
    """Parse an XFCC header; see :func:`parse_xfcc`."""
    text = _present(value)
    if text is None:
        raise _MalformedError("empty header")
    # One element per hop, appended in order: the last one was added by the proxy next to
    # us and describes the peer of *its* handshake.  Earlier elements were forwarded from
    # further away and are only as trustworthy as every hop before, so they are skipped
    # (though they must still split cleanly: quotes are balanced across the whole value).
    element = _xfcc_element(_split_quoted(text, ",")[-1])
    single = element.single
    leaf, chain = _xfcc_certificates(single.get("cert"), single.get("chain"))
    return ProxiedIdentity(
        "xfcc",
        leaf_der=leaf,
        chain_der=chain,
        subject=single.get("subject") or None,  # Istio writes Subject="" (SPIFFE-only SVIDs)
        uris=tuple(element.uris),
        dns=tuple(element.dns),
        hash_sha256=_xfcc_hash(single.get("hash"), leaf),
    )


def parse_xfcc(value: str | bytes) -> ProxiedIdentity:
    """Parse Envoy's ``x-forwarded-client-cert``, using its last (nearest-hop) element."""
    return _guarded("xfcc", _xfcc, value)


# --- RFC 9440 ------------------------------------------------------------------------------


def _byte_sequence(member: str) -> bytes:
    """Decode one RFC 8941 sf-binary (``:base64:``, parameters ignored) into a certificate."""
    match = _SF_BINARY.fullmatch(member.strip(" \t"))
    if match is None:
        raise _MalformedError("malformed byte sequence")
    return _certificate(decode_base64(match.group(1).encode("ascii")))


def _rfc9440(cert: _Value | None, chain: _Value | None) -> ProxiedIdentity:
    """Parse RFC 9440 headers; see :func:`parse_rfc9440`."""
    text = _present(cert)
    if text is None:
        raise _MalformedError("empty header")
    leaf = _byte_sequence(text)
    chain_text = _present(chain)
    # An empty Client-Cert-Chain is an empty sf-list, the same as an absent header.
    members = chain_text.split(",") if chain_text is not None else []
    intermediates = _intermediates([_byte_sequence(member) for member in members])
    return ProxiedIdentity(
        "rfc9440", leaf_der=leaf, chain_der=intermediates, hash_sha256=sha256_hex(leaf)
    )


def parse_rfc9440(cert: str | bytes, chain: str | bytes | None = None) -> ProxiedIdentity:
    """Parse RFC 9440 ``Client-Cert`` and, if present, ``Client-Cert-Chain``."""
    return _guarded("rfc9440", _rfc9440, cert, chain)


# --- Traefik -------------------------------------------------------------------------------


def _traefik_certificates(text: str) -> list[bytes]:
    """Decode Traefik's comma-separated, BEGIN/END-less PEM bodies (URL-escaped or not)."""
    ders: list[bytes] = []
    for piece in text.split(","):
        # Traefik v2 URL-escapes the body, v3 sends it bare: unescaping covers both,
        # since a bare base64 body has no "%" and "+" is not taken for a space.
        body = _url_unescape(piece.strip())
        body = body.replace(PEM_BEGIN, b"").replace(PEM_END, b"")
        ders.append(_certificate(decode_base64(body)))
    return ders


def _traefik_info(text: str) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """Return the leaf's subject, URI SANs and DNS SANs from Traefik's ``-Info`` header."""
    subject: str | None = None
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    # Go's url.QueryEscape of the whole value: "+" is a space.  Certificates are
    # separated by "," and every field value is double-quoted, so a quote-aware split
    # keeps the subject's and SAN's own commas; the first group is the leaf.
    decoded = _url_unescape(text, plus_is_space=True).decode("utf-8", "replace")
    for key, item in _pairs(_split_quoted(decoded, ",")[0], "malformed traefik info"):
        if key == "subject":
            subject = item or None
        elif key == "san":
            # SAN is DNS names, emails, IPs then URIs joined by ","; a URI SAN that
            # itself contains "," is split apart - Traefik's format cannot say otherwise.
            uris, dns = _classify_sans(item.split(","))
    return subject, uris, dns


def _traefik(pem: _Value | None, info: _Value | None) -> ProxiedIdentity:
    """Parse Traefik headers; see :func:`parse_traefik`."""
    pem_text, info_text = _present(pem), _present(info)
    if pem_text is None and info_text is None:
        raise _MalformedError("empty header")
    ders = _traefik_certificates(pem_text) if pem_text is not None else []
    subject, uris, dns = _traefik_info(info_text) if info_text is not None else (None, (), ())
    leaf = ders[0] if ders else None
    return ProxiedIdentity(
        "traefik",
        leaf_der=leaf,
        chain_der=_intermediates(ders[1:]),
        subject=subject,
        uris=uris,
        dns=dns,
        hash_sha256=_leaf_hash(leaf),
    )


def parse_traefik(pem: str | bytes | None, info: str | bytes | None) -> ProxiedIdentity:
    """Parse Traefik's ``X-Forwarded-Tls-Client-Cert`` and ``-Info`` (either may be None)."""
    return _guarded("traefik", _traefik, pem, info)


# --- nginx ---------------------------------------------------------------------------------


def _nginx(value: _Value | None) -> ProxiedIdentity:
    """Parse an nginx client-certificate header; see :func:`parse_nginx`."""
    text = _present(value)
    if text is None:
        raise _MalformedError("empty header")
    # $ssl_client_escaped_cert is %XX-escaped ("+" is %2B); $ssl_client_cert is plain PEM
    # with a tab before each continuation line (an ASGI server may have folded those into
    # spaces), which contains no "%" and so passes through unchanged.
    ders = _pem(_url_unescape(text))
    return ProxiedIdentity(
        "nginx",
        leaf_der=ders[0],
        chain_der=_intermediates(ders[1:]),
        hash_sha256=sha256_hex(ders[0]),
    )


def parse_nginx(value: str | bytes) -> ProxiedIdentity:
    """Parse nginx's ``$ssl_client_escaped_cert`` or tab-continued ``$ssl_client_cert``."""
    return _guarded("nginx", _nginx, value)


# --- the entry point -----------------------------------------------------------------------

_PARSERS: Final[Mapping[str, _Parser]] = {
    "xfcc": parse_xfcc,
    "rfc9440": parse_rfc9440,
    "traefik": parse_traefik,
    "nginx": parse_nginx,
}


def header_names(format: str, nginx_header: bytes = DEFAULT_NGINX_HEADER) -> tuple[bytes, ...]:
    """Return the lowercase request headers that carry ``format`` (none for an unknown one)."""
    if format == "nginx":
        return (nginx_header.lower(),)
    return HEADER_NAMES.get(format, ())


def parse_proxy_headers(
    format: str, headers: Mapping[bytes, bytes], nginx_header: bytes = DEFAULT_NGINX_HEADER
) -> ProxiedIdentity | None:
    """Parse ``format``'s headers among ``headers`` (lowercase names); None if none is there.

    Only the configured format is read: a proxy sets, and strips, its own headers, so
    another format's may have come from the client through it.  Never raises.
    """
    values = [headers.get(name) for name in header_names(format, nginx_header)]
    if all(value is None for value in values):
        return None
    return _PARSERS[format](*values)
