"""Fork resolution for one MLS group on a partition-prone mesh (Stage B, sans-IO).

MLS wants one commit per epoch; a mesh cut in two lets both sides commit on the same
epoch. This module decides, from what a member has seen, which branch every member ends
on, and what a member on the losing branch must do to get there. It performs no I/O and
touches no MLS state: the caller stages commits with the Rust core, reports them here,
and carries out the returned decisions (rollback to a snapshot, merge, resend).

The rule (docs/groups.md, "Stage B"): the commits form a tree whose nodes are epochs,
named by their *branch tag* (an exporter secret of the epoch, so two branches' epoch
``n`` have different tags). The canonical chain starts at the oldest retained epoch and
at every epoch takes the child commit with the lowest ``OrderKey``. The key is compared
only between siblings, i.e. at the first divergent commit, so a branch cannot win by
being long. Every member that has seen the same commits computes the same chain, in
whatever order they arrived.

``OrderKey`` = (0 if the commit changes membership else 1,
SHA-256(rank secret of the parent epoch || committer leaf as u32 big-endian),
SHA-256(commit bytes)). The rank secret is exported from the parent epoch, which the
committer cannot choose, and the leaf is fixed in that epoch, so re-randomising the
UpdatePath (grinding) changes only the last component: that only orders two commits of
the *same* committer on the same epoch. Relays see neither the rank secret nor the
leaf, so they cannot predict the winner either.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any, Protocol

import msgspec

__all__ = [
    "BRANCH_LABEL",
    "BRANCH_TAG_LEN",
    "DEFAULT_WINDOW",
    "RANK_LABEL",
    "RANK_LEN",
    "Apply",
    "Decision",
    "EpochInfo",
    "ForkCommit",
    "ForkError",
    "ForkResolver",
    "Hold",
    "Ignore",
    "IgnoreReason",
    "OrderKey",
    "OutOfWindow",
    "PendingSwitch",
    "Route",
    "RouteKind",
    "Switch",
    "branch_tag",
    "order_key",
    "rank_secret",
]

BRANCH_LABEL = "qpc/mesh/branch"
BRANCH_TAG_LEN = 16
RANK_LABEL = "qpc/mesh/rank"
RANK_LEN = 32
DEFAULT_WINDOW = 5
"""Rollback window R: how many epochs behind the tip a member can still switch branch
by rollback. Beyond it, the losing side rejoins by external commit."""


class ForkError(ValueError):
    """Input that contradicts the resolver's state (caller bug or malformed report)."""


class Exporter(Protocol):
    """What the helpers need from a group: the MLS exporter (``Group.export_secret``)."""

    def export_secret(self, label: str, context: bytes, length: int) -> bytes: ...


def branch_tag(group: Exporter) -> bytes:
    """The current epoch's branch tag, carried on every envelope the group sends."""
    return group.export_secret(BRANCH_LABEL, b"", BRANCH_TAG_LEN)


def rank_secret(group: Exporter) -> bytes:
    """The current epoch's rank secret: the seed of the ordering key of its child commits."""
    return group.export_secret(RANK_LABEL, b"", RANK_LEN)


class OrderKey(msgspec.Struct, frozen=True, order=True):
    """Lowest wins. Field order is comparison order."""

    kind: int
    """0: the commit adds, removes or changes the committer list; 1: a self-update only.
    Membership changes carry users' intents; a self-update is cheap to redo."""
    rank: bytes
    digest: bytes


def order_key(
    parent_rank_secret: bytes, committer_leaf: int, commit: bytes, changes_membership: bool
) -> OrderKey:
    if len(parent_rank_secret) != RANK_LEN:
        raise ForkError(f"rank secret must be {RANK_LEN} bytes")
    if not 0 <= committer_leaf < 2**32:
        raise ForkError("committer leaf out of range")
    rank = hashlib.sha256(parent_rank_secret + struct.pack(">I", committer_leaf)).digest()
    return OrderKey(0 if changes_membership else 1, rank, hashlib.sha256(commit).digest())


