"""Attribute names of this instrumentation that OpenTelemetry's semantic conventions lack.

The ``tls.*`` registry (``opentelemetry.semconv._incubating.attributes.tls_attributes``)
came from the Elastic Common Schema; the ``x509`` names below follow ECS where it has
them. Each name is defined here once and imported everywhere else.
"""

from __future__ import annotations

from typing import Final

TLS_CLIENT_X509_SERIAL_NUMBER: Final = "tls.client.x509.serial_number"
"""Serial number of the client certificate, uppercase hex without separators (ECS)."""

TLS_SERVER_X509_SERIAL_NUMBER: Final = "tls.server.x509.serial_number"
"""Serial number of the server certificate, uppercase hex without separators (ECS)."""

TLS_CLIENT_X509_SUBJECT_COMMON_NAME: Final = "tls.client.x509.subject.common_name"
"""First common name (CN) of the client certificate's subject (ECS)."""

TLS_SERVER_X509_SUBJECT_COMMON_NAME: Final = "tls.server.x509.subject.common_name"
"""First common name (CN) of the server certificate's subject (ECS)."""

TLS_CLIENT_X509_ALTERNATIVE_NAMES: Final = "tls.client.x509.alternative_names"
"""Every subject alternative name of the client certificate, as ``DNS:…``, ``URI:…`` (ECS)."""

TLS_SERVER_X509_ALTERNATIVE_NAMES: Final = "tls.server.x509.alternative_names"
"""Every subject alternative name of the server certificate, as ``DNS:…``, ``URI:…`` (ECS)."""

TLS_CLIENT_X509_PARSE_ERROR: Final = "tls.client.x509.parse_error"
"""Exception class raised while parsing a client certificate that could not be parsed."""

TLS_SERVER_X509_PARSE_ERROR: Final = "tls.server.x509.parse_error"
"""Exception class raised while parsing a server certificate that could not be parsed."""

TLS_CLIENT_CHAIN_HASH_SHA256: Final = "tls.client.chain.hash.sha256"
"""SHA-256 of each certificate of the client's verified chain, leaf first (Python 3.13+)."""

TLS_SERVER_CHAIN_HASH_SHA256: Final = "tls.server.chain.hash.sha256"
"""SHA-256 of each certificate of the server's verified chain, leaf first (Python 3.13+)."""

TLS_CLIENT_SPIFFE_ID: Final = "tls.client.spiffe_id"
"""The first ``spiffe://`` URI subject alternative name of the client certificate."""

TLS_SERVER_SPIFFE_ID: Final = "tls.server.spiffe_id"
"""The first ``spiffe://`` URI subject alternative name of the server certificate."""

TLS_CLIENT_VERIFY_RESULT: Final = "tls.client.verify.result"
"""Outcome of verifying the client certificate: ``success``, ``failed``, ``skipped`` or ``none``."""

TLS_SERVER_VERIFY_RESULT: Final = "tls.server.verify.result"
"""Outcome of verifying the server certificate: ``success``, ``failed``, ``skipped`` or ``none``."""

TLS_CLIENT_VERIFY_CODE: Final = "tls.client.verify.code"
"""OpenSSL X509 verify code of a client certificate that failed verification."""

TLS_SERVER_VERIFY_CODE: Final = "tls.server.verify.code"
"""OpenSSL X509 verify code of a server certificate that failed verification."""

TLS_CLIENT_VERIFY_MESSAGE: Final = "tls.client.verify.message"
"""OpenSSL verify message of a client certificate that failed verification."""

TLS_SERVER_VERIFY_MESSAGE: Final = "tls.server.verify.message"
"""OpenSSL verify message of a server certificate that failed verification."""

TLS_CLIENT_IDENTITY_SOURCE: Final = "tls.client.identity.source"
"""Where a request's client identity came from: ``handshake``, ``xfcc``, ``rfc9440``…"""

TLS_CLIENT_IDENTITY_DECISION: Final = "tls.client.identity.decision"
"""What the identity policy decided for a request: ``allowed`` or ``denied``."""

TLS_CLIENT_IDENTITY_RULE: Final = "tls.client.identity.rule"
"""The identity policy rule that decided, e.g. ``issuer``, ``spiffe_trust_domain``."""

