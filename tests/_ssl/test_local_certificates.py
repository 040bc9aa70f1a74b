"""The certificates this process presents, read back without ever blocking the host."""

from __future__ import annotations

import os
import ssl
import threading

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from conftest import PKI, Instrumented
from opentelemetry.instrumentation.mtls import MTLSInstrumentor
from opentelemetry.instrumentation.mtls._ssl.local_certificates import read_regular_file


def time_left_subjects(reader: InMemoryMetricReader) -> set[str]:
    data = reader.get_metrics_data()
    names = set()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "tls.certificate.time_left":
                    for point in metric.data.data_points:
                        names.add(str(point.attributes.get("tls.certificate.subject.common_name")))
    return names


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def instrumented_with_metrics(
    instrumented: Instrumented, reader: InMemoryMetricReader
) -> MTLSInstrumentor:
    return instrumented(meter_provider=MeterProvider(metric_readers=[reader]))


def test_a_certificate_loaded_from_a_file_is_observed(
    pki: PKI, reader: InMemoryMetricReader, instrumented_with_metrics: MTLSInstrumentor
) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server.cert_path, pki.server.key_path)
    assert "server.test" in time_left_subjects(reader)


def test_load_cert_chain_from_a_fifo_never_blocks_the_host(
    pki: PKI,
    tmp_path: os.PathLike[str],
    reader: InMemoryMetricReader,
    instrumented_with_metrics: MTLSInstrumentor,
) -> None:
    leaf = pki.ca.issue("fifo-only")
    fifo = os.path.join(tmp_path, "chain.pem")
    os.mkfifo(fifo)
    with open(leaf.cert_path, "rb") as f:
        chain = f.read()

    def writer() -> None:  # a one-shot source: written once, then closed
        with open(fifo, "wb") as pipe:
            pipe.write(chain)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    done = threading.Event()

    def load() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(fifo, leaf.key_path)
        done.set()

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(10)
    assert done.is_set(), "load_cert_chain hung on the FIFO"
    # Not read back (a FIFO is not a regular file), so not observed: nothing is lost
    # but our metric for it, and the host never waited.
    assert "fifo-only" not in time_left_subjects(reader)


def test_only_regular_files_of_bounded_size_are_read(pki: PKI, tmp_path: os.PathLike[str]) -> None:
    assert read_regular_file(pki.server.cert_path)
    fifo = os.path.join(tmp_path, "pipe")
    os.mkfifo(fifo)
    assert read_regular_file(fifo) is None  # returns at once: no writer is awaited
    assert read_regular_file(pki.server.cert_path, limit=10) is None
    assert read_regular_file(None) is None
