"""``otel-mtls inspect``, run as a user runs it, against real TLS servers on 127.0.0.1.

Each failure a client meets (a foreign CA, an expired or missing certificate, a name
the server's certificate does not hold, a server that asks for no certificate, refused
and closed ports, bad arguments) is provoked over real TLS, with its negative control;
the good connection is compared with what ``openssl s_client`` reports.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import PKI
from opentelemetry.instrumentation.mtls._x509 import pem_certificates, sha256_hex
from pki import Leaf

OTEL_MTLS = str(Path(sys.executable).parent / "otel-mtls")
TIMEOUT = 10.0
TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3

requires_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")


def inspect(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``otel-mtls inspect`` entry point."""
    return subprocess.run(
        [OTEL_MTLS, "inspect", *args], capture_output=True, text=True, timeout=60, check=False
    )


def credentials(leaf: Leaf) -> tuple[str, str, str, str]:
    return "--cert", leaf.cert_path, "--key", leaf.key_path


@contextmanager
def tls_server(
    ctx: ssl.SSLContext, *, connections: int = 1, names: list[str | None] | None = None
) -> Iterator[int]:
    """Serve ``connections`` TLS connections on 127.0.0.1; yield the port.

    Each accepted connection is held open until the client leaves, as a server that
    waits for a request does. ``names`` collects the SNI each ClientHello carried.
    """
    if names is not None:
        ctx.sni_callback = lambda _tls, name, _ctx: names.append(name)  # type: ignore[func-returns-value]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def serve() -> None:
        with listener:
            for _ in range(connections):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(TIMEOUT)
                    try:
                        with ctx.wrap_socket(conn, server_side=True) as tls:
                            tls.recv(1)
                    except (OSError, ssl.SSLError):
                        pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(TIMEOUT)


def server_context(
    pki: PKI, verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED, version: ssl.TLSVersion = TLS13
) -> ssl.SSLContext:
    ctx = pki.server_context(verify_mode, maximum_version=version)
    ctx.minimum_version = version
    return ctx


def field(out: str, name: str) -> str:
    """The value of one ``  name   value`` line of the text report."""
    match = re.search(rf"^ +{re.escape(name)} +(.*)$", out, re.MULTILINE)
    assert match is not None, f"no {name!r} line in:\n{out}"
    return match.group(1)


# -- the server rejects the client --------------------------------------------------------


def test_a_tls13_late_rejection_is_reported_with_the_alert(pki: PKI) -> None:
    ctx = server_context(pki)
    with tls_server(ctx) as port:
        result = inspect(
            f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, *credentials(pki.untrusted_client)
        )
    assert result.returncode == 1, result
    out = result.stdout
    assert field(out, "result") == (
        "failed after the handshake (a TLS 1.3 late rejection): "
        "peer_rejected_certificate, alert unknown_ca from the server"
    )
    assert field(out, "protocol").startswith("TLS 1.3, TLS_")
    assert field(out, "presented") == "CN=intruder,O=mTLS tests (sent)"
    assert "does not trust the CA that issued your certificate" in field(out, "hint")
    assert "Traceback" not in result.stderr

    # Negative control: the same server, a certificate from its CA.
    with tls_server(ctx) as port:
        result = inspect(f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, *credentials(pki.client))
    assert result.returncode == 0, result
    assert field(result.stdout, "result").startswith("usable: the server accepted us")
    assert "hint" not in result.stdout


def test_json_carries_the_span_and_the_late_rejection_event(pki: PKI) -> None:
    ctx = server_context(pki)
    with tls_server(ctx) as port:
        result = inspect(
            f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, "--json",
            *credentials(pki.untrusted_client),
        )  # fmt: skip
    assert result.returncode == 1, result
    document = json.loads(result.stdout)
    assert document["name"] == "TLS client handshake"
    # The handshake itself succeeded, as the client's TLS 1.3 handshake does.
    assert document["attributes"]["tls.established"] is True
    assert document["attributes"]["tls.server.subject"] == "CN=server.test,O=mTLS tests"
    found = document["inspect"]
    assert found["error.type"] == "peer_rejected_certificate"
    assert found["exit_status"] == 1
    assert found["events"] == [
        {
            "name": "tls.peer_rejected",
            "attributes": {
                "error.type": "peer_rejected_certificate",
                "tls.server.hash.sha256": sha256_hex(pki.server.der),
                "tls.alert": "unknown_ca",
                "tls.alert.source": "peer",
            },
        }
    ]

    # Negative control: accepted, no event.
    with tls_server(ctx) as port:
        result = inspect(
            f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, "--json", *credentials(pki.client)
        )
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["inspect"]["events"] == []


