"""crypto layer (see docs/DESIGN map)."""
