"""Put a request's resolved identity on its server span, and record the policy's verdicts.

Shared by every server integration: each resolves a request once (:mod:`.identity`) and
calls :func:`enrich` with the span. What is recorded follows the identity mode: in
``hashed`` and ``omit`` modes no message or field names a plain identity. The span's
attributes are lean by default (``OTEL_PYTHON_MTLS_REQUEST_ATTRIBUTES``) and built only for
a span that records; the policy's decisions and revocation checks are counted either way.
"""

from __future__ import annotations

import logging
from typing import Final

from opentelemetry.semconv.attributes import client_attributes
from opentelemetry.trace import Span

from opentelemetry.instrumentation.mtls._redaction import PLAIN
from opentelemetry.instrumentation.mtls._requests.identity import (
    Attributes,
    RequestSettings,
    Resolution,
)
from opentelemetry.instrumentation.mtls._requests.rules import Decision
from opentelemetry.instrumentation.mtls._signals import audit as _audit
from opentelemetry.instrumentation.mtls._signals.handshake import info_attributes
from opentelemetry.instrumentation.mtls.attributes import (
    TLS_CLIENT_IDENTITY_DECISION,
    TLS_CLIENT_IDENTITY_RULE,
    TLS_CLIENT_REVOCATION_SOURCE,
    TLS_CLIENT_REVOCATION_STATUS,
)

DECISION_EVENT: Final = "tls.identity.decision"
REVOCATION_EVENT: Final = "tls.revocation.checked"
_REVOCATION_COUNTED: Final = "revocation counted"
REVOCATION_GRACE_S: Final = 0.5
"""How much longer than a revocation check's own bound enforcement waits for its answer."""


def enrich(span: Span, resolution: Resolution, settings: RequestSettings) -> None:
    """Give a request's server span its identity, link and decisions; once per request."""
    if resolution.enriched:
        return
    resolution.enriched = True
    if span.is_recording():
        # Built here, for a span that records: a sampled-out request builds no attributes.
        attributes = resolution.span_attributes()
        if attributes:
            span.set_attributes(attributes)
        if resolution.link is not None:
            span.add_link(resolution.link)
    if resolution.reports:
        for report in resolution.reports:
            record_decision(span, resolution, report, settings)
    if resolution.decision is not None:
        record_decision(span, resolution, resolution.decision, settings)
    connection = resolution.connection
    revocation = connection.revocation if connection is not None else None
    if revocation is not None and revocation.done():
        record_revocation(span, resolution, settings)


def record_decision(
    span: Span, resolution: Resolution, decision: Decision, settings: RequestSettings
) -> None:
    """Record a decision: span event, count, and for denials a security-event record."""
    verdict = "allowed" if decision.allowed else "denied"
    attributes: Attributes = {
        TLS_CLIENT_IDENTITY_DECISION: verdict,
        TLS_CLIENT_IDENTITY_RULE: decision.rule,
    }
    if span.is_recording():
        span.add_event(DECISION_EVENT, attributes)
    if settings.decisions is not None:
        settings.decisions.add(1, attributes)
    if decision.allowed or settings.audit is None:
        return
    peer = resolution.peer

    def build() -> tuple[str, Attributes]:
        fields: Attributes = dict(attributes)
        if peer is not None:
            fields[client_attributes.CLIENT_ADDRESS] = peer
        identity = resolution.identity
        if identity is not None:
            fields.update(info_attributes(identity.certificate, True, settings.redaction))
        # A reason names the identity it judged: shown only where identities may be.
        reason = decision.reason if settings.redaction.mode == PLAIN else f"rule {decision.rule}"
        peer_text = peer or "an unknown peer"
        return f"identity policy denied a request from {peer_text}: {reason}", fields

    key = (peer, decision.rule)
    settings.audit.write(logging.WARNING, _audit.IDENTITY_DENIED, build, key=key)


def record_revocation(span: Span, resolution: Resolution, settings: RequestSettings) -> None:
    """Put a finished revocation check on the request span; count it once per connection."""
    connection = resolution.connection
    if connection is None or connection.revocation is None:
        return
    result = connection.revocation.result()
    attributes: Attributes = {
        TLS_CLIENT_REVOCATION_STATUS: result.status,
        TLS_CLIENT_REVOCATION_SOURCE: result.source,
    }
    if span.is_recording():
        span.add_event(REVOCATION_EVENT, attributes)
    counter = settings.revocation_checks
    if counter is not None and not connection.cache.get(_REVOCATION_COUNTED):
        connection.cache[_REVOCATION_COUNTED] = True
        counter.add(1, attributes)


def forbidden(resolution: Resolution | None, settings: RequestSettings) -> bool:
    """Whether an enforcing middleware refuses the request without waiting for revocation."""
    if resolution is None:
        return False
    decision = resolution.decision
    if settings.enforce and decision is not None and not decision.allowed:
        return True
    # Enforcing revocation where no check can run: identity headers it cannot verify.
    return settings.revocation_enforce and resolution.unverifiable
