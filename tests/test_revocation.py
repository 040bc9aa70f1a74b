"""Revocation checks by CRL and OCSP against real loopback HTTP servers, no mocks."""

from __future__ import annotations

import datetime
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from opentelemetry.instrumentation.mtls._requests.revocation import (
    CRL,
    GOOD,
    MAX_DOWNLOAD_BYTES,
    OCSP,
    REVOKED,
    UNKNOWN,
    RevocationChecker,
    RevocationResult,
)

UTC = datetime.timezone.utc
DER = serialization.Encoding.DER
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_LEAF_KEY = ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


@dataclass
class CA:
    """A throwaway CA that issues leaves and signs CRLs and OCSP responses."""

    key: PrivateKey
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(DER)

    def issue(
        self,
        serial: int,
        *,
        crl_urls: Sequence[str] = (),
        ocsp_urls: Sequence[str] = (),
        ocsp_signing: bool = False,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"leaf {serial}")]))
            .issuer_name(self.cert.subject)
            .public_key(_LEAF_KEY.public_key())
            .serial_number(serial)
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=30))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if crl_urls:
            points = [
                x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)
                for url in crl_urls
            ]
            builder = builder.add_extension(x509.CRLDistributionPoints(points), critical=False)
        if ocsp_urls:
            access = [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(url)
                )
                for url in ocsp_urls
            ]
            builder = builder.add_extension(x509.AuthorityInformationAccess(access), critical=False)
        if ocsp_signing:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
            )
        return builder.sign(self.key, hashes.SHA256())

    def crl(
        self,
        revoked: dict[int, x509.ReasonFlags | None],
        *,
        next_update: datetime.timedelta = datetime.timedelta(days=1),
        signing_key: PrivateKey | None = None,
    ) -> x509.CertificateRevocationList:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(_now() - datetime.timedelta(days=2))
            .next_update(_now() + next_update)
        )
        for serial, reason in revoked.items():
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(_now() - datetime.timedelta(days=2))
            )
            if reason is not None:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(signing_key or self.key, hashes.SHA256())


def make_ca(common_name: str, *, use_rsa: bool = False) -> CA:
    key: PrivateKey = (
        rsa.generate_private_key(65537, 2048)
        if use_rsa
        else ec.generate_private_key(ec.SECP256R1())
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_now() - datetime.timedelta(days=1))
        .not_valid_after(_now() + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(key, cert)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(DER)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_length: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drip: bool = False  # send the body one byte at a time, slowly


HANG = None
Route = Callable[[bytes], Reply | None]


@dataclass
class Responder:
    """OCSP answers signed by ``signer`` (the CA, or a delegate), per serial."""

    ca: CA
    statuses: dict[int, tuple[x509.Certificate, ocsp.OCSPCertStatus]] = field(default_factory=dict)
    signer_cert: x509.Certificate | None = None
    signer_key: PrivateKey | None = None

    def __call__(self, body: bytes) -> Reply:
        request = ocsp.load_der_ocsp_request(body)
        leaf, status = self.statuses[request.serial_number]
        revoked = status == ocsp.OCSPCertStatus.REVOKED
        signer_cert = self.signer_cert or self.ca.cert
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=leaf,
                issuer=self.ca.cert,
                algorithm=hashes.SHA1(),
                cert_status=status,
                this_update=_now() - datetime.timedelta(minutes=1),
                next_update=_now() + datetime.timedelta(hours=1),
                revocation_time=_now() - datetime.timedelta(days=1) if revoked else None,
                revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert)
        )
        if self.signer_cert is not None:
            builder = builder.certificates([self.signer_cert])
        response = builder.sign(self.signer_key or self.ca.key, hashes.SHA256())
        return Reply(body=response.public_bytes(DER))


