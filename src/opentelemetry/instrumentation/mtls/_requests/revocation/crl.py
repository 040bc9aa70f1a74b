"""CRLs: loading them from files and URLs, and what one says about a certificate.

Files are re-read only when their modification time or size changes. A URL is
downloaded once until its CRLs' nextUpdate (at most ``MAX_CRL_TTL``), and concurrent
checks that need the same URL share one download (``CrlStore.load_url``) rather than
each asking, or each holding a thread while another asks. A CRL answers only for
certificates of its issuer, and only after its signature verified against the issuer
when the issuer is known; delta, indirect and partitioned CRLs that do not cover the
certificate say why they cannot answer instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from opentelemetry.instrumentation.mtls import _forks

from .fetch import Fetcher, FetchError
from .verdict import CLOCK_SKEW, Verdict

MAX_CRL_TTL = 86400.0
"""Longest a downloaded CRL is reused, so CRLs published early are picked up."""
MIN_CRL_TTL = 60.0
"""Shortest a downloaded CRL, or the failure to get one, is reused: a URL is asked at most
about once a minute."""
CRL_URL_CACHE_SIZE = 32
"""Downloaded CRLs kept at most (one per URL)."""

_ISSUER_KEY_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    dsa.DSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


@dataclass(frozen=True, slots=True)
class CrlSet:
    """CRLs parsed from one file or URL, or why there are none; reusable until expiry."""

    crls: tuple[x509.CertificateRevocationList, ...]
    error: str | None
    expires_at: float = float("inf")
    stamp: tuple[int, int] | None = None


class CrlStore:
    """The CRLs of files and URLs, cached; downloads go through a shared ``Fetcher``."""

    def __init__(self, fetcher: Fetcher) -> None:
        self._fetcher = fetcher
        self._lock = threading.Lock()
        self._files: dict[str, CrlSet] = {}
        self._urls: OrderedDict[str, CrlSet] = OrderedDict()
        self._downloading: dict[str, Future[CrlSet]] = {}
        _forks.rebuild_in_child(self._forked)

    def _forked(self) -> None:
        """In a forked child: a free lock; the parent's downloads would never finish here."""
        self._lock = threading.Lock()
        self._downloading.clear()

    def load_file(self, path: str) -> CrlSet:
        """Return the CRLs in ``path``, re-reading the file only when it has changed."""
        try:
            st = os.stat(path)
        except OSError as exc:
            return CrlSet((), f"unreadable: {exc.strerror or exc}")
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            known = self._files.get(path)
        if known is not None and known.stamp == stamp:
            return known
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            return CrlSet((), f"unreadable: {exc.strerror or exc}")
        crl_set = parse_crls(data, time.time())
        crl_set = CrlSet(crl_set.crls, crl_set.error, stamp=stamp)
        with self._lock:
            self._files[path] = crl_set
        return crl_set

    def load_url(self, url: str, *, wanted_until: float) -> Future[CrlSet]:
        """Return the CRLs at ``url``: cached (a done future), or a download, shared.

        ``wanted_until`` (``time.monotonic()``) is passed on to the fetcher: a download
        still waiting for a slot then is dropped. The future always completes.
        """
        if urllib.parse.urlsplit(url).scheme.lower() != "http":
            return _done(CrlSet((), "unsupported URL scheme (only http:// is fetched)"))
        with self._lock:
            known = self._urls.get(url)
            if known is not None and known.expires_at > time.time():
                self._urls.move_to_end(url)
                return _done(known)
            pending = self._downloading.get(url)
            if pending is not None:
                return pending
            pending = Future()
            self._downloading[url] = pending
        download = self._fetcher.submit(url, wanted_until=wanted_until)
        download.add_done_callback(functools.partial(self._downloaded, url, pending))
        return pending

    def _downloaded(self, url: str, pending: Future[CrlSet], download: Future[bytes]) -> None:
        """Parse a finished download, cache it, and hand it to everybody waiting for it."""
        try:
            try:
                data = download.result()
            except FetchError as exc:
                # A URL never asked (queue full, closed) says nothing worth remembering.
                retry = time.time() + MIN_CRL_TTL if exc.attempted else 0.0
                crl_set = CrlSet((), str(exc), expires_at=retry)
            else:
                crl_set = parse_crls(data, time.time())
        except Exception as exc:  # waiters must always be released
            crl_set = CrlSet((), f"internal error: {type(exc).__name__}: {exc}", 0.0)
        with self._lock:
            self._downloading.pop(url, None)
            if crl_set.expires_at > time.time():
                self._urls[url] = crl_set
                self._urls.move_to_end(url)
                while len(self._urls) > CRL_URL_CACHE_SIZE:
                    self._urls.popitem(last=False)
        with contextlib.suppress(InvalidStateError):
            pending.set_result(crl_set)


