"""Observe each connection's handshake messages: what the peer offered and presented.

OpenSSL hands Python the peer's certificate only after a successful handshake, but
every handshake message passes, decrypted, through the SSL context's message callback:
the ClientHello, each side's Certificate (before it is verified) and the alerts. That
callback is the private ``_msg_callback`` slot of ``_ssl._SSLContext`` (Python 3.8+);
``ssl.SSLContext`` wraps it in a property that converts every argument to an enum
(about 4 µs a call), so the C slot is set directly. CPython calls it as
``callback(conn, direction, version, content_type, msg_type, data)``, ``conn`` being
the ``SSLSocket`` or ``SSLObject``, ``direction`` ``"read"`` or ``"write"``
(Modules/_ssl/debughelpers.c).

* The slot is per context, and OpenSSL copies the callback into each connection when
  the connection is created: the observer is put on a context where its connections are
  made (``SSLContext._wrap_socket`` and ``_wrap_bio``, which every ``wrap_socket``,
  ``wrap_bio``, ``connect``, ``accept`` and asyncio's, uvloop's and trio's SSL
  protocols reach). A callback the host set is kept and called after ours, with the
  same arguments; one the host sets later is found there at the next connection.
* It keeps, per connection, only what a span needs: the ClientHello a server read, the
  peer's leaf certificate and the first alert, each bounded in size, in the
  connection's ``__dict__`` until the attempt ends (:func:`take`).
* It runs inside OpenSSL's callback, where an exception would be raised later from the
  host's own TLS call: ours are caught and reported; the host's callback's pass through.
* After the handshake the same callback would fire twice per record (its header and,
  in TLS 1.3, its inner content type). :func:`detach` takes an established connection
  off the callback altogether; until then, those records return at the first test.

Where the slot is missing (:data:`AVAILABLE`), nothing is installed. A connection made
while nothing would use what its messages show (the API alone, and no handler for the
security-event records) is made without the callback: about 70 calls from OpenSSL into
Python per handshake (both sides) that would keep nothing.
"""

from __future__ import annotations

import _ssl
import ssl
import weakref
from collections.abc import Callable
from functools import partial
from operator import call
from typing import Any, Final

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._ssl.client_hello import CLIENT_HELLO
from opentelemetry.instrumentation.mtls._ssl.handshake_messages import (
    CERTIFICATE,
    certificate_leaf,
)

SLOT: Final[Any] = vars(_ssl._SSLContext).get("_msg_callback")
"""The C slot of the context's message callback (``ssl.SSLContext._msg_callback``'s own)."""
AVAILABLE: Final = SLOT is not None and hasattr(SLOT, "__set__")
"""Whether this Python has the message callback slot (CPython 3.8+)."""

_STATE: Final = "_otel_mtls_messages"
"""Key of a connection's :class:`Observed` in its ssl object's ``__dict__``."""
_OWNER: Final = "otel_mtls_owner"
"""Attribute of our callbacks naming the :class:`HandshakeMessages` that made them."""

ALERT: Final = 21
"""Record content type of an alert (RFC 8446 5.1)."""
HANDSHAKE: Final = 22
"""Record content type of a handshake message."""
_TLS13: Final = 0x0304
_FATAL: Final = 2
_READ: Final = "read"
# The largest ClientHello OpenSSL accepts is about 128 KiB; real ones are a few KiB.
MAX_HELLO: Final = 65536
"""A ClientHello longer than this is not kept (no ClientHello attributes)."""
MAX_CERTIFICATE: Final = 102400
"""A Certificate message longer than this is not kept (OpenSSL's default max_cert_list)."""

Callback = Callable[[Any, str, int, int, int, bytes], Any]


