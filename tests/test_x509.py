from __future__ import annotations

import base64
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
    FORWARDED_CACHE_SIZE,
    MAX_ALTERNATIVE_NAMES,
    TRUNCATED_NAMES,
    CertificateEncodingError,
    CertificateInfo,
    _iso8601,
    bounded_names,
    decode_base64,
    der_to_pem,
    first_pem_certificate,
    first_spiffe_id,
    parse_certificate,
    parse_forwarded_certificate,
    pem_certificates,
    sha256_hex,
)

UTC = datetime.UTC
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
    parse_forwarded_certificate.cache_clear()
    yield
    parse_certificate.cache_clear()
    parse_forwarded_certificate.cache_clear()


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


# --- many SANs -----------------------------------------------------------------------------


def _dns_names(count: int) -> list[x509.GeneralName]:
    return [x509.DNSName(f"host-{index}.example.org") for index in range(count)]


def test_at_most_max_alternative_names_are_kept_then_a_count() -> None:
    der = _build(_name((NameOID.COMMON_NAME, "many")), _dns_names(100))

    info = parse_certificate(der)

    assert MAX_ALTERNATIVE_NAMES == 64
    assert info.alternative_names == (
        *(f"DNS:host-{index}.example.org" for index in range(64)),
        f"{TRUNCATED_NAMES}36 more",
    )
    assert info.parse_error is None


def test_exactly_max_alternative_names_are_all_kept() -> None:
    der = _build(_name((NameOID.COMMON_NAME, "full")), _dns_names(MAX_ALTERNATIVE_NAMES))

    names = parse_certificate(der).alternative_names

    assert len(names) == MAX_ALTERNATIVE_NAMES
    assert not any(name.startswith(TRUNCATED_NAMES) for name in names)


def test_spiffe_id_past_the_cap_is_still_found_and_kept() -> None:
    sans = [*_dns_names(80), x509.UniformResourceIdentifier(SPIFFE_ID), *_dns_names(5)]
    der = _build(_name((NameOID.COMMON_NAME, "late-spiffe")), sans)

    info = parse_certificate(der)

    assert info.spiffe_id == SPIFFE_ID
    assert info.alternative_names[-2:] == (f"URI:{SPIFFE_ID}", f"{TRUNCATED_NAMES}21 more")


def test_bounded_names_keeps_spiffe_ids_past_the_cap_until_two() -> None:
    # A rule refusing "more than one SPIFFE ID" must see the second wherever it is.
    names = [f"DNS:{index}.example.org" for index in range(70)]
    spiffe = [f"URI:spiffe://example.org/{index}" for index in range(3)]

    kept = bounded_names([spiffe[0], *names, spiffe[1], spiffe[2]])

    assert kept[0] == spiffe[0]
    # 1 + 63 names fill the cap; the second SPIFFE ID is kept; 7 names and the third are not.
    assert kept[-2:] == (spiffe[1], f"{TRUNCATED_NAMES}8 more")
    assert sum(name.startswith("URI:spiffe://") for name in kept) == 2
    assert len(kept) == MAX_ALTERNATIVE_NAMES + 2


def test_bounded_names_leaves_short_lists_alone() -> None:
    names = ("DNS:a.example", "URI:spiffe://example.org/a")

    assert bounded_names(names) == names
    assert bounded_names([]) == ()
    assert first_spiffe_id(names) == "spiffe://example.org/a"
    assert first_spiffe_id(["URI:https://example.org/spiffe://x"]) is None


# --- forwarded certificates ----------------------------------------------------------------


def test_forwarded_certificates_have_their_own_cache() -> None:
    der = _build(
        _name((NameOID.COMMON_NAME, "forwarded")), [x509.UniformResourceIdentifier(SPIFFE_ID)]
    )

    forwarded = parse_forwarded_certificate(der)

    assert forwarded == parse_certificate(der)
    assert forwarded.spiffe_id == SPIFFE_ID
    assert parse_forwarded_certificate(der) is forwarded
    assert parse_certificate.cache_info().currsize == 1  # only the explicit call above


