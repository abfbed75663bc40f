"""federation layer (see docs/DESIGN map)."""
