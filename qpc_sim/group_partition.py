"""Partition and heal of one MLS group over the real Rust core (Stage B, issue 14).

Extends :class:`qpc_sim.groups.GroupSim` (the Stage A harness: virtual clock, seeded
shuffled and duplicated delivery) with what a member does on a mesh that splits:

- every message carries the branch tag of the epoch it was sent in (the envelope field
  ``Sealed.branch``; here a table from message digest to tag, filled when the message is
  first sent, which is what the envelope carries);
- a :class:`~qpc_node.groups.fork.ForkResolver` per member decides, for each commit, to
  apply it, ignore it, or switch branch; the harness carries the decision out with the
  Rust core's group snapshots (``Identity.snapshot/rollback/release``), decrypts late
  messages of a lost branch read-only (``Identity.process_readonly``), re-sends the
  member's own texts of the lost branch with the same app id and re-requests the
  membership changes only the lost branch applied;
- :func:`run_partition` plays the scenario of the issue: the group splits (60/40 by
  default), both sides request adds, removes and updates and chat for a while, the
  partition heals, and the run reports convergence, undecryptable texts and costs.

Side assignment interleaves the roster (members 0,1,2 | 3,4 | 5,6,7 | ...), so both sides
hold members of the committer list and each side can commit (Stage A failover makes the
first reachable committer commit after ``committer_timeout_ms * rank``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qpc_node import crypto
from qpc_node.client.mlsheader import InvalidMlsHeader, parse_header
from qpc_node.groups.core import GroupConfig, IntentError, IntentKind, topped_up
from qpc_node.groups.fork import (
    Apply,
    EpochInfo,
    ForkCommit,
    ForkResolver,
    Ignore,
    OutOfWindow,
    RouteKind,
    Switch,
    branch_tag,
    order_key,
    rank_secret,
)
from qpc_node.wire.gen.qpc.v1 import client_pb2
from qpc_sim.groups import GroupSim, SimConfig, SimMember, SimReport, _Held, commit_info

__all__ = ["PartitionConfig", "PartitionReport", "PartitionSim", "content_type", "run_partition"]

CT_APPLICATION = 1
CT_PROPOSAL = 2
CT_COMMIT = 3


def content_type(data: bytes) -> int:
    """The clear content type of an MLS PrivateMessage (RFC 9420 6.3: after group id and
    epoch), so a commit is told from an application message before decrypting."""
    parse_header(data)  # validates version, wire format, lengths
    size = 1 << (data[4] >> 6)
    length = data[4] & 0x3F
    for b in data[5 : 4 + size]:
        length = (length << 8) | b
    pos = 4 + size + length + 8
    if pos >= len(data):
        raise InvalidMlsHeader("truncated content type")
    return data[pos]


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _held_digest(h: _Held) -> bytes:
    if h.digest is None:
        h.digest = _digest(h.data)
    return h.digest


def _held_content_type(h: _Held) -> int:
    """``content_type(h.data)``, read once per held message (it is retried often)."""
    if h.content_type is None:
        h.content_type = content_type(h.data)
    return h.content_type


@dataclass(frozen=True, slots=True)
class PartitionConfig:
    members: int = 50
    seed: int = 0
    window: int = 5
    partition_ms: int = 90_000
    """How long the sides stay apart (virtual)."""
    texts_per_member: int = 2
    """Texts each member sends during the partition (and as many after the heal)."""
    changes: bool = True
    """Both sides request an add, a remove and an update during the partition."""
    settle_ms: int = 900_000
    """Virtual time after the heal to let everything settle."""
    crash_mid_rollback: bool = False
    """The first member to switch branch dies in the middle of it (after the rollback,
    before the merge of the winner); its store is reopened and the journalled switch
    resumed."""
    dup_rate: float = 0.1
    max_delay_ms: int = 3_000


@dataclass(frozen=True, slots=True)
class PartitionReport:
    sim: SimReport
    undecryptable: int
    authenticators: int
    heal_to_convergence_ms: int
    heal_to_convergence_wall_s: float
    """Wall-clock seconds from the heal to the last member's last epoch change."""
    extra_messages: int
    """Texts re-sent on the winning branch + membership changes re-requested."""
    switches: int
    winners: frozenset[bytes]
    """Per member, the tip tag it ended on: one element when every member agrees."""
    removed_present: tuple[str, ...]
    """Members removed on some branch that are still in a member's roster at the end."""
    retained_bytes_per_member: int
    """Mean snapshot bytes per member at the end of the partition (rollback window R)."""
    out_of_window: int
    crashes_recovered: int


