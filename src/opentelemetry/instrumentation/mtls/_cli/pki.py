"""A throwaway PKI for the demo, ``otel-mtls`` and the tests: CAs and ECDSA P-256 leaves.

Built with ``cryptography`` because mTLS identities live in URI SANs (SPIFFE IDs), which
trustme cannot issue. Keys are written unencrypted to a private temporary directory:
this is for loopback demos and tests, never for real services.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import itertools
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = datetime.UTC
_counter = itertools.count()
_directory: str | None = None


_KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """Return a KeyUsage extension that allows exactly the named usages."""
    return x509.KeyUsage(**{usage: usage in allowed for usage in _KEY_USAGES})


def write(data: bytes, suffix: str) -> str:
    """Write bytes to a new file in this process's private PKI directory; return its path."""
    global _directory  # noqa: PLW0603
    if _directory is None:
        # mkdtemp makes it readable by its owner only; it goes when the process does.
        _directory = tempfile.mkdtemp(prefix="otel-mtls-pki-")
        atexit.register(shutil.rmtree, _directory, ignore_errors=True)
    path = os.path.join(_directory, f"{next(_counter)}{suffix}")
    with open(path, "wb") as f:
        f.write(data)
    return path


@dataclass
class Leaf:
    """A certificate with its key, ready to load into an SSLContext."""

    certificate: x509.Certificate
    cert_path: str
    key_path: str

    @property
    def der(self) -> bytes:
        """The certificate in DER form."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def configure_cert(self, ctx: ssl.SSLContext) -> None:
        """Present this certificate from ``ctx``."""
        ctx.load_cert_chain(self.cert_path, self.key_path)


class Authority:
    """A self-signed CA that issues leaves."""

    def __init__(self, name: str, organization: str = "mTLS tests") -> None:
        self.organization = organization
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root"),
            ]
        )
        now = datetime.datetime.now(UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                _key_usage("digital_signature", "key_cert_sign", "crl_sign"),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self._cert_path: str | None = None

    @property
    def cert_path(self) -> str:
        """A file holding this CA's certificate (PEM), for servers that want a path."""
        if self._cert_path is None:
            self._cert_path = write(self.cert_pem, ".crt")
        return self._cert_path

    def configure_trust(self, ctx: ssl.SSLContext) -> None:
        """Trust certificates this CA issued on ``ctx``."""
        ctx.load_verify_locations(cadata=self.cert_pem.decode())

    def revocation_list(self, *revoked: Leaf) -> bytes:
        """Return a CRL (PEM), valid for a day, that revokes ``revoked``."""
        now = datetime.datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - datetime.timedelta(hours=1))
            .next_update(now + datetime.timedelta(days=1))
        )
        for leaf in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(leaf.certificate.serial_number)
                .revocation_date(now - datetime.timedelta(minutes=5))
                .build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str | None,
        *,
        dns: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        serial: int | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Leaf:
        """Issue a leaf for client and server use, with the given names and validity."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(UTC)
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization)]
        if common_name is not None:
            attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(hours=1))
            .not_valid_after(not_after or now + datetime.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Leaf(
            certificate=certificate,
            cert_path=write(certificate.public_bytes(serialization.Encoding.PEM), ".crt"),
            key_path=write(key_pem, ".key"),
        )
