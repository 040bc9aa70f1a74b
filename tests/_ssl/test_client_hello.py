"""The ClientHello parser and what server spans say of the ClientHello (_ssl/client_hello.py).

JA4 is checked against an independent implementation written here from the reference
definition (FoxIO-LLC/ja4, ``technical_details/JA4.md``), on ClientHellos that real
clients (curl, ``openssl s_client``, httpx, requests) send to a plain TCP listener in
the test. That implementation reads the hello with its own cursor and shares nothing with
the package's parser, and it is itself checked against the worked example of JA4.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import PKI, Instrumented, handshake_spans
from opentelemetry.instrumentation.mtls._ssl.client_hello import (
    ClientHello,
    ja3,
    ja4,
    offered_versions,
    parse_client_hello,
)
from opentelemetry.instrumentation.mtls._ssl.handshake_messages import certificate_leaf
from tlsrun import blocking

TIMEOUT = 10.0
JA4_PATTERN = re.compile(r"t(13|12|11|10|s3|s2|d1|d2|d3|00)[di]\d{4}.{2}_[0-9a-f]{12}_[0-9a-f]{12}")


# -- an independent JA4, from JA4.md ------------------------------------------------------


@dataclass
class Hello:
    """The ClientHello fields JA4 and JA3 read, as the reference definition names them."""

    version: int
    ciphers: list[int]
    extensions: list[int] = field(default_factory=list)
    server_name: bytes | None = None
    alpn: list[bytes] = field(default_factory=list)
    supported_versions: list[int] = field(default_factory=list)
    signature_algorithms: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    point_formats: list[int] = field(default_factory=list)


class Cursor:
    """Read big-endian fields off a byte string, front to back."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        chunk = self.data[self.at : self.at + size]
        assert len(chunk) == size, "truncated"
        self.at += size
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> Cursor:
        return Cursor(self.take(self.number(length_size)))

    def numbers16(self) -> list[int]:
        return [self.number(2) for _ in range(len(self.data) // 2)]

    @property
    def left(self) -> int:
        return len(self.data) - self.at


def reference_parse(message: bytes) -> Hello:
    """Parse a ClientHello handshake message (RFC 8446 4.1.2), header included."""
    outer = Cursor(message)
    assert outer.number(1) == 1, "not a ClientHello"
    body = outer.vector(3)
    hello = Hello(version=body.number(2), ciphers=[])
    body.take(32)  # random
    body.vector(1)  # legacy_session_id
    hello.ciphers = body.vector(2).numbers16()
    body.vector(1)  # compression methods
    extensions = body.vector(2) if body.left else Cursor(b"")
    while extensions.left:
        kind, value = extensions.number(2), extensions.vector(2)
        hello.extensions.append(kind)
        if kind == 0x0000:
            names = value.vector(2)
            assert names.number(1) == 0  # host_name
            hello.server_name = names.vector(2).data
        elif kind == 0x0010:
            protocols = value.vector(2)
            while protocols.left:
                hello.alpn.append(protocols.vector(1).data)
        elif kind == 0x002B:
            hello.supported_versions = value.vector(1).numbers16()
        elif kind == 0x000D:
            hello.signature_algorithms = value.vector(2).numbers16()
        elif kind == 0x000A:
            hello.groups = value.vector(2).numbers16()
        elif kind == 0x000B:
            hello.point_formats = list(value.vector(1).data)
    return hello


GREASE = {0x0A0A + 0x1010 * i for i in range(16)}  # JA4.md: draft-davidben-tls-grease-01


def sha12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12] if text else "000000000000"


def alpn_code(first: bytes) -> str:
    """JA4.md: the first and last characters of the first ALPN value; hex if not alphanumeric."""
    if not first:
        return "00"
    if first[:1].isalnum() and first[-1:].isalnum():  # bytes.isalnum: ASCII only
        return chr(first[0]) + chr(first[-1])
    text = first.hex()
    return text[0] + text[-1]


def reference_ja4(hello: Hello) -> str:
    """JA4 as JA4.md defines it, for TCP (``t``)."""
    versions = [v for v in hello.supported_versions if v not in GREASE]
    version = max(versions) if versions else hello.version
    code = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3"}
    ciphers = [f"{c:04x}" for c in hello.ciphers if c not in GREASE]
    extensions = [f"{e:04x}" for e in hello.extensions if e not in GREASE]
    alpn = alpn_code(hello.alpn[0] if hello.alpn else b"")
    a = (
        f"t{code.get(version, '00')}{'d' if '0000' in extensions else 'i'}"
        f"{min(len(ciphers), 99):02d}{min(len(extensions), 99):02d}{alpn}"
    )
    c = ",".join(sorted(e for e in extensions if e not in {"0000", "0010"}))
    signatures = [f"{s:04x}" for s in hello.signature_algorithms if s not in GREASE]
    if signatures:
        c += "_" + ",".join(signatures)
    return f"{a}_{sha12(','.join(sorted(ciphers)))}_{sha12(c)}"


def reference_ja3(hello: Hello) -> str:
    """JA3 (salesforce/ja3): MD5 of version,ciphers,extensions,groups,formats, GREASE out."""

    def join(values: list[int]) -> str:
        return "-".join(str(v) for v in values if v not in GREASE)

    text = ",".join(
        [
            str(hello.version),
            join(hello.ciphers),
            join(hello.extensions),
            join(hello.groups),
            "-".join(str(p) for p in hello.point_formats),
        ]
    )
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def test_reference_ja4_matches_the_worked_example_of_ja4_md() -> None:
    """The independent JA4 reproduces JA4.md's own example: it can judge ours."""
    hello = Hello(
        version=0x0303,
        ciphers=[
            int(c, 16)
            for c in [
                "1301",
                "1302",
                "1303",
                "c02b",
                "c02f",
                "c02c",
                "c030",
                "cca9",
                "cca8",
                "c013",
                "c014",
                "009c",
                "009d",
                "002f",
                "0035",
            ]
        ],
        extensions=[
            int(e, 16)
            for e in [
                "001b",
                "0000",
                "0033",
                "0010",
                "4469",
                "0017",
                "002d",
                "000d",
                "0005",
                "0023",
                "0012",
                "002b",
                "ff01",
                "000b",
                "000a",
                "0015",
            ]
        ],
        server_name=b"example.com",
        alpn=[b"h2", b"http/1.1"],
        supported_versions=[0x0A0A, 0x0304, 0x0303],
        signature_algorithms=[
            int(s, 16) for s in ["0403", "0804", "0401", "0503", "0805", "0501", "0806", "0601"]
        ],
    )
    assert reference_ja4(hello) == "t13d1516h2_8daaf6152771_e5627efa2ab1"
    # ... and so does ours, from the same fields (GREASE added where JA4 ignores it).
    ours = ClientHello(
        legacy_version=hello.version,
        cipher_suites=(0x1A1A, *hello.ciphers),
        extensions=(0x2A2A, *hello.extensions),
        server_name="example.com",
        alpn=tuple(hello.alpn),
        supported_versions=tuple(hello.supported_versions),
        signature_algorithms=tuple(hello.signature_algorithms),
        supported_groups=(),
        ec_point_formats=(),
    )
    assert ja4(ours) == "t13d1516h2_8daaf6152771_e5627efa2ab1"


def test_reference_alpn_code_follows_ja4_md() -> None:
    """The ALPN rule of JA4.md, its own examples."""
    assert alpn_code(b"h2") == "h2"
    assert alpn_code(b"http/1.1") == "h1"
    assert alpn_code(b"") == "00"
    examples = {b"\xab": "ab", b"\x20": "20", b"\xab\xcd": "ad", b"\x20\x61": "21"}
    examples |= {b"\x30\xab": "3b", b"\x61\x20": "60", b"\x30\x31\xab\xcd": "3d"}
    examples[b"\x30\xab\xcd\x31"] = "01"
    for value, code in examples.items():
        assert alpn_code(value) == code


# -- real clients' ClientHellos -------------------------------------------------------------


def read_hello(conn: socket.socket) -> bytes:
    """Read TLS records until one whole handshake message is in; return that message."""
    received = b""
    message = b""
    while len(message) < 4 or len(message) < 4 + int.from_bytes(message[1:4], "big"):
        while len(received) < 5 or len(received) < 5 + int.from_bytes(received[3:5], "big"):
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(received)} bytes")
            received += chunk
        assert received[0] == 22, "not a handshake record"
        length = int.from_bytes(received[3:5], "big")
        message += received[5 : 5 + length]
        received = received[5 + length :]
    return message[: 4 + int.from_bytes(message[1:4], "big")]


