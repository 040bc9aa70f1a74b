"""A request's identity on its server span, whichever instrumentation starts that span.

A server integration that knows the connection a request arrived on opens the request
with :func:`begin` around its call into the application, and closes it with :func:`end`.
While it is open, the first span of kind ``SERVER`` that an OpenTelemetry SDK tracer
starts in the request's context gets the request's identity and the link to its
connection's handshake span: contrib's ASGI and WSGI middlewares, FastAPI's and
Starlette's own telemetry, the Django and Flask instrumentations, the application's own
``start_as_current_span(kind=SERVER)``. A ``SERVER`` span already current when the request
is opened gets them instead. Exactly one span per request: a nested ``SERVER`` span, or
one started after the request's identity went on a span, is left alone.

What it relies on: every span of the OpenTelemetry SDK starts in ``Tracer.start_span``,
whatever its tracer provider (the global one ``opentelemetry-instrument`` sets, one an
application or a framework makes later, one passed to a single instrumentation), so that
is the one method patched, and every other span pays a comparison of its kind. Spans of
another tracer implementation cannot be reached there: that is said once per process.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._requests import identity as _identity
from opentelemetry.instrumentation.mtls._requests.connection import CURRENT
from opentelemetry.instrumentation.mtls._requests.enrichment import enrich
from opentelemetry.instrumentation.mtls._requests.identity import Resolution

Resolve = Callable[..., Resolution | None]
"""Resolves the request's identity (:func:`.identity.resolve`), when a span first asks."""

_KIND_POSITION: Final = 2
"""Position of ``kind`` among ``Tracer.start_span``'s arguments after ``self``."""
_HOOKED_INSTRUMENTATIONS: Final = frozenset({"opentelemetry.instrumentation.asgi"})
"""Instrumentations whose spans our own hook reaches outside an opened request."""
_MAX_WARNINGS: Final = 16


class OpenRequest:
    """One request on a known connection, until one server span carries its identity."""

    __slots__ = ("_args", "_eager", "_resolution", "_resolve", "done")

    def __init__(self, resolve: Resolve, args: tuple[Any, ...], eager: bool) -> None:
        self._resolve: Resolve | None = resolve
        self._args = args
        self._resolution: Resolution | None = None
        self._eager = eager
        self.done = False
        """Whether a server span was given the identity (or its one chance has passed)."""

    def resolution(self) -> Resolution | None:
        """Return the request's resolution, resolving it on the first call."""
        resolve = self._resolve
        if resolve is not None:
            self._resolve = None
            self._resolution = resolve(*self._args)
            self._args = ()
        return self._resolution

    def enrich(self, span: Span) -> None:
        """Give ``span`` the request's identity, link and decisions; never raises."""
        self.done = True
        try:
            if not self._eager and not span.is_recording():
                # Nothing but a span would show this request's identity: it is resolved
                # if and when the application asks (client_identity()), never before.
                return
            resolution = self.resolution()
            if resolution is not None:
                enrich(span, resolution, _identity.SETTINGS)
        except Exception as exc:
            _failsafe.report("enriching a server span", exc)


def opened() -> Resolution | None:
    """Return the resolution of the request opened in this context, if one is.

    Middlewares copy what they pass on (hypercorn's ``ProxyFixMiddleware`` deep-copies
    the ASGI scope): whatever copy of the request a middleware is given, its identity is
    the one resolution of the request the server opened.
    """
    request = REQUEST.get()
    return request.resolution() if request is not None else None


REQUEST: Final[ContextVar[OpenRequest | None]] = ContextVar("otel_mtls_request", default=None)
"""The request whose application call is running in this context, once opened."""


def begin(
    resolve: Resolve, *args: Any, eager: bool = True, in_span: bool = True
) -> Token[OpenRequest | None]:
    """Open a request: the ``SERVER`` span current now, or else the next one, gets its identity.

    ``resolve(*args)`` runs once, when something first needs the identity; the caller keeps the
    token for :func:`end`, in the same context. ``eager`` says that the request has
    something to record even when its span is sampled out (an identity policy's verdict,
    a revocation check, identity headers to report): otherwise a request whose span does
    not record resolves nothing unless the application asks for its identity. For
    integrations whose server span starts before the request can be opened, opening it
    inside that span gives the span its identity at once; a server, which opens its
    requests before any middleware runs, says ``in_span=False`` and saves the look.
    """
    request = OpenRequest(resolve, args, eager)
    if in_span:
        span = trace.get_current_span()
        if getattr(span, "kind", None) is SpanKind.SERVER and span.is_recording():
            request.enrich(span)
    return REQUEST.set(request)


