"""ops layer (see docs/DESIGN map)."""