class ForkCommit(msgspec.Struct, frozen=True):
    """A commit staged (processed, not merged) against its parent epoch."""

    parent_tag: bytes
    commit: bytes
    committer_leaf: int
    changes_membership: bool
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    covered: tuple[bytes, ...] = ()
    """Proposal refs (intents) this commit applied."""

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.commit).digest()


class EpochInfo(msgspec.Struct, frozen=True):
    """An epoch the member has entered (after create, join or a merge)."""

    tag: bytes
    epoch: int
    rank_secret: bytes
    members: frozenset[str]


# --- decisions ---------------------------------------------------------------------------


class Apply(msgspec.Struct, frozen=True):
    """Merge the staged commit (it extends the live tip), then call ``entered``."""

    digest: bytes


class IgnoreReason(Enum):
    DUPLICATE = "duplicate"
    LOSES = "loses to the live sibling"
    LOST_BRANCH = "its parent lies on a branch that lost"


class Ignore(msgspec.Struct, frozen=True):
    """Discard the staged commit; nothing changes."""

    reason: IgnoreReason


class Hold(msgspec.Struct, frozen=True):
    """The parent epoch is unknown here: keep the message (it may belong to a branch we
    switch to later) until its expiry."""

    parent_tag: bytes


class Switch(msgspec.Struct, frozen=True):
    """The staged commit beats the live one at its parent: take the losing tip's
    snapshot, call ``begin_switch``, roll back to ``rollback_to``, merge the winner and
    call ``entered``; then resend, re-issue and re-remove as listed."""

    parent_tag: bytes
    parent_epoch: int
    rollback_to: int
    winner: bytes
    losing_tags: tuple[bytes, ...]
    resend: tuple[bytes, ...]
    """Our own application message ids sent in a losing epoch: re-encrypt on the winner
    with the same id (receivers de-duplicate)."""
    reissue: tuple[bytes, ...]
    """Intents (proposal refs) that a losing commit applied and the winner did not."""
    readd: tuple[str, ...]
    """Members added only on the losing branch and removed on no branch."""
    reremove: tuple[str, ...]
    """Members removed on the losing branch: they stay removed."""


class OutOfWindow(msgspec.Struct, frozen=True):
    """The staged commit would win, but its parent's snapshot is gone (the fork is older
    than the rollback window): rejoin the winning branch by external commit."""

    parent_tag: bytes
    winner: bytes


Decision = Apply | Ignore | Hold | Switch | OutOfWindow


class RouteKind(Enum):
    LIVE = "live"
    READONLY = "read-only"
    UNKNOWN = "unknown"


class Route(msgspec.Struct, frozen=True):
    """Where a received envelope with a given branch tag is decrypted."""

    kind: RouteKind
    snapshot: int | None = None
    """For READONLY: the retained losing-tip snapshot (``Identity.process_readonly``)."""


# --- state -------------------------------------------------------------------------------


class _Epoch(msgspec.Struct):
    info: EpochInfo
    parent: bytes | None
    via: bytes | None
    """Digest of the commit that led here (None for the root: create, join or rejoin)."""
    entered_ms: int
    snapshot: int | None = None
    """Snapshot of this epoch's state, taken before merging its child (rollback target)."""
    sent: list[bytes] = msgspec.field(default_factory=list)
    readonly_snapshot: int | None = None
    readonly_until_ms: int | None = None


class _Commit(msgspec.Struct, frozen=True):
    info: ForkCommit
    key: OrderKey
    digest: bytes


class PendingSwitch(msgspec.Struct, frozen=True):
    """Journal of a switch in progress (to resume after a crash in the middle)."""

    plan: Switch
    losing_tip_snapshot: int


