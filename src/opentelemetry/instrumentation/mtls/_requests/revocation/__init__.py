"""Revocation checks for peer certificates, by OCSP and CRL, off the handshake's path.

A TLS handshake must never wait for a CRL download or an OCSP responder, so callers
``submit`` a check and read the result later. Its result is cached per certificate
(issuer and serial) until the revocation data it was based on expires. Everything that
goes wrong (timeouts, refused connections, HTTP errors, garbage, signatures that do not
verify, stale data, too many checks at once) yields ``unknown`` with a reason and never
``good``; no exception ever escapes a future, and every future completes within about
``timeout`` seconds of its ``submit``: the timeout bounds the whole check, every
download and redirect included, not each step.

OCSP is asked first when enabled, the certificate names a responder and its issuer is
known (a request needs the issuer's name and key hashes). Otherwise CRLs are used, in
order: configured files (reloaded when their modification time changes), configured URLs,
then the certificate's distribution points. Only ``http://`` URLs are fetched (what CRL
and OCSP URLs conventionally are; other schemes such as ``ldap://`` give ``unknown``).
Without the issuer certificate CRL signatures cannot be verified, so callers should pass
it whenever they have it; they should also submit only certificates that passed chain
verification, since the URLs come from the certificate.

A check is a sequence of steps run on a small pool; while it waits for a download it
holds no thread, so checks stuck on a slow URL never delay the others. Downloads run on
their own bounded pool (``fetch``), a CRL URL is downloaded once for every check that
needs it (``crl``), and one thread expires checks at their deadline.

Pure: the standard library and ``cryptography``, nothing from OpenTelemetry.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from opentelemetry.instrumentation.mtls import _forks

from .crl import CrlSet, CrlStore, distribution_point_urls, evaluate_crl
from .fetch import MAX_DOWNLOAD_BYTES, Fetcher, FetchError
from .ocsp import CONTENT_TYPE, evaluate_ocsp, ocsp_urls, request_body
from .verdict import Verdict

__all__ = [
    "CRL",
    "GOOD",
    "MAX_DOWNLOAD_BYTES",
    "MAX_PENDING",
    "MAX_RESULT_TTL",
    "NO_NEXT_UPDATE_TTL",
    "OCSP",
    "REVOKED",
    "UNKNOWN",
    "UNKNOWN_TTL",
    "RevocationChecker",
    "RevocationResult",
]

GOOD = "good"
REVOKED = "revoked"
UNKNOWN = "unknown"
CRL = "crl"
OCSP = "ocsp"

MAX_RESULT_TTL = 3600.0
"""Longest a good or revoked answer is cached, however far away nextUpdate is."""
UNKNOWN_TTL = 60.0
"""How long an unknown answer is cached, so a dead responder is not asked per handshake;
also the reuse of an answer whose data is past its nextUpdate."""
NO_NEXT_UPDATE_TTL = 300.0
"""Cache lifetime of an answer whose CRL or OCSP response has no nextUpdate."""
MAX_PENDING = 1024
"""Checks in flight at most; beyond, ``submit`` answers ``unknown`` at once (not cached)."""

_CLOSED = "revocation checker closed"

_CacheKey = tuple[bytes, bytes, int]
_Steps = Generator["Future[Any]", None, "RevocationResult"]
"""A check's steps: each yield is a download to wait for, the return value its answer."""


@dataclass(frozen=True, slots=True)
class RevocationResult:
    """The answer to one revocation check, and until when it may be reused."""

    status: str
    source: str
    reason: str | None
    checked_at: float
    valid_until: float


class _BadIssuer(Exception):
    """The issuer certificate given with a check is unusable for that certificate."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(reason)
        self.source = source
        self.reason = reason


class _Check:
    """One certificate's check in flight: its future, deadline, and what it found so far."""

    def __init__(
        self, key: _CacheKey, leaf: x509.Certificate, issuer_der: bytes | None, deadline: float
    ) -> None:
        self.key = key
        self.leaf = leaf
        self.issuer_der = issuer_der
        self.deadline = deadline  # time.monotonic()
        self.future: Future[RevocationResult] = Future()
        # RUNNING at once: a caller cannot cancel a future other callers share.
        self.future.set_running_or_notify_cancel()
        self.source = CRL
        self.reasons: list[str] = []
        self.waiting_for: str | None = None  # "crl <url>" while its download runs
        self.finished = False  # set under the checker's lock, by whoever answers first
        self.steps: _Steps | None = None

    def timed_out(self, now: float) -> RevocationResult:
        """Answer when the deadline passes first: what failed so far, and what hung."""
        reasons = list(self.reasons)
        reasons.append(f"{self.waiting_for}: timed out" if self.waiting_for else "timed out")
        return _unknown(self.source, "; ".join(reasons), now)