def test_a_tls12_rejection_happens_in_the_handshake(pki: PKI) -> None:
    ctx = server_context(pki, version=TLS12)
    with tls_server(ctx, connections=2) as port:
        result = inspect(
            f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, *credentials(pki.untrusted_client)
        )
        control = inspect(f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, *credentials(pki.client))
    assert result.returncode == 1, result
    assert field(result.stdout, "result") == (
        "failed in the handshake: peer_rejected_certificate, alert unknown_ca from the server"
    )
    assert control.returncode == 0, control
    assert field(control.stdout, "protocol").startswith("TLS 1.2, TLS_ECDHE_")
    assert field(control.stdout, "result") == (
        "usable: the server accepted the handshake (TLS 1.2: it judged our certificate first)"
    )


@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls1.3", "tls1.2"])
def test_an_expired_client_certificate_is_named_and_dated(
    pki: PKI, version: ssl.TLSVersion
) -> None:
    with tls_server(server_context(pki, version=version)) as port:
        result = inspect(
            f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, *credentials(pki.expired_client)
        )
    assert result.returncode == 1, result
    out = result.stdout
    assert "alert certificate_expired from the server" in field(out, "result")
    assert "the server says your certificate has expired" in field(out, "hint")
    assert re.search(r"2021-01-01T00:00:00.000Z \(expired \d+ days ago\)", out), out


@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls1.3", "tls1.2"])
def test_a_missing_client_certificate(pki: PKI, version: ssl.TLSVersion) -> None:
    with tls_server(server_context(pki, version=version)) as port:
        result = inspect(f"127.0.0.1:{port}", "--ca", pki.ca.cert_path)
    assert result.returncode == 1, result
    out = result.stdout
    assert field(out, "client cert") == "requested; acceptable CAs: none named"
    assert field(out, "presented") == "none (no --cert)"
    assert field(out, "result").startswith("failed")
    assert "peer_rejected_certificate" in field(out, "result")
    assert field(out, "hint") == "the server requires a client certificate: pass --cert and --key"


def test_a_server_that_requests_no_certificate_is_usable_but_not_mtls(pki: PKI) -> None:
    ctx = server_context(pki, ssl.CERT_NONE)
    with tls_server(ctx) as port:
        result = inspect(f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, *credentials(pki.client))
    assert result.returncode == 0, result
    out = result.stdout
    assert field(out, "client cert") == "not requested by the server"
    assert field(out, "presented") == "CN=web-client,O=mTLS tests (not sent)"
    assert field(out, "hint") == "the server did not ask for a client certificate: this is not mTLS"
    # Negative control: a server that asks for one.
    with tls_server(server_context(pki)) as port:
        control = inspect(f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, *credentials(pki.client))
    assert control.returncode == 0, control
    assert field(control.stdout, "client cert").startswith("requested")
    assert field(control.stdout, "presented") == "CN=web-client,O=mTLS tests (sent)"


# -- the client rejects the server -------------------------------------------------------


def test_a_hostname_mismatch_shows_the_names_the_certificate_holds(pki: PKI) -> None:
    names: list[str | None] = []
    with tls_server(server_context(pki), connections=3, names=names) as port:
        target = f"127.0.0.1:{port}"
        ca = ("--ca", pki.ca.cert_path, *credentials(pki.client))
        mismatch = inspect(target, *ca, "--servername", "wrong.example")
        by_name = inspect(target, *ca, "--servername", "localhost")
        by_ip = inspect(target, *ca)
    assert mismatch.returncode == 1, mismatch
    out = mismatch.stdout
    assert field(out, "result") == (
        "failed in the handshake: certificate_hostname_mismatch, alert bad_certificate "
        "from the client"
    )
    assert "does not name wrong.example" in field(out, "hint")
    assert field(out, "names") == "DNS:localhost, IP:127.0.0.1"  # the chain, unverified
    assert field(out, "SNI") == "wrong.example"
    # Negative controls: the name and the IP address the certificate holds.
    assert by_name.returncode == 0, by_name
    assert field(by_name.stdout, "server name") == "localhost: verified"
    assert by_ip.returncode == 0, by_ip
    assert field(by_ip.stdout, "SNI").startswith("none (127.0.0.1 is an IP address")
    # What the server saw: the names sent, and no SNI at all for the IP target.
    assert names == ["wrong.example", "localhost", None]