class Observed:
    """What one connection's handshake showed of its peer, until the attempt ends."""

    __slots__ = ("alert", "alert_fatal", "alert_sent", "hello", "leaf", "sent_no_certificate")

    def __init__(self) -> None:
        self.hello: bytes | None = None
        """The ClientHello message a server read."""
        self.leaf: bytes | None = None
        """The DER of the first certificate of the peer's Certificate message."""
        self.alert: int | None = None
        """The first alert's description (RFC 8446 6), a fatal one before a warning."""
        self.alert_sent: bool = False
        """Whether this side sent that alert (else the peer did)."""
        self.alert_fatal: bool = False
        self.sent_no_certificate: bool = False
        """Whether this side answered a certificate request with no certificate."""


_ENDED: Final = Observed()
"""What a connection whose attempt has ended keeps: later messages are ignored."""


def _note(conn: Any, direction: str, version: int, content_type: int, data: bytes) -> None:
    """Keep what a span needs of one handshake message or alert."""
    if content_type == HANDSHAKE:
        kind = data[0]
        if kind != CLIENT_HELLO and kind != CERTIFICATE:  # noqa: PLR1714  # the cheapest test
            return
    elif content_type != ALERT or len(data) != 2:
        return  # change_cipher_spec
    state = conn.__dict__.get(_STATE)
    if state is _ENDED:
        return
    if state is None:
        state = conn.__dict__[_STATE] = Observed()
    read = direction == _READ
    if content_type == ALERT:
        if state.hello is None and conn.server_side:
            # No ClientHello: a TCP probe or garbage, whose span has no alert (the
            # contract), although OpenSSL "sends" one (decode_error) to a peer gone.
            return
        fatal = data[0] == _FATAL
        if state.alert is None or (fatal and not state.alert_fatal):
            state.alert, state.alert_sent, state.alert_fatal = data[1], not read, fatal
    elif not read:
        # Our own hello is not kept; our own Certificate only tells whether it was empty.
        if kind == CERTIFICATE and certificate_leaf(data, tls13=version == _TLS13) is None:
            state.sent_no_certificate = True
    elif kind == CLIENT_HELLO:
        if state.hello is None and len(data) <= MAX_HELLO:
            state.hello = data
    elif state.leaf is None and len(data) <= MAX_CERTIFICATE:
        state.leaf = certificate_leaf(data, tls13=version == _TLS13)


def _observer(owner: HandshakeMessages, host: Callback | None) -> Callback:
    """Make a context's callback: ours, then the host's own (if it set one)."""
    observe = _own_observer() if host is None else _chained_observer(host)
    observe.host = host  # type: ignore[attr-defined]
    setattr(observe, _OWNER, owner)
    return observe


def _own_observer() -> Callback:
    note, report = _note, _failsafe.report

    # CPython's positional signature (Modules/_ssl/debughelpers.c).
    def observe(  # noqa: PLR0917
        conn: Any, direction: str, version: int, content_type: int, msg_type: int, data: bytes
    ) -> None:
        if content_type > HANDSHAKE:  # record headers, inner content types: most calls
            return
        try:
            note(conn, direction, version, content_type, data)
        except Exception as exc:
            report("observing a TLS handshake message", exc)

    # What ssl.SSLContext._msg_callback reads back: None, as without us.
    observe.user_function = None  # type: ignore[attr-defined]
    return observe


def _chained_observer(host: Callback) -> Callback:
    note, report = _note, _failsafe.report

    def observe(  # noqa: PLR0917
        conn: Any, direction: str, version: int, content_type: int, msg_type: int, data: bytes
    ) -> Any:
        if content_type <= HANDSHAKE:
            try:
                note(conn, direction, version, content_type, data)
            except Exception as exc:
                report("observing a TLS handshake message", exc)
        # The host's exceptions go where they would without us: into its TLS call.
        return host(conn, direction, version, content_type, msg_type, data)

    if hasattr(host, "user_function"):  # the property's wrapper: its getter reads this
        observe.user_function = host.user_function  # type: ignore[attr-defined]
    return observe


