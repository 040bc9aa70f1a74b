"""Where each HTTP client library hands a request its connection, hooked below its instrumentation.

Each hook reads the connection's ssl object from the library's own objects and passes it
to :func:`.clients.enrich_client_span` once the response has arrived. Each sits below
the code that the library's OpenTelemetry instrumentation wraps, so it runs inside that
instrumentation's client span, whichever was installed first and whatever hooks it was
given:

* **httpx**: every request goes through an httpcore connection pool, whose response
  carries the connection it came over in ``extensions["network_stream"]``, HTTP/1.1 and
  HTTP/2 alike; the stream's ``get_extra_info("ssl_object")`` is its ssl object.
  opentelemetry-instrumentation-httpx wraps httpx's transport (or one client's), which
  calls the pool.
* **requests and urllib3**: urllib3 reads every response with the ``getresponse()`` of
  the pooled ``HTTPConnection`` the request went out on, whose ``sock`` is its
  ``ssl.SSLSocket``. The instrumentations wrap ``Session.send`` and ``urlopen``. (A
  response hook would come too late: requests has read the body and given the
  connection back to the pool by then.)
* **aiohttp**: ``ClientResponse.start(connection)`` reads the response's head from the
  connection, whose transport's ``get_extra_info("ssl_object")`` is its ssl object.
  opentelemetry-instrumentation-aiohttp-client keeps its span current from
  ``on_request_start`` to ``on_request_end``, around ``start``; a trace config of ours
  would have to run before theirs ends the span.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, Final

from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._requests.clients import (
    ClientSettings,
    enrich_client_span,
)


def install(settings: ClientSettings, patches: Patches) -> None:
    """Wrap the hook point of each client library that is installed."""
    for module, install_library in _LIBRARIES:
        if importlib.util.find_spec(module) is not None:
            install_library(settings, patches)


def _install_httpx(settings: ClientSettings, patches: Patches) -> None:
    import httpcore  # noqa: PLC0415  # only where installed

    def sync(original: Method) -> Method:
        def handle_request(self: Any, request: Any) -> Any:
            response = original(self, request)
            enrich_client_span(settings, response, ssl_object_of_response)
            return response

        return handle_request

    def asynchronous(original: Method) -> Method:
        async def handle_async_request(self: Any, request: Any) -> Any:
            response = await original(self, request)
            enrich_client_span(settings, response, ssl_object_of_response)
            return response

        return handle_async_request

    patches.replace(httpcore.ConnectionPool, "handle_request", sync)
    patches.replace(httpcore.AsyncConnectionPool, "handle_async_request", asynchronous)


def ssl_object_of_response(response: Any) -> object:
    """Return the ssl object of the connection an httpcore (or httpx) response came over."""
    stream = response.extensions.get("network_stream")
    return stream.get_extra_info("ssl_object") if stream is not None else None


def _install_urllib3(settings: ClientSettings, patches: Patches) -> None:
    from urllib3.connection import HTTPConnection  # noqa: PLC0415  # only where installed

    def getresponse(original: Method) -> Method:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            # Read first: http.client lets go of the socket of a response that closes.
            sock = getattr(self, "sock", None)
            response = original(self, *args, **kwargs)
            enrich_client_span(settings, sock, _itself)
            return response

        return wrapper

    patches.replace(HTTPConnection, "getresponse", getresponse)  # HTTPS inherits it


def _itself(sock: object) -> object:
    return sock


def _install_aiohttp(settings: ClientSettings, patches: Patches) -> None:
    import aiohttp  # noqa: PLC0415  # only where installed

    def start(original: Method) -> Method:
        async def wrapper(self: Any, connection: Any, *args: Any, **kwargs: Any) -> Any:
            # Read first: a response without a body gives its connection back in start().
            transport = getattr(connection, "transport", None)
            response = await original(self, connection, *args, **kwargs)
            enrich_client_span(settings, transport, _ssl_object_of_transport)
            return response

        return wrapper

    patches.replace(aiohttp.ClientResponse, "start", start)


def _ssl_object_of_transport(transport: Any) -> object:
    return transport.get_extra_info("ssl_object") if transport is not None else None


_LIBRARIES: Final[tuple[tuple[str, Callable[[ClientSettings, Patches], None]], ...]] = (
    ("httpcore", _install_httpx),
    ("urllib3", _install_urllib3),
    ("aiohttp", _install_aiohttp),
)
"""Each library's module, looked for, and what wraps its hook point."""