def test_a_server_from_another_ca_and_insecure(pki: PKI) -> None:
    with tls_server(server_context(pki, ssl.CERT_NONE), connections=2) as port:
        target = f"127.0.0.1:{port}"
        foreign = inspect(target, "--ca", pki.other_ca.cert_path)
        insecure = inspect(target, "--insecure", "--json")
    assert foreign.returncode == 1, foreign
    assert field(foreign.stdout, "result").startswith(
        "failed in the handshake: certificate_authority_invalid"
    )
    assert field(foreign.stdout, "verify server") == (
        "failed (19: self-signed certificate in certificate chain)"
    )
    assert field(foreign.stdout, "[0]") == "CN=server.test,O=mTLS tests"
    # --insecure connects: usable, but nothing was verified.
    assert insecure.returncode == 0, insecure
    document = json.loads(insecure.stdout)
    assert document["inspect"]["server_chain"][0]["sha256"] == sha256_hex(pki.server.der)
    attributes = document["attributes"]
    if "tls.validation.gaps" in attributes:  # depends on the validation-gap work landing
        assert document["inspect"]["validation_gaps"] == attributes["tls.validation.gaps"]
        assert "peer_not_verified" in attributes["tls.validation.gaps"]
        assert attributes["tls.server.verify.result"] == "skipped"


# -- ordinary mistakes: one line, no traceback -------------------------------------------


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_refused_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as bound:
        port = bound.getsockname()[1]
    line = one_line(inspect(f"127.0.0.1:{port}"), 1)
    assert line == f"otel-mtls inspect: 127.0.0.1:{port}: connection refused"


