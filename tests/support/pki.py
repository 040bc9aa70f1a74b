"""The tests' PKI is the package's own throwaway PKI (``_pki``), re-exported here."""

from opentelemetry.instrumentation.mtls._cli.pki import Authority, Leaf, write

__all__ = ["Authority", "Leaf", "write"]
