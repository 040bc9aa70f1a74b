from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from opentelemetry.instrumentation.mtls._cli.pki import Authority
from opentelemetry.instrumentation.mtls._requests.proxy_headers import (
    MAX_HEADER_SIZE,
    ProxiedIdentity,
    parse_nginx,
    parse_rfc9440,
    parse_traefik,
    parse_xfcc,
)
from opentelemetry.instrumentation.mtls._x509 import der_to_pem, parse_certificate

SPIFFE_ID = "spiffe://example.org/ns/a/sa/web"
CA = Authority("Test CA")
LEAF = CA.issue("web", uris=(SPIFFE_ID,), dns=("web.example.org",))
LEAF_DER = LEAF.der
LEAF_PEM = der_to_pem(LEAF_DER)
# Authority cannot issue intermediates; other CAs' certificates stand in for them; the
# headers carry certificates, not trust, so any certificate serves.
INTERMEDIATE_DER = CA.certificate.public_bytes(serialization.Encoding.DER)
SECOND_DER = Authority("Other CA").certificate.public_bytes(serialization.Encoding.DER)
LEAF_SHA256 = hashlib.sha256(LEAF_DER).hexdigest()
# DER that is well-formed but no certificate: a SubjectPublicKeyInfo.
KEY_DER = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
)
KEY_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def _b64(der: bytes) -> str:
    return base64.b64encode(der).decode()


def _fake_cert_pem(der: bytes) -> str:
    """A CERTIFICATE block whose content is not a certificate."""
    return f"-----BEGIN CERTIFICATE-----\n{_b64(der)}\n-----END CERTIFICATE-----\n"


def _envoy_escape(pem: str) -> str:
    # Envoy's urlEncodedPemEncodedPeerCertificate percent-encodes newline, space, +, / and =.
    return quote(pem, safe="")


def _traefik_body(der: bytes) -> str:
    # Traefik's sanitize(): drop BEGIN/END lines and newlines (v2 then url.QueryEscape()s it).
    pem = der_to_pem(der)
    for marker in ("-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----", "\n"):
        pem = pem.replace(marker, "")
    return pem


def _nginx_tabbed(pem: str) -> str:
    # nginx $ssl_client_cert: the PEM minus its final newline, a tab after every other one.
    return pem.rstrip("\n").replace("\n", "\n\t")


def _failed(identity: ProxiedIdentity, source: str, error: str) -> None:
    assert identity == ProxiedIdentity(source, error=error)


# --- Envoy XFCC ----------------------------------------------------------------------------


def test_xfcc_full_element_from_envoy() -> None:
    subject = LEAF.certificate.subject.rfc4514_string()
    chain = _envoy_escape(LEAF_PEM + der_to_pem(INTERMEDIATE_DER))
    value = (
        f"By=spiffe://example.org/ns/a/sa/backend;Hash={LEAF_SHA256};"
        f'Cert="{_envoy_escape(LEAF_PEM)}";Chain="{chain}";Subject="{subject}";'
        f"URI={SPIFFE_ID};DNS=web.example.org"
    )

    identity = parse_xfcc(value)

    assert identity.error is None
    assert identity.source == "xfcc"
    assert identity.leaf_der == LEAF_DER
    assert identity.chain_der == (INTERMEDIATE_DER,)  # Envoy's Chain= repeats the leaf first
    assert identity.subject == subject == "CN=web,O=mTLS tests"
    assert identity.uris == (SPIFFE_ID,)
    assert identity.dns == ("web.example.org",)
    assert identity.hash_sha256 == LEAF_SHA256.upper()


def test_xfcc_envoy_documentation_example() -> None:
    value = (
        "By=spiffe://cluster.local/ns/default/sa/backend;"
        "Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;"
        'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";'
        "URI=spiffe://cluster.local/ns/default/sa/frontend;DNS=lyft.com;DNS=www.lyft.com"
    )

    identity = parse_xfcc(value)

    assert identity == ProxiedIdentity(
        "xfcc",
        subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client",
        uris=("spiffe://cluster.local/ns/default/sa/frontend",),
        dns=("lyft.com", "www.lyft.com"),
        hash_sha256="468ED33BE74EEE6556D90C0149C1309E9BA61D6425303443C0748A02DD8DE688",
    )


