"""Baseline 2: a gossipsub-like mesh (libp2p gossipsub v1.1 parameters, one topic).

Each node keeps a mesh of D=6 neighbours (bounds 4..12), repaired on a 1 s heartbeat with
GRAFT/PRUNE (and a 60 s prune backoff); a message is forwarded to the mesh peers; every
heartbeat announces the ids of the last 3 heartbeats' messages (IHAVE) to D_lazy=6 peers
outside the mesh, which ask for what they lack (IWANT, re-asked after 1 s) and are served
from a 5-heartbeat message cache (at most 3 times per peer and id). seen_ttl 120 s. The
origin publishes to all its neighbours (flood publish, v1.1's default). No peer scoring,
no IDONTWANT: there are no attackers here and the issue compares against plain gossipsub.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qpc_node.storefwd.core import MSG_ID_LEN, Deliver, Frame, Push, Send


@dataclass(frozen=True, slots=True)
class GsIHave:
    msg_ids: tuple[bytes, ...]

    @property
    def is_payload(self) -> bool:
        return False

    def wire_size(self) -> int:
        return 4 + (2 + MSG_ID_LEN) * len(self.msg_ids)


@dataclass(frozen=True, slots=True)
class GsIWant:
    msg_ids: tuple[bytes, ...]

    @property
    def is_payload(self) -> bool:
        return False

    def wire_size(self) -> int:
        return 4 + (2 + MSG_ID_LEN) * len(self.msg_ids)


@dataclass(frozen=True, slots=True)
class GsGraft:
    @property
    def is_payload(self) -> bool:
        return False

    def wire_size(self) -> int:
        return 4


@dataclass(frozen=True, slots=True)
class GsPrune:
    @property
    def is_payload(self) -> bool:
        return False

    def wire_size(self) -> int:
        return 6


@dataclass(frozen=True, slots=True)
class GossipsubParams:
    d: int = 6
    d_lo: int = 4
    d_hi: int = 12
    d_lazy: int = 6
    heartbeat: float = 1.0
    mcache_len: int = 5
    mcache_gossip: int = 3
    seen_ttl: float = 120.0
    prune_backoff: float = 60.0
    iwant_retry: float = 1.0
    gossip_retransmission: int = 3
    flood_publish: bool = True


class Gossipsub:
    """GossipCore with gossipsub's mesh, heartbeat and IHAVE/IWANT lazy gossip."""

    def __init__(self, me: bytes, params: GossipsubParams | None = None, seed: int = 0) -> None:
        self.me = me
        self.p = params or GossipsubParams()
        digest = hashlib.sha256(b"gossipsub" + me + seed.to_bytes(8, "big")).digest()
        self._rng = random.Random(int.from_bytes(digest[:8], "big"))
        self.peers: list[bytes] = []
        self.mesh: set[bytes] = set()
        self._backoff: dict[bytes, float] = {}
        self._seen: dict[bytes, float] = {}
        self._windows: list[list[bytes]] = [[]]
        self._cache: dict[bytes, bytes] = {}
        self._served: dict[tuple[bytes, bytes], int] = {}
        self._asked: dict[bytes, float] = {}
        self._next_hb = self._rng.uniform(0.0, self.p.heartbeat)
        self._out: list[Send | Deliver] = []

    # -- links ----------------------------------------------------------------------------
    def link_up(self, now: float, peer: bytes) -> None:
        if peer not in self.peers:
            self.peers.append(peer)

    def link_down(self, now: float, peer: bytes) -> None:
        if peer in self.peers:
            self.peers.remove(peer)
        self.mesh.discard(peer)

    # -- messages ---------------------------------------------------------------------------
    def publish(self, now: float, msg_id: bytes, payload: bytes) -> None:
        if msg_id in self._seen:
            return
        self._accept(now, msg_id, payload, 0, None)

    def _accept(
        self, now: float, msg_id: bytes, payload: bytes, hops: int, src: bytes | None
    ) -> None:
        self._seen[msg_id] = now
        self._cache[msg_id] = payload
        self._windows[-1].append(msg_id)
        self._asked.pop(msg_id, None)
        self._out.append(Deliver(msg_id, payload, hops, src))
        frame = Push(msg_id, hops + 1, payload)
        targets = self.peers if (src is None and self.p.flood_publish) else self.mesh
        for peer in list(targets):
            if peer != src:
                self._out.append(Send(peer, (frame,)))

    def receive(self, now: float, peer: bytes, frames: Sequence[Frame]) -> None:
        if peer not in self.peers:
            return
        for f in frames:
            if isinstance(f, Push):
                if f.msg_id not in self._seen:
                    self._accept(now, f.msg_id, f.payload, f.hops, peer)
            elif isinstance(f, GsIHave):
                want = []
                for m in f.msg_ids:
                    if m in self._seen:
                        continue
                    asked = self._asked.get(m)
                    if asked is not None and now - asked < self.p.iwant_retry:
                        continue
                    self._asked[m] = now
                    want.append(m)
                if want:
                    self._out.append(Send(peer, (GsIWant(tuple(want)),)))
            elif isinstance(f, GsIWant):
                pushes: list[Frame] = []
                for m in f.msg_ids:
                    payload = self._cache.get(m)
                    if payload is None:
                        continue
                    n = self._served.get((peer, m), 0)
                    if n >= self.p.gossip_retransmission:
                        continue
                    self._served[(peer, m)] = n + 1
                    pushes.append(Push(m, 1, payload))
                if pushes:
                    self._out.append(Send(peer, tuple(pushes)))
            elif isinstance(f, GsGraft):
                if len(self.mesh) >= self.p.d_hi or self._backoff.get(peer, -1.0) > now:
                    self._out.append(Send(peer, (GsPrune(),)))
                else:
                    self.mesh.add(peer)
            elif isinstance(f, GsPrune):
                self.mesh.discard(peer)
                self._backoff[peer] = now + self.p.prune_backoff

    # -- heartbeat ---------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if now < self._next_hb:
            return
        self._next_hb = now + self.p.heartbeat
        p = self.p
        rng = self._rng
        if len(self.mesh) < p.d_lo:
            candidates = [
                q for q in self.peers if q not in self.mesh and self._backoff.get(q, -1.0) <= now
            ]
            rng.shuffle(candidates)
            for q in candidates[: p.d - len(self.mesh)]:
                self.mesh.add(q)
                self._out.append(Send(q, (GsGraft(),)))
        elif len(self.mesh) > p.d_hi:
            drop = sorted(self.mesh)
            rng.shuffle(drop)
            for q in drop[: len(self.mesh) - p.d]:
                self.mesh.discard(q)
                self._backoff[q] = now + p.prune_backoff
                self._out.append(Send(q, (GsPrune(),)))
        ids = tuple(m for w in self._windows[-p.mcache_gossip :] for m in w)
        if ids:
            others = [q for q in self.peers if q not in self.mesh]
            rng.shuffle(others)
            for q in others[: p.d_lazy]:
                self._out.append(Send(q, (GsIHave(ids),)))
        self._windows.append([])
        if len(self._windows) > p.mcache_len:
            for m in self._windows.pop(0):
                self._cache.pop(m, None)
        cutoff = now - p.seen_ttl
        while self._seen:
            m, t = next(iter(self._seen.items()))
            if t >= cutoff:
                break
            del self._seen[m]
        if len(self._served) > 4096:
            live = set(self._cache)
            self._served = {k: v for k, v in self._served.items() if k[1] in live}
        if len(self._asked) > 4096:
            self._asked = {m: t for m, t in self._asked.items() if now - t < p.iwant_retry}

    def next_deadline(self) -> float | None:
        return self._next_hb

    def poll(self) -> list[Send | Deliver]:
        out, self._out = self._out, []
        return out

    def holding(self) -> Iterable[tuple[bytes, bytes]]:
        return list(self._cache.items())
