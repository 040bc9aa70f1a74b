"""What a forked worker must not keep as its parent left it.

gunicorn forks its workers from a master that ``opentelemetry-instrument`` instrumented:
``fork()`` copies the memory but only the forking thread. A lock that another thread
held at that moment stays held in the child for ever; a thread pool's workers are gone
while the pool believes them idle; work the parent had in flight never finishes; a count
of the parent's handshakes in progress is the parent's. Each object holding such state
registers a method here that rebuilds it in the child, and one ``os.register_at_fork``
runs them all, in the child, before the worker runs anything else. What is merely data
(caches of parsed certificates and revocation answers, the rate limiter's counts) is
copied as it is: it is as true in the child as in the parent.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

from opentelemetry.instrumentation.mtls import _failsafe

_rebuilders: list[weakref.WeakMethod[Callable[[], None]]] = []


def rebuild_in_child(method: Callable[[], None]) -> None:
    """Call the bound ``method`` in every forked child for as long as its object lives."""
    _rebuilders[:] = [ref for ref in _rebuilders if ref() is not None]
    _rebuilders.append(weakref.WeakMethod(method))


def _after_fork_in_child() -> None:
    for ref in list(_rebuilders):
        method = ref()
        if method is None:
            continue
        try:
            method()
        except Exception as exc:
            _failsafe.report("rebuilding state in a forked worker", exc)


os.register_at_fork(after_in_child=_after_fork_in_child)
