"""Peer table of the mesh (sans-IO): who the neighbours are, which to dial, which are alive.

Discovery (mDNS, static config) only says *where* a node might be. Whether it is
alive comes from its federation link alone: the link reports up, activity
(any frame, keepalive, PING answer, with an RTT sample when it has one) and
down; a link silent for ``liveness_timeout`` is declared dead here even if the
transport has not noticed yet. The mDNS cache is never evidence of life: a
``kill -9``'d node stays in neighbours' caches for minutes, and it must leave
every "up" set within 15 s.

The driver (Trio layer) feeds events with ``now`` (monotonic seconds) and calls
:meth:`PeerTable.poll` after each one and at :meth:`PeerTable.next_deadline`;
``poll`` returns what to do (dial, close a silent link) and what changed (up,
down, gone). Per-peer states move only along :data:`TRANSITIONS` (the h11
``_state.py`` idea): an event a state has no row for is a
:class:`~qpc_node.errors.LocalProtocolError`, so a driver bug shows up at once
instead of as a table that quietly disagrees with the links.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable

import msgspec

from qpc_node.errors import ConfigError, LocalProtocolError

NODE_ID_LEN = 32


class Source(enum.Enum):
    """Where an address came from; a peer keeps one address list per source."""

    MDNS = "mdns"
    STATIC = "static"
    INBOUND = "inbound"
    """The peer dialled us: its link's remote address is its one UDP socket, so dialable."""


class PeerState(enum.Enum):
    DISCOVERED = "discovered"
    """Known address, not dialled yet."""
    CONNECTING = "connecting"
    """A dial is running (QUIC handshake + mutual TLS)."""
    UP = "up"
    """The federation link is up and has been heard within ``liveness_timeout``."""
    BACKOFF = "backoff"
    """Down (dial failed, link lost or silent); redialled at ``next_attempt_at``."""
    GONE = "gone"
    """Removed from the table (terminal; a later discovery makes a new entry)."""


class _Ev(enum.Enum):
    DIAL = "dial"
    DIAL_FAILED = "dial failed"
    LINK_UP = "link up"
    LINK_DOWN = "link down"
    SILENT = "silent"
    FORGET = "forget"


TRANSITIONS: dict[PeerState, dict[_Ev, PeerState]] = {
    PeerState.DISCOVERED: {
        _Ev.DIAL: PeerState.CONNECTING,
        _Ev.LINK_UP: PeerState.UP,
        _Ev.FORGET: PeerState.GONE,
    },
    PeerState.CONNECTING: {
        _Ev.LINK_UP: PeerState.UP,
        _Ev.DIAL_FAILED: PeerState.BACKOFF,
        # The late "down" of an older link (declared silent before this dial): no change.
        _Ev.LINK_DOWN: PeerState.CONNECTING,
    },
    PeerState.UP: {
        # A second link (both sides dialled at once) replaces the first; still up.
        _Ev.LINK_UP: PeerState.UP,
        _Ev.LINK_DOWN: PeerState.BACKOFF,
        _Ev.SILENT: PeerState.BACKOFF,
    },
    PeerState.BACKOFF: {
        _Ev.DIAL: PeerState.CONNECTING,
        _Ev.LINK_UP: PeerState.UP,
        _Ev.FORGET: PeerState.GONE,
        # A late "down" for a link we already declared silent changes nothing.
        _Ev.LINK_DOWN: PeerState.BACKOFF,
    },
    PeerState.GONE: {},
}
"""state -> event -> next state. Missing rows are driver bugs (LocalProtocolError)."""


