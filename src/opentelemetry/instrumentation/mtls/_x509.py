"""Parse a peer's DER X.509 certificate into the plain values recorded on spans and metrics.

The TLS layer hands us the peer certificate as DER bytes; this module turns them into a
frozen :class:`CertificateInfo` (subject, issuer, validity, serial, SANs, SPIFFE ID) with
``cryptography``.  It imports nothing from OpenTelemetry so it can be tested and reused on
its own.  Parsing never raises: whatever cannot be read is left empty and the exception's
class name is kept in :attr:`CertificateInfo.parse_error`.  Results are cached by DER
bytes, because a returning client presents the same certificate on every handshake.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ssl
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["CACHE_SIZE", "CertificateInfo", "der_to_pem", "parse_certificate"]

CACHE_SIZE: Final = 4096
"""Maximum number of distinct certificates whose parse result is kept."""

_URI: Final = "URI:"
_SPIFFE_URI: Final = _URI + "spiffe://"

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
    subject: str | None = None
    issuer: str | None = None
    not_before: str | None = None
    not_after: str | None = None
    not_after_timestamp: float | None = None
    serial_number: str | None = None
    common_name: str | None = None
    issuer_common_name: str | None = None
    alternative_names: tuple[str, ...] = ()
    spiffe_id: str | None = None
    parse_error: str | None = None


def _iso8601(moment: datetime.datetime) -> str:
    """Format an aware datetime as ISO 8601 UTC with milliseconds, e.g. ``...T00:00:00.000Z``."""
    utc = moment.astimezone(datetime.timezone.utc)
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
    if isinstance(name, x509.DirectoryName):
        return f"DirName:{name.value.rfc4514_string()}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    if isinstance(name, x509.OtherName):
        return f"othername:{name.type_id.dotted_string}"
    # DNS, URI and email values are str, IP values ipaddress objects: str() fits them all.
    return f"{_SAN_LABELS.get(type(name), type(name).__name__)}:{name.value}"


def _alternative_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """Return every subjectAltName entry in certificate order (empty without the extension)."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(_format_general_name(name) for name in extension.value)


def _spiffe_id(alternative_names: tuple[str, ...]) -> str | None:
    """Return the first URI SAN that is a SPIFFE ID."""
    for entry in alternative_names:
        if entry.startswith(_SPIFFE_URI):
            return entry[len(_URI) :]
    return None


def _attempt(read: Callable[[], _T], errors: list[str]) -> _T | None:
    """Return ``read()``, or None after noting the exception's class name in ``errors``."""
    try:
        return read()
    except Exception as exc:  # a failure only empties this field group; see _parse
        errors.append(type(exc).__name__)
        return None


def _parse(der: bytes) -> CertificateInfo:
    """Parse ``der`` field group by field group; a failing group leaves only itself empty."""
    sha256 = hashlib.sha256(der).hexdigest().upper()
    errors: list[str] = []
    cert = _attempt(lambda: x509.load_der_x509_certificate(der), errors)
    if cert is None:
        return CertificateInfo(sha256=sha256, parse_error=errors[0])

    # cryptography decodes names, the serial and extensions only when they are accessed,
    # so each group is read under its own guard: a malformed SAN must not hide the subject.
    subject, common_name = _attempt(lambda: _name_fields(cert.subject), errors) or (None, None)
    issuer, issuer_cn = _attempt(lambda: _name_fields(cert.issuer), errors) or (None, None)
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
        issuer_common_name=issuer_cn,
        alternative_names=alternative_names,
        spiffe_id=_spiffe_id(alternative_names),
        parse_error=errors[0] if errors else None,
    )


@functools.lru_cache(maxsize=CACHE_SIZE)
def parse_certificate(der: bytes) -> CertificateInfo:
    """Parse a DER certificate into a cached :class:`CertificateInfo`; never raises."""
    # cryptography warns (CryptographyDeprecationWarning) about RFC 5280 violations it still
    # tolerates, e.g. a negative serial number.  Those are the peer's fault, not the caller's:
    # silence them so they neither spam logs nor, under ``-W error``, turn into exceptions
    # that would drop the whole certificate.  catch_warnings() swaps process-wide state, but
    # this runs only on a cache miss, so the window is short and rare.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _parse(der)


def der_to_pem(der: bytes) -> str:
    """Return the PEM text of a DER certificate."""
    return ssl.DER_cert_to_PEM_cert(der)


_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


def first_pem_certificate(pem: bytes) -> bytes | None:
    """Return the DER of the first certificate in PEM text (a chain file's leaf), or None."""
    start = pem.find(_PEM_BEGIN)
    end = pem.find(_PEM_END, start)
    if start < 0 or end < 0:
        return None
    try:
        return ssl.PEM_cert_to_DER_cert(pem[start : end + len(_PEM_END)].decode("ascii"))
    except ValueError:
        return None