def test_xfcc_subject_with_commas_semicolons_and_escaped_quotes() -> None:
    value = r"Hash=" + LEAF_SHA256 + r';Subject="CN=Test \"Client\",OU=Lyft\, Inc.,O=A;B=C";URI='

    identity = parse_xfcc(value)

    assert identity.error is None
    assert identity.subject == r'CN=Test "Client",OU=Lyft\, Inc.,O=A;B=C'
    assert identity.uris == ()  # Envoy writes a bare "URI=" when there is no URI SAN
    assert identity.hash_sha256 == LEAF_SHA256.upper()


def test_xfcc_takes_the_last_element() -> None:
    first = (
        "By=spiffe://a/edge;Hash=" + "ab" * 32 + ';Subject="CN=forged, O=\\"x\\";z";'
        "URI=spiffe://example.org/forged;DNS=forged.example.org"
    )
    second = 'By=spiffe://a/mid;Subject="CN=mid,O=x";URI=spiffe://example.org/mid'
    last = f'By=spiffe://a/backend;Cert="{_envoy_escape(LEAF_PEM)}";URI={SPIFFE_ID}'

    identity = parse_xfcc(f"{first},{second},{last}")

    assert identity.error is None
    assert identity.leaf_der == LEAF_DER
    assert identity.uris == (SPIFFE_ID,)
    assert identity.subject is None
    assert identity.dns == ()
    assert identity.hash_sha256 == LEAF_SHA256.upper()  # computed from Cert=


def test_xfcc_chain_without_cert_gives_leaf_and_intermediates() -> None:
    pems = LEAF_PEM + der_to_pem(INTERMEDIATE_DER) + der_to_pem(SECOND_DER)
    identity = parse_xfcc(f'Chain="{_envoy_escape(pems)}"')

    assert identity.error is None
    assert identity.leaf_der == LEAF_DER
    assert identity.chain_der == (INTERMEDIATE_DER, SECOND_DER)


def test_xfcc_keys_are_case_insensitive_and_whitespace_tolerated() -> None:
    value = f' hash={LEAF_SHA256.upper()} ; uri = {SPIFFE_ID} ; dns=a.example ; DNS="b.example" '

    identity = parse_xfcc(value)

    assert identity == ProxiedIdentity(
        "xfcc",
        uris=(SPIFFE_ID,),
        dns=("a.example", "b.example"),
        hash_sha256=LEAF_SHA256.upper(),
    )


def test_xfcc_accepts_bytes_and_unknown_keys() -> None:
    value = f"By=spiffe://x;Future=1;URI={SPIFFE_ID}".encode("latin-1")

    assert parse_xfcc(value) == ProxiedIdentity("xfcc", uris=(SPIFFE_ID,))


def test_xfcc_leaf_round_trips_through_parse_certificate() -> None:
    identity = parse_xfcc(f'Cert="{_envoy_escape(LEAF_PEM)}"')

    assert identity.leaf_der is not None
    info = parse_certificate(identity.leaf_der)
    assert info.spiffe_id == SPIFFE_ID
    assert info.sha256 == identity.hash_sha256


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("", "empty header"),
        ("   ", "empty header"),
        ('Subject="CN=unterminated', "unbalanced quotes"),
        ('By=x,Subject="CN=a', "unbalanced quotes"),
        ('Subject="CN=a\\"', "unbalanced quotes"),
        ("By=x;Hash", "malformed xfcc element"),
        ("=value", "malformed xfcc element"),
        ('Subject=CN="a"', "malformed xfcc element"),
        ('Subject="a"b', "malformed xfcc element"),
        ("By=x,", "malformed xfcc element"),
        ("Foo=bar", "malformed xfcc element"),
        ("Hash=aa;Hash=bb", "duplicate xfcc key"),
        ("Hash=not-hex", "bad hash"),
        ("Hash=" + "a" * 63, "bad hash"),
        (
            "Hash=" + "0" * 64 + ';Cert="' + _envoy_escape(LEAF_PEM) + '"',
            "hash does not match cert",
        ),
        ('Cert="%ZZ%0A"', "bad url escape"),
        ('Cert="hello%20world"', "no certificate"),
        ('Cert="' + _envoy_escape(KEY_PEM) + '"', "not a certificate"),
        ('Cert="' + _envoy_escape(_fake_cert_pem(KEY_DER)) + '"', "not a certificate"),
        ('Cert="' + _envoy_escape(_fake_cert_pem(b"\x30\x03abc")) + '"', "not a certificate"),
        ('Cert="' + _envoy_escape(LEAF_PEM[:-30]) + '"', "malformed pem"),
        (
            'Cert="' + _envoy_escape(LEAF_PEM.replace("M", "!", 1)) + '"',
            "bad base64",
        ),
    ],
)
def test_xfcc_malformed(value: str, error: str) -> None:
    _failed(parse_xfcc(value), "xfcc", error)


