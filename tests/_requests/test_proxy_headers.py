from __future__ import annotations

import base64
import datetime
import gc
import hashlib
import time
import tracemalloc
from collections.abc import Callable, Iterator
from urllib.parse import quote, quote_plus

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import given, settings
from hypothesis import strategies as st

from opentelemetry.instrumentation.mtls._requests.proxy_headers import (
    DEFAULT_NGINX_HEADER,
    FORMATS,
    HEADER_NAMES,
    MAX_CERTIFICATE_SIZE,
    MAX_CHAIN_LENGTH,
    MAX_HEADER_SIZE,
    ProxiedIdentity,
    header_names,
    parse_nginx,
    parse_proxy_headers,
    parse_rfc9440,
    parse_traefik,
    parse_xfcc,
)
from opentelemetry.instrumentation.mtls._x509 import (
    FORWARDED_CACHE_SIZE,
    MAX_ALTERNATIVE_NAMES,
    TRUNCATED_NAMES,
    CertificateInfo,
    der_to_pem,
    parse_certificate,
    parse_forwarded_certificate,
)
from pki import Authority

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


# Envoy's documented examples, verbatim: "Some examples of the XFCC header are", in
# https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/headers#x-forwarded-client-cert
# (docs/root/configuration/http/http_conn_man/headers.rst).
ENVOY_HASH = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
ENVOY_ONE_URI = (
    f"By=http://frontend.lyft.com;Hash={ENVOY_HASH};"
    'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com'
)
ENVOY_TWO_CERTIFICATES = (
    f"By=http://frontend.lyft.com;Hash={ENVOY_HASH};URI=http://testclient.lyft.com,"
    "By=http://backend.lyft.com;Hash=9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e;"
    "URI=http://frontend.lyft.com"
)
ENVOY_URI_AND_DNS = f"{ENVOY_ONE_URI};DNS=lyft.com;DNS=www.lyft.com"
# What an Istio sidecar sends the application (its SVIDs have an empty subject): the
# httpbin /headers output in Istio's "Mirroring" task,
# https://istio.io/latest/docs/tasks/traffic-management/mirroring/
ISTIO_SIDECAR = (
    "By=spiffe://cluster.local/ns/default/sa/default;"
    "Hash=20afebed6da091c850264cc751b8c9306abac02993f80bdb76282237422bd098;"
    'Subject="";URI=spiffe://cluster.local/ns/default/sa/default'
)
# Envoy's Hash and URI only (set_current_client_cert_details: uri: true), SPIFFE IDs.
ENVOY_HASH_AND_URI = (
    f"By=spiffe://cluster.local/ns/default/sa/frontend;Hash={ENVOY_HASH};"
    "URI=spiffe://cluster.local/ns/default/sa/backend"
)
LYFT_SUBJECT = "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            ENVOY_ONE_URI,
            CertificateInfo(
                sha256=ENVOY_HASH.upper(),
                subject=LYFT_SUBJECT,
                alternative_names=("URI:http://testclient.lyft.com",),
            ),
            id="envoy-one-uri",
        ),
        pytest.param(
            ENVOY_TWO_CERTIFICATES,
            # The last element is the nearest proxy's: its peer was the frontend proxy.
            CertificateInfo(
                sha256="9BA61D6425303443C0748A02DD8DE688468ED33BE74EEE6556D90C0149C1309E",
                alternative_names=("URI:http://frontend.lyft.com",),
            ),
            id="envoy-two-certificates",
        ),
        pytest.param(
            ENVOY_URI_AND_DNS,
            CertificateInfo(
                sha256=ENVOY_HASH.upper(),
                subject=LYFT_SUBJECT,
                alternative_names=(
                    "URI:http://testclient.lyft.com",
                    "DNS:lyft.com",
                    "DNS:www.lyft.com",
                ),
            ),
            id="envoy-uri-and-dns",
        ),
        pytest.param(
            ISTIO_SIDECAR,
            CertificateInfo(
                sha256="20AFEBED6DA091C850264CC751B8C9306ABAC02993F80BDB76282237422BD098",
                alternative_names=("URI:spiffe://cluster.local/ns/default/sa/default",),
                spiffe_id="spiffe://cluster.local/ns/default/sa/default",
            ),
            id="istio-sidecar",
        ),
        pytest.param(
            ENVOY_HASH_AND_URI,
            CertificateInfo(
                sha256=ENVOY_HASH.upper(),
                alternative_names=("URI:spiffe://cluster.local/ns/default/sa/backend",),
                spiffe_id="spiffe://cluster.local/ns/default/sa/backend",
            ),
            id="envoy-hash-and-spiffe-uri",
        ),
    ],
)
def test_xfcc_documented_samples_yield_an_identity(value: str, expected: CertificateInfo) -> None:
    identity = parse_proxy_headers("xfcc", {b"x-forwarded-client-cert": value.encode("latin-1")})

    assert identity is not None
    assert identity.error is None
    assert identity.source == "xfcc"
    assert identity.leaf_der is None
    assert identity == parse_xfcc(value)
    assert identity.certificate_info() == expected


