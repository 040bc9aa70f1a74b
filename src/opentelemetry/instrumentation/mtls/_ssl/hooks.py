"""Hooks into Python's TLS handshakes; each attempt becomes one handshake record.

Two methods carry every handshake the ``ssl`` module performs:

* ``ssl.SSLSocket.do_handshake``: blocking sockets, including the implicit
  handshakes of ``wrap_socket``, ``accept`` and ``connect``, which call it;
* ``ssl.SSLObject.do_handshake``: memory-BIO TLS, which asyncio's and uvloop's SSL
  protocols and trio's ``SSLStream`` drive.

A non-blocking handshake re-enters ``do_handshake`` until it stops raising
``SSLWantReadError``; those calls are one attempt, kept on the ssl object between
calls. An attempt the event loop gives up on never returns from ``do_handshake``:
the peer closed, or the loop's ``ssl_handshake_timeout`` fired. asyncio's own
``SSLProtocol`` is hooked to see those outcomes as they happen (and the addresses,
which an ``SSLObject`` does not know); for everything else, uvloop included, the
attempt ends when its ssl object is freed, classified by how long it lasted against
the handshake timeout that ``create_server`` was given.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.sslproto
import functools
import importlib.util
import ipaddress
import ssl
import weakref
from asyncio.events import _get_running_loop
from collections import deque
from collections.abc import Callable
from time import time_ns
from typing import Any, Final

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, get_current
from opentelemetry.instrumentation.utils import _SUPPRESS_INSTRUMENTATION_KEY_PLAIN

from opentelemetry.instrumentation.mtls import _failsafe, _forks
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._signals import audit as _audit
from opentelemetry.instrumentation.mtls._signals.handshake import HandshakeTelemetry
from opentelemetry.instrumentation.mtls._ssl import implicit as _implicit
from opentelemetry.instrumentation.mtls._ssl import messages as _messages
from opentelemetry.instrumentation.mtls._ssl import peer_rejection as _peer_rejection
from opentelemetry.instrumentation.mtls._ssl.record import (
    Address,
    HandshakeRecord,
    SSLEndpoint,
    fill_failure,
    fill_observed,
    fill_success,
    socket_address,
)

_AGAIN: Final = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_PENDING: Final = "_otel_mtls_attempt"
"""Key of an attempt in progress in its ssl object's ``__dict__``."""
_RECORD: Final = "_otel_mtls_record"
"""Key of a connection's handshake record in its ssl object's ``__dict__`` (either side)."""
_DRAIN_BATCH: Final = 256

# asyncio.constants.SSL_HANDSHAKE_TIMEOUT: what a loop uses when it is given none.
_DEFAULT_LOOP_HANDSHAKE_TIMEOUT: Final = 60.0
# An abandoned attempt that lasted this share of its timeout is taken as timed out.
_TIMEOUT_SHARE: Final = 0.9
_MAX_ORPHANS: Final = 65536


class _Attempt(HandshakeRecord):
    """The record of an attempt in progress; reports itself if abandoned with its ssl object.

    A subclass rather than a wrapper so that each attempt allocates one object: the
    handshake path is measured in single allocations (see ``_do_handshake``).
    """

    __slots__ = ("hooks", "loop", "observed", "open")

    hooks: SSLHooks
    loop: asyncio.AbstractEventLoop | None
    observed: _messages.Observed | None
    """What the handshake messages show as they pass (shared with the ssl object)."""
    open: bool

    def __del__(self) -> None:
        if self.open:
            self.hooks.abandoned(self)