# --- RFC 9440 ------------------------------------------------------------------------------


def test_rfc9440_leaf() -> None:
    identity = parse_rfc9440(f":{_b64(LEAF_DER)}:")

    assert identity == ProxiedIdentity(
        "rfc9440", leaf_der=LEAF_DER, hash_sha256=LEAF_SHA256.upper()
    )


def test_rfc9440_chain_of_two_with_whitespace() -> None:
    chain = f"  :{_b64(INTERMEDIATE_DER)}: ,\t:{_b64(SECOND_DER)}:  "

    identity = parse_rfc9440(f" :{_b64(LEAF_DER)}: ", chain)

    assert identity.error is None
    assert identity.leaf_der == LEAF_DER
    assert identity.chain_der == (INTERMEDIATE_DER, SECOND_DER)


def test_rfc9440_tolerates_missing_padding_parameters_and_empty_chain() -> None:
    unpadded = _b64(LEAF_DER).rstrip("=")

    identity = parse_rfc9440(f":{unpadded}:;foo=1;bar".encode("latin-1"), "")

    assert identity.error is None
    assert identity.leaf_der == LEAF_DER
    assert identity.chain_der == ()


@pytest.mark.parametrize(
    ("cert", "chain", "error"),
    [
        ("", None, "empty header"),
        (_b64(LEAF_DER), None, "malformed byte sequence"),
        (f":{_b64(LEAF_DER)}", None, "malformed byte sequence"),
        (f"{_b64(LEAF_DER)}:", None, "malformed byte sequence"),
        (f'"{_b64(LEAF_DER)}"', None, "malformed byte sequence"),
        (f":{_b64(LEAF_DER)}:, :{_b64(LEAF_DER)}:", None, "malformed byte sequence"),
        (":not base64!:", None, "malformed byte sequence"),
        (":AAAAA:", None, "bad base64"),
        (":A=AA:", None, "bad base64"),
        ("::", None, "bad base64"),
        (f":{_b64(KEY_DER)}:", None, "not a certificate"),
        (f":{_b64(b'junk')}:", None, "not a certificate"),
        (f":{_b64(LEAF_DER)}:", f":{_b64(INTERMEDIATE_DER)}:,", "malformed byte sequence"),
        (f":{_b64(LEAF_DER)}:", _b64(INTERMEDIATE_DER), "malformed byte sequence"),
        (f":{_b64(LEAF_DER)}:", f":{_b64(KEY_DER)}:", "not a certificate"),
    ],
)
def test_rfc9440_malformed(cert: str, chain: str | None, error: str) -> None:
    _failed(parse_rfc9440(cert, chain), "rfc9440", error)


# --- Traefik -------------------------------------------------------------------------------

# The example of Traefik's passTLSClientCert documentation: three certificates' info.
TRAEFIK_INFO = (
    'Subject="DC=org,DC=cheese,C=FR,C=US,ST=Cheese org state,ST=Cheese com state,'
    'L=TOULOUSE,L=LYON,O=Cheese,O=Cheese 2,CN=*.example.com";'
    'Issuer="DC=org,DC=cheese,C=FR,C=US,ST=Signing State,ST=Signing State 2,L=TOULOUSE,'
    'L=LYON,O=Cheese,O=Cheese 2,CN=Simple Signing CA 2";NB="1544094616";NA="1607166616";'
    'SAN="*.example.org,*.example.net,*.example.com,test@example.org,test@example.net,'
    '10.0.1.0,10.0.1.2,::1,spiffe://example.org/ns/a/sa/web,urn:example:x",'
    'Subject="DC=org,DC=cheese,C=FR,ST=Signing State,L=TOULOUSE,O=Cheese,CN=Simple Signing CA";'
    'Issuer="DC=org,DC=cheese,C=FR,ST=Signing State,L=TOULOUSE,O=Cheese,CN=Simple Signing CA";'
    'NB="1544094616";NA="1607166616",'
    'Subject="C=FR";Issuer="C=FR";NB="1";NA="2"'
)


