"""When to reconnect to the node (sans-IO): backoff schedule, phase, what to tell the user.

The Trio layer (:mod:`qpc_node.client.session`) reports what happened (the
connection died, an attempt started, failed or succeeded) with ``now`` and asks
when the next attempt is due; this core decides. Kept free of I/O and clocks so
the schedule is tested on a virtual clock, and so a crowd of clients whose node
restarted does not come back in lockstep (jitter) or hammer it (exponential
backoff, capped so a long outage is still noticed within ``max_delay``).

The user hears of an outage twice at most: one notice when the connection is
lost and one when it is back (or one that reconnecting was refused for good),
never a line per retry.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from qpc_node.client.state import KnownNode
from qpc_node.errors import ConfigError, LocalProtocolError


class Phase(enum.Enum):
    UP = "up"
    """Connected and authenticated: calls go through."""
    WAITING = "waiting"
    """Lost; backing off until ``next_attempt_at``."""
    CONNECTING = "connecting"
    """An attempt (handshake + re-authentication) is running."""
    REFUSED = "refused"
    """A permanent refusal (the node's certificate no longer matches the pin): no more attempts."""


class ReconnectPolicy(msgspec.Struct, frozen=True):
    """Exponential backoff with "equal jitter": each delay is uniform in [cap/2, cap].

    Half the cap is kept so a retry never comes back at once (full jitter can
    draw 0 and retry a node that is still down in a tight loop); the other half
    is random so clients of one restarted node spread out. ``attempt_timeout``
    bounds one attempt (QUIC handshake plus Auth/Challenge and Auth/Prove).
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    attempt_timeout: float = 15.0
    failover_after: float = 10.0
    """Seconds the node may stay unreachable before attempts also try the other nodes
    we know (lowest RTT first): long enough to ride out a node restart, short enough
    that a dead node costs a conversation only seconds."""
    failover_dial_timeout: float = 5.0
    """One QUIC handshake while failover is possible (a dead node must not eat the
    whole attempt); login on the reached node is bounded by ``attempt_timeout``."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_delay <= self.max_delay:
            raise ConfigError("reconnect delays need 0 < initial_delay <= max_delay")
        if self.multiplier < 1 or self.attempt_timeout <= 0:
            raise ConfigError("reconnect multiplier must be >= 1 and attempt_timeout > 0")
        if self.failover_after < 0 or self.failover_dial_timeout <= 0:
            raise ConfigError("failover_after must be >= 0 and failover_dial_timeout > 0")

    def delay(self, failures: int, rand: float) -> float:
        """Wait before the attempt after ``failures`` failed ones; ``rand`` uniform in [0, 1)."""
        # min() before the power would overflow: the exponent is bounded by the cap anyway.
        cap = self.initial_delay
        for _ in range(failures):
            if cap >= self.max_delay:
                break
            cap *= self.multiplier
        cap = min(cap, self.max_delay)
        return cap / 2 + rand * cap / 2


class Notice(msgspec.Struct, frozen=True):
    """Something the user should be told once."""

    kind: Literal["lost", "restored", "refused", "moved"]
    text: str


class Reconnector:
    """The reconnect state of one session; every method takes ``now`` (seconds, monotonic)."""

    def __init__(self, policy: ReconnectPolicy, rand: Callable[[], float]) -> None:
        self.policy = policy
        self._rand = rand
        self.phase = Phase.UP
        self.failures = 0
        """Failed attempts since the connection was lost."""
        self.next_attempt_at: float | None = None
        self.last_error = ""
        self.outages = 0
        self._lost_at = 0.0

    def lost(self, now: float, reason: str) -> Notice | None:
        """The connection died; a notice only for the first report of this outage."""
        if self.phase is not Phase.UP:
            return None
        self.phase = Phase.WAITING
        self.failures = 0
        self.outages += 1
        self.last_error = reason
        self._lost_at = now
        self.next_attempt_at = now + self.policy.delay(0, self._rand())
        return Notice("lost", f"connection to the node lost ({reason}); reconnecting")

    def begin_attempt(self, now: float) -> float:
        """Start the due attempt; returns the deadline by which it must have succeeded."""
        if self.phase is not Phase.WAITING or self.next_attempt_at is None:
            raise LocalProtocolError(f"no reconnect attempt is due (phase {self.phase.value})")
        if now < self.next_attempt_at:
            raise LocalProtocolError("reconnect attempt started before it was due")
        self.phase = Phase.CONNECTING
        self.next_attempt_at = None
        return now + self.policy.attempt_timeout

    def attempt_failed(self, now: float, reason: str, *, permanent: bool = False) -> Notice | None:
        """The attempt failed; schedule the next one, or stop for good when ``permanent``."""
        if self.phase is not Phase.CONNECTING:
            raise LocalProtocolError(f"no reconnect attempt is running (phase {self.phase.value})")
        self.failures += 1
        self.last_error = reason
        if permanent:
            self.phase = Phase.REFUSED
            return Notice("refused", f"not reconnecting: {reason}")
        self.phase = Phase.WAITING
        self.next_attempt_at = now + self.policy.delay(self.failures, self._rand())
        return None

    def attempt_succeeded(self, now: float) -> Notice:
        if self.phase is not Phase.CONNECTING:
            raise LocalProtocolError(f"no reconnect attempt is running (phase {self.phase.value})")
        tries = self.failures + 1
        self.phase = Phase.UP
        self.failures = 0
        self.last_error = ""
        return Notice(
            "restored",
            f"connection to the node restored after {now - self._lost_at:.1f} s "
            f"({tries} attempt{'s' if tries != 1 else ''})",
        )

    def fail_over_due(self, now: float) -> bool:
        """Should the attempt starting now also try other nodes? Once the node has been
        unreachable for ``failover_after`` seconds (and a refusal never fails over:
        that is a key change to look at, not an outage)."""
        if self.phase not in (Phase.WAITING, Phase.CONNECTING):
            return False
        return now - self._lost_at >= self.policy.failover_after

    def moved(self, now: float, old: str, new: str) -> Notice:
        """The running attempt succeeded on another node than the lost one."""
        self.attempt_succeeded(now)
        return Notice(
            "moved", f"node {old} lost; now on node {new} (after {now - self._lost_at:.1f} s)"
        )

    def describe(self, now: float) -> str:
        """Why calls fail right now, for an error shown to the user."""
        match self.phase:
            case Phase.UP:
                return "connected"
            case Phase.CONNECTING:
                return f"reconnecting (attempt {self.failures + 1} running; last error: {self.last_error})"
            case Phase.WAITING:
                due = max(0.0, (self.next_attempt_at or now) - now)
                return (
                    f"reconnecting (next attempt in {due:.1f} s after {self.failures} failed; "
                    f"last error: {self.last_error})"
                )
            case Phase.REFUSED:
                return f"not reconnecting: {self.last_error}"


def failover_order(nodes: Sequence[KnownNode], current: bytes | None) -> list[KnownNode]:
    """Where to go when our node is dead: every other node we know an address of,
    fewest recent dial failures first, then lowest RTT (unknown RTT last), then the
    one heard of most recently."""
    others = [n for n in nodes if n.node_id != current and n.addresses]
    return sorted(
        others,
        key=lambda n: (
            n.failures,
            n.rtt_ms is None,
            n.rtt_ms if n.rtt_ms is not None else 0.0,
            -n.last_seen_ms,
            n.node_id,
        ),
    )
