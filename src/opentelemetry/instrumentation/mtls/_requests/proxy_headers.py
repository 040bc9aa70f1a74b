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

Every parser takes the raw header value (``str``, or the ``bytes`` an ASGI scope holds) and
never raises: a malformed value yields an identity whose :attr:`ProxiedIdentity.error`
says why, with every other field empty, so a half-parsed header is never mistaken for an
identity.  Values over :data:`MAX_HEADER_SIZE` are refused unread.  Certificates are only
checked to be DER X.509 *shaped* here (stdlib only, no warnings machinery on the request
path); decoding them is :func:`._certificate.parse_certificate`'s job.  These headers are
only as trustworthy as the proxy that sets them: the app must accept them solely from it.
The module imports nothing from OpenTelemetry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "MAX_HEADER_SIZE",
    "ProxiedIdentity",
    "parse_nginx",
    "parse_rfc9440",
    "parse_traefik",
    "parse_xfcc",
]

MAX_HEADER_SIZE: Final = 64 * 1024
"""Longest header value parsed, in characters; longer ones get error "header too large"."""

_PEM_BEGIN: Final = b"-----BEGIN CERTIFICATE-----"
_PEM_END: Final = b"-----END CERTIFICATE-----"
_HASH: Final = re.compile(r"[0-9A-Fa-f]{64}")
_BASE64: Final = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
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

_XFCC_SINGLE_KEYS: Final = frozenset({"by", "hash", "cert", "chain", "subject"})
_XFCC_KEYS: Final = _XFCC_SINGLE_KEYS | {"uri", "dns"}


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
    except _MalformedError as exc:
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


def _base64(data: bytes) -> bytes:
    """Decode standard base64, ignoring whitespace and tolerating missing ``=`` padding."""
    compact = b"".join(data.split())
    if not compact or not _BASE64.fullmatch(compact):
        raise _MalformedError("bad base64")
    try:
        return base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
    except binascii.Error:
        raise _MalformedError("bad base64") from None


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
    """Return ``der`` if it is shaped like a DER X.509 certificate; else error."""
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


def _pem_certificates(pem: bytes) -> list[bytes]:
    """Return the DER of every CERTIFICATE block in PEM text (whitespace anywhere inside)."""
    ders: list[bytes] = []
    position = 0
    while (start := pem.find(_PEM_BEGIN, position)) >= 0:
        end = pem.find(_PEM_END, start)
        if end < 0:
            raise _MalformedError("malformed pem")
        ders.append(_certificate(_base64(pem[start + len(_PEM_BEGIN) : end])))
        position = end + len(_PEM_END)
    if not ders:
        raise _MalformedError("not a certificate" if b"-----BEGIN" in pem else "no certificate")
    return ders


def _sha256(der: bytes) -> str:
    """Return the uppercase hex SHA-256 of ``der``, as CertificateInfo.sha256 has it."""
    return hashlib.sha256(der).hexdigest().upper()


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