def test_traefik_pem_escaped_v2_and_bare_v3() -> None:
    escaped = parse_traefik(quote(_traefik_body(LEAF_DER), safe=""), None)
    bare = parse_traefik(_traefik_body(LEAF_DER), None)

    expected = ProxiedIdentity("traefik", leaf_der=LEAF_DER, hash_sha256=LEAF_SHA256.upper())
    assert escaped == expected
    assert bare == expected


def test_traefik_several_certificates() -> None:
    value = ",".join(
        quote(_traefik_body(der), safe="") for der in (LEAF_DER, INTERMEDIATE_DER, SECOND_DER)
    )

    identity = parse_traefik(value, None)

    assert identity.error is None
    assert identity.leaf_der == LEAF_DER
    assert identity.chain_der == (INTERMEDIATE_DER, SECOND_DER)


def test_traefik_info_documentation_sample_takes_the_leaf() -> None:
    # Go's url.QueryEscape: spaces become "+", everything else but [A-Za-z0-9-_.~] is %XX.
    identity = parse_traefik(None, quote_plus(TRAEFIK_INFO, safe=""))

    assert identity == ProxiedIdentity(
        "traefik",
        subject=(
            "DC=org,DC=cheese,C=FR,C=US,ST=Cheese org state,ST=Cheese com state,"
            "L=TOULOUSE,L=LYON,O=Cheese,O=Cheese 2,CN=*.example.com"
        ),
        uris=("spiffe://example.org/ns/a/sa/web", "urn:example:x"),
        dns=("*.example.org", "*.example.net", "*.example.com"),
    )


def test_traefik_pem_and_info_together() -> None:
    # What Traefik sends for LEAF with pem: true and info.subject/sans enabled.
    info = f'Subject="O=mTLS tests,CN=web";NB="1";NA="2";SAN="web.example.org,{SPIFFE_ID}"'
    pem = quote(_traefik_body(LEAF_DER), safe="")

    identity = parse_traefik(pem.encode("latin-1"), quote_plus(info, safe="").encode("latin-1"))

    assert identity == ProxiedIdentity(
        "traefik",
        leaf_der=LEAF_DER,
        subject="O=mTLS tests,CN=web",
        uris=(SPIFFE_ID,),
        dns=("web.example.org",),
        hash_sha256=LEAF_SHA256.upper(),
    )


@pytest.mark.parametrize(
    ("pem", "info", "error"),
    [
        (None, None, "empty header"),
        ("", " ", "empty header"),
        ("%%%", None, "bad url escape"),
        ("%GGabc", None, "bad url escape"),
        ("not*base64", None, "bad base64"),
        (quote(_traefik_body(LEAF_DER), safe="") + ",", None, "bad base64"),
        (_b64(KEY_DER), None, "not a certificate"),
        (_b64(b"garbage!"), None, "not a certificate"),
        (None, quote_plus('Subject="CN=a', safe=""), "unbalanced quotes"),
        (None, quote_plus('Subject="CN=a";NB', safe=""), "malformed traefik info"),
        (None, quote_plus('Subject=CN="a"', safe=""), "malformed traefik info"),
        (None, "Subject%3D%22CN%3Da%22%Z", "bad url escape"),
        (_traefik_body(LEAF_DER), quote_plus('SAN="x', safe=""), "unbalanced quotes"),
    ],
)
def test_traefik_malformed(pem: str | None, info: str | None, error: str) -> None:
    _failed(parse_traefik(pem, info), "traefik", error)


# --- nginx ---------------------------------------------------------------------------------


def test_nginx_escaped_cert() -> None:
    identity = parse_nginx(quote(LEAF_PEM, safe=""))

    assert identity == ProxiedIdentity("nginx", leaf_der=LEAF_DER, hash_sha256=LEAF_SHA256.upper())


def test_nginx_tab_continued_cert_raw_and_folded() -> None:
    tabbed = _nginx_tabbed(LEAF_PEM)
    assert "\n\t-----END CERTIFICATE-----" in tabbed
    folded = tabbed.replace("\n\t", " ")  # what h11 hands the app for an obs-folded header

    assert parse_nginx(tabbed).leaf_der == LEAF_DER
    assert parse_nginx(folded.encode("latin-1")).leaf_der == LEAF_DER
    assert parse_nginx(folded).error is None