def test_xfcc_istio_empty_subject_is_no_subject() -> None:
    identity = parse_xfcc(ISTIO_SIDECAR)

    assert identity.subject is None
    assert identity.uris == ("spiffe://cluster.local/ns/default/sa/default",)
    assert identity.hash_sha256 == (
        "20AFEBED6DA091C850264CC751B8C9306ABAC02993F80BDB76282237422BD098"
    )


@pytest.mark.parametrize(
    "value",
    [
        "By=spiffe://cluster.local/ns/default/sa/backend",  # the proxy's own name only
        'By=spiffe://a/b;Subject="";URI=;DNS=',
        f"Hash={ENVOY_HASH},By=spiffe://cluster.local/ns/default/sa/backend",  # last has none
    ],
)
def test_xfcc_element_without_client_identity_gives_no_certificate(value: str) -> None:
    identity = parse_xfcc(value)

    assert identity.error is None
    assert identity.certificate_info() is None


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


# --- the entry point ---------------------------------------------------------------------


def test_header_names_cover_every_format_in_lowercase() -> None:
    assert tuple(HEADER_NAMES) == FORMATS == ("xfcc", "rfc9440", "traefik", "nginx")
    for format, names in HEADER_NAMES.items():
        assert names
        assert all(name == name.lower() for name in names)
        assert header_names(format) == names
    assert header_names("nginx") == (DEFAULT_NGINX_HEADER,) == (b"ssl-client-cert",)


def test_header_names_nginx_header_is_configurable() -> None:
    assert header_names("nginx", b"X-Client-Cert") == (b"x-client-cert",)
    assert header_names("xfcc", b"x-client-cert") == (b"x-forwarded-client-cert",)
    assert header_names("unknown") == ()


# Each format's headers as a proxy sends them, and the parser call they amount to.
ENTRY_CASES: dict[str, tuple[dict[bytes, bytes], ProxiedIdentity]] = {
    "xfcc": (
        {b"x-forwarded-client-cert": f'Cert="{_envoy_escape(LEAF_PEM)}"'.encode()},
        parse_xfcc(f'Cert="{_envoy_escape(LEAF_PEM)}"'),
    ),
    "rfc9440": (
        {b"client-cert": f":{_b64(LEAF_DER)}:".encode(), b"client-cert-chain": b""},
        parse_rfc9440(f":{_b64(LEAF_DER)}:"),
    ),
    "traefik": (
        {b"x-forwarded-tls-client-cert": _traefik_body(LEAF_DER).encode()},
        parse_traefik(_traefik_body(LEAF_DER), None),
    ),
    "nginx": (
        {b"ssl-client-cert": quote(LEAF_PEM, safe="").encode()},
        parse_nginx(quote(LEAF_PEM, safe="")),
    ),
}


@pytest.mark.parametrize("format", FORMATS)
def test_parse_proxy_headers_reads_the_configured_format(format: str) -> None:
    headers, expected = ENTRY_CASES[format]

    identity = parse_proxy_headers(format, {b"accept": b"*/*", **headers})

    assert identity == expected
    assert identity.leaf_der == LEAF_DER
    assert identity.certificate_info() == parse_certificate(LEAF_DER)