def capture_hello(client: Callable[[int], None]) -> bytes:
    """Run a client against a plain TCP listener; return the ClientHello it sent."""
    got: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                got.append(read_hello(conn))

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            client(listener.getsockname()[1])
        finally:
            thread.join(TIMEOUT)
    assert got, "no ClientHello arrived"
    return got[0]


def serve_tls_once(ctx: ssl.SSLContext, client: Callable[[int], None]) -> None:
    """Run a client against a blocking TLS server (one connection, any outcome)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            client(listener.getsockname()[1])
        finally:
            thread.join(TIMEOUT)


def curl(pki: PKI) -> Callable[[int], None]:
    def run(port: int) -> None:
        command = ["curl", "-sS", "--max-time", "5", "--cacert", pki.ca.cert_path]
        subprocess.run(
            [*command, f"https://localhost:{port}/"], capture_output=True, timeout=15, check=False
        )

    return run


def s_client(pki: PKI) -> Callable[[int], None]:
    def run(port: int) -> None:
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
        command += ["-servername", "localhost", "-CAfile", pki.ca.cert_path]
        subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, timeout=15, check=False
        )

    return run


def with_httpx(pki: PKI) -> Callable[[int], None]:
    def run(port: int) -> None:
        with httpx.Client(timeout=5) as client, contextlib.suppress(httpx.HTTPError):
            client.get(f"https://localhost:{port}/")

    return run


def with_requests(pki: PKI) -> Callable[[int], None]:
    def run(port: int) -> None:
        with contextlib.suppress(requests.RequestException):
            requests.get(f"https://localhost:{port}/", timeout=5)

    return run


CLIENTS: dict[str, Callable[[PKI], Callable[[int], None]]] = {
    "curl": curl,
    "openssl s_client": s_client,
    "httpx": with_httpx,
    "requests": with_requests,
}


@pytest.mark.parametrize("name", list(CLIENTS))
def test_ja4_of_real_clients_matches_the_reference(
    name: str, pki: PKI, instrumented: Instrumented, exporter: InMemorySpanExporter
) -> None:
    """The parser's JA4, and the server span's, equal the independent JA4 of the hello."""
    if name in {"curl", "openssl s_client"} and shutil.which(name.split(maxsplit=1)[0]) is None:
        pytest.skip(f"{name} is not installed")
    client = CLIENTS[name](pki)
    message = capture_hello(client)
    reference = reference_parse(message)
    expected = reference_ja4(reference)
    assert JA4_PATTERN.fullmatch(expected)
    assert expected.startswith("t13d")  # every one of these clients sends SNI, offers 1.3

    parsed = parse_client_hello(message)
    assert parsed is not None
    assert ja4(parsed) == expected
    assert ja3(parsed) == reference_ja3(reference)
    assert parsed.server_name == reference.server_name.decode() == "localhost"

    # A real TLS server sees the same client build: its span carries the same JA4.
    serve_tls_once(pki.server_context(ssl.CERT_NONE), client)
    (span,) = handshake_spans(exporter, "server")
    attributes = span.attributes or {}
    assert attributes["tls.client.ja4"] == expected
    assert attributes["tls.client.server_name"] == "localhost"
    # Negative control: JA3 is opt-in.
    assert "tls.client.ja3" not in attributes


# -- hellos built here, GREASE and all ----------------------------------------------------


def vector(length_size: int, body: bytes) -> bytes:
    return len(body).to_bytes(length_size, "big") + body


def numbers(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)


def build_hello(hello: Hello, *, grease_extensions: list[int] = []) -> bytes:  # noqa: B006
    """Encode a ClientHello handshake message (header included) holding ``hello``'s fields."""
    extensions = b""
    for kind in hello.extensions:
        if kind == 0x0000 and hello.server_name is not None:
            value = vector(2, b"\x00" + vector(2, hello.server_name))
        elif kind == 0x0010:
            value = vector(2, b"".join(vector(1, p) for p in hello.alpn))
        elif kind == 0x002B:
            value = vector(1, numbers(hello.supported_versions))
        elif kind == 0x000D:
            value = vector(2, numbers(hello.signature_algorithms))
        elif kind == 0x000A:
            value = vector(2, numbers(hello.groups))
        elif kind == 0x000B:
            value = vector(1, bytes(hello.point_formats))
        else:
            value = b"\x00" if kind in grease_extensions else b""
        extensions += kind.to_bytes(2, "big") + vector(2, value)
    body = hello.version.to_bytes(2, "big") + bytes(32) + vector(1, bytes(32))
    body += vector(2, numbers(hello.ciphers)) + vector(1, b"\x00") + vector(2, extensions)
    return b"\x01" + vector(3, body)


