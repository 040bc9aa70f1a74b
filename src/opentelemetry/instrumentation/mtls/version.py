"""Version of opentelemetry-instrumentation-mtls."""

__version__ = "0.1.0"
