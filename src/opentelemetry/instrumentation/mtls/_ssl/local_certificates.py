"""The certificates this process presents, learnt as its SSL contexts load them.

Python's ``ssl`` gives no way to read a context's own certificate back, so the file that
``load_cert_chain`` was given is read again, after the host's call has returned. Only a
regular file is read, opened without blocking and bounded in size: a FIFO, a socket or a
device handed to ``load_cert_chain`` was a one-shot source the host has consumed, and
reopening it could block the host forever.
"""

from __future__ import annotations

import os
import ssl
import stat
import weakref
from collections.abc import Callable
from typing import Any, Final

from opentelemetry.instrumentation.mtls import _failsafe
from opentelemetry.instrumentation.mtls._patch import Method, Patches
from opentelemetry.instrumentation.mtls._x509 import (
    CertificateInfo,
    der_to_pem,
    first_pem_certificate,
    parse_certificate,
)

MAX_CERTIFICATE_FILE: Final = 1024 * 1024
"""Largest certificate file read back, in bytes; a certificate chain is a few KiB."""

OnLoaded = Callable[[CertificateInfo], None]
"""Told of each certificate a context loaded to present (for its expiry)."""


def read_regular_file(path: Any, limit: int = MAX_CERTIFICATE_FILE) -> bytes | None:
    """Return a regular file's content, or None for anything else or anything larger."""
    if not isinstance(path, str | bytes | os.PathLike):
        return None
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_size > limit:
            return None
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            return file.read(limit + 1)[:limit]
    finally:
        os.close(descriptor)


class LocalCertificates:
    """The leaf certificate each SSL context presents, as PEM, for the ASGI TLS extension."""

    def __init__(self, on_loaded: OnLoaded) -> None:
        self._on_loaded = on_loaded
        self._pem: weakref.WeakKeyDictionary[ssl.SSLContext, str] = weakref.WeakKeyDictionary()

    def install(self, patches: Patches) -> None:
        """Follow ``SSLContext.load_cert_chain`` from now on."""
        patches.replace(ssl.SSLContext, "load_cert_chain", self._load_cert_chain)

    def pem(self, context: ssl.SSLContext) -> str | None:
        """Return the PEM leaf that ``context`` presents, if it was loaded while instrumented."""
        return self._pem.get(context)

    def _load_cert_chain(self, original: Method) -> Method:
        note = self._note

        def load_cert_chain(
            self: ssl.SSLContext, certfile: Any, keyfile: Any = None, password: Any = None
        ) -> None:
            original(self, certfile, keyfile, password)
            note(self, certfile)

        return load_cert_chain

    def _note(self, context: ssl.SSLContext, certfile: Any) -> None:
        try:
            content = read_regular_file(certfile)
            der = first_pem_certificate(content) if content is not None else None
            if der is not None:
                self._on_loaded(parse_certificate(der))
                self._pem[context] = der_to_pem(der)
        except Exception as exc:
            _failsafe.report("reading a loaded certificate", exc)
