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
    """Nothing to set up; export the telemetry on the way out."""
    yield
    shutdown_telemetry()


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
