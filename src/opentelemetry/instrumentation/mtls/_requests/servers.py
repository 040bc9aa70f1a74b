"""The servers that open each request for its server span, whichever instrumentation makes it.

A server calls its application once per request, in that request's own context: that
call is where a request is opened (:mod:`.server_spans`), before any middleware or
framework can start a span. Each server's application is wrapped where the server
loads it, once per worker process, so a forked or spawned worker wraps its own:

* uvicorn (``uvicorn``, ``--workers N``, and the gunicorn ``UvicornWorker`` of
  uvicorn-worker or of ``uvicorn.workers``): ``Config.load``;
* hypercorn: its ASGI wrapper, for the asyncio and trio workers alike;
* gunicorn's sync and gthread workers (WSGI) and its own ASGI worker: ``load_wsgi``;
* werkzeug's development server (``flask run --cert``, ``run_simple(ssl_context=...)``).

Each is patched when the application imports it, never imported by us.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._requests import asgi, server_spans, wsgi

_LOADERS: Final = (
    # (module, class, its method that loads the application, the attribute loaded, wrapper)
    ("hypercorn.app_wrappers", "ASGIWrapper", "__init__", "app", asgi.open_requests),
    ("gunicorn.workers.sync", "SyncWorker", "load_wsgi", "wsgi", wsgi.open_requests),
    ("gunicorn.workers.gthread", "ThreadWorker", "load_wsgi", "wsgi", wsgi.open_requests),
    ("gunicorn.workers.gasgi", "ASGIWorker", "load_wsgi", "asgi", asgi.open_requests),
    ("werkzeug.serving", "BaseWSGIServer", "__init__", "app", wsgi.open_requests),
)


def install(patches: Patches) -> None:
    """Wrap the application of every followed server loaded from now on."""
    patches.when_imported("uvicorn.config", functools.partial(_uvicorn, patches=patches))
    for module, owner, method, attribute, open_requests in _LOADERS:
        make = _wrapping(attribute, open_requests)
        patches.when_imported(module, functools.partial(_patch, patches, owner, method, make))


def _patch(
    patches: Patches, owner: str, method: str, make: Callable[[Method], Method], module: ModuleType
) -> None:
    patches.replace(getattr(module, owner), method, make)


def _wrapping(attribute: str, open_requests: Callable[[Any], Any]) -> Callable[[Method], Method]:
    """Make a patch of a method that loads an application into ``self.<attribute>``."""

    def make(original: Method) -> Method:
        def load(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            app = getattr(self, attribute, None)
            if app is not None:
                setattr(self, attribute, open_requests(app))
            return result

        return load

    return make


def _uvicorn(module: ModuleType, patches: Patches) -> None:
    def make(original: Method) -> Method:
        def load(self: Any) -> None:
            original(self)
            self.loaded_app = asgi.open_requests(self.loaded_app)
            if getattr(self, "reset_contextvars", False):
                server_spans.unreached(
                    "uvicorn with reset_contextvars",
                    "each request's task starts from an empty context, where its "
                    "connection is not known",
                )

        return load

    patches.replace(module.Config, "load", make)
