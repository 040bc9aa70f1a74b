"""Connections whose handshake a request may ask about, keyed by their address pair.

An ASGI scope names its connection only by ``server`` and ``client`` addresses, so that
pair is the key. A connection enters when the server's protocol is told it is made
(after its handshake) and leaves when it is lost; a new connection from the same
client port replaces the old entry, and removal only removes the entry it added, so a
request never sees a stale or foreign identity. The registry is bounded: past the
limit the oldest entries are dropped (their requests then carry no identity).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.instrumentation.mtls._redaction import DEFAULT_POLICY, IdentityPolicy
from opentelemetry.instrumentation.mtls._requests.revocation import RevocationResult
from opentelemetry.instrumentation.mtls._ssl.record import Address, HandshakeRecord, SSLEndpoint

MAX_CONNECTIONS: Final = 65536

Key = tuple[Address, Address]


@dataclass(slots=True, eq=False)
class Connection:
    """One TLS connection that requests arrive on, with what they need of its handshake."""

    record: HandshakeRecord
    ssl_object: weakref.ref[SSLEndpoint] | None = None
    """For reading the verified chain (Python 3.13+) when a request first asks."""
    server_certificate: str | None = None
    """PEM of the certificate the server presented, when the process loaded it."""
    policy: IdentityPolicy = DEFAULT_POLICY
    """How the client's identity may appear on request spans."""
    revocation: Future[RevocationResult] | None = None
    """The client certificate's revocation check, running off the handshake's path."""
    cache: dict[str, Any] = field(default_factory=dict)
    """What requests derive from the handshake, built on the first request."""


class ConnectionRegistry:
    """The live TLS connections of this process's servers."""

    def __init__(self, limit: int = MAX_CONNECTIONS) -> None:
        self._limit = limit
        self._entries: OrderedDict[Key, Connection] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: Key, connection: Connection) -> None:
        """Register a connection, replacing whatever held its addresses before."""
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = connection
            if len(self._entries) > self._limit:
                self._entries.popitem(last=False)

    def remove(self, key: Key, connection: Connection) -> None:
        """Forget a connection, unless a newer one already holds its addresses."""
        with self._lock:
            if self._entries.get(key) is connection:
                del self._entries[key]

    def get(self, key: Key) -> Connection | None:
        """Return the live connection with these addresses."""
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every connection."""
        with self._lock:
            self._entries.clear()


REGISTRY: Final = ConnectionRegistry()
"""The process's registry: filled by the ssl hooks, read by the ASGI middleware."""
