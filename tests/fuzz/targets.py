"""Importing this module registers every harness (one module per layer)."""

from __future__ import annotations

from tests.fuzz import h_client, h_federation, h_local, h_rpc, h_wire

__all__ = ["h_client", "h_federation", "h_local", "h_rpc", "h_wire"]

# Mesh layers (inventories, announcements, broadcast channel messages) do not
# exist yet; their decoders register here with ``registry.pure`` when they land.