class Server(ThreadingHTTPServer):
    """A loopback HTTP server with per-path routes and request counts."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def count(self, path: str) -> int:
        with self.lock:
            return self.hits[path]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        self._serve(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _serve(self, body: bytes) -> None:
        server = self.server
        assert isinstance(server, Server)
        with server.lock:
            server.hits[self.path] += 1
        route = server.routes.get(self.path)
        reply = Reply(404, b"not found") if route is None else route(body)
        if reply is HANG:  # accept, read, never answer
            server.release.wait(30)
            self.close_connection = True
            return
        self.send_response(reply.status)
        length = len(reply.body) if reply.content_length is None else reply.content_length
        self.send_header("Content-Length", str(length))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not reply.drip:
            self.wfile.write(reply.body)
            return
        for byte in reply.body:
            if server.release.wait(0.05):
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def ca() -> CA:
    return make_ca("Revocation test CA")


@pytest.fixture
def checkers() -> Iterator[Callable[..., RevocationChecker]]:
    made: list[RevocationChecker] = []

    def make(**kwargs: Any) -> RevocationChecker:
        checker = RevocationChecker(**kwargs)
        made.append(checker)
        return checker

    yield make
    for checker in made:
        checker.close(wait=True)


def check(
    checker: RevocationChecker, leaf: x509.Certificate, issuer: CA | None
) -> RevocationResult:
    return checker.submit(der(leaf), None if issuer is None else issuer.der).result(timeout=10)


def closed_port_url(path: str) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


# --- CRL -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, DER])
@pytest.mark.parametrize("with_issuer", [True, False])
def test_crl_file_good_and_revoked(
    tmp_path: Path,
    ca: CA,
    checkers: Callable[..., RevocationChecker],
    encoding: serialization.Encoding,
    with_issuer: bool,
) -> None:
    path = tmp_path / "ca.crl"
    path.write_bytes(ca.crl({2: x509.ReasonFlags.key_compromise}).public_bytes(encoding))
    checker = checkers(crl_files=[str(path)])
    good, revoked = ca.issue(1), ca.issue(2)
    issuer = ca if with_issuer else None

    result = check(checker, good, issuer)
    assert (result.status, result.source, result.reason) == (GOOD, CRL, None)
    assert result.checked_at < result.valid_until
    result = check(checker, revoked, issuer)
    assert (result.status, result.source, result.reason) == (REVOKED, CRL, "keyCompromise")


def test_crl_file_reloaded_when_it_changes(
    tmp_path: Path, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    path = tmp_path / "ca.crl"
    path.write_bytes(ca.crl({}).public_bytes(DER))
    checker = checkers(crl_files=[str(path)])
    first, second = ca.issue(1), ca.issue(2)
    assert check(checker, first, ca).status == GOOD

    path.write_bytes(ca.crl({2: None}).public_bytes(DER))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    result = check(checker, second, ca)
    assert (result.status, result.reason) == (REVOKED, "unspecified")


def test_crl_url_good_and_revoked_downloaded_once(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    crl = ca.crl({2: x509.ReasonFlags.superseded}).public_bytes(DER)
    server.routes["/crl"] = lambda _: Reply(body=crl)
    checker = checkers(crl_urls=[server.url("/crl")])

    assert check(checker, ca.issue(1), ca).status == GOOD
    result = check(checker, ca.issue(2), ca)
    assert (result.status, result.source, result.reason) == (REVOKED, CRL, "superseded")
    assert check(checker, ca.issue(3), None).status == GOOD
    assert server.count("/crl") == 1  # cached until its nextUpdate


def test_crl_distribution_point(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    crl = ca.crl({2: x509.ReasonFlags.key_compromise}).public_bytes(DER)
    server.routes["/crl"] = lambda _: Reply(body=crl)
    url = server.url("/crl")
    checker = checkers()

    assert check(checker, ca.issue(1, crl_urls=[url]), ca).status == GOOD
    result = check(checker, ca.issue(2, crl_urls=[url]), ca)
    assert (result.status, result.reason) == (REVOKED, "keyCompromise")
    assert server.count("/crl") == 1

    result = check(checkers(use_distribution_points=False), ca.issue(3, crl_urls=[url]), ca)
    assert (result.status, result.reason) == (UNKNOWN, "no CRL source")


def test_crl_signed_by_another_key_is_unknown(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    impostor = make_ca("Somebody else's CA")
    forged = ca.crl({}, signing_key=impostor.key).public_bytes(DER)  # right name, wrong key
    server.routes["/forged"] = lambda _: Reply(body=forged)
    checker = checkers()

    result = check(checker, ca.issue(1, crl_urls=[server.url("/forged")]), ca)
    assert result.status == UNKNOWN
    assert result.reason is not None
    assert "signature does not verify" in result.reason


def test_crl_of_another_issuer_is_ignored(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    other = make_ca("Somebody else's CA")
    other_crl = other.crl({}).public_bytes(DER)
    server.routes["/other"] = lambda _: Reply(body=other_crl)
    checker = checkers(crl_urls=[server.url("/other")])

    result = check(checker, ca.issue(1), ca)
    assert (result.status, result.reason) == (UNKNOWN, "no CRL for the certificate's issuer")
    result = check(checker, ca.issue(2), None)
    assert result.status == UNKNOWN


def test_stale_crl_still_reports_revocations_but_not_good(
    tmp_path: Path, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    path = tmp_path / "stale.crl"
    stale = ca.crl({2: x509.ReasonFlags.key_compromise}, next_update=-datetime.timedelta(days=1))
    path.write_bytes(stale.public_bytes(DER))
    checker = checkers(crl_files=[str(path)])

    result = check(checker, ca.issue(1), ca)
    assert result.status == UNKNOWN
    assert result.reason is not None
    assert "expired" in result.reason
    assert check(checker, ca.issue(2), ca).status == REVOKED


def test_non_http_distribution_point_is_unknown(
    ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    leaf = ca.issue(1, crl_urls=["ldap://ldap.example/cn=CA?certificateRevocationList"])
    result = check(checkers(), leaf, ca)
    assert result.status == UNKNOWN
    assert result.reason is not None
    assert "unsupported URL scheme" in result.reason


# --- OCSP ------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rsa", [False, True], ids=["ec", "rsa"])
def test_ocsp_good_revoked_unknown(
    server: Server, checkers: Callable[..., RevocationChecker], use_rsa: bool
) -> None:
    ca = make_ca("OCSP test CA", use_rsa=use_rsa)
    responder = Responder(ca)
    server.routes["/ocsp"] = responder
    url = server.url("/ocsp")
    leaves = {
        status: ca.issue(serial, ocsp_urls=[url])
        for serial, status in enumerate(ocsp.OCSPCertStatus, 1)
    }
    responder.statuses = {leaf.serial_number: (leaf, status) for status, leaf in leaves.items()}
    checker = checkers()

    result = check(checker, leaves[ocsp.OCSPCertStatus.GOOD], ca)
    assert (result.status, result.source, result.reason) == (GOOD, OCSP, None)
    assert result.valid_until > result.checked_at
    result = check(checker, leaves[ocsp.OCSPCertStatus.REVOKED], ca)
    assert (result.status, result.source, result.reason) == (REVOKED, OCSP, "keyCompromise")
    result = check(checker, leaves[ocsp.OCSPCertStatus.UNKNOWN], ca)
    assert (result.status, result.source) == (UNKNOWN, OCSP)
    assert result.reason is not None
    assert "does not know" in result.reason


@pytest.mark.parametrize("ocsp_signing", [True, False], ids=["delegated", "no-eku"])
def test_ocsp_delegated_responder(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker], ocsp_signing: bool
) -> None:
    delegate = ca.issue(99, ocsp_signing=ocsp_signing)
    responder = Responder(ca, signer_cert=delegate, signer_key=_LEAF_KEY)
    server.routes["/ocsp"] = responder
    leaf = ca.issue(1, ocsp_urls=[server.url("/ocsp")])
    responder.statuses[1] = (leaf, ocsp.OCSPCertStatus.GOOD)

    result = check(checkers(), leaf, ca)
    if ocsp_signing:
        assert (result.status, result.source) == (GOOD, OCSP)
    else:
        assert result.status == UNKNOWN
        assert result.reason is not None
        assert "OCSPSigning" in result.reason


def test_ocsp_response_signed_by_another_ca_is_unknown(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    impostor = make_ca("Somebody else's CA")
    responder = Responder(ca, signer_cert=impostor.cert, signer_key=impostor.key)
    server.routes["/ocsp"] = responder
    leaf = ca.issue(1, ocsp_urls=[server.url("/ocsp")])
    responder.statuses[1] = (leaf, ocsp.OCSPCertStatus.GOOD)

    result = check(checkers(), leaf, ca)
    assert (result.status, result.source) == (UNKNOWN, OCSP)


def test_ocsp_response_about_another_certificate_is_unknown(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    responder = Responder(ca)
    server.routes["/ocsp"] = responder
    leaf = ca.issue(1, ocsp_urls=[server.url("/ocsp")])
    responder.statuses[1] = (ca.issue(2), ocsp.OCSPCertStatus.GOOD)

    result = check(checkers(), leaf, ca)
    assert (result.status, result.reason) == (
        UNKNOWN,
        f"ocsp {server.url('/ocsp')}: OCSP response is not about this certificate",
    )


def test_ocsp_needs_the_issuer_else_crl(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    crl = ca.crl({}).public_bytes(DER)
    server.routes["/crl"] = lambda _: Reply(body=crl)
    server.routes["/ocsp"] = Responder(ca)
    leaf = ca.issue(1, crl_urls=[server.url("/crl")], ocsp_urls=[server.url("/ocsp")])

    result = check(checkers(), leaf, None)
    assert (result.status, result.source) == (GOOD, CRL)
    result = check(checkers(use_ocsp=False), leaf, ca)
    assert (result.status, result.source) == (GOOD, CRL)
    assert server.count("/ocsp") == 0


# --- failures --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [OCSP, CRL])
@pytest.mark.parametrize("path", ["/garbage", "/error", "/huge", "/missing", "closed-port"])
def test_failures_give_unknown(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker], kind: str, path: str
) -> None:
    server.routes["/garbage"] = lambda _: Reply(body=b"this is not DER at all")
    server.routes["/error"] = lambda _: Reply(500, b"oops")
    server.routes["/huge"] = lambda _: Reply(content_length=MAX_DOWNLOAD_BYTES + 1)
    url = closed_port_url("/") if path == "closed-port" else server.url(path)
    leaf = ca.issue(1, ocsp_urls=[url]) if kind == OCSP else ca.issue(1, crl_urls=[url])

    result = check(checkers(timeout=2.0), leaf, ca)
    assert (result.status, result.source) == (UNKNOWN, kind)
    assert result.reason
    assert result.valid_until - result.checked_at <= 60


def test_slow_drip_gives_unknown(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    server.routes["/drip"] = lambda _: Reply(body=b"x" * 1000, drip=True)
    leaf = ca.issue(1, crl_urls=[server.url("/drip")])

    result = check(checkers(timeout=0.5), leaf, ca)
    assert result.status == UNKNOWN
    assert result.reason is not None
    assert "timed out" in result.reason


@pytest.mark.parametrize(
    ("location", "status"),
    [("/crl", GOOD), ("file:///etc/hosts", UNKNOWN), ("https://127.0.0.1:1/crl", UNKNOWN)],
)
def test_redirects_are_followed_to_http_only(
    server: Server,
    ca: CA,
    checkers: Callable[..., RevocationChecker],
    location: str,
    status: str,
) -> None:
    crl = ca.crl({}).public_bytes(DER)
    server.routes["/crl"] = lambda _: Reply(body=crl)
    target = server.url(location) if location.startswith("/") else location
    server.routes["/moved"] = lambda _: Reply(302, headers={"Location": target})
    leaf = ca.issue(1, crl_urls=[server.url("/moved")])

    result = check(checkers(), leaf, ca)
    assert result.status == status
    if status == UNKNOWN:
        assert result.reason is not None
        assert "refused" in result.reason


def test_hanging_responder_gives_unknown_and_submit_does_not_wait(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    server.routes["/hang"] = lambda _: HANG
    leaf = ca.issue(1, ocsp_urls=[server.url("/hang")])
    checker = checkers(timeout=0.5)

    future = checker.submit(der(leaf), ca.der)
    assert not future.done()
    assert checker.submit(der(leaf), ca.der) is future  # shared while in flight
    assert not future.cancel()  # nobody can cancel a shared check
    result = future.result(timeout=10)
    assert (result.status, result.source) == (UNKNOWN, OCSP)
    assert result.reason is not None
    assert "timed out" in result.reason
    assert checker.cached(der(leaf)) == result
    assert checker.submit(der(leaf), ca.der).done()
    assert server.count("/hang") == 1


def test_timed_out_url_is_skipped_for_a_while(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    server.routes["/hang"] = lambda _: HANG
    checker = checkers(timeout=0.5, max_workers=1)
    first = checker.submit(der(ca.issue(1, ocsp_urls=[server.url("/hang")])), ca.der)
    second = checker.submit(der(ca.issue(2, ocsp_urls=[server.url("/hang")])), ca.der)

    assert first.result(timeout=10).status == UNKNOWN
    result = second.result(timeout=10)
    assert result.status == UNKNOWN
    assert result.reason is not None
    assert "skipped: timed out" in result.reason
    assert server.count("/hang") == 1


def test_cached_result_makes_no_second_request(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    responder = Responder(ca)
    server.routes["/ocsp"] = responder
    leaf = ca.issue(1, ocsp_urls=[server.url("/ocsp")])
    responder.statuses[1] = (leaf, ocsp.OCSPCertStatus.REVOKED)
    checker = checkers()
    assert checker.cached(der(leaf)) is None

    first = check(checker, leaf, ca)
    again = checker.submit(der(leaf), ca.der)
    assert again.done()
    assert again.result() == first
    assert checker.cached(der(leaf)) == first
    assert server.count("/ocsp") == 1


def test_malformed_inputs_give_unknown(ca: CA, checkers: Callable[..., RevocationChecker]) -> None:
    checker = checkers()
    future = checker.submit(b"not a certificate", None)
    assert future.done()
    assert future.result().status == UNKNOWN
    assert checker.cached(b"not a certificate") is None

    leaf = ca.issue(1)
    assert checker.submit(der(leaf), b"junk").result(timeout=10).status == UNKNOWN
    result = check(checker, leaf, make_ca("Somebody else's CA"))
    assert (result.status, result.reason) == (
        UNKNOWN,
        "the issuer certificate did not issue this certificate",
    )
    assert checker.cached(der(leaf)) is None  # the caller's mistake is not cached
    assert check(checker, leaf, ca).status == UNKNOWN  # no CRL source: a real answer
    assert checker.cached(der(leaf)) is not None


def test_close_resolves_queued_checks(
    server: Server, ca: CA, checkers: Callable[..., RevocationChecker]
) -> None:
    server.routes["/hang"] = lambda _: HANG
    checker = checkers(timeout=0.5, max_workers=1)
    running = checker.submit(der(ca.issue(1, ocsp_urls=[server.url("/hang")])), ca.der)
    queued = checker.submit(der(ca.issue(2, ocsp_urls=[server.url("/hang")])), ca.der)

    checker.close()
    assert queued.done()
    assert queued.result().reason == "revocation checker closed"
    assert running.result(timeout=10).status == UNKNOWN
    after = checker.submit(der(ca.issue(3)), ca.der)
    assert after.done()
    assert after.result().status == UNKNOWN
