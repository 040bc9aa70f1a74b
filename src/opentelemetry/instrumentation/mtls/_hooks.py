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
import asyncio.sslproto
import importlib.util
import ssl
import sys
import weakref
from collections import deque
from collections.abc import Callable
from time import time_ns
from typing import Any, Final

from opentelemetry.context import get_current
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, unwrap
from wrapt import wrap_function_wrapper

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._config import MTLSConfig
from opentelemetry.instrumentation.mtls._handshake import (
    Address,
    HandshakeRecord,
    SSLEndpoint,
    fill_failure,
    fill_success,
)
from opentelemetry.instrumentation.mtls._telemetry import HandshakeTelemetry

_AGAIN: Final = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_PENDING: Final = "_otel_mtls_attempt"
"""Key of an attempt in progress in its ssl object's ``__dict__``."""

# asyncio.constants.SSL_HANDSHAKE_TIMEOUT: what a loop uses when it is given none.
_DEFAULT_LOOP_HANDSHAKE_TIMEOUT: Final = 60.0
# An abandoned attempt that lasted this share of its timeout is taken as timed out.
_TIMEOUT_SHARE: Final = 0.9
_MAX_ORPHANS: Final = 65536

Wrapped = Callable[..., Any]


class _Attempt:
    """A handshake attempt in progress; reports itself when abandoned with its ssl object."""

    __slots__ = ("hooks", "loop", "open", "record", "timeout")

    def __init__(self, hooks: SSLHooks, record: HandshakeRecord) -> None:
        self.hooks = hooks
        self.record = record
        self.open = True
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timeout: float | None = None

    def __del__(self) -> None:
        if self.open:
            self.hooks.abandoned(self)


