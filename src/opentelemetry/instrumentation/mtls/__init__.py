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

from collections.abc import Collection, Mapping, MutableMapping
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from opentelemetry.instrumentation.mtls import _diagnostics
from opentelemetry.instrumentation.mtls._config import ExceptionSignals, MTLSConfig
from opentelemetry.instrumentation.mtls._patch import Patches
from opentelemetry.instrumentation.mtls._requests import (
    aiohttp,
    client_hooks,
    server_spans,
    servers,
    wsgi,
)
from opentelemetry.instrumentation.mtls._requests import identity as _identity
from opentelemetry.instrumentation.mtls._requests.asgi import (
    MTLSMiddleware,
    install_asgi_hook,
)
from opentelemetry.instrumentation.mtls._requests.asgi import client_identity as _scope_identity
from opentelemetry.instrumentation.mtls._requests.clients import ClientSettings
from opentelemetry.instrumentation.mtls._requests.connection import ServerConnections
from opentelemetry.instrumentation.mtls._requests.grpc import install_grpc_interceptor
from opentelemetry.instrumentation.mtls._requests.identity import (
    ClientIdentity,
    RequestSettings,
    client_identity,
)
from opentelemetry.instrumentation.mtls._requests.revocation import RevocationChecker
from opentelemetry.instrumentation.mtls._requests.trio import install_trio_connections
from opentelemetry.instrumentation.mtls._requests.wsgi import MTLSWSGIMiddleware
from opentelemetry.instrumentation.mtls._signals.handshake import HandshakeTelemetry
from opentelemetry.instrumentation.mtls._signals.providers import Providers
from opentelemetry.instrumentation.mtls._ssl.hooks import SSLHooks
from opentelemetry.instrumentation.mtls._ssl.local_certificates import LocalCertificates
from opentelemetry.instrumentation.mtls.package import _instruments
from opentelemetry.instrumentation.mtls.version import __version__

__all__ = [
    "ClientIdentity",
    "MTLSInstrumentor",
    "MTLSMiddleware",
    "MTLSWSGIMiddleware",
    "__version__",
    "client_identity",
]


def _mapping_identity(request: MutableMapping[str, Any]) -> ClientIdentity | None:
    # An ASGI scope and a WSGI environ are both mappings; only the environ has wsgi.version.
    if isinstance(request, dict) and "wsgi.version" in request:
        return wsgi.client_identity(request)
    return _scope_identity(request)


# An ASGI scope and a WSGI environ are mappings; aiohttp requests and gRPC contexts are
# registered when their libraries are imported.
client_identity.register(Mapping, _mapping_identity)

_SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"


class MTLSInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instrument TLS handshakes of Python's ``ssl`` module, and the requests they carry.

    ``instrument()`` takes ``tracer_provider``, ``meter_provider`` and the options of
    :class:`~opentelemetry.instrumentation.mtls._config.MTLSConfig`, each also an
    ``OTEL_PYTHON_MTLS_*`` environment variable, through the same parser.

    It wires the stages together and nothing else: the ssl hooks make handshake records,
    the telemetry turns them into spans, metrics and logs, the server connections carry
    them to requests, and the request integrations put them on server spans.
    """

    _hooks: SSLHooks | None = None
    _connections: ServerConnections | None = None
    _patches: Patches | None = None

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
        providers = Providers(kwargs.get("tracer_provider"), kwargs.get("meter_provider"))
        telemetry = HandshakeTelemetry(
            tracer, meter, config, providers, ExceptionSignals.from_environment()
        )
        patches = Patches()
        cls = type(self)
        cls._patches = patches
        cls._hooks = _install_ssl_hooks(telemetry, config)
        local = _install_local_certificates(telemetry, patches)
        cls._connections = _install_connections(config, local, patches)
        _install_requests(config, telemetry, patches)
        _install_server_spans(kwargs.get("tracer_provider"), cls._connections, patches)
        _install_clients(config, telemetry, patches)
        _diagnostics.watch(telemetry)

    def _uninstrument(self, **kwargs: Any) -> None:
        cls = type(self)
        _diagnostics.watch(None)
        _restore_requests()
        _restore_server_spans()
        if cls._patches is not None:
            cls._patches.restore()
            cls._patches = None
        if cls._connections is not None:
            cls._connections.close()
            cls._connections = None
        if cls._hooks is not None:
            cls._hooks.uninstall()
            cls._hooks = None


def _install_ssl_hooks(telemetry: HandshakeTelemetry, config: MTLSConfig) -> SSLHooks:
    """Make every handshake attempt a record, emitted as a span, metrics and logs."""
    hooks = SSLHooks(
        telemetry,
        capture_chain=config.capture_certificate_chain,
        expiry_warning_s=config.expiry_warning_days * 86400,
    )
    hooks.install()
    return hooks


def _install_local_certificates(
    telemetry: HandshakeTelemetry, patches: Patches
) -> LocalCertificates:
    """Follow the certificates this process presents: their expiry, the TLS extension's PEM."""
    local = LocalCertificates(telemetry.expiry.add_local)
    local.install(patches)
    return local


def _install_connections(
    config: MTLSConfig, local: LocalCertificates, patches: Patches
) -> ServerConnections:
    """Let server connections carry their handshake (and revocation check) to requests."""
    revocation = None
    if config.revocation != "off":
        revocation = RevocationChecker(
            crl_files=config.crl_files,
            crl_urls=config.crl_urls,
            timeout=config.revocation_timeout,
        )
    connections = ServerConnections(local, revocation, plaintext=bool(config.trusted_proxies))
    connections.install(patches)
    install_trio_connections(connections, patches)
    return connections


def _install_requests(config: MTLSConfig, telemetry: HandshakeTelemetry, patches: Patches) -> None:
    """Put the request settings in force; our hook, middleware, interceptor into servers."""
    _identity.configure(
        RequestSettings(
            trusted_proxies=config.trusted_proxies,
            proxy_header=config.proxy_header,
            nginx_header=config.nginx_cert_header.encode("latin-1"),
            rules=config.identity_rules(),
            enforce=config.enforce_identity_policy,
            redaction=telemetry.redaction,
            decisions=telemetry.instruments.identity_decisions,
            audit=telemetry.audit,
            revocation_enforce=config.revocation == "enforce",
            revocation_timeout=config.revocation_timeout,
            revocation_checks=telemetry.instruments.revocation_checks,
            full=config.request_attributes == "full",
        )
    )
    install_asgi_hook(patches)
    aiohttp.install_aiohttp_middleware(patches)
    install_grpc_interceptor(patches)


def _install_clients(config: MTLSConfig, telemetry: HandshakeTelemetry, patches: Patches) -> None:
    """Give each outgoing request's client span its server's identity: httpx, requests, aiohttp."""
    settings = ClientSettings(
        full=config.request_attributes == "full",
        redaction=telemetry.redaction,
        rules=config.server_identity_rules(),
        decisions=telemetry.instruments.identity_decisions,
        audit=telemetry.audit,
    )
    client_hooks.install(settings, patches)


def _install_server_spans(
    tracer_provider: object | None, connections: ServerConnections, patches: Patches
) -> None:
    """Give every request's server span its identity, whichever instrumentation made it."""
    server_spans.install(patches, tracer_provider)
    wsgi.configure(connections.describe)
    aiohttp.configure(connections.describe)
    servers.install(patches)


def _restore_server_spans() -> None:
    wsgi.configure(None)
    aiohttp.configure(None)


def _restore_requests() -> None:
    _identity.configure(RequestSettings())
