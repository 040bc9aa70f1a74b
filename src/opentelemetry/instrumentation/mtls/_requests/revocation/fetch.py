"""Bounded HTTP fetching of CRLs and OCSP responses: one deadline, a size cap, few threads.

``fetch`` downloads one ``http://`` URL within a single deadline that covers the
connection, the headers, the body and every redirect: the socket's timeout is re-armed
with the time left before each read and write, so a server that drips one byte at a time
cannot stretch a download past its deadline. ``Fetcher`` runs fetches on a small thread
pool, at most ``MAX_FETCHES_PER_URL`` at a time per URL, so a hanging responder holds a
few threads (for one timeout each) and never the checks of other certificates; after a
URL timed out it is not asked again for ``TIMEOUT_BACKOFF`` seconds.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from opentelemetry.instrumentation.mtls import _forks

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

MAX_DOWNLOAD_BYTES = 10 * 1024 * 1024
"""Size cap of one CRL or OCSP download."""
TIMEOUT_BACKOFF = 10.0
"""After a URL timed out, fetches skip it for this long rather than each wait in turn."""
MAX_FETCHES = 8
"""Downloads running at once (one thread each); more wait for a free slot."""
MAX_FETCHES_PER_URL = 2
"""Downloads running at once from one URL, so a hanging URL cannot take every slot."""
MAX_QUEUED = 1024
"""Downloads waiting for a slot at most; beyond, a fetch fails at once."""

_CHUNK = 64 * 1024
_CLOSED = "revocation checker closed"
_SKIPPED = f"skipped: timed out less than {TIMEOUT_BACKOFF:g} s ago"
_NOT_WANTED = "timed out waiting for a download slot"


class FetchError(Exception):
    """A download failed; the message is the reason reported with ``unknown``.

    ``timed_out``: the URL was asked and did not answer in time (so it is skipped for a
    while). ``attempted``: False when the URL was never asked (queue full, deadline
    passed while waiting for a slot, closed), an outcome not worth remembering.
    """

    def __init__(self, message: str, *, timed_out: bool = False, attempted: bool = True) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.attempted = attempted


def fetch(
    url: str, *, timeout: float, body: bytes | None = None, content_type: str | None = None
) -> bytes:
    """GET ``url`` (or POST ``body``) within ``timeout`` seconds in all; raise ``FetchError``."""
    return _download(url, body, content_type, _Budget(timeout))


@dataclass
class _Job:
    """One download asked of a ``Fetcher``, and until when its requester wants it."""

    url: str
    body: bytes | None
    content_type: str | None
    wanted_until: float
    future: Future[bytes]


class Fetcher:
    """Runs downloads on a bounded pool, a few per URL at a time, each within ``timeout``."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._executor = ThreadPoolExecutor(
            max_workers=MAX_FETCHES, thread_name_prefix="otel-mtls-revocation-fetch"
        )
        self._lock = threading.Lock()
        self._closed = False
        self._queue: deque[_Job] = deque()
        self._running: Counter[str] = Counter()
        self._budgets: set[_Budget] = set()
        self._timed_out_urls: dict[str, float] = {}
        _forks.rebuild_in_child(self._forked)

    def _forked(self) -> None:
        """In a forked child: a new pool and lock; the parent's downloads are not ours."""
        self._executor = ThreadPoolExecutor(
            max_workers=MAX_FETCHES, thread_name_prefix="otel-mtls-revocation-fetch"
        )
        self._lock = threading.Lock()
        self._queue.clear()
        self._running.clear()
        self._budgets.clear()

    def submit(
        self,
        url: str,
        body: bytes | None = None,
        content_type: str | None = None,
        *,
        wanted_until: float,
    ) -> Future[bytes]:
        """Queue a download; its future fails with ``FetchError``, never anything else.

        ``wanted_until`` (``time.monotonic()``): a download still waiting for a slot then
        is dropped, since nobody waits for it any more.
        """
        future: Future[bytes] = Future()
        job = _Job(url, body, content_type, wanted_until, future)
        if urllib.parse.urlsplit(url).scheme.lower() != "http":
            _fail(job, FetchError("unsupported URL scheme (only http:// is fetched)"))
            return future
        error: FetchError | None = None
        started: list[tuple[_Job, _Budget]] = []
        failed: list[tuple[_Job, FetchError]] = []
        with self._lock:
            if self._closed:
                error = FetchError(_CLOSED, attempted=False)
            elif self._timed_out_urls.get(url, 0.0) > time.monotonic():
                error = FetchError(_SKIPPED, attempted=False)
            elif len(self._queue) >= MAX_QUEUED:
                error = FetchError("too many downloads queued", attempted=False)
            else:
                self._queue.append(job)
                started, failed = self._admit_locked()
        if error is not None:
            failed.append((job, error))
        self._start(started, failed)
        return future

    def close(self, *, wait: bool = False) -> None:
        """Fail queued downloads, abort running ones (closing their sockets), stop the pool."""
        with self._lock:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            budgets = list(self._budgets)
        for budget in budgets:
            budget.abort()
        for job in queued:
            _fail(job, FetchError(_CLOSED, attempted=False))
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def _admit_locked(self) -> tuple[list[tuple[_Job, _Budget]], list[tuple[_Job, FetchError]]]:
        """Pick the queued jobs that may start now and those to fail; hold the lock.

        Runs when a job is queued or a slot frees, so a job waits at most until then;
        its requester's own deadline answers for it meanwhile.
        """
        started: list[tuple[_Job, _Budget]] = []
        failed: list[tuple[_Job, FetchError]] = []
        running = sum(self._running.values())
        if running >= MAX_FETCHES:
            return started, failed
        now = time.monotonic()
        waiting: deque[_Job] = deque()
        for job in self._queue:
            if self._timed_out_urls.get(job.url, 0.0) > now:
                failed.append((job, FetchError(_SKIPPED, attempted=False)))
            elif job.wanted_until <= now:
                failed.append((job, FetchError(_NOT_WANTED, attempted=False)))
            elif running < MAX_FETCHES and self._running[job.url] < MAX_FETCHES_PER_URL:
                budget = _Budget(self._timeout)
                self._running[job.url] += 1
                self._budgets.add(budget)
                running += 1
                started.append((job, budget))
            else:
                waiting.append(job)
        self._queue = waiting
        return started, failed

    def _start(
        self, started: list[tuple[_Job, _Budget]], failed: list[tuple[_Job, FetchError]]
    ) -> None:
        """Hand admitted jobs to the pool and fail the others, outside the lock."""
        for job, error in failed:
            _fail(job, error)
        for job, budget in started:
            try:
                self._executor.submit(self._run, job, budget)
            except RuntimeError:  # closed meanwhile
                self._finish(job, budget, FetchError(_CLOSED, attempted=False))

    def _run(self, job: _Job, budget: _Budget) -> None:
        """Worker: download, then release the slot and complete the job's future."""
        try:
            outcome: bytes | FetchError = _download(job.url, job.body, job.content_type, budget)
        except FetchError as exc:
            outcome = FetchError(_CLOSED, attempted=False) if budget.aborted else exc
        except Exception as exc:  # the future must always complete
            outcome = FetchError(f"internal error: {type(exc).__name__}: {exc}")
        self._finish(job, budget, outcome)

    def _finish(self, job: _Job, budget: _Budget, outcome: bytes | FetchError) -> None:
        """Release the job's slot, start what may start, then complete the job's future."""
        with self._lock:
            self._running[job.url] -= 1
            if self._running[job.url] <= 0:
                del self._running[job.url]
            self._budgets.discard(budget)
            if isinstance(outcome, FetchError) and outcome.timed_out:
                now = time.monotonic()
                for stale in [u for u, t in self._timed_out_urls.items() if t <= now]:
                    del self._timed_out_urls[stale]
                self._timed_out_urls[job.url] = now + TIMEOUT_BACKOFF
            started, failed = self._admit_locked() if not self._closed else ([], [])
        self._start(started, failed)
        if isinstance(outcome, FetchError):
            _fail(job, outcome)
        else:
            with contextlib.suppress(InvalidStateError):
                job.future.set_result(outcome)


