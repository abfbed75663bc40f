"""Stage B in the client: the branch of a group each envelope belongs to, and switching.

Both sides of a partitioned mesh can commit on the same epoch. Every group envelope
carries the branch tag of the epoch it was encrypted in (``Sealed.branch``, an MLS
exporter secret: qpc_node/groups/fork.py), so a receiver knows, before decrypting,
whether a message belongs to its live branch, to a branch it left (decrypted
read-only from the retained snapshot, ``Identity.process_readonly``), or to a branch it
has not seen (held until it expires: it may be the branch we switch to).

Before every merge (a commit of another member processed at the tip, or our own
commit once the node stored it) the group's MLS state is snapshotted
(``Identity.snapshot``), so a commit that arrives later for an epoch already taken
(the other side of a partition) can be staged on that epoch's state and judged by the
:class:`~qpc_node.groups.fork.ForkResolver`. If it wins, the group rolls back to the
fork epoch, merges the winner and keeps the losing tip read-only until its messages
expire; the group driver then rebuilds its core from the winning state (our open
requests are re-proposed from client.db) and, as first committer, re-applies the
removals of the losing branch. All MLS work of one decision runs in one call of the
MLS worker, so no other MLS call interleaves with a rollback.

Crash safety (client.db v5, qpc_node/client/branch_store.py; docs/groups.md): the MLS
state and client.db are two stores, so no transaction spans both; the order of writes
makes every crash point recoverable. Before an MLS change the resolver must learn of
(a commit merged at the tip, our own merge, a sibling staged on an older epoch) the
snapshot taken just before it is journalled as the group's *trial* marker; once the
resolver has taken the result in, its state is saved with the marker cleared, in one
transaction with the resends a switch decided (and our texts of the losing epochs
dropped); snapshots the resolver no longer needs are released only after that save.
After a crash, ``restore`` (the MLS worker's first call) finds either no marker (the
record matches the MLS state) or a marker, then puts the group back on that snapshot
(the change did not happen as far as anyone knows: the message that caused it was not
acknowledged, so the node delivers it again and it is judged again) and releases every
snapshot the record does not name. The resends are sent by the group driver, each in
one transaction with its outbox rows (state.py ``resend_queued``), so each goes out
exactly once; receivers remember shown (sender, app id) pairs in the transaction that
stores the text, so a resend is shown once, also across their restarts.

What a switch or a rejoin leaves to do afterwards survives a restart too (client.db v6,
docs/groups.md "What a restart remembers"): the rejoin history (``_Group.past``), the
members our commits added and removed, the adds and removals a switch or a rejoin
decided we ask for again (kept until the request is in client.db), and the texts owed
to a member added only on the losing branch (``branch_owed`` rows, written in the
transaction that queues the resend they follow from).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import msgspec

from qpc_node import crypto
from qpc_node.client import branch_store
from qpc_node.client.agent_types import AgentContext, AgentPart
from qpc_node.client.branch_store import PastEpoch
from qpc_node.client.mlsheader import InvalidMlsHeader, parse_header
from qpc_node.client.state import MAX_BRANCH_TEXTS, ClientStateError
from qpc_node.groups.fork import (
    DEFAULT_WINDOW,
    EpochInfo,
    ForkCommit,
    ForkResolver,
    OutOfWindow,
    RouteKind,
    Switch,
    branch_tag,
    rank_secret,
)
from qpc_node.groups.rejoin import MAX_STEPS, Step, open_offer, rejoin_key, seal_offer
from qpc_node.ops.log import get_logger

log = get_logger("qpc.client")
P = ParamSpec("P")
T = TypeVar("T")

CT_APPLICATION = 1
CT_PROPOSAL = 2
CT_COMMIT = 3
MAX_OLD_PROPOSALS = 256
"""Proposals of an older live epoch kept per group (replayed before staging a sibling
commit there: the sibling may cover them by reference)."""
OFFER_INTERVAL_MS = 60_000
"""A rejoin offer goes out once per epoch of ours, and again after this long if messages
of an unknown branch still arrive (the other side may have missed the first), then after
twice as long each time (up to 64 times: held messages are retried on every receive, and
a member that may not rejoin would otherwise draw an offer a minute until they expire)."""
MAX_OFFER_BACKOFF = 6
MAX_CATCH_UPS = 256
"""(member, fork) catch-ups answered and remembered per group (a repeat is ignored)."""
NO_SNAPSHOT = -1
"""``Switch.rollback_to`` of a rejoin by external commit: nothing was rolled back."""


class Unknown:
    """``Branches.process``: the message is of a branch not seen here (yet): hold it."""


UNKNOWN_BRANCH = Unknown()


_SENDER_INDEXED = (1, 2)
"""RFC 9420 SenderType member(1) and external(2) carry a u32 index; new_member_*: none."""


def content_type(data: bytes) -> int:
    """The clear content type of an MLS message (RFC 9420 6.2-6.3: after group id and
    epoch; in a PublicMessage after the sender and authenticated data too), so a commit
    is told from an application message before decrypting. Commits of members are
    PrivateMessages; an external commit (a rejoin) is a PublicMessage."""
    header = parse_header(data)  # validates version, wire format, lengths
    if header.content_type is not None:
        return header.content_type
    size = 1 << (data[4] >> 6)
    pos = 4 + size + len(header.group_id) + 8
    if pos >= len(data):
        raise InvalidMlsHeader("truncated sender")
    pos += 1 + (4 if data[pos] in _SENDER_INDEXED else 0)
    if pos >= len(data):
        raise InvalidMlsHeader("truncated authenticated data")
    size = 1 << (data[pos] >> 6)
    if size == 8 or pos + size > len(data):
        raise InvalidMlsHeader("bad authenticated data length")
    length = data[pos] & 0x3F
    for b in data[pos + 1 : pos + size]:
        length = (length << 8) | b
    pos += size + length
    if pos >= len(data):
        raise InvalidMlsHeader("truncated content type")
    return data[pos]


def epoch_info(g: crypto.Group) -> EpochInfo:
    return EpochInfo(branch_tag(g), g.epoch, rank_secret(g), frozenset(g.members()))


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def fork_commit(
    parent_tag: bytes, roster: list[str], commit: bytes, ev: crypto.Event, sender: str
) -> ForkCommit:
    """The resolver's view of a processed commit. The committer's position in the parent
    roster stands for its leaf: fixed by the parent epoch, the same on every member."""
    return ForkCommit(
        parent_tag=parent_tag,
        commit=commit,
        committer_leaf=roster.index(sender) if sender in roster else 2**32 - 1,
        changes_membership=bool(ev.added or ev.removed_members or ev.committers_changed),
        added=tuple(ev.added),
        removed=tuple(ev.removed_members),
        covered=tuple(ev.covered),
    )


class BranchStatistics(msgspec.Struct):
    switches: int = 0
    readonly: int = 0
    """Late messages of a branch we left, decrypted from its retained snapshot."""
    out_of_window: int = 0
    held_unknown: int = 0
    restored: int = 0
    """Groups whose branch state was read back from client.db at start."""
    rolled_back: int = 0
    """Of those, groups put back on their trial snapshot (a crash mid-change)."""
    dropped_records: int = 0
    """Records that did not decode or fit the MLS state: dropped, started afresh."""
    offers_sent: int = 0
    rejoins: int = 0
    """Forks older than the window healed by our external commit onto the winner."""
    rejoins_refused: int = 0
    """Offers of a winning branch we may not rejoin (we were removed on a branch)."""


CommitEnvelopes = Callable[[list[bytes], bytes, bytes], list[tuple[bytes, bytes]]]
"""(recipients, MLS commit, branch tag) -> the outbox rows (msg_id, envelope) that carry
the commit to each recipient (``Outbox.to_each``: pure, so the MLS worker may call it)."""


class Rejoined(msgspec.Struct, frozen=True):
    """``Branches.on_offer``: we rejoined the winning branch by external commit (the
    commit is already queued in the outbox, with the rejoin's record)."""

    commit: bytes
    branch: bytes
    """The tag of the epoch the commit leaves (the winner's current one)."""
    recipients: tuple[str, ...]
    fork: bytes = b""
    """The fork epoch's tag: we ask the winner's members for their texts after it."""


class _Group(msgspec.Struct):
    resolver: ForkResolver
    old_proposals: dict[bytes, list[bytes]] = msgspec.field(default_factory=dict)
    own_commit: bytes | None = None
    own_removed: set[str] = msgspec.field(default_factory=set)
    """Members our own commits removed: if such a commit loses, we remove them again."""
    own_added: set[str] = msgspec.field(default_factory=set)
    """Members our own commits added: if such a commit loses, we add them again."""
    past: dict[bytes, PastEpoch] = msgspec.field(default_factory=dict)
    """Our branch's epochs by tag, oldest first (the last one is the tip), kept beyond
    the rollback window too (up to MAX_STEPS) for rejoin offers: what the other side of
    a long partition needs to compare with us; saved as they are in the record."""
    unknown_since: int | None = None
    """When we last held a message of a branch we do not know (an offer is due)."""
    caught_up: set[tuple[str, bytes]] = msgspec.field(default_factory=set)
    """(member, fork tag) of the CatchUps we answered (each is answered once)."""
    offered: tuple[bytes, int, int] = (b"", 0, 0)
    """(tip tag, wall ms, offers at this tip) of our last offer."""
    rejoin_removed: set[str] = msgspec.field(default_factory=set)
    """Members our commits removed on a branch we left by rejoining: removed again."""
    readd: set[str] = msgspec.field(default_factory=set)
    """Members our commits added on a branch that lost (and no branch removed): we ask
    to add them again; kept until that request is in client.db."""
    rejoined_from: list[bytes] = msgspec.field(default_factory=list)
    """The winner tips (tags of the GroupInfos) we rejoined from, newest last (at most
    ``branch_store.MAX_REJOINED_FROM``): an offer from one of them again (delivered again after a crash,
    or repeated) is done; a winner that moved on offers a newer tip."""
    recipients: dict[bytes, frozenset[str]] = msgspec.field(default_factory=dict)
    """Who each of our kept texts went to (the roster of its epoch; rebuilt from
    ``past`` at start). A switch stores it with each resend: a member of the losing
    branch not on the winner is owed the text (state.py ``branch_owed``)."""


class Branches(AgentPart):
    """Per group: the resolver, the snapshots it names, and the switches it decides."""

    def __init__(self, ctx: AgentContext, *, window: int = DEFAULT_WINDOW, retain_ms: int) -> None:
        super().__init__(ctx)
        self.window = window
        self.retain_ms = retain_ms
        self._groups: dict[bytes, _Group] = {}
        self._switched: dict[bytes, list[Switch]] = {}
        self._merged_own: dict[bytes, bytes] = {}
        self.stats = BranchStatistics()

    # -- called from the event loop ----------------------------------------------------
    def take_switches(self, gid: bytes) -> list[Switch]:
        """The switches made in ``gid`` since the last call (for the group driver)."""
        return self._switched.pop(gid, [])

    def resolver(self, gid: bytes) -> ForkResolver | None:
        st = self._groups.get(gid)
        return st.resolver if st is not None else None

    def remove_again(self, gid: bytes, members: list[str]) -> list[str]:
        """Members that a commit of ours removed on a branch that lost, still in the
        group: we (their remover) ask again, so each is requested once, not by every
        member that switched."""
        st = self._groups.get(gid)
        if st is None:
            return []
        again = set(st.resolver.outstanding_removals(members)) & st.own_removed
        again |= st.rejoin_removed.intersection(members)
        st.rejoin_removed &= again
        return sorted(again)

    def add_again(self, gid: bytes, members: list[str]) -> list[str]:
        """Members that a commit of ours added on a branch that lost (and that no branch
        removed), not in the group we switched to: we (their adder) ask again, so each
        is requested once, and the joiner gets a Welcome from the winning branch."""
        st = self._groups.get(gid)
        if st is None:
            return []
        st.readd.difference_update(members)
        return sorted(st.readd)

    def requested_again(self, gid: bytes, member: str) -> None:
        """(MLS worker) Our request to add or remove ``member`` again is in client.db
        (re-proposed from there after a restart): the record stops naming it."""
        st = self._groups.get(gid)
        if st is None or (member not in st.readd and member not in st.rejoin_removed):
            return
        st.readd.discard(member)
        st.rejoin_removed.discard(member)
        self._persist(gid, st)

    def take_merged_own(self, gid: bytes) -> bytes:
        """Our commit merged last in ``gid`` (b"" if none since the last call): the
        group core logs it, so we answer other members' pulls with our commits too."""
        return self._merged_own.pop(gid, b"")

    def owed(self, recipients: tuple[bytes, ...], members: list[str]) -> list[bytes]:
        """Who our resend on the winner does not reach although its original did: its
        recipients on the losing branch not in ``members`` (added only there). They are
        owed it (``ClientState.resend_queued``) until a commit adds them again."""
        now_in = set(members) | {self._ident.fingerprint}
        return [m for m in recipients if m.hex() not in now_in]

    def forget(self, gid: bytes) -> None:
        self._groups.pop(gid, None)

    # -- the rest runs inside one MLS worker call ---------------------------------------
    def tag(self, g: crypto.Group) -> bytes:
        """Branch tag of the group's current epoch (b"" when we are no longer in it)."""
        return branch_tag(g) if g.is_active else b""

    def note_text(
        self, gid: bytes, g: crypto.Group, tag: bytes, app_id: bytes, body: bytes
    ) -> None:
        """We sent text ``app_id`` (``body``: its AppMessage) in the epoch ``tag``."""
        if not g.is_active:
            return
        st = self._group_state(gid, g, self._wall_ms())
        if tag != st.resolver.tip.tag:
            return
        st.resolver.note_sent(tag, app_id)
        self._db(self._st.branch_text_add, gid, app_id, tag, body, self._wall_ms())
        if tag in st.past:
            st.past[tag].sent.append(app_id)
            st.recipients[app_id] = st.past[tag].members
            if len(st.recipients) > MAX_BRANCH_TEXTS:
                del st.recipients[next(iter(st.recipients))]

    def own_commit(self, gid: bytes, g: crypto.Group, commit: bytes, now: int) -> bytes:
        """Our commit is on its way (merged once the node stored it): remember it for
        the merge, and return the tag of its parent epoch (the one we are still in)."""
        if not g.is_active:
            return b""
        st = self._group_state(gid, g, now)
        st.own_commit = commit
        self._persist(gid, st)  # merged after a restart too, with its parent snapshotted
        return st.resolver.tip.tag

    def _group_state(self, gid: bytes, g: crypto.Group, now: int) -> _Group:
        """The group's resolver, (re)started at the current epoch when we have none or
        the MLS state moved without us (a commit without a tag from an older sender)."""
        st = self._groups.get(gid)
        if st is not None and st.resolver.tip.tag == branch_tag(g):
            return st
        if st is not None:
            for sid in st.resolver.snapshots_in_use():
                with contextlib.suppress(crypto.UnknownSnapshot):
                    self._ident.release(gid, sid)
        st = self._new_group(gid, g, now)
        self._persist(gid, st)
        return st

    def _new_group(self, gid: bytes, g: crypto.Group, now: int) -> _Group:
        """A resolver started at the group's current epoch, not yet saved."""
        r = ForkResolver(window=self.window, retain_ms=self.retain_ms)
        info = epoch_info(g)
        r.start(info, now)
        st = _Group(r)
        st.past[info.tag] = PastEpoch(info.tag, info.epoch, rejoin_key(g), info.members)
        self._groups[gid] = st
        return st

    def merge_own(self, gid: bytes, g: crypto.Group, now: int) -> crypto.Event:
        """Merge our pending commit, with the parent epoch snapshotted first."""
        st = self._group_state(gid, g, now) if g.is_active else None
        if st is None or st.own_commit is None:
            return g.merge_pending_commit()
        parent_tag = branch_tag(g)
        roster = g.members()
        snap = self._ident.snapshot(gid)
        self._journal(gid, st, snap)
        ev = g.merge_pending_commit()
        fc = fork_commit(parent_tag, roster, st.own_commit, ev, self._ident.fingerprint)
        self._merged_own[gid] = st.own_commit
        st.own_commit = None
        st.own_removed.update(fc.removed)
        st.own_added.update(fc.added)  # recorded with the merge (``_entered``)
        self._entered(gid, g, st, fc, ev, snap, now)
        return ev

    def process(
        self, gid: bytes, g: crypto.Group, tag: bytes, data: bytes, now: int
    ) -> crypto.Event | Unknown | None:
        """Process one MLS message of ``gid`` sent on branch ``tag``.

        Returns the event (live or read-only), None when there is nothing to show (a
        handshake of a branch we left, a duplicate or losing commit, a proposal of an
        older epoch kept for a sibling commit), or UNKNOWN_BRANCH (hold it). MLS errors
        propagate as for ``Group.process``.
        """
        if not g.is_active:
            return g.process(data)
        st = self._group_state(gid, g, now)
        r = st.resolver
        ct = content_type(data)
        if not tag:
            # An older sender (or a re-sent commit): the epoch tells whether it can be
            # ours; anything else takes the Stage A path.
            if parse_header(data).epoch == g.epoch:
                tag = r.tip.tag
            else:
                return g.process(data)
        route = r.route(tag, now)
        if route.kind is RouteKind.READONLY:
            if ct != CT_APPLICATION or route.snapshot is None:
                return None  # a handshake of a branch that lost
            self.stats.readonly += 1
            return self._ident.process_readonly(gid, route.snapshot, data)
        if route.kind is RouteKind.UNKNOWN:
            try:
                return g.process(data)  # a later epoch of ours (held as before), ...
            except crypto.WrongEpoch:
                if parse_header(data).epoch > g.epoch:
                    raise
            except crypto.MlsError:
                pass
            self.stats.held_unknown += 1
            st.unknown_since = now
            return UNKNOWN_BRANCH  # ... or a branch we may yet switch to
        if tag == r.tip.tag:
            if ct == CT_COMMIT and not g.has_pending_commit():
                return self._commit_at_tip(gid, g, st, tag, data, now)
            return g.process(data)
        # An older epoch of our live branch.
        if ct == CT_APPLICATION:
            return g.process(data)  # its past-epoch secrets decrypt it
        if ct == CT_PROPOSAL:
            kept = st.old_proposals.setdefault(tag, [])
            if len(kept) < MAX_OLD_PROPOSALS:
                kept.append(data)
                self._persist(gid, st)  # the message is acknowledged once we return
            return None
        return self._sibling(gid, g, st, tag, data, now)

    def _commit_at_tip(
        self, gid: bytes, g: crypto.Group, st: _Group, tag: bytes, data: bytes, now: int
    ) -> crypto.Event | None:
        if st.resolver.key_of(_digest(data)) is not None:
            return None  # a duplicate of a commit decided before
        roster = g.members()
        snap = self._ident.snapshot(gid)
        self._journal(gid, st, snap)
        try:
            ev = g.process(data)
        except crypto.MlsError:
            self._back_to(gid, st, snap)
            raise
        fc = fork_commit(tag, roster, data, ev, ev.sender)
        st.resolver.on_commit(fc)  # Apply: it extends our tip
        self._entered(gid, g, st, fc, ev, snap, now)
        return ev

    def _entered(
        self,
        gid: bytes,
        g: crypto.Group,
        st: _Group,
        fc: ForkCommit,
        ev: crypto.Event,
        parent_snap: int,
        now: int,
    ) -> None:
        r = st.resolver
        switch = r.pending.plan if r.pending is not None else None
        if ev.removed or not g.is_active:
            # No exporter once removed: a tag no message carries stands for "removed".
            gone = hashlib.sha256(b"qpc/removed" + fc.digest).digest()[:16]
            info = EpochInfo(gone, g.epoch, r.tip.rank_secret, frozenset())
            r.entered(fc, info, parent_snap, now)
            self._persist(gid, st)
            return
        info = epoch_info(g)
        r.entered(fc, info, parent_snap, now)
        self._grow(st, fc, info, rejoin_key(g))
        st.old_proposals = {t: ps for t, ps in st.old_proposals.items() if t in r.live_path()}
        if switch is not None:
            st.readd.update(m for m in switch.readd if m in st.own_added)
        freed = r.prune(now)
        # Saved before the release: a record never names a snapshot that is gone.
        self._persist(gid, st, resend=list(switch.resend) if switch is not None else None)
        for sid in freed:
            self._ident.release(gid, sid)

    def _grow(self, st: _Group, fc: ForkCommit, info: EpochInfo, key: bytes) -> None:
        """Our branch took ``fc`` into ``info``: past epochs of a branch we left go."""
        past = st.past
        if fc.parent_tag in past:
            tags = list(past)
            for t in tags[tags.index(fc.parent_tag) + 1 :]:
                del past[t]
            parent = past[fc.parent_tag]
            parent.child = st.resolver.key_of(fc.digest)
            parent.added, parent.removed = fc.added, fc.removed
        else:
            past.clear()
        past[info.tag] = PastEpoch(info.tag, info.epoch, key, info.members)
        while len(past) > MAX_STEPS:
            del past[next(iter(past))]

    def _sibling(
        self, gid: bytes, g: crypto.Group, st: _Group, parent_tag: bytes, data: bytes, now: int
    ) -> crypto.Event | None:
        """A commit on an older epoch of our branch: the other side of a partition
        committed there. Stage it on that epoch's snapshot; switch if it wins."""
        r = st.resolver
        if r.key_of(_digest(data)) is not None:
            return None
        parent_snap = r.snapshot_of(parent_tag)
        if parent_snap is None:
            self.stats.out_of_window += 1
            return None
        tip_snap = self._ident.snapshot(gid)
        self._journal(gid, st, tip_snap)
        self._ident.rollback(gid, parent_snap)
        if g.has_pending_commit():
            g.clear_pending_commit()
        roster = g.members()
        for p in st.old_proposals.get(parent_tag, []):
            with contextlib.suppress(crypto.MlsError):
                g.process(p)  # the sibling may cover them by reference
        try:
            ev = g.process(data)
        except crypto.MlsError:
            self._back_to(gid, st, tip_snap)
            raise
        fc = fork_commit(parent_tag, roster, data, ev, ev.sender)
        decision = r.on_commit(fc)
        if isinstance(decision, Switch):
            r.begin_switch(decision, tip_snap)
            self._entered(gid, g, st, fc, ev, decision.rollback_to, now)
            self.stats.switches += 1
            self._switched.setdefault(gid, []).append(decision)
            log.info("group switched branch", extra={"epoch": decision.parent_epoch})
            return ev
        self._back_to(gid, st, tip_snap)
        if isinstance(decision, OutOfWindow):
            self.stats.out_of_window += 1
        return None

    # -- persistence: client.db v5 (see the module docstring for the order) -------------
    def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A client.db call from the MLS worker thread (between two MLS calls)."""
        return self._state.blocking(fn, *args, **kwargs)

    def _persist(
        self,
        gid: bytes,
        st: _Group,
        *,
        resend: list[bytes] | None = None,
        outbox: list[tuple[bytes, bytes]] | None = None,
        now: int = 0,
    ) -> None:
        """Save the group's branch state (the trial marker cleared: it matches the MLS
        state now), with a switch's ``resend`` (app ids) made pending resends, each with
        the members it went to, and ``outbox`` (a rejoin's commit) queued."""
        state = branch_store.BranchState(
            st.resolver,
            st.own_removed,
            st.old_proposals,
            st.own_commit,
            own_added=st.own_added,
            past=list(st.past.values()),
            readd=st.readd,
            rejoin_removed=st.rejoin_removed,
            offered=st.offered,
            rejoined_from=st.rejoined_from,
        )
        self._db(
            self._st.branch_save,
            gid,
            branch_store.encode(state),
            # Texts are kept for every epoch of the rejoin history, not only the window:
            # a rejoin re-sends them, and a rejoiner's CatchUp asks for them.
            live_tags=list(dict.fromkeys([*st.resolver.live_path(), *st.past])),
            resend=resend,
            recipients={
                a: [bytes.fromhex(m) for m in st.recipients.get(a, ())] for a in resend or ()
            },
            outbox=outbox or (),
            now_ms=now,
        )

    def _journal(self, gid: bytes, st: _Group, snap: int) -> None:
        """Before an MLS change the resolver must learn of: go back to ``snap`` if a
        crash comes before ``_persist`` records its result."""
        if not self._db(self._st.branch_trial, gid, snap):
            self._persist(gid, st)
            self._db(self._st.branch_trial, gid, snap)

    def _back_to(self, gid: bytes, st: _Group, snap: int) -> None:
        """A staged change did not stick: the group back on ``snap``, the marker cleared,
        then the snapshot released (a crash in between leaves a marker that names a
        snapshot still there, or an unnamed snapshot ``restore`` releases)."""
        self._ident.rollback(gid, snap)
        self._persist(gid, st)
        self._ident.release(gid, snap)

    def restore(self) -> None:
        """At start, before any other MLS call (the MLS worker's first call): every
        group's branch state from client.db; a group whose change was interrupted goes
        back on its trial snapshot; snapshots no record names are released (also those a
        client before v5 left behind). Bad records are dropped (typed, counted, logged)."""
        recorded = set(self._db(self._st.branch_groups))
        groups = [bytes(g) for g in self._ident.groups()]
        for gid in groups:
            st = self._restore_group(gid) if gid in recorded else None
            keep = st.resolver.snapshots_in_use() if st is not None else set()
            for sid, _epoch in self._ident.snapshots(gid):
                if sid not in keep:
                    self._ident.release(gid, sid)
        for gid in recorded.difference(groups):
            self._db(self._st.branch_drop, gid, resends=True)

    def _restore_group(self, gid: bytes) -> _Group | None:
        try:
            rec = self._db(self._st.branch_record, gid)
            if rec is None:
                return None
            state = branch_store.decode(rec.state)
            g = self._ident.group(gid)
            if rec.trial is not None and self.tag(g) != state.resolver.tip.tag:
                self._ident.rollback(gid, rec.trial)
                self.stats.rolled_back += 1
            if not g.is_active:
                self._db(self._st.branch_drop, gid, resends=True)  # removed: nothing to do
                return None
            if self.tag(g) != state.resolver.tip.tag:
                raise branch_store.BranchStateError("the record is not of the group's epoch")
        except (ClientStateError, crypto.MlsError) as exc:
            self.stats.dropped_records += 1
            log.warning("dropped a group's branch record", extra={"err": str(exc)})
            self._db(self._st.branch_drop, gid)
            return None
        r = state.resolver
        st = _Group(r, state.old_proposals, state.own_commit, state.own_removed)
        st.own_added, st.readd = state.own_added, state.readd
        st.rejoin_removed, st.offered = state.rejoin_removed, state.offered
        st.rejoined_from = state.rejoined_from
        if state.past and state.past[-1].tag == r.tip.tag:
            st.past = {p.tag: p for p in state.past}
        else:  # a version 1 record (or one saved after we were removed): the tip only
            info = epoch_info(g)
            st.past[info.tag] = PastEpoch(info.tag, info.epoch, rejoin_key(g), info.members)
        live = set(r.live_path())
        for t in self._db(self._st.branch_texts_after, gid, rec.texts_seq):
            if t.tag in live:
                r.note_sent(t.tag, t.app_id)  # sent after the last save
            if t.tag in st.past and t.app_id not in st.past[t.tag].sent:
                st.past[t.tag].sent.append(t.app_id)
        for kept in st.past.values():
            for a in kept.sent:
                st.recipients[a] = kept.members
        self._groups[gid] = st
        self._persist(gid, st)
        self.stats.restored += 1
        return st

    # -- beyond the rollback window: offers and rejoins (docs/groups.md) --------------
    def offers_due(self, now: int) -> list[bytes]:
        """The groups whose offer is due (``offer_due``)."""
        return [gid for gid in list(self._groups) if self.offer_due(gid, now)]

    def offer_due(self, gid: bytes, now: int) -> bool:
        """Messages of an unknown branch arrived and we have not offered ours since
        (once per epoch of ours, or again after OFFER_INTERVAL_MS)."""
        st = self._groups.get(gid)
        if st is None or st.unknown_since is None or not st.past:
            return False
        tag, at, n = st.offered
        tip = next(reversed(st.past))
        return tag != tip or now - at >= OFFER_INTERVAL_MS << min(n - 1, MAX_OFFER_BACKOFF)

    def offer(self, gid: bytes, g: crypto.Group, now: int) -> tuple[bytes, list[str]] | None:
        """Our branch as a BranchOffer and who gets it: every member of an epoch of our
        branch we keep (the other side of the partition was in them), but us."""
        if not g.is_active:
            return None
        st = self._group_state(gid, g, now)
        tags = list(st.past)
        steps = [Step(t, st.past[t].key, st.past[t].child) for t in tags]
        data = seal_offer(gid, steps, g.members(), g.group_info())
        tag, _at, n = st.offered
        st.offered = (tags[-1], now, n + 1 if tag == tags[-1] else 1)
        st.unknown_since = None
        self._persist(gid, st)  # the back-off holds across a restart
        who: set[str] = set()
        for p in st.past.values():
            who |= p.members
        who.discard(self._ident.fingerprint)
        self.stats.offers_sent += 1
        return data, sorted(who)

    def on_offer(
        self, gid: bytes, g: crypto.Group, data: bytes, now: int, envelopes: CommitEnvelopes
    ) -> Rejoined | None:
        """Another branch's offer. When its commit beats ours at the fork epoch and the
        fork is beyond our rollback window, rejoin it by external commit (only as a
        member of the fork epoch that no branch removed), and queue the switch for the
        group driver: our texts since the fork are re-sent with their app ids, our adds
        and removals since the fork are asked for again. InvalidOffer if malformed."""
        if not g.is_active:
            return None
        st = self._group_state(gid, g, now)
        keys = {t: p.key for t, p in st.past.items()}
        opened = open_offer(gid, data, keys)
        if opened is None or opened.child is None:
            return None  # no shared epoch, or the sender is behind on our branch
        if opened.tip_tag in st.rejoined_from:
            return None  # done: we rejoined from that GroupInfo
        fork = st.past[opened.fork_tag]
        if fork.child is None or st.resolver.snapshot_of(opened.fork_tag) is not None:
            # We are behind (their commits come by pull), or the fork is within the
            # window: its commits decide, staged on the fork's snapshot.
            return None
        if fork.child <= opened.child:
            return None  # our branch wins: they rejoin us
        tags = list(st.past)
        losing = tags[tags.index(opened.fork_tag) :]
        added: list[str] = []
        removed: list[str] = []
        for t in losing:
            added += [m for m in st.past[t].added if m not in added]
            removed += [m for m in st.past[t].removed if m not in removed]
        me = self._ident.fingerprint
        if me not in fork.members or me in removed or me not in opened.roster:
            self.stats.rejoins_refused += 1
            log.info("not rejoining a branch that removed us", extra={"epoch": fork.epoch})
            return None
        their = set(opened.roster)
        plan = Switch(
            parent_tag=opened.fork_tag,
            parent_epoch=fork.epoch,
            rollback_to=NO_SNAPSHOT,
            winner=opened.child.digest,
            losing_tags=tuple(losing[1:]),
            resend=tuple(a for t in losing for a in st.past[t].sent),
            reissue=(),
            readd=tuple(m for m in added if m not in their and m not in removed),
            reremove=tuple(m for m in removed if m in their),
        )
        # The branch we leave is journalled as the trial: a crash before the record of
        # the rejoin below puts the group back on it at start (``restore``), with its
        # record, history and texts; the offer was not acknowledged, so the node
        # delivers it again and we rejoin again (the unsent external commit is void).
        snap = self._ident.snapshot(gid)
        self._journal(gid, st, snap)
        try:
            new, commit = self._ident.join_external(opened.group_info)
        except crypto.MlsError as exc:
            self._back_to(gid, st, snap)
            log.warning("rejoin by external commit failed", extra={"err": type(exc).__name__})
            return None
        old = st
        st = self._new_group(gid, new, now)  # saved below, with the resends
        st.own_added, st.own_removed = old.own_added, old.own_removed
        st.recipients = old.recipients
        # Keep the history of the branch we left (its texts are re-sent now): if the
        # winner committed again before our external commit reached it, the commit is
        # refused there, and the winner's next offer must still open at the fork, so we
        # rejoin again from its newer GroupInfo. Once we are on the winner, its offers
        # share our current epoch and change nothing.
        for p in old.past.values():
            p.sent.clear()
        st.past = {**old.past, **st.past}
        while len(st.past) > MAX_STEPS:
            del st.past[next(iter(st.past))]
        st.rejoin_removed = set(plan.reremove) & old.own_removed
        st.rejoined_from = [*old.rejoined_from, opened.tip_tag][-branch_store.MAX_REJOINED_FROM :]
        st.readd = old.readd | (set(plan.readd) & old.own_added)
        # What is left to do is recorded with the new branch, in one transaction with
        # our texts since the fork made pending resends (taken from the kept texts
        # before the new record's epochs prune them), the external commit queued for
        # the winner's members (so no resend can go out in an epoch nobody else
        # entered: the commit is in the outbox before them) and the trial marker
        # cleared. Only then do the snapshots of the branch we left go.
        to = tuple(m for m in opened.roster if m != me)
        rows = envelopes([bytes.fromhex(m) for m in to], commit, opened.tip_tag)
        self._persist(gid, st, resend=list(plan.resend), outbox=rows, now=now)
        for sid, _epoch in self._ident.snapshots(gid):
            self._ident.release(gid, sid)
        self.stats.rejoins += 1
        self._switched.setdefault(gid, []).append(plan)
        log.info("group rejoined the winning branch", extra={"epoch": fork.epoch})
        return Rejoined(commit, opened.tip_tag, to, opened.fork_tag)

    def catch_up(self, gid: bytes, member: str, since: bytes) -> list[bytes]:
        """``member`` rejoined our branch and asks for the texts it could not read: the
        app ids of our texts sent in the epochs of our branch after ``since`` (the fork)
        whose roster held it. Only a member of the fork epoch asks (it read up to
        there); each (member, fork) is answered once; at most our kept texts (their
        bodies are kept up to MAX_BRANCH_TEXTS, within the largest expiry)."""
        st = self._groups.get(gid)
        if st is None or since not in st.past or member not in st.past[since].members:
            return []
        if (member, since) in st.caught_up:
            return []
        if len(st.caught_up) >= MAX_CATCH_UPS:
            st.caught_up.clear()
        st.caught_up.add((member, since))
        tags = list(st.past)
        out: list[bytes] = []
        for t in tags[tags.index(since) + 1 :]:
            if member in st.past[t].members:
                out += st.past[t].sent
        return out