def _xfcc(value: _Value | None) -> ProxiedIdentity:
    """Parse an XFCC header; see :func:`parse_xfcc`."""
    text = _present(value)
    if text is None:
        raise _MalformedError("empty header")
    # One element per hop, appended in order: the last one was added by the proxy next to
    # us and describes the peer of *its* handshake.  Earlier elements were forwarded from
    # further away and are only as trustworthy as every hop before, so they are skipped
    # (though they must still split cleanly: quotes are balanced across the whole value).
    element = _split_quoted(text, ",")[-1]
    single: dict[str, str] = {}
    uris: list[str] = []
    dns: list[str] = []
    recognised = False
    for key, item in _pairs(element, "malformed xfcc element"):
        recognised = recognised or key in _XFCC_KEYS
        if key in ("uri", "dns"):
            if item:  # Envoy writes a bare "URI=" when the certificate has no URI SAN
                (uris if key == "uri" else dns).append(item)
        elif key in _XFCC_SINGLE_KEYS:
            if key in single:
                raise _MalformedError("duplicate xfcc key")
            single[key] = item
    if not recognised:
        raise _MalformedError("malformed xfcc element")

    # Envoy URL-encodes PEM with %XX only ("+" stays %2B), so no plus-as-space here.
    cert = _pem_certificates(_url_unescape(single["cert"])) if single.get("cert") else []
    chain = _pem_certificates(_url_unescape(single["chain"])) if single.get("chain") else []
    # Envoy's Chain= is the whole chain *including* the leaf (its docs say so).
    leaf = cert[0] if cert else chain[0] if chain else None
    if chain and chain[0] == leaf:
        chain = chain[1:]
    intermediates = tuple(chain or cert[1:])

    digest = single.get("hash") or None
    if digest is not None:
        if not _HASH.fullmatch(digest):
            raise _MalformedError("bad hash")
        # Envoy writes lowercase hex; we keep CertificateInfo's uppercase everywhere.
        digest = digest.upper()
        if leaf is not None and digest != _sha256(leaf):
            raise _MalformedError("hash does not match cert")
    elif leaf is not None:
        digest = _sha256(leaf)
    return ProxiedIdentity(
        "xfcc",
        leaf_der=leaf,
        chain_der=intermediates,
        subject=single.get("subject") or None,
        uris=tuple(uris),
        dns=tuple(dns),
        hash_sha256=digest,
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
    return _certificate(_base64(match.group(1).encode("ascii")))


def _rfc9440(cert: _Value | None, chain: _Value | None) -> ProxiedIdentity:
    """Parse RFC 9440 headers; see :func:`parse_rfc9440`."""
    text = _present(cert)
    if text is None:
        raise _MalformedError("empty header")
    leaf = _byte_sequence(text)
    chain_text = _present(chain)
    # An empty Client-Cert-Chain is an empty sf-list, the same as an absent header.
    intermediates = (
        tuple(_byte_sequence(member) for member in chain_text.split(","))
        if chain_text is not None
        else ()
    )
    return ProxiedIdentity(
        "rfc9440", leaf_der=leaf, chain_der=intermediates, hash_sha256=_sha256(leaf)
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
        body = body.replace(_PEM_BEGIN, b"").replace(_PEM_END, b"")
        ders.append(_certificate(_base64(body)))
    return ders


def _traefik(pem: _Value | None, info: _Value | None) -> ProxiedIdentity:
    """Parse Traefik headers; see :func:`parse_traefik`."""
    pem_text, info_text = _present(pem), _present(info)
    if pem_text is None and info_text is None:
        raise _MalformedError("empty header")
    ders = _traefik_certificates(pem_text) if pem_text is not None else []
    subject: str | None = None
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    if info_text is not None:
        # Go's url.QueryEscape of the whole value: "+" is a space.  Certificates are
        # separated by "," and every field value is double-quoted, so a quote-aware split
        # keeps the subject's and SAN's own commas; the first group is the leaf.
        decoded = _url_unescape(info_text, plus_is_space=True).decode("utf-8", "replace")
        for key, item in _pairs(_split_quoted(decoded, ",")[0], "malformed traefik info"):
            if key == "subject":
                subject = item or None
            elif key == "san":
                # SAN is DNS names, emails, IPs then URIs joined by ","; a URI SAN that
                # itself contains "," is split apart - Traefik's format cannot say otherwise.
                uris, dns = _classify_sans(item.split(","))
    leaf = ders[0] if ders else None
    return ProxiedIdentity(
        "traefik",
        leaf_der=leaf,
        chain_der=tuple(ders[1:]),
        subject=subject,
        uris=uris,
        dns=dns,
        hash_sha256=_sha256(leaf) if leaf is not None else None,
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
    ders = _pem_certificates(_url_unescape(text))
    return ProxiedIdentity(
        "nginx", leaf_der=ders[0], chain_der=tuple(ders[1:]), hash_sha256=_sha256(ders[0])
    )


def parse_nginx(value: str | bytes) -> ProxiedIdentity:
    """Parse nginx's ``$ssl_client_escaped_cert`` or tab-continued ``$ssl_client_cert``."""
    return _guarded("nginx", _nginx, value)
