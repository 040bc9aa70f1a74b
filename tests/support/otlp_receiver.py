"""A real OTLP receiver on loopback, for tests that run services in other processes.

It listens on two ephemeral ports: gRPC (the collector's ``TraceService``,
``MetricsService`` and ``LogsService``) and HTTP/protobuf (``POST /v1/traces``,
``/v1/metrics``, ``/v1/logs``), and stores every export request it decodes. What
reaches it went through the real SDK exporters' encoding and transport, as it would
reach a collector.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span

HOST = "127.0.0.1"


def value(any_value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a Python value (arrays as tuples)."""
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(value(v) for v in any_value.array_value.values)
    if kind == "kvlist_value":
        return attributes(any_value.kvlist_value.values)
    return getattr(any_value, kind)


def attributes(key_values: Iterable[KeyValue]) -> dict[str, Any]:
    """OTLP attributes as a dictionary."""
    return {kv.key: value(kv.value) for kv in key_values}


@dataclass(frozen=True)
class ReceivedSpan:
    """A span as received, with the ``service.name`` of its resource."""

    service: str
    name: str
    kind: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    status_code: int
    attributes: dict[str, Any]
    links: list[tuple[bytes, bytes]]
    """(trace id, span id) of each link."""


@dataclass(frozen=True)
class ReceivedLog:
    """A log record as received, with the ``service.name`` of its resource."""

    service: str
    event_name: str
    body: Any
    attributes: dict[str, Any]
    trace_id: bytes
    span_id: bytes


@dataclass
class OTLPReceiver:
    """Stores every OTLP export request it receives; thread-safe."""

    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    logs: list[logs_service_pb2.ExportLogsServiceRequest] = field(default_factory=list)
    grpc_port: int = 0
    http_port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def grpc_endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` with ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``."""
        return f"http://{HOST}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` with ``http/protobuf`` (``/v1/...`` added)."""
        return f"http://{HOST}:{self.http_port}"

    def store(self, request: Message) -> None:
        """Keep one decoded export request."""
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.traces.append(request)
            elif isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                self.metrics.append(request)
            elif isinstance(request, logs_service_pb2.ExportLogsServiceRequest):
                self.logs.append(request)

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        with self.lock:
            requests = list(self.traces)
        return [
            _span(_service(resource_spans.resource.attributes), span)
            for request in requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def metric_names(self, service: str | None = None) -> set[str]:
        """The names of every metric received so far (of one service, if given)."""
        with self.lock:
            requests = list(self.metrics)
        return {
            metric.name
            for request in requests
            for resource_metrics in request.resource_metrics
            if service is None or _service(resource_metrics.resource.attributes) == service
            for scope_metrics in resource_metrics.scope_metrics
            for metric in scope_metrics.metrics
        }

    def log_records(self) -> list[ReceivedLog]:
        """Every log record received so far."""
        with self.lock:
            requests = list(self.logs)
        return [
            _log(_service(resource_logs.resource.attributes), record)
            for request in requests
            for resource_logs in request.resource_logs
            for scope_logs in resource_logs.scope_logs
            for record in scope_logs.log_records
        ]


def _service(resource_attributes: Iterable[KeyValue]) -> str:
    return str(attributes(resource_attributes).get("service.name", ""))


def _span(service: str, span: Span) -> ReceivedSpan:
    return ReceivedSpan(
        service=service,
        name=span.name,
        kind=span.kind,
        trace_id=span.trace_id,
        span_id=span.span_id,
        parent_span_id=span.parent_span_id,
        status_code=span.status.code,
        attributes=attributes(span.attributes),
        links=[(link.trace_id, link.span_id) for link in span.links],
    )


def _log(service: str, record: LogRecord) -> ReceivedLog:
    return ReceivedLog(
        service=service,
        # LogRecord.event_name is OTLP 1.5+; older protos have no such field.
        event_name=getattr(record, "event_name", ""),
        body=value(record.body),
        attributes=attributes(record.attributes),
        trace_id=record.trace_id,
        span_id=record.span_id,
    )


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver.store(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self.receiver.store(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: Any
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        self.receiver.store(request)
        return logs_service_pb2.ExportLogsServiceResponse()


# OTLP/HTTP paths -> (request type, response type).
_HTTP_ROUTES: dict[str, tuple[type[Message], type[Message]]] = {
    "/v1/traces": (
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
    ),
    "/v1/metrics": (
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
    "/v1/logs": (
        logs_service_pb2.ExportLogsServiceRequest,
        logs_service_pb2.ExportLogsServiceResponse,
    ),
}


class _HTTPHandler(BaseHTTPRequestHandler):
    """OTLP/HTTP with binary protobuf bodies, optionally gzip-compressed."""

    receiver: OTLPReceiver
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporters' sessions expect

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        route = _HTTP_ROUTES.get(self.path)
        if route is None:
            self._reply(404, b"")
            return
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request_type, response_type = route
        request = request_type()
        request.ParseFromString(body)
        self.receiver.store(request)
        self._reply(200, response_type().SerializeToString())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests' output is not the place for an access log."""


@contextmanager
def otlp_receiver(grpc_port: int = 0, http_port: int = 0) -> Iterator[OTLPReceiver]:
    """Run a receiver on loopback (gRPC and HTTP) for the duration of the block.

    Ports default to ephemeral ones; 4317 and 4318 make it a stand-in for a collector.
    """
    receiver = OTLPReceiver()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver), grpc_server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
        _MetricsService(receiver), grpc_server
    )
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsService(receiver), grpc_server)
    receiver.grpc_port = grpc_server.add_insecure_port(f"{HOST}:{grpc_port}")
    grpc_server.start()

    handler = type("Handler", (_HTTPHandler,), {"receiver": receiver})
    http_server = ThreadingHTTPServer((HOST, http_port), handler)
    http_server.daemon_threads = True
    receiver.http_port = http_server.server_address[1]
    http_thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    http_thread.start()
    try:
        yield receiver
    finally:
        http_server.shutdown()
        http_server.server_close()
        http_thread.join(5)
        grpc_server.stop(grace=None).wait(5)
