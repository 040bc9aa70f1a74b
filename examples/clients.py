"""Four httpx clients against the frontend, one line each: what the client saw.

``python examples/clients.py [URL]``: URL defaults to ``$FRONTEND_URL`` or
``https://localhost:8443/order``; the certificates are read from ``$PKI_DIR`` (default
``examples/certs``). The same clients as ``clients.sh``, in Python. Run it under
``opentelemetry-instrument`` too, and the client side has spans: a TLS 1.3 client only
learns that its certificate was rejected on its first read, which the instrumentation
records as a ``tls.peer_rejected`` event.
"""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path

import httpx

PKI_DIR = Path(os.environ.get("PKI_DIR", "examples/certs"))
CLIENTS: dict[str, str | None] = {
    "good certificate": "client",
    "wrong CA": "wrong-ca",
    "expired": "expired",
    "no certificate": None,
}


def tls_context(name: str | None) -> ssl.SSLContext:
    """Trust the Demo CA; present ``name``'s certificate, if any."""
    context = ssl.create_default_context(cafile=PKI_DIR / "ca.crt")
    if name is not None:
        context.load_cert_chain(PKI_DIR / f"{name}.crt", PKI_DIR / f"{name}.key")
    return context


def call(url: str, certificate: str | None) -> str:
    """Send one request; say what came back, or how the connection failed."""
    try:
        with httpx.Client(verify=tls_context(certificate), timeout=10, trust_env=False) as client:
            response = client.get(url)
    except httpx.TransportError as exc:
        return f"rejected ({type(exc).__name__}: {exc})"
    return f"{response.status_code} {response.text}"


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else ""
    url = url or os.environ.get("FRONTEND_URL", "https://localhost:8443/order")
    for name, certificate in CLIENTS.items():
        print(f"{name + ':':17} {call(url, certificate)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