def test_a_port_that_closes_at_once() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def hang_up() -> None:
        with listener:
            conn, _ = listener.accept()
            conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    result = inspect(f"127.0.0.1:{listener.getsockname()[1]}")
    thread.join(TIMEOUT)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert field(result.stdout, "result") == "failed in the handshake: peer_connection_closed"
    assert field(result.stdout, "server chain") == "none received"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["127.0.0.1"], "127.0.0.1: expected HOST:PORT, e.g. example.com:443"),
        (["127.0.0.1:https"], "127.0.0.1:https: the port must be a number from 1 to 65535"),
        (["127.0.0.1:70000"], "127.0.0.1:70000: the port must be a number from 1 to 65535"),
        (["::1:443"], "::1:443: write an IPv6 address in brackets, e.g. [::1]:443"),
        (["127.0.0.1:1", "--cert", "/nonexistent.pem"], "/nonexistent.pem: no such file"),
        (["127.0.0.1:1", "--key", "client.key"], "--key needs --cert"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    assert one_line(inspect(*args), 2) == f"otel-mtls inspect: {message}"


def test_an_unreadable_key_and_argparse_errors(tmp_path: Path, pki: PKI) -> None:
    garbage = tmp_path / "key.pem"
    garbage.write_text("not a key\n")
    line = one_line(
        inspect("127.0.0.1:1", "--cert", pki.client.cert_path, "--key", str(garbage)), 2
    )
    assert line.startswith("otel-mtls inspect: cannot load --cert/--key: ")
    # argparse's own usage errors: status 2, no traceback.
    unknown = inspect("127.0.0.1:1", "--no-such-option")
    assert unknown.returncode == 2
    assert "unrecognized arguments: --no-such-option" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_an_unknown_host() -> None:
    line = one_line(inspect("no-such-host.invalid:443"), 1)
    assert line.startswith("otel-mtls inspect: no-such-host.invalid: unknown host")


def test_help_has_examples() -> None:
    result = subprocess.run(
        [OTEL_MTLS, "inspect", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "examples:\n  otel-mtls inspect api.example.com:443 --ca ca.crt" in result.stdout
    assert "exit status: 0 the connection is usable" in result.stdout


# -- against openssl ---------------------------------------------------------------------


def chain_file(pki: PKI, tmp_path: Path) -> Path:
    """The server's certificate followed by its CA's: a two-certificate chain."""
    path = tmp_path / "chain.pem"
    path.write_bytes(Path(pki.server.cert_path).read_bytes() + Path(pki.ca.cert_path).read_bytes())
    return path


def s_client(port: int, *options: str) -> str:
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts", *options],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.stdout


def iana_name(openssl_name: str) -> str:
    """The IANA name of an OpenSSL cipher name, from ``openssl ciphers -stdname``."""
    if openssl_name.startswith("TLS_"):
        return openssl_name  # TLS 1.3 suites: OpenSSL uses the IANA names
    listing = subprocess.run(
        ["openssl", "ciphers", "-stdname", openssl_name],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    # "TLS_ECDHE_..._SHA384 - ECDHE-ECDSA-AES256-GCM-SHA384 TLSv1.2 Kx=ECDH ..."
    return next(line.split()[0] for line in listing.splitlines() if line.split()[2] == openssl_name)


@requires_openssl
@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls1.3", "tls1.2"])
def test_a_good_connection_matches_openssl_s_client(
    pki: PKI, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    ctx = server_context(pki, version=version)
    ctx.load_cert_chain(chain_file(pki, tmp_path), pki.server.key_path)
    with tls_server(ctx, connections=2) as port:
        ours = inspect(
            f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, "--json", *credentials(pki.client)
        )
        theirs = s_client(
            port, "-CAfile", pki.ca.cert_path, "-cert", pki.client.cert_path,
            "-key", pki.client.key_path,
        )  # fmt: skip
    assert ours.returncode == 0, ours
    document: dict[str, Any] = json.loads(ours.stdout)
    presented = [sha256_hex(der) for der in pem_certificates(theirs.encode())]
    assert len(presented) == 2
    assert [c["sha256"] for c in document["inspect"]["server_chain"]] == presented
    protocol = re.search(r"^New, (TLSv1\.[23]), Cipher is (\S+)$", theirs, re.MULTILINE)
    assert protocol is not None, theirs
    assert f"TLSv{document['attributes']['tls.protocol.version']}" == protocol.group(1)
    assert document["attributes"]["tls.cipher"] == iana_name(protocol.group(2))


@contextmanager
def openssl_server(pki: PKI, *options: str) -> Iterator[int]:
    """``openssl s_server`` that requires a client certificate from the tests' CA."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    command = [
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1",
        "-cert", pki.server.cert_path, "-key", pki.server.key_path,
        "-CAfile", pki.ca.cert_path, "-Verify", "1", "-verify_return_error", *options,
    ]  # fmt: skip
    # stdin stays open: s_server would close the connection at its end.
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as server:
        try:
            assert server.stdout is not None
            for line in server.stdout:  # s_server says when it listens
                if line.startswith("ACCEPT"):
                    break
            yield port
        finally:
            server.kill()


@requires_openssl
@pytest.mark.parametrize("options", [(), ("-tls1_2",)], ids=["tls1.3", "tls1.2"])
def test_acceptable_client_cas_are_those_s_client_reports(pki: PKI, options: tuple[str]) -> None:
    with openssl_server(pki, *options) as port:
        result = inspect(f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, *credentials(pki.client))
    assert result.returncode == 0, result
    with openssl_server(pki, *options) as port:
        theirs = s_client(port, "-CAfile", pki.ca.cert_path)
    names = re.search(r"^Acceptable client certificate CA names\n(.*)$", theirs, re.MULTILINE)
    assert names is not None, theirs
    # The same name: OpenSSL's order and spacing, and RFC 4514's.
    assert names.group(1) == "O = mTLS test CA, CN = mTLS test CA root"
    assert field(result.stdout, "client cert") == (
        "requested; acceptable CAs: CN=mTLS test CA root,O=mTLS test CA"
    )
    # Negative control: a certificate of another CA, refused by the same server.
    with openssl_server(pki, *options) as port:
        refused = inspect(
            f"127.0.0.1:{port}", "--ca", pki.ca.cert_path, *credentials(pki.untrusted_client)
        )
    assert refused.returncode == 1, refused
    assert "peer_rejected_certificate" in field(refused.stdout, "result")
