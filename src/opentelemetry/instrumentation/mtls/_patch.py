"""Replace methods on classes and put the identical originals back.

The two handshake methods are patched with plain functions rather than wrapt's
``FunctionWrapper``: measured on this project's benchmark machine, wrapt's binding and
call protocol cost about 0.5 µs a call against 0.02 µs for a plain function, and a
non-blocking handshake enters ``do_handshake`` several times per side. The rest of
wrapt's value (decorator introspection, signature adapters) is not needed for methods
we own the replacement of, so every patch here goes through one small mechanism.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import wrapt

from opentelemetry.instrumentation.mtls import _failsafe

Method = Callable[..., Any]


class Patches:
    """The methods this instrumentation replaced, to be restored in reverse order."""

    def __init__(self) -> None:
        # (owner, name, the owner's own attribute before patching, or None if inherited)
        self._applied: list[tuple[type | ModuleType, str, object | None]] = []
        self._open = True

    def replace(
        self, owner: type | ModuleType, name: str, make: Callable[[Method], Method]
    ) -> None:
        """Set ``owner.name`` (a method, or a module's function) to ``make(original)``."""
        own = vars(owner).get(name)
        original = getattr(owner, name)
        replacement = functools.wraps(original)(make(original))
        setattr(owner, name, replacement)
        self._applied.append((owner, name, own))

    def when_imported(self, module: str, apply: Callable[[ModuleType], None]) -> None:
        """Call ``apply(module)`` once ``module`` is imported (now, if it is already).

        Optional libraries are patched when the application imports them, never imported
        by us: aiohttp alone takes a quarter of a second to import, which a process that
        does not use it should not pay. Nothing is applied after :meth:`restore`, and a
        failure is reported, never raised into the application's import.
        """

        def hook(imported: ModuleType) -> None:
            if not self._open:
                return
            try:
                apply(imported)
            except Exception as exc:
                _failsafe.report(f"patching {module}", exc)

        wrapt.register_post_import_hook(hook, module)

    def restore(self) -> None:
        """Put back exactly what was there: the original object, or nothing if inherited."""
        self._open = False
        while self._applied:
            owner, name, own = self._applied.pop()
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