class RevocationChecker:
    """Checks certificates against OCSP and CRLs in the background, with a result cache.

    Threads: ``max_workers`` for the checks' parsing and signature work, up to
    ``fetch.MAX_FETCHES`` for downloads, and one that expires checks at their deadline.
    """

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
        self._fetcher = Fetcher(timeout)
        self._crls = CrlStore(self._fetcher)
        self._workers = max(max_workers, 1)
        self._executor = ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="otel-mtls-revocation"
        )
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closed = False
        self._results: OrderedDict[_CacheKey, RevocationResult] = OrderedDict()
        self._inflight: dict[_CacheKey, _Check] = {}
        # In deadline order: every check gets the same timeout from a monotonic clock.
        self._deadlines: OrderedDict[_Check, None] = OrderedDict()
        self._expirer: threading.Thread | None = None
        _forks.rebuild_in_child(self._forked)

    def _forked(self) -> None:
        """In a forked child: new threads and locks; the parent's checks are not ours."""
        self._executor = ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="otel-mtls-revocation"
        )
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inflight.clear()  # their futures would never complete here
        self._deadlines.clear()
        self._expirer = None

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
                return running.future
            if len(self._inflight) >= MAX_PENDING:  # not cached: a later submit retries
                return _done(_unknown(CRL, "too many checks in flight", now))
            check = _Check(key, leaf, issuer_der, time.monotonic() + self._timeout)
            check.steps = self._steps(check)
            self._inflight[key] = check
            self._deadlines[check] = None
            if self._expirer is None:
                self._expirer = threading.Thread(
                    target=self._expire, name="otel-mtls-revocation-deadlines", daemon=True
                )
                self._expirer.start()
            self._wakeup.notify()
        self._schedule(check)
        return check.future

    def close(self, *, wait: bool = False) -> None:
        """Answer every check in flight ``unknown``, abort downloads and stop the threads.

        ``wait`` also waits for the threads to end (promptly: downloads are aborted).
        """
        with self._lock:
            self._closed = True
            pending = list(self._inflight.values())
            expirer = self._expirer
            self._wakeup.notify_all()
        now = time.time()
        for check in pending:
            self._finish(check, _unknown(check.source, _CLOSED, now), cache=False)
        self._fetcher.close(wait=wait)
        self._executor.shutdown(wait=wait, cancel_futures=True)
        if wait and expirer is not None and expirer is not threading.current_thread():
            expirer.join()

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

    def _schedule(self, check: _Check) -> None:
        """Run the check's next steps on the pool."""
        try:
            self._executor.submit(self._advance, check)
        except RuntimeError:  # the pool is shut down: close() has answered the check
            self._finish(check, _unknown(check.source, _CLOSED, time.time()), cache=False)

    def _advance(self, check: _Check) -> None:
        """Pool task: run the check until it waits for a download, or has its answer."""
        steps = check.steps
        if steps is None:
            return
        try:
            while True:
                if check.finished:  # answered meanwhile (deadline, close): stop here
                    check.steps = None
                    steps.close()
                    return
                waiting = next(steps)
                if not waiting.done():
                    # Hold no thread while the download runs: resume when it is done.
                    waiting.add_done_callback(lambda _: self._schedule(check))
                    return
        except StopIteration as stop:
            self._finish(check, stop.value, cache=True)
        except _BadIssuer as exc:  # the caller's mistake, not the certificate's: not cached
            self._finish(check, _unknown(exc.source, exc.reason, time.time()), cache=False)
        except Exception as exc:  # the future must always get an answer
            reason = f"internal error: {type(exc).__name__}: {exc}"
            self._finish(check, _unknown(check.source, reason, time.time()), cache=True)

    def _finish(self, check: _Check, result: RevocationResult, *, cache: bool) -> None:
        """Answer ``check`` unless already answered: cache, release its slot, resolve."""
        with self._lock:
            if check.finished:
                return
            check.finished = True
            if self._inflight.get(check.key) is check:
                del self._inflight[check.key]
            self._deadlines.pop(check, None)
            if cache and not self._closed and self._cache_size:
                self._results[check.key] = result
                self._results.move_to_end(check.key)
                while len(self._results) > self._cache_size:
                    self._results.popitem(last=False)
        with contextlib.suppress(InvalidStateError):
            check.future.set_result(result)

    def _expire(self) -> None:
        """Deadline thread: answer ``unknown`` (timed out) for checks past their deadline."""
        while True:
            with self._wakeup:
                if self._closed:
                    return
                now = time.monotonic()
                expired: list[_Check] = []
                for check in self._deadlines:
                    if check.deadline > now:
                        break
                    expired.append(check)
                if not expired:
                    first = next(iter(self._deadlines), None)
                    self._wakeup.wait(None if first is None else first.deadline - now)
                    continue
            wall = time.time()
            for check in expired:
                self._finish(check, check.timed_out(wall), cache=True)

    def _steps(self, check: _Check) -> _Steps:
        """Run the check itself: OCSP when possible, else CRLs; yield what it waits for."""
        leaf = check.leaf
        urls = ocsp_urls(leaf) if self._use_ocsp else []
        issuer = _issuer(check, OCSP if urls else CRL)
        if urls and issuer is not None:
            check.source = OCSP
            return (yield from self._ocsp_steps(check, issuer, urls))
        return (yield from self._crl_steps(check, issuer))

    def _ocsp_steps(self, check: _Check, issuer: x509.Certificate, urls: Sequence[str]) -> _Steps:
        """Ask each responder in turn until one answers good or revoked."""
        body = request_body(check.leaf, issuer)
        for url in urls:
            download = self._fetcher.submit(url, body, CONTENT_TYPE, wanted_until=check.deadline)
            check.waiting_for = f"ocsp {url}"
            yield download
            check.waiting_for = None
            try:
                data = download.result()
            except FetchError as exc:
                check.reasons.append(f"ocsp {url}: {exc}")
                continue
            outcome = evaluate_ocsp(data, check.leaf, issuer, time.time())
            if isinstance(outcome, Verdict):
                return _result(outcome, OCSP, time.time())
            check.reasons.append(f"ocsp {url}: {outcome}")
        return _unknown(OCSP, "; ".join(check.reasons), time.time())

    def _crl_steps(self, check: _Check, issuer: x509.Certificate | None) -> _Steps:
        """Look the certificate up in the first usable CRL for its issuer."""
        urls = list(self._crl_urls)
        if self._use_distribution_points:
            urls += distribution_point_urls(check.leaf)
        urls = list(dict.fromkeys(urls))
        if not self._crl_files and not urls:
            return _unknown(CRL, "no CRL source", time.time())
        for path in self._crl_files:
            result = _consult(check, path, self._crls.load_file(path), issuer)
            if result is not None:
                return result
        for url in urls:
            download = self._crls.load_url(url, wanted_until=check.deadline)
            check.waiting_for = f"crl {url}"
            yield download
            check.waiting_for = None
            result = _consult(check, url, download.result(), issuer)
            if result is not None:
                return result
        if not check.reasons:
            check.reasons.append("no CRL for the certificate's issuer")
        return _unknown(CRL, "; ".join(check.reasons), time.time())


