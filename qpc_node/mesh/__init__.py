"""mesh layer (see docs/DESIGN map)."""
