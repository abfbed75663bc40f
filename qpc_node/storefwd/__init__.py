"""storefwd layer (see docs/DESIGN map)."""
