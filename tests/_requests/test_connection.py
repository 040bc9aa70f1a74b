"""How server connections are followed and let go, and what is not a rejection.

Cases a second read of the code found: a protocol factory that hands out one protocol
twice, a protocol that hands its transport to another (uvicorn's WebSocket upgrade), a
client that closes its own connection, and ``recv(0)``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import threading
from typing import Any

import pytest

from conftest import PKI
from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._requests.connection import live_connections
from opentelemetry.instrumentation.mtls._signals.audit import AUDIT_LOGGER_NAME
from tlsrun import TIMEOUT

pytestmark = pytest.mark.usefixtures("instrumented")


def serve_and_call(pki: PKI, factory: Any, calls: int, payload: bytes = b"") -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            factory, "127.0.0.1", 0, ssl=pki.server_context()
        )
        port = server.sockets[0].getsockname()[1]
        for _ in range(calls):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=pki.client_context(pki.client), server_hostname="localhost"
            )
            if payload:
                writer.write(payload)
            await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.1)
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_one_protocol_handed_out_twice_is_wrapped_once(pki: PKI) -> None:
    class Closing(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            transport.close()

    shared = Closing()
    serve_and_call(pki, lambda: shared, calls=30)
    assert "connection_lost" not in vars(shared)  # our stand-ins leave with the connection
    gc.collect()
    assert live_connections() == 0


def test_a_transport_handed_to_another_protocol_still_leaves_the_registry(pki: PKI) -> None:
    class WebSocket(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.close()

    class Http(asyncio.Protocol):  # what uvicorn does on an upgrade
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            upgraded = WebSocket()
            upgraded.connection_made(self.transport)
            self.transport.set_protocol(upgraded)
            upgraded.data_received(data)

    serve_and_call(pki, Http, calls=10, payload=b"GET / upgrade")
    gc.collect()
    assert live_connections() == 0


def test_a_live_connection_is_followed_until_it_ends(pki: PKI) -> None:
    """The positive control of the two tests above: what they count does count."""
    seen: list[int] = []

    class Idle(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            seen.append(live_connections())
            self.transport.write(data)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            Idle, "127.0.0.1", 0, ssl=pki.server_context()
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=pki.client_context(pki.client), server_hostname="localhost"
        )
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"ping"
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.1)
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert seen == [1]
    gc.collect()
    assert live_connections() == 0


def test_closing_our_own_connection_is_no_rejection(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=pki.server_context())
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=pki.client_context(pki.client), server_hostname="localhost"
        )
        writer.close()  # before reading anything: our decision, not the server's
        await writer.wait_closed()
        await asyncio.sleep(0.1)
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER_NAME):
        asyncio.run(main())
    assert not [r for r in caplog.records if getattr(r, "event.name", "") == "tls.peer_rejected"]


def test_recv_zero_is_no_rejection(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    ctx = pki.server_context()
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello")

        thread = threading.Thread(target=serve)
        thread.start()
        with (
            caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER_NAME),
            socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw,
            pki.client_context(pki.client).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.recv(0) == b""
            assert tls.recv(5) == b"hello"
        thread.join(TIMEOUT)
    assert not [r for r in caplog.records if getattr(r, "event.name", "") == "tls.peer_rejected"]


def test_our_failure_reports_stay_bounded() -> None:
    _failsafe.reset()
    try:
        for i in range(1000):
            _failsafe.report("a test", ValueError(f"message {i} naming 10.0.0.{i % 250}"))
        assert _failsafe.reported() == _failsafe.MAX_DISTINCT
    finally:
        _failsafe.reset()
