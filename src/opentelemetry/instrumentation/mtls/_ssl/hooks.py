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
import importlib.util
import ssl
import sys
import weakref
from asyncio.events import _get_running_loop
from collections import deque
from time import time_ns
from typing import Any, Final

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, get_current
from opentelemetry.instrumentation.utils import _SUPPRESS_INSTRUMENTATION_KEY_PLAIN

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._config import MTLSConfig
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._requests import asgi as _asgi
from opentelemetry.instrumentation.mtls._requests.asgi import install_asgi_hook
from opentelemetry.instrumentation.mtls._requests.connection import REGISTRY, Connection
from opentelemetry.instrumentation.mtls._signals.handshake import HandshakeTelemetry
from opentelemetry.instrumentation.mtls._ssl import peer_rejection as _peer_rejection
from opentelemetry.instrumentation.mtls._ssl.record import (
    Address,
    HandshakeRecord,
    SSLEndpoint,
    fill_failure,
    fill_success,
)
from opentelemetry.instrumentation.mtls._x509 import (
    der_to_pem,
    first_pem_certificate,
    parse_certificate,
)

_AGAIN: Final = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_PENDING: Final = "_otel_mtls_attempt"
"""Key of an attempt in progress in its ssl object's ``__dict__``."""
_RECORD: Final = "_otel_mtls_record"
"""Key of a server connection's handshake record in its ssl object's ``__dict__``."""
_CONNECTION: Final = "_otel_mtls_connection"
"""Key of a server connection's registry entry in its ssl object's ``__dict__``."""
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

    __slots__ = ("hooks", "loop", "open", "ssl_context")

    hooks: SSLHooks
    loop: asyncio.AbstractEventLoop | None
    open: bool
    ssl_context: ssl.SSLContext | None

    def __del__(self) -> None:
        if self.open:
            self.hooks.abandoned(self)