def test_grease_is_ignored_and_no_sni_is_i() -> None:
    """GREASE in every list JA4 reads is left out; a hello without SNI is ``i``."""
    grease = sorted(GREASE)
    hello = Hello(
        version=0x0303,
        ciphers=[grease[0], 0x1301, 0x1302, 0xC02B],
        extensions=[grease[1], 0x000A, 0x002B, 0x000D, 0x0010, grease[2], 0x0033],
        alpn=[b"h2"],
        supported_versions=[grease[3], 0x0304, 0x0303],
        signature_algorithms=[grease[4], 0x0804, 0x0403],
        groups=[grease[5], 0x001D],
    )
    message = build_hello(hello, grease_extensions=grease)
    parsed = parse_client_hello(message)
    assert parsed is not None
    assert parsed.server_name is None
    assert ja4(parsed) == reference_ja4(hello)
    assert ja4(parsed).startswith("t13i0305h2_")
    assert ja3(parsed) == reference_ja3(hello)
    assert offered_versions(parsed) == ("1.3", "1.2")
    # Control: the same hello with SNI is ``d``, one more extension, same hashes.
    named = Hello(**{**vars(hello), "server_name": b"a.test"})
    named.extensions = [0x0000, *hello.extensions]
    with_sni = parse_client_hello(build_hello(named, grease_extensions=grease))
    assert with_sni is not None
    assert ja4(with_sni) == "t13d0306h2" + ja4(parsed)[10:] == reference_ja4(named)


