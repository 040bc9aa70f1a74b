"""Client identity rules, checked against real certificates issued by a throwaway PKI."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from opentelemetry.instrumentation.mtls._cli.pki import Authority
from opentelemetry.instrumentation.mtls._requests.rules import (
    RULE_ISSUER,
    RULE_NO_CERTIFICATE,
    RULE_NO_POLICY,
    RULE_SAN_PATTERN,
    RULE_SPIFFE_TRUST_DOMAIN,
    Decision,
    IdentityRules,
    decide,
)
from opentelemetry.instrumentation.mtls._x509 import CertificateInfo, parse_certificate

SPIFFE_ID = "spiffe://example.org/ns/a/sa/web"
DNS_NAME = "web.internal.example.org"


@dataclasses.dataclass(frozen=True)
class Client:
    """A parsed client certificate and the fingerprint of the CA that issued it."""

    info: CertificateInfo
    ca_sha256: str


def _fingerprint(ca: Authority) -> str:
    return hashlib.sha256(ca.certificate.public_bytes(Encoding.DER)).hexdigest()


def _client(
    ca: Authority,
    *,
    uris: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
) -> Client:
    leaf = ca.issue("web", uris=uris, dns=dns, ips=ips)
    return Client(parse_certificate(leaf.der), _fingerprint(ca))


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority("Test CA")


@pytest.fixture(scope="module")
def other_ca() -> Authority:
    return Authority("Other CA")


@pytest.fixture(scope="module")
def web(ca: Authority) -> Client:
    return _client(ca, uris=(SPIFFE_ID,), dns=(DNS_NAME,), ips=("10.0.0.1",))


@pytest.fixture(scope="module")
def stranger(other_ca: Authority) -> Client:
    return _client(other_ca, uris=("spiffe://evil.org/ns/a/sa/web",), dns=("web.evil.org",))


def _decide(rules: IdentityRules, client: Client, *, with_ca: bool = True) -> Decision:
    return decide(rules, client.info, client.ca_sha256 if with_ca else None)


# --- no rules, no certificate -----------------------------------------------------------


def test_no_rules_allow_everyone(web: Client) -> None:
    rules = IdentityRules()
    assert rules.empty
    expected = Decision(True, RULE_NO_POLICY, "no client identity rules are configured")
    assert _decide(rules, web) == expected
    assert decide(rules, None) == expected


def test_no_certificate_is_denied_when_rules_exist() -> None:
    rules = IdentityRules(spiffe_trust_domains=("example.org",))
    assert not rules.empty
    decision = decide(rules, None)
    assert not decision.allowed
    assert decision.rule == RULE_NO_CERTIFICATE
    assert decision.reason


def test_the_parser_gives_what_the_rules_read(web: Client) -> None:
    assert web.info.issuer == "CN=Test CA root,O=Test CA"
    assert web.info.spiffe_id == SPIFFE_ID
    assert f"DNS:{DNS_NAME}" in web.info.alternative_names


# --- issuer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "issuer",
    [
        "CN=Test CA root,O=Test CA",
        "cn=Test CA root, o=Test CA",
        "  CN = Test CA root ,  O = Test CA  ",
        "commonName=Test CA root,organizationName=Test CA",
        "2.5.4.3=Test CA root,2.5.4.10=Test\\20CA",
        "CN=Test\\ CA root,O=Test CA",
    ],
)
def test_issuer_dn_allowed_whatever_the_spelling(web: Client, issuer: str) -> None:
    decision = _decide(IdentityRules(allowed_issuers=(issuer,)), web, with_ca=False)
    assert decision.allowed, decision.reason
    assert decision.rule == RULE_ISSUER
    assert "CN=Test CA root,O=Test CA" in decision.reason


@pytest.mark.parametrize(
    "issuer",
    [
        "CN=Other CA root,O=Other CA",
        "CN=test ca root,O=Test CA",  # values are exact
        "O=Test CA,CN=Test CA root",  # RDN order is significant
        "CN=Test CA root",  # a prefix is not the DN
        "CN=Test CA root,O=Test CA,C=US",
    ],
)
def test_issuer_dn_denied(web: Client, issuer: str) -> None:
    decision = _decide(IdentityRules(allowed_issuers=(issuer,)), web, with_ca=False)
    assert not decision.allowed
    assert decision.rule == RULE_ISSUER
    assert decision.reason == "issuer CN=Test CA root,O=Test CA is not allowed"


def test_issuer_of_another_ca_is_denied(stranger: Client) -> None:
    rules = IdentityRules(allowed_issuers=("CN=Test CA root,O=Test CA",))
    decision = _decide(rules, stranger)
    assert not decision.allowed
    assert decision.reason == "issuer CN=Other CA root,O=Other CA is not allowed"


def test_issuer_list_is_an_or(web: Client, stranger: Client) -> None:
    rules = IdentityRules(
        allowed_issuers=("CN=Nobody,O=Nowhere", "CN=Other CA root,O=Other CA"),
    )
    assert _decide(rules, stranger).allowed
    assert not _decide(rules, web).allowed


def test_issuer_fingerprint_with_colons_any_case(ca: Authority, web: Client) -> None:
    hexdigest = _fingerprint(ca)
    colons = ":".join(hexdigest[i : i + 2] for i in range(0, 64, 2))
    for entry in (colons.upper(), colons.lower(), hexdigest):
        decision = _decide(IdentityRules(allowed_issuers=(entry,)), web)
        assert decision.allowed, decision.reason
        assert decision.rule == RULE_ISSUER
        assert hexdigest.upper() in decision.reason
    # The caller's fingerprint may come with colons too.
    assert decide(IdentityRules(allowed_issuers=(hexdigest,)), web.info, colons).allowed


def test_issuer_fingerprint_denied(ca: Authority, other_ca: Authority, stranger: Client) -> None:
    rules = IdentityRules(allowed_issuers=(_fingerprint(ca),))
    decision = _decide(rules, stranger)
    assert not decision.allowed
    assert decision.rule == RULE_ISSUER
    assert _fingerprint(other_ca).upper() in decision.reason


def test_issuer_fingerprint_unknown_matches_nothing(ca: Authority, web: Client) -> None:
    rules = IdentityRules(allowed_issuers=(_fingerprint(ca),))
    decision = _decide(rules, web, with_ca=False)
    assert not decision.allowed
    assert decision.reason.endswith("(CA SHA-256 unknown)")


def test_issuer_dn_or_fingerprint(ca: Authority, web: Client, stranger: Client) -> None:
    rules = IdentityRules(allowed_issuers=("CN=Other CA root,O=Other CA", _fingerprint(ca)))
    assert _decide(rules, web).allowed
    assert _decide(rules, stranger).allowed
    assert not _decide(rules, web, with_ca=False).allowed


def test_unreadable_issuer_is_denied(web: Client) -> None:
    broken = dataclasses.replace(web.info, issuer=None, parse_error="ValueError")
    rules = IdentityRules(allowed_issuers=("CN=Test CA root,O=Test CA",))
    decision = decide(rules, broken)
    assert not decision.allowed
    assert decision.reason == "issuer (unreadable) is not allowed"


def test_issuer_dn_with_escapes_and_multivalued_rdn(web: Client) -> None:
    info = dataclasses.replace(web.info, issuer="CN=Acme\\, Inc.+OU=Ops,O=Acme")
    rules = IdentityRules(allowed_issuers=("ou=Ops + cn=Acme\\2C Inc. , o=Acme",))
    assert decide(rules, info).allowed
    assert not decide(IdentityRules(allowed_issuers=("CN=Acme\\, Inc.,O=Acme",)), info).allowed


# --- SPIFFE trust domain ------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["example.org", "EXAMPLE.org", "spiffe://example.org/"])
def test_trust_domain_allowed(web: Client, domain: str) -> None:
    decision = _decide(IdentityRules(spiffe_trust_domains=(domain,)), web)
    assert decision == Decision(
        True, RULE_SPIFFE_TRUST_DOMAIN, "SPIFFE trust domain example.org is allowed"
    )


def test_trust_domain_of_the_certificate_is_case_insensitive(ca: Authority) -> None:
    client = _client(ca, uris=("spiffe://Example.ORG/ns/a/sa/web",))
    assert _decide(IdentityRules(spiffe_trust_domains=("example.org",)), client).allowed


@pytest.mark.parametrize(
    "domain", ["evil.org", "org", "ample.org", "example.org.evil", "sub.example.org"]
)
def test_trust_domain_wrong(web: Client, domain: str) -> None:
    decision = _decide(IdentityRules(spiffe_trust_domains=(domain,)), web)
    assert not decision.allowed
    assert decision.rule == RULE_SPIFFE_TRUST_DOMAIN
    assert decision.reason == "SPIFFE trust domain example.org is not allowed"


def test_trust_domain_list_is_an_or(web: Client, stranger: Client) -> None:
    rules = IdentityRules(spiffe_trust_domains=("other.org", "evil.org"))
    assert _decide(rules, stranger).allowed
    assert not _decide(rules, web).allowed


def test_trust_domain_needs_a_spiffe_id(ca: Authority) -> None:
    client = _client(ca, dns=(DNS_NAME,), uris=("https://example.org/web",))
    assert client.info.spiffe_id is None
    decision = _decide(IdentityRules(spiffe_trust_domains=("example.org",)), client)
    assert decision == Decision(
        False, RULE_SPIFFE_TRUST_DOMAIN, "the client certificate has no SPIFFE ID"
    )


@pytest.mark.parametrize(
    ("spiffe_id", "problem"),
    [
        ("spiffe://user@example.org/ns/a", "has userinfo"),
        ("spiffe://example.org:8443/ns/a", "has a port"),
        ("spiffe://example.org/ns/a?x=1", "has a query"),
        ("spiffe://example.org/ns/a#frag", "has a fragment"),
        ("spiffe://example.org/ns/%61", "has a percent-encoding"),
        ("spiffe:///ns/a", "has no trust domain"),
        ("spiffe://example.org/ns//a", "empty, '.' or '..' path segment"),
        ("spiffe://example.org/ns/../a", "empty, '.' or '..' path segment"),
        ("spiffe://example.org/", "empty, '.' or '..' path segment"),
        ("spiffe://exa$mple.org/ns/a", "invalid trust domain"),
        ("spiffe://example.org/ns/a b", "invalid path character"),
    ],
)
def test_malformed_spiffe_id_is_denied(ca: Authority, spiffe_id: str, problem: str) -> None:
    client = _client(ca, uris=(spiffe_id,))
    assert client.info.spiffe_id == spiffe_id
    decision = _decide(IdentityRules(spiffe_trust_domains=("example.org",)), client)
    assert not decision.allowed
    assert decision.rule == RULE_SPIFFE_TRUST_DOMAIN
    assert decision.reason == f"the client's SPIFFE ID is malformed ({problem})"
    assert spiffe_id not in decision.reason


def test_two_spiffe_ids_are_denied(ca: Authority) -> None:
    client = _client(ca, uris=(SPIFFE_ID, "spiffe://evil.org/ns/a/sa/web"))
    rules = IdentityRules(spiffe_trust_domains=("example.org", "evil.org"))
    decision = _decide(rules, client)
    assert not decision.allowed
    assert decision.reason == "the client certificate has more than one SPIFFE ID"


def test_trust_domain_without_path_is_allowed(ca: Authority) -> None:
    client = _client(ca, uris=("spiffe://example.org",))
    assert _decide(IdentityRules(spiffe_trust_domains=("example.org",)), client).allowed


# --- SAN patterns -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "DNS:*.internal.example.org",
        "dns:WEB.internal.example.org",
        "DNS:*.example.org",
        "URI:spiffe://example.org/ns/a/*",
        "IP:10.0.0.*",
        "URI:spiffe://example.org/ns/?/sa/web",
    ],
)
def test_san_pattern_matches(web: Client, pattern: str) -> None:
    decision = _decide(IdentityRules(san_patterns=(pattern,)), web)
    assert decision.allowed, decision.reason
    assert decision.rule == RULE_SAN_PATTERN


@pytest.mark.parametrize(
    "pattern",
    [
        "DNS:*.external.example.org",
        "URI:spiffe://example.org/ns/payments/*",
        "URI:*.internal.example.org",  # the kind must match too
        "DNS:spiffe://example.org/*",
        "IP:10.0.1.*",
        "URI:SPIFFE://EXAMPLE.ORG/*",  # only DNS values are case-insensitive
        "DNS:internal.example.org",  # a glob matches the whole value
    ],
)
def test_san_pattern_does_not_match(web: Client, pattern: str) -> None:
    decision = _decide(IdentityRules(san_patterns=(pattern,)), web)
    assert decision == Decision(
        False,
        RULE_SAN_PATTERN,
        "none of the client certificate's 3 SANs matches an allowed pattern",
    )


def test_san_patterns_are_an_or(web: Client) -> None:
    rules = IdentityRules(san_patterns=("DNS:*.evil.org", "URI:spiffe://example.org/ns/a/*"))
    decision = _decide(rules, web)
    assert decision.allowed
    assert decision.reason == "a SAN matches URI:spiffe://example.org/ns/a/*"


def test_san_pattern_without_sans_is_denied(ca: Authority) -> None:
    client = _client(ca)
    assert client.info.alternative_names == ()
    decision = _decide(IdentityRules(san_patterns=("DNS:*",)), client)
    assert decision == Decision(
        False, RULE_SAN_PATTERN, "the client certificate has no subject alternative names"
    )


# --- combinations -------------------------------------------------------------------------


def _all_rules(ca: Authority) -> IdentityRules:
    return IdentityRules(
        allowed_issuers=("CN=Test CA root,O=Test CA", _fingerprint(ca)),
        spiffe_trust_domains=("example.org",),
        san_patterns=("DNS:*.internal.example.org",),
    )


def test_all_kinds_pass(ca: Authority, web: Client) -> None:
    decision = _decide(_all_rules(ca), web)
    assert decision.allowed
    assert decision.rule == RULE_SAN_PATTERN  # the last kind checked
    assert decision.reason == (
        "issuer CN=Test CA root,O=Test CA is allowed; "
        "SPIFFE trust domain example.org is allowed; "
        "a SAN matches DNS:*.internal.example.org"
    )


def test_allowed_rule_names_the_last_kind_configured(web: Client) -> None:
    rules = IdentityRules(
        allowed_issuers=("CN=Test CA root,O=Test CA",), spiffe_trust_domains=("example.org",)
    )
    assert _decide(rules, web).rule == RULE_SPIFFE_TRUST_DOMAIN


def test_kinds_are_anded_and_the_first_failure_decides(ca: Authority, other_ca: Authority) -> None:
    rules = _all_rules(ca)
    wrong_issuer = _client(other_ca, uris=(SPIFFE_ID,), dns=(DNS_NAME,))
    wrong_domain = _client(ca, uris=("spiffe://evil.org/ns/a/sa/web",), dns=(DNS_NAME,))
    wrong_san = _client(ca, uris=(SPIFFE_ID,), dns=("web.example.org",))
    everything_wrong = _client(other_ca, uris=("spiffe://evil.org/x",), dns=("web.evil.org",))
    assert _decide(rules, wrong_issuer).rule == RULE_ISSUER
    assert _decide(rules, wrong_domain).rule == RULE_SPIFFE_TRUST_DOMAIN
    assert _decide(rules, wrong_san).rule == RULE_SAN_PATTERN
    assert _decide(rules, everything_wrong).rule == RULE_ISSUER
    for client in (wrong_issuer, wrong_domain, wrong_san, everything_wrong):
        assert not _decide(rules, client).allowed


def test_spiffe_checked_before_san(ca: Authority) -> None:
    rules = IdentityRules(spiffe_trust_domains=("example.org",), san_patterns=("DNS:nope",))
    client = _client(ca, dns=(DNS_NAME,))
    assert _decide(rules, client).rule == RULE_SPIFFE_TRUST_DOMAIN


def test_decisions_are_pure(ca: Authority, web: Client) -> None:
    rules = _all_rules(ca)
    assert _decide(rules, web) == _decide(rules, web)
    assert _decide(rules, web) == _decide(dataclasses.replace(rules), web)


def test_reasons_do_not_name_the_client(ca: Authority, other_ca: Authority) -> None:
    rules = _all_rules(ca)
    client = _client(ca, uris=("spiffe://evil.org/ns/secret/sa/alice",), dns=("alice.example",))
    for info in (client.info, _client(other_ca, dns=("alice.example",)).info):
        reason = decide(rules, info, client.ca_sha256).reason
        assert "alice" not in reason
        assert "secret" not in reason
        assert "O=mTLS tests" not in reason  # the subject


# --- parse and validation -----------------------------------------------------------------


def test_parse_env_style_lists() -> None:
    rules = IdentityRules.parse(
        " CN=Test CA root, O=Test CA ;; ; AB:CD:" + "00:" * 29 + "EF ;CN=a\\;b,O=x",
        " example.org , ,SPIFFE://Other.org,",
        "DNS:*.internal.example.org,  URI:spiffe://example.org/ns/payments/* ,,",
    )
    assert rules.allowed_issuers == (
        "CN=Test CA root, O=Test CA",
        "AB:CD:" + "00:" * 29 + "EF",
        "CN=a\\;b,O=x",
    )
    assert rules.spiffe_trust_domains == ("example.org", "SPIFFE://Other.org")
    assert rules.san_patterns == (
        "DNS:*.internal.example.org",
        "URI:spiffe://example.org/ns/payments/*",
    )


@pytest.mark.parametrize(
    ("issuers", "domains", "patterns"),
    [(None, None, None), ("", "", ""), ("   ", " \t ", "\n"), (" ; ;", " , ,", ",,")],
)
def test_parse_empty(issuers: str | None, domains: str | None, patterns: str | None) -> None:
    rules = IdentityRules.parse(issuers, domains, patterns)
    assert rules == IdentityRules()
    assert rules.empty


def test_parsed_rules_decide(ca: Authority, web: Client) -> None:
    rules = IdentityRules.parse(
        f"CN=Nobody;cn = Test CA root , o = Test CA;{_fingerprint(ca)}",
        "other.org, example.org",
        "DNS:nope, DNS:*.internal.example.org",
    )
    decision = _decide(rules, web)
    assert decision.allowed
    assert decision.rule == RULE_SAN_PATTERN


@pytest.mark.parametrize(
    "rules",
    [
        {"allowed_issuers": ("Test CA",)},
        {"allowed_issuers": ("ABCD",)},
        {"allowed_issuers": ("CN=a,,O=b",)},
        {"allowed_issuers": ("CN=a,O=b\\",)},
        {"allowed_issuers": ("C N=a",)},
        {"allowed_issuers": ("CN=\\ff",)},
        {"spiffe_trust_domains": ("example.org/ns",)},
        {"spiffe_trust_domains": ("user@example.org",)},
        {"spiffe_trust_domains": ("example.org:443",)},
        {"san_patterns": ("*.example.org",)},
        {"san_patterns": ("DSN:*.example.org",)},
        {"san_patterns": ("DNS:",)},
    ],
)
def test_invalid_rules_raise(rules: dict[str, tuple[str, ...]]) -> None:
    with pytest.raises(ValueError):  # messages: see the next test
        IdentityRules(**rules)


def test_invalid_rule_messages_name_the_entry() -> None:
    with pytest.raises(ValueError, match="'Test CA' is neither a DN nor a SHA-256"):
        IdentityRules.parse("Test CA", None, None)
    with pytest.raises(ValueError, match=r"'example\.org/ns' is not a SPIFFE trust domain"):
        IdentityRules.parse(None, "example.org/ns", None)
    with pytest.raises(ValueError, match="SAN pattern 'DSN:x' is not KIND:pattern"):
        IdentityRules.parse(None, None, "DSN:x")
