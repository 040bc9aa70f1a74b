"""The last stage: a request finds its connection, and its server span gets the identity."""