def test_nginx_escaped_chain() -> None:
    identity = parse_nginx(quote(LEAF_PEM + der_to_pem(INTERMEDIATE_DER), safe=""))

    assert identity.leaf_der == LEAF_DER
    assert identity.chain_der == (INTERMEDIATE_DER,)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("", "empty header"),
        ("%E2%82%ZZ", "bad url escape"),
        ("%41%42%43", "no certificate"),
        ("hello world", "no certificate"),
        (quote(KEY_PEM, safe=""), "not a certificate"),
        (_nginx_tabbed(_fake_cert_pem(KEY_DER)), "not a certificate"),
        (quote(LEAF_PEM.split("-----END")[0], safe=""), "malformed pem"),
        ("-----BEGIN CERTIFICATE-----\n\t@@@@\n\t-----END CERTIFICATE-----", "bad base64"),
        ("-----BEGIN CERTIFICATE----------END CERTIFICATE-----", "bad base64"),
    ],
)
def test_nginx_malformed(value: str, error: str) -> None:
    _failed(parse_nginx(value), "nginx", error)


# --- every parser --------------------------------------------------------------------------

PARSERS: dict[str, Callable[[str | bytes], ProxiedIdentity]] = {
    "xfcc": parse_xfcc,
    "rfc9440": parse_rfc9440,
    "traefik-pem": lambda value: parse_traefik(value, None),
    "traefik-info": lambda value: parse_traefik(None, value),
    "nginx": parse_nginx,
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_huge_value_is_refused_quickly(name: str) -> None:
    parse = PARSERS[name]
    huge = "A" * (1024 * 1024)

    started = time.perf_counter()
    identity = parse(huge)
    elapsed = time.perf_counter() - started

    assert identity.error == "header too large"
    assert identity.leaf_der is None
    assert elapsed < 0.1
    assert parse(huge.encode("latin-1")).error == "header too large"


ADVERSARIAL = [
    '"' * (MAX_HEADER_SIZE - 1),
    '"\\' * (MAX_HEADER_SIZE // 2),
    "," * MAX_HEADER_SIZE,
    ";" * MAX_HEADER_SIZE,
    "a=" * (MAX_HEADER_SIZE // 2),
    "%" * MAX_HEADER_SIZE,
    "%41" * (MAX_HEADER_SIZE // 3),
    "-----BEGIN CERTIFICATE-----" * (MAX_HEADER_SIZE // 28),
    ":" + "A" * (MAX_HEADER_SIZE - 2) + ":",
    ":AA:," * (MAX_HEADER_SIZE // 5),
]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_adversarial_values_under_the_cap_are_fast(name: str) -> None:
    parse = PARSERS[name]
    for value in ADVERSARIAL:
        started = time.perf_counter()
        identity = parse(value)
        elapsed = time.perf_counter() - started

        assert identity.leaf_der is None
        assert identity.error is None or not identity.error.startswith("internal error")
        assert elapsed < 0.5, (value[:20], elapsed)


def _check_never_raises(identity: ProxiedIdentity) -> None:
    assert isinstance(identity, ProxiedIdentity)
    assert identity.error is None or not identity.error.startswith("internal error")
    if identity.error is not None:
        assert identity == ProxiedIdentity(identity.source, error=identity.error)


# Text biased toward the characters these formats give meaning to.
_STRUCTURED = st.text(alphabet=st.sampled_from('=;,:"\\% \t\nAaZz09+/-%ByHashCertURIDNS'))
_ANY = st.one_of(st.text(), _STRUCTURED)


@settings(max_examples=300, deadline=None)
@given(value=_ANY, other=st.one_of(st.none(), _ANY))
def test_no_string_makes_a_parser_raise(value: str, other: str | None) -> None:
    _check_never_raises(parse_xfcc(value))
    _check_never_raises(parse_rfc9440(value, other))
    _check_never_raises(parse_traefik(value, other))
    _check_never_raises(parse_traefik(other, value))
    _check_never_raises(parse_nginx(value))


@settings(max_examples=100, deadline=None)
@given(value=st.binary())
def test_no_bytes_make_a_parser_raise(value: bytes) -> None:
    for parse in PARSERS.values():
        _check_never_raises(parse(value))
