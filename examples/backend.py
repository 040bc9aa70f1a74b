"""The backend of the demo: an mTLS service that answers with who called it.

Run it under ``opentelemetry-instrument`` with uvicorn's TLS options (see README.md):
the mtls instrumentation records each TLS handshake and puts the caller's certificate
identity on the ``GET /inventory`` server span, with no code here beyond reading it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from opentelemetry import metrics, trace
from opentelemetry._logs import get_logger_provider

from opentelemetry.instrumentation.mtls import client_identity


def flush_telemetry() -> None:
    """Export what the SDK still holds, before uvicorn lets SIGTERM end the process.

    uvicorn re-raises SIGTERM once it has shut down, and a process ended by SIGTERM runs
    no ``atexit`` handler: the SDK's own flush at exit never happens, and the last spans,
    logs and metrics (up to ``OTEL_METRIC_EXPORT_INTERVAL``, 60 s by default) are lost.
    The lifespan's shutdown runs after the last request, so flushing there keeps them.
    """
    for provider in (
        trace.get_tracer_provider(),
        metrics.get_meter_provider(),
        get_logger_provider(),
    ):
        force_flush = getattr(provider, "force_flush", None)  # the SDK's, not the API's
        if force_flush is not None:
            force_flush(5000)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Nothing to set up; flush the telemetry on the way out."""
    yield
    flush_telemetry()


app = FastAPI(title="backend", lifespan=lifespan)


@app.get("/inventory")
async def inventory(request: Request) -> dict[str, Any]:
    """Return the stock, and the SPIFFE ID of the client certificate that asked for it."""
    identity = client_identity(request.scope)
    return {
        "service": "backend",
        "caller": identity.spiffe_id if identity else None,
        "caller_subject": identity.subject if identity else None,
        "items": {"apples": 3, "pears": 5},
    }