class PeerAddress(msgspec.Struct, frozen=True):
    """An IP literal, port and, for IPv6 link-local, the interface index it is scoped to.

    A link-local address without its scope names no interface at all (every mesh
    interface has ``fe80::/10``), so it is refused rather than guessed.
    """

    host: str
    port: int
    scope_id: int = 0

    def __post_init__(self) -> None:
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            raise LocalProtocolError(f"peer address must be an IP literal: {self.host!r}") from None
        if not 0 < self.port <= 65535:
            raise LocalProtocolError(f"peer port out of range: {self.port}")
        if self.scope_id < 0:
            raise LocalProtocolError(f"negative scope id: {self.scope_id}")
        if isinstance(ip, ipaddress.IPv4Address):
            if self.scope_id:
                raise LocalProtocolError(f"scope id on an IPv4 address: {self.host}")
        elif ip.is_link_local and not self.scope_id:
            raise LocalProtocolError(f"link-local {self.host} needs an interface scope")
        if str(ip) != self.host:
            # One spelling per address, so equal addresses compare equal.
            msgspec.structs.force_setattr(self, "host", str(ip))

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        if self.is_ipv6:
            scope = f"%{self.scope_id}" if self.scope_id else ""
            return f"[{self.host}{scope}]:{self.port}"
        return f"{self.host}:{self.port}"


class PeerPolicy(msgspec.Struct, frozen=True):
    """Timers of the table (seconds).

    ``liveness_timeout`` bounds how long a dead neighbour stays "up": the link
    sends a keepalive well inside it (QUIC PING every few seconds), so only a
    dead or unreachable peer goes silent that long. The issue's budget is 15 s.
    Backoff is exponential with "equal jitter" (uniform in [cap/2, cap]) so
    routers that lost a common neighbour do not redial it in lockstep.
    """

    liveness_timeout: float = 12.0
    dial_timeout: float = 10.0
    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    multiplier: float = 2.0
    forget_after: float = 600.0
    """A non-static peer down this long (no link, every dial failed) is removed."""
    max_connecting: int = 4
    """Dials in flight at once; the rest wait their turn (no SYN-flood of a busy mesh)."""
    rtt_alpha: float = 0.125
    """Weight of a new RTT sample in the smoothed RTT (RFC 6298's 1/8)."""

    def __post_init__(self) -> None:
        if self.liveness_timeout <= 0 or self.dial_timeout <= 0:
            raise ConfigError("peer liveness_timeout and dial_timeout must be > 0")
        if not 0 < self.initial_backoff <= self.max_backoff or self.multiplier < 1:
            raise ConfigError("peer backoff needs 0 < initial <= max and multiplier >= 1")
        if self.forget_after <= 0 or self.max_connecting < 1:
            raise ConfigError("peer forget_after must be > 0 and max_connecting >= 1")
        if not 0 < self.rtt_alpha <= 1:
            raise ConfigError("peer rtt_alpha must be in (0, 1]")

    def backoff(self, failures: int, rand: float) -> float:
        """Delay before the next dial after ``failures`` consecutive failures."""
        cap = self.initial_backoff
        for _ in range(max(failures - 1, 0)):
            if cap >= self.max_backoff:
                break
            cap *= self.multiplier
        cap = min(cap, self.max_backoff)
        return cap / 2 + rand * cap / 2


# -- what poll() returns -------------------------------------------------------------------


class Dial(msgspec.Struct, frozen=True):
    """Open a federation link to ``node`` at ``address``; report link_up or dial_failed."""

    node: bytes
    address: PeerAddress


class CloseLink(msgspec.Struct, frozen=True):
    """The table gave up on this link (silent too long, or the dial took too long)."""

    node: bytes
    reason: str


class PeerUp(msgspec.Struct, frozen=True):
    node: bytes


class PeerDown(msgspec.Struct, frozen=True):
    """The neighbour is no longer reachable over a link (routing withdraws through it)."""

    node: bytes
    reason: str


class PeerGone(msgspec.Struct, frozen=True):
    node: bytes


PeerEvent = Dial | CloseLink | PeerUp | PeerDown | PeerGone


class PeerInfo(msgspec.Struct, frozen=True):
    """One row of the table (a snapshot: ``/mesh peers``, metrics, tests)."""

    node: bytes
    state: PeerState
    addresses: tuple[PeerAddress, ...]
    sources: frozenset[Source]
    srtt: float | None
    last_seen: float | None
    failures: int
    next_attempt_at: float | None


class PeerTableStatistics(msgspec.Struct, frozen=True):
    peers: int
    up: int
    connecting: int
    backoff: int
    dials: int
    dial_failures: int
    links_up: int
    links_down: int
    liveness_timeouts: int
    forgotten: int