@dataclass(slots=True)
class _ForkState:
    resolver: ForkResolver
    old_proposals: dict[bytes, list[bytes]] = field(default_factory=dict)
    """Proposals received for an older live epoch (a fork's parent): replayed before
    staging a sibling commit there."""
    last_change_ms: int = 0
    last_change_wall: float = 0.0
    """perf_counter() of the last epoch change (for the wall-clock convergence time)."""
    welcomes: set[bytes] = field(default_factory=set)
    owed: dict[str, list[bytes]] = field(default_factory=dict)
    """Our texts re-sent on the winner that members of the losing branch missed because
    they are not in the winner yet (added only there): sent to each when it is added."""


class PartitionSim(GroupSim):
    """A GroupSim whose members resolve forks (see the module docstring)."""

    def __init__(self, cfg: SimConfig, window: int, sides: Callable[[int], int]) -> None:
        super().__init__(cfg)
        self.window = window
        self.side = sides
        self.tags: dict[bytes, bytes] = {}
        self.fork: dict[int, _ForkState] = {}
        self.partitioned = False
        self.requested: dict[tuple[IntentKind, str], int] = {}
        self.removed_anywhere: set[str] = set()
        self.extra = 0
        self.out_of_window = 0
        self.crash_next_switch = False
        self.crashes_recovered = 0
        self.blocked = self._blocked
        self.secrets: dict[int, bytes] = {}

    def new_member(self) -> SimMember:
        """As GroupSim's, keeping the store secret so a crash can reopen the store."""
        i = len(self.members)
        secret = os.urandom(32)
        ident = crypto.Identity.create(self._dir / f"m{i}", secret, durable=False)
        m = SimMember(i, ident, ident.fingerprint)
        self.members.append(m)
        self.by_fpr[m.fpr] = m
        self.secrets[i] = secret
        return m

    def _changed(self, fs: _ForkState) -> None:
        fs.last_change_ms = self.now
        fs.last_change_wall = time.perf_counter()

    # -- network ---------------------------------------------------------------------
    def _blocked(self, src: int, dst: int, _now: int) -> bool:
        return self.partitioned and self.side(src) != self.side(dst)

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
        d = _digest(data)
        if d not in self.tags and src.group is not None:
            # The epoch the message was encrypted in is the sender's current one (a commit
            # is sent while it is still pending, so on its parent epoch).
            self.tags[d] = branch_tag(src.group)
        super()._send_mls(src, dst, data, app_id=app_id, commit=commit, msg_id=msg_id)

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        """GroupSim's setup, then the creator stores a committer list of
        ``max_committers`` (roster order) so both sides of a split hold committers."""
        super().setup()
        c0 = self.members[0]
        g = c0.group
        assert g is not None
        want = topped_up(g.committers(), g.members(), self.cfg.group.max_committers)
        if tuple(g.committers()) != want:
            commit, _welcome = g.commit_pending(want)
            g.merge_pending_commit()
            for m in self.members[1:]:
                assert m.group is not None
                m.group.process(commit)
            for m in self.members:
                m.core = self._core_for(m)
        for m in self.members:
            self._start_fork(m)

    def _epoch_info(self, g: crypto.Group) -> EpochInfo:
        return EpochInfo(branch_tag(g), g.epoch, rank_secret(g), frozenset(g.members()))

    def _start_fork(self, m: SimMember) -> None:
        assert m.group is not None
        r = ForkResolver(window=self.window, retain_ms=self.cfg.group.max_expiry_ms)
        r.start(self._epoch_info(m.group), self.now)
        self.fork[m.index] = _ForkState(r, last_change_ms=self.now)

    def request(self, i: int, kind: IntentKind, target: str = "") -> bytes:
        self.requested.setdefault((kind, target), i)
        return super().request(i, kind, target)

    def _send_text_now(self, m: SimMember, app_id: bytes) -> None:
        before = self.sent_texts.get(app_id)
        super()._send_text_now(m, app_id)
        g = m.group
        if g is not None and app_id in self.sent_texts:
            if before is not None:  # a resend: owed to the members of either branch
                idx, rec = self.sent_texts[app_id]
                self.sent_texts[app_id] = (idx, rec | before[1])
                owed = self.fork[m.index].owed
                for f in before[1] - rec - {m.fpr}:
                    owed.setdefault(f, []).append(app_id)
            self.fork[m.index].resolver.note_sent(branch_tag(g), app_id)

    def _after_commit(self, m: SimMember, added: Sequence[str]) -> None:
        """A member our resend could not reach (not in the winner then) is added: it
        gets those texts now, to itself only (same app id: shown once)."""
        fs = self.fork.get(m.index)
        g = m.group
        if fs is None or g is None or not g.is_active:
            return
        for f in added:
            for app_id in fs.owed.pop(f, []):
                msg = client_pb2.AppMessage(text=app_id.hex(), sent_ms=self.now)
                self.extra += 1
                self._broadcast(m, g.encrypt(msg.SerializeToString()), app_id=app_id, to=[f])

    # -- joining ---------------------------------------------------------------------
    def _joined(self, m: SimMember, welcome: bytes) -> None:
        fs = self.fork.get(m.index)
        d = _digest(welcome)
        if fs is not None and d in fs.welcomes:
            return  # a duplicate
        if m.group is not None:
            # Added again on the winning branch (our first add was on a branch that
            # lost): the new Welcome replaces the old membership.
            m.group = None
            m.core = None
        super()._joined(m, welcome)
        if m.group is not None:
            self._start_fork(m)
            self.fork[m.index].welcomes.add(d)

    # -- own commits -------------------------------------------------------------------
    def _acked(self, m: SimMember, commit: bytes) -> None:
        """As GroupSim's, with a snapshot of the parent epoch taken before the merge and
        the resolver told about the new epoch before anything else is processed."""
        g, core = m.group, m.core
        assert g is not None and core is not None
        if m.commit_pending is None or not g.has_pending_commit():
            m.commit_pending = None
            self._flush_deferred(m)
            return
        _commit, welcome = m.commit_pending
        fs = self.fork[m.index]
        parent_tag = branch_tag(g)
        roster = g.members()
        snap = m.ident.snapshot(self.group_id)
        ev = g.merge_pending_commit()
        m.commit_pending = None
        fc = self._fork_commit(parent_tag, roster, commit, ev, sender=m.fpr)
        fs.resolver.entered(fc, self._epoch_info(g), snap, self.now)
        self._changed(fs)
        self.removed_anywhere.update(fc.removed)
        if welcome is not None:
            for f in ev.added:
                self._send_welcome(m, self.by_fpr[f], welcome)
        info = commit_info(g, ev, m.fpr, commit)
        self.apply(m, core.on_commit(info, self.now))
        self._after_commit(m, info.added)
        self._release(m)
        self._flush_deferred(m)
        self._retry_held(m)

    def _release(self, m: SimMember) -> None:
        fs = self.fork[m.index]
        for sid in fs.resolver.prune(self.now):
            m.ident.release(self.group_id, sid)

    # -- receiving ---------------------------------------------------------------------
    def _process(self, m: SimMember, h: _Held) -> str:
        g, core = m.group, m.core
        if g is None or core is None or m.index not in self.fork:
            return "hold"
        tag = self.tags.get(_held_digest(h))
        if core.removed:
            # Removed on our branch. If that branch loses, we are still a member on the
            # winner (until the removal is re-applied there) and owe it our resends: a
            # sibling commit at an epoch before our removal is still ours to judge.
            r = self.fork[m.index].resolver
            live = r.live_path()
            try:
                ct = _held_content_type(h)
            except InvalidMlsHeader:
                return "done"
            if tag is not None and tag in live[:-1]:
                if ct == CT_COMMIT:
                    return self._sibling_commit(m, h, tag)
                if ct == CT_PROPOSAL:
                    self.fork[m.index].old_proposals.setdefault(tag, []).append(h.data)
            elif tag is None or r.route(tag, self.now).kind is RouteKind.UNKNOWN:
                h.tries = 0
                return "hold"  # of the winner we may yet switch to
            return "done"
        try:
            ct = _held_content_type(h)
            header = h.parsed()
        except InvalidMlsHeader:
            self._fail(m, h)
            return "failed"
        fs = self.fork[m.index]
        r = fs.resolver
        route = r.route(tag, self.now) if tag is not None else None
        if route is None or route.kind is RouteKind.UNKNOWN:
            # A branch we have not entered (yet): kept until it expires, not given up
            # after a number of tries like a message waiting for a proposal.
            h.tries = 0
            if header.epoch > g.epoch:
                self.apply(m, core.on_future(header.epoch, self.now))
            return "hold"
        if route.kind is RouteKind.READONLY:
            if ct != CT_APPLICATION or route.snapshot is None:
                return "done"  # a handshake of a branch that lost
            try:
                ev = m.ident.process_readonly(self.group_id, route.snapshot, h.data)
            except crypto.MlsError:
                self._fail(m, h)
                return "failed"
            self._readonly_text(m, ev)
            return "done"
        assert tag is not None
        if tag == r.tip.tag:
            if ct == CT_COMMIT:
                return self._commit_at_tip(m, h, tag)
            return super()._process(m, h)
        # An older epoch of our live branch.
        if ct == CT_APPLICATION:
            return super()._process(m, h)  # past-epoch secrets decrypt it
        if ct == CT_PROPOSAL:
            fs.old_proposals.setdefault(tag, []).append(h.data)
            return "done"
        return self._sibling_commit(m, h, tag)

    def _readonly_text(self, m: SimMember, ev: crypto.Event) -> None:
        if ev.kind != "application":
            return
        app = client_pb2.AppMessage.FromString(ev.data)
        if app.WhichOneof("body") == "text":
            m.read.add(bytes.fromhex(app.text))

    def _fork_commit(
        self,
        parent_tag: bytes,
        roster: list[str],
        commit: bytes,
        ev: crypto.Event,
        sender: str | None = None,
    ) -> ForkCommit:
        """The resolver's view of a processed commit. The committer's position in the
        parent roster (leaf order) stands for its leaf: fixed by the parent epoch, the
        same on every member."""
        who = sender if sender is not None else ev.sender
        return ForkCommit(
            parent_tag=parent_tag,
            commit=commit,
            committer_leaf=roster.index(who) if who in roster else 2**32 - 1,
            changes_membership=bool(ev.added or ev.removed_members or ev.committers_changed),
            added=tuple(ev.added),
            removed=tuple(ev.removed_members),
            covered=tuple(ev.covered),
        )

    def _commit_at_tip(self, m: SimMember, h: _Held, tag: bytes) -> str:
        g = m.group
        assert g is not None
        fs = self.fork[m.index]
        d = _held_digest(h)
        if fs.resolver.key_of(d) is not None:
            return "done"  # already decided (a duplicate or a known loser)
        roster = g.members()
        snap = m.ident.snapshot(self.group_id)
        try:
            ev = g.process(h.data)
        except crypto.MlsError:
            m.ident.rollback(self.group_id, snap)
            m.ident.release(self.group_id, snap)
            if h.tries < 50:
                return "hold"  # a proposal it covers has not arrived yet
            self.stale += 1
            return "failed"
        fc = self._fork_commit(tag, roster, h.data, ev)
        if m.commit_pending is not None:
            return self._race(m, h, fc, ev, snap, roster)
        decision = fs.resolver.on_commit(fc)
        assert isinstance(decision, Apply), decision
        self._entered(m, fc, snap, ev, h)
        return "done"

    def _race(
        self,
        m: SimMember,
        h: _Held,
        theirs: ForkCommit,
        ev_theirs: crypto.Event,
        parent_snap: int,
        roster: list[str],
    ) -> str:
        """Another member's commit for the epoch our own pending commit is for (both
        sent): the others will see both, so we too take the one with the lower key."""
        g = m.group
        assert g is not None and m.commit_pending is not None
        fs = self.fork[m.index]
        own_commit, welcome = m.commit_pending
        after_theirs = m.ident.snapshot(self.group_id)
        m.ident.rollback(self.group_id, parent_snap)
        ev_ours = g.merge_pending_commit()
        ours = self._fork_commit(theirs.parent_tag, roster, own_commit, ev_ours, sender=m.fpr)
        rank = fs.resolver.tip.rank_secret
        k_ours = order_key(rank, ours.committer_leaf, own_commit, ours.changes_membership)
        k_theirs = order_key(rank, theirs.committer_leaf, h.data, theirs.changes_membership)
        if k_ours < k_theirs:
            m.ident.release(self.group_id, after_theirs)
            decision = fs.resolver.on_commit(ours)
            assert isinstance(decision, Apply), decision
            m.commit_pending = None
            fs.resolver.entered(ours, self._epoch_info(g), parent_snap, self.now)
            self._changed(fs)
            self.removed_anywhere.update(ours.removed)
            assert isinstance(fs.resolver.on_commit(theirs), Ignore)
            if welcome is not None:
                for f in ev_ours.added:
                    self._send_welcome(m, self.by_fpr[f], welcome)
            assert m.core is not None
            info = commit_info(g, ev_ours, m.fpr, own_commit)
            self.apply(m, m.core.on_commit(info, self.now))
            self._after_commit(m, info.added)
            self._release(m)
            self._flush_deferred(m)
            return "done"
        m.ident.rollback(self.group_id, after_theirs)
        m.ident.release(self.group_id, after_theirs)
        decision = fs.resolver.on_commit(theirs)
        assert isinstance(decision, Apply), decision
        self._entered(m, theirs, parent_snap, ev_theirs, h)  # clears our pending commit
        fs.resolver.on_commit(ours)
        return "done"

    def _entered(
        self, m: SimMember, fc: ForkCommit, parent_snap: int, ev: crypto.Event, h: _Held
    ) -> None:
        g = m.group
        assert g is not None
        fs = self.fork[m.index]
        if ev.removed:
            # No exporter once removed: a tag no message carries stands for "removed".
            gone = hashlib.sha256(b"qpc-sim/removed" + fc.digest).digest()[:16]
            fs.resolver.entered(
                fc,
                EpochInfo(gone, g.epoch, fs.resolver.tip.rank_secret, frozenset()),
                parent_snap,
                self.now,
            )
        else:
            fs.resolver.entered(fc, self._epoch_info(g), parent_snap, self.now)
        self._changed(fs)
        self.removed_anywhere.update(fc.removed)
        self.on_mls_event(m, ev, h)
        if not ev.removed:
            self._release(m)

    def _sibling_commit(self, m: SimMember, h: _Held, parent_tag: bytes) -> str:
        """A commit on an older epoch of our branch: another branch forked there. Stage
        it on the parent's snapshot, let the resolver decide, switch or go back."""
        g = m.group
        assert g is not None
        fs = self.fork[m.index]
        r = fs.resolver
        d = _held_digest(h)
        if r.key_of(d) is not None:
            return "done"
        parent_snap = r.snapshot_of(parent_tag)
        if parent_snap is None:
            self.out_of_window += 1
            return "done"
        tip_snap = m.ident.snapshot(self.group_id)
        m.ident.rollback(self.group_id, parent_snap)
        if g.has_pending_commit():
            g.clear_pending_commit()
        roster = g.members()
        for p in fs.old_proposals.get(parent_tag, []):
            # A duplicate or one not for this state fails harmlessly: the commit itself
            # says which proposals it needs.
            with contextlib.suppress(crypto.MlsError):
                g.process(p)
        try:
            ev = g.process(h.data)
        except crypto.MlsError:
            m.ident.rollback(self.group_id, tip_snap)
            m.ident.release(self.group_id, tip_snap)
            if h.tries < 50:
                return "hold"
            self.stale += 1
            return "failed"
        fc = self._fork_commit(parent_tag, roster, h.data, ev)
        decision = r.on_commit(fc)
        if isinstance(decision, Switch):
            r.begin_switch(decision, tip_snap)
            if self.crash_next_switch:
                self.crash_next_switch = False
                self._crash_and_resume(m, h, fc)
                return "done"
            self._finish_switch(m, fc, decision, ev, h)
            return "done"
        m.ident.rollback(self.group_id, tip_snap)
        m.ident.release(self.group_id, tip_snap)
        if isinstance(decision, OutOfWindow):
            self.out_of_window += 1
        else:
            assert isinstance(decision, Ignore), decision
        return "done"

    def _crash_and_resume(self, m: SimMember, h: _Held, fc: ForkCommit) -> None:
        """The process dies in the middle of the switch: after the rollback to the fork
        point, before the winner is merged. Reopen the store and finish the journalled
        switch from whatever state the store holds."""
        plan = self.fork[m.index].resolver.resume()
        assert plan is not None
        m.ident.rollback(self.group_id, plan.rollback_to)
        m.group = None
        m.ident = crypto.Identity.open(
            self._dir / f"m{m.index}", self.secrets[m.index], durable=False
        )
        g = m.group = m.ident.group(self.group_id)
        if branch_tag(g) != plan.parent_tag:
            m.ident.rollback(self.group_id, plan.rollback_to)  # the rollback did not land
        if g.has_pending_commit():
            g.clear_pending_commit()
        assert branch_tag(g) == plan.parent_tag
        for p in self.fork[m.index].old_proposals.get(plan.parent_tag, []):
            with contextlib.suppress(crypto.MlsError):
                g.process(p)  # the winner may cover proposals of the fork epoch
        ev = g.process(h.data)
        self.crashes_recovered += 1
        self._finish_switch(m, fc, plan, ev, h)

    def _finish_switch(
        self, m: SimMember, fc: ForkCommit, plan: Switch, ev: crypto.Event, h: _Held
    ) -> None:
        g = m.group
        assert g is not None
        fs = self.fork[m.index]
        fs.resolver.entered(fc, self._epoch_info(g), plan.rollback_to, self.now)
        self._changed(fs)
        self.removed_anywhere.update(fc.removed)
        self.removed_anywhere.update(plan.reremove)
        # The Stage A core followed the losing branch: start it afresh on the winner.
        m.commit_pending = None
        m.deferred.clear()
        carried = [(i.kind, i.target) for i in m.core.intents()] if m.core is not None else []
        m.core = self._core_for(m)
        if ev.removed or m.fpr not in g.members():
            m.core.removed = True
            return
        for app_id in plan.resend:
            self.extra += 1
            self._send_text_now(m, app_id)
        for kind, target in carried:
            self.extra += 1
            self._rerequest(m, kind, target)
        for target in plan.readd:
            if self.requested.get((IntentKind.ADD, target)) == m.index:
                self.extra += 1
                self._rerequest(m, IntentKind.ADD, target)
        for target in plan.reremove:
            if self.requested.get((IntentKind.REMOVE, target)) == m.index:
                self.extra += 1
                self._rerequest(m, IntentKind.REMOVE, target)
        self._release(m)
        self._schedule_tick(m)

    def _rerequest(self, m: SimMember, kind: IntentKind, target: str) -> None:
        assert m.core is not None
        g = m.group
        assert g is not None
        if kind is IntentKind.ADD and target in g.members():
            return  # the winner did it already
        if kind is IntentKind.REMOVE and target not in g.members():
            return
        try:
            self.request(m.index, kind, target)
        except IntentError as exc:
            m.warnings.append(f"re-request {kind.value}: {exc}")

    # -- results -------------------------------------------------------------------------
    def retained_bytes(self) -> int:
        active = self.active()
        if not active:
            return 0
        return sum(m.ident.snapshot_bytes(self.group_id) for m in active) // len(active)


