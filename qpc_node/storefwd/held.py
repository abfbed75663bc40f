"""Store-and-forward decisions, sans-IO: what to hold, what to evict, when to
release, re-route and spray. ``now`` is always passed in.

A node with no route to a recipient's home holds the envelope (durably, in the
``held`` table: :mod:`qpc_node.store.held`) instead of refusing it, and answers
RELAY_HELD (custody passed) to the previous hop. The store code asks this module
every question whose answer is policy:

- :func:`check_expiry`: an envelope whose expiry lies further ahead than the
  node's cap is refused (typed), at entry and at every relay; an expired one too.
- :func:`victim`: quotas are per origin node (where the envelope entered the
  federation) and in total. When one is full, the worst of "what is held there
  plus the newcomer" goes: expired first, then already delivered (a receipt
  came), then the one that travelled most hops (lowest remaining ``hop_limit``:
  envelopes start with the same default, and holding costs none), then the
  newest (arrival order keeps what waited longest). If the worst is the
  newcomer, it is refused (QUEUE_FULL: the previous hop keeps it and retries).
  The store reads its worst candidate with the same order in SQL
  (:data:`EVICTION_ORDER_SQL`); tests check the two agree.
- :func:`should_reroute`: custody rows bound to a next hop whose link has been
  down longer than ``reroute_after_s`` go back through the resolver.
- :func:`spray_split`: binary spray-and-wait: a holder with ``t`` > 1 tokens
  gives a carrier neighbour a copy with ``t // 2`` and keeps the rest; a copy
  with 1 token only moves on a route.
"""

from __future__ import annotations

from enum import Enum

import msgspec

from qpc_node.errors import ConfigError

DAY_S = 24 * 3600
CLOCK_SKEW_S = 3600
"""Allowance on top of ``max_expiry_ahead_s`` for clocks that disagree: clients set
their expiry to exactly the retention (7 d) on their own clock, and a node (or the
next hop) whose clock is a few seconds behind must not refuse that."""


class HoldPolicy(msgspec.Struct, frozen=True):
    """``storefwd.*`` (and ``mesh.carrier``) of the node's config."""

    max_held: int = 10_000
    """Envelopes held in total."""
    held_per_origin: int = 1_000
    """Envelopes held that entered the federation at one node."""
    max_expiry_ahead_s: int = 7 * DAY_S
    """Expiries further ahead than this are refused at entry and at relays."""
    reroute_after_s: float = 60.0
    """A next hop down this long: its custody rows are resolved again."""
    spray_tokens: int = 4
    """Copies one held envelope may end up as (binary spray-and-wait)."""
    spray_delay_s: float = 300.0
    """An envelope is held this long before copies go to carrier neighbours."""
    carrier: bool = False
    """This node carries held copies between islands (a laptop): advertised in Ping."""

    def __post_init__(self) -> None:
        if min(self.max_held, self.held_per_origin, self.spray_tokens) < 1:
            raise ConfigError("storefwd.max_held, held_per_origin and spray_tokens must be >= 1")
        if self.held_per_origin > self.max_held:
            raise ConfigError("storefwd.held_per_origin must be <= storefwd.max_held")
        if self.max_expiry_ahead_s < 1:
            raise ConfigError("storefwd.max_expiry_ahead_s must be >= 1")
        if self.reroute_after_s <= 0 or self.spray_delay_s < 0:
            raise ConfigError("storefwd.reroute_after_s must be > 0, spray_delay_s >= 0")

    @property
    def max_expiry_ahead_ms(self) -> int:
        return self.max_expiry_ahead_s * 1000


class ExpiryVerdict(Enum):
    OK = "ok"
    EXPIRED = "expired"
    TOO_FAR = "too_far"


def check_expiry(expiry_ms: int, now_ms: int, policy: HoldPolicy) -> ExpiryVerdict:
    """Is ``expiry_ms`` acceptable at ``now_ms``: not past, not beyond the cap (plus
    :data:`CLOCK_SKEW_S`)."""
    if now_ms >= expiry_ms:
        return ExpiryVerdict.EXPIRED
    if expiry_ms - now_ms > policy.max_expiry_ahead_ms + CLOCK_SKEW_S * 1000:
        return ExpiryVerdict.TOO_FAR
    return ExpiryVerdict.OK


class EvictReason(Enum):
    EXPIRED = "expired"
    DELIVERED = "delivered"
    HOPS = "most_hops"


class HeldMeta(msgspec.Struct, frozen=True):
    """What eviction looks at of one held envelope (or the newcomer: ``id`` None)."""

    id: int | None
    expiry_ms: int
    delivered: bool
    hop_limit: int


def rank(m: HeldMeta, now_ms: int) -> tuple[int, int, int, int]:
    """Smaller goes first: expired, delivered, fewest hops left, newest."""
    newest = -(m.id if m.id is not None else 1 << 62)  # the newcomer is the newest
    return (0 if m.expiry_ms <= now_ms else 1, 0 if m.delivered else 1, m.hop_limit, newest)


EVICTION_ORDER_SQL = (
    "ORDER BY (h.expiry_ms <= :now) DESC, coalesce(s.delivered, 0) DESC, h.hop_limit ASC, h.id DESC"
)
"""The same order as :func:`rank` over ``held h LEFT JOIN relay_seen s``."""


def reason(m: HeldMeta, now_ms: int) -> EvictReason:
    if m.expiry_ms <= now_ms:
        return EvictReason.EXPIRED
    if m.delivered:
        return EvictReason.DELIVERED
    return EvictReason.HOPS


def victim(worst: HeldMeta | None, incoming: HeldMeta, now_ms: int) -> HeldMeta:
    """Of a full quota's worst held envelope and the newcomer, the one that goes.

    ``worst`` None (nothing held under that quota: a quota of 0 cannot be) means
    the newcomer goes. The newcomer is returned when it ranks first: refuse it.
    """
    if worst is None:
        return incoming
    return worst if rank(worst, now_ms) < rank(incoming, now_ms) else incoming


def should_reroute(down_since: float | None, now: float, policy: HoldPolicy) -> bool:
    """Custody toward a next hop whose link went down at ``down_since`` (monotonic
    seconds; None: up) is resolved again once it has been down ``reroute_after_s``."""
    return down_since is not None and now - down_since >= policy.reroute_after_s


def spray_split(tokens: int) -> tuple[int, int] | None:
    """(kept, given) for one copy to a carrier; None: a single token is not split."""
    if tokens < 2:
        return None
    give = tokens // 2
    return tokens - give, give


def spray_due(held_ms: int, now_ms: int, policy: HoldPolicy) -> bool:
    """Has an envelope held since ``held_ms`` waited long enough for a spray?"""
    return now_ms - held_ms >= int(policy.spray_delay_s * 1000)
