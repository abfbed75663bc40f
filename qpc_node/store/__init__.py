"""store layer (see docs/DESIGN map)."""
