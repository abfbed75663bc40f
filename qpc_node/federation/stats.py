"""What the federation counts: per-neighbour counters and the typed statistics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import msgspec

from qpc_node.storefwd.stats import StoreFwdStatistics


class NeighbourStatistics(msgspec.Struct, frozen=True):
    node_id: bytes
    link_up: bool
    rtt: float | None
    calls: int
    limited_calls: int  # refused by the per-neighbour call or byte budget
    bytes_in: int
    relay_in: Mapping[str, int]  # envelopes it handed us, by our answer (read-only)
    relayed_out: int  # envelopes it took custody of from us
    refused_out: Mapping[str, int]  # envelopes it refused for good, by status (read-only)
    deferred_out: Mapping[str, int]  # answers "not yet" (kept, retried), by status (read-only)
    queued_toward: int  # envelopes we hold for it right now


class FederationStatistics(msgspec.Struct, frozen=True):
    node_id: bytes
    links: int
    neighbours: tuple[NeighbourStatistics, ...]
    queued: int
    expired_in_custody: int
    send_failures: int
    events_dropped: int
    trust_refusals: int
    link_ups: int  # links that came up (a connection replacing a duplicate is not one)
    link_downs: int
    restarts: int  # neighbours seen back with another boot id (kill -9, reboot) while linked
    handed_over: int  # messages a re-homed user left here, moved into custody
    storefwd: StoreFwdStatistics  # held envelopes, releases, receipts, spray


class NeighbourCounters(msgspec.Struct):
    """Mutable counters of one neighbour (snapshotted into :class:`NeighbourStatistics`)."""

    calls: int = 0
    limited_calls: int = 0
    bytes_in: int = 0
    relay_in: Counter[str] = msgspec.field(default_factory=Counter)
    relayed_out: int = 0
    refused_out: Counter[str] = msgspec.field(default_factory=Counter)
    deferred_out: Counter[str] = msgspec.field(default_factory=Counter)


class CounterTable:
    """Counters per neighbour node id, created on first use."""

    def __init__(self) -> None:
        self._by_node: dict[bytes, NeighbourCounters] = {}

    def __call__(self, nid: bytes) -> NeighbourCounters:
        c = self._by_node.get(nid)
        if c is None:
            c = self._by_node[nid] = NeighbourCounters()
        return c

    def nodes(self) -> set[bytes]:
        return set(self._by_node)
