"""The mesh: discovery (mDNS, static peers), peer table and routing (see DESIGN.md)."""