class ForkResolver:
    """Per-group branch bookkeeping and decisions. Not thread-safe; one per group."""

    def __init__(self, window: int = DEFAULT_WINDOW, retain_ms: int = 7 * 86_400_000) -> None:
        if window < 1:
            raise ForkError("window must be >= 1")
        self.window = window
        self.retain_ms = retain_ms
        """How long a losing epoch stays decryptable read-only: the largest envelope
        expiry, since no message of that epoch can arrive later."""
        self._epochs: dict[bytes, _Epoch] = {}
        self._commits: dict[bytes, _Commit] = {}
        self._live: list[bytes] = []
        self._must_remove: set[str] = set()
        self._removed_anywhere: set[str] = set()
        self._released: list[int] = []
        self.pending: PendingSwitch | None = None
        self.switches = 0

    # -- queries --------------------------------------------------------------------------

    @property
    def tip(self) -> EpochInfo:
        if not self._live:
            raise ForkError("no epoch entered yet")
        return self._epochs[self._live[-1]].info

    def live_path(self) -> list[bytes]:
        return list(self._live)

    def snapshot_of(self, tag: bytes) -> int | None:
        """The rollback snapshot of a live epoch (None: the tip, or pruned)."""
        e = self._epochs.get(tag)
        return e.snapshot if e is not None and tag in self._live else None

    def key_of(self, digest: bytes) -> OrderKey | None:
        c = self._commits.get(digest)
        return c.key if c else None

    def route(self, tag: bytes, now_ms: int) -> Route:
        if tag in self._live:
            return Route(RouteKind.LIVE)
        e = self._epochs.get(tag)
        if (
            e is not None
            and e.readonly_snapshot is not None
            and e.readonly_until_ms is not None
            and now_ms <= e.readonly_until_ms
        ):
            return Route(RouteKind.READONLY, e.readonly_snapshot)
        return Route(RouteKind.UNKNOWN)

    def outstanding_removals(self, members: Iterable[str]) -> list[str]:
        """Members that a branch removed and that are still in the live group."""
        return sorted(self._must_remove.intersection(members))

    def may_rejoin(self, fingerprint: str, fork_tag: bytes) -> bool:
        """An external-commit rejoin is accepted only from a member of the roster at the
        fork epoch that no branch removed."""
        e = self._epochs.get(fork_tag)
        if e is None:
            return False
        return fingerprint in e.info.members and fingerprint not in self._removed_anywhere

    def snapshots_in_use(self) -> set[int]:
        out: set[int] = set()
        for e in self._epochs.values():
            if e.snapshot is not None:
                out.add(e.snapshot)
            if e.readonly_snapshot is not None:
                out.add(e.readonly_snapshot)
        if self.pending is not None:
            out.add(self.pending.plan.rollback_to)
            out.add(self.pending.losing_tip_snapshot)
        return out

    # -- inputs ---------------------------------------------------------------------------

    def start(self, info: EpochInfo, now_ms: int) -> None:
        """Create, join by Welcome or rejoin by external commit: a fresh root."""
        self._check_epoch(info)
        self._epochs = {info.tag: _Epoch(info, None, None, now_ms)}
        self._commits = {}
        self._live = [info.tag]
        self.pending = None

    def note_sent(self, tag: bytes, app_id: bytes) -> None:
        """We sent application message ``app_id`` in epoch ``tag``."""
        e = self._epochs.get(tag)
        if e is None:
            raise ForkError("note_sent for an unknown epoch")
        e.sent.append(app_id)

    def on_commit(self, info: ForkCommit) -> Decision:
        """A commit staged against epoch ``info.parent_tag``: what to do with it."""
        digest = info.digest
        known = self._commits.get(digest)
        parent = self._epochs.get(info.parent_tag)
        if known is None:
            if parent is None:
                return Hold(info.parent_tag)
            key = order_key(
                parent.info.rank_secret,
                info.committer_leaf,
                info.commit,
                info.changes_membership,
            )
            known = _Commit(info, key, digest)
            self._commits[digest] = known
        elif parent is None:  # pruned since
            return Ignore(IgnoreReason.LOSES)
        if info.parent_tag not in self._live:
            return Ignore(IgnoreReason.LOST_BRANCH)
        i = self._live.index(info.parent_tag)
        if i == len(self._live) - 1:
            return Apply(digest)
        ours = self._epochs[self._live[i + 1]].via
        if ours == digest:
            return Ignore(IgnoreReason.DUPLICATE)
        if ours is None or known.key >= self._commits[ours].key:
            return Ignore(IgnoreReason.LOSES)
        if parent.snapshot is None:
            return OutOfWindow(info.parent_tag, digest)
        return self._plan(i, known)

    def entered(
        self, commit: ForkCommit, info: EpochInfo, parent_snapshot: int, now_ms: int
    ) -> None:
        """We merged ``commit`` (staged on the live tip, or the winner of a switch after
        the rollback) and are now in epoch ``info``. ``parent_snapshot`` holds the
        parent epoch's state, taken before the merge."""
        self._check_epoch(info)
        digest = commit.digest
        if digest not in self._commits:
            parent = self._epochs.get(commit.parent_tag)
            if parent is None:
                raise ForkError("entered via a commit on an unknown parent")
            key = order_key(
                parent.info.rank_secret,
                commit.committer_leaf,
                commit.commit,
                commit.changes_membership,
            )
            self._commits[digest] = _Commit(commit, key, digest)
        if self.pending is not None:
            if self.pending.plan.winner != digest:
                raise ForkError("entered via another commit than the pending switch's winner")
            self._finish_switch(now_ms)
        if not self._live or self._live[-1] != commit.parent_tag:
            raise ForkError("entered via a commit that does not extend the live tip")
        parent = self._epochs[commit.parent_tag]
        if parent.snapshot is not None and parent.snapshot != parent_snapshot:
            self._released.append(parent.snapshot)
        parent.snapshot = parent_snapshot
        old = self._epochs.get(info.tag)
        if old is not None and info.tag not in self._live:
            # Back on a branch we once left (a third sibling lost to it): live again.
            old.readonly_snapshot = old.readonly_until_ms = None
        self._epochs[info.tag] = _Epoch(info, commit.parent_tag, digest, now_ms)
        self._live.append(info.tag)
        self._removed_anywhere.update(commit.removed)
        self._must_remove.intersection_update(info.members)

    def begin_switch(self, plan: Switch, losing_tip_snapshot: int) -> None:
        """Journal the switch before rolling back (see ``resume``)."""
        if self.pending is not None:
            raise ForkError("a switch is already in progress")
        self.pending = PendingSwitch(plan, losing_tip_snapshot)

    def resume(self) -> Switch | None:
        """After a restart: the switch to finish, if one was in progress. The caller
        rolls back (again; a rollback to the same snapshot is idempotent) unless the
        group is already at ``plan.parent_tag``, then merges the winner."""
        return self.pending.plan if self.pending is not None else None

    def prune(self, now_ms: int) -> list[int]:
        """Forget epochs beyond the window and expired read-only epochs; returns the
        snapshot ids the caller may release."""
        before = self.snapshots_in_use() | set(self._released)
        self._released.clear()
        keep_from = max(0, len(self._live) - 1 - self.window)
        dropped = self._live[:keep_from]
        self._live = self._live[keep_from:]
        for tag in dropped:
            e = self._epochs[tag]
            e.snapshot = None
            if e.readonly_snapshot is None:
                del self._epochs[tag]
        root = self._epochs[self._live[0]]
        root.parent = None
        for tag, e in list(self._epochs.items()):
            if tag in self._live:
                continue
            if e.readonly_until_ms is None or now_ms > e.readonly_until_ms:
                del self._epochs[tag]
        live_digests = {self._epochs[t].via for t in self._live}
        for d, c in list(self._commits.items()):
            if c.info.parent_tag not in self._epochs and d not in live_digests:
                del self._commits[d]
        return sorted(before - self.snapshots_in_use())

    # -- persistence ----------------------------------------------------------------------

    def dump(self) -> bytes:
        """The whole state (journal included) for the client to store with the group, so
        a switch interrupted by a crash resumes (``load`` then ``resume``)."""

        def commit(c: _Commit) -> dict[str, Any]:
            i = c.info
            return {
                "parent": i.parent_tag.hex(),
                "commit": i.commit.hex(),
                "leaf": i.committer_leaf,
                "membership": i.changes_membership,
                "added": list(i.added),
                "removed": list(i.removed),
                "covered": [r.hex() for r in i.covered],
            }

        def ep(e: _Epoch) -> dict[str, Any]:
            return {
                "tag": e.info.tag.hex(),
                "epoch": e.info.epoch,
                "rank": e.info.rank_secret.hex(),
                "members": sorted(e.info.members),
                "parent": e.parent.hex() if e.parent is not None else None,
                "via": e.via.hex() if e.via is not None else None,
                "entered": e.entered_ms,
                "snapshot": e.snapshot,
                "sent": [a.hex() for a in e.sent],
                "ro_snapshot": e.readonly_snapshot,
                "ro_until": e.readonly_until_ms,
            }

        p = self.pending
        doc = {
            "v": 1,
            "window": self.window,
            "retain_ms": self.retain_ms,
            "epochs": [ep(e) for e in self._epochs.values()],
            "commits": [commit(c) for c in self._commits.values()],
            "live": [t.hex() for t in self._live],
            "must_remove": sorted(self._must_remove),
            "removed_anywhere": sorted(self._removed_anywhere),
            "released": list(self._released),
            "switches": self.switches,
            "pending": None
            if p is None
            else {
                "winner": p.plan.winner.hex(),
                "parent": p.plan.parent_tag.hex(),
                "losing_tip": p.losing_tip_snapshot,
            },
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def load(cls, data: bytes) -> ForkResolver:
        """Inverse of ``dump``; ForkError for anything malformed or inconsistent."""
        try:
            return cls._load(json.loads(data))
        except ForkError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise ForkError(f"malformed fork state: {exc}") from None

    @classmethod
    def _load(cls, doc: Any) -> ForkResolver:
        def bb(v: Any) -> bytes:
            if not isinstance(v, str):
                raise ForkError("expected hex")
            return bytes.fromhex(v)

        def num(v: Any) -> int:
            if not isinstance(v, int) or isinstance(v, bool):
                raise ForkError("expected an integer")
            return v

        def opt_num(v: Any) -> int | None:
            return None if v is None else num(v)

        def strs(v: Any) -> list[str]:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ForkError("expected a list of strings")
            return v

        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise ForkError("unknown fork state version")
        r = cls(window=num(doc["window"]), retain_ms=num(doc["retain_ms"]))
        for e in doc["epochs"]:
            info = EpochInfo(
                bb(e["tag"]), num(e["epoch"]), bb(e["rank"]), frozenset(strs(e["members"]))
            )
            r._check_epoch(info)
            r._epochs[info.tag] = _Epoch(
                info,
                None if e["parent"] is None else bb(e["parent"]),
                None if e["via"] is None else bb(e["via"]),
                num(e["entered"]),
                opt_num(e["snapshot"]),
                [bb(a) for a in e["sent"]],
                opt_num(e["ro_snapshot"]),
                opt_num(e["ro_until"]),
            )
        for c in doc["commits"]:
            if not isinstance(c["membership"], bool):
                raise ForkError("expected a boolean")
            fc = ForkCommit(
                bb(c["parent"]),
                bb(c["commit"]),
                num(c["leaf"]),
                c["membership"],
                tuple(strs(c["added"])),
                tuple(strs(c["removed"])),
                tuple(bb(x) for x in c["covered"]),
            )
            parent = r._epochs.get(fc.parent_tag)
            if parent is None:
                continue  # its parent was pruned: only its digest mattered
            key = order_key(
                parent.info.rank_secret, fc.committer_leaf, fc.commit, fc.changes_membership
            )
            r._commits[fc.digest] = _Commit(fc, key, fc.digest)
        r._live = [bb(t) for t in doc["live"]]
        if not r._live or any(t not in r._epochs for t in r._live):
            raise ForkError("live path names an unknown epoch")
        for t in r._live[1:]:
            via = r._epochs[t].via
            if via is None or via not in r._commits:
                raise ForkError("live epoch without its commit")
        r._must_remove = set(strs(doc["must_remove"]))
        r._removed_anywhere = set(strs(doc["removed_anywhere"]))
        r._released = [num(x) for x in doc["released"]]
        r.switches = num(doc["switches"])
        p = doc["pending"]
        if p is not None:
            winner = r._commits.get(bb(p["winner"]))
            parent_tag = bb(p["parent"])
            if (
                winner is None
                or parent_tag not in r._live
                or parent_tag == r._live[-1]
                or r._epochs[parent_tag].snapshot is None
            ):
                raise ForkError("journalled switch does not fit the state")
            r.pending = PendingSwitch(
                r._plan(r._live.index(parent_tag), winner), num(p["losing_tip"])
            )
        return r

    # -- internals ------------------------------------------------------------------------

    def _check_epoch(self, info: EpochInfo) -> None:
        if len(info.tag) != BRANCH_TAG_LEN:
            raise ForkError(f"branch tag must be {BRANCH_TAG_LEN} bytes")
        if len(info.rank_secret) != RANK_LEN:
            raise ForkError(f"rank secret must be {RANK_LEN} bytes")

    def _plan(self, i: int, winner: _Commit) -> Switch:
        parent = self._epochs[self._live[i]]
        assert parent.snapshot is not None
        losing = self._live[i + 1 :]
        losing_commits = [self._commits[d] for t in losing if (d := self._epochs[t].via)]
        w = winner.info
        covered = set(w.covered)
        reissue: list[bytes] = []
        added: list[str] = []
        removed: list[str] = []
        for c in losing_commits:
            reissue.extend(r for r in c.info.covered if r not in covered and r not in reissue)
            added.extend(a for a in c.info.added if a not in added)
            removed.extend(r for r in c.info.removed if r not in removed)
        gone = self._removed_anywhere | set(removed) | set(w.removed)
        resend = tuple(a for t in losing for a in self._epochs[t].sent)
        return Switch(
            parent_tag=parent.info.tag,
            parent_epoch=parent.info.epoch,
            rollback_to=parent.snapshot,
            winner=winner.digest,
            losing_tags=tuple(losing),
            resend=resend,
            reissue=tuple(reissue),
            readd=tuple(a for a in added if a not in w.added and a not in gone),
            reremove=tuple(r for r in removed if r not in w.removed),
        )

    def _finish_switch(self, now_ms: int) -> None:
        assert self.pending is not None
        plan = self.pending.plan
        i = self._live.index(plan.parent_tag)
        for tag in self._live[i + 1 :]:
            e = self._epochs[tag]
            e.readonly_snapshot = self.pending.losing_tip_snapshot
            e.readonly_until_ms = now_ms + self.retain_ms
            if e.snapshot is not None:
                self._released.append(e.snapshot)
            e.snapshot = None
            e.sent.clear()  # resent on the winner
        del self._live[i + 1 :]
        self._removed_anywhere.update(plan.reremove)
        self._must_remove.update(plan.reremove)
        self.pending = None
        self.switches += 1


def winner_of(keys: Sequence[OrderKey]) -> int:
    """Index of the lowest key (ties cannot happen between different commits)."""
    if not keys:
        raise ForkError("no keys")
    return min(range(len(keys)), key=lambda k: keys[k])
