"""The receive path: fetch, process with MLS, store, ack; hold what cannot be read yet.

``Fetch`` after the local cursor (long-poll), process each message with MLS,
store the text and advance the cursor in one transaction, then ``Ack`` (the node
deletes acked messages). A message we cannot process *yet* (its commit or
Welcome has not arrived) is held in client.db, in the transaction that moves the
cursor past it, and retried after every message that may unblock it and on every
receive, until it succeeds or expires; never acked away unread. One that can
never be processed is counted and reported.

What a group-control message (GroupInfo, LeaveRequest, GroupIntent, CommitPull),
a proposal or a commit means for our conversations is the agent's business (its
group driver): the inbox hands them over processed, and says which group holds
messages of a later epoch (its commits are missing: the driver pulls them).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable

import trio
from google.protobuf.message import DecodeError

from qpc_node import crypto
from qpc_node.client.agent_types import AgentContext, AgentPart, Incoming
from qpc_node.client.branches import Branches, Unknown
from qpc_node.client.mlsheader import InvalidMlsHeader, parse_header
from qpc_node.client.state import Conversation, Held
from qpc_node.errors import RemoteProtocolError
from qpc_node.ops.log import get_logger
from qpc_node.wire.envelope import unpad
from qpc_node.wire.gen.qpc.v1 import client_pb2, service_pb2

log = get_logger("qpc.client")

MAX_HELD = 1000
"""Messages kept for a later retry at most; beyond, the oldest is given up (reported)."""
HELD_PASSES = 8
DESCRIBE_WAIT_MS = 30_000
"""How long application messages of a group we joined wait for its GroupInfo
follow-up (its name) before they are shown under the placeholder name."""
"""Rounds over the held messages per retry: a held commit can unblock another."""


class Later(enum.Enum):
    HOLD = "hold"


HOLD = Later.HOLD
"""``handle``'s answer for a message that cannot be processed yet: keep it."""

GroupControl = Callable[[Conversation, crypto.Group, str, client_pb2.AppMessage], Awaitable[None]]
"""``control(conv, group, sender fingerprint hex, message)`` for an application
message that carries no text (GroupInfo, LeaveRequest, GroupIntent, CommitPull)."""
GroupEvent = Callable[[Conversation, crypto.Group, crypto.Event, bytes], Awaitable[None]]
"""``event(conv, group, event, mls message)`` for a processed proposal or commit."""
Future = Callable[[bytes, int], None]
"""``future(group id, epoch)``: a message of that later epoch is held."""
Offer = Callable[[bytes, bytes], Awaitable[None]]
"""``offer(group id, BranchOffer bytes)``: another branch of a group (docs/groups.md)."""


async def _no_event(_c: Conversation, _g: crypto.Group, _e: crypto.Event, _m: bytes) -> None:
    return None


async def _no_offer(_gid: bytes, _data: bytes) -> None:
    return None


