"""Importing this module registers every harness (one module per layer)."""

from __future__ import annotations

from tests.fuzz import (
    h_branch_store,
    h_channel,
    h_client,
    h_federation,
    h_fork,
    h_gossip,
    h_local,
    h_mesh,
    h_mesh_discovery,
    h_mls_fork,
    h_rejoin,
    h_rpc,
    h_storefwd,
    h_sync,
    h_sync_items,
    h_wire,
)

__all__ = [
    "h_branch_store",
    "h_channel",
    "h_client",
    "h_federation",
    "h_fork",
    "h_gossip",
    "h_local",
    "h_mesh",
    "h_mesh_discovery",
    "h_mls_fork",
    "h_rejoin",
    "h_rpc",
    "h_storefwd",
    "h_sync",
    "h_sync_items",
    "h_wire",
]

# Mesh routing (announcements, bindings, RouteUpdate batches) is h_mesh, mDNS TXT and
# static peers h_mesh_discovery, broadcast channel messages h_channel, gossip frames
# h_gossip, store-and-forward receipts h_storefwd, inventory sync messages h_sync, the
# scope-2 items the sync carries h_sync_items.
