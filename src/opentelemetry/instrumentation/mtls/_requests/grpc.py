"""The client's identity on gRPC server spans, from each call's own auth context.

grpcio's TLS is its own (BoringSSL inside gRPC core): no Python handshake happens, so
there is no handshake span to link to, and no failure or duration of ours. What gRPC core
verified is on every call instead: ``context.auth_context()`` holds the peer's leaf
(``x509_pem_cert``), its CN and SANs, the TLS version and whether the session was resumed.
It comes from the channel's security context; no metadata a client sends can put a value
there, so the identity is the connection's own, as it is for every other server here.

An interceptor of ours is added, last, to every server made from now on (``grpc.server``
and ``grpc.aio.server``), so it runs inside whatever interceptor made the server span
(opentelemetry-instrumentation-grpc puts its own first): before the servicer, it puts the
call's identity on the current span and applies the identity policy. It changes nothing
of the call: the handler it hands on is the servicer's, wrapped in a function of the same
kind (a coroutine for a coroutine, an async generator for an async generator), because
grpc.aio chooses how to run a handler by its kind.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.semconv._incubating.attributes import tls_attributes as tls

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._requests import identity as _identity
from opentelemetry.instrumentation.mtls._requests.enrichment import enrich
from opentelemetry.instrumentation.mtls._requests.identity import (
    SOURCE_GRPC_AUTH_CONTEXT,
    Attributes,
    ClientIdentity,
    Resolution,
    resolve_verified,
)
from opentelemetry.instrumentation.mtls._ssl.values import PROTOCOL_VERSIONS
from opentelemetry.instrumentation.mtls._x509 import auth_context_certificate

AuthContext = Mapping[str, Sequence[bytes]]
"""What ``ServicerContext.auth_context()`` returns: property name -> values."""
Behavior = Callable[[Any, Any], Any]
"""A method handler's behaviour: ``(request or request iterator, servicer context)``."""

_TLS: Final = b"ssl"
"""``transport_security_type`` of a call that came over TLS."""
_HANDLER_KINDS: Final = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def session_attributes(auth_context: AuthContext) -> Attributes | None:
    """Return what a call's auth context says of its TLS session; None when not over TLS."""
    if _TLS not in auth_context.get("transport_security_type", ()):
        return None
    attributes: Attributes = {}
    version = auth_context.get("ssl_tls_version")
    if version:
        bare = PROTOCOL_VERSIONS.get(version[0].decode("ascii", "replace"))
        if bare is not None:
            attributes[tls.TLS_PROTOCOL_VERSION] = bare
    resumed = auth_context.get("ssl_session_reused")
    if resumed:
        attributes[tls.TLS_RESUMED] = resumed[0] == b"true"
    return attributes


def resolve_call(context: Any) -> Resolution:
    """Resolve a gRPC call's identity from its servicer context's auth context."""
    auth_context: AuthContext = context.auth_context()
    session = session_attributes(auth_context)
    leaf = auth_context_certificate(auth_context) if session is not None else None
    return resolve_verified(leaf, session, SOURCE_GRPC_AUTH_CONTEXT, _identity.SETTINGS)


def client_identity(context: Any) -> ClientIdentity | None:
    """Return the identity of the client certificate of a gRPC call, if it had one."""
    try:
        return resolve_call(context).identity
    except Exception as exc:
        _failsafe.report("reading a gRPC call's identity", exc)
        return None


def _enrich(context: Any) -> None:
    """Put the call's identity on the current span: the server span, when one was made."""
    if not is_instrumentation_enabled():
        return
    try:
        enrich(trace.get_current_span(), resolve_call(context), _identity.SETTINGS)
    except Exception as exc:
        _failsafe.report("enriching a gRPC call", exc)


def _wrap_sync(behavior: Behavior) -> Behavior:
    def identified(request: Any, context: Any) -> Any:
        _enrich(context)
        return behavior(request, context)

    return identified


def _wrap_coroutine(behavior: Behavior) -> Behavior:
    async def identified(request: Any, context: Any) -> Any:
        _enrich(context)
        return await behavior(request, context)

    return identified


