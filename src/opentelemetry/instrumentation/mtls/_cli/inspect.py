"""``otel-mtls inspect HOST:PORT``: say whether a server accepts this client, and why not.

One connection, made as a Python client with the given credentials would make it,
with the instrumentation on; then a report of what the server presented and asked
for, what was verified, and whether the server accepted us:

* The server's whole chain and its CertificateRequest (was a client certificate asked
  for, which CAs are acceptable) are read from the handshake messages, through inspect's
  own message callback on its own context: OpenSSL gives Python the chain only after a
  successful handshake, and the CA names never.
* In TLS 1.3 the client's handshake ends before the server has judged the client's
  certificate, so inspect waits, without sending anything, until the server speaks:
  a session ticket or data (accepted), an alert or a hang-up (rejected), or nothing
  within ``--wait`` seconds (taken as accepted). The instrumentation records a
  rejection as the ``tls.peer_rejected`` event on inspect's span.
* Exit status: 0 when the connection is usable with the given credentials, 1 when the
  connection or TLS failed, 2 on a usage error. Ordinary mistakes are one line on
  stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import select
import socket
import ssl
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.instrumentation.mtls import MTLSInstrumentor
from opentelemetry.instrumentation.mtls._signals.handshake import CLIENT_SPAN_NAME
from opentelemetry.instrumentation.mtls._ssl import errors as _errors
from opentelemetry.instrumentation.mtls._ssl import handshake_messages as _messages
from opentelemetry.instrumentation.mtls._ssl.messages import ALERT, HANDSHAKE, SLOT
from opentelemetry.instrumentation.mtls._x509 import (
    CertificateInfo,
    first_pem_certificate,
    parse_certificate,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.util.types import Attributes

EXAMPLES: Final = """\
examples:
  otel-mtls inspect api.example.com:443 --ca ca.crt --cert client.crt --key client.key
      connect as this client; say whether the server accepts it, and if not, why
  otel-mtls inspect 10.0.0.5:8443 --ca ca.crt --servername api.internal
      an IP target, verified (and sent as SNI) under the name api.internal
  otel-mtls inspect localhost:8443 --insecure
      see the chain and the CertificateRequest of a server you cannot verify yet
  otel-mtls inspect localhost:8443 --ca ca.crt --json
      print the TLS client handshake span, as the instrumentation records it

