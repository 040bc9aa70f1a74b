"""Read what a TLS peer offered and presented, from the handshake messages themselves.

The ClientHello says what a client offered (its SNI, cipher suites, versions, ALPN
protocols, signature algorithms) and is fingerprinted here as JA4, the BSD-licensed JA4
TLS client fingerprint (https://github.com/FoxIO-LLC/ja4, ``technical_details/JA4.md``;
not the JA4+ methods), and as JA3. A Certificate message's first entry is the leaf the
peer presented, before anything verified it.

The module is pure (the standard library only) and never raises: a malformed or
truncated message is None, never an exception, and every value it keeps is bounded by
the message it came from.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from struct import error as StructError
from struct import unpack_from
from typing import Final, NamedTuple

from opentelemetry.instrumentation.mtls._ssl.handshake_messages import Malformed, vector

__all__ = [
    "ClientHello",
    "is_grease",
    "ja3",
    "ja4",
    "offered_versions",
    "parse_client_hello",
]

CLIENT_HELLO: Final = 1
"""Handshake message type of a ClientHello."""

_SERVER_NAME: Final = 0x0000
_SUPPORTED_GROUPS: Final = 0x000A
_EC_POINT_FORMATS: Final = 0x000B
_SIGNATURE_ALGORITHMS: Final = 0x000D
_ALPN: Final = 0x0010
_SUPPORTED_VERSIONS: Final = 0x002B
_HOST_NAME: Final = 0
_MAX_HOST_NAME: Final = 253

# JA4's two-character version codes (technical_details/JA4.md, "TLS and DTLS Version").
_JA4_VERSIONS: Final[dict[int, str]] = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}
# As ``tls.protocol.version`` spells them.
_VERSION_NAMES: Final[dict[int, str]] = {
    0x0304: "1.3",
    0x0303: "1.2",
    0x0302: "1.1",
    0x0301: "1.0",
    0x0300: "3",
}
_NO_HASH: Final = "000000000000"


_FORMATS16: Final = tuple(f">{count}H" for count in range(64))


def is_grease(value: int) -> bool:
    """Whether a 16-bit value is a GREASE value (RFC 8701: 0x0A0A, 0x1A1A, ... 0xFAFA)."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


class ClientHello(NamedTuple):
    """What a ClientHello offered, in wire order, GREASE values included.

    Immutable and hashable: two hellos of one client build are equal (the random, the
    session id and the key shares are not kept), so their fingerprints are computed once.
    A named tuple because one is made on every server handshake (a third of a frozen
    dataclass's cost).
    """

    legacy_version: int
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]
    """Extension types in the order they were sent."""
    server_name: str | None
    """The SNI host name, when it is one a server could have (ASCII, at most 253 bytes)."""
    alpn: tuple[bytes, ...]
    supported_versions: tuple[int, ...]
    signature_algorithms: tuple[int, ...]
    supported_groups: tuple[int, ...]
    ec_point_formats: tuple[int, ...]


def _numbers16(data: bytes, start: int, end: int) -> tuple[int, ...]:
    """Return the 16-bit numbers of ``data[start:end]``."""
    if (end - start) % 2 or end > len(data):
        raise Malformed
    count = (end - start) >> 1
    return unpack_from(_FORMATS16[count] if count < 64 else f">{count}H", data, start)


def _server_name(data: bytes, start: int, end: int) -> str | None:
    position, stop = vector(data, start, end, 2)
    while position < stop:
        kind = data[position]
        begin, position = vector(data, position + 1, stop, 2)
        if kind == _HOST_NAME:
            name = data[begin:position]
            if not (0 < len(name) <= _MAX_HOST_NAME and name.isascii()):
                return None
            text = name.decode("ascii")
            return text if text.isprintable() else None
    return None


def _protocols(data: bytes, start: int, end: int) -> tuple[bytes, ...]:
    position, stop = vector(data, start, end, 2)
    found: list[bytes] = []
    while position < stop:
        begin, position = vector(data, position, stop, 1)
        found.append(data[begin:position])
    return tuple(found)


def _list16(data: bytes, where: tuple[int, int] | None, length_size: int) -> tuple[int, ...]:
    if where is None:
        return ()
    begin, stop = vector(data, where[0], where[1], length_size)
    return _numbers16(data, begin, stop)


def parse_client_hello(message: bytes) -> ClientHello | None:
    """Parse a ClientHello handshake message (its 4-byte header included); None if malformed."""
    try:
        return _parse(message)
    except (ValueError, StructError):  # Malformed, and anything int, bytes or struct refuse
        return None


