"""Test helper for the revocation tests: a throwaway CA and a loopback HTTP server.

The server listens on 127.0.0.1 on an ephemeral port, answers per path
(``Server.routes``, else ``Server.fallback``) and can answer promptly, late, one byte at
a time, or never; every wait in it is bounded and ends when the test does. The fixtures
that use them are in ``revocation_fixtures`` (``pytest_plugins = ["revocation_fixtures"]``).
"""

from __future__ import annotations

import datetime
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from opentelemetry.instrumentation.mtls._requests.revocation import (
    RevocationChecker,
    RevocationResult,
)

UTC = datetime.UTC
DER = serialization.Encoding.DER
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())
THREAD_PREFIX = "otel-mtls-revocation"
"""Every thread a ``RevocationChecker`` starts has a name beginning so."""
HANG_LIMIT = 30.0
"""Longest a hanging or dripping handler keeps its connection, should a test not end it."""


def now() -> datetime.datetime:
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
            .public_key(LEAF_KEY.public_key())
            .serial_number(serial)
            .not_valid_before(now() - datetime.timedelta(days=1))
            .not_valid_after(now() + datetime.timedelta(days=30))
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
            .last_update(now() - datetime.timedelta(days=2))
            .next_update(now() + next_update)
        )
        for serial, reason in revoked.items():
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now() - datetime.timedelta(days=2))
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
        .not_valid_before(now() - datetime.timedelta(days=1))
        .not_valid_after(now() + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(key, cert)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(DER)


@dataclass
class Reply:
    """How the server answers one request."""

    status: int = 200
    body: bytes = b""
    content_length: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drip: Literal["headers", "body"] | None = None  # one byte per ``interval``, from there on
    interval: float = 0.05
    delay: float = 0.0  # before anything is sent


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
                this_update=now() - datetime.timedelta(minutes=1),
                next_update=now() + datetime.timedelta(hours=1),
                revocation_time=now() - datetime.timedelta(days=1) if revoked else None,
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
        self.fallback: Route | None = None
        self.hits: Counter[str] = Counter()
        self.gone: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def count(self, path: str) -> int:
        with self.lock:
            return self.hits[path]

    def count_gone(self, path: str) -> int:
        """Requests to ``path`` left hanging until the client closed the connection."""
        with self.lock:
            return self.gone[path]

    def count_under(self, prefix: str) -> int:
        with self.lock:
            return sum(n for path, n in self.hits.items() if path.startswith(prefix))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        self._serve(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _serve(self, body: bytes) -> None:
        server = self.server
        assert isinstance(server, Server)
        self.close_connection = True
        with server.lock:
            server.hits[self.path] += 1
        route = server.routes.get(self.path, server.fallback)
        reply = Reply(404, b"not found") if route is None else route(body)
        if reply is HANG:  # accept, read, never answer; note when the client gives up
            if _wait_for_close(self.connection, server.release):
                with server.lock:
                    server.gone[self.path] += 1
            return
        if reply.delay and server.release.wait(reply.delay):
            return
        length = len(reply.body) if reply.content_length is None else reply.content_length
        lines = [f"HTTP/1.1 {reply.status} Test", f"Content-Length: {length}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in reply.headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        prompt, dripped = (head + reply.body, b"")
        if reply.drip == "headers":
            prompt, dripped = b"", head + reply.body
        elif reply.drip == "body":
            prompt, dripped = head, reply.body
        try:
            self.wfile.write(prompt)
            deadline = time.monotonic() + HANG_LIMIT
            for byte in dripped:
                if server.release.wait(reply.interval) or time.monotonic() > deadline:
                    return
                self.wfile.write(bytes([byte]))
        except OSError:  # the client gave up, as it should
            return

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _wait_for_close(sock: socket.socket, release: threading.Event) -> bool:
    """Wait (at most ``HANG_LIMIT``) until the client closes ``sock``; False if released."""
    deadline = time.monotonic() + HANG_LIMIT
    while not release.is_set() and time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                return not sock.recv(4096)
            except OSError:
                return True
    return False


def check(
    checker: RevocationChecker, leaf: x509.Certificate, issuer: CA | None
) -> RevocationResult:
    return checker.submit(der(leaf), None if issuer is None else issuer.der).result(timeout=10)


def closed_port_url(path: str) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def revocation_threads() -> list[threading.Thread]:
    """The live threads started by revocation checkers (pools, downloads, deadlines)."""
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> bool:
    """Poll ``condition`` every 20 ms for at most ``limit`` seconds; return its last value."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
