"""The agent's driver of the group core (qpc_node/groups/core.py): MLS calls and sends.

One :class:`~qpc_node.groups.core.GroupCore` per group, built on first use from the
MLS group (epoch, roster, committer list) and our open requests in client.db. The
driver feeds it what the inbox processed (proposals, commits, intent notes, commit
pulls, messages held for a later epoch) and our merged commits, and runs the
actions it returns: proposals (with the joiner's KeyPackage fetched from the
directory), commits (through the outbox: merged once the node stored them, Welcomes
after that), notes, pulls, re-sent commits, past-epoch pruning. Timers run from
``Agent.receive`` (every poll of the REPL and of ``qpc``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import msgspec
from google.protobuf.message import DecodeError

from qpc_node import crypto
from qpc_node.client.agent_types import AgentContext, AgentError, AgentPart
from qpc_node.client.branches import Branches
from qpc_node.client.outbox import Outbox
from qpc_node.client.state import Conversation
from qpc_node.groups.core import (
    Action,
    Commit,
    CommitInfo,
    Done,
    GroupConfig,
    GroupCore,
    GroupStatistics,
    Intent,
    IntentError,
    IntentKind,
    IntentNote,
    Propose,
    Prune,
    Resend,
    SendIntent,
    SendPull,
    Warn,
)
from qpc_node.ops.log import get_logger
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import client_pb2

log = get_logger("qpc.client")

_KIND_TO_PB = {
    IntentKind.ADD: client_pb2.GroupIntent.ADD,
    IntentKind.REMOVE: client_pb2.GroupIntent.REMOVE,
    IntentKind.UPDATE: client_pb2.GroupIntent.UPDATE,
    IntentKind.LEAVE: client_pb2.GroupIntent.LEAVE,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}
MAX_ACTION_ROUNDS = 16
"""Action chains (a proposal's note, a hand-over's leave) one call runs at most."""
BRANCH_PRUNE_EVERY_MS = 3_600_000
"""How often shown texts' ids and our old texts are pruned from client.db."""


def note_to_pb(note: IntentNote) -> client_pb2.GroupIntent:
    return client_pb2.GroupIntent(
        intent_id=note.intent_id,
        kind=_KIND_TO_PB[note.kind],
        target=bytes.fromhex(note.target) if note.target else b"",
        proposal_ref=note.proposal_ref,
        epoch=note.epoch,
    )


def note_from_pb(pb: client_pb2.GroupIntent) -> IntentNote | None:
    """The note, or None when it is malformed (unknown kind, bad id or target)."""
    kind = _PB_TO_KIND.get(pb.kind)
    target = bytes(pb.target)
    if kind is None or len(pb.intent_id) != 16 or len(target) not in (0, 32):
        return None
    return IntentNote(bytes(pb.intent_id), kind, target.hex(), bytes(pb.proposal_ref), pb.epoch)


class GroupView(msgspec.Struct, frozen=True):
    """What ``/group info`` shows."""

    name: str
    epoch: int
    members: int
    committers: tuple[str, ...]
    mine: tuple[Intent, ...]
    others: tuple[tuple[str, IntentNote], ...]
    statistics: GroupStatistics
    past_epochs: tuple[int, ...]
    authenticator: bytes = b""
    """The epoch authenticator: members on the same branch and epoch share it."""


FetchKeyPackage = Callable[[bytes], Awaitable[bytes]]


