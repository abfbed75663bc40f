"""The send path: the durable outbox, per-message fates, and commits merged on delivery.

Envelopes go into the outbox in client.db first and are then sent with one
batch Enqueue (idempotent on msg_id, so a retry after a lost reply never
duplicates). The node answers one result per envelope, so each message has its
own fate (:class:`Sent`): stored; refused for now and retried with exponential
backoff and full jitter; or refused for good and dropped with a warning. A
failure of the whole call keeps every message queued.

A commit becomes our group state only once the node stored its whole fan-out
(the commit to every member: one all-or-nothing Enqueue).
Until then MLS keeps it pending and client.db records which outbox messages
carry it; a permanent refusal clears it (the group stays on the epoch every
other member has: no fork), a retriable one keeps it queued, across restarts,
and it is merged when the node finally takes it. What belongs to the new epoch is
sent only after the merge: the Welcome of an invite (to the members the merge
says were added: a joiner must never hold a group whose commit could still be
cleared) and the GroupInfo that follows it (encrypted in the new epoch).
"""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Awaitable, Callable

import msgspec
import trio
from google.protobuf.message import DecodeError

from qpc_node import crypto
from qpc_node.client.agent_types import AgentContext, AgentError, AgentPart
from qpc_node.client.fingerprint import short_code
from qpc_node.client.state import Conversation, Outgoing
from qpc_node.errors import RemoteProtocolError, StatusCode
from qpc_node.groups.fork import branch_tag
from qpc_node.ops.log import get_logger
from qpc_node.rpc.errors import RpcError
from qpc_node.wire.envelope import DEFAULT_HOP_LIMIT, Envelope, pad, unpad
from qpc_node.wire.gen.qpc.v1 import client_pb2, service_pb2

log = get_logger("qpc.client")

RETENTION_MS = 7 * 24 * 3600 * 1000
OUTBOX_BACKOFF_MS = (500, 60_000)
FLUSH_ROUNDS = 16
"""Enqueue calls one flush makes at most (64 messages each)."""
RECENT_FATES = 4096
"""Fates remembered across flushes, for a submit another flush served first."""

# Whole-call refusals that say something in the batch is bad (an older node answers
# one bad envelope this way): each message is then sent alone to find it. Any other
# whole-call failure (transport, session, node busy) retries every message.
_CALL_REFUSES_CONTENT = frozenset(
    {
        StatusCode.INVALID_ARGUMENT,
        StatusCode.NOT_FOUND,
        StatusCode.PAYLOAD_TOO_LARGE,
        StatusCode.FAILED_PRECONDITION,
        StatusCode.ALREADY_EXISTS,
    }
)


class Sent(enum.Enum):
    """What became of one outbox message in a flush."""

    DELIVERED = "delivered"  # the node stored it (or already held it)
    RETRY = "retry"  # still queued, with backoff
    DROPPED = "dropped"  # refused for good (or expired): the user was warned


class Route(msgspec.Struct, frozen=True):
    """What the node said about one message it took or could not take yet."""

    hops: int
    """Node-to-node hops to the recipient's home (0: stored on our node, or unknown)."""
    detail: str
    """Why it is still queued (the node's words), "" when delivered."""
    stored_here: bool = False
    """Our node put it in a mailbox of its own (it answered a mailbox seq)."""
    held: bool = False
    """No route to the recipient's home yet: our node holds it until one appears."""


Merged = Callable[[bytes, crypto.Event | None], Awaitable[None]]
"""``merged(group_id, event)`` after our commit merged (event None: it was merged
before a crash, the details are gone)."""


WelcomeLost = Callable[[bytes, bytes], None]
"""``welcome_lost(group_id, recipient)``: the node refused a Welcome for good (the
commit that added them is merged: they are in the group but cannot read it)."""


async def _nothing(_gid: bytes, _ev: crypto.Event | None) -> None:
    return None


Merge = Callable[[bytes, crypto.Group, int], crypto.Event]
"""``merge(group id, group, now)`` merges the group's pending commit (in the MLS worker)."""


SentText = Callable[[bytes, crypto.Group, bytes, bytes, bytes], None]
"""``sent_text(group id, group, branch tag, app id, AppMessage bytes)`` (MLS worker)."""


def _merge_pending(_gid: bytes, g: crypto.Group, _now: int) -> crypto.Event:
    return g.merge_pending_commit()


