"""Libraries this instrumentation patches: none outside the standard library.

The ``ssl`` module (and ``asyncio.sslproto``) ship with Python, so there is
nothing for ``opentelemetry-instrument`` to check before loading us.
"""

from __future__ import annotations

_instruments: tuple[str, ...] = ()