# -- the parser never raises --------------------------------------------------------------


def python_hello(**context_options: Any) -> bytes:
    """The ClientHello message Python's own client sends (over memory BIOs, no socket)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    for name, value in context_options.items():
        setattr(ctx, name, value)
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="fuzz.example")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    record = outgoing.read()
    return record[5 : 5 + int.from_bytes(record[3:5], "big")]


REAL_HELLOS = [python_hello(), python_hello(maximum_version=ssl.TLSVersion.TLSv1_2)]


def check_fields(hello: ClientHello | None) -> None:
    """Whatever was parsed yields well-formed fields (None yields nothing)."""
    if hello is None:
        return
    assert JA4_PATTERN.fullmatch(ja4(hello)), ja4(hello)
    assert re.fullmatch(r"[0-9a-f]{32}", ja3(hello))
    versions = offered_versions(hello)
    assert versions
    assert all(re.fullmatch(r"1\.[0-3]|3|0x[0-9a-f]{4}", v) for v in versions)
    name = hello.server_name
    assert name is None or (0 < len(name) <= 253 and name.isascii() and name.isprintable())


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    check_fields(parse_client_hello(data))
    # ... nor with a ClientHello's header in front, which takes the parser deeper.
    check_fields(parse_client_hello(b"\x01" + len(data).to_bytes(3, "big") + data))
    for tls13 in (True, False):
        leaf = certificate_leaf(b"\x0b" + len(data).to_bytes(3, "big") + data, tls13=tls13)
        assert leaf is None or (0 < len(leaf) <= len(data))


@FUZZ
@given(
    st.sampled_from(REAL_HELLOS),
    st.integers(min_value=0, max_value=600),
    st.lists(st.tuples(st.integers(0, 599), st.integers(0, 255)), max_size=8),
)
def test_mutated_and_truncated_real_hellos_never_raise(
    message: bytes, cut: int, changes: list[tuple[int, int]]
) -> None:
    mutated = bytearray(message)
    for position, value in changes:
        if position < len(mutated):
            mutated[position] = value
    check_fields(parse_client_hello(bytes(mutated)))
    truncated = message[:cut]
    parsed = parse_client_hello(truncated)
    if cut < len(message):
        # Negative control of the parse below: a hello cut short is no hello.
        assert parsed is None
    else:
        assert parsed is not None
        check_fields(parsed)


ALNUM = st.text("abcdefghijklmnopqrstuvwxyz0123456789/.-", min_size=1, max_size=12).filter(
    lambda text: text[0].isalnum() and text[-1].isalnum()
)
CODES = st.lists(st.integers(0, 0xFFFF), max_size=20)


@FUZZ
@given(
    ciphers=CODES,
    others=st.lists(st.integers(0x0011, 0xFFFF).filter(lambda v: v != 0x002B), max_size=12),
    sni=st.booleans(),
    alpn=st.lists(ALNUM, max_size=3),
    versions=st.lists(st.sampled_from([0x0304, 0x0303, 0x0302, 0x7F1C, 0x3A3A]), max_size=4),
    signatures=CODES,
)
def test_ja4_equals_the_reference_on_generated_hellos(
    ciphers: list[int],
    others: list[int],
    sni: bool,
    alpn: list[str],
    versions: list[int],
    signatures: list[int],
) -> None:
    """Differential: any well-formed hello gets the reference's JA4 and JA3."""
    extensions = list(dict.fromkeys(others))  # one of each, as TLS requires
    if sni:
        extensions.insert(0, 0x0000)
    if alpn:
        extensions.append(0x0010)
    if versions:
        extensions.append(0x002B)
    if signatures:
        extensions.append(0x000D)
    hello = Hello(
        version=0x0303,
        ciphers=ciphers,
        extensions=extensions,
        server_name=b"fuzz.example" if sni else None,
        alpn=[p.encode() for p in alpn],
        supported_versions=versions,
        signature_algorithms=signatures,
    )
    parsed = parse_client_hello(build_hello(hello))
    assert parsed is not None
    assert ja4(parsed) == reference_ja4(hello)
    assert ja3(parsed) == reference_ja3(hello)