exit status: 0 the connection is usable with these credentials; 1 the connection or
the TLS handshake failed, or the server rejected the client; 2 usage error.
"""

SPAN_NAME: Final = "otel-mtls inspect"
"""inspect's own span: the parent of the handshake span, and the holder of its
``tls.peer_rejected`` event (which goes to the span current after the handshake)."""

TIMEOUT: Final = 10.0
"""Seconds to connect and handshake, by default."""
WAIT: Final = 2.0
"""Seconds a TLS 1.3 server has, by default, to reject us after the handshake."""

USABLE: Final = 0
FAILED: Final = 1
USAGE: Final = 2

_TLS13: Final = 0x0304
_WRITE: Final = "write"


class UsageError(Exception):
    """A mistake in the command line or its files: exit 2, one line."""


class ConnectError(Exception):
    """No TLS was attempted (refused, unreachable, unknown host, timeout): exit 1, one line."""


# -- what the handshake showed -------------------------------------------------------------


class HandshakeMessages:
    """inspect's message callback: the server's chain and request, our certificate, alerts.

    Put in the C slot of ``_ssl._SSLContext`` (as ``_ssl/messages.py`` does), so it
    receives plain integers; the instrumentation keeps it and calls it after its own.
    """

    user_function = None  # what ssl.SSLContext._msg_callback's getter reads back

    def __init__(self) -> None:
        self.chain: list[bytes] | None = None
        """The server's certificates as presented (None: no Certificate message read)."""
        self.request: list[bytes] | None = None
        """The acceptable CA names of the server's CertificateRequest (None: none sent)."""
        self.sent_certificate: bool | None = None
        """Whether our Certificate message held one (None: we sent no Certificate)."""
        self.alert: str | None = None
        """The first fatal alert, e.g. ``unknown_ca``."""
        self.alert_sent = False
        self.ticket = False
        """Whether a TLS 1.3 server sent a session ticket: it accepted our Finished."""

    def attach(self, context: ssl.SSLContext) -> None:
        """Observe the connections made from ``context`` (nothing if this Python cannot)."""
        if SLOT is not None:
            SLOT.__set__(context, self)

    # CPython's positional signature (Modules/_ssl/debughelpers.c).
    def __call__(  # noqa: PLR0917
        self, conn: Any, direction: str, version: int, content_type: int, kind: int, data: bytes
    ) -> None:
        # An exception here would be raised later, from the TLS call: a diagnosis
        # goes on without what it could not read.
        with contextlib.suppress(Exception):
            self._note(direction, version, content_type, data)

    def _note(self, direction: str, version: int, content_type: int, data: bytes) -> None:
        tls13 = version == _TLS13
        if content_type == ALERT and len(data) == 2 and data[0] == 2 and self.alert is None:
            self.alert, self.alert_sent = _errors.alert_name(data[1]), direction == _WRITE
        if content_type != HANDSHAKE or not data:
            return
        if direction == _WRITE:
            if data[0] == _messages.CERTIFICATE:
                self.sent_certificate = bool(_messages.certificate_chain(data, tls13=tls13))
        elif data[0] == _messages.CERTIFICATE and self.chain is None:
            self.chain = _messages.certificate_chain(data, tls13=tls13)
        elif data[0] == _messages.CERTIFICATE_REQUEST:
            self.request = _messages.certificate_authorities(data, tls13=tls13) or []
        elif data[0] == _messages.NEW_SESSION_TICKET:
            self.ticket = True


@dataclass
class Outcome:
    """What one inspect connection came to."""

    handshake_error: BaseException | None = None
    after: str = ""
    """After a successful handshake: ``data``, ``ticket``, ``ticket_closed``, ``quiet``,
    ``closed``, ``rejected`` or ``tls12`` (no wait: the server judged us before its
    Finished)."""
    late_error: BaseException | None = None
    local: tuple[str, int] | None = None
    peer: tuple[str, int] | None = None
    spans: list[ReadableSpan] = field(default_factory=list)


# -- the command line ----------------------------------------------------------------------