class SSLHooks:
    """Install, run and remove the hooks around the ssl handshake methods."""

    def __init__(self, telemetry: HandshakeTelemetry, config: MTLSConfig) -> None:
        self._telemetry = telemetry
        self._config = config
        self._installed = False
        self._patches = Patches()
        # Attempts abandoned inside a finalizer: emitted later, outside the garbage
        # collector, where taking the SDK's locks cannot deadlock.
        self._orphans: deque[HandshakeRecord] = deque(maxlen=_MAX_ORPHANS)
        self._timeouts: weakref.WeakKeyDictionary[ssl.SSLContext, float] = (
            weakref.WeakKeyDictionary()
        )
        self._revocation = config.revocation_checker()
        # Each server context's trusted CAs by subject, to find a client's issuer.
        self._issuers: weakref.WeakKeyDictionary[ssl.SSLContext, dict[str, bytes]] = (
            weakref.WeakKeyDictionary()
        )
        # PEM of the certificate each server context presents, for the ASGI extension.
        self._local_pem: weakref.WeakKeyDictionary[ssl.SSLContext, str] = (
            weakref.WeakKeyDictionary()
        )

    # -- install / uninstall -------------------------------------------------------

    def install(self) -> None:
        """Patch the handshake methods (and asyncio's and uvloop's SSL plumbing)."""
        self._patches.replace(ssl.SSLSocket, "do_handshake", self._do_handshake)
        self._patches.replace(ssl.SSLObject, "do_handshake", self._do_handshake)
        self._patches.replace(ssl.SSLContext, "load_cert_chain", self._load_cert_chain)
        self._patches.replace(
            asyncio.base_events.BaseEventLoop, "create_server", self._create_server
        )
        self._install_asyncio()
        self._install_uvloop()
        install_asgi_hook(self._patches)
        config, telemetry = self._config, self._telemetry
        _asgi.configure(
            _asgi.RequestSettings(
                trusted_proxies=config.trusted_proxies,
                nginx_header=config.nginx_cert_header.encode("latin-1"),
                rules=config.identity_rules(),
                enforce=config.enforce_identity_policy,
                policy=telemetry.policy,
                decisions=telemetry.instruments.identity_decisions,
                limiter=telemetry.limiter,
                revocation_enforce=config.revocation == "enforce",
                revocation_timeout=config.revocation_timeout,
                revocation_checks=telemetry.instruments.revocation_checks,
            )
        )
        self._installed = True

    def uninstall(self) -> None:
        """Put back the original methods."""
        self._installed = False
        _asgi.configure(_asgi.RequestSettings())
        self._patches.restore()
        if self._revocation is not None:
            self._revocation.close()
        self._orphans.clear()
        REGISTRY.clear()

    def _install_asyncio(self) -> None:
        # Python 3.11 rewrote asyncio's SSL protocol after uvloop's; 3.10's older
        # SSLProtocol creates its ssl object later and is left to the finalizer.
        protocol = asyncio.sslproto.SSLProtocol
        if sys.version_info < (3, 11) or not hasattr(protocol, "_check_handshake_timeout"):
            return
        replace = self._patches.replace
        replace(protocol, "connection_made", self._protocol_connection_made)
        replace(protocol, "_on_handshake_complete", self._protocol_handshake_complete)
        replace(protocol, "_check_handshake_timeout", self._protocol_handshake_timeout)
        replace(protocol, "connection_lost", self._protocol_connection_lost)
        replace(protocol, "eof_received", self._protocol_eof_received)
        replace(protocol, "_start_shutdown", self._protocol_start_shutdown)

    def _install_uvloop(self) -> None:
        # uvloop's SSL protocol is compiled and cannot be patched; what it was told
        # about the handshake timeout, and the connections it serves, are learnt where
        # servers are created.
        if importlib.util.find_spec("uvloop") is None:
            return
        import uvloop  # noqa: PLC0415  # optional, only where installed

        self._patches.replace(uvloop.Loop, "create_server", self._create_server)

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

        def do_handshake(self: SSLEndpoint, *args: Any, **kwargs: Any) -> Any:
            state = self.__dict__
            attempt: _Attempt | None = state.get(_PENDING)
            if attempt is None:
                if not recording():
                    # Nothing records a success: only a failure is worth a record (logs).
                    try:
                        return original(self, *args, **kwargs)
                    except _AGAIN:
                        raise
                    except BaseException as exc:
                        record_failure(self, exc)
                        raise
                attempt = begin(self)
                if attempt is None:
                    return original(self, *args, **kwargs)
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
            server_side = tls.server_side
            attempt = _Attempt(server_side=server_side, start_ns=time_ns(), end_ns=0)
            attempt.hooks = self
            attempt.open = True
            attempt.loop = None
            attempt.ssl_context = None
            if server_side:
                self._telemetry.active.add(1)
            else:
                attempt.parent = context
                attempt.server_name = tls.server_hostname
            return attempt
        except Exception as exc:
            _failsafe.report("starting a handshake record", exc)
            return None

    def _finish(self, endpoint: SSLEndpoint, attempt: _Attempt, exc: BaseException | None) -> None:
        end_ns = time_ns()
        try:
            attempt.open = False
            endpoint.__dict__.pop(_PENDING, None)
            if attempt.server_side:
                self._telemetry.active.add(-1)
            attempt.end_ns = end_ns
            if isinstance(endpoint, ssl.SSLSocket) and attempt.peer_address is None:
                attempt.local_address, attempt.peer_address = _socket_addresses(endpoint)
            if exc is not None:
                fill_failure(attempt, exc)
                self._telemetry.emit(attempt)
                return
            fill_success(attempt, endpoint, capture_chain=self._config.capture_certificate_chain)
            self._telemetry.emit(attempt)
            if attempt.server_side:
                # For the requests of this connection (see _register).
                endpoint.__dict__[_RECORD] = attempt
            elif attempt.protocol_version == "1.3":
                _peer_rejection.watch(endpoint, attempt, self._telemetry.peer_rejected)
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
            attempt.end_ns = time_ns()
            timeout = None
            if attempt.loop is not None:
                timeout = _DEFAULT_LOOP_HANDSHAKE_TIMEOUT
                if attempt.ssl_context is not None:
                    timeout = self._timeouts.get(attempt.ssl_context, timeout)
            elapsed = (attempt.end_ns - attempt.start_ns) / 1e9
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
                    attempt.local_address = _address(transport.get_extra_info("sockname"))
                    attempt.peer_address = _address(transport.get_extra_info("peername"))
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
                    # The app protocol may have handed the transport on (a WebSocket
                    # upgrade) and never hear of the loss: the entry goes here too.
                    registered = sslobj.__dict__.pop(_CONNECTION, None)
                    if registered is not None:
                        REGISTRY.remove(*registered)
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
            try:
                sslobj = getattr(self, "_sslobj", None)
                if sslobj is not None:
                    _peer_rejection.connection_lost(sslobj)
            except Exception as exc:
                _failsafe.report("watching for a late rejection", exc)
            return original(self)

        return eof_received

    def _protocol_start_shutdown(self, original: Method) -> Method:
        def _start_shutdown(self: Any) -> None:
            # This side closes: the connection's end is no rejection by the server.
            try:
                sslobj = getattr(self, "_sslobj", None)
                if sslobj is not None:
                    _peer_rejection.stop_watching(sslobj)
            except Exception as exc:
                _failsafe.report("watching for a late rejection", exc)
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

    # -- local certificates --------------------------------------------------------

    def _load_cert_chain(self, original: Method) -> Method:
        note_local = self._note_local_certificate

        def load_cert_chain(
            self: ssl.SSLContext, certfile: Any, keyfile: Any = None, password: Any = None
        ) -> None:
            original(self, certfile, keyfile, password)
            note_local(self, certfile)

        return load_cert_chain

    def _note_local_certificate(self, context: ssl.SSLContext, certfile: Any) -> None:
        """Observe a certificate the process just loaded to present: expiry, PEM."""
        try:
            with open(certfile, "rb") as f:
                der = first_pem_certificate(f.read())
            if der is not None:
                self._telemetry.expiry.add_local(parse_certificate(der))
                self._local_pem[context] = der_to_pem(der)
        except Exception as exc:
            _failsafe.report("reading a loaded certificate", exc)

    # -- uvloop --------------------------------------------------------------------

    def _create_server(self, original: Method) -> Method:
        remember, track = self._remember_timeout, self._track_connections

        def create_server(self: Any, *args: Any, **kwargs: Any) -> Any:
            context = kwargs.get("ssl")
            if isinstance(context, ssl.SSLContext):
                remember(context, kwargs.get("ssl_handshake_timeout"))
                if args:
                    args = (track(args[0]), *args[1:])
                elif "protocol_factory" in kwargs:
                    kwargs["protocol_factory"] = track(kwargs["protocol_factory"])
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

    # -- server connections, for requests -----------------------------------------

    def _track_connections(self, factory: Any) -> Any:
        """Wrap a TLS server's protocol factory so each connection enters the registry.

        The transport handed to the protocol's ``connection_made`` knows both the ssl
        object (hence the handshake) and the addresses a request's scope will name;
        ``connection_lost`` says when the entry must go. The protocol gets instance
        attributes that shadow these two methods; its class is untouched.
        """
        register = self._register

        def protocol_factory() -> Any:
            protocol = factory()
            try:
                _shadow_connection_methods(protocol, register)
            except Exception as exc:
                _failsafe.report("following a server connection", exc)
            return protocol

        return protocol_factory

    def _register(self, transport: Any) -> tuple[Any, Connection] | None:
        """Enter a new server connection in the registry; return what removes it."""
        try:
            sslobj = transport.get_extra_info("ssl_object")
            if not isinstance(sslobj, ssl.SSLObject):
                return None
            local = _address(transport.get_extra_info("sockname"))
            peer = _address(transport.get_extra_info("peername"))
            if local is None or peer is None:
                return None
            record = sslobj.__dict__.get(_RECORD)
            if record is None:
                # Nothing recorded the handshake (the API alone, or suppressed): the
                # request still deserves its identity, read once, here.
                record = HandshakeRecord(server_side=True, start_ns=0, end_ns=0)
                fill_success(record, sslobj, capture_chain=False)
            record.local_address, record.peer_address = local, peer
            connection = Connection(
                record,
                weakref.ref(sslobj),
                self._local_pem.get(sslobj.context),
                self._telemetry.policy,
            )
            if self._revocation is not None and record.peer_der is not None:
                issuer = self._issuer_of(record, sslobj.context)
                connection.revocation = self._revocation.submit(record.peer_der, issuer)
            key = (local, peer)
            REGISTRY.add(key, connection)
            sslobj.__dict__[_CONNECTION] = (key, connection)
            return key, connection
        except Exception as exc:
            _failsafe.report("registering a server connection", exc)
            return None

    def _issuer_of(self, record: HandshakeRecord, context: ssl.SSLContext) -> bytes | None:
        """Return the DER of the CA that issued a client certificate (chain, else context)."""
        if len(record.peer_chain) > 1:
            return record.peer_chain[1]
        certificate = record.peer_certificate
        if certificate is None or certificate.issuer is None:
            return None
        issuers = self._issuers.get(context)
        if issuers is None:
            issuers = {}
            for der in context.get_ca_certs(binary_form=True):
                subject = parse_certificate(der).subject
                if subject is not None:
                    issuers[subject] = der
            self._issuers[context] = issuers
        return issuers.get(certificate.issuer)


def _shadow_connection_methods(protocol: Any, register: Any) -> None:
    state = getattr(protocol, "__dict__", None)
    if state is None or getattr(state.get("connection_made"), "otel_mtls", False):
        return  # no instance attributes, or a factory handing out one protocol twice
    made, lost = protocol.connection_made, protocol.connection_lost
    entry: list[tuple[Any, Connection]] = []

    def connection_made(transport: Any) -> None:
        registered = register(transport)
        if registered is not None:
            entry.append(registered)
        made(transport)

    def connection_lost(exc: BaseException | None) -> None:
        try:
            if entry:
                REGISTRY.remove(*entry.pop())
        except Exception as error:
            _failsafe.report("forgetting a server connection", error)
        # Our closures hold bound methods of the protocol: a cycle, broken here.
        if state.get("connection_made") is connection_made:
            del state["connection_made"]
        if state.get("connection_lost") is connection_lost:
            del state["connection_lost"]
        lost(exc)

    connection_made.otel_mtls = True  # type: ignore[attr-defined]
    state["connection_made"] = connection_made
    state["connection_lost"] = connection_lost


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