def _fail(job: _Job, error: FetchError) -> None:
    """Complete ``job``'s future with ``error`` unless it already is."""
    with contextlib.suppress(InvalidStateError):
        job.future.set_exception(error)


class _Budget:
    """The one deadline of a download, and the sockets it opened, so it can be aborted."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.aborted = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()

    def remaining(self) -> float:
        """Seconds left; raise ``TimeoutError`` (what a socket raises) when none are."""
        if self.aborted:
            raise FetchError(_CLOSED, attempted=False)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def add(self, sock: socket.socket) -> None:
        """Remember ``sock``; shut it down at once if the download was aborted."""
        with self._lock:
            self._sockets.add(sock)
            aborted = self.aborted
        if aborted:
            _shut(sock)

    def abort(self) -> None:
        """Make every read and write of this download fail now (from any thread)."""
        with self._lock:
            self.aborted = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Shut ``sock`` down, waking a thread blocked on it; closing stays with its owner."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _DeadlineSocket(socket.socket):
    """A socket whose every read and write may only use the time left in its budget."""

    budget: _Budget

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        """Receive, waiting no longer than the budget allows (http.client reads so)."""
        self.settimeout(self.budget.remaining())
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        """Receive, waiting no longer than the budget allows."""
        self.settimeout(self.budget.remaining())
        return super().recv(bufsize, flags)

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        """Send everything, within the budget (sendall's timeout covers the whole call)."""
        self.settimeout(self.budget.remaining())
        super().sendall(data, flags)


def _connect(host: str, port: int, budget: _Budget) -> socket.socket:
    """Connect to ``host``, trying each address within what is left of the budget.

    Name resolution itself cannot be bounded from here; CRL and OCSP hosts are names in
    the certificate, resolved by the system resolver with its own timeouts.
    """
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = _DeadlineSocket(family, kind, proto)
        sock.budget = budget
        budget.add(sock)
        try:
            sock.settimeout(budget.remaining())
            sock.connect(address)
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            error = exc
            continue
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


class _DeadlineConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket keeps to a budget (plain HTTP, no CONNECT tunnel)."""

    def __init__(self, host: str, *, budget: _Budget, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._budget = budget

    def connect(self) -> None:
        """Open the socket within the budget."""
        self.sock = _connect(self.host, self.port, self._budget)


class _DeadlineHandler(urllib.request.HTTPHandler):
    """Open ``http://`` URLs over ``_DeadlineConnection``s sharing one budget."""

    def __init__(self, budget: _Budget) -> None:
        super().__init__()
        self._budget = budget

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        """Open ``req`` (each redirect comes back here, with the same budget)."""
        return self.do_open(self._connection, req)

    def _connection(self, host: str, /, **kwargs: Any) -> http.client.HTTPConnection:
        return _DeadlineConnection(host, budget=self._budget, **kwargs)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to other ``http://`` URLs, without reading redirect bodies."""

    def redirect_request(  # noqa: PLR0917  # the base class's signature
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        """Refuse a redirect to a non-http URL, else redirect as usual.

        Closing ``fp`` first keeps urllib from reading the redirect's body, which it would
        do whatever its size.
        """
        fp.close()
        if urllib.parse.urlsplit(newurl).scheme.lower() != "http":
            raise FetchError(f"redirect to a non-http URL refused ({newurl})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(budget: _Budget) -> urllib.request.OpenerDirector:
    """Build an opener that speaks plain HTTP only (honouring proxy settings)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _DeadlineHandler(budget),
        urllib.request.HTTPDefaultErrorHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _download(url: str, body: bytes | None, content_type: str | None, budget: _Budget) -> bytes:
    """GET (or POST ``body`` to) an http:// URL within ``budget`` and the size cap."""
    if urllib.parse.urlsplit(url).scheme.lower() != "http":
        raise FetchError("unsupported URL scheme (only http:// is fetched)")
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    try:
        with _opener(budget).open(request, timeout=budget.remaining()) as response:
            if not isinstance(response, http.client.HTTPResponse):
                raise FetchError("unexpected response type")
            return _read_capped(response)
    except urllib.error.HTTPError as exc:
        exc.close()
        if 300 <= exc.code < 400:  # urllib's own refusal (non-http(s) target, loop)
            raise FetchError(f"redirect refused (HTTP {exc.code})") from None
        raise FetchError(f"HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        timed_out = isinstance(exc.reason, TimeoutError)
        raise FetchError(_describe(exc.reason), timed_out=timed_out) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise FetchError(_describe(exc), timed_out=isinstance(exc, TimeoutError)) from None


def _read_capped(response: http.client.HTTPResponse) -> bytes:
    """Read a body of at most ``MAX_DOWNLOAD_BYTES`` (the socket keeps to the deadline)."""
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
        raise FetchError(f"response larger than {MAX_DOWNLOAD_BYTES} bytes")
    chunks: list[bytes] = []
    total = 0
    while chunk := response.read1(_CHUNK):
        total += len(chunk)
        if total > MAX_DOWNLOAD_BYTES:
            raise FetchError(f"response larger than {MAX_DOWNLOAD_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
