"""Home bindings a node knows (sans-IO): which node each user is homed on.

A **home binding** says "user U is homed on node N": signed by U's client,
spread by nodes to every neighbour (the router does the spreading), and stored
here bounded: one per user, at most ``cap`` (least recently used go first), each
until its signed expiry. A forged, expired or older-seq binding is ignored; a
higher seq re-homes. Kept apart from the route table because it answers the other
half of "where does this message go": the user's home node, which the route
table then reaches.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator

from qpc_node.mesh.signed import HomeBinding, Outcome, node_id_of


class BindingStore:
    """The newest verified binding per user; bounded (LRU) and dropped at expiry."""

    def __init__(
        self,
        *,
        cap: int,
        max_lifetime_ms: int,
        max_clock_skew_ms: int,
        verify: Callable[[bytes, bytes, bytes], bool],
    ) -> None:
        """``verify(user_key, signed bytes, signature)``: the user's signature check."""
        self._cap = cap
        self._max_ahead_ms = max_lifetime_ms + max_clock_skew_ms
        self._verify = verify
        self._bindings: OrderedDict[bytes, HomeBinding] = OrderedDict()
        self.evicted = 0
        """Bindings dropped to stay within ``cap``."""

    def __len__(self) -> int:
        return len(self._bindings)

    def get(self, user: bytes) -> HomeBinding | None:
        return self._bindings.get(user)

    def touch(self, user: bytes) -> None:
        """``user``'s binding was used: it is the last one evicted."""
        self._bindings.move_to_end(user)

    def offer(self, b: HomeBinding, now: int) -> Outcome:
        """Store ``b`` if it is valid and newer than what we hold (ACCEPTED: spread it)."""
        if b.expiry_ms <= now:
            return Outcome.EXPIRED
        if b.expiry_ms > now + self._max_ahead_ms:
            return Outcome.FUTURE
        old = self._bindings.get(b.user)
        if old is not None:
            if b == old:
                return Outcome.REFRESHED
            # Equal seqs (one user signing twice) resolve the same way on every node.
            if (b.seq, b.expiry_ms, b.node, b.signature) < (
                old.seq,
                old.expiry_ms,
                old.node,
                old.signature,
            ):
                return Outcome.REPLAYED
        if b.user != node_id_of(b.user_key):
            return Outcome.FORGED
        if not self._verify(b.user_key, b.signed_bytes(), b.signature):
            return Outcome.FORGED
        self._bindings[b.user] = b
        self._bindings.move_to_end(b.user)
        while len(self._bindings) > self._cap:
            self._bindings.popitem(last=False)
            self.evicted += 1
        return Outcome.ACCEPTED

    def live(self, now: int) -> Iterator[HomeBinding]:
        """The bindings not expired at ``now`` (a full dump to a neighbour)."""
        return (b for b in self._bindings.values() if b.expiry_ms > now)

    def homed_per_node(self, now: int) -> Counter[bytes]:
        """node id -> how many users' live bindings name it (``/mesh peers|routes``)."""
        return Counter(b.node for b in self.live(now))

    def expire(self, now: int) -> None:
        for user in [u for u, b in self._bindings.items() if b.expiry_ms <= now]:
            del self._bindings[user]