def end(token: Token[OpenRequest | None]) -> None:
    """Close the request :func:`begin` opened; say so once if no span could be given it."""
    request = REQUEST.get()
    REQUEST.reset(token)
    if request is not None and not request.done:
        _check_tracer_provider()


def unreached(maker: str, reason: str) -> None:
    """Warn, once per process for each ``maker``, that its server spans get no identity."""
    if maker in _warned or len(_warned) >= _MAX_WARNINGS:
        return
    _warned.add(maker)
    _failsafe.logger.warning(
        "mTLS identity could not be attached to server spans made by %s: %s", maker, reason
    )


_warned: set[str] = set()
_checked: object | None = None
"""The global tracer provider last checked, so that requests without a span ask once."""


def _check_tracer_provider() -> None:
    """Say so once if a request's identity went on no span because of the tracer provider."""
    global _checked  # noqa: PLW0603
    provider = trace.get_tracer_provider()
    if provider is _checked:
        return
    _checked = provider
    if not reachable(provider):
        kind = type(provider)
        unreached(
            f"{kind.__module__}.{kind.__qualname__}",
            "only the OpenTelemetry SDK's tracers are followed; put MTLSMiddleware "
            "inside the server span to enrich the span current there",
        )


def reachable(provider: object) -> bool:
    """Whether a tracer provider's spans start where we look: the SDK's, or the API's no-op."""
    module = type(provider).__module__
    if module.startswith("opentelemetry.trace"):  # the API's proxy and no-op: nothing records
        return True
    return _sdk_provider is not None and isinstance(provider, _sdk_provider)


_sdk_provider: type | None = None


def install(patches: Patches, tracer_provider: object | None) -> None:
    """Enrich the first ``SERVER`` span of every opened request that an SDK tracer starts."""
    global _sdk_provider  # noqa: PLW0603
    try:
        from opentelemetry.sdk import trace as sdk_trace  # noqa: PLC0415  # optional
    except ImportError:  # the API alone: no span records, nothing to enrich
        return
    _sdk_provider = sdk_trace.TracerProvider
    patches.replace(sdk_trace.Tracer, "start_span", _start_span)
    if tracer_provider is not None and not reachable(tracer_provider):
        kind = type(tracer_provider)
        unreached(
            f"{kind.__module__}.{kind.__qualname__}",
            "the tracer provider given to instrument() is not the OpenTelemetry SDK's",
        )


def _start_span(original: Method) -> Method:
    get, server = REQUEST.get, SpanKind.SERVER

    def start_span(self: Any, *args: Any, **kwargs: Any) -> Any:
        span = original(self, *args, **kwargs)
        kind = args[_KIND_POSITION] if len(args) > _KIND_POSITION else kwargs.get("kind")
        if kind is server:
            request = get()
            if request is None:
                _outside_request(self)
            elif not request.done:
                request.enrich(span)
        return span

    return start_span


def _outside_request(tracer: Any) -> None:
    """Warn about a ``SERVER`` span begun on a known connection outside any opened request."""
    try:
        if CURRENT.get() is None:
            return  # not a connection of ours: another instrumentation's span, left alone
        scope = getattr(tracer, "instrumentation_info", None)
        name = getattr(scope, "name", None) or "an unnamed tracer"
        if name not in _HOOKED_INSTRUMENTATIONS:
            unreached(name, "its server does not open requests for them (see docs/servers.md)")
    except Exception as exc:
        _failsafe.report("checking a server span", exc)


def reset_warnings() -> None:
    """Forget the warnings given, so that each is given again (for tests)."""
    global _checked  # noqa: PLW0603
    _warned.clear()
    _checked = None
