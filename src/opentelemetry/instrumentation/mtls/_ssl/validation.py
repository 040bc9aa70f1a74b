"""Validation gaps: what a successful handshake did not check.

A handshake can succeed without the checks that make mutual TLS an identity: a client
that does not verify the server (``CERT_NONE``) or its name (``check_hostname`` off), a
server that asks for a client certificate without requiring one (``CERT_OPTIONAL``), a
legacy protocol version, a cipher suite without forward secrecy or without AEAD. Each
such gap is decided here, from the SSL context's settings and the negotiated session.

This runs on every successful handshake, so the decision is one cached call on values
(the context's verify mode and ``check_hostname`` as they are at the handshake, which
the application may change after making the context; the session's version and
cipher): a handful of distinct combinations per process, each decided once. Pure: it
reads no ``ssl`` object and imports no ``opentelemetry``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from opentelemetry.instrumentation.mtls.attributes import (
    VERIFY_RESULT_NONE,
    VERIFY_RESULT_SKIPPED,
    VERIFY_RESULT_SUCCESS,
)

PEER_NOT_VERIFIED: Final = "peer_not_verified"
"""The peer's certificate was not verified (so its name was not checked either)."""
HOSTNAME_NOT_VERIFIED: Final = "hostname_not_verified"
"""Client side: the server's chain was verified, but not that it is the server asked for."""
CLIENT_CERTIFICATE_OPTIONAL: Final = "client_certificate_optional"
"""Server side: a client certificate was asked for, not required, and none was sent."""
LEGACY_PROTOCOL_VERSION: Final = "legacy_protocol_version"
"""The session's protocol version is below TLS 1.2."""
WEAK_CIPHER: Final = "weak_cipher"
"""The session's cipher suite has no forward secrecy (no ECDHE/DHE), or is not AEAD."""
PEER_CERTIFICATE_EXPIRING: Final = "peer_certificate_expiring"
"""The peer's certificate expires within the warning window (or has expired)."""

GAPS: Final = (
    PEER_NOT_VERIFIED,
    HOSTNAME_NOT_VERIFIED,
    CLIENT_CERTIFICATE_OPTIONAL,
    LEGACY_PROTOCOL_VERSION,
    WEAK_CIPHER,
    PEER_CERTIFICATE_EXPIRING,
)
"""Every gap, in the order a span lists them."""

_LEGACY_VERSIONS: Final = frozenset({"3", "1.0", "1.1"})
"""``tls.protocol.version`` values below TLS 1.2 (``3`` is SSL 3.0)."""
# Key exchanges with forward secrecy, as both IANA (``TLS_ECDHE_RSA_WITH_…``) and
# OpenSSL (``ECDHE-RSA-…``, older ``EDH-…``) names begin once ``TLS_`` is dropped.
_FORWARD_SECRET: Final = ("ECDHE_", "DHE_", "ECDHE-", "DHE-", "EDH-")
# AEAD modes, as they appear in either naming.
_AEAD: Final = ("GCM", "CCM", "POLY1305")


@dataclass(frozen=True, slots=True)
class Validation:
    """What a successful handshake verified: its peer's verify result, its name, its gaps."""

    verify_result: str
    """``success``, ``skipped`` (presented, not verified) or ``none`` (not presented)."""
    hostname_verified: bool | None
    """Client side: whether the server's name was checked; None on the server side."""
    gaps: tuple[str, ...]
    """The gaps of the context and the session, in :data:`GAPS` order (no expiry)."""


def weak_cipher(cipher: str) -> bool:
    """Whether a TLS 1.2-or-earlier suite (IANA or OpenSSL name) lacks forward secrecy or AEAD."""
    name = cipher.removeprefix("TLS_")
    return not name.startswith(_FORWARD_SECRET) or not any(mode in name for mode in _AEAD)


# Positional: a cached call with keywords costs three times as much (it runs per handshake).
@lru_cache(maxsize=1024)
def validation(  # noqa: PLR0917
    server_side: bool,
    verify_mode: int,
    check_hostname: bool,
    presented: bool,
    protocol_version: str | None,
    cipher: str | None,
) -> Validation:
    """Decide what a successful handshake verified, from its context's settings and session.

    ``verify_mode`` and ``check_hostname`` are the context's at the handshake, ``presented``
    whether the peer sent a certificate, ``protocol_version`` and ``cipher`` the session's
    (``tls.protocol.version`` and ``tls.cipher`` values). Cached: every argument comes from
    a small set (versions and ciphers from OpenSSL's tables), so the cache stays small.
    """
    verified = verify_mode != ssl.CERT_NONE
    gaps: list[str] = []
    if server_side:
        hostname_verified = None
        if presented and not verified:
            gaps.append(PEER_NOT_VERIFIED)
        if verify_mode == ssl.CERT_OPTIONAL and not presented:
            gaps.append(CLIENT_CERTIFICATE_OPTIONAL)
    else:
        # A client context cannot check the name without verifying the chain (ssl
        # refuses check_hostname with CERT_NONE), so one gap says both.
        hostname_verified = verified and check_hostname
        if not verified:
            gaps.append(PEER_NOT_VERIFIED)
        elif not check_hostname:
            gaps.append(HOSTNAME_NOT_VERIFIED)
    if protocol_version in _LEGACY_VERSIONS:
        gaps.append(LEGACY_PROTOCOL_VERSION)
    if protocol_version != "1.3" and cipher is not None and weak_cipher(cipher):
        gaps.append(WEAK_CIPHER)
    if not presented:
        result = VERIFY_RESULT_NONE
    else:
        result = VERIFY_RESULT_SUCCESS if verified else VERIFY_RESULT_SKIPPED
    return Validation(result, hostname_verified, tuple(gaps))


def peer_certificate_expiring(not_after: float | None, now: float, window: float) -> bool:
    """Whether a peer certificate ending at ``not_after`` (epoch seconds) is ``window`` from it."""
    return not_after is not None and not_after - now <= window