class HandshakeMessages:
    """Put the observer on every SSL context before its connections are made; take it off."""

    def __init__(self, wanted: Callable[[], bool] = lambda: True) -> None:
        self._contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
        self._wanted = wanted
        """Asked at each new connection: whether anything would use what it shows."""

    def install(self, patches: Patches) -> None:
        """Observe the contexts of the connections made from now on; nothing if unavailable."""
        if not AVAILABLE:
            return
        patches.replace(ssl.SSLContext, "_wrap_socket", self._wrap)
        patches.replace(ssl.SSLContext, "_wrap_bio", self._wrap)

    def uninstall(self) -> None:
        """Give every context back the callback it had before us (the host's, or none)."""
        for context in list(self._contexts):
            try:
                current = SLOT.__get__(context)
                if getattr(current, _OWNER, None) is self:
                    SLOT.__set__(context, current.host)
            except Exception as exc:
                _failsafe.report("removing the TLS message observer", exc)
        self._contexts.clear()

    def _wrap(self, original: Method) -> Method:
        """Make the replacement of ``_SSLContext._wrap_socket`` or ``_wrap_bio``."""
        get, observe, wanted = SLOT.__get__, self._observe, self._wanted

        def wrap(context: ssl.SSLContext, *args: Any, **kwargs: Any) -> Any:
            if not wanted():
                tls = original(context, *args, **kwargs)
                try:
                    _detach(tls)  # made with the context's callback, if ours: taken off
                except Exception as exc:
                    _failsafe.report("observing a TLS connection", exc)
                return tls
            if getattr(get(context), _OWNER, None) is not self:
                observe(context)
            tls = original(context, *args, **kwargs)
            try:
                # Copy the context's callback into the new connection again: a detach()
                # in another thread may have emptied the slot while OpenSSL (which runs
                # without the GIL) created it. Setting a connection's own context is
                # otherwise a no-op (SSL_set_SSL_CTX returns at once).
                tls.context = context
            except Exception as exc:
                _failsafe.report("observing a TLS connection", exc)
            return tls

        return wrap

    def _observe(self, context: ssl.SSLContext) -> None:
        try:
            host = SLOT.__get__(context)
            if hasattr(host, _OWNER):  # a callback of an earlier instrumentation
                host = host.host
            SLOT.__set__(context, _observer(self, host))
            self._contexts.add(context)
        except Exception as exc:
            _failsafe.report("installing the TLS message observer", exc)


def watch(endpoint: Any) -> Observed:
    """Return the state the observer fills for a connection's attempt (made here if new).

    The attempt keeps it too, so that an attempt abandoned with its ssl object still
    has what its handshake showed.
    """
    state = endpoint.__dict__
    observed: Observed | None = state.get(_STATE)
    if observed is None or observed is _ENDED:
        observed = state[_STATE] = Observed()
    return observed


def take(endpoint: Any) -> Observed | None:
    """Return what a connection's handshake showed, once; later messages are ignored."""
    state = endpoint.__dict__
    observed: Observed | None = state.get(_STATE)
    state[_STATE] = _ENDED
    return observed if observed is not _ENDED else None


def detach(endpoint: Any) -> None:
    """Take an established connection off its context's callback, if only ours is there.

    CPython copies the callback into a connection when its context is set; setting the
    connection's own context while the context's slot is empty copies none. The three
    steps run as one C call (``any(map(call, ...))``) so that no Python code, and no other
    thread, runs while the slot is empty. With a host callback, nothing changes.
    """
    tls = endpoint._sslobj
    if tls is not None:
        _detach(tls)


def _detach(tls: Any) -> None:
    """Take one C-level connection (``_ssl._SSLSocket``) off our callback; see detach()."""
    context = tls.context
    observer = SLOT.__get__(context)
    if getattr(observer, _OWNER, None) is None or observer.host is not None:
        return
    set_slot = SLOT.__set__
    steps = (
        partial(set_slot, context, None),
        partial(setattr, tls, "context", context),
        partial(set_slot, context, observer),
    )
    any(map(call, steps))
