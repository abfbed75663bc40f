"""Inventory sync between neighbours: the sans-IO session core over negentropy.

When two nodes (re)connect, and periodically with one random neighbour, they
reconcile what they hold (broadcast channel messages within retention, held
envelopes and receipts) instead of re-flooding it. Negentropy (range-based set
reconciliation, ``qpc_node._core.Negentropy``) costs about the difference, not the
set: equal inventories of 10k items settle in one round of ~500 bytes.

Roles. The *initiator* opens a session per scope (``Federation/Sync`` rounds until
negentropy is done), learns both differences, pushes what the peer lacks
(``SyncPush``; its own source's ``offer`` decides what the peer may carry) and fetches
what it lacks (``SyncFetch``; the peer's ``offer`` decides). The *responder* answers
rounds over a snapshot of its inventory taken when the session opened and serves the
fetches and pushes of sessions it has open. This module decides everything (limits,
refusals, batching, accounting) and does no I/O: the Trio driver
(:mod:`.syncer`) reads sources, moves protobuf messages and passes ``now`` in.

Ids. Negentropy ids are 32 bytes; ours are 16-byte msg ids. They are *hashed*, not
padded (:func:`sync_id`): SHA-256("qpc-sync-id-v1\\0" || scope || kind || msg_id).
Padding would leave half of every id zero and let a sender, who picks msg ids, pick
sets whose additive range fingerprints collide; hashing spreads ids over the space
the fingerprints assume and separates scopes and kinds: in scope 2 a held envelope
(:data:`KIND_HELD`) and the delivery receipt that purges it (:data:`KIND_RECEIPT`) are
different items, so a node holding the tombstone and one holding the copy see a
difference both ways (the copy's holder then takes the receipt and drops the copy;
the receipt's holder refuses the copy in ``take``).

Timestamps are the item's absolute **expiry** (ms), not its creation time. Range-based
reconciliation needs every node to give an item the *same* timestamp; expiry_ms is
in every envelope and channel message header that relays see, while a channel
message's creation time is sealed inside its AEAD and an envelope has none. Expiry
order also suits retention: what expires leaves the low end of both sets at once
(items with expiry <= now are dropped from every snapshot), so clock skew between
neighbours only matters at that one edge. A receipt takes the expiry of the
envelope it acknowledges (it must outlive every copy).

States are explicit: each session has a state and a transition table
(:data:`INITIATOR_TRANSITIONS`, :data:`RESPONDER_TRANSITIONS`); an event not in the
table is a :class:`SyncStateError`, never a silently ignored flag.

Limits (:class:`SyncLimits`): negentropy messages both ways are capped (the binding
honours ``frame_size_limit``; a bigger incoming message is refused), rounds per
session, ids per session (have + need; a session that hits a cap still transfers
what it learnt, the next one continues), items and bytes per fetch/push batch,
open sessions per neighbour (one per scope: a new session for a scope replaces the
old one) and in total, and a per-neighbour token bucket on opening sessions: a
neighbour flooding inventories gets ``RATE_LIMITED`` with a retry time, counted.
Bad input from a peer is a :class:`SyncProtocolError` (initiator side) or a typed
refusal (responder side), counted, and nothing is stored.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from types import MappingProxyType
from typing import Protocol

import msgspec

from qpc_node._core import Negentropy, SyncError
from qpc_node.errors import ConfigError, QpcError, StatusCode
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.wire.gen.qpc.v1 import sync_pb2

__all__ = [
    "ID_LEN",
    "INITIATOR_TRANSITIONS",
    "KIND_CHANNEL",
    "KIND_HELD",
    "KIND_RECEIPT",
    "MSG_ID_LEN",
    "RESPONDER_TRANSITIONS",
    "SCOPE_CHANNELS",
    "SCOPE_HELD",
    "SESSION_ID_LEN",
    "IEvent",
    "IState",
    "InitiatorSession",
    "NeedItems",
    "REvent",
    "RState",
    "SyncCore",
    "SyncLimits",
    "SyncProtocolError",
    "SyncRefused",
    "SyncSource",
    "SyncStateError",
    "SyncStatistics",
    "refusal_name",
    "sync_id",
]

SCOPE_CHANNELS = sync_pb2.SYNC_SCOPE_CHANNELS
"""Scope 1: broadcast channel messages within retention."""
SCOPE_HELD = sync_pb2.SYNC_SCOPE_HELD
"""Scope 2: held envelopes (store-and-forward) and delivery receipts."""
KIND_CHANNEL = 0
KIND_HELD = 1
KIND_RECEIPT = 2
ID_LEN = 32
MSG_ID_LEN = 16
SESSION_ID_LEN = 16
_ID_DOMAIN = b"qpc-sync-id-v1\0"
_TS_MAX = 2**64 - 2
"""Largest timestamp the binding takes (2**64-1 is negentropy's infinity bound)."""

Reason = sync_pb2.SyncRefusal.Reason


def sync_id(scope: int, kind: int, msg_id: bytes) -> bytes:
    """The 32-byte negentropy id of an item (see the module docstring: hashed, not padded)."""
    if len(msg_id) != MSG_ID_LEN:
        raise ValueError(f"msg_id must be {MSG_ID_LEN} bytes")
    if not (0 <= scope <= 255 and 0 <= kind <= 255):
        raise ValueError("scope and kind are one byte each")
    return hashlib.sha256(_ID_DOMAIN + bytes((scope, kind)) + msg_id).digest()


def refusal_name(reason: int) -> str:
    try:
        return sync_pb2.SyncRefusal.Reason.Name(reason).lower()
    except ValueError:
        return f"reason_{reason}"


class SyncSource(Protocol):
    """One inventory the syncer reconciles (the channel store, the held store).

    All three get wall-clock ``now_ms``. ``items`` lists what the source holds within
    retention as (expiry_ms, :func:`sync_id`); ``offer`` encodes the items among
    ``ids`` that ``peer`` may carry (unknown ids and what policy withholds are left
    out); ``take`` stores what ``peer`` handed over after checking each item as any
    input from a neighbour (expiry, hop limit, sizes, signatures where there are
    some) and returns how many it accepted.
    """

    @property
    def scope(self) -> int: ...

    async def items(self, now_ms: int) -> list[tuple[int, bytes]]: ...

    async def offer(self, peer: bytes, ids: Sequence[bytes], now_ms: int) -> list[bytes]: ...

    async def take(self, peer: bytes, items: Sequence[bytes], now_ms: int) -> int: ...


class SyncLimits(msgspec.Struct, frozen=True):
    """Bounds of every session (both roles) and of what one neighbour may ask for."""

    frame_size_limit: int = 32 * 1024
    """Largest negentropy message either way (bytes; the binding needs >= 4096)."""
    max_rounds: int = 24
    """Negentropy rounds per session."""
    max_ids: int = 20_000
    """have + need per session (initiator) and ids fetched + items pushed (responder)."""
    max_items: int = 100_000
    """Items per snapshot (40 bytes each in the engine); a bigger inventory syncs its
    latest-expiring part."""
    snapshot_max_age_s: float = 10.0
    """Responder: sessions opened within this long of a scope's last snapshot answer
    over that snapshot (one engine shared by every neighbour; at most
    ``session_idle_s / snapshot_max_age_s + 1`` snapshots per scope are alive). Items
    newer than it wait for the next session; gossip carries them live meanwhile."""
    batch_items: int = 256
    """Items (or ids) per SyncFetch / SyncPush call."""
    batch_bytes: int = 1024 * 1024
    """Bytes of items per SyncFetch answer / SyncPush call."""
    max_sessions: int = 32
    """Responder sessions open at once, all neighbours together."""
    session_rate: float = 0.2
    """Sessions a neighbour may open per second (token bucket refill)..."""
    session_burst: float = 6.0
    """...and at once (a link-up opens one per scope from each side)."""
    session_idle_s: float = 30.0
    """A responder session with no call for this long is closed."""
    round_timeout_s: float = 10.0
    """Initiator: longest wait for one answer (the driver's call timeout)."""

    def __post_init__(self) -> None:
        if self.frame_size_limit < 4096:
            raise ConfigError("sync: frame_size_limit must be >= 4096 (negentropy minimum)")
        if min(self.max_rounds, self.max_ids, self.max_items, self.batch_items) < 1:
            raise ConfigError("sync: round, id, item and batch limits must be >= 1")
        if self.batch_bytes < 1024 or self.max_sessions < 1:
            raise ConfigError("sync: batch_bytes must be >= 1024 and max_sessions >= 1")
        if self.session_rate <= 0 or self.session_burst < 1:
            raise ConfigError("sync: session_rate must be > 0 and session_burst >= 1")
        if self.session_idle_s <= 0 or self.round_timeout_s <= 0 or self.snapshot_max_age_s < 0:
            raise ConfigError("sync: timeouts must be > 0")


class SyncProtocolError(QpcError):
    """A peer's sync answer is malformed or over the limits (initiator side)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=StatusCode.INVALID_ARGUMENT)


class SyncRefused(QpcError):
    """The peer refused the session (its reason and retry time are kept)."""

    def __init__(self, reason: int, retry_after_ms: int) -> None:
        super().__init__(
            f"sync refused by peer: {refusal_name(reason)}", code=StatusCode.RESOURCE_EXHAUSTED
        )
        self.reason = reason
        self.retry_after_ms = retry_after_ms


class SyncStateError(QpcError):
    """An event the session's transition table has no entry for (a driver bug)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=StatusCode.INTERNAL)


# ---------------------------------------------------------------------------- tables


class IState(enum.Enum):
    NEW = "new"
    RECONCILING = "reconciling"  # a query is out, waiting for the answer
    RECONCILED = "reconciled"  # have/need known (all of it, or up to a cap)
    DONE = "done"
    FAILED = "failed"


class IEvent(enum.Enum):
    START = "start"  # first query built
    ANSWER_MORE = "answer_more"  # an answer that calls for another round
    ANSWER_DONE = "answer_done"  # negentropy finished
    CAPPED = "capped"  # rounds or ids used up: keep what was learnt
    REFUSED = "refused"
    BAD_ANSWER = "bad_answer"
    TIMEOUT = "timeout"
    TRANSFERRED = "transferred"  # pushes and fetches finished


INITIATOR_TRANSITIONS: MappingProxyType[tuple[IState, IEvent], IState] = MappingProxyType(
    {
        (IState.NEW, IEvent.START): IState.RECONCILING,
        (IState.RECONCILING, IEvent.ANSWER_MORE): IState.RECONCILING,
        (IState.RECONCILING, IEvent.ANSWER_DONE): IState.RECONCILED,
        (IState.RECONCILING, IEvent.CAPPED): IState.RECONCILED,
        (IState.RECONCILING, IEvent.REFUSED): IState.FAILED,
        (IState.RECONCILING, IEvent.BAD_ANSWER): IState.FAILED,
        (IState.RECONCILING, IEvent.TIMEOUT): IState.FAILED,
        (IState.RECONCILED, IEvent.TRANSFERRED): IState.DONE,
        (IState.RECONCILED, IEvent.REFUSED): IState.FAILED,
        (IState.RECONCILED, IEvent.BAD_ANSWER): IState.FAILED,
        (IState.RECONCILED, IEvent.TIMEOUT): IState.FAILED,
    }
)


class RState(enum.Enum):
    OPEN = "open"  # answering rounds; fetch and push allowed
    SETTLED = "settled"  # rounds used up: fetch and push only
    CLOSED = "closed"


class REvent(enum.Enum):
    ROUND = "round"
    LAST_ROUND = "last_round"
    TRANSFER = "transfer"
    CLOSE = "close"  # idle, replaced, malformed input, or over the id budget


RESPONDER_TRANSITIONS: MappingProxyType[tuple[RState, REvent], RState] = MappingProxyType(
    {
        (RState.OPEN, REvent.ROUND): RState.OPEN,
        (RState.OPEN, REvent.LAST_ROUND): RState.SETTLED,
        (RState.OPEN, REvent.TRANSFER): RState.OPEN,
        (RState.SETTLED, REvent.TRANSFER): RState.SETTLED,
        (RState.OPEN, REvent.CLOSE): RState.CLOSED,
        (RState.SETTLED, REvent.CLOSE): RState.CLOSED,
    }
)


# ---------------------------------------------------------------------------- stats


class SyncStatistics(msgspec.Struct, frozen=True):
    sessions_initiated: int
    sessions_completed: int  # reconciled in full and transferred
    sessions_capped: int  # stopped at the round or id cap (what was learnt still moved)
    sessions_failed: int  # refused, bad answer, timeout, or the link went away
    sessions_served: int  # opened here as responder
    sessions_open: int  # responder sessions open now
    rounds: int  # negentropy rounds, both roles
    bytes_sent: int  # sync messages and item batches (protobuf bytes), both roles
    bytes_received: int
    ids_have: int  # ids we had that a peer lacked (initiator side)
    ids_need: int  # ids a peer had that we lacked (initiator side)
    items_pushed: int  # items we handed to peers (pushes and fetch answers)
    items_taken: int  # items sources accepted from peers
    snapshot_truncated: int  # snapshots cut to max_items
    snapshots: int  # responder snapshots read from a source (shared by sessions opened soon after)
    refusals_sent: MappingProxyType[str, int]  # by reason (a flooding neighbour: rate_limited)
    refusals_received: MappingProxyType[str, int]
    bad_answers: int  # malformed or oversized answers refused on the initiator side
    last_session_s: float | None  # duration of the last session this node completed


class NeedItems(msgspec.Struct, frozen=True):
    """Responder: open the session with a snapshot of ``scope`` (call ``on_query`` again
    with ``items``)."""

    scope: int


# ---------------------------------------------------------------------------- helpers


def _refusal(reason: int, retry_after_ms: int = 0) -> sync_pb2.SyncRefusal:
    return sync_pb2.SyncRefusal(reason=reason, retry_after_ms=retry_after_ms)  # type: ignore[arg-type]


def snapshot(
    items: Iterable[tuple[int, bytes]], now_ms: int, max_items: int
) -> tuple[list[tuple[int, bytes]], bool]:
    """Items within retention (expiry > now_ms), at most ``max_items`` of the latest
    expiries; True if some were cut. Bad items (our own sources' bugs) raise."""
    live = [(ts, i) for ts, i in items if ts > now_ms]
    for ts, i in live:
        if ts > _TS_MAX or len(i) != ID_LEN:
            raise SyncError(f"bad inventory item ({ts}, {len(i)} bytes)")
    if len(live) <= max_items:
        return live, False
    live.sort()
    return live[-max_items:], True


def batches(items: Sequence[bytes], max_items: int, max_bytes: int) -> list[list[bytes]]:
    """Split ``items`` into batches of at most ``max_items`` and ``max_bytes`` (an item
    larger than ``max_bytes`` alone is left out: no batch could carry it)."""
    out: list[list[bytes]] = []
    cur: list[bytes] = []
    size = 0
    for it in items:
        if len(it) > max_bytes:
            continue
        if cur and (len(cur) >= max_items or size + len(it) > max_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += len(it)
    if cur:
        out.append(cur)
    return out


class _Counters:
    def __init__(self) -> None:
        self.initiated = self.completed = self.capped = self.failed = 0
        self.served = self.rounds = self.sent = self.received = 0
        self.have = self.need = self.pushed = self.taken = self.truncated = 0
        self.snapshots = 0
        self.bad_answers = 0
        self.last_session_s: float | None = None
        self.refusals_sent: Counter[str] = Counter()
        self.refusals_received: Counter[str] = Counter()


# ---------------------------------------------------------------------------- initiator


class InitiatorSession:
    """One session this node opened with ``peer`` for ``scope`` (see the module docstring).

    Driver loop: ``start`` -> send; ``on_answer`` -> next query or None; then
    ``push_requests`` (items from our source's ``offer(peer, have)``) and
    ``fetch_requests`` with their ``on_*_response``; ``finish``. Any exception out of
    ``on_*`` leaves the session FAILED; ``fail`` records a timeout or a lost link.
    """

    def __init__(
        self,
        core: SyncCore,
        peer: bytes,
        scope: int,
        items: Sequence[tuple[int, bytes]],
        session_id: bytes,
        now: float,
    ) -> None:
        self._core = core
        self._lim = core.limits
        self._c = core._c
        self.peer = peer
        self.scope = scope
        self.session_id = session_id
        self.started = now
        self.state = IState.NEW
        self.rounds = 0
        self.capped = False
        self._engine = Negentropy(items, self._lim.frame_size_limit)
        self._mine = {i for _, i in items}
        self._seen: set[bytes] = set()
        self.have: list[bytes] = []
        """Ids we hold that the peer lacks (to push, if our source offers them)."""
        self.need: list[bytes] = []
        """Ids the peer holds that we lack (to fetch)."""
        self.items_sent = 0
        self.items_received = 0
        self.accepted_by_peer = 0

    def _fire(self, event: IEvent) -> None:
        nxt = INITIATOR_TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise SyncStateError(
                f"sync session: no transition from {self.state.value} on {event.value}"
            )
        self.state = nxt
        if nxt is IState.FAILED:
            self._c.failed += 1
        elif nxt is IState.DONE:
            if self.capped:
                self._c.capped += 1
            else:
                self._c.completed += 1

    def _request(self, message: bytes) -> sync_pb2.SyncRequest:
        req = sync_pb2.SyncRequest(
            session_id=self.session_id,
            scope=self.scope,  # type: ignore[arg-type]
            message=message,
        )
        self._c.sent += req.ByteSize()
        self.rounds += 1
        self._c.rounds += 1
        return req

    def start(self) -> sync_pb2.SyncRequest:
        self._fire(IEvent.START)
        return self._request(self._engine.initiate())

    def _bad(self, message: str) -> SyncProtocolError:
        self._c.bad_answers += 1
        self._fire(IEvent.BAD_ANSWER)
        return SyncProtocolError(message)

    def _refused(self, refusal: sync_pb2.SyncRefusal) -> SyncRefused:
        self._c.refusals_received[refusal_name(refusal.reason)] += 1
        self._fire(IEvent.REFUSED)
        return SyncRefused(refusal.reason, refusal.retry_after_ms)

    def on_answer(self, resp: sync_pb2.SyncResponse) -> sync_pb2.SyncRequest | None:
        """The responder's answer: the next request, or None once reconciled (in full
        or up to the caps). Raises SyncRefused or SyncProtocolError (session FAILED)."""
        if self.state is not IState.RECONCILING:
            raise SyncStateError(f"sync session: answer while {self.state.value}")
        self._c.received += resp.ByteSize()
        kind = resp.WhichOneof("result")
        if kind == "refusal":
            raise self._refused(resp.refusal)
        if kind != "message":
            raise self._bad("sync answer holds neither a message nor a refusal")
        if len(resp.message) > self._lim.frame_size_limit:
            raise self._bad(f"sync answer of {len(resp.message)} bytes over the frame limit")
        try:
            nxt, have, need = self._engine.reconcile_with_ids(resp.message)
        except SyncError as exc:
            raise self._bad(f"malformed negentropy answer: {exc}") from None
        # A peer may list ids in any range: ids we hold are not needed (see _core.pyi).
        # An id can come back in a later round (an answer cut at the frame limit ends
        # with a fingerprint over the rest, which the next round splits again).
        have = [i for i in have if i not in self._seen]
        self._seen.update(have)
        need = [i for i in need if i not in self._mine and i not in self._seen]
        self._seen.update(need)
        self.have.extend(have)
        self.need.extend(need)
        self._c.have += len(have)
        self._c.need += len(need)
        if nxt is None:
            self._fire(IEvent.ANSWER_DONE)
            return None
        if (
            self.rounds >= self._lim.max_rounds
            or len(self.have) + len(self.need) >= self._lim.max_ids
        ):
            self.capped = True
            self._trim()
            self._fire(IEvent.CAPPED)
            return None
        self._fire(IEvent.ANSWER_MORE)
        return self._request(nxt)

    def _trim(self) -> None:
        room = self._lim.max_ids
        self.need = self.need[:room]
        self.have = self.have[: max(0, room - len(self.need))]

    def push_requests(self, items: Sequence[bytes]) -> list[sync_pb2.SyncPushRequest]:
        """Batches of the items our source offered for the peer (what it lacks)."""
        self._require(IState.RECONCILED)
        reqs = [
            sync_pb2.SyncPushRequest(
                session_id=self.session_id,
                scope=self.scope,  # type: ignore[arg-type]
                items=b,
            )
            for b in batches(items, self._lim.batch_items, self._lim.batch_bytes)
        ]
        for r in reqs:
            self._c.sent += r.ByteSize()
            self.items_sent += len(r.items)
            self._c.pushed += len(r.items)
        return reqs

    def on_push_response(self, resp: sync_pb2.SyncPushResponse, pushed: int) -> int:
        self._require(IState.RECONCILED)
        self._c.received += resp.ByteSize()
        if resp.HasField("refusal"):
            raise self._refused(resp.refusal)
        if resp.accepted > pushed:
            raise self._bad(f"peer accepted {resp.accepted} of {pushed} pushed items")
        self.accepted_by_peer += resp.accepted
        return resp.accepted

    def fetch_requests(self) -> list[sync_pb2.SyncFetchRequest]:
        """Batches of the ids we need."""
        self._require(IState.RECONCILED)
        n = self._lim.batch_items
        reqs = [
            sync_pb2.SyncFetchRequest(
                session_id=self.session_id,
                scope=self.scope,  # type: ignore[arg-type]
                ids=self.need[k : k + n],
            )
            for k in range(0, len(self.need), n)
        ]
        for r in reqs:
            self._c.sent += r.ByteSize()
        return reqs

    def on_fetch_response(self, resp: sync_pb2.SyncFetchResponse, asked: int) -> list[bytes]:
        """The items the peer gave (to hand to our source's ``take``)."""
        self._require(IState.RECONCILED)
        self._c.received += resp.ByteSize()
        if resp.HasField("refusal"):
            raise self._refused(resp.refusal)
        if len(resp.items) > asked:
            raise self._bad(f"peer answered {len(resp.items)} items for {asked} ids")
        size = sum(len(i) for i in resp.items)
        if size > self._lim.batch_bytes:
            raise self._bad(f"fetch answer of {size} bytes over the batch limit")
        self.items_received += len(resp.items)
        return list(resp.items)

    def note_taken(self, accepted: int) -> None:
        self._c.taken += accepted

    def finish(self, now: float) -> None:
        """Pushes and fetches are over (records the session's duration)."""
        self._fire(IEvent.TRANSFERRED)
        self._c.last_session_s = now - self.started

    def fail(self) -> None:
        """A timeout or a lost link (a no-op once the session ended)."""
        if self.state in (IState.RECONCILING, IState.RECONCILED):
            self._fire(IEvent.TIMEOUT)

    def _require(self, state: IState) -> None:
        if self.state is not state:
            raise SyncStateError(f"sync session: {self.state.value}, not {state.value}")


# ---------------------------------------------------------------------------- responder


class _Served:
    __slots__ = ("engine", "ids", "last", "rounds", "session_id", "state")

    def __init__(self, session_id: bytes, engine: Negentropy, now: float) -> None:
        self.session_id = session_id
        self.engine = engine
        self.state = RState.OPEN
        self.rounds = 0
        self.ids = 0
        self.last = now

    def fire(self, event: REvent) -> None:
        nxt = RESPONDER_TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise SyncStateError(
                f"served session: no transition from {self.state.value} on {event.value}"
            )
        self.state = nxt


class SyncCore:
    """The sync decisions of one node: sessions it serves, sessions it opens, counters."""

    def __init__(
        self,
        limits: SyncLimits | None = None,
        *,
        scopes: Collection[int] = (SCOPE_CHANNELS, SCOPE_HELD),
        rand: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.limits = limits or SyncLimits()
        self.scopes = frozenset(scopes)
        self._rand = rand
        self._c = _Counters()
        self._served: dict[tuple[bytes, int], _Served] = {}
        self._pending: set[tuple[bytes, int, bytes]] = set()
        self._snapshots: dict[int, tuple[Negentropy, float]] = {}
        self._opens = TokenBucketLimiter[bytes](
            rate=self.limits.session_rate, burst=self.limits.session_burst, max_keys=4096
        )

    # -------------------------------------------------------------- initiator
    def begin(
        self,
        peer: bytes,
        scope: int,
        items: Iterable[tuple[int, bytes]],
        now: float,
        now_ms: int,
    ) -> InitiatorSession:
        """A new session with ``peer`` over our ``items`` of ``scope`` (call ``start``)."""
        snap, cut = snapshot(items, now_ms, self.limits.max_items)
        self._c.truncated += cut
        self._c.initiated += 1
        return InitiatorSession(self, peer, scope, snap, self._rand(SESSION_ID_LEN), now)

    # -------------------------------------------------------------- responder
    def _refuse(self, reason: int, retry_after_ms: int = 0) -> sync_pb2.SyncRefusal:
        self._c.refusals_sent[refusal_name(reason)] += 1
        return _refusal(reason, retry_after_ms)

    def _answer(self, resp: sync_pb2.SyncResponse) -> sync_pb2.SyncResponse:
        self._c.sent += resp.ByteSize()
        return resp

    def _close(self, key: tuple[bytes, int]) -> None:
        s = self._served.pop(key, None)
        if s is not None:
            s.fire(REvent.CLOSE)

    def on_query(
        self,
        peer: bytes,
        req: sync_pb2.SyncRequest,
        now: float,
        now_ms: int,
        items: Iterable[tuple[int, bytes]] | None = None,
    ) -> sync_pb2.SyncResponse | NeedItems:
        """A ``Sync`` call from ``peer``: the answer, a refusal, or :class:`NeedItems`
        when it opens a session (then call again with the scope's items)."""
        if items is None:
            self._c.received += req.ByteSize()
        self.expire(now)
        if len(req.session_id) != SESSION_ID_LEN:
            return self._answer(sync_pb2.SyncResponse(refusal=self._refuse(Reason.MALFORMED)))
        if req.scope not in self.scopes:
            return self._answer(sync_pb2.SyncResponse(refusal=self._refuse(Reason.UNKNOWN_SCOPE)))
        if len(req.message) > self.limits.frame_size_limit:
            return self._answer(sync_pb2.SyncResponse(refusal=self._refuse(Reason.TOO_LARGE)))
        key = (peer, int(req.scope))
        s = self._served.get(key)
        if s is None or s.session_id != req.session_id:
            opened = self._open(peer, key, req, now, now_ms, items)
            if not isinstance(opened, _Served):
                return opened
            s = opened
        if s.state is not RState.OPEN:
            return self._answer(sync_pb2.SyncResponse(refusal=self._refuse(Reason.TOO_MANY_ROUNDS)))
        try:
            out = s.engine.reconcile(req.message)
        except SyncError:
            self._close(key)
            return self._answer(sync_pb2.SyncResponse(refusal=self._refuse(Reason.MALFORMED)))
        s.rounds += 1
        s.last = now
        self._c.rounds += 1
        s.fire(REvent.LAST_ROUND if s.rounds >= self.limits.max_rounds else REvent.ROUND)
        return self._answer(sync_pb2.SyncResponse(message=out))

    def _open(
        self,
        peer: bytes,
        key: tuple[bytes, int],
        req: sync_pb2.SyncRequest,
        now: float,
        now_ms: int,
        items: Iterable[tuple[int, bytes]] | None,
    ) -> _Served | sync_pb2.SyncResponse | NeedItems:
        pend = (peer, key[1], bytes(req.session_id))
        if items is None:
            if pend in self._pending:
                return NeedItems(key[1])  # a duplicate while the snapshot is read
            if (
                key not in self._served
                and len(self._served) + len(self._pending) >= self.limits.max_sessions
            ):
                return self._answer(
                    sync_pb2.SyncResponse(refusal=self._refuse(Reason.BUSY, self._busy_ms()))
                )
            d = self._opens.check(peer, now)
            if not d.allowed:
                return self._answer(
                    sync_pb2.SyncResponse(
                        refusal=self._refuse(Reason.RATE_LIMITED, int(d.retry_after * 1000) + 1)
                    )
                )
            shared = self._snapshots.get(key[1])
            if shared is not None and now - shared[1] < self.limits.snapshot_max_age_s:
                return self._install(key, req, shared[0], now)
            self._pending.add(pend)
            return NeedItems(key[1])
        if pend not in self._pending:
            raise SyncStateError("sync: items for a session that was not admitted")
        self._pending.discard(pend)
        snap, cut = snapshot(items, now_ms, self.limits.max_items)
        self._c.truncated += cut
        self._c.snapshots += 1
        engine = Negentropy(snap, self.limits.frame_size_limit)
        self._snapshots[key[1]] = (engine, now)
        return self._install(key, req, engine, now)

    def _install(
        self, key: tuple[bytes, int], req: sync_pb2.SyncRequest, engine: Negentropy, now: float
    ) -> _Served:
        self._close(key)  # a new session for a scope replaces the peer's old one
        s = _Served(bytes(req.session_id), engine, now)
        self._served[key] = s
        self._c.served += 1
        return s

    def abandon(self, peer: bytes, req: sync_pb2.SyncRequest) -> None:
        """The driver could not read the snapshot it was asked for: forget the admission."""
        self._pending.discard((peer, int(req.scope), bytes(req.session_id)))

    def _busy_ms(self) -> int:
        return int(self.limits.session_idle_s * 1000)

    def _session_for(
        self, peer: bytes, session_id: bytes, scope: int, now: float
    ) -> _Served | sync_pb2.SyncRefusal:
        self.expire(now)
        if len(session_id) != SESSION_ID_LEN:
            return self._refuse(Reason.MALFORMED)
        s = self._served.get((peer, scope))
        if s is None or s.session_id != session_id:
            return self._refuse(Reason.UNKNOWN_SESSION)
        return s

    def on_fetch(
        self, peer: bytes, req: sync_pb2.SyncFetchRequest, now: float
    ) -> list[bytes] | sync_pb2.SyncFetchResponse:
        """A ``SyncFetch`` from ``peer``: the ids to ask our source's ``offer`` for, or
        the refusal to send. Then :meth:`fetch_answer` builds the response."""
        self._c.received += req.ByteSize()
        s = self._session_for(peer, req.session_id, int(req.scope), now)
        if isinstance(s, sync_pb2.SyncRefusal):
            return self._fetch_out(sync_pb2.SyncFetchResponse(refusal=s))
        if len(req.ids) > self.limits.batch_items:
            return self._fetch_out(
                sync_pb2.SyncFetchResponse(refusal=self._refuse(Reason.TOO_LARGE))
            )
        if any(len(i) != ID_LEN for i in req.ids):
            self._close((peer, int(req.scope)))
            return self._fetch_out(
                sync_pb2.SyncFetchResponse(refusal=self._refuse(Reason.MALFORMED))
            )
        if s.ids + len(req.ids) > self.limits.max_ids:
            self._close((peer, int(req.scope)))
            return self._fetch_out(
                sync_pb2.SyncFetchResponse(refusal=self._refuse(Reason.TOO_MANY_IDS))
            )
        s.ids += len(req.ids)
        s.last = now
        s.fire(REvent.TRANSFER)
        return list(dict.fromkeys(req.ids))

    def fetch_answer(self, asked: int, items: Sequence[bytes]) -> sync_pb2.SyncFetchResponse:
        """The answer to a fetch of ``asked`` ids with what our source offered (cut to
        the batch limits: a source that offers more is not trusted to be right)."""
        fit = batches(items[:asked], self.limits.batch_items, self.limits.batch_bytes)
        out = fit[0] if fit else []
        self._c.pushed += len(out)
        return self._fetch_out(sync_pb2.SyncFetchResponse(items=out))

    def _fetch_out(self, resp: sync_pb2.SyncFetchResponse) -> sync_pb2.SyncFetchResponse:
        self._c.sent += resp.ByteSize()
        return resp

    def on_push(
        self, peer: bytes, req: sync_pb2.SyncPushRequest, now: float
    ) -> list[bytes] | sync_pb2.SyncPushResponse:
        """A ``SyncPush`` from ``peer``: the items to hand our source's ``take``, or the
        refusal to send. Then :meth:`push_answer`."""
        self._c.received += req.ByteSize()
        s = self._session_for(peer, req.session_id, int(req.scope), now)
        if isinstance(s, sync_pb2.SyncRefusal):
            return self._push_out(sync_pb2.SyncPushResponse(refusal=s))
        size = sum(len(i) for i in req.items)
        if len(req.items) > self.limits.batch_items or size > self.limits.batch_bytes:
            return self._push_out(sync_pb2.SyncPushResponse(refusal=self._refuse(Reason.TOO_LARGE)))
        if s.ids + len(req.items) > self.limits.max_ids:
            self._close((peer, int(req.scope)))
            return self._push_out(
                sync_pb2.SyncPushResponse(refusal=self._refuse(Reason.TOO_MANY_IDS))
            )
        s.ids += len(req.items)
        s.last = now
        s.fire(REvent.TRANSFER)
        return list(req.items)

    def push_answer(self, accepted: int) -> sync_pb2.SyncPushResponse:
        self._c.taken += accepted
        return self._push_out(sync_pb2.SyncPushResponse(accepted=accepted))

    def _push_out(self, resp: sync_pb2.SyncPushResponse) -> sync_pb2.SyncPushResponse:
        self._c.sent += resp.ByteSize()
        return resp

    # -------------------------------------------------------------- timers
    def expire(self, now: float) -> None:
        """Close responder sessions idle for ``session_idle_s``."""
        idle = self.limits.session_idle_s
        for key in [k for k, s in self._served.items() if now - s.last >= idle]:
            self._close(key)
        age = self.limits.snapshot_max_age_s
        for scope in [k for k, (_, t) in self._snapshots.items() if now - t >= age]:
            del self._snapshots[scope]  # sessions still on it keep their reference

    def next_deadline(self) -> float | None:
        if not self._served:
            return None
        return min(s.last for s in self._served.values()) + self.limits.session_idle_s

    def link_down(self, peer: bytes) -> None:
        """Sessions the neighbour had open here end with its link."""
        for key in [k for k in self._served if k[0] == peer]:
            self._close(key)

    def open_sessions(self) -> int:
        return len(self._served)

    def statistics(self) -> SyncStatistics:
        c = self._c
        return SyncStatistics(
            sessions_initiated=c.initiated,
            sessions_completed=c.completed,
            sessions_capped=c.capped,
            sessions_failed=c.failed,
            sessions_served=c.served,
            sessions_open=len(self._served),
            rounds=c.rounds,
            bytes_sent=c.sent,
            bytes_received=c.received,
            ids_have=c.have,
            ids_need=c.need,
            items_pushed=c.pushed,
            items_taken=c.taken,
            snapshot_truncated=c.truncated,
            snapshots=c.snapshots,
            refusals_sent=MappingProxyType(dict(c.refusals_sent)),
            refusals_received=MappingProxyType(dict(c.refusals_received)),
            bad_answers=c.bad_answers,
            last_session_s=c.last_session_s,
        )
