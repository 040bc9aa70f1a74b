"""The second stage: a handshake record becomes spans, metrics and security-event logs."""
