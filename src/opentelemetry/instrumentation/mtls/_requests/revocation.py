"""Revocation checks for peer certificates, by OCSP and CRL, off the handshake's path.

A TLS handshake must never wait for a CRL download or an OCSP responder, so callers
``submit`` a check and read the result later: the check runs on a small thread pool and
its result is cached per certificate (issuer and serial) until the revocation data it was
based on expires. Everything that goes wrong (timeouts, refused connections, HTTP errors,
garbage, signatures that do not verify, stale data) yields ``unknown`` with a reason and
never ``good``; no exception ever escapes a future.

OCSP is asked first when enabled, the certificate names a responder and its issuer is
known (a request needs the issuer's name and key hashes). Otherwise CRLs are used, in
order: configured files (reloaded when their modification time changes), configured URLs,
then the certificate's distribution points. Only ``http://`` URLs are fetched (what CRL
and OCSP URLs conventionally are; other schemes such as ``ldap://`` give ``unknown``),
with a timeout and a size cap. Without the issuer certificate CRL signatures cannot be
verified, so callers should pass it whenever they have it; they should also submit only
certificates that passed chain verification, since the URLs come from the certificate.

Pure: the standard library and ``cryptography``, nothing from OpenTelemetry.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    SignatureAlgorithmOID,
)

GOOD = "good"
REVOKED = "revoked"
UNKNOWN = "unknown"
CRL = "crl"
OCSP = "ocsp"

MAX_RESULT_TTL = 3600.0
"""Longest a good or revoked answer is cached, however far away nextUpdate is."""
UNKNOWN_TTL = 60.0
"""How long an unknown answer is cached, so a dead responder is not asked per handshake."""
NO_NEXT_UPDATE_TTL = 300.0
"""Cache lifetime of an answer whose CRL or OCSP response has no nextUpdate."""
MAX_CRL_TTL = 86400.0
"""Longest a downloaded CRL is reused, so CRLs published early are picked up."""
MAX_DOWNLOAD_BYTES = 10 * 1024 * 1024
"""Size cap of one CRL or OCSP download."""
CLOCK_SKEW = 300.0
"""Tolerated clock difference with CRL and OCSP issuers, in seconds."""
CRL_URL_CACHE_SIZE = 32
"""Downloaded CRLs kept at most (one per URL)."""
TIMEOUT_BACKOFF = 10.0
"""After a URL timed out, checks skip it for this long rather than each wait in turn."""
MAX_PENDING = 1024
"""Checks queued or running at most; beyond, ``submit`` answers ``unknown`` at once."""

_CHUNK = 64 * 1024
_CLOSED = "revocation checker closed"

_CacheKey = tuple[bytes, bytes, int]
_MISSING = object()
_ISSUER_KEY_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    dsa.DSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


@dataclass(frozen=True, slots=True)
class RevocationResult:
    """The answer to one revocation check, and until when it may be reused."""

    status: str
    source: str
    reason: str | None
    checked_at: float
    valid_until: float


@dataclass(frozen=True, slots=True)
class _CrlSet:
    """CRLs parsed from one file or URL, or why there are none; reusable until expiry."""

    crls: tuple[x509.CertificateRevocationList, ...]
    error: str | None
    expires_at: float = float("inf")
    stamp: tuple[int, int] | None = None


class _FetchError(Exception):
    """A download failed; the message is the reason reported with ``unknown``."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class _BadIssuer(Exception):
    """The issuer certificate given with a check is unusable for that certificate."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(reason)
        self.source = source
        self.reason = reason


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to other ``http://`` URLs."""

    def redirect_request(  # noqa: PLR0917  # the base class's signature
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        """Refuse a redirect to a non-http URL, else redirect as usual."""
        if urllib.parse.urlsplit(newurl).scheme.lower() != "http":
            fp.close()
            raise _FetchError(f"redirect to a non-http URL refused ({newurl})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    """Build an opener that speaks plain HTTP only (honouring proxy settings)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class RevocationChecker:
    """Checks certificates against OCSP and CRLs in the background, with a result cache."""

    def __init__(
        self,
        *,
        crl_files: Sequence[str] = (),
        crl_urls: Sequence[str] = (),
        use_distribution_points: bool = True,
        use_ocsp: bool = True,
        timeout: float = 2.0,
        max_workers: int = 2,
        cache_size: int = 4096,
    ) -> None:
        self._crl_files = tuple(crl_files)
        self._crl_urls = tuple(crl_urls)
        self._use_distribution_points = use_distribution_points
        self._use_ocsp = use_ocsp
        self._timeout = timeout
        self._cache_size = max(cache_size, 0)
        self._opener = _opener()
        self._executor = ThreadPoolExecutor(
            max_workers=max(max_workers, 1), thread_name_prefix="otel-mtls-revocation"
        )
        self._lock = threading.Lock()
        self._closed = False
        self._results: OrderedDict[_CacheKey, RevocationResult] = OrderedDict()
        self._inflight: dict[_CacheKey, tuple[Future[RevocationResult], Future[None]]] = {}
        self._file_crls: dict[str, _CrlSet] = {}
        self._url_crls: OrderedDict[str, _CrlSet] = OrderedDict()
        self._url_inflight: dict[str, Future[_CrlSet]] = {}
        self._timed_out_urls: dict[str, float] = {}

    def submit(self, leaf_der: bytes, issuer_der: bytes | None) -> Future[RevocationResult]:
        """Start a check of ``leaf_der`` (DER) and return its future at once.

        A valid cached answer comes back as a completed future without any I/O; a check
        already running for the same certificate is shared rather than repeated.
        """
        now = time.time()
        try:
            leaf = x509.load_der_x509_certificate(leaf_der)
            key = _cache_key(leaf)
        except ValueError as exc:
            return _done(_unknown(CRL, f"unparseable certificate: {exc}", now))
        with self._lock:
            if self._closed:
                return _done(_unknown(CRL, _CLOSED, now))
            cached = self._cached_locked(key, now)
            if cached is not None:
                return _done(cached)
            running = self._inflight.get(key)
            if running is not None:
                return running[0]
            if len(self._inflight) >= MAX_PENDING:  # not cached: a later submit retries
                return _done(_unknown(CRL, "too many checks pending", now))
            future: Future[RevocationResult] = Future()
            # RUNNING at once: a caller cannot cancel a future other callers share.
            future.set_running_or_notify_cancel()
            work = self._executor.submit(self._run, key, future, leaf, issuer_der)
            self._inflight[key] = (future, work)
        return future

    def cached(self, leaf_der: bytes) -> RevocationResult | None:
        """Return the still-valid cached answer for ``leaf_der``, if any; never does I/O."""
        try:
            key = _cache_key(x509.load_der_x509_certificate(leaf_der))
        except ValueError:
            return None
        with self._lock:
            return self._cached_locked(key, time.time())

    def close(self, *, wait: bool = False) -> None:
        """Stop the workers; checks not yet started finish as ``unknown``.

        ``wait`` also waits for running checks (each bounded by the timeout).
        """
        with self._lock:
            self._closed = True
            pending = list(self._inflight.values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        now = time.time()
        for future, work in pending:
            if work.cancelled():  # never started: nobody else will complete it
                _resolve(future, _unknown(CRL, _CLOSED, now))
        if wait:
            self._executor.shutdown(wait=True)

    def _cached_locked(self, key: _CacheKey, now: float) -> RevocationResult | None:
        """Look ``key`` up in the result cache, dropping it if expired; hold the lock."""
        result = self._results.get(key)
        if result is None:
            return None
        if result.valid_until <= now:
            del self._results[key]
            return None
        self._results.move_to_end(key)
        return result

    def _run(
        self,
        key: _CacheKey,
        future: Future[RevocationResult],
        leaf: x509.Certificate,
        issuer_der: bytes | None,
    ) -> None:
        """Worker: check, cache the answer, release the in-flight slot, resolve the future."""
        cacheable = True
        try:
            result = self._check(leaf, issuer_der)
        except _BadIssuer as exc:
            result, cacheable = _unknown(exc.source, exc.reason, time.time()), False
        except Exception as exc:  # the future must always get an answer
            result = _unknown(CRL, f"internal error: {type(exc).__name__}: {exc}", time.time())
        with self._lock:
            self._inflight.pop(key, None)
            if cacheable and not self._closed and self._cache_size:
                self._results[key] = result
                self._results.move_to_end(key)
                while len(self._results) > self._cache_size:
                    self._results.popitem(last=False)
        _resolve(future, result)

    def _check(self, leaf: x509.Certificate, issuer_der: bytes | None) -> RevocationResult:
        """Check one certificate: OCSP when possible, else CRLs.

        Raises ``_BadIssuer`` when ``issuer_der`` is unusable: the caller's mistake, which
        says nothing about the certificate and so is not cached.
        """
        ocsp_urls = _ocsp_urls(leaf) if self._use_ocsp else []
        issuer: x509.Certificate | None = None
        if issuer_der is not None:
            source = OCSP if ocsp_urls else CRL
            try:
                issuer = x509.load_der_x509_certificate(issuer_der)
            except ValueError as exc:
                raise _BadIssuer(source, f"unparseable issuer certificate: {exc}") from None
            try:
                leaf.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                reason = "the issuer certificate did not issue this certificate"
                raise _BadIssuer(source, reason) from None
        if ocsp_urls and issuer is not None:
            return self._check_ocsp(leaf, issuer, ocsp_urls)
        return self._check_crl(leaf, issuer)

    def _check_ocsp(
        self, leaf: x509.Certificate, issuer: x509.Certificate, urls: Sequence[str]
    ) -> RevocationResult:
        """Ask each responder in turn until one answers good or revoked."""
        request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
        body = request.public_bytes(serialization.Encoding.DER)
        reasons: list[str] = []
        for url in urls:
            try:
                data = self._fetch(url, body, "application/ocsp-request")
            except _FetchError as exc:
                reasons.append(f"ocsp {url}: {exc}")
                continue
            outcome = _evaluate_ocsp(data, leaf, issuer, time.time())
            if isinstance(outcome, RevocationResult):
                return outcome
            reasons.append(f"ocsp {url}: {outcome}")
        return _unknown(OCSP, "; ".join(reasons), time.time())

    def _check_crl(
        self, leaf: x509.Certificate, issuer: x509.Certificate | None
    ) -> RevocationResult:
        """Look the certificate up in the first usable CRL for its issuer."""
        urls = list(self._crl_urls)
        if self._use_distribution_points:
            urls += _distribution_point_urls(leaf)
        sources = [(path, True) for path in self._crl_files]
        sources += [(url, False) for url in dict.fromkeys(urls)]
        if not sources:
            return _unknown(CRL, "no CRL source", time.time())
        reasons: list[str] = []
        for name, is_file in sources:
            crl_set = self._load_file(name) if is_file else self._load_url(name)
            if crl_set.error is not None:
                reasons.append(f"crl {name}: {crl_set.error}")
                continue
            for crl in crl_set.crls:
                outcome = _evaluate_crl(crl, leaf, issuer, time.time())
                if isinstance(outcome, RevocationResult):
                    return outcome
                if outcome is not None:
                    reasons.append(f"crl {name}: {outcome}")
        if not reasons:
            reasons.append("no CRL for the certificate's issuer")
        return _unknown(CRL, "; ".join(reasons), time.time())

    def _load_file(self, path: str) -> _CrlSet:
        """Return the CRLs in ``path``, re-reading the file only when it has changed."""
        try:
            st = os.stat(path)
        except OSError as exc:
            return _CrlSet((), f"unreadable: {exc.strerror or exc}")
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            known = self._file_crls.get(path)
        if known is not None and known.stamp == stamp:
            return known
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            return _CrlSet((), f"unreadable: {exc.strerror or exc}")
        crl_set = _parse_crls(data, time.time())
        crl_set = _CrlSet(crl_set.crls, crl_set.error, stamp=stamp)
        with self._lock:
            self._file_crls[path] = crl_set
        return crl_set

    def _load_url(self, url: str) -> _CrlSet:
        """Return the CRLs at ``url``, downloading once per nextUpdate (or failure TTL)."""
        if urllib.parse.urlsplit(url).scheme.lower() != "http":
            return _CrlSet((), "unsupported URL scheme (only http:// is fetched)")
        with self._lock:
            known = self._url_crls.get(url)
            if known is not None and known.expires_at > time.time():
                self._url_crls.move_to_end(url)
                return known
            pending = self._url_inflight.get(url)
            owner = pending is None
            if pending is None:
                pending = Future()
                self._url_inflight[url] = pending
        if not owner:
            return pending.result()  # another worker is downloading it, within the timeout
        try:
            try:
                data = self._fetch(url, None, None)
            except _FetchError as exc:
                crl_set = _CrlSet((), str(exc), expires_at=time.time() + UNKNOWN_TTL)
            else:
                crl_set = _parse_crls(data, time.time())
        except Exception as exc:  # waiters must always be released
            crl_set = _CrlSet((), f"internal error: {type(exc).__name__}: {exc}", 0.0)
        with self._lock:
            self._url_inflight.pop(url, None)
            self._url_crls[url] = crl_set
            self._url_crls.move_to_end(url)
            while len(self._url_crls) > CRL_URL_CACHE_SIZE:
                self._url_crls.popitem(last=False)
        pending.set_result(crl_set)
        return crl_set

    def _fetch(self, url: str, body: bytes | None, content_type: str | None) -> bytes:
        """Download from ``url``, unless it timed out moments ago.

        A server that does not answer would otherwise cost every queued check the full
        timeout, and a backlog would build up behind it.
        """
        now = time.monotonic()
        with self._lock:
            down_until = self._timed_out_urls.get(url, 0.0)
        if down_until > now:
            raise _FetchError(f"skipped: timed out less than {TIMEOUT_BACKOFF:g} s ago")
        try:
            return self._download(url, body, content_type)
        except _FetchError as exc:
            if exc.timed_out:
                with self._lock:
                    for stale in [u for u, t in self._timed_out_urls.items() if t <= now]:
                        del self._timed_out_urls[stale]
                    self._timed_out_urls[url] = time.monotonic() + TIMEOUT_BACKOFF
            raise

    def _download(self, url: str, body: bytes | None, content_type: str | None) -> bytes:
        """GET (or POST ``body`` to) an http:// URL within the timeout and size cap."""
        if urllib.parse.urlsplit(url).scheme.lower() != "http":
            raise _FetchError("unsupported URL scheme (only http:// is fetched)")
        deadline = time.monotonic() + self._timeout
        request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
        if content_type is not None:
            request.add_header("Content-Type", content_type)
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                if not isinstance(response, http.client.HTTPResponse):
                    raise _FetchError("unexpected response type")
                return _read_capped(response, deadline)
        except urllib.error.HTTPError as exc:
            exc.close()
            if 300 <= exc.code < 400:  # urllib's own refusal (non-http(s) target, loop)
                raise _FetchError(f"redirect refused (HTTP {exc.code})") from None
            raise _FetchError(f"HTTP {exc.code}") from None
        except urllib.error.URLError as exc:
            timed_out = isinstance(exc.reason, TimeoutError)
            raise _FetchError(_describe(exc.reason), timed_out=timed_out) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _FetchError(_describe(exc), timed_out=isinstance(exc, TimeoutError)) from None


def _read_capped(response: http.client.HTTPResponse, deadline: float) -> bytes:
    """Read a body, giving up past ``deadline`` or ``MAX_DOWNLOAD_BYTES``."""
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
        raise _FetchError(f"response larger than {MAX_DOWNLOAD_BYTES} bytes")
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise _FetchError("timed out", timed_out=True)
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_DOWNLOAD_BYTES:
            raise _FetchError(f"response larger than {MAX_DOWNLOAD_BYTES} bytes")
        chunks.append(chunk)


def _describe(error: object) -> str:
    """Describe a network error briefly."""
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, BaseException):
        text = str(error)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return str(error)


def _parse_crls(data: bytes, now: float) -> _CrlSet:
    """Parse one DER CRL or any number of PEM CRLs; cache until the earliest nextUpdate."""
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            marker = b"-----BEGIN X509 CRL-----"
            crls = tuple(x509.load_pem_x509_crl(marker + block) for block in data.split(marker)[1:])
        else:
            crls = (x509.load_der_x509_crl(data),)
    except ValueError:
        return _CrlSet((), "not a CRL", expires_at=now + UNKNOWN_TTL)
    expires_at = now + MAX_CRL_TTL
    for crl in crls:
        next_update = crl.next_update_utc
        if next_update is not None:
            expires_at = min(expires_at, max(next_update.timestamp(), now + UNKNOWN_TTL))
    return _CrlSet(crls, None, expires_at=expires_at)


def _evaluate_crl(
    crl: x509.CertificateRevocationList,
    leaf: x509.Certificate,
    issuer: x509.Certificate | None,
    now: float,
) -> RevocationResult | str | None:
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
    if entry is not None:
        reason = _entry_reason(entry)
        if next_update is not None and next_update.timestamp() < now:
            return RevocationResult(REVOKED, CRL, reason, now, now + UNKNOWN_TTL)
        return RevocationResult(REVOKED, CRL, reason, now, _valid_until(next_update, now))
    if next_update is not None and next_update.timestamp() < now - CLOCK_SKEW:
        return f"CRL expired at {next_update.isoformat()}"
    return RevocationResult(GOOD, CRL, None, now, _valid_until(next_update, now))


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


def _evaluate_ocsp(
    data: bytes, leaf: x509.Certificate, issuer: x509.Certificate, now: float
) -> RevocationResult | str:
    """Answer from one OCSP response after checking its signature, or say why not."""
    try:
        response = ocsp.load_der_ocsp_response(data)
    except ValueError:
        return "unparseable OCSP response"
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return f"responder status {response.response_status.name.lower()}"
    signer_problem = _check_ocsp_signer(response, issuer, now)
    if signer_problem is not None:
        return signer_problem
    try:
        singles = list(response.responses)
    except ValueError:
        return "malformed OCSP response"
    for single in singles:
        if not _single_matches(single, leaf, issuer):
            continue
        this_update = _utc(single, "this_update")
        next_update = _utc(single, "next_update")
        if this_update is None or this_update.timestamp() > now + CLOCK_SKEW:
            return "OCSP response not yet valid (thisUpdate in the future)"
        if next_update is not None and next_update.timestamp() < now - CLOCK_SKEW:
            return f"stale OCSP response (nextUpdate {next_update.isoformat()})"
        status = single.certificate_status
        if status == ocsp.OCSPCertStatus.GOOD:
            return RevocationResult(GOOD, OCSP, None, now, _valid_until(next_update, now))
        if status == ocsp.OCSPCertStatus.REVOKED:
            reason = single.revocation_reason or x509.ReasonFlags.unspecified
            return RevocationResult(
                REVOKED, OCSP, reason.value, now, _valid_until(next_update, now)
            )
        return "responder does not know the certificate"
    return "OCSP response is not about this certificate"


def _check_ocsp_signer(
    response: ocsp.OCSPResponse, issuer: x509.Certificate, now: float
) -> str | None:
    """Verify the response was signed by the issuer or a responder it delegated to."""
    signer = _ocsp_signer(response, issuer)
    if signer is None:
        return "OCSP response signed by neither the issuer nor a delegated responder"
    if signer is not issuer:
        try:
            signer.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return "delegated OCSP responder certificate not issued by the issuer"
        try:
            eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (x509.ExtensionNotFound, ValueError):
            return "delegated OCSP responder certificate lacks the OCSPSigning usage"
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            return "delegated OCSP responder certificate lacks the OCSPSigning usage"
        if not (
            signer.not_valid_before_utc.timestamp() - CLOCK_SKEW
            <= now
            <= signer.not_valid_after_utc.timestamp() + CLOCK_SKEW
        ):
            return "delegated OCSP responder certificate is not valid now"
    try:
        hash_algorithm = response.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return "unsupported OCSP signature algorithm"
    if not _verify_signature(
        signer.public_key(),
        response.signature,
        response.tbs_response_bytes,
        hash_algorithm,
        response.signature_algorithm_oid,
    ):
        return "OCSP response signature does not verify"
    return None


def _ocsp_signer(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate | None:
    """Find the certificate named by the response's responder ID."""
    candidates = [issuer, *response.certificates]
    name = response.responder_name
    key_hash = response.responder_key_hash
    for candidate in candidates:
        if name is not None and candidate.subject == name:
            return candidate
        if key_hash is not None and _key_hash(candidate) == key_hash:
            return candidate
    return None


def _key_hash(cert: x509.Certificate) -> bytes | None:
    """SHA-1 of the certificate's public key bits (OCSP's byKey responder ID)."""
    try:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return None


def _single_matches(
    single: ocsp.OCSPSingleResponse, leaf: x509.Certificate, issuer: x509.Certificate
) -> bool:
    """Whether a single response's CertID designates ``leaf`` issued by ``issuer``."""
    if single.serial_number != leaf.serial_number:
        return False
    try:
        expected = (
            ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, single.hash_algorithm).build()
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return (
        expected.issuer_name_hash == single.issuer_name_hash
        and expected.issuer_key_hash == single.issuer_key_hash
    )


def _verify_signature(
    public_key: object,
    signature: bytes,
    data: bytes,
    hash_algorithm: hashes.HashAlgorithm | None,
    algorithm_oid: x509.ObjectIdentifier,
) -> bool:
    """Verify ``signature`` over ``data`` with any key type X.509 uses."""
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and hash_algorithm is not None:
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
            if algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
                pad = padding.PSS(padding.MGF1(hash_algorithm), padding.PSS.AUTO)
            public_key.verify(signature, data, pad, hash_algorithm)
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and hash_algorithm is not None:
            public_key.verify(signature, data, ec.ECDSA(hash_algorithm))
        elif isinstance(public_key, dsa.DSAPublicKey) and hash_algorithm is not None:
            public_key.verify(signature, data, hash_algorithm)
        elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public_key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _cache_key(leaf: x509.Certificate) -> _CacheKey:
    """(issuer name hash, authority key identifier, serial): derivable from the leaf alone."""
    name_hash = hashlib.sha256(leaf.issuer.public_bytes()).digest()
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        key_id = aki.key_identifier or b""
    except x509.ExtensionNotFound:
        key_id = b""
    return (name_hash, key_id, leaf.serial_number)


def _ocsp_urls(leaf: x509.Certificate) -> list[str]:
    """Return the certificate's OCSP responder URLs (authorityInfoAccess)."""
    try:
        aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [
        description.access_location.value
        for description in aia
        if description.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(description.access_location, x509.UniformResourceIdentifier)
    ]


def _distribution_point_names(leaf: x509.Certificate) -> Iterable[x509.GeneralName]:
    """Return the full names of the certificate's CRL distribution points."""
    try:
        points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [name for point in points for name in point.full_name or ()]


def _distribution_point_urls(leaf: x509.Certificate) -> list[str]:
    """Return the certificate's CRL distribution point URLs, whatever their scheme."""
    return [
        name.value
        for name in _distribution_point_names(leaf)
        if isinstance(name, x509.UniformResourceIdentifier)
    ]


def _is_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` is a CA certificate (basicConstraints cA)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        return False


def _utc(obj: ocsp.OCSPSingleResponse, name: str) -> datetime.datetime | None:
    """Read an OCSP time as aware UTC (``*_utc`` since cryptography 43, naive before)."""
    value = getattr(obj, f"{name}_utc", _MISSING)
    if value is _MISSING:
        value = getattr(obj, name, None)
        if isinstance(value, datetime.datetime):
            value = value.replace(tzinfo=datetime.timezone.utc)
    return value if isinstance(value, datetime.datetime) else None


def _valid_until(next_update: datetime.datetime | None, now: float) -> float:
    """Cache an answer until nextUpdate, capped at ``MAX_RESULT_TTL``."""
    if next_update is None:
        return now + NO_NEXT_UPDATE_TTL
    return min(next_update.timestamp(), now + MAX_RESULT_TTL)


def _unknown(source: str, reason: str, now: float) -> RevocationResult:
    """Make an ``unknown`` answer, cached briefly."""
    return RevocationResult(UNKNOWN, source, reason, now, now + UNKNOWN_TTL)


def _done(result: RevocationResult) -> Future[RevocationResult]:
    """Make a future that is already completed with ``result``."""
    future: Future[RevocationResult] = Future()
    future.set_result(result)
    return future


def _resolve(future: Future[RevocationResult], result: RevocationResult) -> None:
    """Complete ``future`` unless it already is (close() may have completed it)."""
    with contextlib.suppress(InvalidStateError):
        future.set_result(result)
