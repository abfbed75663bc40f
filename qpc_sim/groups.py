"""A sans-IO harness for MLS groups on a mesh: N GroupCores over the REAL Rust MLS core.

Virtual clock (a heap of events), seeded randomness: every delivery gets a delay drawn
from U(min_delay, max_delay) (so messages arrive shuffled), a share of them arrives
twice, and a share of commit deliveries can be lost (a member then pulls them). Each
member is an ``Identity`` in its own temp dir (``durable=False``) with one ``Group`` and
one :class:`~qpc_node.groups.core.GroupCore`; the harness plays the driver the client
plays in production (qpc_node/client): it runs the MLS calls the core's actions ask
for, holds what cannot be processed yet and retries it, and accounts every application
message: ``undecryptable`` counts those a member should have read and could not.

The node is abstracted to "stores a commit after ``ack_delay_ms``": the committer merges
only then and sends Welcomes after the merge, as the client does.

Extension points for partitions (tests/sim/test_groups_partition.py): ``blocked(src, dst,
now_ms)`` holds a delivery back (re-tried every ``blocked_retry_ms``) while it is true,
and subclasses may override ``on_mls_event`` / ``deliver_mls``.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qpc_node import crypto
from qpc_node.client.groups import note_from_pb, note_to_pb
from qpc_node.client.mlsheader import InvalidMlsHeader, MlsHeader, parse_header
from qpc_node.groups.core import (
    Action,
    Commit,
    CommitInfo,
    GroupConfig,
    GroupCore,
    IntentKind,
    Propose,
    Prune,
    Resend,
    SendIntent,
    SendPull,
    Warn,
    topped_up,
)
from qpc_node.wire.gen.qpc.v1 import client_pb2

__all__ = ["GroupSim", "SimConfig", "SimMember", "SimReport"]

MAX_HELD_TRIES = 50
"""A held message retried this many times (after each processed message) is given up."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    members: int = 50
    seed: int = 0
    min_delay_ms: int = 5
    max_delay_ms: int = 3_000
    dup_rate: float = 0.1
    commit_loss: float = 0.0
    """Probability that one delivery of a commit is lost (the member pulls it)."""
    ack_delay_ms: int = 50
    blocked_retry_ms: int = 1_000
    group: GroupConfig = field(
        default_factory=lambda: GroupConfig(
            quiescence_ms=500, max_commit_delay_ms=3_000, pull_after_ms=4_000
        )
    )


@dataclass(slots=True)
class _Held:
    msg_id: bytes
    sender: int
    data: bytes
    app_id: bytes | None
    tries: int = 0
    header: MlsHeader | None = None
    """``parse_header(data)`` once parsed: a held message is looked at again after every
    message its member processes, and ``data`` never changes."""
    digest: bytes | None = None
    """SHA-256 of ``data`` once computed (the partition harness's branch-tag lookup)."""
    content_type: int | None = None
    """The clear content type once read (partition harness)."""

    def parsed(self) -> MlsHeader:
        """``parse_header(data)``, parsed once (InvalidMlsHeader every time if bad)."""
        if self.header is None:
            self.header = parse_header(self.data)
        return self.header


@dataclass(slots=True)
class SimMember:
    index: int
    ident: crypto.Identity
    fpr: str
    group: crypto.Group | None = None
    core: GroupCore | None = None
    held: list[_Held] = field(default_factory=list)
    seen: set[bytes] = field(default_factory=set)
    read: set[bytes] = field(default_factory=set)
    """App ids of the texts this member decrypted."""
    deferred: list[Callable[[], None]] = field(default_factory=list)
    """Sends waiting for our pending commit to merge (MLS refuses them meanwhile)."""
    commit_pending: tuple[bytes, bytes | None] | None = None
    """(commit, welcome) of our commit awaiting the node's ack."""
    warnings: list[str] = field(default_factory=list)
    left: bool = False
    tick_at: int | None = None


@dataclass(frozen=True, slots=True)
class SimReport:
    texts_sent: int
    deliveries_expected: int
    undecryptable: int
    """Texts some member should have read (a member at send time, still one at the
    end) and did not, plus decryption failures of texts."""
    stale_handshakes: int
    """Proposals/commits of an epoch already left (harmless: re-proposed)."""
    epochs: tuple[int, ...]
    authenticators: int
    """Distinct epoch authenticators among the active members (1 = converged)."""
    commits: int
    pulls: int
    reproposals: int
    events: int
    virtual_ms: int