def _parse(data: bytes) -> ClientHello:
    # Offsets into the one bytes object, no copies: this runs on every server handshake.
    if len(data) < 4 or data[0] != CLIENT_HELLO:
        raise Malformed
    position, end = vector(data, 1, len(data), 3)
    legacy_version = int.from_bytes(data[position : position + 2], "big")
    position += 2 + 32  # version, random
    _, position = vector(data, position, end, 1)  # legacy_session_id
    begin, position = vector(data, position, end, 2)
    cipher_suites = _numbers16(data, begin, position)
    _, position = vector(data, position, end, 1)  # legacy_compression_methods
    extensions: list[int] = []
    values: dict[int, tuple[int, int]] = {}
    if position < end:  # a hello before TLS 1.2 may have no extensions at all
        position, stop = vector(data, position, end, 2)
        while position < stop:
            begin = position + 4
            if begin > stop:
                raise Malformed
            kind = (data[position] << 8) | data[position + 1]
            position = begin + ((data[position + 2] << 8) | data[position + 3])
            if position > stop:
                raise Malformed
            extensions.append(kind)
            if kind not in values:
                values[kind] = (begin, position)
    sni = values.get(_SERVER_NAME)
    alpn = values.get(_ALPN)
    formats = values.get(_EC_POINT_FORMATS)
    return ClientHello(
        legacy_version=legacy_version,
        cipher_suites=cipher_suites,
        extensions=tuple(extensions),
        server_name=_server_name(data, *sni) if sni is not None and sni[0] < sni[1] else None,
        alpn=_protocols(data, *alpn) if alpn is not None else (),
        supported_versions=_list16(data, values.get(_SUPPORTED_VERSIONS), 1),
        signature_algorithms=_list16(data, values.get(_SIGNATURE_ALGORITHMS), 2),
        supported_groups=_list16(data, values.get(_SUPPORTED_GROUPS), 2),
        ec_point_formats=tuple(data[slice(*vector(data, *formats, 1))]) if formats else (),
    )


def _best_version(hello: ClientHello) -> int:
    offered = [v for v in hello.supported_versions if not is_grease(v)]
    return max(offered) if offered else hello.legacy_version


def offered_versions(hello: ClientHello) -> tuple[str, ...]:
    """Return the versions offered, as ``tls.protocol.version`` names them (``1.3``).

    From ``supported_versions`` when the hello has it, else the hello's own version;
    GREASE is left out and an unknown version is shown as hex (``0x7f1c``).
    """
    codes = [v for v in hello.supported_versions if not is_grease(v)] or [hello.legacy_version]
    return tuple(_VERSION_NAMES.get(code, f"0x{code:04x}") for code in codes)


def _alpn_code(protocols: tuple[bytes, ...]) -> str:
    """JA4's two characters for the first ALPN value: its first and last characters.

    ``00`` when there is none; a one-character value gives that character twice. An end
    that is not printable ASCII is ``9``: FoxIO's implementations and their published
    vector (``tls-non-ascii-alpn.pcapng``: ``99``) do so, where JA4.md's text says hex.
    """
    if not protocols or not protocols[0]:
        return "00"
    first = protocols[0]
    return _alpn_character(first[0]) + _alpn_character(first[-1])


def _alpn_character(byte: int) -> str:
    return chr(byte) if 0x20 <= byte < 0x7F else "9"


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12] if text else _NO_HASH


@lru_cache(maxsize=1024)
def ja4(hello: ClientHello) -> str:
    """Return the JA4 fingerprint of a ClientHello over TCP.

    For example ``t13d1516h2_8daaf6152771_e5627efa2ab1`` (JA4.md's own example).
    """
    ciphers = [c for c in hello.cipher_suites if not is_grease(c)]
    extensions = [e for e in hello.extensions if not is_grease(e)]
    signatures = [s for s in hello.signature_algorithms if not is_grease(s)]
    prefix = (
        "t"
        + _JA4_VERSIONS.get(_best_version(hello), "00")
        + ("d" if _SERVER_NAME in extensions else "i")
        + f"{min(len(ciphers), 99):02d}{min(len(extensions), 99):02d}"
        + _alpn_code(hello.alpn)
    )
    hashed = sorted(e for e in extensions if e not in (_SERVER_NAME, _ALPN))
    tail = ",".join(f"{e:04x}" for e in hashed)
    if signatures:
        tail += "_" + ",".join(f"{s:04x}" for s in signatures)
    cipher_list = ",".join(f"{c:04x}" for c in sorted(ciphers))
    return f"{prefix}_{_hash12(cipher_list)}_{_hash12(tail)}"


@lru_cache(maxsize=1024)
def ja3(hello: ClientHello) -> str:
    """Return the JA3 fingerprint of a ClientHello: the MD5 of its JA3 string, GREASE left out."""
    fields = (
        str(hello.legacy_version),
        "-".join(str(c) for c in hello.cipher_suites if not is_grease(c)),
        "-".join(str(e) for e in hello.extensions if not is_grease(e)),
        "-".join(str(g) for g in hello.supported_groups if not is_grease(g)),
        "-".join(str(p) for p in hello.ec_point_formats),
    )
    # JA3 is defined with MD5; it names a client, it protects nothing.
    return hashlib.md5(",".join(fields).encode("ascii"), usedforsecurity=False).hexdigest()
