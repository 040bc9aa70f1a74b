"""The first stage: hooks on Python's ssl handshakes, and the record of each attempt.

Nothing here knows about spans or requests: a hook fills a :class:`~.record.HandshakeRecord`
and hands it to the signals stage.
"""
