"""service layer (see docs/DESIGN map)."""
