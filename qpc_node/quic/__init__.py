"""quic layer (see docs/DESIGN map)."""
