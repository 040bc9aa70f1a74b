"""Certificates whose time left is observed: this process's own, and recent peers'.

Certificate names follow the identity mode (plain, hashed, omitted), as everywhere.

Local certificates are captured where the process loads them
(``SSLContext.load_cert_chain``); peer certificates from successful handshakes. Peers
are bounded to the most recent N distinct certificates, so a flood of distinct client
certificates cannot grow memory. Each local certificate that comes within the warning
window gets one ``tls.certificate.expiring`` record, when it is loaded or, for a
long-running process, at the metric collection during which it enters the window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Observation

from opentelemetry.instrumentation.mtls import _forks
from opentelemetry.instrumentation.mtls._redaction import NO_REDACTION, OMIT, Redaction
from opentelemetry.instrumentation.mtls._signals import audit as _audit
from opentelemetry.instrumentation.mtls._x509 import CertificateInfo
from opentelemetry.instrumentation.mtls.attributes import (
    CERTIFICATE_ROLE_LOCAL,
    CERTIFICATE_ROLE_PEER,
    TLS_CERTIFICATE_ISSUER,
    TLS_CERTIFICATE_ROLE,
    TLS_CERTIFICATE_SERIAL_NUMBER,
    TLS_CERTIFICATE_SUBJECT_COMMON_NAME,
)


class CertificateExpiry:
    """The certificates that ``tls.certificate.time_left`` reports."""

    def __init__(
        self,
        audit: _audit.AuditLog,
        *,
        peer_limit: int,
        warning_window_s: float,
        redaction: Redaction = NO_REDACTION,
    ) -> None:
        self._audit = audit
        self._redaction = redaction
        self._peer_limit = peer_limit
        self._warning_window_s = warning_window_s
        self._local: dict[str, CertificateInfo] = {}
        self._peers: OrderedDict[str, CertificateInfo] = OrderedDict()
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        _forks.rebuild_in_child(self._forked)

    def _forked(self) -> None:
        self._lock = threading.Lock()  # no thread of the child holds it

    def add_local(self, info: CertificateInfo) -> None:
        """Observe a certificate this process presents; warn if it expires soon."""
        if info.not_after_timestamp is None:
            return
        with self._lock:
            self._local[info.sha256] = info
        self._warn_if_expiring(info, time.time())

    def add_peer(self, info: CertificateInfo) -> None:
        """Observe a peer's certificate, dropping the least recently seen past the bound."""
        if info.not_after_timestamp is None:
            return
        peers = self._peers
        with self._lock:
            if info.sha256 in peers:
                peers.move_to_end(info.sha256)
                return
            peers[info.sha256] = info
            if len(peers) > self._peer_limit:
                peers.popitem(last=False)

    def peer_count(self) -> int:
        """How many peer certificates are observed now."""
        return len(self._peers)

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        """Report seconds left (negative once expired) for every observed certificate."""
        now = time.time()
        with self._lock:
            local = list(self._local.values())
            peers = list(self._peers.values())
        for info in local:
            self._warn_if_expiring(info, now)
        observations: list[Observation] = []
        for role, infos in ((CERTIFICATE_ROLE_LOCAL, local), (CERTIFICATE_ROLE_PEER, peers)):
            if not infos:
                continue
            if self._redaction.mode == OMIT:
                # No attribute may tell certificates apart: report the one closest to expiry.
                soonest = min(info.not_after_timestamp or now for info in infos)
                observations.append(Observation(soonest - now, {TLS_CERTIFICATE_ROLE: role}))
                continue
            observations += [
                Observation(
                    (info.not_after_timestamp or now) - now,
                    _attributes(self._redaction.apply(info), role),
                )
                for info in infos
            ]
        return observations

    def _warn_if_expiring(self, info: CertificateInfo, now: float) -> None:
        left = (info.not_after_timestamp or now) - now
        if left > self._warning_window_s:
            return
        with self._lock:
            if info.sha256 in self._warned:
                return
            self._warned.add(info.sha256)
        days = abs(left) / 86400
        when = f"expires in {days:.1f} days" if left >= 0 else f"expired {days:.1f} days ago"
        shown = self._redaction.apply(info)
        name = shown.subject or f"with SHA-256 {info.sha256}"
        message = f"TLS certificate {name} {when} ({info.not_after})"
        fields = _attributes(shown, CERTIFICATE_ROLE_LOCAL)
        self._audit.write(logging.WARNING, _audit.CERTIFICATE_EXPIRING, lambda: (message, fields))


def _attributes(info: CertificateInfo, role: str) -> dict[str, str]:
    attrs = {TLS_CERTIFICATE_ROLE: role}
    if info.common_name is not None:
        attrs[TLS_CERTIFICATE_SUBJECT_COMMON_NAME] = info.common_name
    if info.issuer is not None:
        attrs[TLS_CERTIFICATE_ISSUER] = info.issuer
    if info.serial_number is not None:
        attrs[TLS_CERTIFICATE_SERIAL_NUMBER] = info.serial_number
    return attrs