class Outbox(AgentPart):
    """One identity's outgoing messages: built, queued durably, sent, settled."""

    def __init__(
        self,
        ctx: AgentContext,
        *,
        rng: random.Random,
        merged: Merged = _nothing,
        welcome_lost: WelcomeLost = lambda _g, _r: None,
        merge: Merge = _merge_pending,
        sent_text: SentText = lambda _gid, _g, _tag, _id, _body: None,
    ) -> None:
        super().__init__(ctx)
        self._merge = merge
        self._sent_text = sent_text
        """Told every text we send to a group (Stage B: resent if its branch loses)."""
        """Merges our pending commit (Stage B: ``Branches.merge_own`` snapshots first)."""
        self._rng = rng
        self._merged = merged
        self._welcome_lost = welcome_lost
        self.routes: dict[bytes, Route] = {}
        """What the node answered for the messages of the last ``submit`` (for /mesh dm)."""
        self._lock = trio.Lock()
        self._recent: dict[bytes, Sent] = {}
        """Fates of the latest flushes (at most RECENT_FATES): a ``submit`` whose messages
        another flush sent first (it queued them, then waited for the lock) reads theirs
        here instead of finding nothing due."""
        self._orphans_checked = False
        self._commit_refusals: dict[bytes, str] = {}

    # -- building ----------------------------------------------------------------
    def envelope(
        self,
        recipient: bytes,
        kind: client_pb2.Sealed.Kind,
        gid: bytes,
        data: bytes,
        *,
        describes: bool = False,
        branch: bytes = b"",
    ) -> Envelope:
        sealed = client_pb2.Sealed(
            kind=kind, group_id=gid, data=data, describes=describes, branch=branch
        ).SerializeToString()
        return Envelope(
            msg_id=os.urandom(16),
            recipient=recipient,
            expiry_ms=self._wall_ms() + RETENTION_MS,
            hop_limit=DEFAULT_HOP_LIMIT,
            ciphertext=pad(sealed),
        )

    def to_each(
        self,
        recipients: list[bytes],
        gid: bytes,
        mls_message: bytes,
        *,
        describes: bool = False,
        branch: bytes = b"",
    ) -> list[Envelope]:
        """``branch``: the branch tag of the epoch ``mls_message`` was made in (Stage B)."""
        return [
            self.envelope(
                m,
                client_pb2.Sealed.MLS_MESSAGE,
                gid,
                mls_message,
                describes=describes,
                branch=branch,
            )
            for m in recipients
        ]

    async def others(self, g: crypto.Group) -> list[bytes]:
        """Every member but us: who gets a copy of what we send to the group."""
        members = await self._mls(g.members)
        return [bytes.fromhex(m) for m in members if m != self._ident.fingerprint]

    async def app_envelopes(
        self,
        conv: Conversation,
        g: crypto.Group,
        msg: client_pb2.AppMessage,
        *,
        describes: bool = False,
    ) -> list[Envelope]:
        others = await self.others(g)
        if msg.WhichOneof("body") == "text" and not msg.app_id:
            msg.app_id = os.urandom(16)
        body = msg.SerializeToString()
        ct, tag = await self._mls(self._encrypt_text, conv.group_id, g, body, bytes(msg.app_id))
        return self.to_each(others, conv.group_id, ct, describes=describes, branch=tag)

    def _encrypt_text(
        self, gid: bytes, g: crypto.Group, body: bytes, app_id: bytes
    ) -> tuple[bytes, bytes]:
        """Encrypt and note a text (``sent_text``) in one MLS call: no branch switch
        slips in between, so the text is kept under the epoch it was encrypted in (and
        re-sent if that epoch's branch loses)."""
        ct, tag = self.encrypt(g, body)
        if app_id:
            self._sent_text(gid, g, tag, app_id, body)
        return ct, tag

    def encrypt(self, g: crypto.Group, plaintext: bytes) -> tuple[bytes, bytes]:
        """(ciphertext, branch tag of the epoch it was encrypted in): one MLS call, so
        no commit slips in between."""
        ct = g.encrypt(plaintext)
        return ct, branch_tag(g)

    # -- queueing ----------------------------------------------------------------
    async def submit(self, envs: list[Envelope]) -> dict[bytes, Sent]:
        """Queue ``envs`` durably, then flush: what became of each of them."""
        batch = [(e.msg_id, e.encode()) for e in envs]
        await self._state.call(self._st.outbox_add_many, batch, self._wall_ms())
        self.routes.clear()
        return await self._flush({e.msg_id for e in envs})

    async def send_commit(
        self,
        conv: Conversation,
        envs: list[Envelope],
        followup: client_pb2.AppMessage | None,
        *,
        welcome: bytes | None = None,
        roster: list[bytes] | None = None,
    ) -> bool:
        """Send a commit's fan-out all-or-nothing; merge it only once the node stored it,
        then send ``welcome`` to the members it added (``roster``: the members before).

        True when merged now; False when queued for a retry (warned). Raises
        AgentError when the node refused it for good (the commit was cleared: the
        group is as before for everyone).
        """
        commit_id = os.urandom(16)
        await self._state.call(
            self._st.commit_begin,
            commit_id,
            conv.group_id,
            None if followup is None else followup.SerializeToString(),
            [(e.msg_id, e.encode()) for e in envs],
            self._wall_ms(),
            welcome=welcome,
            roster=tuple(roster or ()),
        )
        fates = await self._flush({e.msg_id for e in envs})
        got = {fates.get(e.msg_id) for e in envs}
        if got <= {Sent.DELIVERED}:  # empty: nobody else in the group yet (merged by now)
            return True
        if Sent.DROPPED in got:
            why = self._commit_refusals.pop(commit_id, "refused by the node")
            raise AgentError(f"the change to {conv.name!r} was not made: {why}")
        self._warn(
            f"the change to {conv.name!r} is queued: the node could not take it yet;"
            " it applies once delivered",
            "commit queued",
        )
        return False

    async def flush_outbox(self) -> int:
        """Send what the outbox holds that is due; return how many are still queued.

        Each message has its own fate (see ``_send``): delivered, retried with
        backoff and jitter, or dropped with a warning when the node refuses it for
        good. A failure of the whole call re-raises after scheduling the retries.
        """
        await self._flush(set())
        return await self._state.call(self._st.outbox_len)

    async def _flush(self, own: set[bytes]) -> dict[bytes, Sent]:
        """Flush due messages until every one of ``own`` has a fate (bounded rounds).

        A commit's messages go in their own all-or-nothing Enqueue; the rest share one.
        """
        fates: dict[bytes, Sent] = {}
        async with self._lock:
            own = own | await self._settle_commits()
            for _ in range(FLUSH_ROUNDS):
                due = await self._state.call(self._st.outbox_due, self._wall_ms())
                if not due:
                    break
                got: dict[bytes, Sent] = {}
                for commit_id in dict.fromkeys(o.commit for o in due if o.commit is not None):
                    sent, followups = await self._send_commit_fanout(commit_id)
                    got.update(sent)
                    own |= followups
                plain = [o for o in due if o.commit is None]
                if plain:
                    got.update(await self._send(plain))
                fates.update(got)
                self._recent.update(got)
                if own and own <= fates.keys():
                    break
                if not own and Sent.RETRY in got.values():
                    break  # what is left waits for its backoff
            for m in own - fates.keys():
                if m in self._recent:
                    fates[m] = self._recent[m]
            while len(self._recent) > RECENT_FATES:
                del self._recent[next(iter(self._recent))]
        return fates

    # -- commits -----------------------------------------------------------------
    async def _send_commit_fanout(self, commit_id: bytes) -> tuple[dict[bytes, Sent], set[bytes]]:
        """One atomic Enqueue of a commit's messages: its fates and the follow-ups queued."""
        msgs = await self._state.call(self._st.outbox_of_commit, commit_id)
        if not msgs:
            return {}, await self._settle_commit(commit_id)
        now = self._wall_ms()
        envs = [Envelope.decode(o.envelope) for o in msgs]
        dropped = dict.fromkeys((o.msg_id for o in msgs), Sent.DROPPED)
        if any(e.expiry_ms <= now for e in envs):
            await self._cancel_commit(commit_id, "it expired before the node took it")
            return dropped, set()
        try:
            results = await self._enqueue(envs, [o.msg_id for o in msgs], atomic=True)
        except RpcError as exc:
            if exc.code in _CALL_REFUSES_CONTENT:
                await self._cancel_commit(commit_id, exc.message)
                return dropped, set()
            await self._retry(msgs)
            raise
        except RemoteProtocolError:
            await self._retry(msgs)
            raise
        codes = [_status(r.status) for r in results]
        if all(c == StatusCode.OK for c in codes):
            await self._state.call(self._st.outbox_done, [o.msg_id for o in msgs])
            delivered = dict.fromkeys((o.msg_id for o in msgs), Sent.DELIVERED)
            return delivered, await self._settle_commit(commit_id)
        for env, r, c in zip(envs, results, codes, strict=True):
            if c not in (StatusCode.OK, StatusCode.ABORTED) and not c.retriable:
                why = f"{short_code(env.recipient.hex())}: {r.detail or c.name}"
                await self._cancel_commit(commit_id, why)
                return dropped, set()
        await self._retry(msgs)  # all-or-nothing: the node stored none of them
        return dict.fromkeys((o.msg_id for o in msgs), Sent.RETRY), set()

    async def _cancel_commit(self, commit_id: bytes, why: str) -> None:
        """The node refused a commit's fan-out for good: never send it, clear it in MLS."""
        rec = await self._state.call(self._st.pending_commit, commit_id)
        await self._state.call(self._st.commit_cancel, commit_id)  # before the MLS clear
        self._stats.send_dropped += 1
        self._commit_refusals[commit_id] = why
        await self._settle_commit(commit_id)
        conv = None
        if rec is not None:
            conv = await self._state.call(self._st.conversation_by_group, rec.group_id)
        where = "a group" if conv is None else repr(conv.name)
        self._warn(
            f"the change to {where} was not made ({why}); the group stays as it was",
            "commit refused",
        )

    async def _settle_commits(self) -> set[bytes]:
        """Finish what a restart interrupted: merge or clear commits whose fan-out was
        settled, and clear a pending MLS commit nothing in client.db knows of (made
        just before a crash, never queued). Returns the follow-ups queued."""
        followups: set[bytes] = set()
        records = await self._state.call(self._st.pending_commits)
        for rec in records:
            if rec.cancelled or rec.remaining == 0:
                followups |= await self._settle_commit(rec.commit_id)
        if not self._orphans_checked:
            self._orphans_checked = True
            known = {rec.group_id for rec in records}

            def clear_orphans() -> int:
                n = 0
                for gid in self._ident.groups():
                    g = self._ident.group(gid)
                    if bytes(gid) not in known and g.has_pending_commit():
                        g.clear_pending_commit()
                        n += 1
                return n

            if n := await self._mls(clear_orphans):
                log.warning("cleared unsent pending commits", extra={"groups": n})
        return followups

    async def _settle_commit(self, commit_id: bytes) -> set[bytes]:
        """Apply a commit whose fan-out the node stored, or clear a cancelled one."""
        rec = await self._state.call(self._st.pending_commit, commit_id)
        if rec is None or (rec.remaining and not rec.cancelled):
            return set()
        try:
            g = await self._mls(self._ident.group, rec.group_id)
        except crypto.UnknownGroup:
            await self._state.call(self._st.commit_finished, commit_id, [], self._wall_ms())
            return set()
        if rec.cancelled:
            await self._mls(g.clear_pending_commit)
            await self._state.call(self._st.commit_finished, commit_id, [], self._wall_ms())
            return set()
        ev: crypto.Event | None = None
        if await self._mls(g.has_pending_commit):  # else: merged before a crash
            ev = await self._mls(self._merge, rec.group_id, g, self._wall_ms())
        envs: list[Envelope] = []
        if rec.welcome is not None:
            if ev is not None:
                added = [bytes.fromhex(f) for f in ev.added]
            else:
                before = set(rec.roster)
                added = [m for m in await self.others(g) if m not in before]
            envs += [
                self.envelope(m, client_pb2.Sealed.WELCOME, rec.group_id, rec.welcome)
                for m in added
            ]
        conv = await self._state.call(self._st.conversation_by_group, rec.group_id)
        if rec.followup is not None and conv is not None:
            app = client_pb2.AppMessage.FromString(rec.followup)
            envs += await self.app_envelopes(conv, g, app, describes=True)
        await self._state.call(
            self._st.commit_finished,
            commit_id,
            [(e.msg_id, e.encode()) for e in envs],
            self._wall_ms(),
        )
        await self._merged(rec.group_id, ev)
        return {e.msg_id for e in envs}

    # -- plain messages ----------------------------------------------------------
    async def _send(self, due: list[Outgoing]) -> dict[bytes, Sent]:
        """One Enqueue of ``due``; settle each message on its own result."""
        now = self._wall_ms()
        envs = {o.msg_id: Envelope.decode(o.envelope) for o in due}
        fates: dict[bytes, Sent] = {}
        live: list[Outgoing] = []
        for o in due:
            if envs[o.msg_id].expiry_ms <= now:
                await self._drop(o, envs[o.msg_id], "it expired before the node took it")
                fates[o.msg_id] = Sent.DROPPED
            else:
                live.append(o)
        if not live:
            return fates
        try:
            results = await self._enqueue(
                [envs[o.msg_id] for o in live], [o.msg_id for o in live], atomic=False
            )
        except RpcError as exc:
            if exc.code in _CALL_REFUSES_CONTENT:
                if len(live) > 1:
                    # An older node refuses a whole batch for one bad envelope: send
                    # each alone so the others still go out.
                    for o in live:
                        fates.update(await self._send([o]))
                    return fates
                await self._drop(live[0], envs[live[0].msg_id], exc.message)
                fates[live[0].msg_id] = Sent.DROPPED
                return fates
            await self._retry(live)
            raise
        except RemoteProtocolError:
            await self._retry(live)  # idempotent on msg_id: resending is safe
            raise
        done: list[bytes] = []
        again: list[Outgoing] = []
        for o, r in zip(live, results, strict=True):
            code = _status(r.status)
            if code == StatusCode.OK:
                done.append(o.msg_id)
                fates[o.msg_id] = Sent.DELIVERED
                self._note(
                    o.msg_id,
                    Route(r.hops, "", stored_here=r.seq > 0 or r.duplicate, held=r.held),
                )
            elif code.retriable:
                again.append(o)
                fates[o.msg_id] = Sent.RETRY
                self._note(o.msg_id, Route(0, r.detail or code.name))
            else:
                await self._drop(o, envs[o.msg_id], r.detail or code.name)
                fates[o.msg_id] = Sent.DROPPED
        if done:
            await self._state.call(self._st.outbox_done, done)
        if again:
            await self._retry(again)
        return fates

    def _note(self, msg_id: bytes, route: Route) -> None:
        if len(self.routes) < 1024:  # bounded: a flush of a long queue keeps the first
            self.routes[msg_id] = route

    async def _enqueue(
        self, envs: list[Envelope], ids: list[bytes], *, atomic: bool
    ) -> list[service_pb2.EnqueueResult]:
        """One Enqueue call: a result per envelope, in order (else RemoteProtocolError)."""
        resp = await self._rpc.call(
            "qpc.v1.Delivery/Enqueue",
            service_pb2.EnqueueRequest(envelopes=[e.to_proto() for e in envs], atomic=atomic),
            service_pb2.EnqueueResponse,
        )
        results = list(resp.results)
        if [bytes(r.msg_id) for r in results] != ids:
            raise RemoteProtocolError("Enqueue answered results that do not match the batch")
        return results

    async def _retry(self, msgs: list[Outgoing]) -> None:
        self._stats.send_retries += len(msgs)
        await self._state.call(
            self._st.outbox_retry_many, [(o.msg_id, self._backoff(o.attempts)) for o in msgs]
        )

    async def _drop(self, o: Outgoing, env: Envelope, why: str) -> None:
        await self._state.call(self._st.outbox_done, [o.msg_id])
        self._stats.send_dropped += 1
        try:
            sealed = client_pb2.Sealed.FromString(unpad(env.ciphertext))
        except (DecodeError, RemoteProtocolError):
            sealed = None
        if sealed is not None and sealed.kind == client_pb2.Sealed.WELCOME:
            self._welcome_lost(bytes(sealed.group_id), env.recipient)
        self._warn(
            f"a message to {short_code(env.recipient.hex())} was not delivered: {why}",
            "outbox message dropped",
        )

    def _backoff(self, attempts: int) -> int:
        lo, hi = OUTBOX_BACKOFF_MS
        cap = min(hi, lo * (2**attempts))
        return self._wall_ms() + int(self._rng.uniform(0, cap))


def _status(value: int) -> StatusCode:
    """A wire status as our enum; a number we do not know counts as UNKNOWN (permanent)."""
    try:
        return StatusCode(value)
    except ValueError:
        return StatusCode.UNKNOWN