def _interleaved(i: int) -> int:
    return 0 if i % 5 in (0, 1, 2) else 1


def run_partition(cfg: PartitionConfig) -> PartitionReport:
    """The issue's scenario: split, both sides change membership and chat, heal."""
    group = GroupConfig(
        quiescence_ms=500,
        max_commit_delay_ms=3_000,
        pull_after_ms=4_000,
        committer_timeout_ms=10_000,
        max_committers=5,
    )
    scfg = SimConfig(
        members=cfg.members,
        seed=cfg.seed,
        dup_rate=cfg.dup_rate,
        max_delay_ms=cfg.max_delay_ms,
        group=group,
    )
    side_of: dict[int, int] = {}
    sim = PartitionSim(scfg, cfg.window, lambda i: side_of.get(i, _interleaved(i)))
    try:
        sim.setup()
        n = cfg.members
        rng = sim.rng
        sim.crash_next_switch = cfg.crash_mid_rollback
        side_a = [i for i in range(n) if _interleaved(i) == 0]
        side_b = [i for i in range(n) if _interleaved(i) == 1]
        sim.partitioned = True
        if cfg.changes:
            ja, jb = sim.new_member(), sim.new_member()
            side_of[ja.index], side_of[jb.index] = 0, 1
            fpr = sim.members
            plan = [
                (1_000, side_a[1], IntentKind.ADD, ja.fpr),
                (2_000, side_b[1], IntentKind.ADD, jb.fpr),
                (15_000, side_a[2], IntentKind.REMOVE, fpr[side_a[-1]].fpr),
                (16_000, side_b[-1], IntentKind.REMOVE, fpr[side_b[-2]].fpr),
                (30_000, side_a[3 % len(side_a)], IntentKind.UPDATE, ""),
                (31_000, side_b[0], IntentKind.UPDATE, ""),
            ]
            for t, who, kind, target in plan:
                sim.at(t, functools.partial(_request, sim, who, kind, target))
        for i in range(n):
            for _ in range(cfg.texts_per_member):
                sim.at(rng.randrange(cfg.partition_ms), functools.partial(_text, sim, i))
        sim.run(until_ms=cfg.partition_ms)
        retained = sim.retained_bytes()
        heal = sim.now
        heal_wall = time.perf_counter()
        sim.partitioned = False
        for i in range(n):
            for _ in range(cfg.texts_per_member):
                sim.at(heal + rng.randrange(30_000), functools.partial(_text, sim, i))
        sim.run(until_ms=heal + cfg.settle_ms)
        rep = sim.report()
        active = sim.active()
        last = max((sim.fork[m.index].last_change_ms for m in active), default=heal)
        rosters = set().union(*(set(m.group.members()) for m in active if m.group is not None))
        return PartitionReport(
            sim=rep,
            undecryptable=rep.undecryptable,
            authenticators=rep.authenticators,
            heal_to_convergence_ms=max(0, last - heal),
            heal_to_convergence_wall_s=max(
                0.0,
                max((sim.fork[m.index].last_change_wall for m in active), default=heal_wall)
                - heal_wall,
            ),
            extra_messages=sim.extra,
            switches=sum(
                sim.fork[m.index].resolver.switches for m in sim.members if m.index in sim.fork
            ),
            winners=frozenset(sim.fork[m.index].resolver.tip.tag for m in active),
            removed_present=tuple(sorted(sim.removed_anywhere & rosters)),
            retained_bytes_per_member=retained,
            out_of_window=sim.out_of_window,
            crashes_recovered=sim.crashes_recovered,
        )
    finally:
        sim.close()


def _request(sim: PartitionSim, who: int, kind: IntentKind, target: str) -> None:
    m = sim.members[who]
    if m.core is None or m.core.removed:
        return
    try:
        sim.request(who, kind, target)
    except IntentError as exc:
        m.warnings.append(f"request {kind.value}: {exc}")


def _text(sim: PartitionSim, i: int) -> None:
    sim.send_text(i)