def parse_target(target: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6); a missing or bad port is a usage error."""
    host, colon, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{target}: write an IPv6 address in brackets, e.g. [::1]:443")
    if not colon or not host:
        raise UsageError(f"{target}: expected HOST:PORT, e.g. example.com:443")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{target}: the port must be a number from 1 to 65535")
    return host, int(port)


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP literal: Python sends no SNI for one (RFC 6066 3)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def client_context(args: argparse.Namespace) -> ssl.SSLContext:
    """Build the context a Python client with these credentials would use."""
    if args.key and not args.cert:
        raise UsageError("--key needs --cert")
    for path in (args.ca, args.cert, args.key):
        if path and not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
    try:
        context = ssl.create_default_context(cafile=args.ca)
        if args.cert:
            context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        which = "--cert/--key" if args.cert else "--ca"
        raise UsageError(f"cannot load {which}: {_reason(exc)}") from None
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return getattr(exc, "strerror", None) or str(exc)


def own_certificate(path: str | None) -> CertificateInfo | None:
    """Parse the certificate we present: the first PEM block of ``--cert``."""
    if not path:
        return None
    with open(path, "rb") as f:
        der = first_pem_certificate(f.read())
    return parse_certificate(der) if der else None


# -- the connection ------------------------------------------------------------------------


def connect(
    host: str,
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None,
    *,
    timeout: float,
    wait: float,
) -> Outcome:
    """Connect, handshake, and (TLS 1.3) wait for the server's verdict on our certificate."""
    outcome = Outcome()
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise ConnectError(f"{host}: unknown host ({exc.strerror})") from None
    except TimeoutError:
        raise ConnectError(f"{host}:{port}: no answer within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise ConnectError(f"{host}:{port}: connection refused") from None
    except OSError as exc:
        raise ConnectError(f"{host}:{port}: {exc.strerror or exc}") from None
    with raw:
        outcome.local, outcome.peer = raw.getsockname()[:2], raw.getpeername()[:2]
        try:
            tls = context.wrap_socket(raw, server_hostname=server_hostname)
        except (OSError, ssl.SSLError) as exc:
            outcome.handshake_error = exc
            return outcome
        with tls:
            if tls.version() != "TLSv1.3":
                outcome.after = "tls12"
            else:
                _await_verdict(tls, outcome, wait)
    return outcome


def _await_verdict(tls: ssl.SSLSocket, outcome: Outcome, wait: float) -> None:
    """Read, sending nothing, until the TLS 1.3 server shows whether it accepted us.

    Non-blocking reads: a would-block read leaves the instrumentation's watch of the
    first read in place, so the read that sees the alert is the one it records.
    """
    observed = _observer(tls)
    tls.setblocking(False)
    deadline = time.monotonic() + wait
    while True:
        try:
            data = tls.recv(1)
        except ssl.SSLWantReadError:
            remaining = deadline - time.monotonic()
            if observed is not None and observed.ticket:
                outcome.after = "ticket"
            elif remaining <= 0:
                outcome.after = "quiet"
            else:
                select.select([tls], [], [], min(remaining, 0.05))
                continue
            return
        except (OSError, ssl.SSLError) as exc:
            outcome.after, outcome.late_error = "rejected", exc
            return
        if data:
            outcome.after = "data"
        else:
            # A ticket came first: the server accepted us, then its application hung up.
            outcome.after = (
                "ticket_closed" if observed is not None and observed.ticket else "closed"
            )
        return


def _observer(tls: ssl.SSLSocket) -> HandshakeMessages | None:
    """Find our message callback behind ``tls``, possibly behind the instrumentation's."""
    callback = SLOT.__get__(tls.context) if SLOT is not None else None
    while callback is not None and not isinstance(callback, HandshakeMessages):
        callback = getattr(callback, "host", None)
    return callback


def run(args: argparse.Namespace) -> int:
    """``otel-mtls inspect``: connect once, print the diagnosis, return the exit status."""
    try:
        host, port = parse_target(args.target)
        context = client_context(args)
        own = own_certificate(args.cert)
    except UsageError as exc:
        print(f"otel-mtls inspect: {exc}", file=sys.stderr)
        return USAGE
    try:
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
            InMemorySpanExporter,
        )
    except ImportError:
        print("otel-mtls inspect needs the SDK: pip install opentelemetry-sdk", file=sys.stderr)
        return USAGE
    observed = HandshakeMessages()
    observed.attach(context)
    # Python verifies an IP target against the certificate's IP addresses and sends no
    # SNI for it (CPython's _ssl_configure_hostname); --servername names both.
    server_hostname = args.servername or host
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = MTLSInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        with provider.get_tracer(__name__).start_as_current_span(SPAN_NAME):
            outcome = connect(
                host, port, context, server_hostname, timeout=args.timeout, wait=args.wait
            )
    except ConnectError as exc:
        print(f"otel-mtls inspect: {exc}", file=sys.stderr)
        return FAILED
    finally:
        instrumentor.uninstrument()
    outcome.spans = list(exporter.get_finished_spans())
    diagnosis = diagnose(args, host, port, server_hostname, own, observed, outcome)
    print(to_json(diagnosis) if args.json else to_text(diagnosis))
    return diagnosis.status


# -- the diagnosis -------------------------------------------------------------------------


