"""The broadcast seen-filter: exact, bounded in time and in ids, cheap in RAM.

Why not a Bloom filter: a false positive there silently and permanently blocks a message
(it is never delivered, forwarded or grafted here). This filter keeps 64-bit keyed
fingerprints instead: a false positive needs a 64-bit collision under a key the sender
cannot know (a random key per process, so nobody can craft ids that collide here), about
n / 2**64 per lookup (5e-15 at 100k ids).

Layout: a ring of time buckets (default 12 x 10 min; an id is remembered for at least
(buckets - 1) x bucket_seconds, 110 min by default). Each bucket is a sorted
``array('Q')`` (8 bytes an id, searched with :func:`bisect`) plus a small ``set`` of the
newest fingerprints, merged into the array whenever it reaches ``merge_at`` (or a
sixteenth of the array): a set of Python ints costs about 100 bytes an id, the array 8. Expiry drops a whole bucket; the
hard cap on ids drops the oldest bucket first (counted) so that a flood of ids costs
duplicates later, never unbounded memory.
"""

from __future__ import annotations

import hashlib
import os
import sys
from array import array
from bisect import bisect_left
from collections import deque

import msgspec

__all__ = ["SeenFilter", "SeenStatistics"]


class SeenStatistics(msgspec.Struct, frozen=True):
    """A snapshot of the filter (ids held, what was dropped and why, RAM estimate)."""

    ids: int
    buckets: int
    expired_ids: int
    evicted_ids: int
    evicted_buckets: int
    memory_bytes: int


class _Bucket:
    __slots__ = ("index", "recent", "sorted")

    def __init__(self, index: int) -> None:
        self.index = index
        self.sorted = array("Q")
        self.recent: set[int] = set()

    def __len__(self) -> int:
        return len(self.sorted) + len(self.recent)

    def contains(self, fp: int) -> bool:
        if fp in self.recent:
            return True
        a = self.sorted
        i = bisect_left(a, fp)
        return i < len(a) and a[i] == fp

    def merge(self) -> None:
        merged = sorted(self.recent)
        if self.sorted:
            merged = sorted([*self.sorted, *merged])  # two sorted runs: timsort merges them
        self.sorted = array("Q", merged)
        self.recent = set()


class SeenFilter:
    """Exact set of recently seen message ids, bounded by age and by count.

    ``now`` is in seconds (monotonic or virtual), as everywhere in the gossip cores.
    """

    def __init__(
        self,
        *,
        bucket_seconds: float = 600.0,
        buckets: int = 12,
        max_ids: int = 1_000_000,
        merge_at: int = 1024,
        key: bytes | None = None,
    ) -> None:
        if bucket_seconds <= 0 or buckets < 2 or max_ids < 1 or merge_at < 1:
            raise ValueError("seen-filter needs bucket_seconds > 0, buckets >= 2, max_ids >= 1")
        self._span = float(bucket_seconds)
        self._nbuckets = buckets
        self.max_ids = max_ids
        self._merge_at = merge_at
        self._key = key if key is not None else os.urandom(16)
        self._ring: deque[_Bucket] = deque()
        self._count = 0
        self._expired = 0
        self._evicted = 0
        self._evicted_buckets = 0

    def __len__(self) -> int:
        return self._count

    def fingerprint(self, msg_id: bytes) -> int:
        """The keyed 64-bit fingerprint the filter stores for ``msg_id``."""
        return int.from_bytes(
            hashlib.blake2b(msg_id, digest_size=8, key=self._key).digest(), "little"
        )

    def contains(self, msg_id: bytes) -> bool:
        """Whether ``msg_id`` is held (no time is passed: a lookup never expires anything)."""
        fp = self.fingerprint(msg_id)
        return any(b.contains(fp) for b in reversed(self._ring))

    __contains__ = contains

    def add(self, now: float, msg_id: bytes) -> bool:
        """Remember ``msg_id``; True if it was new (the check and the insert are one step)."""
        fp = self.fingerprint(msg_id)
        ring = self._ring
        for b in reversed(ring):
            if b.contains(fp):
                return False
        self._advance(now)
        cur = ring[-1]
        cur.recent.add(fp)
        # Merge when the set reaches merge_at or 1/16 of the array, whichever is larger:
        # the set stays a small share of the bucket (RAM) and merges stay amortised O(1).
        if len(cur.recent) >= max(self._merge_at, len(cur.sorted) >> 4):
            cur.merge()
        self._count += 1
        while self._count > self.max_ids:
            self._drop_oldest(evicted=True)
        return True

    def expire(self, now: float) -> None:
        """Drop the buckets that aged out (``add`` does this too)."""
        oldest = int(now // self._span) - self._nbuckets + 1
        while self._ring and self._ring[0].index < oldest:
            self._drop_oldest(evicted=False)

    def _advance(self, now: float) -> None:
        idx = int(now // self._span)
        ring = self._ring
        if not ring or ring[-1].index < idx:
            if ring and ring[-1].recent:
                ring[-1].merge()  # a closed bucket only shrinks to its array
            ring.append(_Bucket(idx))
        self.expire(now)
        if not ring:  # a clock far ahead of every bucket expired them all
            ring.append(_Bucket(idx))

    def _drop_oldest(self, *, evicted: bool) -> None:
        ring = self._ring
        if len(ring) == 1:
            # The cap hit within one bucket: start a fresh one so the old can go.
            ring.append(_Bucket(ring[0].index))
        b = ring.popleft()
        n = len(b)
        self._count -= n
        if evicted:
            self._evicted += n
            self._evicted_buckets += 1
        else:
            self._expired += n

    def memory_bytes(self) -> int:
        """Bytes held by the fingerprints (arrays, sets and their int objects)."""
        total = 0
        for b in self._ring:
            total += sys.getsizeof(b.sorted) + sys.getsizeof(b.recent)
            total += sum(sys.getsizeof(x) for x in b.recent)
        return total

    def statistics(self) -> SeenStatistics:
        return SeenStatistics(
            ids=self._count,
            buckets=len(self._ring),
            expired_ids=self._expired,
            evicted_ids=self._evicted,
            evicted_buckets=self._evicted_buckets,
            memory_bytes=self.memory_bytes(),
        )