@pytest.mark.parametrize("format", FORMATS)
def test_parse_proxy_headers_ignores_every_other_format(format: str) -> None:
    others = {
        name: value
        for other, (headers, _) in ENTRY_CASES.items()
        if other != format
        for name, value in headers.items()
    }

    assert parse_proxy_headers(format, others) is None
    assert parse_proxy_headers(format, {}) is None


def test_parse_proxy_headers_custom_nginx_header() -> None:
    headers = {b"x-client-cert": quote(LEAF_PEM, safe="").encode()}

    identity = parse_proxy_headers("nginx", headers, b"X-Client-Cert")

    assert identity is not None
    assert identity.leaf_der == LEAF_DER
    assert parse_proxy_headers("nginx", headers) is None  # not the default header


def test_parse_proxy_headers_unknown_format_reads_nothing() -> None:
    assert parse_proxy_headers("haproxy", ENTRY_CASES["xfcc"][0]) is None


def test_parse_proxy_headers_chain_without_cert_is_an_error() -> None:
    identity = parse_proxy_headers(
        "rfc9440", {b"client-cert-chain": f":{_b64(SECOND_DER)}:".encode()}
    )

    assert identity == ProxiedIdentity("rfc9440", error="empty header")
    assert identity.certificate_info() is None


def test_traefik_info_only_is_an_identity_without_fingerprint() -> None:
    info = quote_plus(f'Subject="CN=web";SAN="web.example.org,{SPIFFE_ID}"', safe="")

    identity = parse_proxy_headers("traefik", {b"x-forwarded-tls-client-cert-info": info.encode()})

    assert identity is not None
    assert identity.certificate_info() == CertificateInfo(
        sha256="",
        subject="CN=web",
        alternative_names=(f"URI:{SPIFFE_ID}", "DNS:web.example.org"),
        spiffe_id=SPIFFE_ID,
    )


def test_certificate_info_prefers_the_forwarded_leaf_to_the_fields() -> None:
    value = f'Hash={LEAF_SHA256};Cert="{_envoy_escape(LEAF_PEM)}";URI=spiffe://example.org/other'

    info = parse_xfcc(value).certificate_info()

    assert info == parse_certificate(LEAF_DER)
    assert info is not None
    assert info.spiffe_id == SPIFFE_ID


def test_certificate_info_of_a_malformed_header_is_none() -> None:
    identity = parse_xfcc(f"Hash=not-hex;URI={SPIFFE_ID}")

    assert identity.error == "bad hash"
    assert identity.certificate_info() is None


def test_certificate_info_keeps_a_bounded_number_of_fields() -> None:
    uris = ";".join(f"URI=spiffe://example.org/{index}" for index in range(70))
    dns = ";".join(f"DNS=host-{index}.example.org" for index in range(30))

    info = parse_xfcc(f"Hash={LEAF_SHA256};{uris};{dns}").certificate_info()

    assert info is not None
    assert info.spiffe_id == "spiffe://example.org/0"
    assert len(info.alternative_names) == MAX_ALTERNATIVE_NAMES + 1
    assert info.alternative_names[-1] == f"{TRUNCATED_NAMES}36 more"


# --- bounds --------------------------------------------------------------------------------


