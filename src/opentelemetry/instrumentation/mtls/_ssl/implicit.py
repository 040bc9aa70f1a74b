"""Implicit handshakes: the ones OpenSSL runs inside a connection's first read or write.

A socket wrapped with ``do_handshake_on_connect=False`` whose owner never calls
``do_handshake()`` (gunicorn's sync worker) has its handshake run by OpenSSL inside its
first ``recv`` or ``send``; an ``SSLObject`` likewise inside its first ``read`` or
``write``. Until such a connection's handshake is over, its ``read`` and ``write`` (and a
socket's ``send``, which ``sendall`` calls; ``recv``, ``recv_into`` and ``makefile``
reads go through ``read``) are stood in for by instance attributes that shadow the
class's methods and hand the call to the ssl hooks, which make it a handshake attempt
like any other. Once the handshake is over, explicitly or implicitly, the stand-ins are
removed: established connections pay nothing, and connections whose handshake runs on
connect never had any.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Final

from opentelemetry.instrumentation.mtls._ssl.record import SSLEndpoint

SOCKET_METHODS: Final = ("read", "write", "send")
"""An ``SSLSocket``'s methods that reach OpenSSL's read and write."""
OBJECT_METHODS: Final = ("read", "write")
"""An ``SSLObject``'s methods that reach OpenSSL's read and write."""
_STANDING: Final = "_otel_mtls_implicit"
"""Key in an endpoint's ``__dict__`` while its stand-ins are in place."""

Run = Callable[[SSLEndpoint, str, tuple[Any, ...], dict[str, Any]], Any]
"""Runs the class's method ``name`` of an endpoint, as one handshake attempt."""


def stand_in(endpoint: SSLEndpoint, names: tuple[str, ...], run: Run) -> None:
    """Hand ``endpoint``'s methods ``names`` to ``run`` until :func:`stop`."""
    # A weak reference: the stand-ins live in the endpoint's __dict__, and a cycle would
    # keep an abandoned connection (and its pending attempt) alive until a collection.
    ref = weakref.ref(endpoint)
    state = endpoint.__dict__
    for name in names:
        state[name] = _method(ref, name, run)
    state[_STANDING] = names


def _method(ref: weakref.ref[SSLEndpoint], name: str, run: Run) -> Callable[..., Any]:
    def method(*args: Any, **kwargs: Any) -> Any:
        endpoint = ref()
        if endpoint is None:  # pragma: no cover - the endpoint owns its stand-ins
            raise RuntimeError("TLS connection is gone")
        if _STANDING not in endpoint.__dict__:
            # Bound by someone before it was removed: the class's method, as if unbound.
            return getattr(type(endpoint), name)(endpoint, *args, **kwargs)
        return run(endpoint, name, args, kwargs)

    return method


def stop(endpoint: SSLEndpoint) -> None:
    """Put the class's methods back in charge: the handshake is over (one dict look-up)."""
    state = endpoint.__dict__
    names = state.pop(_STANDING, None)
    if names is not None:
        for name in names:
            state.pop(name, None)


def established(endpoint: SSLEndpoint) -> bool:
    """Whether the handshake has completed (OpenSSL knows a version only then)."""
    tls: Any = getattr(endpoint, "_sslobj", None)
    return tls is not None and tls.version() is not None


def asked_for_data(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call could only return empty because the peer closed: a read of 1+ bytes."""
    if name != "read":
        return False
    length = args[0] if args else kwargs.get("len", 1)
    return not isinstance(length, int) or length != 0
