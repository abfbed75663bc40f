"""Typed statistics of store-and-forward (qpc_node/storefwd/forward.py)."""

from __future__ import annotations

import msgspec


class StoreFwdStatistics(msgspec.Struct, frozen=True):
    """Counters since start (``held_now``: rows in the ``held`` table)."""

    held_now: int
    held: int
    """Envelopes taken into ``held`` (answered RELAY_HELD)."""
    hold_refused: int
    """Refused because the quota was full and the newcomer ranked worst."""
    evicted_expired: int
    evicted_delivered: int
    evicted_hops: int
    released: int
    """Moved from ``held`` into custody or the local mailbox."""
    expired_held: int
    """Expired while held: dropped, never delivered."""
    rerouted: int
    """Custody rows moved to another next hop after theirs stayed down."""
    rerouted_held: int
    """Custody rows moved back to ``held`` (no route left)."""
    expiry_too_far: int
    receipts_sent: int
    receipts_in: int
    receipts_applied: int
    """Valid receipts that purged replicas here (a first receipt for the msg_id)."""
    receipts_repeated: int
    receipts_unknown_msg: int
    receipts_forged: int
    receipts_wrong_home: int
    receipts_unknown_home: int
    receipts_malformed: int
    receipts_lost: int
    """Receipts dropped unsent (queue full, or the peer unreachable after retries)."""
    purged: int
    """Held and queued replicas deleted by receipts."""
    sprayed: int
    """Copies given to carrier neighbours."""
    receipts_remembered: int = 0
    """Verified receipts the inventory sync brought for msg_ids never handled here:
    kept as tombstones (a later copy is a duplicate)."""