class GroupDriver(AgentPart):
    def __init__(
        self,
        ctx: AgentContext,
        outbox: Outbox,
        fetch_key_package: FetchKeyPackage,
        config: GroupConfig,
        branches: Branches | None = None,
    ) -> None:
        super().__init__(ctx)
        self._outbox = outbox
        self._branches = branches
        self._fetch_kp = fetch_key_package
        self.config = config
        self._cores: dict[bytes, GroupCore] = {}
        self._merged: list[tuple[bytes, crypto.Event | None]] = []
        self._unwelcomed: list[tuple[bytes, str]] = []
        """(group, member) whose Welcome the node refused for good."""
        self._unreachable: set[str] = set()
        """Such members: they get no copy of the proposal and commit that remove them."""
        self._kps: dict[bytes, bytes] = {}
        """KeyPackages fetched for our add requests (intent id -> package)."""
        self._resends_due = True
        """client.db may hold resends of a switch a restart interrupted (or that waited
        for our commit to merge): sent from ``timers``."""
        self._next_prune = 0
        self._restart_checked = False
        self._owed_due: set[bytes] = set()
        """Groups whose owed texts waited for our commit to merge: sent from ``timers``."""

    # -- the cores -------------------------------------------------------------------
    async def core(self, conv: Conversation, g: crypto.Group) -> GroupCore:
        core = self._cores.get(conv.group_id)
        if core is not None and not core.removed:
            return core

        def snapshot() -> tuple[int, list[str], list[str]]:
            return g.epoch, g.members(), g.committers()

        epoch, members, committers = await self._mls(snapshot)
        core = GroupCore(
            me=self._ident.fingerprint,
            epoch=epoch,
            members=tuple(members),
            stored_committers=tuple(committers),
            now_ms=self._wall_ms(),
            config=self.config,
        )
        self._cores[conv.group_id] = core
        actions: list[Action] = []
        for iid, kind, target, created in await self._state.call(
            self._st.intents_of, conv.group_id
        ):
            intent = Intent(iid, IntentKind(kind), target, core.me, created)
            actions += core.restore(intent, self._wall_ms())
        await self.run(conv, g, actions)
        return core

    def forget(self, group_id: bytes) -> None:
        self._cores.pop(group_id, None)

    async def request(
        self, conv: Conversation, g: crypto.Group, kind: IntentKind, target: str = ""
    ) -> bytes:
        """Our membership request: tracked (client.db) until a commit applies it."""
        core = await self.core(conv, g)
        now = self._wall_ms()
        try:
            iid, actions = core.request(kind, target, now)
        except IntentError as exc:
            raise AgentError(f"{conv.name!r}: {exc}") from None
        await self._state.call(self._st.intent_add, iid, conv.group_id, kind.value, target, now)
        await self.run(conv, g, actions)
        return iid

    async def commit_now(self, conv: Conversation, g: crypto.Group) -> None:
        core = await self.core(conv, g)
        await self.run(conv, g, core.commit_now(self._wall_ms()))

    async def view(self, conv: Conversation, g: crypto.Group) -> GroupView:
        core = await self.core(conv, g)
        past = await self._mls(g.past_epochs)
        auth = await self._mls(g.epoch_authenticator) if await self._mls(_active, g) else b""
        return GroupView(
            conv.name,
            core.epoch,
            len(core.members),
            core.committers,
            tuple(core.intents()),
            tuple(core.others_intents()),
            core.statistics(self._wall_ms()),
            tuple(past),
            auth,
        )

    # -- inputs from the inbox and the outbox ------------------------------------------
    async def on_event(
        self, conv: Conversation, g: crypto.Group, ev: crypto.Event, message: bytes
    ) -> None:
        """A proposal or commit the inbox processed."""
        if await self._after_switch(conv, g):
            return  # the core was rebuilt on the winning branch, this commit included
        core = await self.core(conv, g)
        now = self._wall_ms()
        if ev.kind == "proposal":
            await self.run(conv, g, core.on_proposal(ev.sender, ev.proposal_ref, ev.epoch, now))
            return
        if ev.kind != "commit":
            return
        info = await self._commit_info(g, ev, ev.sender, message)
        await self.run(conv, g, core.on_commit(info, now))
        if core.removed:
            self.forget(conv.group_id)
            return
        await self._send_owed(conv, g, info.added)

    async def on_app(
        self, conv: Conversation, g: crypto.Group, sender: str, app: client_pb2.AppMessage
    ) -> None:
        """A GroupIntent note or a CommitPull (decrypted by MLS: ``sender`` is real)."""
        core = await self.core(conv, g)
        now = self._wall_ms()
        which = app.WhichOneof("body")
        if which == "intent":
            note = note_from_pb(app.intent)
            if note is not None:
                await self.run(conv, g, core.on_intent(sender, note, now))
        elif which == "pull":
            await self.run(conv, g, core.on_pull(sender, app.pull.from_epoch, now))
        elif which == "catch_up":
            await self._catch_up(conv, g, sender, bytes(app.catch_up.since))

    async def _catch_up(
        self, conv: Conversation, g: crypto.Group, sender: str, since: bytes
    ) -> None:
        """``sender`` rejoined our branch by external commit after a fork at ``since``:
        our texts it could not read go to it alone, with their app ids (it shows each
        once; docs/groups.md "Catch-up after a rejoin")."""
        if self._branches is None or sender == self._ident.fingerprint:
            return
        ids = await self._mls(self._branches.catch_up, conv.group_id, sender, since)
        if not ids:
            return
        to = bytes.fromhex(sender)
        envs: list[Envelope] = []
        for body in await self._state.call(self._st.branch_text_bodies, conv.group_id, ids):
            try:
                ct, tag = await self._mls(self._outbox.encrypt, g, body)
            except crypto.PendingCommit:
                break  # our commit is on its way: what went out so far is sent
            envs += self._outbox.to_each([to], conv.group_id, ct, branch=tag)
        if envs:
            await self._outbox.submit(envs)

    async def _after_switch(self, conv: Conversation, g: crypto.Group) -> bool:
        """The inbox switched ``conv`` to another branch (Stage B): the core followed
        the losing one, so it is rebuilt from the winning MLS state (our open requests
        are re-proposed from client.db), and we remove again whoever
        our losing commit removed (removals stay removed) and add again whoever it
        added (an add only the losing branch applied). True when it did."""
        if self._branches is None:
            return False
        plans = self._branches.take_switches(conv.group_id)
        if not plans:
            return False
        self.forget(conv.group_id)
        self._warn(
            f"{conv.name!r}: the other side of a partition changed the group too;"
            " switched to the branch every member keeps",
            "group branch switched",
        )
        core = await self.core(conv, g)
        if core.removed:
            return True
        await self.send_resends(conv.group_id)
        await self._again(conv, g, core)
        return True

    async def _again(self, conv: Conversation, g: crypto.Group, core: GroupCore) -> None:
        """Ask again for the removals and adds of ours that only a losing branch applied
        (the record keeps them until the request is in client.db)."""
        assert self._branches is not None
        gid = conv.group_id
        for target in self._branches.remove_again(gid, list(core.members)):
            await self._request_again(conv, g, core, IntentKind.REMOVE, target)
        for target in self._branches.add_again(gid, list(core.members)):
            await self._request_again(conv, g, core, IntentKind.ADD, target)

    async def _after_restart(self) -> None:
        """A restart between a switch or a rejoin and its follow-ups (client.db says
        which): our removals and adds of the losing branch are requested again, and
        texts owed to a member that is back (its commit was processed before the
        restart) are sent."""
        if self._branches is None:
            return
        for gid in await self._mls(self._ident.groups):
            conv, g = await self._open(bytes(gid))
            if conv is None or g is None or not await self._mls(_active, g):
                continue
            members = await self._mls(g.members)
            gid = conv.group_id
            if self._branches.remove_again(gid, members) or self._branches.add_again(gid, members):
                await self._again(conv, g, await self.core(conv, g))
            await self._send_owed(conv, g, members)

    async def _request_again(
        self, conv: Conversation, g: crypto.Group, core: GroupCore, kind: IntentKind, target: str
    ) -> None:
        """Re-issue a change that only a losing branch applied, as our own request
        (tracked in client.db like any other, so it survives a restart)."""
        assert self._branches is not None
        now = self._wall_ms()
        try:
            iid, actions = core.request(kind, target, now)
        except IntentError:
            actions = []  # already requested (or no longer possible)
        else:
            await self._state.call(self._st.intent_add, iid, conv.group_id, kind.value, target, now)
        await self._mls(self._branches.requested_again, conv.group_id, target)
        await self.run(conv, g, actions)

    async def _send_owed(self, conv: Conversation, g: crypto.Group, added: Sequence[str]) -> None:
        """A member added only on a losing branch is in again: our texts it was owed there
        (re-sent on the winner before it was back) go to it alone, with their app id,
        queued in the transaction that forgets the debt (client.db ``branch_owed``)."""
        if self._branches is None or not added:
            return
        owed = await self._state.call(
            self._st.branch_owed, conv.group_id, [bytes.fromhex(m) for m in added]
        )
        for member in dict.fromkeys(o.member for o in owed):
            texts = [o for o in owed if o.member == member]
            envs: list[Envelope] = []
            for o in texts:
                try:
                    client_pb2.AppMessage.FromString(o.body)
                except DecodeError:
                    continue  # not an AppMessage (a bad row): the debt is dropped
                try:
                    ct, tag = await self._mls(self._outbox.encrypt, g, o.body)
                except crypto.PendingCommit:
                    self._owed_due.add(conv.group_id)  # after our commit merged
                    return
                envs += self._outbox.to_each([member], conv.group_id, ct, branch=tag)
            await self._state.call(
                self._st.owed_queued,
                conv.group_id,
                member,
                [o.app_id for o in texts],
                [(e.msg_id, e.encode()) for e in envs],
                self._wall_ms(),
            )
        if owed:
            await self._outbox.flush_outbox()

    def on_future(self, group_id: bytes, epoch: int) -> None:
        """The inbox holds a message of ``epoch``, ahead of ours."""
        core = self._cores.get(group_id)
        if core is not None:
            core.on_future(epoch, self._wall_ms())

    def welcome_lost(self, group_id: bytes, recipient: bytes) -> None:
        """The outbox dropped a Welcome (called under its lock: ``timers`` acts)."""
        self._unwelcomed.append((group_id, recipient.hex()))

    async def _remove_unwelcomed(self) -> None:
        """A member whose Welcome can never arrive holds a leaf nobody uses (and its
        key updates never come): remove it again, and tell the user."""
        todo, self._unwelcomed = self._unwelcomed, []
        self._unreachable |= {m for _g, m in todo}
        for gid, member in todo:
            conv, g = await self._open(gid)
            if conv is None or g is None or member not in await self._mls(g.members):
                continue
            self._warn(
                f"{member[:8]} could not be welcomed into {conv.name!r}: removed again",
                "welcome lost",
            )
            core = await self.core(conv, g)
            try:
                iid, actions = core.request(IntentKind.REMOVE, member, self._wall_ms())
            except IntentError:
                continue  # already being removed
            await self._state.call(
                self._st.intent_add, iid, gid, IntentKind.REMOVE.value, member, self._wall_ms()
            )
            await self.run(conv, g, actions)
            await self.run(conv, g, core.commit_now(self._wall_ms()))

    async def merged(self, group_id: bytes, ev: crypto.Event | None) -> None:
        """The outbox merged our commit. Called under the outbox's lock: nothing is
        sent from here; ``timers`` (right after) feeds it to the core."""
        self._merged.append((group_id, ev))

    async def _commit_info(
        self, g: crypto.Group, ev: crypto.Event | None, sender: str, message: bytes
    ) -> CommitInfo:
        def read() -> tuple[int, list[str], list[str], bytes, bool]:
            return g.epoch, g.members(), g.committers(), g.epoch_authenticator(), g.is_active

        epoch, members, committers, auth, active = await self._mls(read)
        if ev is None:
            return CommitInfo(
                epoch - 1, sender, (), (), (), tuple(committers), tuple(members), auth, message
            )
        return CommitInfo(
            parent_epoch=ev.epoch - 1,
            sender=sender,
            covered=tuple(ev.covered),
            added=tuple(ev.added),
            removed=tuple(ev.removed_members),
            committers=tuple(committers) if active else (),
            members=tuple(members) if active else (),
            authenticator=ev.authenticator or auth,
            message=message,
            removed_us=ev.removed,
        )

    # -- timers --------------------------------------------------------------------------
    async def send_resends(self, only: bytes | None = None) -> None:
        """Our texts of a losing branch, encrypted again on the winner (same app id) and
        queued, each in one client.db transaction with the forgetting of its pending
        row: a crash leaves it pending (the first ciphertext never left) or queued."""
        sent = False
        for r in await self._state.call(self._st.branch_resends):
            if only is not None and r.group_id != only:
                continue
            conv, g = await self._open(r.group_id)
            owed: list[bytes] = []
            try:
                if conv is None or g is None or not await self._mls(_active, g):
                    envs = []  # the group is gone for us: nobody to send it to
                else:
                    body = client_pb2.AppMessage.FromString(r.body)
                    envs = await self._outbox.app_envelopes(conv, g, body)
                    if self._branches is not None:
                        # Who got it on the losing branch and is not on the winner (added
                        # only there) gets it alone once a commit adds it back.
                        members = await self._mls(g.members)
                        owed = self._branches.owed(r.recipients, members)
            except crypto.PendingCommit:
                self._resends_due = True  # after our commit merged
                continue
            except DecodeError:
                envs = []  # not an AppMessage (a bad row): dropped
            await self._state.call(
                self._st.resend_queued,
                r.group_id,
                r.app_id,
                [(e.msg_id, e.encode()) for e in envs],
                self._wall_ms(),
                owed=owed if envs else [],
            )
            sent = sent or bool(envs)
        if sent:
            await self._outbox.flush_outbox()

    async def timers(self) -> None:
        """Feed our merged commits to their cores, then run what is due."""
        await self._drain_merged()
        if self._unwelcomed:
            await self._remove_unwelcomed()
        now = self._wall_ms()
        if not self._restart_checked:
            self._restart_checked = True
            await self._after_restart()
        if self._resends_due:
            self._resends_due = False
            await self.send_resends()
        for gid in list(self._owed_due):
            self._owed_due.discard(gid)
            conv, g = await self._open(gid)
            if conv is not None and g is not None and await self._mls(_active, g):
                await self._send_owed(conv, g, await self._mls(g.members))
        if now >= self._next_prune:
            self._next_prune = now + BRANCH_PRUNE_EVERY_MS
            await self._state.call(self._st.prune_branch_state, now, self.config.max_expiry_ms)
        for gid, core in list(self._cores.items()):
            if core.commit_in_flight and await self._commit_gone(gid):
                await self._run_gid(gid, core.commit_failed(now))  # the outbox cancelled it
            due = core.next_deadline()
            if due is None or due > now or core.removed:
                continue
            await self._run_gid(gid, core.tick(now))
        await self._offer_branches(now)

    # -- beyond the rollback window (docs/groups.md, "Rejoin by external commit") --------
    async def _offer_branches(self, now: int) -> None:
        """We hold messages of a branch we do not know: perhaps the other side of a
        partition longer than the rollback window. The first committer of our branch
        offers it to every member of the epochs we keep; a member whose branch loses at
        the fork rejoins ours by external commit (``on_offer``)."""
        if self._branches is None:
            return
        for gid in self._branches.offers_due(now):
            conv, g = await self._open(gid)
            if conv is None or g is None:
                continue
            # The core may not exist yet: after a restart, messages of an unknown branch
            # are all a group may have seen (held, never given to its core).
            core = await self.core(conv, g)
            if core.removed or core.committers[:1] != (self._ident.fingerprint,):
                continue
            got = await self._mls(self._branches.offer, gid, g, now)
            if got is None:
                continue
            data, who = got
            kind = client_pb2.Sealed.REJOIN_OFFER
            await self._outbox.submit(
                [self._outbox.envelope(bytes.fromhex(m), kind, gid, data) for m in who]
            )

    async def on_offer(self, group_id: bytes, data: bytes) -> None:
        """Another branch's BranchOffer (InvalidOffer propagates: the inbox counts it)."""
        if self._branches is None:
            return
        conv, g = await self._open(group_id)
        if conv is None or g is None:
            return

        def commit_rows(to: list[bytes], commit: bytes, branch: bytes) -> list[tuple[bytes, bytes]]:
            envs = self._outbox.to_each(to, group_id, commit, branch=branch)
            return [(e.msg_id, e.encode()) for e in envs]

        # The external commit is queued in the transaction that records the rejoin.
        done = await self._mls(
            self._branches.on_offer, group_id, g, data, self._wall_ms(), commit_rows
        )
        if done is None:
            return
        await self._outbox.flush_outbox()
        await self._after_switch(conv, g)
        # The winner's texts since the fork were in epochs we were not in: ask for them.
        conv, g = await self._open(group_id)
        if conv is not None and g is not None and await self._mls(_active, g):
            ask = client_pb2.AppMessage(catch_up=client_pb2.CatchUp(since=done.fork))
            await self._send_app(conv, g, ask, None)

    async def _commit_gone(self, gid: bytes) -> bool:
        pending = {r.group_id for r in await self._state.call(self._st.pending_commits)}
        return gid not in pending

    async def _run_gid(self, gid: bytes, actions: list[Action]) -> None:
        conv, g = await self._open(gid)
        if conv is None or g is None:
            self.forget(gid)
            return
        await self.run(conv, g, actions)

    async def _drain_merged(self) -> None:
        todo, self._merged = self._merged, []
        for gid, ev in todo:
            conv, g = await self._open(gid)
            if conv is None or g is None:
                continue
            core = await self.core(conv, g)
            own = b"" if self._branches is None else self._branches.take_merged_own(gid)
            info = await self._commit_info(g, ev, self._ident.fingerprint, own)
            await self.run(conv, g, core.on_commit(info, self._wall_ms()))
            await self._send_owed(conv, g, info.added)

    async def _open(self, gid: bytes) -> tuple[Conversation | None, crypto.Group | None]:
        conv = await self._state.call(self._st.conversation_by_group, gid)
        if conv is None:
            return None, None
        try:
            return conv, await self._mls(self._ident.group, gid)
        except crypto.MlsError:
            return conv, None

    # -- actions -------------------------------------------------------------------------
    async def run(self, conv: Conversation, g: crypto.Group, actions: Sequence[Action]) -> None:
        queue = list(actions)
        for _ in range(MAX_ACTION_ROUNDS):
            if not queue:
                return
            more: list[Action] = []
            for a in queue:
                more += await self._one(conv, g, a)
            queue = more
        if queue:
            log.warning("group actions left over", extra={"n": len(queue)})

    async def _one(self, conv: Conversation, g: crypto.Group, a: Action) -> list[Action]:
        core = self._cores[conv.group_id]
        now = self._wall_ms()
        if isinstance(a, Propose):
            return await self._propose(conv, g, core, a)
        if isinstance(a, Commit):
            return await self._commit(conv, g, core, a)
        if isinstance(a, SendIntent):
            body = client_pb2.AppMessage(intent=note_to_pb(a.note), sent_ms=now)
            await self._send_app(conv, g, body, None)
        elif isinstance(a, SendPull):
            body = client_pb2.AppMessage(pull=client_pb2.CommitPull(from_epoch=a.from_epoch))
            await self._send_app(conv, g, body, bytes.fromhex(a.to))
        elif isinstance(a, Resend):
            to = bytes.fromhex(a.to)
            envs = [self._outbox.to_each([to], conv.group_id, m)[0] for m in a.messages]
            await self._outbox.submit(envs)
        elif isinstance(a, Prune):
            await self._mls(g.prune_past_epochs, a.keep)
        elif isinstance(a, Warn):
            self._warn(f"{conv.name!r}: {a.text}", "group request")
        elif isinstance(a, Done):
            self._kps.pop(a.intent_id, None)
            await self._state.call(self._st.intent_done, a.intent_id)
        return []

    async def _send_app(
        self, conv: Conversation, g: crypto.Group, body: client_pb2.AppMessage, to: bytes | None
    ) -> None:
        try:
            if to is None:
                envs = await self._outbox.app_envelopes(conv, g, body)
            else:
                ct, tag = await self._mls(self._outbox.encrypt, g, body.SerializeToString())
                envs = self._outbox.to_each([to], conv.group_id, ct, branch=tag)
        except crypto.PendingCommit:
            return  # our commit is on its way: the core asks again if still needed
        if envs:
            await self._outbox.submit(envs)

    async def _propose(
        self, conv: Conversation, g: crypto.Group, core: GroupCore, a: Propose
    ) -> list[Action]:
        now = self._wall_ms()
        try:
            if a.kind is IntentKind.ADD:
                kp = self._kps.get(a.intent_id)
                if kp is None:
                    kp = await self._fetch_kp(bytes.fromhex(a.target))
                    self._kps[a.intent_id] = kp
                msg, ref = await self._mls(g.propose_add, kp)
            elif a.kind is IntentKind.REMOVE:
                msg, ref = await self._mls(g.propose_remove, a.target)
            elif a.kind is IntentKind.UPDATE:
                msg, ref = await self._mls(g.propose_update)
            else:
                msg, ref = await self._mls(g.propose_leave)
        except crypto.PendingCommit:
            return []  # re-proposed after our commit merged (a new epoch)
        except (crypto.MlsError, AgentError) as exc:
            return core.propose_failed(a.intent_id, str(exc), now)
        others = [m for m in await self._outbox.others(g) if m.hex() not in self._unreachable]
        tag = await self._tag(g)
        await self._outbox.submit(self._outbox.to_each(others, conv.group_id, msg, branch=tag))
        return core.proposed(a.intent_id, ref, now)

    async def _tag(self, g: crypto.Group) -> bytes:
        return b"" if self._branches is None else await self._mls(self._branches.tag, g)

    async def _commit(
        self, conv: Conversation, g: crypto.Group, core: GroupCore, a: Commit
    ) -> list[Action]:
        before = [m for m in await self._outbox.others(g) if m.hex() not in self._unreachable]
        try:
            commit, welcome = await self._mls(
                g.commit_pending, None if a.committers is None else list(a.committers)
            )
        except crypto.MlsError as exc:
            log.warning("commit failed", extra={"err": type(exc).__name__})
            await self._mls(g.clear_proposals)
            return core.commit_failed(self._wall_ms())
        followup = None
        if welcome is not None:
            followup = client_pb2.AppMessage(
                info=client_pb2.GroupInfo(
                    name=conv.name if not conv.direct else "", direct=conv.direct, committer=self.me
                )
            )
        tag = b""
        if self._branches is not None:
            tag = await self._mls(
                self._branches.own_commit, conv.group_id, g, commit, self._wall_ms()
            )
        envs = self._outbox.to_each(before, conv.group_id, commit, branch=tag)
        try:
            await self._outbox.send_commit(
                conv, envs, followup, welcome=welcome, roster=[*before, self.me]
            )
        except AgentError:
            return core.commit_failed(self._wall_ms())
        await self._drain_merged()  # merged now (delivered): the core moves on
        return []

    @property
    def me(self) -> bytes:
        return bytes.fromhex(self._ident.fingerprint)


def _active(g: crypto.Group) -> bool:
    return g.is_active
