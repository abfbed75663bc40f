"""repl layer (see docs/DESIGN map)."""
