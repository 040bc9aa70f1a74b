from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

import pytest
import trustme

from opentelemetry.instrumentation.mtls._ssl.values import (
    CIPHER_SUITES,
    IANA_CIPHER_NAMES,
    PROTOCOL_VERSIONS,
    iana_cipher_code,
    version_code,
)


def iana_cipher_name(name: str) -> str:
    """As the handshake record reads a cipher: the IANA name, else the name as it is."""
    return IANA_CIPHER_NAMES.get(name, name)


def protocol_version(ssl_version: str | None) -> str | None:
    return PROTOCOL_VERSIONS.get(ssl_version) if ssl_version is not None else None


def protocol_version_code(ssl_version: str | None) -> int | None:
    return version_code(protocol_version(ssl_version))


TLS13_SUITES = {
    "TLS_AES_128_GCM_SHA256": 0x1301,
    "TLS_AES_256_GCM_SHA384": 0x1302,
    "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
}


def _context_ciphers(cipher_string: str | None) -> list[Any]:
    if cipher_string is None:
        return list(ssl.create_default_context().get_ciphers())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.set_ciphers(cipher_string)
    except ssl.SSLError:
        pytest.skip(f"this OpenSSL rejects {cipher_string!r}")
    return list(ctx.get_ciphers())


# --- the table against what this machine's OpenSSL actually offers ---------------------------


@pytest.mark.parametrize(
    "cipher_string",
    [None, "ALL:@SECLEVEL=0", "ALL:COMPLEMENTOFALL:@SECLEVEL=0"],
    ids=["default-context", "ALL-seclevel0", "ALL+COMPLEMENTOFALL-seclevel0"],
)
def test_every_cipher_openssl_offers_is_mapped(cipher_string: str | None) -> None:
    ciphers = _context_ciphers(cipher_string)
    assert ciphers
    for cipher in ciphers:
        name = cipher["name"]
        assert iana_cipher_name(name).startswith("TLS_"), name
        assert iana_cipher_code(name) == cipher["id"] & 0xFFFF, name
        # An IANA name maps to the same code as the OpenSSL name it came from.
        assert iana_cipher_code(iana_cipher_name(name)) == cipher["id"] & 0xFFFF, name


def test_table_is_sorted_and_consistent() -> None:
    table = CIPHER_SUITES
    codes = [code for _, code in table.values()]
    assert codes == sorted(codes)
    assert len(set(codes)) == len(codes)
    ianas = [iana for iana, _ in table.values()]
    assert len(set(ianas)) == len(ianas)
    for openssl_name, (iana, code) in table.items():
        assert iana.startswith("TLS_")
        assert 0 < code <= 0xFFFF
        if openssl_name.startswith("TLS_"):  # TLS 1.3: OpenSSL already uses the IANA name
            assert openssl_name == iana
            assert code >> 8 == 0x13


@pytest.mark.parametrize(
    ("openssl_name", "iana", "code"),
    [
        ("ECDHE-ECDSA-AES256-GCM-SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", 0xC02C),
        ("ECDHE-RSA-AES128-GCM-SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", 0xC02F),
        ("ECDHE-RSA-CHACHA20-POLY1305", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", 0xCCA8),
        ("ECDHE-ECDSA-AES128-SHA", "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", 0xC009),
        ("DHE-RSA-AES256-GCM-SHA384", "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", 0x009F),
        ("AES128-SHA", "TLS_RSA_WITH_AES_128_CBC_SHA", 0x002F),
        ("AES256-GCM-SHA384", "TLS_RSA_WITH_AES_256_GCM_SHA384", 0x009D),
        ("PSK-AES128-GCM-SHA256", "TLS_PSK_WITH_AES_128_GCM_SHA256", 0x00A8),
        ("ECDHE-PSK-CHACHA20-POLY1305", "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256", 0xCCAC),
        ("DHE-PSK-AES128-CCM8", "TLS_PSK_DHE_WITH_AES_128_CCM_8", 0xC0AA),
        ("TLS_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256", 0x1301),
        ("TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384", 0x1302),
        ("TLS_CHACHA20_POLY1305_SHA256", "TLS_CHACHA20_POLY1305_SHA256", 0x1303),
        ("TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_SHA256", 0x1304),
        ("TLS_AES_128_CCM_8_SHA256", "TLS_AES_128_CCM_8_SHA256", 0x1305),
    ],
)
def test_known_iana_names(openssl_name: str, iana: str, code: int) -> None:
    assert iana_cipher_name(openssl_name) == iana
    assert iana_cipher_code(openssl_name) == code
    assert iana_cipher_code(iana) == code
    assert iana_cipher_name(iana) == iana  # idempotent


@pytest.mark.parametrize(
    "name",
    ["", "NOT-A-CIPHER", "ecdhe-ecdsa-aes256-gcm-sha384", "TLS_MADE_UP_SUITE", " AES128-SHA"],
)
def test_unknown_cipher_passes_through(name: str) -> None:
    assert iana_cipher_name(name) == name
    assert iana_cipher_code(name) is None


# --- protocol helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ssl_version", "version", "code"),
    [
        ("TLSv1.3", "1.3", 0x0304),
        ("TLSv1.2", "1.2", 0x0303),
        ("TLSv1.1", "1.1", 0x0302),
        ("TLSv1", "1.0", 0x0301),
        ("SSLv3", "3", 0x0300),
        (None, None, None),
        ("", None, None),
        ("unknown", None, None),
        ("TLSv1.0", None, None),
        ("tlsv1.3", None, None),
        ("TLSv1.4", None, None),
        ("DTLSv1.2", None, None),
        ("1.3", None, None),
    ],
)
def test_protocol_tables(ssl_version: str | None, version: str | None, code: int | None) -> None:
    assert protocol_version(ssl_version) == version
    assert protocol_version_code(ssl_version) == code


