"""OpenTelemetry instrumentation for mutual TLS.

Every TLS handshake that Python's ``ssl`` module performs, as server or client, on a
blocking socket or under asyncio, uvloop or trio, becomes one span named
``TLS server handshake`` or ``TLS client handshake`` that says who the peer was
(``tls.client.*`` / ``tls.server.*``) and whether its certificate was accepted
(``tls.*.verify.result``, ``error.type``).

Usage
-----

.. code-block:: python

    import ssl

    from opentelemetry.instrumentation.mtls import MTLSInstrumentor

    MTLSInstrumentor().instrument()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # ... every handshake on this context (or any other) is now a span.

Or with no code at all: ``opentelemetry-instrument python app.py``.

API
---
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from opentelemetry.instrumentation.mtls._config import MTLSConfig
from opentelemetry.instrumentation.mtls._requests.asgi import (
    ClientIdentity,
    MTLSMiddleware,
    client_identity,
)
from opentelemetry.instrumentation.mtls._signals.handshake import HandshakeTelemetry
from opentelemetry.instrumentation.mtls._ssl.hooks import SSLHooks
from opentelemetry.instrumentation.mtls.package import _instruments
from opentelemetry.instrumentation.mtls.version import __version__

__all__ = [
    "ClientIdentity",
    "MTLSInstrumentor",
    "MTLSMiddleware",
    "__version__",
    "client_identity",
]

_SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"


class MTLSInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instrument TLS handshakes of Python's ``ssl`` module.

    ``instrument()`` takes ``tracer_provider`` and the options of
    :class:`~opentelemetry.instrumentation.mtls._config.MTLSConfig`
    (``capture_certificate``, ``capture_certificate_chain``), each also an
    ``OTEL_PYTHON_MTLS_*`` environment variable.
    """

    _hooks: SSLHooks | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        """Return the instrumented libraries: none outside the standard library."""
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        config = MTLSConfig.load(kwargs)
        tracer = trace.get_tracer(
            __name__,
            __version__,
            tracer_provider=kwargs.get("tracer_provider"),
            schema_url=_SCHEMA_URL,
        )
        meter = metrics.get_meter(
            __name__,
            __version__,
            meter_provider=kwargs.get("meter_provider"),
            schema_url=_SCHEMA_URL,
        )
        hooks = SSLHooks(HandshakeTelemetry(tracer, meter, config), config)
        hooks.install()
        type(self)._hooks = hooks

    def _uninstrument(self, **kwargs: Any) -> None:
        hooks = type(self)._hooks
        if hooks is not None:
            hooks.uninstall()
            type(self)._hooks = None
