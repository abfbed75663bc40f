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
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

from qpc_node import crypto
from qpc_node.client.agent_types import AgentContext, AgentPart
from qpc_node.client.mlsheader import InvalidMlsHeader, parse_header
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
from qpc_node.ops.log import get_logger

log = get_logger("qpc.client")

CT_APPLICATION = 1
CT_PROPOSAL = 2
CT_COMMIT = 3
MAX_TEXTS = 1024
"""Own texts kept per group for a resend on the winning branch (the oldest go first)."""
MAX_SEEN = 8192
"""(sender, app id) pairs remembered per agent to show a re-sent text once."""
MAX_OLD_PROPOSALS = 256
"""Proposals of an older live epoch kept per group (replayed before staging a sibling
commit there: the sibling may cover them by reference)."""


class Unknown:
    """``Branches.process``: the message is of a branch not seen here (yet): hold it."""


UNKNOWN_BRANCH = Unknown()


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


@dataclass(slots=True)
class BranchStatistics:
    switches: int = 0
    readonly: int = 0
    """Late messages of a branch we left, decrypted from its retained snapshot."""
    out_of_window: int = 0
    held_unknown: int = 0


@dataclass(slots=True)
class _Group:
    resolver: ForkResolver
    old_proposals: dict[bytes, list[bytes]] = field(default_factory=dict)
    own_commit: bytes | None = None
    texts: dict[bytes, bytes] = field(default_factory=dict)
    """Our texts (app id -> AppMessage bytes) of the retained epochs, for resends."""
    own_removed: set[str] = field(default_factory=set)
    """Members our own commits removed: if such a commit loses, we remove them again."""
    own_added: set[str] = field(default_factory=set)
    """Members our own commits added: if such a commit loses, we add them again."""


class Branches(AgentPart):
    """Per group: the resolver, the snapshots it names, and the switches it decides."""

    def __init__(self, ctx: AgentContext, *, window: int = DEFAULT_WINDOW, retain_ms: int) -> None:
        super().__init__(ctx)
        self.window = window
        self.retain_ms = retain_ms
        self._groups: dict[bytes, _Group] = {}
        self._switched: dict[bytes, list[Switch]] = {}
        self._seen: dict[tuple[str, bytes], None] = {}
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
        return [m for m in st.resolver.outstanding_removals(members) if m in st.own_removed]

    def add_again(self, gid: bytes, plan: Switch, members: list[str]) -> list[str]:
        """Members that a commit of ours added on a branch that lost (and that no branch
        removed), not in the group we switched to: we (their adder) ask again, so each
        is requested once, and the joiner gets a Welcome from the winning branch."""
        st = self._groups.get(gid)
        if st is None:
            return []
        return [m for m in plan.readd if m in st.own_added and m not in members]

    def take_merged_own(self, gid: bytes) -> bytes:
        """Our commit merged last in ``gid`` (b"" if none since the last call): the
        group core logs it, so we answer other members' pulls with our commits too."""
        return self._merged_own.pop(gid, b"")

    def seen_text(self, sender: str, app_id: bytes) -> bool:
        """True when this text was shown already (a resend after a switch); else
        remembers it. Texts without an id (older senders) are never duplicates."""
        if not app_id:
            return False
        key = (sender, app_id)
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > MAX_SEEN:
            del self._seen[next(iter(self._seen))]
        return False

    def resends(self, gid: bytes, plan: Switch) -> list[bytes]:
        """Our texts of the losing branch, to send again on the winner (same app id)."""
        st = self._groups.get(gid)
        if st is None:
            return []
        return [st.texts[a] for a in plan.resend if a in st.texts]

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
        st.texts[app_id] = body
        if len(st.texts) > MAX_TEXTS:
            del st.texts[next(iter(st.texts))]

    def own_commit(self, gid: bytes, g: crypto.Group, commit: bytes, now: int) -> bytes:
        """Our commit is on its way (merged once the node stored it): remember it for
        the merge, and return the tag of its parent epoch (the one we are still in)."""
        if not g.is_active:
            return b""
        st = self._group_state(gid, g, now)
        st.own_commit = commit
        return st.resolver.tip.tag

    def _group_state(self, gid: bytes, g: crypto.Group, now: int) -> _Group:
        """The group's resolver, (re)started at the current epoch when we have none or
        the MLS state moved without us (a commit without a tag from an older sender)."""
        st = self._groups.get(gid)
        if st is not None and st.resolver.tip.tag == branch_tag(g):
            return st
        r = ForkResolver(window=self.window, retain_ms=self.retain_ms)
        r.start(epoch_info(g), now)
        st = _Group(r)
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
        ev = g.merge_pending_commit()
        fc = fork_commit(parent_tag, roster, st.own_commit, ev, self._ident.fingerprint)
        self._merged_own[gid] = st.own_commit
        st.own_commit = None
        st.own_removed.update(fc.removed)
        st.own_added.update(fc.added)
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
            return None
        return self._sibling(gid, g, st, tag, data, now)

    def _commit_at_tip(
        self, gid: bytes, g: crypto.Group, st: _Group, tag: bytes, data: bytes, now: int
    ) -> crypto.Event | None:
        if st.resolver.key_of(_digest(data)) is not None:
            return None  # a duplicate of a commit decided before
        roster = g.members()
        snap = self._ident.snapshot(gid)
        try:
            ev = g.process(data)
        except crypto.MlsError:
            self._ident.rollback(gid, snap)
            self._ident.release(gid, snap)
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
        if ev.removed or not g.is_active:
            # No exporter once removed: a tag no message carries stands for "removed".
            gone = hashlib.sha256(b"qpc/removed" + fc.digest).digest()[:16]
            info = EpochInfo(gone, g.epoch, r.tip.rank_secret, frozenset())
            r.entered(fc, info, parent_snap, now)
            return
        r.entered(fc, epoch_info(g), parent_snap, now)
        st.old_proposals = {t: ps for t, ps in st.old_proposals.items() if t in r.live_path()}
        for sid in r.prune(now):
            self._ident.release(gid, sid)

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
            self._ident.rollback(gid, tip_snap)
            self._ident.release(gid, tip_snap)
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
        self._ident.rollback(gid, tip_snap)
        self._ident.release(gid, tip_snap)
        if isinstance(decision, OutOfWindow):
            self.stats.out_of_window += 1
        return None
