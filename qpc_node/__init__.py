"""quicprochat mesh node: an end-to-end encrypted (MLS) messenger whose every copy is a node."""

__version__ = "0.1.0"