class Inbox(AgentPart):
    """One identity's incoming messages, from the node's mailbox to client.db."""

    def __init__(
        self,
        ctx: AgentContext,
        *,
        control: GroupControl,
        events: GroupEvent = _no_event,
        future: Future = lambda _g, _e: None,
        branches: Branches | None = None,
        offer: Offer = _no_offer,
    ) -> None:
        super().__init__(ctx)
        self._offer = offer
        self._branches = branches
        self._control = control
        self._events = events
        self._future = future
        self._lock = trio.Lock()
        self._held_loaded = False

    async def receive(self, wait: float = 0.0) -> list[Incoming]:
        """Fetch, process, store and ack what arrived; long-poll up to ``wait`` seconds.

        A message that cannot be processed yet is held in client.db (the cursor and
        the ack move past it: the node no longer needs to keep it) and retried after
        each message that may unblock it and on every later receive.
        """
        async with self._lock:
            if not self._held_loaded:
                self._stats.held = await self._state.call(self._st.held_count)
                self._held_loaded = True
            node = self._node()  # the answer below is this node's mailbox
            cursor = await self._state.call(self._st.cursor, node)
            resp = await self._rpc.call(
                "qpc.v1.Delivery/Fetch",
                service_pb2.FetchRequest(after_seq=cursor, limit=128, wait_ms=int(wait * 1000)),
                service_pb2.FetchResponse,
                timeout=wait + 15.0,
            )
            out: list[Incoming] = []
            for m in resp.messages:
                if cursor and m.seq != cursor + 1:
                    self._stats.gaps.append((cursor + 1, m.seq))
                    log.warning("mailbox gap", extra={"expected": cursor + 1, "got": m.seq})
                msg_id = bytes(m.envelope.msg_id)
                cursor = m.seq
                seen = bool(msg_id) and await self._state.call(self._st.seen, msg_id)
                if seen:
                    # Received before: from this node (a retried send) or another one
                    # (our old home forwarding what it held after we moved).
                    self._stats.duplicates += 1
                    await self._state.call(self._st.advance_cursor, m.seq, node=node)
                    continue
                payload = bytes(m.envelope.ciphertext)
                got = await self.handle(m.seq, payload)
                now = self._wall_ms()
                if got is HOLD:
                    await self._hold(m.seq, payload, m.envelope.expiry_ms, node, msg_id)
                elif got is None:
                    await self._state.call(
                        self._st.advance_cursor, m.seq, node=node, msg_id=msg_id, now_ms=now
                    )
                    if self._stats.held:
                        # A commit or Welcome may be what a held message waited for.
                        out += await self._retry_held()
                else:
                    await self._state.call(
                        self._st.store_received,
                        *self._row(m.seq, got),
                        cursor=m.seq,
                        node=node,
                        msg_id=msg_id,
                        app_id=got.app_id,
                    )
                    out.append(got)
            if resp.messages:
                await self._rpc.call(
                    "qpc.v1.Delivery/Ack",
                    service_pb2.AckRequest(up_to_seq=cursor),
                    service_pb2.AckResponse,
                )
            if self._stats.held:
                out += await self._retry_held()
            self._stats.received += len(out)
            return out

    # -- held messages -----------------------------------------------------------
    async def _hold(
        self, seq: int, payload: bytes, expiry_ms: int, node: bytes, msg_id: bytes
    ) -> None:
        await self._state.call(
            self._st.hold,
            seq,
            payload,
            expiry_ms,
            cursor=seq,
            node=node,
            msg_id=msg_id,
            now_ms=self._wall_ms(),
        )
        self._stats.held += 1
        log.info("holding a message for later", extra={"seq": seq})
        if self._stats.held > MAX_HELD:
            oldest = (await self._state.call(self._st.held))[0]
            await self._give_up(oldest, "too many messages waiting for their commit")

    async def _give_up(self, h: Held, why: str) -> None:
        seq = h.seq
        await self._state.call(self._st.held_done, seq, h.node)
        self._stats.held -= 1
        self._stats.held_expired += 1
        self._warn(f"a message (mailbox seq {seq}) could not be read: {why}", "held message lost")

    async def _retry_held(self) -> list[Incoming]:
        """Process held messages that have become processable, oldest first."""
        out: list[Incoming] = []
        for _ in range(HELD_PASSES):
            progress = False
            for h in await self._state.call(self._st.held):
                if h.expiry_ms <= self._wall_ms():
                    await self._give_up(h, "its commit never arrived before it expired")
                    continue
                got = await self.handle(h.seq, h.payload)
                if got is HOLD:
                    await self._state.call(self._st.held_tried, h.seq, h.node)
                    continue
                progress = True
                self._stats.held -= 1
                if got is None:
                    await self._state.call(self._st.held_done, h.seq, h.node)
                    continue
                self._stats.recovered += 1
                await self._state.call(
                    self._st.store_held_received, *self._row(h.seq, got), h.node, app_id=got.app_id
                )
                out.append(got)
            if not progress:
                break
        return out

    def _row(self, seq: int, got: Incoming) -> tuple[int, str, bytes, str, int]:
        """A received text as client.db stores it: seq, conversation, sender, text, now."""
        return seq, got.conversation, bytes.fromhex(got.sender), got.text, self._wall_ms()

    # -- one message -------------------------------------------------------------
    async def handle(self, seq: int, padded: bytes) -> Incoming | Later | None:
        """Process one delivered payload.

        Returns the text for the user, None when it carries none (or can never be
        processed: counted and reported), or HOLD when it cannot be processed *yet*
        (its group's Welcome or the commit to its epoch has not arrived).
        """
        try:
            sealed = client_pb2.Sealed.FromString(unpad(padded))
            if sealed.kind == client_pb2.Sealed.WELCOME:
                await self._joined(await self._mls(self._ident.join, sealed.data))
                return None
            if sealed.kind == client_pb2.Sealed.REJOIN_OFFER:
                await self._offer(bytes(sealed.group_id), bytes(sealed.data))
                return None
            if sealed.kind != client_pb2.Sealed.MLS_MESSAGE:
                raise RemoteProtocolError(f"unknown sealed kind {sealed.kind}")
            try:
                g = await self._mls(self._ident.group, sealed.group_id)
            except crypto.UnknownGroup:
                return HOLD  # its Welcome may still be on the way
            if not sealed.describes and await self._before_description(sealed):
                return HOLD
            try:
                if self._branches is None:
                    ev = await self._mls(g.process, sealed.data)
                else:
                    got = await self._mls(
                        self._branches.process,
                        bytes(sealed.group_id),
                        g,
                        bytes(sealed.branch),
                        bytes(sealed.data),
                        self._wall_ms(),
                    )
                    if isinstance(got, Unknown):
                        return HOLD  # a branch we have not seen: we may switch to it
                    if got is None:
                        return None
                    ev = got
            except crypto.WrongEpoch:
                if await self._from_future(g, sealed.data):
                    return HOLD
                raise
            except crypto.MissingProposal:
                # Relays reorder: the proposal this commit names may still come (held
                # until the commit expires; each processed message retries it).
                return HOLD
        except (crypto.MlsError, RemoteProtocolError, DecodeError) as exc:
            self._unreadable(seq, type(exc).__name__)
            return None
        conv = await self._state.call(self._st.conversation_by_group, bytes(sealed.group_id))
        if ev.kind != "application" and conv is not None:
            await self._events(conv, g, ev, bytes(sealed.data))
        if ev.kind != "application" or conv is None:
            if ev.kind == "commit" and conv is not None and not await self._mls(_active, g):
                self._warn(f"you were removed from {conv.name!r}")
                await self._state.call(self._st.drop_conversation, conv.name)
            return None
        return await self._application(conv, g, ev)

    async def _before_description(self, sealed: client_pb2.Sealed) -> bool:
        """An application message of a group we joined whose GroupInfo follow-up
        (its name, its committer) has not arrived: relays may reorder envelopes, so
        it waits for that follow-up, for DESCRIBE_WAIT_MS at most (then it is shown
        under the placeholder name; an older sender never marks the follow-up)."""
        since = await self._state.call(self._st.undescribed_since, bytes(sealed.group_id))
        if since is None or self._wall_ms() - since >= DESCRIBE_WAIT_MS:
            return False
        try:
            return parse_header(sealed.data).application
        except InvalidMlsHeader:
            return False

    async def _from_future(self, g: crypto.Group, message: bytes) -> bool:
        """True when ``message`` is from an epoch this (active) group has not reached."""
        try:
            header = parse_header(message)
        except InvalidMlsHeader:
            return False

        def ahead() -> bool:
            return g.is_active and header.epoch > g.epoch

        if await self._mls(ahead):
            self._future(bytes(header.group_id), header.epoch)
            return True
        return False

    def _unreadable(self, seq: int, why: str) -> None:
        self._stats.undecryptable += 1
        log.info("dropped undecryptable message", extra={"seq": seq, "err": why})
        self._warn(
            f"a message (mailbox seq {seq}) could not be read and was dropped ({why})",
            "undecryptable message",
        )

    async def _joined(self, g: crypto.Group) -> None:
        gid = bytes(g.group_id)
        if await self._state.call(self._st.conversation_by_group, gid) is None:
            placeholder = Conversation(f"pending-{gid[:4].hex()}", gid, False, None, b"")
            await self._state.call(self._st.add_conversation, placeholder, self._wall_ms())

    async def _application(
        self, conv: Conversation, g: crypto.Group, ev: crypto.Event
    ) -> Incoming | None:
        try:
            app = client_pb2.AppMessage.FromString(ev.data)
        except DecodeError:
            self._unreadable(0, "DecodeError")
            return None
        if app.WhichOneof("body") == "text":
            app_id = bytes(app.app_id)
            if await self._state.call(self._st.text_seen, bytes.fromhex(ev.sender), app_id):
                return None  # re-sent on the winning branch after a fork: shown already
            return Incoming(0, conv.name, ev.sender, app.text, app_id)
        await self._control(conv, g, ev.sender, app)
        return None


def _active(g: crypto.Group) -> bool:
    return g.is_active
