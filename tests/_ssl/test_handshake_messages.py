"""The Certificate and CertificateRequest parsers, on messages of a real loopback handshake."""

from __future__ import annotations

import ssl
import struct
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from conftest import PKI
from opentelemetry.instrumentation.mtls._ssl import handshake_messages as messages
from opentelemetry.instrumentation.mtls._x509 import pem_certificates
from tlsrun import blocking

TLS13 = ssl.TLSVersion.TLSv1_3
TLS12 = ssl.TLSVersion.TLSv1_2


def received(pki: PKI, version: ssl.TLSVersion) -> dict[int, bytes]:
    """The handshake messages a client read in one real handshake, by type."""
    seen: dict[int, bytes] = {}
    client = pki.client_context(pki.client)

    def keep(_conn: Any, direction: str, _v: Any, content_type: Any, _t: Any, data: bytes) -> None:
        if direction == "read" and content_type == 22 and data:  # handshake
            seen.setdefault(data[0], data)

    client._msg_callback = keep  # type: ignore[attr-defined]  # the stdlib's debug hook
    outcome = blocking(pki.server_context(maximum_version=version), client)
    assert outcome.client.startswith("ok")
    return seen


@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls1.3", "tls1.2"])
def test_the_chain_and_the_request_of_a_real_handshake(pki: PKI, version: ssl.TLSVersion) -> None:
    seen = received(pki, version)
    tls13 = version == TLS13
    chain = messages.certificate_chain(seen[messages.CERTIFICATE], tls13=tls13)
    # The leaf, then the CA that OpenSSL adds from the server's trust store.
    with open(pki.ca.cert_path, "rb") as f:
        assert chain == [pki.server.der, *pem_certificates(f.read())]
    # Python's servers name no acceptable CA: an empty list, not None.
    assert messages.certificate_authorities(seen[messages.CERTIFICATE_REQUEST], tls13=tls13) == []
    # Negative control: parsed with the other version's layout, the lengths do not add up.
    assert messages.certificate_chain(seen[messages.CERTIFICATE], tls13=not tls13) is None


def _vector(data: bytes, size: int) -> bytes:
    return len(data).to_bytes(size, "big") + data


def _handshake(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _vector(body, 3)


NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Ltd"),
        x509.NameAttribute(NameOID.COMMON_NAME, "Client CA é"),
    ]
)


def test_ca_names_of_both_layouts() -> None:
    der = NAME.public_bytes()
    names = _vector(_vector(der, 2), 2)
    tls12 = _handshake(13, _vector(b"\x40", 1) + _vector(b"\x04\x03", 2) + names)
    extension = struct.pack("!H", 47) + _vector(names, 2)
    tls13 = _handshake(13, _vector(b"", 1) + _vector(extension, 2))
    assert messages.certificate_authorities(tls12, tls13=False) == [der]
    assert messages.certificate_authorities(tls13, tls13=True) == [der]
    assert messages.distinguished_name(der).text == NAME.rfc4514_string()
    assert messages.distinguished_name(der).text == "CN=Client CA é,O=Example Ltd"
    # Negative controls: a truncated message, another message type, a broken name.
    assert messages.certificate_authorities(tls12[:-3], tls13=False) is None
    assert messages.certificate_authorities(b"\x0b" + tls12[1:], tls13=False) is None
    assert messages.distinguished_name(der[:-2]).text.startswith("(unreadable name, DER 30")
