"""The client's identity on aiohttp server requests: span attributes, a link, ``client_identity``.

A request's connection is its own transport, ``request.transport``, which aiohttp set
when the connection was made: whatever ``request.remote`` or a ``Forwarded`` or
``X-Forwarded-For`` header says plays no part. (aiohttp's protocol has ``__slots__``, so
the connection context of :mod:`.connection` cannot shadow its callbacks; the transport
is read instead, and its :class:`.Connection` built once per connection.) A request's
identity is resolved once, when it first reaches us, and kept in the request.

A middleware of ours is appended to every ``Application`` made from now on. Last, so that
it runs inside the middleware that made the server span (opentelemetry-instrumentation-
aiohttp-server puts its own first, and so do most): the span current when it runs, the one
current when the handler runs, gets the identity and the link. It only observes, like
the zero-code ASGI hook: the request goes on unchanged.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._requests import identity as _identity
from opentelemetry.instrumentation.mtls._requests.connection import CURRENT, Connection, Describe
from opentelemetry.instrumentation.mtls._requests.enrichment import enrich
from opentelemetry.instrumentation.mtls._requests.identity import (
    ClientIdentity,
    Resolution,
    resolve,
)

if TYPE_CHECKING:
    from aiohttp import web

Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]

_NAME: Final = "otel_mtls_resolution"


_describe: Describe | None = None
_connections: weakref.WeakKeyDictionary[Any, Connection] = weakref.WeakKeyDictionary()
"""Each connection's :class:`.Connection`, by its SSL object (or plaintext transport)."""


def configure(describe: Describe | None) -> None:
    """Say how connections are built from transports (``MTLSInstrumentor`` does, and undoes)."""
    global _describe  # noqa: PLW0603
    _describe = describe
    _connections.clear()


def connection_of(request: web.BaseRequest) -> Connection | None:
    """Return the connection a request arrived on, from the transport aiohttp gave it."""
    current = CURRENT.get()
    describe = _describe
    transport = request.transport
    if current is not None or describe is None or transport is None:
        return current
    key = transport.get_extra_info("ssl_object") or transport
    try:
        connection = _connections.get(key)
    except TypeError:  # a transport without weak references: described on each request
        return describe(transport)
    if connection is None:
        connection = describe(transport)
        if connection is not None:
            _connections[key] = connection
    return connection


def client_identity(request: web.BaseRequest) -> ClientIdentity | None:
    """Return the identity of the client certificate of an aiohttp request, if it had one."""
    try:
        return resolution_of(request).identity
    except Exception as exc:
        _failsafe.report("reading a request's identity", exc)
        return None


def resolution_of(request: web.BaseRequest) -> Resolution:
    """Return a request's resolution, resolving it now if this is the first to ask."""
    key = _key()
    resolution: Resolution | None = request.get(key)
    if resolution is not None:
        return resolution
    settings = _identity.SETTINGS
    wanted = settings.identity_header_names
    headers: dict[bytes, bytes] = {}
    for raw_name, value in request.raw_headers:
        name = raw_name.lower()
        if name in wanted:
            # Repeated lines combine as HTTP combines them: a list, or a malformed value.
            headers[name] = headers[name] + b"," + value if name in headers else value
    resolution = resolve(connection_of(request), headers, None, settings)
    request[key] = resolution
    return resolution


async def identity_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Put the request's identity on the current span, then hand the request on unchanged."""
    if is_instrumentation_enabled():
        try:
            enrich(trace.get_current_span(), resolution_of(request), _identity.SETTINGS)
        except Exception as exc:
            _failsafe.report("enriching a request", exc)
    return await handler(request)


identity_middleware.__middleware_version__ = 1  # type: ignore[attr-defined]  # new-style


@functools.cache
def _key() -> Any:
    """Where a request keeps its resolution: a ``web.RequestKey`` (aiohttp 3.12+), else a str."""
    from aiohttp import web  # noqa: PLC0415  # imported already: a request is in hand

    if getattr(web, "RequestKey", None) is None:
        return _NAME
    # RequestKey names itself after the module whose top-level code makes it, found by
    # walking up the stack to a "<module>" frame (aiohttp/helpers.py): a request handled
    # on a thread or a task has none, so the key is made by top-level code of ours.
    namespace: dict[str, Any] = {"__name__": __name__, "web": web, "Resolution": Resolution}
    exec(f"key = web.RequestKey({_NAME!r}, Resolution)", namespace)
    return namespace["key"]


def _application_init(original: Method) -> Method:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            middlewares = list(kwargs.get("middlewares", ()))
            if identity_middleware not in middlewares:
                middlewares.append(identity_middleware)
            kwargs["middlewares"] = middlewares
        except Exception as exc:
            _failsafe.report("adding the identity middleware to an aiohttp application", exc)
        original(self, *args, **kwargs)

    return __init__


def install_aiohttp_middleware(patches: Patches) -> None:
    """Add our middleware to every aiohttp application made from now on."""

    def apply(web_app: ModuleType) -> None:
        from aiohttp import web_request  # noqa: PLC0415  # web_app's own import

        patches.replace(web_app.Application, "__init__", _application_init)
        _identity.client_identity.register(web_request.BaseRequest, client_identity)

    patches.when_imported("aiohttp.web_app", apply)