@dataclass
class Diagnosis:
    """Everything the report says, in plain values: rendered as text or JSON."""

    target: str
    server_hostname: str
    sni: str | None
    handshake: ReadableSpan | None
    attributes: Mapping[str, Any]
    chain: list[CertificateInfo] | None
    requested: bool
    acceptable_cas: list[str]
    own: CertificateInfo | None
    sent_certificate: bool | None
    error_type: str | None
    alert: str | None
    alert_from: str
    """Who sent the alert: ``client`` (inspect) or ``server``."""
    late: bool
    after: str
    gaps: list[str]
    events: list[dict[str, Any]]
    """The events of inspect's own span: a late rejection's ``tls.peer_rejected``."""
    insecure: bool
    status: int
    summary: str
    hint: str | None


def _late_rejection(spans: Sequence[ReadableSpan]) -> Mapping[str, Any] | None:
    """Return the attributes of the ``tls.peer_rejected`` event the instrumentation recorded."""
    for span in spans:
        for event in span.events:
            if event.name == "tls.peer_rejected":
                return dict(event.attributes or {})
    return None


def diagnose(  # noqa: PLR0917
    args: argparse.Namespace,
    host: str,
    port: int,
    server_hostname: str,
    own: CertificateInfo | None,
    observed: HandshakeMessages,
    outcome: Outcome,
) -> Diagnosis:
    """Decide the exit status and the words of the report from what was seen."""
    handshake = next((s for s in outcome.spans if s.name == CLIENT_SPAN_NAME), None)
    attributes: Mapping[str, Any] = dict(handshake.attributes or {}) if handshake else {}
    rejection = _late_rejection(outcome.spans)
    # Our own observer saw every alert, in either direction; the span, the event and the
    # exception are the fallbacks.
    alert, alert_from = observed.alert, "client" if observed.alert_sent else "server"
    error_type: str | None = attributes.get("error.type")
    late = False
    if outcome.handshake_error is not None:
        error_type = error_type or _errors.error_type(outcome.handshake_error)
        if alert is None and "tls.alert" in attributes:
            alert = attributes["tls.alert"]
            alert_from = "client" if attributes.get("tls.alert.source") == "local" else "server"
    elif outcome.after in {"rejected", "closed"}:
        late = True
        if rejection is not None:
            error_type, alert = rejection.get("error.type"), alert or rejection.get("tls.alert")
        elif outcome.late_error is not None:  # the instrumentation did not see it
            error_type = _errors.error_type(outcome.late_error)
            alert = alert or _errors.received_alert(outcome.late_error)
        else:
            error_type = _errors.PEER_CONNECTION_CLOSED
    if error_type == _errors.PEER_CONNECTION_CLOSED and alert is not None:
        if alert_from == "client":
            alert = None  # our answer to the hang-up (e.g. decode_error), not its cause
        elif late:
            error_type = _errors.PEER_REJECTED_CERTIFICATE
    status = USABLE if error_type is None else FAILED
    # Filled in by the validation-gap work (contract: "Validation gaps"); absent: none.
    gaps = list(attributes.get("tls.validation.gaps") or [])
    chain = [parse_certificate(der) for der in observed.chain] if observed.chain else None
    names = [_messages.distinguished_name(der).text for der in observed.request or []]
    diagnosis = Diagnosis(
        target=f"{host}:{port}",
        server_hostname=server_hostname,
        sni=None if is_ip(server_hostname) else server_hostname,
        handshake=handshake,
        attributes=attributes,
        chain=chain,
        requested=observed.request is not None,
        acceptable_cas=names,
        own=own,
        sent_certificate=observed.sent_certificate,
        error_type=error_type,
        alert=alert,
        alert_from=alert_from,
        late=late,
        after=outcome.after,
        gaps=gaps,
        events=[
            {"name": event.name, "attributes": _event_attributes(event.attributes)}
            for span in outcome.spans
            if span.name == SPAN_NAME
            for event in span.events
        ],
        insecure=bool(args.insecure),
        status=status,
        summary="",
        hint=None,
    )
    diagnosis.summary, diagnosis.hint = _verdict(diagnosis, args)
    return diagnosis