def _wrap_async_generator(behavior: Behavior) -> Behavior:
    async def identified(request: Any, context: Any) -> AsyncIterator[Any]:
        _enrich(context)
        async for response in behavior(request, context):
            yield response

    return identified


def _wrap_behavior(behavior: Behavior) -> Behavior:
    # The same tests grpc.aio makes to choose how to run a handler (a sync server runs
    # every handler as a plain function).
    if inspect.iscoroutinefunction(behavior):
        return _wrap_coroutine(behavior)
    if inspect.isasyncgenfunction(behavior):
        return _wrap_async_generator(behavior)
    return _wrap_sync(behavior)


def _wrap_handler(handler: Any) -> Any:
    """Return a method handler like ``handler`` whose behaviour enriches the call first."""
    import grpc  # noqa: PLC0415  # only once a server exists, so grpc is there

    if handler is None:
        return None  # an unknown method: gRPC answers UNIMPLEMENTED itself
    for kind in _HANDLER_KINDS:
        behavior = getattr(handler, kind, None)
        if behavior is not None:
            factory = getattr(grpc, f"{kind}_rpc_method_handler")
            return factory(
                _wrap_behavior(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _server(make_interceptor: Callable[[], Any]) -> Callable[[Method], Method]:
    """Return a patch of ``grpc.server`` or ``grpc.aio.server`` that appends our interceptor."""

    def patch(original: Method) -> Method:
        def server(*args: Any, **kwargs: Any) -> Any:
            try:
                args, kwargs = _with_interceptor(args, kwargs, make_interceptor())
            except Exception as exc:
                _failsafe.report("adding the identity interceptor to a gRPC server", exc)
            return original(*args, **kwargs)

        return server

    return patch


# Position of ``interceptors`` among the arguments of grpc.server and grpc.aio.server.
_INTERCEPTORS_POSITION: Final = 2


def _with_interceptor(
    args: tuple[Any, ...], kwargs: dict[str, Any], interceptor: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if len(args) > _INTERCEPTORS_POSITION:
        given = args[_INTERCEPTORS_POSITION]
    else:
        given = kwargs.get("interceptors")
    interceptors = list(given or ())
    if any(type(existing) is type(interceptor) for existing in interceptors):
        return args, kwargs  # a server function patched twice: one of ours is enough
    # Last: so that the interceptors before it, the server span's among them, run first.
    interceptors.append(interceptor)
    if len(args) > _INTERCEPTORS_POSITION:
        position = _INTERCEPTORS_POSITION
        return (*args[:position], interceptors, *args[position + 1 :]), kwargs
    return args, {**kwargs, "interceptors": interceptors}


def install_grpc_interceptor(patches: Patches) -> None:
    """Add our interceptor to every grpcio server made from now on; identify its contexts."""
    patches.when_imported("grpc", lambda grpc: _install(grpc, patches))


def _install(grpc: ModuleType, patches: Patches) -> None:
    aio = grpc.aio  # grpc imports it itself, at the end of its own import

    class IdentityInterceptor(grpc.ServerInterceptor):  # type: ignore[misc,name-defined]
        """Put each call's identity on the current span before its servicer runs."""

        def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
            return _wrap_handler(continuation(handler_call_details))

    class AioIdentityInterceptor(aio.ServerInterceptor):  # type: ignore[misc,name-defined]
        """The same for grpc.aio servers: their interceptors must derive from this class."""

        async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
            return _wrap_handler(await continuation(handler_call_details))

    patches.replace(grpc, "server", _server(IdentityInterceptor))
    patches.replace(aio, "server", _server(AioIdentityInterceptor))
    _identity.client_identity.register(grpc.ServicerContext, client_identity)
    # grpc.aio's servicer context is cygrpc's own class, neither derived from nor
    # registered with grpc.aio.ServicerContext: named by the class servers hand over.
    aio_context = getattr(grpc._cython.cygrpc, "_ServicerContext", None)
    if isinstance(aio_context, type):
        _identity.client_identity.register(aio_context, client_identity)
