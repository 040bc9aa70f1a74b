"""OCSP: the request for a certificate, and what a responder's answer says about it.

An answer counts only when it is signed by the issuer, or by a responder the issuer
delegated to (issued by it, with the OCSPSigning usage, valid now), and is about this
very certificate (serial and issuer hashes), current within ``CLOCK_SKEW``.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    SignatureAlgorithmOID,
)

from .verdict import CLOCK_SKEW, Verdict

CONTENT_TYPE = "application/ocsp-request"
"""The Content-Type of an OCSP request sent by POST."""

_MISSING = object()


def ocsp_urls(leaf: x509.Certificate) -> list[str]:
    """Return the certificate's OCSP responder URLs (authorityInfoAccess)."""
    try:
        aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [
        description.access_location.value
        for description in aia
        if description.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(description.access_location, x509.UniformResourceIdentifier)
    ]


def request_body(leaf: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """Build the DER OCSP request about ``leaf`` (SHA-1 CertID: every responder takes it)."""
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
    return request.public_bytes(serialization.Encoding.DER)


def evaluate_ocsp(
    data: bytes, leaf: x509.Certificate, issuer: x509.Certificate, now: float
) -> Verdict | str:
    """Answer from one OCSP response after checking its signature, or say why not."""
    try:
        response = ocsp.load_der_ocsp_response(data)
    except ValueError:
        return "unparseable OCSP response"
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return f"responder status {response.response_status.name.lower()}"
    signer_problem = _check_signer(response, issuer, now)
    if signer_problem is not None:
        return signer_problem
    try:
        singles = list(response.responses)
    except ValueError:
        return "malformed OCSP response"
    for single in singles:
        if not _single_matches(single, leaf, issuer):
            continue
        this_update = _utc(single, "this_update")
        next_update = _utc(single, "next_update")
        if this_update is None or this_update.timestamp() > now + CLOCK_SKEW:
            return "OCSP response not yet valid (thisUpdate in the future)"
        if next_update is not None and next_update.timestamp() < now - CLOCK_SKEW:
            return f"stale OCSP response (nextUpdate {next_update.isoformat()})"
        status = single.certificate_status
        if status == ocsp.OCSPCertStatus.GOOD:
            return Verdict(False, None, next_update)
        if status == ocsp.OCSPCertStatus.REVOKED:
            reason = single.revocation_reason or x509.ReasonFlags.unspecified
            return Verdict(True, reason.value, next_update)
        return "responder does not know the certificate"
    return "OCSP response is not about this certificate"


def _check_signer(response: ocsp.OCSPResponse, issuer: x509.Certificate, now: float) -> str | None:
    """Verify the response was signed by the issuer or a responder it delegated to."""
    signer = _signer(response, issuer)
    if signer is None:
        return "OCSP response signed by neither the issuer nor a delegated responder"
    if signer is not issuer:
        try:
            signer.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return "delegated OCSP responder certificate not issued by the issuer"
        try:
            eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (x509.ExtensionNotFound, ValueError):
            return "delegated OCSP responder certificate lacks the OCSPSigning usage"
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            return "delegated OCSP responder certificate lacks the OCSPSigning usage"
        if not (
            signer.not_valid_before_utc.timestamp() - CLOCK_SKEW
            <= now
            <= signer.not_valid_after_utc.timestamp() + CLOCK_SKEW
        ):
            return "delegated OCSP responder certificate is not valid now"
    try:
        hash_algorithm = response.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return "unsupported OCSP signature algorithm"
    if not _verify_signature(
        signer.public_key(),
        response.signature,
        response.tbs_response_bytes,
        hash_algorithm,
        response.signature_algorithm_oid,
    ):
        return "OCSP response signature does not verify"
    return None


def _signer(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate | None:
    """Find the certificate named by the response's responder ID."""
    candidates = [issuer, *response.certificates]
    name = response.responder_name
    key_hash = response.responder_key_hash
    for candidate in candidates:
        if name is not None and candidate.subject == name:
            return candidate
        if key_hash is not None and _key_hash(candidate) == key_hash:
            return candidate
    return None


def _key_hash(cert: x509.Certificate) -> bytes | None:
    """SHA-1 of the certificate's public key bits (OCSP's byKey responder ID)."""
    try:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return None


def _single_matches(
    single: ocsp.OCSPSingleResponse, leaf: x509.Certificate, issuer: x509.Certificate
) -> bool:
    """Whether a single response's CertID designates ``leaf`` issued by ``issuer``."""
    if single.serial_number != leaf.serial_number:
        return False
    try:
        expected = (
            ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, single.hash_algorithm).build()
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return (
        expected.issuer_name_hash == single.issuer_name_hash
        and expected.issuer_key_hash == single.issuer_key_hash
    )


def _verify_signature(
    public_key: object,
    signature: bytes,
    data: bytes,
    hash_algorithm: hashes.HashAlgorithm | None,
    algorithm_oid: x509.ObjectIdentifier,
) -> bool:
    """Verify ``signature`` over ``data`` with any key type X.509 uses."""
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and hash_algorithm is not None:
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
            if algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
                pad = padding.PSS(padding.MGF1(hash_algorithm), padding.PSS.AUTO)
            public_key.verify(signature, data, pad, hash_algorithm)
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and hash_algorithm is not None:
            public_key.verify(signature, data, ec.ECDSA(hash_algorithm))
        elif isinstance(public_key, dsa.DSAPublicKey) and hash_algorithm is not None:
            public_key.verify(signature, data, hash_algorithm)
        elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public_key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _utc(obj: ocsp.OCSPSingleResponse, name: str) -> datetime.datetime | None:
    """Read an OCSP time as aware UTC (``*_utc`` since cryptography 43, naive before)."""
    value = getattr(obj, f"{name}_utc", _MISSING)
    if value is _MISSING:
        value = getattr(obj, name, None)
        if isinstance(value, datetime.datetime):
            value = value.replace(tzinfo=datetime.UTC)
    return value if isinstance(value, datetime.datetime) else None
