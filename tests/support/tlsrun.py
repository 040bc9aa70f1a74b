"""Run one real TLS handshake over loopback, blocking or on an event loop; say what each side saw.

The outcome is compared between runs with and without the instrumentation, so it holds
exactly what the host sees: the exception's type and message, or what was negotiated.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

TIMEOUT = 10.0


@dataclass
class Outcome:
    """What the server and the client saw of one connection."""

    server: str = "not reached"
    client: str = "not reached"
    client_read: str = "not reached"
    notes: dict[str, Any] = field(default_factory=dict)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def blocking(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    server_hostname: str = "localhost",
) -> Outcome:
    """One handshake between blocking SSLSockets: the server in a thread."""
    outcome = Outcome()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    outcome.server = f"ok {tls.version()}"
                    tls.sendall(b"hello")
            except (OSError, ssl.SSLError) as exc:
                outcome.server = describe(exc)
            finally:
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw:
                try:
                    tls = client_ctx.wrap_socket(raw, server_hostname=server_hostname)
                except (OSError, ssl.SSLError) as exc:
                    outcome.client = describe(exc)
                else:
                    with tls:
                        outcome.client = f"ok {tls.version()}"
                        try:
                            outcome.client_read = repr(tls.recv(16))
                        except (OSError, ssl.SSLError) as exc:
                            outcome.client_read = describe(exc)
        finally:
            thread.join(TIMEOUT)
    return outcome


def run_loop(loop_name: str, main: Callable[[], Coroutine[Any, Any, Outcome]]) -> Outcome:
    """Run a coroutine on the stdlib asyncio loop or on uvloop."""
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(main())  # type: ignore[no-any-return]
    return asyncio.run(main())


def on_loop(
    loop_name: str,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    server_hostname: str = "localhost",
) -> Outcome:
    """One handshake between asyncio streams on the chosen loop."""

    async def main() -> Outcome:
        outcome = Outcome()
        served = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ssl_object = writer.get_extra_info("ssl_object")
            outcome.server = f"ok {ssl_object.version()}"
            writer.write(b"hello")
            await writer.drain()
            writer.close()
            served.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname
                ),
                TIMEOUT,
            )
        except (OSError, ssl.SSLError) as exc:
            outcome.client = describe(exc)
        else:
            outcome.client = f"ok {writer.get_extra_info('ssl_object').version()}"
            try:
                outcome.client_read = repr(await asyncio.wait_for(reader.read(16), TIMEOUT))
            except (OSError, ssl.SSLError) as exc:
                outcome.client_read = describe(exc)
            writer.close()
        # Let the server side finish its part (and its span) before the loop closes.
        for _ in range(25):
            if served.is_set():
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)
        return outcome

    return run_loop(loop_name, main)
