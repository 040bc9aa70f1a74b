"""Parse a peer's DER X.509 certificate into the plain values recorded on spans and metrics.

The TLS layer hands us the peer certificate as DER bytes; this module turns them into a
frozen :class:`CertificateInfo` (subject, issuer, validity, serial, SANs, SPIFFE ID) with
``cryptography``.  It imports nothing from OpenTelemetry so it can be tested and reused on
its own.  Parsing never raises: whatever cannot be read is left empty and the exception's
class name is kept in :attr:`CertificateInfo.parse_error`.  Results are cached by DER
bytes, because a returning client presents the same certificate on every handshake; a
certificate a proxy forwarded in a header has a smaller cache of its own
(:func:`parse_forwarded_certificate`), so that whoever is behind the proxy cannot fill the
handshake cache.  At most :data:`MAX_ALTERNATIVE_NAMES` SANs are kept per certificate.

It is also the one place that reads PEM text (:func:`pem_certificates`), decodes base64
certificates (:func:`decode_base64`) and computes fingerprints (:func:`sha256_hex`).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import hashlib
import re
import ssl
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = [
    "CACHE_SIZE",
    "FORWARDED_CACHE_SIZE",
    "MAX_ALTERNATIVE_NAMES",
    "PEM_BEGIN",
    "PEM_END",
    "TRUNCATED_NAMES",
    "CertificateEncodingError",
    "CertificateInfo",
    "auth_context_certificate",
    "bounded_names",
    "decode_base64",
    "der_to_pem",
    "first_pem_certificate",
    "first_spiffe_id",
    "parse_certificate",
    "parse_forwarded_certificate",
    "pem_certificates",
    "sha256_hex",
]

CACHE_SIZE: Final = 4096
"""Maximum number of distinct handshake certificates whose parse result is kept."""
FORWARDED_CACHE_SIZE: Final = 256
"""Maximum number of distinct proxy-forwarded certificates whose parse result is kept."""
MAX_ALTERNATIVE_NAMES: Final = 64
"""SANs kept per certificate; the rest are counted in one :data:`TRUNCATED_NAMES` entry."""
TRUNCATED_NAMES: Final = "truncated:"
"""Prefix of the last ``alternative_names`` entry of a certificate with too many SANs,
e.g. ``truncated:167 more``: no real SAN kind is called that."""
PEM_BEGIN: Final = b"-----BEGIN CERTIFICATE-----"
PEM_END: Final = b"-----END CERTIFICATE-----"

_URI: Final = "URI:"
_SPIFFE_URI: Final = _URI + "spiffe://"
_BASE64: Final = re.compile(rb"[A-Za-z0-9+/]*={0,2}")

_SAN_LABELS: Final[dict[type[x509.GeneralName], str]] = {
    x509.DNSName: "DNS",
    x509.UniformResourceIdentifier: "URI",
    x509.IPAddress: "IP",
    x509.RFC822Name: "email",
}

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """Identity and validity of one X.509 certificate, as plain strings and numbers."""

    sha256: str
    """Uppercase hex SHA-256 of the DER ("" when a proxy forwarded fields but no hash)."""
    subject: str | None = None
    """RFC 4514 subject, e.g. ``CN=web,O=demo`` (a proxy's own notation when forwarded)."""
    issuer: str | None = None
    """RFC 4514 issuer."""
    not_before: str | None = None
    """Start of validity, ISO 8601 UTC with milliseconds."""
    not_after: str | None = None
    """End of validity, ISO 8601 UTC with milliseconds; the certificate is still valid
    at that instant (RFC 5280's notAfter is inclusive)."""
    not_after_timestamp: float | None = None
    """End of validity, seconds since the epoch (for expiry metrics)."""
    serial_number: str | None = None
    """Serial number, uppercase hex."""
    common_name: str | None = None
    """The subject's first commonName."""
    alternative_names: tuple[str, ...] = ()
    """SANs with their kind, e.g. ``DNS:a.example``: at most :data:`MAX_ALTERNATIVE_NAMES`
    of them, then a :data:`TRUNCATED_NAMES` entry."""
    spiffe_id: str | None = None
    """The first ``spiffe://`` URI SAN (looked for among all SANs, kept or not)."""
    parse_error: str | None = None
    """None when every field could be read; else the first failure's exception class."""


class CertificateEncodingError(ValueError):
    """Text that does not hold certificates in the expected encoding; ``str()`` says why."""


def _iso8601(moment: datetime.datetime) -> str:
    """Format an aware datetime as ISO 8601 UTC with milliseconds, e.g. ``...T00:00:00.000Z``."""
    utc = moment.astimezone(datetime.UTC)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T"
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


def _first_common_name(name: x509.Name) -> str | None:
    """Return the first commonName attribute of ``name`` (certificate order), if any."""
    for attribute in name.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def _name_fields(name: x509.Name) -> tuple[str, str | None]:
    """Return the RFC 4514 string and the first commonName of ``name``."""
    return name.rfc4514_string(), _first_common_name(name)


def _format_general_name(name: x509.GeneralName) -> str:
    """Format one subjectAltName entry with its OpenSSL-style kind label, e.g. ``DNS:a.b``."""
    # DNS, URI and email values are str, IP values ipaddress objects: str() fits them all.
    # Looked up by exact type first: isinstance() on cryptography's ABCs costs more, and a
    # certificate may have hundreds of SANs.
    label = _SAN_LABELS.get(type(name))
    if label is not None:
        return f"{label}:{name.value}"
    if isinstance(name, x509.DirectoryName):
        return f"DirName:{name.value.rfc4514_string()}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    if isinstance(name, x509.OtherName):
        return f"othername:{name.type_id.dotted_string}"
    return f"{type(name).__name__}:{name.value}"


def _alternative_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """Return every subjectAltName entry in certificate order (empty without the extension)."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(_format_general_name(name) for name in extension.value)


def first_spiffe_id(alternative_names: Sequence[str]) -> str | None:
    """Return the first URI SAN that is a SPIFFE ID, from kind-labelled SANs (``URI:...``)."""
    for entry in alternative_names:
        if entry.startswith(_SPIFFE_URI):
            return entry[len(_URI) :]
    return None


def bounded_names(names: Sequence[str]) -> tuple[str, ...]:
    """Return the SANs a :class:`CertificateInfo` keeps: the first few, then a count.

    A certificate may carry thousands of SANs, and every cached parse keeps its own:
    the cap bounds the cache's memory and the attribute's size.  SPIFFE IDs past the cap
    are still kept until two are, so that a rule refusing a certificate with more than
    one SPIFFE ID sees the second wherever it stands.
    """
    if len(names) <= MAX_ALTERNATIVE_NAMES:
        return tuple(names)
    kept = list(names[:MAX_ALTERNATIVE_NAMES])
    spiffe_ids = sum(name.startswith(_SPIFFE_URI) for name in kept)
    for name in names[MAX_ALTERNATIVE_NAMES:]:
        if spiffe_ids >= 2:
            break
        if name.startswith(_SPIFFE_URI):
            kept.append(name)
            spiffe_ids += 1
    kept.append(f"{TRUNCATED_NAMES}{len(names) - len(kept)} more")
    return tuple(kept)


def _attempt(read: Callable[[], _T], errors: list[str]) -> _T | None:
    """Return ``read()``, or None after noting the exception's class name in ``errors``."""
    try:
        return read()
    except Exception as exc:  # a failure only empties this field group; see _parse
        errors.append(type(exc).__name__)
        return None


def _parse(der: bytes) -> CertificateInfo:
    """Parse ``der`` field group by field group; a failing group leaves only itself empty."""
    sha256 = sha256_hex(der)
    errors: list[str] = []
    cert = _attempt(lambda: x509.load_der_x509_certificate(der), errors)
    if cert is None:
        return CertificateInfo(sha256=sha256, parse_error=errors[0])

    # cryptography decodes names, the serial and extensions only when they are accessed,
    # so each group is read under its own guard: a malformed SAN must not hide the subject.
    subject, common_name = _attempt(lambda: _name_fields(cert.subject), errors) or (None, None)
    issuer = _attempt(lambda: cert.issuer.rfc4514_string(), errors)  # noqa: PLW0108  # guarded
    serial = _attempt(lambda: format(cert.serial_number, "X"), errors)
    not_before = _attempt(lambda: _iso8601(cert.not_valid_before_utc), errors)
    not_after, not_after_timestamp = _attempt(
        lambda: (_iso8601(cert.not_valid_after_utc), cert.not_valid_after_utc.timestamp()),
        errors,
    ) or (None, None)
    alternative_names = _attempt(lambda: _alternative_names(cert), errors) or ()
    return CertificateInfo(
        sha256=sha256,
        subject=subject,
        issuer=issuer,
        not_before=not_before,
        not_after=not_after,
        not_after_timestamp=not_after_timestamp,
        serial_number=serial,
        common_name=common_name,
        alternative_names=bounded_names(alternative_names),
        spiffe_id=first_spiffe_id(alternative_names),
        parse_error=errors[0] if errors else None,
    )


def _parse_quietly(der: bytes) -> CertificateInfo:
    """Parse ``der`` with cryptography's warnings silenced; see :func:`parse_certificate`."""
    # cryptography warns (CryptographyDeprecationWarning) about RFC 5280 violations it still
    # tolerates, e.g. a negative serial number.  Those are the peer's fault, not the caller's:
    # silence them so they neither spam logs nor, under ``-W error``, turn into exceptions
    # that would drop the whole certificate.  catch_warnings() swaps process-wide state, but
    # this runs only on a cache miss, so the window is short and rare.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _parse(der)


@functools.lru_cache(maxsize=CACHE_SIZE)
def parse_certificate(der: bytes) -> CertificateInfo:
    """Parse a handshake's DER certificate into a cached :class:`CertificateInfo`; never raises."""
    return _parse_quietly(der)


@functools.lru_cache(maxsize=FORWARDED_CACHE_SIZE)
def parse_forwarded_certificate(der: bytes) -> CertificateInfo:
    """Parse a DER certificate a proxy forwarded in a header, like :func:`parse_certificate`.

    Anyone behind a trusted proxy chooses these certificates (the proxy forwards what it
    was shown, whoever issued it), so they get a small cache of their own instead of
    evicting, and growing, the one handshake certificates use.
    """
    return _parse_quietly(der)


def sha256_hex(der: bytes) -> str:
    """Return the uppercase hex SHA-256 of ``der``, as :attr:`CertificateInfo.sha256` has it."""
    return hashlib.sha256(der).hexdigest().upper()


def der_to_pem(der: bytes) -> str:
    """Return the PEM text of a DER certificate."""
    return ssl.DER_cert_to_PEM_cert(der)


def decode_base64(data: bytes) -> bytes:
    """Decode standard base64, ignoring whitespace anywhere and tolerating missing padding.

    Proxies fold, re-indent or strip the base64 of the certificates they forward, so
    whitespace is not an error; anything else outside the alphabet is
    (:class:`CertificateEncodingError` "bad base64"), unlike ``base64.decodebytes``.
    """
    compact = b"".join(data.split())
    if not compact or not _BASE64.fullmatch(compact):
        raise CertificateEncodingError("bad base64")
    try:
        return base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
    except binascii.Error:
        raise CertificateEncodingError("bad base64") from None


def _pem_blocks(pem: bytes) -> Iterator[bytes]:
    """Yield the DER of each CERTIFICATE block in PEM text, decoding one block at a time."""
    position = 0
    while (start := pem.find(PEM_BEGIN, position)) >= 0:
        end = pem.find(PEM_END, start)
        if end < 0:
            raise CertificateEncodingError("malformed pem")
        yield decode_base64(pem[start + len(PEM_BEGIN) : end])
        position = end + len(PEM_END)
    if position == 0:
        # Another PEM type (a key, a CSR) is "not a certificate"; no PEM at all, "no certificate".
        raise CertificateEncodingError(
            "not a certificate" if b"-----BEGIN" in pem else "no certificate"
        )


def pem_certificates(pem: bytes) -> list[bytes]:
    """Return the DER of every CERTIFICATE block in PEM text, in order.

    Raises :class:`CertificateEncodingError` when there is no such block, or one is
    unterminated or not base64.  The DER inside is not checked to be a certificate.
    """
    return list(_pem_blocks(pem))


def first_pem_certificate(pem: bytes) -> bytes | None:
    """Return the DER of the first certificate in PEM text (a chain file's leaf), or None."""
    try:
        return next(_pem_blocks(pem))
    except CertificateEncodingError:
        return None


def auth_context_certificate(auth_context: Mapping[str, Sequence[bytes]]) -> bytes | None:
    """Return the DER of the peer certificate of a gRPC call's ``auth_context()``, if any.

    gRPC core puts the leaf it verified there as ``x509_pem_cert``, next to the CN and SANs
    it read from it; the certificate itself says all of that, and its fingerprint too.
    Nothing else in a call (metadata included) can put a value there.
    """
    values = auth_context.get("x509_pem_cert")
    return first_pem_certificate(values[0]) if values else None
