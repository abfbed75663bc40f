"""wire layer (see docs/DESIGN map)."""