# -- what server spans carry ------------------------------------------------------------


def python_client(ctx: ssl.SSLContext, server_hostname: str | None) -> Callable[[int], None]:
    """A blocking Python client of ``ctx`` that connects, handshakes if it can, and closes."""

    def run(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname=server_hostname):
                    pass
            except (OSError, ssl.SSLError):
                pass

    return run


@pytest.fixture
def only_server_spans(exporter: InMemorySpanExporter) -> Iterator[Callable[[], dict[str, Any]]]:
    def server() -> dict[str, Any]:
        (span,) = handshake_spans(exporter, "server")
        return dict(span.attributes or {})

    yield server


def test_ja3_is_opt_in(
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    only_server_spans: Callable[[], dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``tls.client.ja3`` only with capture_ja3 (option or variable); the reference's value."""
    client_ctx = pki.client_context(pki.client)
    expected = reference_ja3(reference_parse(capture_hello(python_client(client_ctx, "localhost"))))

    # Negative control: by default, JA4 only.
    blocking(pki.server_context(), client_ctx)
    server = only_server_spans()
    assert "tls.client.ja3" not in server
    assert JA4_PATTERN.fullmatch(server["tls.client.ja4"])

    exporter.clear()
    instrumented(capture_ja3=True)
    blocking(pki.server_context(), client_ctx)
    assert only_server_spans()["tls.client.ja3"] == expected

    exporter.clear()
    monkeypatch.setenv("OTEL_PYTHON_MTLS_CAPTURE_JA3", "true")
    instrumented()
    blocking(pki.server_context(), client_ctx)
    assert only_server_spans()["tls.client.ja3"] == expected
    # The client's own span never fingerprints its own hello.
    (client,) = handshake_spans(exporter, "client")
    assert not [key for key in client.attributes or {} if key.startswith("tls.client.ja")]


def test_offered_versions_of_a_tls12_client_at_a_tls13_only_server(
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    only_server_spans: Callable[[], dict[str, Any]],
) -> None:
    """A failed server span says what the client offered: its versions, ciphers and ALPN."""
    server_ctx = pki.server_context()
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx = pki.client_context(pki.client)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    outcome = blocking(server_ctx, client_ctx)
    assert outcome.server.startswith("SSLError")

    server = only_server_spans()
    assert server["tls.established"] is False
    assert server["error.type"] == "protocol_version_unsupported"
    # No supported_versions extension in a TLS 1.2-only hello: its own version.
    assert server["tls.client.offered_versions"] == ("1.2",)
    assert server["tls.client.supported_ciphers"] == (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "TLS_EMPTY_RENEGOTIATION_INFO_SCSV",
    )
    assert server["tls.client.offered_next_protocols"] == ("h2", "http/1.1")
    assert str(server["tls.client.ja4"]).startswith("t12d0")

    # Negative control: the same client meeting a server it can talk to. A success
    # carries no offered lists (ALPN only where none was agreed: here the server has none).
    exporter.clear()
    blocking(pki.server_context(), client_ctx)
    success = only_server_spans()
    assert success["tls.established"] is True
    assert "tls.client.offered_versions" not in success
    assert "tls.client.supported_ciphers" not in success
    assert success["tls.client.offered_next_protocols"] == ("h2", "http/1.1")

    exporter.clear()
    agreed_ctx = pki.server_context()
    agreed_ctx.set_alpn_protocols(["h2"])
    blocking(agreed_ctx, client_ctx)
    assert "tls.client.offered_next_protocols" not in only_server_spans()


def test_offered_versions_of_a_tls13_client(
    pki: PKI,
    instrumented: Instrumented,
    only_server_spans: Callable[[], dict[str, Any]],
) -> None:
    """A hello with supported_versions: the versions it lists, in its order."""
    server_ctx = pki.server_context()
    server_ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx = pki.client_context(pki.client)
    client_ctx.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")  # none the server takes
    blocking(server_ctx, client_ctx)
    server = only_server_spans()
    assert server["error.type"] == "cipher_suite_mismatch"
    assert server["tls.client.offered_versions"] == ("1.3", "1.2")
    ciphers = server["tls.client.supported_ciphers"]
    assert "TLS_AES_128_GCM_SHA256" in ciphers
    assert "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" in ciphers
    assert "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" not in ciphers


@pytest.mark.parametrize("hostname", [None, "127.0.0.1"])
def test_no_sni_means_no_server_name_from_sni(
    hostname: str | None,
    pki: PKI,
    instrumented: Instrumented,
    exporter: InMemorySpanExporter,
    only_server_spans: Callable[[], dict[str, Any]],
) -> None:
    """A client that sends no SNI (none given, or an IP address): the socket's address only."""
    client_ctx = pki.client_context(pki.client)
    client_ctx.check_hostname = hostname is not None
    message = capture_hello(python_client(client_ctx, hostname))
    assert reference_parse(message).server_name is None  # the premise: no SNI on the wire

    outcome = blocking(pki.server_context(), client_ctx, server_hostname=hostname)  # type: ignore[arg-type]
    assert outcome.server.startswith("ok")
    server = only_server_spans()
    assert "tls.client.server_name" not in server
    assert server["server.address"] == server["network.local.address"] == "127.0.0.1"
    assert str(server["tls.client.ja4"])[3] == "i"
    # The client's span says what it sent: no SNI, and the address it connected to.
    client = dict(handshake_spans(exporter, "client")[-1].attributes or {})  # blocking()'s
    assert "tls.client.server_name" not in client
    assert client["server.address"] == "127.0.0.1"

    # Negative control: the same client naming the server sends SNI, and it is read.
    exporter.clear()
    client_ctx.check_hostname = True
    blocking(pki.server_context(), client_ctx, server_hostname="localhost")
    named = only_server_spans()
    assert named["server.address"] == named["tls.client.server_name"] == "localhost"
    assert str(named["tls.client.ja4"])[3] == "d"
    named_client = handshake_spans(exporter, "client")[-1]
    assert (named_client.attributes or {})["tls.client.server_name"] == "localhost"
