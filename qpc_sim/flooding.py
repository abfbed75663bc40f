"""Baseline 1: naive flooding with a seen-set (what Meshtastic-style routers do).

The first copy of a message is delivered and sent to every neighbour but the one it came
from; later copies are dropped. No acknowledgements, no repair: a frame lost on the last
edge into a node is lost for it (anti-entropy, modelled by the simulator, is its only
repair, as for every protocol).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from qpc_node.storefwd.core import Deliver, Frame, Push, Send


class Flooding:
    """GossipCore: flood each message once to every neighbour; seen-set with a TTL."""

    def __init__(self, me: bytes, seen_ttl: float = 120.0) -> None:
        self.me = me
        self.seen_ttl = seen_ttl
        self.peers: list[bytes] = []
        self._seen: dict[bytes, float] = {}
        self._cache: dict[bytes, bytes] = {}
        self._out: list[Send | Deliver] = []

    def link_up(self, now: float, peer: bytes) -> None:
        if peer not in self.peers:
            self.peers.append(peer)

    def link_down(self, now: float, peer: bytes) -> None:
        if peer in self.peers:
            self.peers.remove(peer)

    def publish(self, now: float, msg_id: bytes, payload: bytes) -> None:
        if msg_id in self._seen:
            return
        self._first(now, msg_id, payload, 0, None)

    def _first(
        self, now: float, msg_id: bytes, payload: bytes, hops: int, src: bytes | None
    ) -> None:
        self._seen[msg_id] = now
        self._cache[msg_id] = payload
        self._out.append(Deliver(msg_id, payload, hops, src))
        frame = Push(msg_id, hops + 1, payload)
        for p in self.peers:
            if p != src:
                self._out.append(Send(p, (frame,)))

    def receive(self, now: float, peer: bytes, frames: Sequence[Frame]) -> None:
        for f in frames:
            if isinstance(f, Push) and f.msg_id not in self._seen:
                self._first(now, f.msg_id, f.payload, f.hops, peer)

    def tick(self, now: float) -> None:
        cutoff = now - self.seen_ttl
        for m in [m for m, t in self._seen.items() if t < cutoff]:
            del self._seen[m]
            self._cache.pop(m, None)

    def next_deadline(self) -> float | None:
        # Insertion order is time order (the clock never goes back), so the first is oldest.
        for t in self._seen.values():
            return t + self.seen_ttl
        return None

    def poll(self) -> list[Send | Deliver]:
        out, self._out = self._out, []
        return out

    def holding(self) -> Iterable[tuple[bytes, bytes]]:
        return list(self._cache.items())
