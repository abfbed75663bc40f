"""client layer (see docs/DESIGN map)."""