_ACCEPTED: Final[dict[str, str]] = {
    "tls12": "the server accepted the handshake (TLS 1.2: it judged our certificate first)",
    "ticket": "the server accepted us: it sent a session ticket after our handshake",
    "ticket_closed": "the server accepted us (it sent a session ticket), then hung up",
    "data": "the server accepted us and sent data first",
    "quiet": "no rejection within {wait:g} s after the handshake (the server sent nothing)",
}

_HINTS: Final[dict[str, str]] = {
    "certificate_authority_invalid": (
        "the server's chain does not lead to a CA you trust: pass its CA with --ca"
    ),
    "certificate_hostname_mismatch": (
        "the server's certificate does not name {name}: use a name it lists, or --servername"
    ),
    "certificate_expired": "the server's certificate has expired: it must be renewed",
    "certificate_not_yet_valid": "the server's certificate is not valid yet: check the clocks",
    "unexpected_message": "the server did not answer in TLS: is this a plain-text port?",
    "handshake_timeout": "the server did not finish the handshake in time: is this a TLS port?",
    "protocol_version_unsupported": "no TLS version in common with the server",
    "peer_connection_closed": "the server closed the connection without a word",
}

_ALERT_HINTS: Final[dict[str, str]] = {
    "unknown_ca": (
        "the server does not trust the CA that issued your certificate: "
        "use one issued by an acceptable CA"
    ),
    "certificate_required": "the server requires a client certificate: pass --cert and --key",
    "certificate_expired": "the server says your certificate has expired: renew it",
    "certificate_revoked": "the server says your certificate is revoked",
    "bad_certificate": "the server refused your certificate (bad_certificate)",
    "certificate_unknown": "the server refused your certificate (certificate_unknown)",
    "access_denied": "the server denied your certificate (access_denied)",
    "handshake_failure": "the server ended the handshake (handshake_failure)",
}


def _verdict(d: Diagnosis, args: argparse.Namespace) -> tuple[str, str | None]:
    """Return the one-line result and a hint of what to do."""
    if d.status == USABLE:
        summary = "usable: " + _ACCEPTED.get(d.after, "the handshake succeeded").format(
            wait=args.wait
        )
        if not d.requested:
            return summary, "the server did not ask for a client certificate: this is not mTLS"
        if not d.sent_certificate:
            return summary, "the server asked for a certificate and accepted us without one"
        return summary, None
    where = "after the handshake (a TLS 1.3 late rejection)" if d.late else "in the handshake"
    alert = f", alert {d.alert} from the {d.alert_from}" if d.alert else ""
    summary = f"failed {where}: {d.error_type}{alert}"
    hint: str | None = None
    if d.error_type == _errors.PEER_REJECTED_CERTIFICATE and d.alert:
        hint = _ALERT_HINTS.get(d.alert)
        if d.alert == "handshake_failure" and d.requested and not d.sent_certificate:
            hint = _ALERT_HINTS["certificate_required"]
    elif d.error_type is not None:
        hint = _HINTS.get(d.error_type)
        if d.error_type == _errors.PEER_CONNECTION_CLOSED and d.late:
            hint = "the server hung up after the handshake: some servers reject a certificate so"
    expiry = d.own.not_after_timestamp if d.own is not None else None
    if hint and expiry is not None and expiry < time.time() and d.alert != "certificate_expired":
        hint += "; note that your certificate has expired"
    return summary, hint.format(name=d.server_hostname) if hint else None


# -- rendering -----------------------------------------------------------------------------


def time_left(info: CertificateInfo, now: float | None = None) -> str:
    """Say how long a certificate stays valid, e.g. ``364 days left``, ``expired 3 days ago``."""
    if info.not_after_timestamp is None:
        return "validity unknown"
    seconds = info.not_after_timestamp - (time.time() if now is None else now)
    amount = abs(seconds)
    if amount >= 2 * 86400:
        span = f"{amount // 86400:.0f} days"
    elif amount >= 2 * 3600:
        span = f"{amount // 3600:.0f} hours"
    else:
        span = f"{amount // 60:.0f} minutes"
    return f"{span} left" if seconds >= 0 else f"expired {span} ago"


