"""The protocols compared side by side: flooding, gossipsub-like, and ours (Plumtree)."""

from __future__ import annotations

import hashlib
from typing import Any

from qpc_node.storefwd.plumtree import PlumtreeCore, PlumtreePolicy
from qpc_node.storefwd.seen import SeenFilter
from qpc_sim.flooding import Flooding
from qpc_sim.gossipsub import Gossipsub, GossipsubParams
from qpc_sim.scenarios import CoreFactory


def ours(seed: int, policy: Any = None) -> CoreFactory:
    """Factory for our core with `policy` (a PlumtreePolicy; None = its defaults).

    The seen-filter gets a key derived from the seed (the node draws a random one), so a
    run is reproducible; the key only matters for a 64-bit fingerprint collision.
    """
    pol = policy if policy is not None else PlumtreePolicy()

    def make(i: int, _peer: bytes) -> Any:
        key = hashlib.sha256(b"seen" + seed.to_bytes(8, "big") + i.to_bytes(4, "big")).digest()
        seen = SeenFilter(
            bucket_seconds=pol.seen_bucket_seconds,
            buckets=pol.seen_buckets,
            max_ids=pol.seen_max_ids,
            key=key[:16],
        )
        return PlumtreeCore(pol, seen=seen)

    return make


def all_protocols(seed: int, policy: Any = None) -> dict[str, CoreFactory]:
    """flooding, gossipsub, and ours, in that order."""
    return {
        "flooding": lambda i, peer: Flooding(peer),
        "gossipsub": lambda i, peer: Gossipsub(peer, GossipsubParams(), seed=seed),
        "ours": ours(seed, policy),
    }
