"""rpc layer (see docs/DESIGN map)."""
