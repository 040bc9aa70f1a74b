"""Write the demo PKI into a directory, as PEM files with stable names.

``python examples/make_pki.py examples/certs`` writes:

- ``ca.crt``: the "Demo CA" every service and client trusts;
- ``frontend.crt/.key``, ``backend.crt/.key``: server and client certificates of the two
  services (DNS:localhost, IP:127.0.0.1 and their SPIFFE IDs);
- ``client.crt/.key``: a good client, ``spiffe://demo.test/ns/shop/sa/web``;
- ``wrong-ca.crt/.key``: a client issued by a CA nobody trusts;
- ``expired.crt/.key``: a client of the Demo CA whose certificate expired.

The certificates come from the package's throwaway PKI (``_pki``), with the identities
of ``otel-mtls demo`` (``otel-mtls pki DIR`` writes an equivalent set). Keys are
unencrypted and readable by their owner only: this is for loopback demos.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
from pathlib import Path

from opentelemetry.instrumentation.mtls._cli.pki import Authority, Leaf

UTC = datetime.UTC
TRUST_DOMAIN = "spiffe://demo.test/ns/shop/sa"


def _move(leaf: Leaf, directory: Path, name: str) -> None:
    """Move a leaf's files out of ``_pki``'s scratch directory under their stable names."""
    key = directory / f"{name}.key"
    shutil.move(leaf.cert_path, directory / f"{name}.crt")
    shutil.move(leaf.key_path, key)
    key.chmod(0o600)


def make_pki(directory: Path) -> list[Path]:
    """Write the demo PKI into ``directory``; return the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = Authority("Demo CA", organization="demo")
    wrong_ca = Authority("Unknown CA", organization="elsewhere")
    long_ago = datetime.datetime(2024, 1, 1, tzinfo=UTC)

    def service(name: str) -> Leaf:
        """Server and client certificate of a service reached as localhost."""
        return ca.issue(
            name, dns=("localhost",), ips=("127.0.0.1",), uris=(f"{TRUST_DOMAIN}/{name}",)
        )

    leaves = {
        "frontend": service("frontend"),
        "backend": service("backend"),
        "client": ca.issue("web", uris=(f"{TRUST_DOMAIN}/web",)),
        "wrong-ca": wrong_ca.issue("intruder"),
        "expired": ca.issue(
            "retired-job",
            uris=(f"{TRUST_DOMAIN}/retired-job",),
            not_before=long_ago,
            not_after=long_ago + datetime.timedelta(days=30),
        ),
    }
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    for name, leaf in leaves.items():
        _move(leaf, directory, name)
    return sorted(directory.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where to write the PEM files")
    args = parser.parse_args()
    for path in make_pki(args.directory):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