def _sized_leaf(size: int) -> bytes:
    """A leaf of about ``size`` DER bytes, made big with DNS SANs (as real big ones are)."""
    count = max(0, (size - 600) // 28)  # each SAN is 28 bytes of DER
    dns = tuple(f"host-{index:05d}.big.example.org" for index in range(count))
    return CA.issue("big", dns=dns).der


def test_certificate_over_the_size_limit_is_refused() -> None:
    assert MAX_CERTIFICATE_SIZE == 16 * 1024
    big = _sized_leaf(MAX_CERTIFICATE_SIZE + 1024)
    under = _sized_leaf(MAX_CERTIFICATE_SIZE - 1024)
    assert len(under) <= MAX_CERTIFICATE_SIZE < len(big)

    _failed(parse_rfc9440(f":{_b64(big)}:"), "rfc9440", "certificate too large")
    _failed(parse_nginx(quote(der_to_pem(big), safe="")), "nginx", "certificate too large")
    accepted = parse_rfc9440(f":{_b64(under)}:")  # negative control
    assert accepted.error is None
    assert accepted.leaf_der == under


def _chain_headers(intermediates: int) -> dict[str, ProxiedIdentity]:
    ders = [LEAF_DER, *([INTERMEDIATE_DER] * intermediates)]
    pems = "".join(der_to_pem(der) for der in ders)
    return {
        "xfcc": parse_xfcc(f'Chain="{_envoy_escape(pems)}"'),
        "rfc9440": parse_rfc9440(f":{_b64(LEAF_DER)}:", ",".join(f":{_b64(d)}:" for d in ders[1:])),
        "traefik": parse_traefik(",".join(_traefik_body(der) for der in ders), None),
        "nginx": parse_nginx(quote(pems, safe="")),
    }


@pytest.mark.parametrize("format", FORMATS)
def test_chain_longer_than_the_limit_is_refused(format: str) -> None:
    assert MAX_CHAIN_LENGTH == 4

    _failed(_chain_headers(MAX_CHAIN_LENGTH + 1)[format], format, "chain too long")
    accepted = _chain_headers(MAX_CHAIN_LENGTH)[format]  # negative control
    assert accepted.error is None
    assert accepted.chain_der == (INTERMEDIATE_DER,) * MAX_CHAIN_LENGTH


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


def _check_never_raises(identity: ProxiedIdentity | None) -> None:
    assert isinstance(identity, ProxiedIdentity)
    assert identity.error is None or not identity.error.startswith("internal error")
    info = identity.certificate_info()
    if identity.error is not None:
        assert identity == ProxiedIdentity(identity.source, error=identity.error)
        assert info is None


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


@settings(max_examples=200, deadline=None)
@given(format=st.sampled_from(FORMATS), values=st.lists(st.one_of(st.binary(), _ANY), max_size=2))
def test_no_headers_make_the_entry_point_raise(format: str, values: list[str | bytes]) -> None:
    names = header_names(format)
    headers = {
        name: value if isinstance(value, bytes) else value.encode("utf-8")
        for name, value in zip(names, values, strict=False)
    }

    identity = parse_proxy_headers(format, headers)

    if headers:
        _check_never_raises(identity)
    else:
        assert identity is None


# --- memory --------------------------------------------------------------------------------

BIG_CERTIFICATES = 4096
_SERIAL = 0x7EADBEEF00000000


def _big_template() -> bytes:
    """A 9.7 KB leaf, big as a real one with many SANs is: 100 SANs and 7 KB of extension."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "big")])
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(SPIFFE_ID)]
    sans += [x509.DNSName(f"host-{index:03d}.big.example.org") for index in range(99)]
    opaque = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), bytes(7000))
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_SERIAL)
        .not_valid_before(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(opaque, critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


@pytest.fixture
def _no_forwarded_cache() -> Iterator[None]:
    parse_forwarded_certificate.cache_clear()
    yield
    parse_forwarded_certificate.cache_clear()


@pytest.mark.usefixtures("_no_forwarded_cache")
def test_distinct_big_forwarded_certificates_use_bounded_memory() -> None:
    # Unbounded, these 4,096 certificates held 76 MiB: each one's DER and all its SANs in
    # the handshake cache.  Bounded, about 4 MiB: a small cache of their own, 64 SANs each.
    template = _big_template()
    assert 9000 < len(template) < 11000
    old_serial = _SERIAL.to_bytes(8, "big")
    handshake_entries = parse_certificate.cache_info().currsize
    info: CertificateInfo | None = None
    gc.collect()

    tracemalloc.start()
    try:
        for index in range(BIG_CERTIFICATES):
            # A distinct serial, so a distinct certificate (signatures are not checked here).
            der = template.replace(old_serial, (_SERIAL + index).to_bytes(8, "big"))
            header = b":" + base64.b64encode(der) + b":"
            identity = parse_proxy_headers("rfc9440", {b"client-cert": header})
            info = identity.certificate_info() if identity is not None else None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert info is not None
    assert info.sha256 == hashlib.sha256(der).hexdigest().upper()
    assert info.spiffe_id == SPIFFE_ID
    assert len(info.alternative_names) == MAX_ALTERNATIVE_NAMES + 1
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert parse_forwarded_certificate.cache_info().currsize == FORWARDED_CACHE_SIZE
    assert parse_certificate.cache_info().currsize == handshake_entries
