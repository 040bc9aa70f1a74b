"""Real ASGI servers with mTLS on loopback, each in a thread of this process.

In-process so that their spans reach the tests' in-memory exporters; each server gets
a socket already bound to an ephemeral port, so tests never race for ports.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from conftest import PKI
from opentelemetry.instrumentation.mtls import client_identity
from opentelemetry.instrumentation.mtls._cli.demo import uvicorn_thread

START_TIMEOUT = 10.0


async def identity_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer with the subject of the request's client certificate."""
    identity = client_identity(scope)
    body = json.dumps({"subject": identity.subject if identity else None}).encode()
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def answer_json(scope: dict[str, Any], receive: Any, send: Any, body: bytes) -> None:
    """Answer an HTTP request with a JSON body, or send it over a WebSocket and close."""
    await receive()
    if scope["type"] == "websocket":
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": body.decode()})
        await send({"type": "websocket.close"})
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _listen() -> tuple[socket.socket, int]:
    sock = socket.create_server(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def uvicorn_server(
    app: Any,
    pki: PKI,
    *,
    loop: str = "asyncio",
    cert_reqs: ssl.VerifyMode = ssl.CERT_REQUIRED,
    tls: bool = True,
    sock: socket.socket | None = None,
    **options: Any,
) -> AbstractContextManager[int]:
    """Serve ``app`` with uvicorn (``loop``: asyncio or uvloop); yield the port.

    ``options`` go to ``uvicorn.Config`` (e.g. ``forwarded_allow_ips``); uvicorn's own
    defaults are kept otherwise, proxy headers from 127.0.0.1 included.
    """
    leaf, ca = (pki.server, pki.ca) if tls else (None, None)
    return uvicorn_thread(app, leaf, ca, loop=loop, cert_reqs=cert_reqs, sock=sock, **options)


@contextmanager
def hypercorn_server(app: Any, pki: PKI) -> Iterator[int]:
    """Serve ``app`` with hypercorn's asyncio worker (HTTP/1.1 and HTTP/2); yield the port.

    Behind hypercorn's own ``ProxyFixMiddleware``, which rewrites ``scope["client"]`` from
    ``X-Forwarded-For`` as uvicorn does by default: identities must not follow it.
    """
    from hypercorn.asyncio import serve
    from hypercorn.config import Config
    from hypercorn.middleware import ProxyFixMiddleware

    sock, port = _listen()
    config = Config()
    # hypercorn takes ownership of the descriptor (and closes it).
    config.bind = [f"fd://{sock.detach()}"]
    config.certfile = pki.server.cert_path
    config.keyfile = pki.server.key_path
    config.ca_certs = pki.ca.cert_path
    config.verify_mode = ssl.CERT_REQUIRED
    config.loglevel = "WARNING"
    stop = threading.Event()
    started = threading.Event()

    async def main() -> None:
        async def shutdown_trigger() -> None:
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

        proxied = ProxyFixMiddleware(app, mode="legacy", trusted_hops=1)
        await serve(proxied, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    if not started.wait(START_TIMEOUT):
        raise RuntimeError("hypercorn did not start")
    time.sleep(0.1)  # the listening socket is served once the trigger runs
    try:
        yield port
    finally:
        stop.set()
        thread.join(START_TIMEOUT)
