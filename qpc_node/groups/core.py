"""Sans-IO core of one MLS group on a mesh, Stage A (docs/groups.md).

MLS (RFC 9420) wants one total order of commits; a mesh gives none. Stage A keeps
a single committer at a time and makes everything around it robust:

- **Intents.** Any member asks for a membership change (add, remove, self-update,
  leave) as an MLS proposal plus a :class:`IntentNote` (intent id, proposal ref).
  A proposal is bound to its epoch, so an intent that the next commit did not
  cover is proposed again on the new epoch (bounded attempts, then a warning).
- **Committer list.** An ordered list of fingerprints lives in a group-context
  extension (the Rust core). ``committers[0]`` commits the pending proposals
  after a short quiescence; if a proposal stays pending for
  ``committer_timeout_ms * k``, ``committers[k]`` commits instead and rotates the
  list so the silent ones move to the end. Every member reads the *effective*
  list the same way (the stored list minus departed members; if none is left,
  the first member in leaf order), and every commit that finds the stored list
  short or stale rewrites it, topped up to ``max_committers`` in roster order.
- **Missing commits.** A member holding messages of a later epoch for
  ``pull_after_ms`` asks one member (committers first, then others in turn) with
  a CommitPull encrypted in its own, older epoch (the others keep past epochs);
  the one asked re-sends the logged commits from that epoch on.
- **Past epochs.** Secrets of an ended epoch are kept while a message of it may
  still be in flight: ``max_expiry_ms`` after it ended (the largest envelope
  expiry), capped at ``max_past_epochs``. The age of the oldest kept one is the
  forward-secrecy exposure in :meth:`GroupCore.statistics`.

No I/O and no clock: the driver (the client's agent, or qpc_sim/groups.py) runs
the MLS calls the returned actions ask for, reports their results back
(:meth:`GroupCore.proposed`, :meth:`GroupCore.on_commit`, ...) and calls
:meth:`GroupCore.tick` at :meth:`GroupCore.next_deadline`. ``now_ms`` is passed in.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Sequence

import msgspec

from qpc_node.errors import LocalProtocolError

__all__ = [
    "Action",
    "Commit",
    "CommitInfo",
    "Done",
    "GroupConfig",
    "GroupCore",
    "GroupStatistics",
    "Intent",
    "IntentError",
    "IntentKind",
    "IntentNote",
    "Propose",
    "Prune",
    "Resend",
    "SendIntent",
    "SendPull",
    "Warn",
    "effective_committers",
    "topped_up",
]

INTENT_ID_LEN = 16
DAY_MS = 24 * 3600 * 1000


class IntentError(LocalProtocolError):
    """A membership request that cannot be made (bad target, already pending, ...)."""


class IntentKind(enum.Enum):
    ADD = "add"
    REMOVE = "remove"
    UPDATE = "update"
    LEAVE = "leave"


class GroupConfig(msgspec.Struct, frozen=True):
    """Timings and bounds of the Stage A protocol (milliseconds)."""

    committer_timeout_ms: int = 120_000
    """A proposal pending this long without a commit: the next committer takes over."""
    quiescence_ms: int = 1_000
    """The committer waits this long after the last proposal before committing..."""
    max_commit_delay_ms: int = 10_000
    """... but never longer than this after the first one (a stream of proposals)."""
    commit_retry_ms: int = 5_000
    """After our commit could not be sent: try again this much later."""
    max_expiry_ms: int = 7 * DAY_MS
    """The largest envelope expiry: how long a message of an ended epoch may still come."""
    max_past_epochs: int = 32
    """Past epochs kept at most, whatever their age (the Rust core's cap)."""
    max_attempts: int = 5
    """Proposals of one intent at most (the first and the re-proposals)."""
    pull_after_ms: int = 5_000
    """Holding a message of a later epoch this long: pull the missing commits."""
    pull_retry_ms: int = 10_000
    """Between two pulls (each asks the next candidate)."""
    commit_log_len: int = 64
    """Commits kept to answer pulls."""
    max_pull_answer: int = 16
    """Commits re-sent for one pull at most (the puller asks again for the rest)."""
    max_committers: int = 3
    """Length of the committer list a commit writes."""

    def __post_init__(self) -> None:
        for name in (
            "committer_timeout_ms",
            "quiescence_ms",
            "max_commit_delay_ms",
            "commit_retry_ms",
            "max_expiry_ms",
            "pull_after_ms",
            "pull_retry_ms",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("max_attempts", "commit_log_len", "max_pull_answer", "max_committers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_past_epochs < 0:
            raise ValueError("max_past_epochs must be >= 0")


class Intent(msgspec.Struct, frozen=True):
    """A membership change a member asked for, tracked until a commit applies it."""

    intent_id: bytes
    kind: IntentKind
    target: str
    """Fingerprint (hex) of the member to add or remove; "" for update and leave."""
    proposer: str
    created_ms: int
    epoch: int = -1
    """Epoch of the current proposal; -1 while not proposed (yet)."""
    proposal_ref: bytes = b""
    attempts: int = 0


class IntentNote(msgspec.Struct, frozen=True):
    """The app-layer note sent beside a proposal (client.proto GroupIntent)."""

    intent_id: bytes
    kind: IntentKind
    target: str
    proposal_ref: bytes
    epoch: int


class CommitInfo(msgspec.Struct, frozen=True):
    """A commit that was merged (ours, after the node stored it, or one we received)."""

    parent_epoch: int
    """The epoch the commit left (the new epoch is parent_epoch + 1)."""
    sender: str
    covered: tuple[bytes, ...]
    """Refs of the proposals it applied by reference."""
    added: tuple[str, ...]
    removed: tuple[str, ...]
    committers: tuple[str, ...]
    """The committer list stored in the group after it."""
    members: tuple[str, ...]
    """The roster after it, in leaf order (the same on every member)."""
    authenticator: bytes
    message: bytes
    """The commit as sent (re-sent verbatim to a member that pulls it)."""
    removed_us: bool = False


# -- actions (what the driver is asked to do) ---------------------------------------


class Propose(msgspec.Struct, frozen=True):
    """Make the MLS proposal of an intent, then report it with :meth:`GroupCore.proposed`."""

    intent_id: bytes
    kind: IntentKind
    target: str


class Commit(msgspec.Struct, frozen=True):
    """Commit the pending proposals (``Group.commit_pending(committers)``), send the
    commit to every other member, merge once the node stored it, then send the
    Welcomes; report with :meth:`GroupCore.on_commit` (or ``commit_failed``)."""

    committers: tuple[str, ...] | None
    """The new committer list to store with it; None keeps the current one."""


class SendIntent(msgspec.Struct, frozen=True):
    """Send ``note`` to every other member (an MLS application message)."""

    note: IntentNote


class SendPull(msgspec.Struct, frozen=True):
    """Send a CommitPull for ``from_epoch`` to member ``to`` (encrypted in our epoch)."""

    to: str
    from_epoch: int


class Resend(msgspec.Struct, frozen=True):
    """Re-send these commits (verbatim, oldest first) to member ``to``."""

    to: str
    messages: tuple[bytes, ...]


class Prune(msgspec.Struct, frozen=True):
    """Keep only the newest ``keep`` past epochs (``Group.prune_past_epochs``)."""

    keep: int


class Warn(msgspec.Struct, frozen=True):
    text: str


class Done(msgspec.Struct, frozen=True):
    """An intent of ours is finished: applied by a commit, or given up (forget it)."""

    intent_id: bytes
    applied: bool


Action = Propose | Commit | SendIntent | SendPull | Resend | Prune | Warn | Done


class GroupStatistics(msgspec.Struct, frozen=True):
    epoch: int
    committers: tuple[str, ...]
    intents: int
    """Our own intents not yet applied."""
    pending_proposals: int
    """Proposals seen on this epoch, not yet committed."""
    past_epochs_kept: int
    fs_exposure_ms: int
    """Age of the oldest kept past-epoch secret, counted from the end of its epoch
    (0 when none is kept): how long a secret that forward secrecy would have
    deleted stays readable by someone who takes this device."""
    commits_seen: int
    own_commits: int
    reproposals: int
    intents_given_up: int
    pulls_sent: int
    pulls_served: int
    failovers: int
    """Commits we made as a stand-in (not the first committer)."""
    off_list_commits: int
    """Commits received from a member that was not the one due to commit."""


class _Past(msgspec.Struct):
    epoch: int
    started_ms: int
    ended_ms: int


class _Counters(msgspec.Struct):
    commits_seen: int = 0
    own_commits: int = 0
    reproposals: int = 0
    given_up: int = 0
    pulls_sent: int = 0
    pulls_served: int = 0
    failovers: int = 0
    off_list: int = 0


def effective_committers(stored: Sequence[str], roster: Sequence[str]) -> tuple[str, ...]:
    """The committer list every member agrees on: the stored list without members no
    longer in the roster; the first member (leaf order) if none of them is left."""
    present = set(roster)
    out = tuple(c for c in dict.fromkeys(stored) if c in present)
    return out or tuple(roster[:1])


def topped_up(
    stored: Sequence[str], roster: Sequence[str], size: int, exclude: str = ""
) -> tuple[str, ...]:
    """The list a commit writes: the effective one (without ``exclude``), topped up
    to ``size`` with other members in roster order."""
    out = [c for c in effective_committers(stored, roster) if c != exclude]
    for m in roster:
        if len(out) >= size:
            break
        if m not in out and m != exclude:
            out.append(m)
    return tuple(out)


def new_intent_id() -> bytes:
    return os.urandom(INTENT_ID_LEN)


class _CommitState(msgspec.Struct):
    in_flight: bool = False
    retry_at: int = 0
    standin: bool = False
    want: bool = False
    """A commit is wanted even with no proposal pending (hand-over, own update)."""
    want_committers: tuple[str, ...] | None = None


class GroupCore(msgspec.Struct):
    """One group seen by member ``me``: see the module docstring."""

    me: str
    epoch: int
    members: tuple[str, ...]
    stored_committers: tuple[str, ...]
    now_ms: int
    config: GroupConfig = msgspec.field(default_factory=GroupConfig)
    _intents: dict[bytes, Intent] = msgspec.field(default_factory=dict)
    _notes: dict[bytes, tuple[str, IntentNote]] = msgspec.field(default_factory=dict)
    """Intent notes of others on this epoch: intent id -> (sender, note)."""
    _pending: dict[bytes, int] = msgspec.field(default_factory=dict)
    """Proposal refs seen on this epoch -> when first seen."""
    _last_proposal_ms: int = 0
    _epoch_started_ms: int = 0
    _past: list[_Past] = msgspec.field(default_factory=list)
    _log: list[tuple[int, bytes, bytes]] = msgspec.field(default_factory=list)
    """(parent epoch, sha256, commit message), oldest first."""
    _future_since: int | None = None
    _future_epoch: int = -1
    _next_pull_ms: int = 0
    _pull_turn: int = 0
    _served: dict[tuple[str, int], int] = msgspec.field(default_factory=dict)
    _commit: _CommitState = msgspec.field(default_factory=_CommitState)
    _n: _Counters = msgspec.field(default_factory=_Counters)
    removed: bool = False

    def __post_init__(self) -> None:
        self._epoch_started_ms = self.now_ms

    # -- queries ------------------------------------------------------------------
    @property
    def committers(self) -> tuple[str, ...]:
        """The effective committer list (see :func:`effective_committers`)."""
        return effective_committers(self.stored_committers, self.members)

    @property
    def commit_in_flight(self) -> bool:
        """A commit of ours was asked for and is not merged (or failed) yet."""
        return self._commit.in_flight

    def intents(self) -> list[Intent]:
        """Our own intents not yet applied, oldest first."""
        return sorted(self._intents.values(), key=lambda i: i.created_ms)

    def others_intents(self) -> list[tuple[str, IntentNote]]:
        """(proposer, note) of the other members' requests on this epoch."""
        return list(self._notes.values())

    def statistics(self, now_ms: int) -> GroupStatistics:
        oldest = self._past[0].ended_ms if self._past else now_ms
        n = self._n
        return GroupStatistics(
            epoch=self.epoch,
            committers=self.committers,
            intents=len(self._intents),
            pending_proposals=len(self._pending),
            past_epochs_kept=len(self._past),
            fs_exposure_ms=max(0, now_ms - oldest),
            commits_seen=n.commits_seen,
            own_commits=n.own_commits,
            reproposals=n.reproposals,
            intents_given_up=n.given_up,
            pulls_sent=n.pulls_sent,
            pulls_served=n.pulls_served,
            failovers=n.failovers,
            off_list_commits=n.off_list,
        )

    def committer_rank(self, now_ms: int) -> int | None:
        """Our place in the effective list if it is our turn to commit now, else None:
        0 for the first committer, k when the first k stayed silent too long."""
        cs = self.committers
        if self.me not in cs:
            return None
        rank = cs.index(self.me)
        if rank == 0:
            return 0
        first = min(self._pending.values(), default=None)
        if first is None:
            return None
        if now_ms - first >= self.config.committer_timeout_ms * rank:
            return rank
        return None

    # -- local requests -------------------------------------------------------------
    def request(self, kind: IntentKind, target: str, now_ms: int) -> tuple[bytes, list[Action]]:
        """The user asks for a change: its intent id and what to do now."""
        self.now_ms = now_ms
        if self.removed:
            raise IntentError("no longer a member of this group")
        if kind in (IntentKind.ADD, IntentKind.REMOVE):
            if not target:
                raise IntentError(f"{kind.value} needs a member")
            if kind is IntentKind.ADD and target in self.members:
                raise IntentError("already a member")
            if kind is IntentKind.REMOVE and target not in self.members:
                raise IntentError("not a member")
            if kind is IntentKind.REMOVE and target == self.me:
                kind, target = IntentKind.LEAVE, ""
        else:
            target = ""
        for i in self._intents.values():
            if i.kind is kind and i.target == target:
                raise IntentError(f"a {kind.value} request for that is already pending")
        intent = Intent(new_intent_id(), kind, target, self.me, now_ms)
        self._intents[intent.intent_id] = intent
        return intent.intent_id, self._start(intent, now_ms)

    def _start(self, intent: Intent, now_ms: int) -> list[Action]:
        cs = self.committers
        if intent.kind is IntentKind.LEAVE and cs[:1] == (self.me,):
            # We cannot commit our own removal: hand the list over first, then
            # propose the leave for the next committer to commit. (A later
            # committer just proposes: the first commits it, and the list loses us.)
            rest = topped_up(cs, self.members, self.config.max_committers, exclude=self.me)
            if not rest:
                raise IntentError("the last member cannot leave; delete the conversation")
            # on_commit proposes the leave once this commit merged (we are off the list).
            return self._make_commit(rest, now_ms, standin=False)
        if intent.kind is IntentKind.UPDATE and cs and cs[0] == self.me:
            # A committer's own Update proposal cannot be in its commit (RFC 9420
            # 12.2): its update is a commit with a path, which any commit has. Marked
            # as waiting for our commit (epoch -1), so that commit completes it: an
            # update proposed before we became the first committer would otherwise be
            # re-started after every commit of ours, a commit each time, for ever.
            self._intents[intent.intent_id] = msgspec.structs.replace(
                intent, epoch=-1, proposal_ref=b""
            )
            return self._make_commit(None, now_ms, standin=False)
        return [Propose(intent.intent_id, intent.kind, intent.target)]

    def proposed(self, intent_id: bytes, proposal_ref: bytes, now_ms: int) -> list[Action]:
        """The driver made the proposal of ``intent_id`` on the current epoch (and
        sent it): track it and tell the others."""
        self.now_ms = now_ms
        intent = self._intents.get(intent_id)
        if intent is None:
            return []
        intent = msgspec.structs.replace(
            intent, epoch=self.epoch, proposal_ref=proposal_ref, attempts=intent.attempts + 1
        )
        self._intents[intent_id] = intent
        self._see_proposal(proposal_ref, now_ms)
        note = IntentNote(intent_id, intent.kind, intent.target, proposal_ref, self.epoch)
        return [SendIntent(note)]

    def propose_failed(self, intent_id: bytes, why: str, now_ms: int) -> list[Action]:
        """The MLS proposal could not be made (e.g. no KeyPackage): drop the intent."""
        self.now_ms = now_ms
        intent = self._intents.pop(intent_id, None)
        if intent is None:
            return []
        self._n.given_up += 1
        what = f"{intent.kind.value} {intent.target[:16]}".strip()
        return [Warn(f"request ({what}) not made: {why}"), Done(intent_id, applied=False)]

    def restore(self, intent: Intent, now_ms: int) -> list[Action]:
        """An intent of ours from before a restart: propose it (again) on this epoch."""
        self.now_ms = now_ms
        if self.removed or intent.intent_id in self._intents:
            return []
        fresh = msgspec.structs.replace(intent, epoch=-1, proposal_ref=b"", attempts=0)
        self._intents[intent.intent_id] = fresh
        return self._start(fresh, now_ms)

    def cancel(self, intent_id: bytes) -> bool:
        """Stop tracking an intent (the user gave up on it); it may still be applied."""
        return self._intents.pop(intent_id, None) is not None

    # -- received ----------------------------------------------------------------------
    def on_proposal(
        self, sender: str, proposal_ref: bytes, epoch: int, now_ms: int
    ) -> list[Action]:
        """A proposal (of ``sender``) was processed into our proposal store."""
        self.now_ms = now_ms
        if epoch == self.epoch and proposal_ref:
            self._see_proposal(proposal_ref, now_ms)
        return []

    def _see_proposal(self, ref: bytes, now_ms: int) -> None:
        self._pending.setdefault(ref, now_ms)
        self._last_proposal_ms = now_ms

    def on_intent(self, sender: str, note: IntentNote, now_ms: int) -> list[Action]:
        """A member's intent note (shown by /group info; its proposal does the work)."""
        self.now_ms = now_ms
        if note.epoch == self.epoch and sender in self.members:
            self._notes[note.intent_id] = (sender, note)
        return []

    def on_commit(self, info: CommitInfo, now_ms: int) -> list[Action]:
        """A commit was merged: ours (after the node stored it) or one we processed."""
        self.now_ms = now_ms
        own = info.sender == self.me
        expected = self.committers
        out: list[Action] = []
        self._n.commits_seen += 1
        if own:
            self._n.own_commits += 1
            if self._commit.standin:
                self._n.failovers += 1
        elif not expected or info.sender != expected[0]:
            # A stand-in after a timeout, or a racing committer (Stage B resolves forks).
            self._n.off_list += 1
        self._commit = _CommitState()
        self._log_commit(info)
        self._past.append(_Past(info.parent_epoch, self._epoch_started_ms, now_ms))
        self._epoch_started_ms = now_ms
        self.epoch = info.parent_epoch + 1
        self.members = info.members
        self.stored_committers = info.committers
        self._pending.clear()
        self._notes.clear()
        if info.removed_us or self.me not in info.members:
            self.removed = True
            out.extend(
                Done(i, applied=i_.kind is IntentKind.LEAVE) for i, i_ in self._intents.items()
            )
            self._intents.clear()
            return out
        if self._future_since is not None:
            if self.epoch >= self._future_epoch:
                self._future_since = None
            else:
                self._future_since = now_ms
        covered = set(info.covered)
        for iid, intent in list(self._intents.items()):
            done = intent.proposal_ref in covered and intent.epoch == info.parent_epoch
            if intent.kind is IntentKind.ADD and intent.target in info.members:
                done = True
            if intent.kind is IntentKind.REMOVE and intent.target not in info.members:
                done = True
            if intent.kind is IntentKind.UPDATE and own and intent.epoch < 0:
                done = True  # a committer's own update: any commit of ours renews its path
            if done:
                del self._intents[iid]
                out.append(Done(iid, applied=True))
        for iid, intent in list(self._intents.items()):
            if intent.epoch < 0:
                # Waiting for a commit of ours (hand-over before a leave, a committer's
                # update): after ours, the leave is proposed; after someone else's,
                # ours did not happen: start again on the new epoch.
                out.extend(self._start(intent, now_ms))
                continue
            if intent.epoch >= self.epoch:
                continue
            if intent.attempts >= self.config.max_attempts:
                del self._intents[iid]
                self._n.given_up += 1
                out.append(
                    Warn(
                        f"{intent.kind.value} request not applied after {intent.attempts} "
                        "proposals: given up"
                    )
                )
                out.append(Done(iid, applied=False))
                continue
            self._n.reproposals += 1
            out.extend(self._start(intent, now_ms))
        return out

    def _log_commit(self, info: CommitInfo) -> None:
        if not info.message:
            return
        digest = hashlib.sha256(info.message).digest()
        if any(d == digest for _, d, _m in self._log):
            return
        self._log.append((info.parent_epoch, digest, info.message))
        del self._log[: max(0, len(self._log) - self.config.commit_log_len)]

    def commit_failed(self, now_ms: int) -> list[Action]:
        """Our commit was not stored by the node (and was cleared): retry later."""
        self.now_ms = now_ms
        self._commit.in_flight = False
        self._commit.retry_at = now_ms + self.config.commit_retry_ms
        return []

    def commit_superseded(self) -> None:
        """Another member's commit was merged while ours was pending (the driver
        cleared ours): our proposals are re-proposed by ``on_commit``."""
        self._commit.in_flight = False

    def on_pull(self, sender: str, from_epoch: int, now_ms: int) -> list[Action]:
        """``sender`` lacks the commits from ``from_epoch`` on: re-send what we logged."""
        self.now_ms = now_ms
        if sender == self.me or from_epoch >= self.epoch:
            return []
        key = (sender, from_epoch)
        last = self._served.get(key)
        if last is not None and now_ms - last < self.config.pull_retry_ms // 2:
            return []
        self._served[key] = now_ms
        for k in [k for k, t in self._served.items() if now_ms - t > self.config.pull_retry_ms]:
            del self._served[k]
        msgs = tuple(m for e, _d, m in self._log if e >= from_epoch)[: self.config.max_pull_answer]
        if not msgs:
            return []
        self._n.pulls_served += 1
        return [Resend(sender, msgs)]

    def on_future(self, epoch: int, now_ms: int) -> list[Action]:
        """We hold a message of ``epoch`` (ahead of ours): its commits are missing."""
        self.now_ms = now_ms
        if epoch > self.epoch:
            self._future_epoch = max(self._future_epoch, epoch)
            if self._future_since is None:
                self._future_since = now_ms
        return []

    # -- timers -------------------------------------------------------------------------
    def next_deadline(self) -> int | None:
        """When :meth:`tick` has something to do next (None: only on new input)."""
        times: list[int] = []
        if self._commit.want and not self._commit.in_flight and not self.removed:
            times.append(self._commit.retry_at)
        if self._pending and not self._commit.in_flight and not self.removed:
            cs = self.committers
            if self.me in cs:
                rank = cs.index(self.me)
                first = min(self._pending.values())
                if rank == 0:
                    t = min(
                        self._last_proposal_ms + self.config.quiescence_ms,
                        first + self.config.max_commit_delay_ms,
                    )
                else:
                    t = first + self.config.committer_timeout_ms * rank
                times.append(max(t, self._commit.retry_at))
        if self._future_since is not None:
            times.append(max(self._future_since + self.config.pull_after_ms, self._next_pull_ms))
        if self._past:
            times.append(self._past[0].ended_ms + self.config.max_expiry_ms)
        return min(times) if times else None

    def tick(self, now_ms: int) -> list[Action]:
        """Timers: commit when it is our turn, pull missing commits, prune old epochs."""
        self.now_ms = now_ms
        out: list[Action] = []
        if self.removed:
            return out
        out.extend(self._maybe_commit(now_ms))
        out.extend(self._maybe_pull(now_ms))
        out.extend(self._maybe_prune(now_ms))
        return out

    def commit_now(self, now_ms: int) -> list[Action]:
        """The first committer commits what is pending without waiting for quiescence
        (a member asked to leave: it no longer reads the group)."""
        self.now_ms = now_ms
        if self.removed or self.committers[:1] != (self.me,) or not self._pending:
            return []
        if self._only_own_leave():
            return []
        return self._make_commit(None, now_ms, standin=False)

    def _maybe_commit(self, now_ms: int) -> list[Action]:
        if self._commit.want and not self._commit.in_flight and now_ms >= self._commit.retry_at:
            return self._make_commit(self._commit.want_committers, now_ms, standin=False)
        if not self._pending or self._commit.in_flight or now_ms < self._commit.retry_at:
            return []
        rank = self.committer_rank(now_ms)
        if rank is None:
            return []
        if rank == 0:
            first = min(self._pending.values())
            quiet = now_ms - self._last_proposal_ms >= self.config.quiescence_ms
            if not quiet and now_ms - first < self.config.max_commit_delay_ms:
                return []
            if self._only_own_leave():
                return []
            return self._make_commit(None, now_ms, standin=False)
        cs = self.committers
        rotated = cs[rank:] + cs[:rank]
        return self._make_commit(
            topped_up(rotated, self.members, self.config.max_committers), now_ms, standin=True
        )

    def _only_own_leave(self) -> bool:
        own = {i.proposal_ref for i in self._intents.values() if i.kind is IntentKind.LEAVE}
        return bool(own) and set(self._pending) <= own

    def _make_commit(
        self, committers: tuple[str, ...] | None, now_ms: int, *, standin: bool
    ) -> list[Action]:
        if self._commit.in_flight:
            return []
        self._commit.in_flight = True
        self._commit.standin = standin
        self._commit.want = True
        self._commit.want_committers = committers
        if committers is None:
            # Rewrite the stored list when it is short or names a member who left,
            # so the next committers are known before anyone goes silent.
            want = topped_up(self.stored_committers, self.members, self.config.max_committers)
            if want != tuple(self.stored_committers):
                committers = want
        return [Commit(committers)]

    def _maybe_pull(self, now_ms: int) -> list[Action]:
        if self._future_since is None:
            return []
        if now_ms - self._future_since < self.config.pull_after_ms or now_ms < self._next_pull_ms:
            return []
        candidates = [c for c in self.committers if c != self.me]
        candidates += [m for m in self.members if m != self.me and m not in candidates]
        if not candidates:
            return []
        to = candidates[self._pull_turn % len(candidates)]
        self._pull_turn += 1
        self._next_pull_ms = now_ms + self.config.pull_retry_ms
        self._n.pulls_sent += 1
        return [SendPull(to, self.epoch)]

    def _maybe_prune(self, now_ms: int) -> list[Action]:
        keep = [p for p in self._past if now_ms - p.ended_ms < self.config.max_expiry_ms]
        keep = keep[-self.config.max_past_epochs :] if self.config.max_past_epochs else []
        if len(keep) == len(self._past):
            return []
        self._past = keep
        return [Prune(len(keep))]

    def note_past_kept(self, epochs: int) -> None:
        """The Rust core keeps only this many past epochs (its own cap): forget the rest."""
        if epochs < len(self._past):
            self._past = self._past[len(self._past) - epochs :] if epochs else []