class _Peer:
    __slots__ = (
        "addresses",
        "dial_address",
        "down_since",
        "failures",
        "last_seen",
        "next_attempt_at",
        "node",
        "srtt",
        "state",
        "state_since",
    )

    def __init__(self, node: bytes, now: float) -> None:
        self.node = node
        self.state = PeerState.DISCOVERED
        self.state_since = now
        self.addresses: dict[Source, tuple[PeerAddress, ...]] = {}
        self.srtt: float | None = None
        self.last_seen: float | None = None
        self.failures = 0
        self.next_attempt_at: float | None = now
        self.down_since = now
        self.dial_address: PeerAddress | None = None

    def all_addresses(self) -> tuple[PeerAddress, ...]:
        """Static first (configured on purpose), then mDNS, then inbound; IPv6 before IPv4."""
        seen: dict[PeerAddress, None] = {}
        for src in (Source.STATIC, Source.MDNS, Source.INBOUND):
            for a in self.addresses.get(src, ()):
                seen.setdefault(a, None)
        return tuple(sorted(seen, key=lambda a: not a.is_ipv6))


def _check_node(node: bytes) -> None:
    if len(node) != NODE_ID_LEN:
        raise LocalProtocolError(f"node id must be {NODE_ID_LEN} bytes, got {len(node)}")