class SSLHooks:
    """Install, run and remove the wrappers around the ssl handshake methods."""

    def __init__(self, telemetry: HandshakeTelemetry, config: MTLSConfig) -> None:
        self._telemetry = telemetry
        self._config = config
        self._installed = False
        # Attempts abandoned inside a finalizer: emitted later, outside the garbage
        # collector, where taking the SDK's locks cannot deadlock.
        self._orphans: deque[HandshakeRecord] = deque(maxlen=_MAX_ORPHANS)
        self._timeouts: weakref.WeakKeyDictionary[ssl.SSLContext, float] = (
            weakref.WeakKeyDictionary()
        )
        # (owner, name, whether owner defined it itself rather than inheriting it)
        self._restore: list[tuple[type, str, bool]] = []

    # -- install / uninstall -------------------------------------------------------

    def install(self) -> None:
        """Wrap the handshake methods (and asyncio's and uvloop's SSL plumbing)."""
        self._wrap(ssl.SSLSocket, "do_handshake", self._do_handshake)
        self._wrap(ssl.SSLObject, "do_handshake", self._do_handshake)
        self._install_asyncio()
        self._install_uvloop()
        self._installed = True

    def uninstall(self) -> None:
        """Put back the original methods, in reverse order of wrapping."""
        self._installed = False
        while self._restore:
            owner, name, own = self._restore.pop()
            if own:
                unwrap(owner, name)
            else:
                delattr(owner, name)
        self._orphans.clear()

    def _wrap(self, owner: type, name: str, wrapper: Wrapped) -> None:
        own = name in vars(owner)
        wrap_function_wrapper(owner, name, wrapper)
        self._restore.append((owner, name, own))

    def _install_asyncio(self) -> None:
        # Python 3.11 rewrote asyncio's SSL protocol after uvloop's; 3.10's older
        # SSLProtocol creates its ssl object later and is left to the finalizer.
        protocol = asyncio.sslproto.SSLProtocol
        if sys.version_info < (3, 11) or not hasattr(protocol, "_check_handshake_timeout"):
            return
        self._wrap(protocol, "connection_made", self._protocol_connection_made)
        self._wrap(protocol, "_on_handshake_complete", self._protocol_handshake_complete)
        self._wrap(protocol, "_check_handshake_timeout", self._protocol_handshake_timeout)
        self._wrap(protocol, "connection_lost", self._protocol_connection_lost)

    def _install_uvloop(self) -> None:
        # uvloop's SSL protocol is compiled and cannot be wrapped; what it was told
        # about the handshake timeout is learnt where servers are created.
        if importlib.util.find_spec("uvloop") is None:
            return
        import uvloop  # noqa: PLC0415  # optional, only where installed

        self._wrap(uvloop.Loop, "create_server", self._create_server)

    # -- ssl wrappers --------------------------------------------------------------

    def _do_handshake(
        self, wrapped: Wrapped, instance: SSLEndpoint | None, args: Any, kwargs: Any
    ) -> Any:
        endpoint = instance if instance is not None else args[0]
        state: dict[str, Any] | None = getattr(endpoint, "__dict__", None)
        attempt: _Attempt | None = state.get(_PENDING) if state is not None else None
        if attempt is None:
            if state is None or not is_instrumentation_enabled():
                return wrapped(*args, **kwargs)
            attempt = self._begin(endpoint)
            if attempt is None:
                return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except _AGAIN:
            if state is not None and _PENDING not in state:
                self._suspend(endpoint, state, attempt)
            raise
        except BaseException as exc:
            self._finish(endpoint, attempt, exc)
            raise
        self._finish(endpoint, attempt, None)
        return result

    def _begin(self, endpoint: SSLEndpoint) -> _Attempt | None:
        try:
            if self._orphans:
                self.drain_orphans()
            server_side = endpoint.server_side
            record = HandshakeRecord(server_side=server_side, start_ns=time_ns(), end_ns=0)
            if not server_side:
                record.parent = get_current()
                record.server_name = endpoint.server_hostname
            return _Attempt(self, record)
        except Exception as exc:
            _failsafe.report("starting a handshake record", exc)
            return None

    def _suspend(self, endpoint: SSLEndpoint, state: dict[str, Any], attempt: _Attempt) -> None:
        """Keep a non-blocking attempt on its ssl object until it returns or is abandoned."""
        try:
            state[_PENDING] = attempt
            loop = asyncio.events._get_running_loop()
            if loop is not None:
                attempt.loop = loop
                attempt.timeout = self._timeouts.get(
                    endpoint.context, _DEFAULT_LOOP_HANDSHAKE_TIMEOUT
                )
        except Exception as exc:
            _failsafe.report("suspending a handshake record", exc)

    def _finish(self, endpoint: SSLEndpoint, attempt: _Attempt, exc: BaseException | None) -> None:
        end_ns = time_ns()
        try:
            attempt.open = False
            endpoint.__dict__.pop(_PENDING, None)
            record = attempt.record
            record.end_ns = end_ns
            if isinstance(endpoint, ssl.SSLSocket) and record.peer_address is None:
                record.local_address, record.peer_address = _socket_addresses(endpoint)
            if exc is None:
                fill_success(record, endpoint, capture_chain=self._config.capture_certificate_chain)
            else:
                fill_failure(record, exc)
            self._telemetry.emit(record)
        except Exception as error:
            _failsafe.report("recording a handshake", error)

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
            record = attempt.record
            record.end_ns = time_ns()
            timeout = attempt.timeout
            elapsed = (record.end_ns - record.start_ns) / 1e9
            if timeout is not None and elapsed >= timeout * _TIMEOUT_SHARE:
                fill_failure(record, _timeout_error(timeout))
            else:
                fill_failure(record, _closed_error())
            self._orphans.append(record)
            loop = attempt.loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self.drain_orphans)
        except Exception as exc:
            _failsafe.report("recording an abandoned handshake", exc)

    def drain_orphans(self) -> None:
        """Emit the records of abandoned attempts."""
        orphans = self._orphans
        while orphans:
            try:
                record = orphans.popleft()
            except IndexError:
                return
            try:
                self._telemetry.emit(record)
            except Exception as exc:
                _failsafe.report("recording an abandoned handshake", exc)

    # -- asyncio's SSLProtocol (Python 3.11+) --------------------------------------

    def _protocol_connection_made(
        self, wrapped: Wrapped, instance: Any, args: Any, kwargs: Any
    ) -> Any:
        try:
            sslobj = getattr(instance, "_sslobj", None)
            if (
                isinstance(sslobj, ssl.SSLObject)
                and _PENDING not in sslobj.__dict__
                and is_instrumentation_enabled()
            ):
                attempt = self._begin(sslobj)
                if attempt is not None:
                    transport = args[0] if args else kwargs["transport"]
                    attempt.record.local_address = _address(transport.get_extra_info("sockname"))
                    attempt.record.peer_address = _address(transport.get_extra_info("peername"))
                    attempt.loop = instance._loop
                    sslobj.__dict__[_PENDING] = attempt
        except Exception as exc:
            _failsafe.report("reading a connection's addresses", exc)
        return wrapped(*args, **kwargs)

    def _protocol_handshake_complete(
        self, wrapped: Wrapped, instance: Any, args: Any, kwargs: Any
    ) -> Any:
        handshake_exc = args[0] if args else kwargs.get("handshake_exc")
        if handshake_exc is not None:
            # An ssl.SSLError was recorded where do_handshake raised it; what is still
            # pending here is asyncio's own verdict, e.g. the peer's EOF.
            if isinstance(handshake_exc, type):
                handshake_exc = _closed_error()
            self._end_pending(instance, handshake_exc)
        return wrapped(*args, **kwargs)

    def _protocol_handshake_timeout(
        self, wrapped: Wrapped, instance: Any, args: Any, kwargs: Any
    ) -> Any:
        self._end_pending(instance, _timeout_error(getattr(instance, "_ssl_handshake_timeout", 0)))
        return wrapped(*args, **kwargs)

    def _protocol_connection_lost(
        self, wrapped: Wrapped, instance: Any, args: Any, kwargs: Any
    ) -> Any:
        self._end_pending(instance, _closed_error())
        return wrapped(*args, **kwargs)

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

    def _create_server(self, wrapped: Wrapped, instance: Any, args: Any, kwargs: Any) -> Any:
        try:
            context = kwargs.get("ssl")
            if isinstance(context, ssl.SSLContext):
                timeout = kwargs.get("ssl_handshake_timeout")
                self._timeouts[context] = (
                    float(timeout) if timeout is not None else _DEFAULT_LOOP_HANDSHAKE_TIMEOUT
                )
        except Exception as exc:
            _failsafe.report("reading a server's handshake timeout", exc)
        return wrapped(*args, **kwargs)


def _address(value: object) -> Address | None:
    """Return (host, port) of an IP socket address; None for anything else."""
    if isinstance(value, tuple) and len(value) >= 2:
        host, port = value[0], value[1]
        if isinstance(host, str) and isinstance(port, int):
            return host, port
    return None


def _socket_addresses(sock: ssl.SSLSocket) -> tuple[Address | None, Address | None]:
    try:
        return _address(sock.getsockname()), _address(sock.getpeername())
    except OSError:
        # Not connected any more, or never was: a failure on a closed socket.
        return None, None


def _timeout_error(timeout: float) -> TimeoutError:
    return TimeoutError(f"TLS handshake did not complete within {timeout:g} s")


def _closed_error() -> ConnectionResetError:
    return ConnectionResetError("the peer closed the connection during the TLS handshake")