def test_forwarded_cache_is_bounded_and_leaves_the_handshake_cache_alone() -> None:
    assert parse_forwarded_certificate.cache_info().maxsize == FORWARDED_CACHE_SIZE < CACHE_SIZE
    der = _build(_name((NameOID.COMMON_NAME, "handshake")))
    handshake = parse_certificate(der)

    for index in range(FORWARDED_CACHE_SIZE + 10):
        parse_forwarded_certificate(index.to_bytes(4, "big"))

    assert parse_forwarded_certificate.cache_info().currsize == FORWARDED_CACHE_SIZE
    assert parse_certificate.cache_info().currsize == 1
    assert parse_certificate(der) is handshake  # still cached: not evicted by the others


# --- PEM, base64, fingerprints -------------------------------------------------------------

_LEAF = _build(_name((NameOID.COMMON_NAME, "pem-leaf")))
_SECOND = _build(_name((NameOID.COMMON_NAME, "pem-second")))
_KEY_PEM = _KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def test_sha256_hex_is_uppercase_and_matches_certificate_info() -> None:
    assert sha256_hex(_LEAF) == hashlib.sha256(_LEAF).hexdigest().upper()
    assert sha256_hex(_LEAF) == parse_certificate(_LEAF).sha256


def test_pem_certificates_reads_a_chain_with_text_around_it() -> None:
    pem = ("subject=CN=pem-leaf\n" + der_to_pem(_LEAF) + "junk\n" + der_to_pem(_SECOND)).encode()

    assert pem_certificates(pem) == [_LEAF, _SECOND]
    assert first_pem_certificate(pem) == _LEAF


def test_pem_certificates_ignores_whitespace_anywhere_in_a_block() -> None:
    # nginx's $ssl_client_cert puts a tab after every newline; h11 may fold those to spaces.
    tabbed = der_to_pem(_LEAF).rstrip("\n").replace("\n", "\n\t")
    folded = tabbed.replace("\n\t", " ")

    assert pem_certificates(tabbed.encode()) == [_LEAF]
    assert pem_certificates(folded.encode()) == [_LEAF]


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        (b"", "no certificate"),
        (b"hello world", "no certificate"),
        (_KEY_PEM, "not a certificate"),
        (der_to_pem(_LEAF).encode()[:-30], "malformed pem"),
        (b"-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----", "bad base64"),
        (b"-----BEGIN CERTIFICATE----------END CERTIFICATE-----", "bad base64"),
    ],
)
def test_pem_certificates_says_why_it_read_nothing(pem: bytes, reason: str) -> None:
    with pytest.raises(CertificateEncodingError) as raised:
        pem_certificates(pem)
    assert str(raised.value) == reason
    assert first_pem_certificate(pem) is None


def test_first_pem_certificate_does_not_read_past_the_first_block() -> None:
    pem = der_to_pem(_LEAF).encode() + b"-----BEGIN CERTIFICATE-----\n!!!!\n"

    assert first_pem_certificate(pem) == _LEAF
    with pytest.raises(CertificateEncodingError) as raised:
        pem_certificates(pem)
    assert str(raised.value) == "malformed pem"


def test_decode_base64_tolerates_whitespace_and_missing_padding() -> None:
    encoded = base64.b64encode(_LEAF)

    assert decode_base64(encoded) == _LEAF
    assert decode_base64(b" \t" + encoded.rstrip(b"=") + b"\r\n") == _LEAF


@pytest.mark.parametrize("data", [b"", b"  ", b"AAAAA", b"A=AA", b"not base64!", b"QUJD\x00"])
def test_decode_base64_refuses_what_is_not_base64(data: bytes) -> None:
    with pytest.raises(CertificateEncodingError) as raised:
        decode_base64(data)
    assert str(raised.value) == "bad base64"