def _certificate_lines(info: CertificateInfo, indent: str) -> list[str]:
    lines = [
        f"{indent}issuer   {info.issuer}",
        f"{indent}valid    {info.not_before} to {info.not_after} ({time_left(info)})",
    ]
    if info.alternative_names:
        lines.append(f"{indent}names    {', '.join(info.alternative_names)}")
    lines.append(f"{indent}sha256   {info.sha256}")
    return lines


def to_text(d: Diagnosis) -> str:
    """Render the report a person reads."""
    a = d.attributes
    out = [f"otel-mtls inspect {d.target}"]
    sni = d.sni or f"none ({d.server_hostname} is an IP address: Python sends no SNI for one)"
    out.append(f"  SNI            {sni}")
    version = a.get("tls.protocol.version")
    if version:
        alpn = a.get("tls.next_protocol") or "none"
        out.append(f"  protocol       TLS {version}, {a.get('tls.cipher')}, ALPN {alpn}")
    if d.chain is None:
        out.append("  server chain   none received")
    else:
        out.append(f"  server chain   {len(d.chain)} certificate(s), as presented")
        for index, info in enumerate(d.chain):
            out.append(f"    [{index}] {info.subject}")
            out.extend(_certificate_lines(info, "        "))
    result = a.get("tls.server.verify.result")
    if result is None and d.insecure and d.chain:
        out.append("  verify server  not done (--insecure)")
    elif result is not None:
        detail = a.get("tls.server.verify.message")
        code = a.get("tls.server.verify.code")
        out.append(
            f"  verify server  {result}" + (f" ({code}: {detail})" if detail is not None else "")
        )
    if "tls.server.hostname_verified" in a:
        checked = "verified" if a["tls.server.hostname_verified"] else "not verified"
        out.append(f"  server name    {d.server_hostname}: {checked}")
    if not d.requested:
        out.append("  client cert    not requested by the server")
    else:
        cas = "; ".join(d.acceptable_cas) if d.acceptable_cas else "none named"
        out.append(f"  client cert    requested; acceptable CAs: {cas}")
    if d.own is None:
        out.append("  presented      none (no --cert)")
    else:
        sent = "sent" if d.sent_certificate else "not sent"
        out.append(f"  presented      {d.own.subject} ({sent})")
        out.extend(_certificate_lines(d.own, "                 "))
    out.append(f"  gaps           {', '.join(d.gaps) if d.gaps else 'none'}")
    out.append(f"  result         {d.summary}")
    if d.hint:
        out.append(f"  hint           {d.hint}")
    return "\n".join(out)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def span_json(span: ReadableSpan) -> dict[str, Any]:
    """Return a span as ``--json`` prints it (the shape inspect has always printed)."""
    return {
        "name": span.name,
        "kind": span.kind.name,
        "status": span.status.status_code.name,
        "duration_ms": round(((span.end_time or 0) - (span.start_time or 0)) / 1e6, 3),
        "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
        "events": [event.name for event in span.events],
    }


def _event_attributes(attributes: Attributes) -> dict[str, Any]:
    return {k: _plain(v) for k, v in (attributes or {}).items()}


def to_json(d: Diagnosis) -> str:
    """Render the handshake span, as before, plus inspect's findings under ``inspect``."""
    document: dict[str, Any] = span_json(d.handshake) if d.handshake else {}
    document["inspect"] = {
        "target": d.target,
        "sni": d.sni,
        "server_chain": [
            {"subject": c.subject, "issuer": c.issuer, "not_after": c.not_after, "sha256": c.sha256}
            for c in d.chain or []
        ],
        "client_certificate_requested": d.requested,
        "acceptable_client_cas": d.acceptable_cas,
        "client_certificate_sent": bool(d.sent_certificate),
        "after_handshake": d.after or None,
        "events": d.events,
        "error.type": d.error_type,
        "tls.alert": d.alert,
        "validation_gaps": d.gaps,
        "exit_status": d.status,
        "result": d.summary,
    }
    return json.dumps(document, indent=2)