def commit_info(
    g: crypto.Group, ev: crypto.Event, sender: str, message: bytes, parent_epoch: int | None = None
) -> CommitInfo:
    """The core's record of a commit just merged into ``g`` (ours or received): one
    reading of the Event for every site of the harnesses."""
    return CommitInfo(
        parent_epoch=g.epoch - 1 if parent_epoch is None else parent_epoch,
        sender=sender,
        covered=tuple(ev.covered),
        added=tuple(ev.added),
        removed=tuple(ev.removed_members),
        committers=tuple(g.committers()) if not ev.removed else (),
        members=tuple(g.members()) if not ev.removed else (),
        authenticator=ev.authenticator,
        message=message,
        removed_us=ev.removed,
    )


class GroupSim:
    """N members of one group, their network and their node acks (see module doc)."""

    def __init__(self, cfg: SimConfig, *, workdir: Path | None = None) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.now = 0
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = 0
        self._tmp = tempfile.TemporaryDirectory() if workdir is None else None
        self._dir: Path = Path(self._tmp.name) if self._tmp is not None else Path(str(workdir))
        self.members: list[SimMember] = []
        self.by_fpr: dict[str, SimMember] = {}
        self.blocked: Callable[[int, int, int], bool] = lambda _s, _d, _t: False
        self.sent_texts: dict[bytes, tuple[int, frozenset[str]]] = {}
        """app id -> (sender index, fingerprints of the other members then)."""
        self.failed_texts: list[tuple[int, bytes]] = []
        self.stale = 0
        self.events = 0
        self.commits_made = 0
        self._resends = 0
        self.group_id = b""

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- setup --------------------------------------------------------------------
    def new_member(self) -> SimMember:
        i = len(self.members)
        d = self._dir / f"m{i}"
        ident = crypto.Identity.create(d, os.urandom(32), durable=False)
        m = SimMember(i, ident, ident.fingerprint)
        self.members.append(m)
        self.by_fpr[m.fpr] = m
        return m

    def setup(self) -> None:
        """Member 0 creates the group and adds the others in one commit."""
        c0 = self.new_member()
        others = [self.new_member() for _ in range(self.cfg.members - 1)]
        g = c0.ident.create_group()
        if others:
            roster = [c0.fpr, *(o.fpr for o in others)]
            committers = topped_up([c0.fpr], roster, self.cfg.group.max_committers)
            commit, welcome = g.add([o.ident.key_package() for o in others], list(committers))
            del commit  # nobody else is in the group yet
            g.merge_pending_commit()
            for o in others:
                o.group = o.ident.join(welcome)
        c0.group = g
        self.group_id = bytes(g.group_id)
        for m in [c0, *others]:
            m.core = self._core_for(m)

    def _core_for(self, m: SimMember) -> GroupCore:
        g = m.group
        assert g is not None
        return GroupCore(
            me=m.fpr,
            epoch=g.epoch,
            members=tuple(g.members()),
            stored_committers=tuple(g.committers()),
            now_ms=self.now,
            config=self.cfg.group,
        )

    # -- event loop ------------------------------------------------------------------
    def at(self, t: int, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(t, self.now), self._seq, fn))

    def run(self, until_ms: int | None = None, max_events: int = 2_000_000) -> None:
        """Run events (up to ``until_ms`` of virtual time, or until none is left)."""
        n = 0
        while self._heap and n < max_events:
            t, _s, fn = self._heap[0]
            if until_ms is not None and t > until_ms:
                break
            heapq.heappop(self._heap)
            self.now = t
            fn()
            n += 1
            self.events += 1
        if until_ms is not None:
            self.now = max(self.now, until_ms)

    def _delay(self) -> int:
        return self.rng.randint(self.cfg.min_delay_ms, self.cfg.max_delay_ms)

    def _send_mls(
        self,
        src: SimMember,
        dst: SimMember,
        data: bytes,
        *,
        app_id: bytes | None = None,
        commit: bool = False,
        msg_id: bytes | None = None,
    ) -> None:
        mid = msg_id or hashlib.sha256(data + dst.fpr.encode()).digest()[:16]
        copies = 2 if self.rng.random() < self.cfg.dup_rate else 1
        for _ in range(copies):
            if commit and self.rng.random() < self.cfg.commit_loss:
                continue
            self._schedule_delivery(
                src.index, dst.index, mid, data, app_id, self.now + self._delay()
            )

    def _schedule_delivery(
        self, src: int, dst: int, mid: bytes, data: bytes, app_id: bytes | None, t: int
    ) -> None:
        def go() -> None:
            if self.blocked(src, dst, self.now):
                self._schedule_delivery(
                    src, dst, mid, data, app_id, self.now + self.cfg.blocked_retry_ms
                )
                return
            self.deliver_mls(self.members[dst], src, mid, data, app_id)

        self.at(t, go)

    def _broadcast(
        self,
        src: SimMember,
        data: bytes,
        *,
        app_id: bytes | None = None,
        commit: bool = False,
        to: Sequence[str] | None = None,
    ) -> None:
        assert src.group is not None
        for fpr in to if to is not None else src.group.members():
            if fpr != src.fpr and fpr in self.by_fpr:
                self._send_mls(src, self.by_fpr[fpr], data, app_id=app_id, commit=commit)

    # -- member API (what the tests drive) -------------------------------------------------
    def send_text(self, i: int) -> bytes | None:
        """Member i sends a text to the group now (deferred while its commit is pending);
        the app id it will be recognised by, or None if i is not in the group."""
        m = self.members[i]
        if m.group is None or m.core is None or m.core.removed or m.left:
            return None
        app_id = os.urandom(8)
        self._do_or_defer(m, lambda: self._send_text_now(m, app_id))
        return app_id

    def _send_text_now(self, m: SimMember, app_id: bytes) -> None:
        g = m.group
        if g is None or m.core is None or m.core.removed:
            return
        others = frozenset(f for f in g.members() if f != m.fpr)
        msg = client_pb2.AppMessage(text=app_id.hex(), sent_ms=self.now)
        ct = g.encrypt(msg.SerializeToString())
        self.sent_texts[app_id] = (m.index, others)
        self._broadcast(m, ct, app_id=app_id)

    def _do_or_defer(self, m: SimMember, fn: Callable[[], None]) -> None:
        if m.commit_pending is not None:
            m.deferred.append(fn)
        else:
            fn()

    def request(self, i: int, kind: IntentKind, target: str = "") -> bytes:
        """Member i asks for a membership change; its intent id."""
        m = self.members[i]
        assert m.core is not None
        iid, actions = m.core.request(kind, target, self.now)
        self.apply(m, actions)
        return iid

    # -- the driver: actions -> MLS calls and sends -------------------------------------
    def apply(self, m: SimMember, actions: Sequence[Action]) -> None:
        for a in actions:
            self._apply_one(m, a)
        self._schedule_tick(m)

    def _apply_one(self, m: SimMember, a: Action) -> None:
        g, core = m.group, m.core
        assert g is not None and core is not None
        if isinstance(a, Propose):
            self._do_or_defer(m, lambda: self._propose(m, a))
        elif isinstance(a, Commit):
            self._commit(m, a)
        elif isinstance(a, SendIntent):
            body = client_pb2.AppMessage(intent=note_to_pb(a.note))
            self._do_or_defer(m, lambda: self._app_broadcast(m, body))
        elif isinstance(a, SendPull):
            body = client_pb2.AppMessage(pull=client_pb2.CommitPull(from_epoch=a.from_epoch))
            self._do_or_defer(m, lambda: self._app_to(m, body, a.to))
        elif isinstance(a, Resend):
            dst = self.by_fpr.get(a.to)
            if dst is not None:
                for data in a.messages:
                    # A new envelope (the client's outbox gives each its own id): the
                    # puller may have seen this commit before and given it up.
                    self._resends += 1
                    mid = hashlib.sha256(
                        data + dst.fpr.encode() + self._resends.to_bytes(8, "big")
                    ).digest()[:16]
                    self._send_mls(m, dst, data, commit=True, msg_id=mid)
        elif isinstance(a, Prune):
            g.prune_past_epochs(a.keep)
        elif isinstance(a, Warn):
            m.warnings.append(a.text)

    def _app_broadcast(self, m: SimMember, body: client_pb2.AppMessage) -> None:
        if m.group is None or (m.core is not None and m.core.removed):
            return
        self._broadcast(m, m.group.encrypt(body.SerializeToString()))

    def _app_to(self, m: SimMember, body: client_pb2.AppMessage, to: str) -> None:
        if m.group is None or to not in self.by_fpr:
            return
        self._send_mls(m, self.by_fpr[to], m.group.encrypt(body.SerializeToString()))

    def _propose(self, m: SimMember, a: Propose) -> None:
        g, core = m.group, m.core
        assert g is not None and core is not None
        if core.removed:
            return
        try:
            if a.kind is IntentKind.ADD:
                joiner = self.by_fpr.get(a.target)
                if joiner is None:
                    raise crypto.MlsArgumentError("unknown joiner")
                msg, ref = g.propose_add(joiner.ident.key_package())
            elif a.kind is IntentKind.REMOVE:
                msg, ref = g.propose_remove(a.target)
            elif a.kind is IntentKind.UPDATE:
                msg, ref = g.propose_update()
            else:
                msg, ref = g.propose_leave()
        except crypto.MlsError as exc:
            self.apply(m, core.propose_failed(a.intent_id, str(exc), self.now))
            return
        self._broadcast(m, msg)
        self.apply(m, core.proposed(a.intent_id, ref, self.now))

    def _commit(self, m: SimMember, a: Commit) -> None:
        g, core = m.group, m.core
        assert g is not None and core is not None
        before = tuple(g.members())
        try:
            commit, welcome = g.commit_pending(a.committers)
        except crypto.MlsError as exc:
            m.warnings.append(f"commit failed: {exc}")
            g.clear_proposals()
            self.apply(m, core.commit_failed(self.now))
            return
        self.commits_made += 1
        m.commit_pending = (commit, welcome)
        self._broadcast(m, commit, commit=True, to=before)
        self.at(self.now + self.cfg.ack_delay_ms, lambda: self._acked(m, commit))

    def _acked(self, m: SimMember, commit: bytes) -> None:
        """The node stored our commit's fan-out: merge, then Welcome the joiners."""
        g, core = m.group, m.core
        assert g is not None and core is not None
        if m.commit_pending is None or not g.has_pending_commit():
            m.commit_pending = None  # superseded by a commit we received
            self._flush_deferred(m)
            return
        _commit, welcome = m.commit_pending
        parent = g.epoch
        ev = g.merge_pending_commit()
        m.commit_pending = None
        if welcome is not None:
            for f in ev.added:
                self._send_welcome(m, self.by_fpr[f], welcome)
        info = commit_info(g, ev, m.fpr, commit, parent)
        self.apply(m, core.on_commit(info, self.now))
        self._after_commit(m, info.added)
        self._flush_deferred(m)
        self._retry_held(m)

    def _after_commit(self, m: SimMember, added: Sequence[str]) -> None:
        """``m`` merged a commit that added ``added`` (Stage B harness: owed resends)."""

    def _flush_deferred(self, m: SimMember) -> None:
        todo, m.deferred = m.deferred, []
        for fn in todo:
            self._do_or_defer(m, fn)

    def _send_welcome(self, src: SimMember, dst: SimMember, welcome: bytes) -> None:
        def go() -> None:
            if self.blocked(src.index, dst.index, self.now):
                self.at(self.now + self.cfg.blocked_retry_ms, go)
                return
            self._joined(dst, welcome)

        for _ in range(2 if self.rng.random() < self.cfg.dup_rate else 1):
            self.at(self.now + self._delay(), go)

    def _joined(self, m: SimMember, welcome: bytes) -> None:
        if m.group is not None:
            return  # a duplicate
        try:
            m.group = m.ident.join(welcome)
        except crypto.MlsError as exc:
            m.warnings.append(f"welcome failed: {exc}")
            return
        m.core = self._core_for(m)
        self._retry_held(m)
        self._schedule_tick(m)

    def _schedule_tick(self, m: SimMember) -> None:
        if m.core is None:
            return
        t = m.core.next_deadline()
        if t is None or (m.tick_at is not None and m.tick_at <= t and m.tick_at >= self.now):
            return
        m.tick_at = t

        def go() -> None:
            if m.tick_at != t or m.core is None:
                return
            m.tick_at = None
            self.apply(m, m.core.tick(self.now))

        self.at(t, go)

    # -- receiving ----------------------------------------------------------------------
    def deliver_mls(
        self, m: SimMember, src: int, mid: bytes, data: bytes, app_id: bytes | None
    ) -> None:
        if mid in m.seen:
            return  # a duplicate (the client's seen table)
        m.seen.add(mid)
        h = _Held(mid, src, data, app_id)
        if self._process(m, h) == "hold":
            m.held.append(h)
        else:
            self._retry_held(m)

    def _retry_held(self, m: SimMember) -> None:
        for _ in range(8):
            progress = False
            for h in list(m.held):
                r = self._process(m, h)
                if r == "hold":
                    h.tries += 1
                    if h.tries > MAX_HELD_TRIES and m.group is not None:
                        m.held.remove(h)
                        self._fail(m, h)
                    continue
                m.held.remove(h)
                progress = True
            if not progress:
                break

    def _fail(self, m: SimMember, h: _Held) -> None:
        if h.app_id is not None:
            self.failed_texts.append((m.index, h.app_id))

    def _process(self, m: SimMember, h: _Held) -> str:
        """'done', 'hold' (retry later) or 'failed'."""
        g, core = m.group, m.core
        if g is None or core is None:
            return "hold"  # our Welcome is on the way
        if core.removed:
            return "done"
        try:
            header = h.parsed()
        except InvalidMlsHeader:
            self._fail(m, h)
            return "failed"
        if header.epoch > g.epoch:
            self.apply(m, core.on_future(header.epoch, self.now))
            return "hold"
        try:
            ev = g.process(h.data)
        except crypto.WrongEpoch:
            if header.epoch > g.epoch:
                return "hold"
            if h.app_id is not None:
                self._fail(m, h)
            else:
                self.stale += 1
            return "failed"
        except crypto.MlsError:
            if header.epoch == g.epoch and h.app_id is None and h.tries < MAX_HELD_TRIES:
                # A commit naming a proposal we have not received yet: retry after it.
                return "hold"
            if h.app_id is not None:
                self._fail(m, h)
            else:
                self.stale += 1
            return "failed"
        self.on_mls_event(m, ev, h)
        return "done"

    def on_mls_event(self, m: SimMember, ev: crypto.Event, h: _Held) -> None:
        g, core = m.group, m.core
        assert g is not None and core is not None
        if ev.kind == "application":
            self._application(m, ev, h)
        elif ev.kind == "proposal":
            self.apply(m, core.on_proposal(ev.sender, ev.proposal_ref, ev.epoch, self.now))
        else:
            if m.commit_pending is not None:
                # Someone else's commit won our epoch (a stand-in raced us): ours is void.
                m.commit_pending = None
                core.commit_superseded()
                self._flush_deferred(m)
            info = commit_info(g, ev, ev.sender, h.data)
            self.apply(m, core.on_commit(info, self.now))
            self._after_commit(m, info.added)

    def _application(self, m: SimMember, ev: crypto.Event, h: _Held) -> None:
        core = m.core
        assert core is not None
        app = client_pb2.AppMessage.FromString(ev.data)
        which = app.WhichOneof("body")
        if which == "text":
            m.read.add(bytes.fromhex(app.text))
        elif which == "intent":
            note = note_from_pb(app.intent)
            if note is not None:
                self.apply(m, core.on_intent(ev.sender, note, self.now))
        elif which == "pull":
            self.apply(m, core.on_pull(ev.sender, app.pull.from_epoch, self.now))

    # -- results --------------------------------------------------------------------------
    def active(self) -> list[SimMember]:
        return [
            m
            for m in self.members
            if m.group is not None
            and m.core is not None
            and not m.core.removed
            and m.group.is_active
        ]

    def report(self) -> SimReport:
        active = self.active()
        at_end = {m.fpr for m in active}
        expected = 0
        missing = 0
        for app_id, (_sender, recipients) in self.sent_texts.items():
            for f in recipients:
                if f not in at_end:
                    continue  # removed (or left) since: not owed this text
                expected += 1
                if app_id not in self.by_fpr[f].read:
                    missing += 1
        auths = {m.group.epoch_authenticator() for m in active if m.group is not None}
        return SimReport(
            texts_sent=len(self.sent_texts),
            deliveries_expected=expected,
            undecryptable=missing,
            stale_handshakes=self.stale,
            epochs=tuple(sorted({m.group.epoch for m in active if m.group is not None})),
            authenticators=len(auths),
            commits=self.commits_made,
            pulls=sum(m.core.statistics(self.now).pulls_sent for m in active if m.core),
            reproposals=sum(m.core.statistics(self.now).reproposals for m in active if m.core),
            events=self.events,
            virtual_ms=self.now,
        )
