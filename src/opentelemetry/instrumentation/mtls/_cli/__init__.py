"""``otel-mtls``: the command-line tools (``demo``, ``inspect``, ``pki``); see :mod:`.main`."""