def parse_crls(data: bytes, now: float) -> CrlSet:
    """Parse one DER CRL or any number of PEM CRLs; reusable until the earliest nextUpdate."""
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            marker = b"-----BEGIN X509 CRL-----"
            crls = tuple(x509.load_pem_x509_crl(marker + block) for block in data.split(marker)[1:])
        else:
            crls = (x509.load_der_x509_crl(data),)
    except ValueError:
        return CrlSet((), "not a CRL", expires_at=now + MIN_CRL_TTL)
    expires_at = now + MAX_CRL_TTL
    for crl in crls:
        next_update = crl.next_update_utc
        if next_update is not None:
            expires_at = min(expires_at, max(next_update.timestamp(), now + MIN_CRL_TTL))
    return CrlSet(crls, None, expires_at=expires_at)


def evaluate_crl(
    crl: x509.CertificateRevocationList,
    leaf: x509.Certificate,
    issuer: x509.Certificate | None,
    now: float,
) -> Verdict | str | None:
    """Answer from one CRL, or say why it cannot answer (``None``: another issuer's)."""
    if crl.issuer != leaf.issuer:
        return None
    try:
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        return "malformed CRL extensions"
    else:
        return "delta CRL ignored"
    if issuer is not None:
        key = issuer.public_key()
        try:
            valid = isinstance(key, _ISSUER_KEY_TYPES) and crl.is_signature_valid(key)
        except (TypeError, ValueError, UnsupportedAlgorithm):
            valid = False
        if not valid:
            return "CRL signature does not verify against the issuer"
    scope_problem = _crl_scope_problem(crl, leaf)
    if scope_problem is not None:
        return scope_problem
    if crl.last_update_utc.timestamp() > now + CLOCK_SKEW:
        return "CRL not yet valid (lastUpdate in the future)"
    next_update = crl.next_update_utc
    entry = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
    if entry is not None:  # a revocation stays one, even in a stale CRL
        return Verdict(True, _entry_reason(entry), next_update)
    if next_update is not None and next_update.timestamp() < now - CLOCK_SKEW:
        return f"CRL expired at {next_update.isoformat()}"
    return Verdict(False, None, next_update)


def distribution_point_urls(leaf: x509.Certificate) -> list[str]:
    """Return the certificate's CRL distribution point URLs, whatever their scheme."""
    return [
        name.value
        for name in _distribution_point_names(leaf)
        if isinstance(name, x509.UniformResourceIdentifier)
    ]


def _crl_scope_problem(crl: x509.CertificateRevocationList, leaf: x509.Certificate) -> str | None:
    """Say why a partitioned CRL (issuingDistributionPoint) does not cover ``leaf``."""
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return None
    except ValueError:
        return "malformed CRL extensions"
    if idp.indirect_crl:
        return "indirect CRL not supported"
    if idp.only_some_reasons is not None:
        return "CRL covers only some revocation reasons"
    if idp.only_contains_ca_certs or idp.only_contains_attribute_certs:
        return "CRL does not cover end-entity certificates"
    if idp.only_contains_user_certs and _is_ca(leaf):
        return "CRL does not cover CA certificates"
    if idp.full_name is not None:
        leaf_names = set(_distribution_point_names(leaf))
        if not leaf_names.intersection(idp.full_name):
            return "CRL scope (issuingDistributionPoint) does not cover the certificate"
    return None


def _entry_reason(entry: x509.RevokedCertificate) -> str:
    """Return the CRL entry's reason code (``keyCompromise`` ...), else ``unspecified``."""
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
    except (x509.ExtensionNotFound, ValueError):
        return x509.ReasonFlags.unspecified.value


def _distribution_point_names(leaf: x509.Certificate) -> Iterable[x509.GeneralName]:
    """Return the full names of the certificate's CRL distribution points."""
    try:
        points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [name for point in points for name in point.full_name or ()]


def _is_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` is a CA certificate (basicConstraints cA)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        return False


def _done(crl_set: CrlSet) -> Future[CrlSet]:
    """Make a future already completed with ``crl_set``."""
    future: Future[CrlSet] = Future()
    future.set_result(crl_set)
    return future
