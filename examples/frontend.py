"""The frontend of the demo: an mTLS service that calls the backend over mTLS.

``GET /order`` asks the backend for its inventory with httpx, presenting
``frontend.crt`` and trusting ``ca.crt``, and returns both identities: the frontend's
caller, and the frontend as the backend saw it. Under ``opentelemetry-instrument`` the
httpx instrumentation propagates the trace context, so the frontend's request, its
client handshake and the backend's request share one trace.

``PKI_DIR`` (default ``examples/certs``) holds the certificates; ``BACKEND_URL``
(default ``https://localhost:8444``) is the backend.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from opentelemetry import metrics, trace
from opentelemetry._logs import get_logger_provider

from opentelemetry.instrumentation.mtls import client_identity

PKI_DIR = Path(os.environ.get("PKI_DIR", "examples/certs"))
BACKEND_URL = os.environ.get("BACKEND_URL", "https://localhost:8444")


def backend_tls_context() -> ssl.SSLContext:
    """Trust the Demo CA and present the frontend's certificate: mutual TLS."""
    context = ssl.create_default_context(cafile=PKI_DIR / "ca.crt")
    context.load_cert_chain(PKI_DIR / "frontend.crt", PKI_DIR / "frontend.key")
    return context


def shutdown_telemetry() -> None:
    """Shut the SDK down, exporting what it still holds, before uvicorn lets SIGTERM end us.

    uvicorn re-raises SIGTERM once it has shut down, and a process ended by SIGTERM runs
    no ``atexit`` handler: without this, the last spans, logs and metrics are lost.
    ``shutdown()``, not ``force_flush()``: the batch processors' flush ignores its timeout
    and runs until their queue is empty, which with no collector listening never comes,
    as the exporters' own warnings are log records to export too
    (opentelemetry-python#4688). Each last export retries for up to
    ``OTEL_EXPORTER_OTLP_TIMEOUT``.
    """
    for provider in (
        trace.get_tracer_provider(),
        metrics.get_meter_provider(),
        get_logger_provider(),
    ):
        shutdown = getattr(provider, "shutdown", None)  # the SDK's, not the API's
        if shutdown is not None:
            shutdown()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One pooled client for the process: a handshake per connection, not per request."""
    async with httpx.AsyncClient(
        base_url=BACKEND_URL, verify=backend_tls_context(), timeout=10
    ) as client:
        app.state.backend = client
        yield
    shutdown_telemetry()


app = FastAPI(title="frontend", lifespan=lifespan)


@app.get("/order")
async def order(request: Request) -> dict[str, Any]:
    """Return who called us, and who the backend says called it (us)."""
    identity = client_identity(request.scope)
    backend: httpx.AsyncClient = request.app.state.backend
    response = await backend.get("/inventory")
    response.raise_for_status()
    inventory = response.json()
    return {
        "service": "frontend",
        "caller": identity.spiffe_id if identity else None,
        "backend_saw": inventory["caller"],
        "items": inventory["items"],
    }