class SSLHooks:
    """Install, run and remove the hooks around the ssl handshake methods."""

    def __init__(
        self,
        telemetry: HandshakeTelemetry,
        *,
        capture_chain: bool = False,
        expiry_warning_s: float = 0.0,
    ) -> None:
        self._telemetry = telemetry
        self._capture_chain = capture_chain
        self._expiry_warning_s = expiry_warning_s
        self._installed = False
        self._patches = Patches()
        self._messages = _messages.HandshakeMessages(wanted=self._observing)
        # Attempts abandoned inside a finalizer: emitted later, outside the garbage
        # collector, where taking the SDK's locks cannot deadlock.
        self._orphans: deque[HandshakeRecord] = deque(maxlen=_MAX_ORPHANS)
        self._timeouts: weakref.WeakKeyDictionary[ssl.SSLContext, float] = (
            weakref.WeakKeyDictionary()
        )
        self._uvloop: type | None = None
        _forks.rebuild_in_child(self._forked)

    def _forked(self) -> None:
        self._orphans.clear()  # the parent's attempts: the parent emits them

    def _observing(self) -> bool:
        """Whether a new connection's handshake messages are worth observing.

        They go into its span, metrics and records; with the API alone only a failure's
        record is left, and only if a handler takes it. Asked once per connection.
        """
        return self._telemetry.recording() or _audit.consumed()

    # -- install / uninstall -------------------------------------------------------

    def install(self) -> None:
        """Patch the handshake methods (and asyncio's and uvloop's SSL plumbing)."""
        self._patches.replace(ssl.SSLSocket, "do_handshake", self._do_handshake)
        self._patches.replace(ssl.SSLObject, "do_handshake", self._do_handshake)
        self._patches.replace(
            asyncio.base_events.BaseEventLoop, "create_server", self._create_server
        )
        self._install_asyncio()
        self._install_uvloop()
        self._patches.replace(ssl.SSLContext, "wrap_socket", self._wrap_socket)
        self._patches.replace(ssl.SSLContext, "wrap_bio", self._wrap_bio)
        self._messages.install(self._patches)
        self._installed = True

    def uninstall(self) -> None:
        """Put back the original methods."""
        self._installed = False
        self._patches.restore()
        self._messages.uninstall()
        self._orphans.clear()

    def _install_asyncio(self) -> None:
        # Python 3.11 rewrote asyncio's SSL protocol after uvloop's.
        protocol = asyncio.sslproto.SSLProtocol
        replace = self._patches.replace
        replace(protocol, "connection_made", self._protocol_connection_made)
        replace(protocol, "_on_handshake_complete", self._protocol_handshake_complete)
        replace(protocol, "_check_handshake_timeout", self._protocol_handshake_timeout)
        replace(protocol, "connection_lost", self._protocol_connection_lost)
        replace(protocol, "eof_received", self._protocol_eof_received)
        replace(protocol, "_start_shutdown", self._protocol_start_shutdown)

    def _install_uvloop(self) -> None:
        # uvloop's SSL protocol is compiled and cannot be patched; what it was told
        # about the handshake timeout is learnt where servers are created.
        if importlib.util.find_spec("uvloop") is None:
            return
        import uvloop  # noqa: PLC0415  # optional, only where installed

        self._patches.replace(uvloop.Loop, "create_server", self._create_server)
        self._uvloop = uvloop.Loop

    # -- the handshake methods -----------------------------------------------------

    def _do_handshake(self, original: Method) -> Method:
        """Make the replacement of ``SSLSocket.do_handshake`` or ``SSLObject.do_handshake``.

        The whole per-call path is this one function: a handshake runs while OpenSSL has
        evicted Python from the CPU's caches, so every extra frame on it is measurable
        (benchmarks/handshake_overhead.py), and an exception that crosses one more frame
        costs more than the frame.
        """
        recording = self._telemetry.recording
        begin, finish = self._begin, self._finish
        record_failure = self._record_unrecorded_failure
        established = self._established

        def do_handshake(self: SSLEndpoint, *args: Any, **kwargs: Any) -> Any:
            state = self.__dict__
            attempt: _Attempt | None = state.get(_PENDING)
            if attempt is None:
                if not recording():
                    # Nothing records a success: only a failure is worth a record (logs).
                    try:
                        result = original(self, *args, **kwargs)
                    except _AGAIN:
                        raise
                    except BaseException as exc:
                        record_failure(self, exc)
                        raise
                    established(self)
                    return result
                attempt = begin(self)
                if attempt is None:
                    result = original(self, *args, **kwargs)
                    established(self)
                    return result
            try:
                result = original(self, *args, **kwargs)
            except _AGAIN:
                if _PENDING not in state:
                    # Kept until a later call returns, or the ssl object is freed.
                    state[_PENDING] = attempt
                    if attempt.loop is None:
                        attempt.loop = _get_running_loop()
                        attempt.ssl_context = self._sslobj.context  # type: ignore[union-attr]
                raise
            except BaseException as exc:
                finish(self, attempt, exc)
                raise
            finish(self, attempt, None)
            return result

        return do_handshake

    @staticmethod
    def _established(endpoint: SSLEndpoint) -> None:
        """Stop observing the messages of a connection whose handshake nothing records."""
        try:
            _implicit.stop(endpoint)
            _messages.take(endpoint)
            _messages.detach(endpoint)
        except Exception as exc:
            _failsafe.report("ending a handshake's observation", exc)

    def _record_unrecorded_failure(self, endpoint: SSLEndpoint, exc: BaseException) -> None:
        attempt = self._begin(endpoint)
        if attempt is not None:
            self._finish(endpoint, attempt, exc)

    def _begin(self, endpoint: SSLEndpoint) -> _Attempt | None:
        """Start the record of a new attempt; None when instrumentation is suppressed."""
        # What is_instrumentation_enabled() checks, with one context look-up, which
        # also serves as the client span's parent.
        context = get_current()
        if context.get(_SUPPRESS_INSTRUMENTATION_KEY) or context.get(
            _SUPPRESS_INSTRUMENTATION_KEY_PLAIN
        ):
            return None
        try:
            if self._orphans:
                self.drain_orphans()
            # The C object's getters: SSLObject's are Python properties over them.
            tls: Any = endpoint._sslobj  # type: ignore[union-attr]
            if tls is None:
                # An SSLSocket that is not connected: no handshake can start, and the
                # host's call raises its own error (CPython's test_ssl does this).
                return None
            server_side = tls.server_side
            attempt = _Attempt(server_side=server_side, start_ns=time_ns(), end_ns=0)
            attempt.hooks = self
            attempt.open = True
            attempt.loop = None
            attempt.observed = _messages.watch(endpoint)
            if server_side:
                self._telemetry.active.add(1)
            else:
                attempt.parent = context
                attempt.server_name = _sni(tls.server_hostname)
            return attempt
        except Exception as exc:
            _failsafe.report("starting a handshake record", exc)
            return None

    def _finish(self, endpoint: SSLEndpoint, attempt: _Attempt, exc: BaseException | None) -> None:
        end_ns = time_ns()
        try:
            attempt.open = False
            endpoint.__dict__.pop(_PENDING, None)
            _implicit.stop(endpoint)
            if attempt.server_side:
                self._telemetry.active.add(-1)
            attempt.end_ns = end_ns
            if isinstance(endpoint, ssl.SSLSocket) and attempt.peer_address is None:
                attempt.local_address, attempt.peer_address = _socket_addresses(endpoint)
            _messages.take(endpoint)  # later messages are not this attempt's
            fill_observed(attempt, attempt.observed)
            attempt.observed = None
            if exc is not None:
                fill_failure(attempt, exc)
                self._telemetry.emit(attempt)
                return
            _messages.detach(endpoint)
            fill_success(
                attempt,
                endpoint,
                capture_chain=self._capture_chain,
                expiry_warning_s=self._expiry_warning_s,
            )
            attempt.span_context = self._telemetry.emit(attempt)
            attempt.hello_message = None  # emitted: not kept for the connection's life
            # For the requests of this connection (see connection_record).
            endpoint.__dict__[_RECORD] = attempt
            if not attempt.server_side:
                # Emitted: the first request's context is not kept for the connection's life.
                attempt.parent = None
                if attempt.protocol_version == "1.3":
                    _peer_rejection.watch(endpoint, attempt, self._telemetry.peer_rejected)
        except Exception as error:
            _failsafe.report("recording a handshake", error)

    # -- implicit handshakes (inside the first read or write) -------------------------

    def _wrap_socket(self, original: Method) -> Method:
        run = self._implicit

        def wrap_socket(self: ssl.SSLContext, sock: Any, *args: Any, **kwargs: Any) -> Any:
            endpoint = original(self, sock, *args, **kwargs)
            on_connect = args[1] if len(args) > 1 else kwargs.get("do_handshake_on_connect", True)
            if not on_connect:
                _implicit.stand_in(endpoint, _implicit.SOCKET_METHODS, run)
            return endpoint

        return wrap_socket

    def _wrap_bio(self, original: Method) -> Method:
        run, uvloop = self._implicit, self._uvloop

        def wrap_bio(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> Any:
            endpoint = original(self, *args, **kwargs)
            # uvloop binds the new object's read and write at once, and always calls
            # do_handshake first: stand-ins would stay bound for the connection's life.
            loop = _get_running_loop()
            if loop is None or uvloop is None or not isinstance(loop, uvloop):
                _implicit.stand_in(endpoint, _implicit.OBJECT_METHODS, run)
            return endpoint

        return wrap_bio

    def _implicit(
        self, endpoint: SSLEndpoint, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run a read or write whose OpenSSL call may perform the handshake: an attempt."""
        state = endpoint.__dict__
        attempt: _Attempt | None = state.get(_PENDING)
        if attempt is None and self._telemetry.recording():
            attempt = self._begin(endpoint)
        original = getattr(type(endpoint), name)
        try:
            result = original(endpoint, *args, **kwargs)
        except _AGAIN:
            if attempt is not None and _PENDING not in state:
                state[_PENDING] = attempt  # as do_handshake keeps one: until an outcome
                attempt.loop = attempt.loop or _get_running_loop()
                attempt.ssl_context = endpoint.context
            raise
        except BaseException as exc:
            self._implicit_outcome(endpoint, attempt, exc)
            raise
        if _implicit.established(endpoint) or (
            not result and _implicit.asked_for_data(name, args, kwargs)
        ):
            self._implicit_outcome(endpoint, attempt, None)
        return result

    def _implicit_outcome(
        self, endpoint: SSLEndpoint, attempt: _Attempt | None, exc: BaseException | None
    ) -> None:
        """End an implicit handshake: established, failed, or met the peer's EOF."""
        try:
            _implicit.stop(endpoint)
            if _implicit.established(endpoint):
                exc = None  # what failed after the handshake is the host's own business
            elif exc is None:
                exc = _closed_error()  # a read that met EOF (ragged EOFs are suppressed)
        except Exception as error:
            _failsafe.report("ending an implicit handshake", error)
            return
        if attempt is not None:
            self._finish(endpoint, attempt, exc)
        elif exc is not None:
            self._record_unrecorded_failure(endpoint, exc)
        else:
            self._established(endpoint)

    # -- abandoned attempts --------------------------------------------------------

    def abandoned(self, attempt: _Attempt) -> None:
        """Queue the record of an attempt whose ssl object died before an outcome.

        Runs in a finalizer, possibly inside the garbage collector: it only appends
        to a deque and asks the attempt's event loop to emit it soon.
        """
        try:
            attempt.open = False
            if not self._installed:
                return
            attempt.end_ns = time_ns()
            timeout = None
            if attempt.loop is not None:
                timeout = _DEFAULT_LOOP_HANDSHAKE_TIMEOUT
                if attempt.ssl_context is not None:
                    timeout = self._timeouts.get(attempt.ssl_context, timeout)
            elapsed = (attempt.end_ns - attempt.start_ns) / 1e9
            fill_observed(attempt, attempt.observed)
            attempt.observed = None
            if timeout is not None and elapsed >= timeout * _TIMEOUT_SHARE:
                fill_failure(attempt, _timeout_error(timeout))
            else:
                fill_failure(attempt, _closed_error())
            self._orphans.append(attempt)
            loop = attempt.loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self.drain_orphans)
        except Exception as exc:
            _failsafe.report("recording an abandoned handshake", exc)

    def drain_orphans(self) -> None:
        """Emit the records of abandoned attempts, a bounded batch at a time.

        Runs from the event loop or a handshake's first call, never inside a finalizer:
        taking locks (the active-handshake count, the SDK's) is safe here.
        """
        orphans = self._orphans
        for _ in range(_DRAIN_BATCH):
            try:
                record = orphans.popleft()
            except IndexError:
                return
            try:
                if record.server_side:
                    self._telemetry.active.add(-1)
                self._telemetry.emit(record)
            except Exception as exc:
                _failsafe.report("recording an abandoned handshake", exc)
        loop = _get_running_loop()
        if orphans and loop is not None:
            loop.call_soon(self.drain_orphans)  # the rest later, between other callbacks

    # -- asyncio's SSLProtocol (Python 3.11+) --------------------------------------

    def _protocol_connection_made(self, original: Method) -> Method:
        begin_with_addresses = self._begin_with_addresses

        def connection_made(self: Any, transport: asyncio.BaseTransport) -> None:
            begin_with_addresses(self, transport)
            original(self, transport)

        return connection_made

    def _begin_with_addresses(self, protocol: Any, transport: asyncio.BaseTransport) -> None:
        try:
            sslobj = getattr(protocol, "_sslobj", None)
            if (
                isinstance(sslobj, ssl.SSLObject)
                and _PENDING not in sslobj.__dict__
                and self._telemetry.recording()
            ):
                attempt = self._begin(sslobj)
                if attempt is not None:
                    attempt.local_address = socket_address(transport.get_extra_info("sockname"))
                    attempt.peer_address = socket_address(transport.get_extra_info("peername"))
                    attempt.loop = protocol._loop
                    sslobj.__dict__[_PENDING] = attempt
        except Exception as exc:
            _failsafe.report("reading a connection's addresses", exc)

    def _protocol_handshake_complete(self, original: Method) -> Method:
        end_pending = self._end_pending

        def _on_handshake_complete(self: Any, handshake_exc: Any) -> None:
            if handshake_exc is not None:
                # An ssl.SSLError was recorded where do_handshake raised it; what is still
                # pending here is asyncio's own verdict: the peer's EOF.
                end_pending(self, _closed_error())
            original(self, handshake_exc)

        return _on_handshake_complete

    def _protocol_handshake_timeout(self, original: Method) -> Method:
        end_pending = self._end_pending

        def _check_handshake_timeout(self: Any) -> None:
            end_pending(self, _timeout_error(getattr(self, "_ssl_handshake_timeout", 0)))
            original(self)

        return _check_handshake_timeout

    def _protocol_connection_lost(self, original: Method) -> Method:
        end_pending = self._end_pending

        def lost_before_data(protocol: Any) -> None:
            try:
                sslobj = getattr(protocol, "_sslobj", None)
                if sslobj is not None:
                    _peer_rejection.connection_lost(sslobj)
            except Exception as exc:
                _failsafe.report("watching for a late rejection", exc)

        def connection_lost(self: Any, exc: BaseException | None) -> None:
            end_pending(self, _closed_error())
            original(self, exc)
            lost_before_data(self)

        return connection_lost

    def _protocol_eof_received(self, original: Method) -> Method:
        def eof_received(self: Any) -> Any:
            # The peer closed first; before any data that is how a server that sends no
            # alert rejects us. (Python 3.13 then shuts down from this side too.)
            _on_ssl_object(self, _peer_rejection.connection_lost)
            return original(self)

        return eof_received

    def _protocol_start_shutdown(self, original: Method) -> Method:
        def _start_shutdown(self: Any) -> None:
            # This side closes: the connection's end is no rejection by the server.
            _on_ssl_object(self, _peer_rejection.stop_watching)
            original(self)

        return _start_shutdown

    def _end_pending(self, protocol: Any, exc: BaseException) -> None:
        try:
            sslobj = getattr(protocol, "_sslobj", None)
            state = getattr(sslobj, "__dict__", None)
            attempt = state.get(_PENDING) if state is not None else None
            if attempt is not None and sslobj is not None:
                self._finish(sslobj, attempt, exc)
        except Exception as error:
            _failsafe.report("ending an interrupted handshake", error)

    # -- uvloop --------------------------------------------------------------------

    def _create_server(self, original: Method) -> Method:
        remember = self._remember_timeout

        def create_server(self: Any, *args: Any, **kwargs: Any) -> Any:
            context = kwargs.get("ssl")
            if isinstance(context, ssl.SSLContext):
                remember(context, kwargs.get("ssl_handshake_timeout"))
            return original(self, *args, **kwargs)

        return create_server

    def _remember_timeout(self, context: ssl.SSLContext, timeout: object) -> None:
        try:
            self._timeouts[context] = (
                float(timeout)  # type: ignore[arg-type]
                if timeout is not None
                else _DEFAULT_LOOP_HANDSHAKE_TIMEOUT
            )
        except Exception as exc:
            _failsafe.report("reading a server's handshake timeout", exc)


def connection_record(sslobj: SSLEndpoint) -> HandshakeRecord:
    """Return the record of a connection's completed handshake, server or client side.

    The hooks keep it on the ssl object; when nothing recorded the handshake (the API
    alone, or instrumentation suppressed), the connection's requests still deserve their
    identity, so it is read here, once.
    """
    record: HandshakeRecord | None = sslobj.__dict__.get(_RECORD)
    if record is None:
        record = HandshakeRecord(server_side=sslobj.server_side, start_ns=0, end_ns=0)
        fill_success(record, sslobj, capture_chain=False)
        sslobj.__dict__[_RECORD] = record
    return record


def _on_ssl_object(protocol: Any, action: Callable[[ssl.SSLObject], None]) -> None:
    """Tell the late-rejection watch about an asyncio SSL protocol's ssl object."""
    try:
        sslobj = getattr(protocol, "_sslobj", None)
        if sslobj is not None:
            action(sslobj)
    except Exception as exc:
        _failsafe.report("watching for a late rejection", exc)


def _socket_addresses(sock: ssl.SSLSocket) -> tuple[Address | None, Address | None]:
    try:
        return socket_address(sock.getsockname()), socket_address(sock.getpeername())
    except OSError:
        # Not connected any more, or never was: a failure on a closed socket.
        return None, None


def _timeout_error(timeout: float) -> TimeoutError:
    return TimeoutError(f"TLS handshake did not complete within {timeout:g} s")


def _closed_error() -> ConnectionResetError:
    return ConnectionResetError("the peer closed the connection during the TLS handshake")


@functools.lru_cache(maxsize=1024)
def _sni(server_hostname: str | None) -> str | None:
    """Return the SNI a client sends for ``server_hostname``: none for an IP address.

    Python's ``ssl`` verifies an IP target against the certificate's IP addresses and
    sends it no server name (RFC 6066 forbids literal addresses there).
    """
    if server_hostname is None:
        return None
    try:
        ipaddress.ip_address(server_hostname.strip("[]"))
    except ValueError:
        return server_hostname
    return None
