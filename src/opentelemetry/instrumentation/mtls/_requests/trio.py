"""The connection context for trio servers: hypercorn's trio worker, ``trio.serve_listeners``.

trio has no protocol callbacks to hold a connection while they run. A trio server serves
each connection from a task of its own, which completes the server handshake
(``SSLStream.do_handshake()``; hypercorn calls it before it reads a byte) and then starts
the connection's request tasks, and trio copies the starting task's context into each.
So once a server-side handshake has completed, :data:`~.connection.CURRENT` is set to its
connection in the task that completed it, for the rest of that task: every request task
it starts sees its own connection, as under asyncio.

This assumes what trio's own ``serve_listeners`` and hypercorn do: one task per
connection. A server that completed several handshakes in one task before starting their
request tasks would give them the last connection's; none known to us does.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._requests.connection import CURRENT, ServerConnections


class _StreamExtras:
    """A trio ``SSLStream`` as :meth:`ServerConnections.describe` reads an asyncio transport."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return getattr(self._stream, "_ssl_object", default)  # trio keeps it private
        sock = getattr(getattr(self._stream, "transport_stream", None), "socket", None)
        try:
            if name == "sockname" and sock is not None:
                return sock.getsockname()
            if name == "peername" and sock is not None:
                return sock.getpeername()
        except OSError:
            pass  # closed already: a connection with no addresses
        return default


def _do_handshake(connections: ServerConnections) -> Any:
    def patch(original: Method) -> Method:
        async def do_handshake(self: Any, *args: Any, **kwargs: Any) -> None:
            await original(self, *args, **kwargs)
            try:
                if self.server_side:
                    CURRENT.set(connections.describe(_StreamExtras(self)))
            except Exception as exc:
                _failsafe.report("following a trio server connection", exc)

        return do_handshake

    return patch


def install_trio_connections(connections: ServerConnections, patches: Patches) -> None:
    """Follow the connections of trio servers that complete their handshakes explicitly."""

    def apply(trio: ModuleType) -> None:
        patches.replace(trio.SSLStream, "do_handshake", _do_handshake(connections))

    patches.when_imported("trio", apply)