def _issuer(check: _Check, source: str) -> x509.Certificate | None:
    """Parse the issuer given with ``check`` and make sure it issued the certificate."""
    if check.issuer_der is None:
        return None
    try:
        issuer = x509.load_der_x509_certificate(check.issuer_der)
    except ValueError as exc:
        raise _BadIssuer(source, f"unparseable issuer certificate: {exc}") from None
    try:
        check.leaf.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise _BadIssuer(source, "the issuer certificate did not issue this certificate") from None
    return issuer


def _consult(
    check: _Check, name: str, crl_set: CrlSet, issuer: x509.Certificate | None
) -> RevocationResult | None:
    """Answer from the CRLs of one file or URL, or note in ``check`` why they cannot."""
    if crl_set.error is not None:
        check.reasons.append(f"crl {name}: {crl_set.error}")
        return None
    for crl in crl_set.crls:
        outcome = evaluate_crl(crl, check.leaf, issuer, time.time())
        if isinstance(outcome, Verdict):
            return _result(outcome, CRL, time.time())
        if outcome is not None:
            check.reasons.append(f"crl {name}: {outcome}")
    return None


def _cache_key(leaf: x509.Certificate) -> _CacheKey:
    """(issuer name hash, authority key identifier, serial): derivable from the leaf alone."""
    name_hash = hashlib.sha256(leaf.issuer.public_bytes()).digest()
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        key_id = aki.key_identifier or b""
    except x509.ExtensionNotFound:
        key_id = b""
    return (name_hash, key_id, leaf.serial_number)


def _result(verdict: Verdict, source: str, now: float) -> RevocationResult:
    """Turn an evaluator's verdict into a cached answer."""
    status = REVOKED if verdict.revoked else GOOD
    return RevocationResult(status, source, verdict.reason, now, _valid_until(verdict, now))


def _valid_until(verdict: Verdict, now: float) -> float:
    """Cache an answer until nextUpdate, capped at ``MAX_RESULT_TTL``.

    Data already past its nextUpdate (a revocation in a stale CRL, or data within the
    clock skew) is reused for ``UNKNOWN_TTL``, rather than looked up at every handshake.
    """
    next_update: datetime.datetime | None = verdict.next_update
    if next_update is None:
        return now + NO_NEXT_UPDATE_TTL
    if next_update.timestamp() <= now:
        return now + UNKNOWN_TTL
    return min(next_update.timestamp(), now + MAX_RESULT_TTL)


def _unknown(source: str, reason: str, now: float) -> RevocationResult:
    """Make an ``unknown`` answer, cached briefly."""
    return RevocationResult(UNKNOWN, source, reason, now, now + UNKNOWN_TTL)


def _done(result: RevocationResult) -> Future[RevocationResult]:
    """Make a future that is already completed with ``result``."""
    future: Future[RevocationResult] = Future()
    future.set_result(result)
    return future
