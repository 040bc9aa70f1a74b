"""Malformed and unusual certificates never make ``parse_certificate`` raise.

A peer chooses the bytes of its certificate: whatever it sends must give either the
certificate's attributes or a ``parse_error``, and always the SHA-256 of what was sent.
Inputs: every X.509 file of cryptography's own test vectors (``cryptography-vectors``:
odd encodings, bad extensions, CRLs, requests, OCSP messages), and mutations of a valid
certificate's DER (bits flipped, bytes inserted, deleted, truncated).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import Counter
from pathlib import Path

import cryptography_vectors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import PKI
from opentelemetry.instrumentation.mtls._x509 import CertificateInfo, parse_certificate

VECTORS = Path(cryptography_vectors.__file__).parent / "x509"
# DER files among the vectors: certificates (.der, PKITS's .crt), CRLs, certificate
# pairs, and DER-encoded requests and OCSP messages, which must give a parse_error.
DER_SUFFIXES = (".der", ".crt", ".crl", ".cp")
PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
CERTIFICATE_LABELS = (b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE")


def pem_blocks(text: bytes) -> list[tuple[str, bytes]]:
    """(label, DER) of every PEM block but private keys; headers such as Proc-Type skipped."""
    blocks = []
    for label, body in PEM_BLOCK.findall(text):
        if b"PRIVATE KEY" in label:
            continue
        lines = [line for line in body.splitlines() if b":" not in line]
        try:
            der = base64.b64decode(b"".join(lines))
        except (binascii.Error, ValueError):
            der = body  # not even base64: those bytes are an input too
        kind = "PEM certificate" if label in CERTIFICATE_LABELS else "PEM other"
        blocks.append((kind, der))
    return blocks


def vector_inputs() -> list[tuple[str, str, bytes]]:
    """(file, kind, bytes) for every certificate-like input in the vectors."""
    inputs = []
    for path in sorted(VECTORS.rglob("*")):
        name = str(path.relative_to(VECTORS))
        if path.suffix == ".pem":
            text = path.read_bytes()
            blocks = pem_blocks(text)
            inputs += [(name, kind, der) for kind, der in blocks]
            if not blocks and b"PRIVATE KEY" not in text:
                inputs.append((name, "PEM without blocks", text))
        elif path.suffix in DER_SUFFIXES:
            inputs.append((name, f"DER {path.suffix}", path.read_bytes()))
    return inputs


def check(info: CertificateInfo, der: bytes) -> None:
    """Attributes or a parse error, and the fingerprint of exactly these bytes."""
    assert isinstance(info, CertificateInfo)
    assert info.sha256 == hashlib.sha256(der).hexdigest().upper()
    if info.parse_error is None:
        # Nothing failed, so every field group was read.
        assert info.subject is not None
        assert info.issuer is not None
        assert info.serial_number is not None
        assert info.not_before is not None
        assert info.not_after is not None


def test_every_x509_vector_parses_without_an_exception() -> None:
    inputs = vector_inputs()
    raised: list[str] = []
    outcomes: Counter[tuple[str, str]] = Counter()
    for name, kind, der in inputs:
        try:
            info = parse_certificate(der)
        except Exception as exc:
            raised.append(f"{name}: {exc!r}")
            continue
        check(info, der)
        outcomes[kind, "parse_error" if info.parse_error else "attributes"] += 1
    parsed = sum(outcomes.values())
    summary = (
        f"{parsed} of {len(inputs)} inputs from {VECTORS} parsed without an exception: "
        + ", ".join(f"{kind} {result} {n}" for (kind, result), n in sorted(outcomes.items()))
    )
    print(summary)
    assert raised == [], summary
    assert parsed == len(inputs), summary
    # The vectors' certificates are mostly valid ones: the parser must not give up on them.
    assert outcomes["PEM certificate", "attributes"] >= 100, summary
    assert outcomes["DER .crt", "attributes"] >= 300, summary
    # Requests and OCSP messages are not certificates.
    assert outcomes["DER .der", "parse_error"] >= 30, summary


Mutation = tuple[str, int, int, bytes]

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
        st.integers(min_value=0, max_value=4096),  # where, modulo the length
        st.integers(min_value=0, max_value=255),  # a bit, a byte or a length
        st.binary(min_size=1, max_size=8),  # what to insert
    ),
    min_size=1,
    max_size=6,
)


def mutate(der: bytes, steps: list[Mutation]) -> bytes:
    data = bytearray(der)
    for operation, where, value, inserted in steps:
        at = where % (len(data) + 1)
        if operation == "insert":
            data[at:at] = inserted
        elif not data:
            continue
        elif operation == "flip":
            data[at % len(data)] ^= 1 << (value % 8)
        elif operation == "set":
            data[at % len(data)] = value
        elif operation == "delete":
            del data[at : at + 1 + value % 16]
        else:
            del data[at:]
    return bytes(data)


@pytest.fixture(scope="module")
def valid_der(pki: PKI) -> bytes:
    return pki.client.der


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    database=None,
)
@given(steps=mutations)
def test_mutated_certificates_never_raise(valid_der: bytes, steps: list[Mutation]) -> None:
    mutated = mutate(valid_der, steps)
    check(parse_certificate(mutated), mutated)


def test_the_unmutated_certificate_has_its_attributes(valid_der: bytes) -> None:
    """The control: the certificate the mutations start from parses completely."""
    info = parse_certificate(valid_der)
    assert info.parse_error is None
    assert info.common_name == "web-client"
    assert info.spiffe_id == "spiffe://example.org/ns/default/sa/web"