TLS_SERVER_IDENTITY_SOURCE: Final = "tls.server.identity.source"
"""Where a client request's server identity came from: ``handshake`` (of its connection)."""

TLS_SERVER_IDENTITY_DECISION: Final = "tls.server.identity.decision"
"""What the client's identity policy decided of a request's server: ``allowed``, ``denied``."""

TLS_SERVER_IDENTITY_RULE: Final = "tls.server.identity.rule"
"""The client's identity policy rule that decided: ``spiffe_id``, ``issuer``…"""

TLS_CLIENT_REVOCATION_STATUS: Final = "tls.client.revocation.status"
"""Whether the client certificate is revoked: ``good``, ``revoked`` or ``unknown``."""

TLS_CLIENT_REVOCATION_SOURCE: Final = "tls.client.revocation.source"
"""Where the revocation status came from: ``crl`` or ``ocsp``."""

VERIFY_RESULT_SUCCESS: Final = "success"
"""The peer's certificate was verified."""

VERIFY_RESULT_FAILED: Final = "failed"
"""The peer's certificate failed verification."""

VERIFY_RESULT_NONE: Final = "none"
"""The peer presented no certificate."""

VERIFY_RESULT_SKIPPED: Final = "skipped"
"""The peer presented a certificate that the context does not verify (``CERT_NONE``)."""

TLS_SERVER_HOSTNAME_VERIFIED: Final = "tls.server.hostname_verified"
"""Client spans: whether the context checked the server's name (``check_hostname``)."""

TLS_VALIDATION_GAPS: Final = "tls.validation.gaps"
"""Every validation gap of a handshake (e.g. ``peer_not_verified``); absent when none."""

TLS_VALIDATION_GAP: Final = "tls.validation.gap"
"""One validation gap, on its ``tls.validation.gap`` record and ``tls.validation.gaps`` count."""

TLS_SIDE: Final = "tls.side"
"""Which side of the handshake this process was: ``server`` or ``client``."""

TLS_SIDE_SERVER: Final = "server"
"""This process served the handshake."""

TLS_SIDE_CLIENT: Final = "client"
"""This process made the handshake as a client."""

TLS_CERTIFICATE_ROLE: Final = "tls.certificate.role"
"""Whose certificate ``tls.certificate.time_left`` describes: ``local`` or ``peer``."""

TLS_CERTIFICATE_SUBJECT_COMMON_NAME: Final = "tls.certificate.subject.common_name"
"""First common name of the certificate that ``tls.certificate.time_left`` describes."""

TLS_CERTIFICATE_ISSUER: Final = "tls.certificate.issuer"
"""RFC 4514 issuer of the certificate that ``tls.certificate.time_left`` describes."""

TLS_CERTIFICATE_SERIAL_NUMBER: Final = "tls.certificate.serial_number"
"""Serial number (uppercase hex) of the certificate that ``tls.certificate.time_left`` describes."""

TLS_LOG_SUPPRESSED_COUNT: Final = "tls.log.suppressed_count"
"""Security-event records of the same peer and ``error.type`` held back since the last one."""

CERTIFICATE_ROLE_LOCAL: Final = "local"
"""A certificate this process presents."""

CERTIFICATE_ROLE_PEER: Final = "peer"
"""A certificate a peer presented to this process."""

TLS_CLIENT_JA4: Final = "tls.client.ja4"
"""JA4 fingerprint of the client's ClientHello (the BSD-licensed JA4 TLS client fingerprint)."""

TLS_CLIENT_OFFERED_VERSIONS: Final = "tls.client.offered_versions"
"""TLS versions the client's ClientHello offered (``1.3``, ``1.2``, ...), on failed handshakes."""

TLS_CLIENT_OFFERED_NEXT_PROTOCOLS: Final = "tls.client.offered_next_protocols"
"""ALPN protocols the client's ClientHello offered, when none was agreed."""

TLS_ALERT: Final = "tls.alert"
"""The TLS alert that passed in the handshake, as RFC 8446 names it (e.g. ``unknown_ca``)."""

TLS_ALERT_SOURCE: Final = "tls.alert.source"
"""Who sent ``tls.alert``: ``local`` (this side) or ``peer``."""

TLS_ALERT_SOURCE_LOCAL: Final = "local"
"""This side sent the alert."""

TLS_ALERT_SOURCE_PEER: Final = "peer"
"""The peer sent the alert."""
