from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
from collections.abc import Iterator, Sequence

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from opentelemetry.instrumentation.mtls._x509 import (
    CACHE_SIZE,
    CertificateInfo,
    _iso8601,
    der_to_pem,
    parse_certificate,
)

UTC = datetime.timezone.utc
NOT_BEFORE = datetime.datetime(2026, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime.datetime(2027, 6, 15, 12, 34, 56, tzinfo=UTC)
SERIAL = 0x0123456789ABCDEF0123
SPIFFE_ID = "spiffe://example.org/ns/default/sa/web"

_KEY = ec.generate_private_key(ec.SECP256R1())
_CA_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
        x509.NameAttribute(NameOID.COMMON_NAME, "Example Root CA"),
    ]
)


def _name(*attributes: tuple[ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _build(
    subject: x509.Name,
    sans: Sequence[x509.GeneralName] = (),
    *,
    serial: int = SERIAL,
    not_before: datetime.datetime = NOT_BEFORE,
    not_after: datetime.datetime = NOT_AFTER,
) -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(_CA_NAME)
        .public_key(_KEY.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _patch(der: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new)
    assert der.count(old) == 1
    return der.replace(old, new)


def _sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest().upper()


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    parse_certificate.cache_clear()
    yield
    parse_certificate.cache_clear()


def test_leaf_every_field() -> None:
    der = _build(
        _name(
            (NameOID.COUNTRY_NAME, "US"),
            (NameOID.ORGANIZATION_NAME, "Example Org"),
            (NameOID.COMMON_NAME, "web.example.org"),
        ),
        [
            x509.DNSName("web.example.org"),
            x509.UniformResourceIdentifier("https://example.org/web"),
            x509.UniformResourceIdentifier(SPIFFE_ID),
            x509.IPAddress(ipaddress.ip_address("192.0.2.10")),
            x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
            x509.RFC822Name("web@example.org"),
            x509.UniformResourceIdentifier("spiffe://example.org/ns/other/sa/api"),
        ],
    )

    info = parse_certificate(der)

    assert info == CertificateInfo(
        sha256=_sha256(der),
        subject="CN=web.example.org,O=Example Org,C=US",
        issuer="CN=Example Root CA,O=Example",
        not_before="2026-01-01T00:00:00.000Z",
        not_after="2027-06-15T12:34:56.000Z",
        not_after_timestamp=NOT_AFTER.timestamp(),
        serial_number="123456789ABCDEF0123",
        common_name="web.example.org",
        issuer_common_name="Example Root CA",
        alternative_names=(
            "DNS:web.example.org",
            "URI:https://example.org/web",
            f"URI:{SPIFFE_ID}",
            "IP:192.0.2.10",
            "IP:2001:db8::1",
            "email:web@example.org",
            "URI:spiffe://example.org/ns/other/sa/api",
        ),
        spiffe_id=SPIFFE_ID,
        parse_error=None,
    )
    assert len(info.sha256) == 64
    assert info.not_after_timestamp == 1813062896.0  # calendar.timegm((2027, 6, 15, 12, 34, 56))


def test_result_is_frozen() -> None:
    info = parse_certificate(_build(_name((NameOID.COMMON_NAME, "x"))))
    with pytest.raises(AttributeError):
        info.subject = "CN=y"  # type: ignore[misc]


def test_no_common_name_and_no_san() -> None:
    der = _build(_name((NameOID.ORGANIZATION_NAME, "Nameless")))

    info = parse_certificate(der)

    assert info.subject == "O=Nameless"
    assert info.common_name is None
    assert info.alternative_names == ()
    assert info.spiffe_id is None
    assert info.parse_error is None
    assert info.issuer_common_name == "Example Root CA"


def test_first_common_name_wins() -> None:
    der = _build(_name((NameOID.COMMON_NAME, "first"), (NameOID.COMMON_NAME, "second")))

    assert parse_certificate(der).common_name == "first"


def test_non_spiffe_uri_only() -> None:
    der = _build(
        _name((NameOID.COMMON_NAME, "api")),
        [
            x509.UniformResourceIdentifier("https://example.org/spiffe://not-a-spiffe-id"),
            x509.UniformResourceIdentifier("urn:example:spiffe"),
        ],
    )

    info = parse_certificate(der)

    assert info.alternative_names == (
        "URI:https://example.org/spiffe://not-a-spiffe-id",
        "URI:urn:example:spiffe",
    )
    assert info.spiffe_id is None
    assert info.parse_error is None


def test_other_general_name_kinds() -> None:
    der = _build(
        _name((NameOID.COMMON_NAME, "kinds")),
        [
            x509.DirectoryName(
                _name((NameOID.ORGANIZATION_NAME, "Dir"), (NameOID.COMMON_NAME, "d"))
            ),
            x509.RegisteredID(ObjectIdentifier("1.2.3.4")),
            x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x03abc"),
            x509.DNSName("after.example.org"),
        ],
    )

    info = parse_certificate(der)

    assert info.alternative_names == (
        "DirName:CN=d,O=Dir",
        "RID:1.2.3.4",
        "othername:1.3.6.1.4.1.311.20.2.3",
        "DNS:after.example.org",
    )
    assert info.parse_error is None


def test_generalized_time_and_zero_padding() -> None:
    der = _build(
        _name((NameOID.COMMON_NAME, "long")),
        serial=1,
        not_before=datetime.datetime(1999, 2, 3, 4, 5, 6, tzinfo=UTC),
        not_after=datetime.datetime(2055, 12, 31, 23, 59, 59, tzinfo=UTC),
    )

    info = parse_certificate(der)

    assert info.not_before == "1999-02-03T04:05:06.000Z"
    assert info.not_after == "2055-12-31T23:59:59.000Z"
    assert (
        info.not_after_timestamp
        == datetime.datetime(2055, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    )
    assert info.serial_number == "1"


def test_iso8601_keeps_milliseconds_and_converts_to_utc() -> None:
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    moment = datetime.datetime(2026, 1, 1, 2, 0, 0, 987654, tzinfo=plus_two)

    assert _iso8601(moment) == "2026-01-01T00:00:00.987Z"


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00", b"not a certificate", b"\x30\x82\xff\xff" + b"\x00" * 16, bytes(range(256))],
)
def test_garbage_sets_parse_error(garbage: bytes) -> None:
    info = parse_certificate(garbage)

    assert info == CertificateInfo(sha256=_sha256(garbage), parse_error=info.parse_error)
    assert info.parse_error == "ValueError"


def test_truncated_der_sets_parse_error() -> None:
    der = _build(_name((NameOID.COMMON_NAME, "cut")), [x509.DNSName("cut.example.org")])
    truncated = der[: len(der) // 2]

    info = parse_certificate(truncated)

    assert info.parse_error == "ValueError"
    assert info.sha256 == _sha256(truncated)
    assert info.subject is None
    assert info.alternative_names == ()


def test_pem_instead_of_der_sets_parse_error() -> None:
    pem = der_to_pem(_build(_name((NameOID.COMMON_NAME, "pem")))).encode()

    assert parse_certificate(pem).parse_error == "ValueError"


def test_malformed_san_is_lazy_error_and_keeps_other_fields() -> None:
    der = _build(
        _name((NameOID.COMMON_NAME, "bad-san")),
        [x509.DNSName("a.example.org"), x509.UniformResourceIdentifier(SPIFFE_ID)],
    )
    # Shrink the DNS name's length byte: the outer DER stays valid, so the certificate
    # loads, but the SAN extension's inner GeneralNames only fail when they are decoded.
    bad = _patch(der, b"\x82\x0da.example.org", b"\x82\x05a.example.org")

    info = parse_certificate(bad)

    assert info.parse_error == "ValueError"
    assert info.sha256 == _sha256(bad)
    assert info.subject == "CN=bad-san"
    assert info.common_name == "bad-san"
    assert info.issuer == "CN=Example Root CA,O=Example"
    assert info.serial_number == "123456789ABCDEF0123"
    assert info.not_after == "2027-06-15T12:34:56.000Z"
    assert info.alternative_names == ()
    assert info.spiffe_id is None


def test_malformed_subject_keeps_san_and_spiffe_id() -> None:
    der = _build(
        _name((NameOID.COMMON_NAME, "zzsubject")), [x509.UniformResourceIdentifier(SPIFFE_ID)]
    )
    # Invalid UTF-8 inside the subject's UTF8String: only decoding the subject fails.
    bad = _patch(der, b"zzsubject", b"\xff\xfesubject")

    info = parse_certificate(bad)

    assert info.parse_error == "ValueError"
    assert info.subject is None
    assert info.common_name is None
    assert info.issuer_common_name == "Example Root CA"
    assert info.spiffe_id == SPIFFE_ID


def test_negative_serial_does_not_leak_warning() -> None:
    der = _build(_name((NameOID.COMMON_NAME, "neg")), serial=0x1234)
    # Flip the sign bit of the two-byte serial: RFC 5280 forbids it, cryptography warns
    # (CryptographyDeprecationWarning) when loading it; under -W error that would raise.
    bad = _patch(der, b"\x02\x02\x12\x34", b"\x02\x02\x92\x34")

    info = parse_certificate(bad)

    assert info.sha256 == _sha256(bad)
    if info.parse_error is None:  # cryptography still accepts it
        assert info.serial_number == "-6DCC"
        assert info.subject == "CN=neg"
    else:  # a future cryptography may reject it outright
        assert info.serial_number is None


def test_trustme_leaf() -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("example.org", "192.0.2.1", "user@example.org", common_name="svc")
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())

    info = parse_certificate(der)

    assert info.parse_error is None
    assert info.common_name == "svc"
    assert info.alternative_names == ("DNS:example.org", "IP:192.0.2.1", "email:user@example.org")
    assert info.issuer is not None
    assert info.not_after_timestamp is not None
    assert info.sha256 == _sha256(der)


def test_cache_returns_identical_object_for_equal_bytes() -> None:
    der = _build(_name((NameOID.COMMON_NAME, "cached")))

    first = parse_certificate(bytes(bytearray(der)))
    hits = parse_certificate.cache_info().hits
    second = parse_certificate(bytes(bytearray(der)))

    assert second is first
    assert parse_certificate.cache_info().hits == hits + 1


def test_cache_is_bounded() -> None:
    assert CACHE_SIZE == 4096
    assert parse_certificate.cache_info().maxsize == CACHE_SIZE

    for index in range(CACHE_SIZE + 10):
        parse_certificate(index.to_bytes(4, "big"))

    assert parse_certificate.cache_info().currsize == CACHE_SIZE


def test_der_to_pem_round_trip() -> None:
    der = _build(_name((NameOID.COMMON_NAME, "pem")))

    pem = der_to_pem(der)

    assert pem.startswith("-----BEGIN CERTIFICATE-----\n")
    assert pem.rstrip().endswith("-----END CERTIFICATE-----")
    assert ssl.PEM_cert_to_DER_cert(pem) == der
    loaded = x509.load_pem_x509_certificate(pem.encode())
    assert loaded.public_bytes(serialization.Encoding.DER) == der