class PeerTable:
    """Neighbours by node id. Every method takes ``now`` (monotonic seconds)."""

    def __init__(self, policy: PeerPolicy, rand: Callable[[], float]) -> None:
        self._policy = policy
        self._rand = rand
        self._peers: dict[bytes, _Peer] = {}
        self._out: list[PeerEvent] = []
        self._dials = 0
        self._dial_failures = 0
        self._links_up = 0
        self._links_down = 0
        self._timeouts = 0
        self._forgotten = 0

    # -- inputs: discovery ------------------------------------------------------------------

    def discovered(
        self, node: bytes, addresses: Iterable[PeerAddress], source: Source, now: float
    ) -> None:
        """Discovery found (or re-found, with new addresses) ``node``; replaces that source's list."""
        _check_node(node)
        addrs = tuple(addresses)
        if not addrs:
            raise LocalProtocolError("a discovered peer needs at least one address")
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = _Peer(node, now)
        peer.addresses[source] = addrs
        if peer.state is PeerState.BACKOFF and source is not Source.INBOUND:
            # Fresh evidence of where it is (a restart announces itself): try it now.
            peer.next_attempt_at = now

    def lost(self, node: bytes, source: Source, now: float) -> None:
        """Discovery withdrew ``node`` (mDNS goodbye). Says nothing about an up link."""
        peer = self._peers.get(node)
        if peer is None:
            return
        peer.addresses.pop(source, None)
        self._maybe_forget(peer, now)

    # -- inputs: the link -------------------------------------------------------------------

    def link_up(
        self,
        node: bytes,
        now: float,
        *,
        rtt: float | None = None,
        address: PeerAddress | None = None,
    ) -> None:
        """A link to ``node`` is up (our dial, or the peer dialled us)."""
        _check_node(node)
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = _Peer(node, now)
        if address is not None and peer.state is not PeerState.CONNECTING:
            peer.addresses[Source.INBOUND] = (address,)
        was_up = peer.state is PeerState.UP
        self._move(peer, _Ev.LINK_UP, now)
        peer.failures = 0
        peer.next_attempt_at = None
        peer.last_seen = now
        if rtt is not None:
            self._sample(peer, rtt)
        if not was_up:
            self._links_up += 1
            self._out.append(PeerUp(node))

    def link_activity(self, node: bytes, now: float, *, rtt: float | None = None) -> None:
        """The link heard from ``node`` (any frame, a keepalive, a PING answer with its RTT)."""
        peer = self._peers.get(node)
        if peer is None or peer.state is not PeerState.UP:
            # A frame racing our own timeout verdict: the link is being closed already.
            return
        peer.last_seen = now
        if rtt is not None:
            self._sample(peer, rtt)

    def link_down(self, node: bytes, now: float, reason: str = "link closed") -> None:
        peer = self._peers.get(node)
        if peer is None:
            return
        if peer.state is PeerState.DISCOVERED:
            return
        was_up = peer.state is PeerState.UP
        self._move(peer, _Ev.LINK_DOWN, now)
        if was_up:
            self._went_down(peer, now, reason)

    def dial_failed(self, node: bytes, now: float, reason: str = "dial failed") -> None:
        peer = self._peers.get(node)
        if peer is None or peer.state is not PeerState.CONNECTING:
            # Late report for a dial the table already timed out: nothing to change.
            return
        self._move(peer, _Ev.DIAL_FAILED, now)
        self._dial_failures += 1
        self._schedule_retry(peer, now)
        self._maybe_forget(peer, now)

    # -- outputs ----------------------------------------------------------------------------

    def poll(self, now: float) -> list[PeerEvent]:
        """Run timers (silent links, slow dials, forgetting), pick dials; drain events."""
        p = self._policy
        for peer in list(self._peers.values()):
            if peer.state is PeerState.UP:
                assert peer.last_seen is not None
                if now - peer.last_seen >= p.liveness_timeout:
                    self._timeouts += 1
                    self._move(peer, _Ev.SILENT, now)
                    reason = f"silent for {now - peer.last_seen:.1f}s"
                    self._out.append(CloseLink(peer.node, reason))
                    self._went_down(peer, now, reason)
            elif peer.state is PeerState.CONNECTING:
                if now - peer.state_since >= p.dial_timeout:
                    self._out.append(CloseLink(peer.node, "dial timed out"))
                    self._move(peer, _Ev.DIAL_FAILED, now)
                    self._dial_failures += 1
                    self._schedule_retry(peer, now)
                    self._maybe_forget(peer, now)
            elif peer.state is PeerState.BACKOFF:
                self._maybe_forget(peer, now)
        for peer in self._select_dials(now):
            addrs = peer.all_addresses()
            # Rotate through the addresses: a dead IPv6 route does not pin us to it.
            address = addrs[peer.failures % len(addrs)]
            self._move(peer, _Ev.DIAL, now)
            peer.dial_address = address
            peer.next_attempt_at = None
            self._dials += 1
            self._out.append(Dial(peer.node, address))
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to do (None: only an input can change things)."""
        p = self._policy
        best: float | None = None
        busy = sum(1 for q in self._peers.values() if q.state is PeerState.CONNECTING)
        # With every dial slot taken, a due dial waits for a dial to end (an input or a
        # dial timeout), not for the clock: counting it would make the driver spin.
        room = busy < p.max_connecting
        for peer in self._peers.values():
            t: float | None = None
            if peer.state is PeerState.UP:
                assert peer.last_seen is not None
                t = peer.last_seen + p.liveness_timeout
            elif peer.state is PeerState.CONNECTING:
                t = peer.state_since + p.dial_timeout
            elif peer.state in (PeerState.BACKOFF, PeerState.DISCOVERED):
                if room and peer.next_attempt_at is not None:
                    t = peer.next_attempt_at
                if peer.state is PeerState.BACKOFF and not self._is_static(peer):
                    forget = peer.down_since + p.forget_after
                    t = forget if t is None else min(t, forget)
            if t is not None and (best is None or t < best):
                best = t
        return best

    # -- queries ----------------------------------------------------------------------------

    def get(self, node: bytes) -> PeerInfo | None:
        peer = self._peers.get(node)
        return None if peer is None else self._info(peer)

    def peers(self) -> tuple[PeerInfo, ...]:
        return tuple(self._info(p) for p in sorted(self._peers.values(), key=lambda p: p.node))

    def up(self) -> tuple[bytes, ...]:
        """Node ids with a live link, in id order."""
        return tuple(sorted(n for n, p in self._peers.items() if p.state is PeerState.UP))

    def best(self, now: float) -> PeerInfo | None:
        """The live neighbour with the lowest smoothed RTT (``/mesh auto``, client failover).

        Only peers heard within ``liveness_timeout`` count, even if :meth:`poll` has not
        run yet; a live peer without an RTT sample ranks after every measured one.
        """
        live = [
            p
            for p in self._peers.values()
            if p.state is PeerState.UP
            and p.last_seen is not None
            and now - p.last_seen < self._policy.liveness_timeout
        ]
        if not live:
            return None
        pick = min(live, key=lambda p: (p.srtt is None, p.srtt or 0.0, p.node))
        return self._info(pick)

    def statistics(self) -> PeerTableStatistics:
        states = [p.state for p in self._peers.values()]
        return PeerTableStatistics(
            peers=len(states),
            up=states.count(PeerState.UP),
            connecting=states.count(PeerState.CONNECTING),
            backoff=states.count(PeerState.BACKOFF),
            dials=self._dials,
            dial_failures=self._dial_failures,
            links_up=self._links_up,
            links_down=self._links_down,
            liveness_timeouts=self._timeouts,
            forgotten=self._forgotten,
        )

    # -- internals --------------------------------------------------------------------------

    def _move(self, peer: _Peer, ev: _Ev, now: float) -> None:
        try:
            new = TRANSITIONS[peer.state][ev]
        except KeyError:
            raise LocalProtocolError(
                f"peer {peer.node.hex()[:12]}: {ev.value!r} in state {peer.state.value}"
            ) from None
        if new is not peer.state:
            peer.state = new
            peer.state_since = now

    def _went_down(self, peer: _Peer, now: float, reason: str) -> None:
        self._links_down += 1
        peer.down_since = now
        self._out.append(PeerDown(peer.node, reason))
        # The first redial after losing a live link waits the initial backoff, not zero:
        # a node that restarts is back in ~1 s, and a flapping link is not hammered.
        peer.failures = 0
        self._schedule_retry(peer, now)

    def _schedule_retry(self, peer: _Peer, now: float) -> None:
        if peer.failures == 0:
            peer.down_since = now
        peer.failures += 1
        peer.next_attempt_at = now + self._policy.backoff(peer.failures, self._rand())

    def _sample(self, peer: _Peer, rtt: float) -> None:
        if rtt < 0:
            raise LocalProtocolError(f"negative RTT sample {rtt}")
        a = self._policy.rtt_alpha
        peer.srtt = rtt if peer.srtt is None else (1 - a) * peer.srtt + a * rtt

    def _is_static(self, peer: _Peer) -> bool:
        return Source.STATIC in peer.addresses

    def _maybe_forget(self, peer: _Peer, now: float) -> None:
        if peer.state not in (PeerState.DISCOVERED, PeerState.BACKOFF):
            return
        no_address = not any(peer.addresses.values())
        stale = (
            peer.state is PeerState.BACKOFF
            and not self._is_static(peer)
            and now - peer.down_since >= self._policy.forget_after
        )
        if no_address or stale:
            self._move(peer, _Ev.FORGET, now)
            del self._peers[peer.node]
            self._forgotten += 1
            self._out.append(PeerGone(peer.node))

    def _select_dials(self, now: float) -> list[_Peer]:
        """Due peers, static first, then fewest failures, then lowest known RTT."""
        busy = sum(1 for p in self._peers.values() if p.state is PeerState.CONNECTING)
        room = self._policy.max_connecting - busy
        if room <= 0:
            return []
        due = [
            p
            for p in self._peers.values()
            if p.state in (PeerState.DISCOVERED, PeerState.BACKOFF)
            and p.next_attempt_at is not None
            and p.next_attempt_at <= now
            and p.all_addresses()
        ]
        due.sort(
            key=lambda p: (
                not self._is_static(p),
                p.failures,
                p.srtt is None,
                p.srtt or 0.0,
                p.next_attempt_at,
                p.node,
            )
        )
        return due[:room]

    def _info(self, peer: _Peer) -> PeerInfo:
        return PeerInfo(
            node=peer.node,
            state=peer.state,
            addresses=peer.all_addresses(),
            sources=frozenset(s for s, a in peer.addresses.items() if a),
            srtt=peer.srtt,
            last_seen=peer.last_seen,
            failures=peer.failures,
            next_attempt_at=peer.next_attempt_at,
        )