def test_protocol_version_codes_match_ssl_module() -> None:
    assert protocol_version_code("TLSv1.3") == ssl.TLSVersion.TLSv1_3.value
    assert protocol_version_code("TLSv1.2") == ssl.TLSVersion.TLSv1_2.value
    assert protocol_version_code("TLSv1.1") == ssl.TLSVersion.TLSv1_1.value
    assert protocol_version_code("TLSv1") == ssl.TLSVersion.TLSv1.value
    assert protocol_version_code("SSLv3") == ssl.TLSVersion.SSLv3.value


# --- a real loopback handshake ------------------------------------------------------------------


def _handshake(
    key_type: trustme.KeyType,
    maximum_version: ssl.TLSVersion,
    client_ciphers: str | None = None,
) -> tuple[tuple[str, str, int], str | None, tuple[str, str, int], str | None]:
    """Return (client cipher(), client version(), server cipher(), server version())."""
    ca = trustme.CA(key_type=key_type)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", key_type=key_type).configure_cert(server_ctx)
    server_ctx.maximum_version = maximum_version
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_ctx.maximum_version = maximum_version
    if client_ciphers is not None:
        client_ctx.set_ciphers(client_ciphers)

    server_result: dict[str, Any] = {}

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(10)
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        server_result["cipher"] = tls.cipher()
                        server_result["version"] = tls.version()
                        tls.sendall(b"x")
                        tls.recv(1)
            except BaseException as exc:  # re-raised in the test thread
                server_result["error"] = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # noqa: SIM117
                with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    client_cipher = tls.cipher()
                    client_version = tls.version()
                    assert tls.recv(1) == b"x"
                    tls.sendall(b"y")
        finally:
            thread.join(10)
    assert not thread.is_alive()
    if "error" in server_result:
        raise server_result["error"]
    assert client_cipher is not None
    return client_cipher, client_version, server_result["cipher"], server_result["version"]


@pytest.mark.parametrize(
    ("key_type", "client_ciphers", "iana", "code"),
    [
        (
            trustme.KeyType.ECDSA,
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            0xC02C,
        ),
        (
            trustme.KeyType.RSA,
            "ECDHE-RSA-AES128-GCM-SHA256",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            0xC02F,
        ),
        (
            trustme.KeyType.RSA,
            "ECDHE-RSA-CHACHA20-POLY1305",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            0xCCA8,
        ),
        (trustme.KeyType.ECDSA, None, None, None),  # whatever the defaults negotiate
    ],
)
def test_loopback_handshake_tls12(
    key_type: trustme.KeyType, client_ciphers: str | None, iana: str | None, code: int | None
) -> None:
    client_cipher, client_version, server_cipher, server_version = _handshake(
        key_type, ssl.TLSVersion.TLSv1_2, client_ciphers
    )
    assert client_version == server_version == "TLSv1.2"
    assert client_cipher[0] == server_cipher[0]
    assert protocol_version(client_version) == "1.2"
    assert protocol_version_code(client_version) == 0x0303
    if client_ciphers is not None:
        assert client_cipher[0] == client_ciphers
        assert iana_cipher_name(client_cipher[0]) == iana
        assert iana_cipher_code(client_cipher[0]) == code
    else:
        assert iana_cipher_name(client_cipher[0]).startswith("TLS_ECDHE_ECDSA_WITH_")
        assert iana_cipher_code(client_cipher[0]) is not None


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def test_loopback_handshake_tls13(key_type: trustme.KeyType) -> None:
    client_cipher, client_version, server_cipher, server_version = _handshake(
        key_type, ssl.TLSVersion.TLSv1_3
    )
    assert client_version == server_version == "TLSv1.3"
    assert client_cipher[0] == server_cipher[0]
    assert protocol_version(client_version) == "1.3"
    assert protocol_version_code(client_version) == 0x0304
    assert client_cipher[0] in TLS13_SUITES
    assert iana_cipher_name(client_cipher[0]) == client_cipher[0]
    assert iana_cipher_code(client_cipher[0]) == TLS13_SUITES[client_cipher[0]]
