"""Per-neighbour federation limits (one object, read by the RPC server, links and custody)."""

from __future__ import annotations

import msgspec

from qpc_node.store.federation import RelayQueueLimits
from qpc_node.storefwd.held import HoldPolicy


class FederationLimits(msgspec.Struct, frozen=True):
    """Per-neighbour limits: one abusive neighbour exhausts its own budget, not others'."""

    calls_per_second: float = 200.0
    call_burst: float = 400.0
    bytes_per_second: float = 8 * 1024 * 1024
    byte_burst: float = 16 * 1024 * 1024
    max_concurrent_calls: int = 32
    queue: RelayQueueLimits = msgspec.field(default_factory=RelayQueueLimits)
    relay_batch: int = 64
    relay_window: int = 3
    """Relay batches in flight toward one next hop at once (custody.py, ``_HopDrain``)."""
    max_frame_size: int = 6 * 1024 * 1024
    storefwd: HoldPolicy = msgspec.field(default_factory=HoldPolicy)
    """Store-and-forward: hold quotas, expiry cap, re-route and spray (``storefwd.*``)."""
