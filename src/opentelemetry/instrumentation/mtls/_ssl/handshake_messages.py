"""Read a server's Certificate and CertificateRequest handshake messages: pure parsing.

``otel-mtls inspect`` shows the whole chain a server presented, even when verification
fails, and the client CA names a server asks for; OpenSSL gives Python neither (the
chain only after a successful handshake, the CA names never), but both pass through
the message callback. Each function takes one handshake message, its 4-byte header
included, and returns ``None`` for anything malformed: a diagnosis must not crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

CERTIFICATE: Final = 11
CERTIFICATE_REQUEST: Final = 13
NEW_SESSION_TICKET: Final = 4
_CERTIFICATE_AUTHORITIES: Final = 47
"""The TLS 1.3 ``certificate_authorities`` extension (RFC 8446 4.2.4)."""


class Malformed(ValueError):
    """A length that runs past its enclosing vector."""


def vector(data: bytes, start: int, end: int, length_size: int) -> tuple[int, int]:
    """Return where a length-prefixed vector at ``start`` holds its bytes: (begin, stop)."""
    begin = start + length_size
    if begin > end:
        raise Malformed
    if length_size == 2:
        length = (data[start] << 8) | data[start + 1]
    elif length_size == 1:
        length = data[start]
    else:
        length = int.from_bytes(data[start:begin], "big")
    stop = begin + length
    if stop > end:
        raise Malformed
    return begin, stop


def _body(message: bytes, kind: int) -> tuple[int, int]:
    """Return where a handshake message of type ``kind`` holds its body."""
    if len(message) < 4 or message[0] != kind:
        raise Malformed
    return vector(message, 1, len(message), 3)


def _certificate_list(message: bytes, tls13: bool) -> tuple[int, int]:
    """Return where a Certificate message holds its certificate list: (begin, stop).

    TLS 1.3 (RFC 8446 4.4.2) prefixes the list with a request context and follows each
    entry with its extensions; TLS 1.2 (RFC 5246 7.4.2) is the bare list.
    """
    position, end = _body(message, CERTIFICATE)
    if tls13:
        _, position = vector(message, position, end, 1)  # certificate_request_context
    return vector(message, position, end, 3)


def certificate_leaf(message: bytes, *, tls13: bool) -> bytes | None:
    """Return the DER of the first certificate of a Certificate message; None if it has none."""
    try:
        position, stop = _certificate_list(message, tls13)
        if position == stop:
            return None  # an empty list: no certificate presented
        begin, position = vector(message, position, stop, 3)
    except Malformed:
        return None
    return message[begin:position] or None


def certificate_chain(message: bytes, *, tls13: bool) -> list[bytes] | None:
    """Return the DER certificates of a Certificate message, in the order sent."""
    try:
        position, stop = _certificate_list(message, tls13)
        chain = []
        while position < stop:
            begin, position = vector(message, position, stop, 3)
            chain.append(message[begin:position])
            if tls13:
                _, position = vector(message, position, stop, 2)  # the entry's extensions
    except Malformed:
        return None
    return chain


def certificate_authorities(message: bytes, *, tls13: bool) -> list[bytes] | None:
    """Return the DER distinguished names a CertificateRequest lists as acceptable CAs.

    TLS 1.3 (RFC 8446 4.3.2) carries them in the ``certificate_authorities`` extension;
    TLS 1.2 (RFC 5246 7.4.4) after the certificate types and signature algorithms.
    An empty list: the server named no CA (any certificate may be tried).
    """
    try:
        position, end = _body(message, CERTIFICATE_REQUEST)
        if tls13:
            _, position = vector(message, position, end, 1)  # certificate_request_context
            position, stop = vector(message, position, end, 2)
            while position < stop:
                kind = int.from_bytes(message[position : position + 2], "big")
                begin, position = vector(message, position + 2, stop, 2)
                if kind == _CERTIFICATE_AUTHORITIES:
                    return _names(message, *vector(message, begin, position, 2))
            return []
        _, position = vector(message, position, end, 1)  # certificate_types
        _, position = vector(message, position, end, 2)  # supported_signature_algorithms
        return _names(message, *vector(message, position, end, 2))
    except Malformed:
        return None


def _names(data: bytes, position: int, stop: int) -> list[bytes]:
    names = []
    while position < stop:
        begin, position = vector(data, position, stop, 2)
        names.append(data[begin:position])
    return names


# -- distinguished names -----------------------------------------------------------------

_SEQUENCE: Final = 0x30
_SET: Final = 0x31
_OID: Final = 0x06
_STRING_TYPES: Final[dict[int, str]] = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x16: "ascii",  # IA5String
    0x14: "latin-1",  # TeletexString, as OpenSSL shows it
    0x1E: "utf-16-be",  # BMPString
    0x1C: "utf-32-be",  # UniversalString
}


def _der(data: bytes, position: int, end: int) -> tuple[int, int, int]:
    """Return the tag, and where the content of the DER element at ``position`` is."""
    if position + 2 > end:
        raise Malformed
    tag, length = data[position], data[position + 1]
    position += 2
    if length & 0x80:
        size = length & 0x7F
        if size == 0 or size > 4 or position + size > end:
            raise Malformed
        length = int.from_bytes(data[position : position + size], "big")
        position += size
    if position + length > end:
        raise Malformed
    return tag, position, position + length


def _oid(content: bytes) -> str:
    """Return the dotted form of a DER OBJECT IDENTIFIER's content."""
    if not content:
        raise Malformed
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in (first, arcs[0] - 40 * first, *arcs[1:]))


@dataclass(frozen=True)
class DistinguishedName:
    """One CA name from a CertificateRequest."""

    der: bytes
    text: str
    """RFC 4514, as the certificate attributes spell names; hex DER if unreadable."""


def distinguished_name(der: bytes) -> DistinguishedName:
    """Return a DER X.501 Name as RFC 4514 text, the way certificate subjects are shown.

    ``cryptography`` formats names but does not parse one on its own: the few DER
    elements of a Name are walked here and handed to it.
    """
    try:
        tag, position, end = _der(der, 0, len(der))
        if tag != _SEQUENCE:
            raise Malformed
        rdns = []
        while position < end:
            tag, begin, position = _der(der, position, end)
            if tag != _SET:
                raise Malformed
            attributes = []
            while begin < position:
                tag, inner, begin = _der(der, begin, position)
                oid_tag, oid_begin, oid_end = _der(der, inner, begin)
                value_tag, value_begin, value_end = _der(der, oid_end, begin)
                encoding = _STRING_TYPES.get(value_tag)
                if tag != _SEQUENCE or oid_tag != _OID or encoding is None:
                    raise Malformed
                value = der[value_begin:value_end].decode(encoding)
                oid = ObjectIdentifier(_oid(der[oid_begin:oid_end]))
                attributes.append(x509.NameAttribute(oid, value))
            rdns.append(x509.RelativeDistinguishedName(attributes))
        return DistinguishedName(der, x509.Name(rdns).rfc4514_string())
    except (ValueError, IndexError):  # Malformed, bad text, cryptography's own checks
        return DistinguishedName(der, f"(unreadable name, DER {der.hex().upper()})")
