"""Node-wide byte budgets with a per-source share (sans-IO, no clock).

The RPC server holds two kinds of bytes a peer decides the size of: request
frames it is assembling (and the decoded request while its handler runs) and
response frames waiting for the peer's flow control. Per-connection limits
alone do not bound them: calls x connections x sources multiply. A
:class:`ByteBudget` is the one place both are counted and refused.

Policy, in one sentence: a reservation fits when the node-wide total and the
source's (remote IP's) share both stay within their caps; *small* reservations
(``floor`` bytes or less) always fit and are counted all the same. The floor is
what keeps a node usable under attack: chat messages, acks, auth and refusals
are small, so a source that filled the budget with large frames slows only
other large frames, never the conversation. Small reservations stay bounded
by the call slots (per connection) times the admitted connections.
"""

from __future__ import annotations

from collections import Counter

import msgspec

from qpc_node.errors import ConfigError


class BudgetStatistics(msgspec.Struct, frozen=True):
    used: int
    peak: int
    limit: int
    per_source: int
    sources: int
    refused: int
    refused_bytes: int


class ByteBudget:
    """Bytes held node-wide and per source, with refusal instead of waiting.

    Refusal rather than a queue: a waiting reservation would keep its bytes
    (or its peer's credit) pinned while it waits, which is what the budget is
    there to prevent; a typed RESOURCE_EXHAUSTED lets a well-behaved client
    back off and retry (the status is retriable).
    """

    __slots__ = ("_by_source", "_floor", "_limit", "_peak", "_per_source", "_refused", "_used")

    def __init__(self, limit: int, per_source: int, *, floor: int = 0) -> None:
        if limit < 1 or per_source < 1 or floor < 0:
            raise ConfigError("byte budgets must be >= 1 (floor >= 0)")
        if per_source > limit:
            raise ConfigError(f"per-source share {per_source} exceeds the node budget {limit}")
        self._limit = limit
        self._per_source = per_source
        self._floor = floor
        self._used = 0
        self._peak = 0
        self._by_source: Counter[str] = Counter()
        self._refused = [0, 0]  # reservations, bytes

    @property
    def used(self) -> int:
        return self._used

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def per_source(self) -> int:
        return self._per_source

    def held_by(self, source: str) -> int:
        return self._by_source.get(source, 0)

    def fits(self, source: str, nbytes: int) -> bool:
        if nbytes <= self._floor:
            return True
        return (
            self._used + nbytes <= self._limit
            and self._by_source.get(source, 0) + nbytes <= self._per_source
        )

    def try_reserve(self, source: str, nbytes: int) -> bool:
        """Reserve ``nbytes`` for ``source``; False (and counted) when it does not fit."""
        if nbytes < 0:
            raise ValueError(f"negative reservation: {nbytes}")
        if not self.fits(source, nbytes):
            self._refused[0] += 1
            self._refused[1] += nbytes
            return False
        self._used += nbytes
        self._by_source[source] += nbytes
        if self._used > self._peak:
            self._peak = self._used
        return True

    def release(self, source: str, nbytes: int) -> None:
        """Give back what :meth:`try_reserve` granted (exactly once per grant)."""
        if nbytes <= 0:
            return
        held = self._by_source.get(source, 0)
        if nbytes > held:
            raise ValueError(f"release of {nbytes} bytes, {source!r} holds {held}")
        self._used -= nbytes
        if held == nbytes:
            del self._by_source[source]  # the map stays as small as the live sources
        else:
            self._by_source[source] = held - nbytes

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            used=self._used,
            peak=self._peak,
            limit=self._limit,
            per_source=self._per_source,
            sources=len(self._by_source),
            refused=self._refused[0],
            refused_bytes=self._refused[1],
        )
