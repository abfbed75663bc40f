"""Delivery: per-recipient mailboxes over the store, with long-poll wakeups.

Enqueue is idempotent on msg_id (the store guarantees it); fetch and ack act
only on the caller's own mailbox; a fetch with ``wait_ms`` parks until a new
message for that recipient commits or the (capped) wait ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, cast

import msgspec
import trio

from qpc_node.errors import LocalProtocolError, QpcError, RemoteProtocolError, StatusCode
from qpc_node.rpc.context import AnswerOverBudget, CallContext
from qpc_node.rpc.methods import MethodTable
from qpc_node.service.guard import Guard, PermissionDenied, short
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.fairness import SenderKey
from qpc_node.store.records import EnqueueResult, Envelope, FetchResult
from qpc_node.wire.envelope import Envelope as WireEnvelope
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, rpc_pb2, service_pb2

MAX_BATCH = 256
MAX_FETCH = 256
MAX_WAIT_S = 30.0
ANSWER_OVERHEAD = 64
"""Response and FetchResponse fields around the messages (version, call id, head_seq)."""
MESSAGE_OVERHEAD = 128
"""A StoredMessage's bytes besides its ciphertext (seq, ids, tags, lengths), rounded up."""
FIRST_READ_BYTES = 16 * 1024
"""What a Fetch reserves for its first read: a few chat messages (see ``_fetch``)."""
_USER_KEY = "user:"


class UnknownRecipient(QpcError):
    code = StatusCode.NOT_FOUND


class Relay(Protocol):
    """Where envelopes for users not homed here go (the mesh; see mesh/service.py)."""

    def homed_elsewhere(self, user: bytes) -> bool:
        """The user's newest home binding names another node."""
        ...

    async def submit(
        self, envelopes: Sequence[envelope_pb2.Envelope], *, origin: bytes
    ) -> list[EnqueueResult | QpcError]:
        """Take each envelope into durable custody toward its home, or refuse it typed.

        ``origin`` is the sender's fingerprint as proven on its session: every hop
        carries it, and the recipient's home node judges mailbox fairness by it."""
        ...

    def check(self, recipient: bytes) -> QpcError | None:
        """Would ``submit`` take it now (a route exists)? For all-or-nothing batches."""
        ...

    def rehomed(self, user: bytes) -> None:
        """Mail was just stored here for ``user``: if its binding moved elsewhere while
        it was being stored, the old-home hand-over must pick it up too."""
        ...

    def hops(self, recipient: bytes) -> int:
        """Node-to-node hops to the recipient's home now (0: here or unknown); what the
        sender is told with an OK for a relayed envelope."""
        ...


class Waiters:
    """Parked fetches per recipient: one Event they share, set when mail arrives.

    Entries are reference-counted so a long-poll that times out removes what it
    added: the table holds only recipients with a fetch parked right now.
    """

    def __init__(self) -> None:
        self._events: dict[bytes, tuple[trio.Event, int]] = {}
        self.wakeups = 0

    @contextmanager
    def parked(self, recipient: bytes) -> Iterator[trio.Event]:
        ev, n = self._events.get(recipient, (None, 0))
        if ev is None or ev.is_set():
            # Fetchers of a fired event are on their way out and no longer count.
            ev, n = trio.Event(), 0
        self._events[recipient] = (ev, n + 1)
        try:
            yield ev
        finally:
            cur, count = self._events.get(recipient, (None, 0))
            if cur is ev:
                if count <= 1:
                    del self._events[recipient]
                else:
                    self._events[recipient] = (ev, count - 1)

    def wake_all(self) -> None:
        for ev, _ in self._events.values():
            ev.set()

    def notify(self, recipient: bytes) -> None:
        entry = self._events.get(recipient)
        if entry is not None and not entry[0].is_set():
            self.wakeups += 1
            entry[0].set()

    def __len__(self) -> int:
        return len(self._events)


def _aborted() -> QpcError:
    return QpcError(
        "not stored: another envelope of this all-or-nothing batch was refused",
        code=StatusCode.ABORTED,
    )


def _mine(ctx_user: bytes, named: bytes) -> None:
    if named and named != ctx_user:
        raise PermissionDenied("a session may only read or ack its own mailbox")


class DeliveryService:
    def __init__(
        self,
        store: AsyncStore,
        guard: Guard,
        *,
        wall_ms: Callable[[], int],
        max_wait: float = MAX_WAIT_S,
        relay: Relay | None = None,
    ) -> None:
        self._store = store
        self._relay = relay
        self.relayed = 0
        self._guard = guard
        self._wall_ms = wall_ms
        self._max_wait = max_wait
        self.waiters = Waiters()
        self._draining = False
        self._known: set[bytes] = set()

    def begin_drain(self) -> None:
        """Answer parked long-polls now and park no more (the node is stopping)."""
        self._draining = True
        self.waiters.wake_all()

    async def mark_local(self, user: bytes) -> None:
        """Record that ``user`` is homed here (proved its key to this node)."""
        if user not in self._known:
            await self._store.meta_put(_USER_KEY + user.hex(), b"1")
            self._known.add(user)

    def known_local(self, user: bytes) -> bool:
        """Without a store read: proved its key here since start (or looked up since)."""
        return user in self._known

    async def is_local(self, user: bytes) -> bool:
        if user in self._known:
            return True
        if await self._store.meta_get(_USER_KEY + user.hex()) is not None:
            self._known.add(user)
            return True
        return False

    def register(self, table: MethodTable) -> None:
        table.register(
            "qpc.v1.Delivery/Enqueue",
            service_pb2.EnqueueRequest,
            service_pb2.EnqueueResponse,
            self.enqueue,
        )
        table.register(
            "qpc.v1.Delivery/Fetch",
            service_pb2.FetchRequest,
            service_pb2.FetchResponse,
            self.fetch,
            max_timeout=self._max_wait + 15,
        )
        table.register(
            "qpc.v1.Delivery/Ack", service_pb2.AckRequest, service_pb2.AckResponse, self.ack
        )

    async def enqueue(
        self, req: service_pb2.EnqueueRequest, ctx: CallContext
    ) -> service_pb2.EnqueueResponse:
        """Store every envelope we can; answer one result per envelope, in request order.

        A client's batch mixes unrelated recipients (its outbox sends up to 64 at a
        time), so one unknown recipient, full mailbox or malformed envelope is that
        envelope's refusal, not the batch's. Only what concerns the call as a whole
        (session, batch size, the store itself) fails it, and then nothing is stored.
        ``atomic`` batches (a commit's fan-out) are stored whole or not at all.

        Admission is the store's fairness rule applied to the session's identity: a
        sender the recipient has not accepted gets a bounded share, and each envelope
        past it is refused alone (RESOURCE_EXHAUSTED) while the rest is stored.
        """
        user = self._guard.check(ctx)
        if not 0 < len(req.envelopes) <= MAX_BATCH:
            raise RemoteProtocolError(f"a batch holds 1..{MAX_BATCH} envelopes")
        now_ms = self._wall_ms()
        outcomes: list[EnqueueResult | QpcError | None] = []
        batch: list[Envelope] = []
        remote: list[int] = []  # indexes of envelopes for users homed elsewhere
        for pb in req.envelopes:
            try:
                env = WireEnvelope.from_proto(pb)  # typed error on any bad field
                if not await self._here(env.recipient):
                    if self._relay is None:
                        raise UnknownRecipient(
                            f"recipient {short(env.recipient)} is not homed here"
                        )
                    refused = self._relay.check(env.recipient) if req.atomic else None
                    if refused is not None:
                        raise refused
                    remote.append(len(outcomes))
                    outcomes.append(None)
                    continue
            except QpcError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(None)  # filled from the store's answer below
            batch.append(
                Envelope(env.msg_id, env.recipient, env.expiry_ms, env.hop_limit, env.ciphertext)
            )
        sender = SenderKey.local(user)
        stored: Iterator[EnqueueResult | QpcError] = iter([])
        remote_set = set(remote)
        local_outcomes = [o for i, o in enumerate(outcomes) if i not in remote_set]
        if req.atomic:
            local_outcomes = await self._enqueue_all_or_nothing(
                local_outcomes, batch, now_ms, sender
            )
        elif batch:
            stored = iter(await self._store.enqueue_each(batch, now_ms, sender=sender))
        relayed: dict[int, EnqueueResult | QpcError] = {}
        if remote and not (req.atomic and any(isinstance(o, QpcError) for o in local_outcomes)):
            # Atomic batches mixing local and remote members: the local part is stored
            # all-or-nothing first, then the remote part goes into custody (each hop's
            # queue is durable; only a full queue refuses there, reported per envelope).
            assert self._relay is not None
            got_remote = await self._relay.submit([req.envelopes[i] for i in remote], origin=user)
            relayed = dict(zip(remote, got_remote, strict=True))
            self.relayed += sum(1 for g in got_remote if not isinstance(g, QpcError))
        elif remote:
            relayed = dict.fromkeys(remote, _aborted())
        it_local = iter(local_outcomes)
        outcomes = [relayed[i] if i in remote_set else next(it_local) for i in range(len(outcomes))]
        results: list[service_pb2.EnqueueResult] = []
        woken: set[bytes] = set()
        for pb, got in zip(req.envelopes, outcomes, strict=True):
            if got is None:
                got = next(stored)
            if isinstance(got, QpcError):
                results.append(
                    service_pb2.EnqueueResult(
                        msg_id=pb.msg_id,
                        status=cast(rpc_pb2.StatusCode, int(got.code)),
                        detail=got.message,
                    )
                )
                continue
            if not got.duplicate and got.seq:
                woken.add(pb.recipient)
            hops = 0
            if self._relay is not None and not got.seq:  # relayed: how far it goes
                hops = self._relay.hops(bytes(pb.recipient))
            results.append(
                service_pb2.EnqueueResult(
                    msg_id=got.msg_id,
                    seq=got.seq,
                    duplicate=got.duplicate,
                    hops=0 if got.held else hops,
                    held=got.held,
                )
            )
        for rec in woken:
            self.waiters.notify(rec)
            if self._relay is not None:
                self._relay.rehomed(rec)
        return service_pb2.EnqueueResponse(results=results)

    async def _here(self, user: bytes) -> bool:
        """The mailbox is here: proved its key here, and has not re-homed since."""
        if self._relay is not None and self._relay.homed_elsewhere(user):
            return False
        return await self.is_local(user)

    async def _enqueue_all_or_nothing(
        self,
        outcomes: list[EnqueueResult | QpcError | None],
        batch: list[Envelope],
        now_ms: int,
        sender: SenderKey,
    ) -> list[EnqueueResult | QpcError | None]:
        """Store ``batch`` as one batch if nothing was refused yet; else store nothing.

        Every envelope that was fine but not stored gets ABORTED, so the caller sees
        per envelope which one was at fault.
        """
        if not any(isinstance(o, QpcError) for o in outcomes):
            try:
                results = iter(await self._store.enqueue(batch, now_ms, sender=sender))
            except LocalProtocolError as exc:  # quota, size, expiry: the batch's fault
                culprit = getattr(exc, "index", None)
                out: list[EnqueueResult | QpcError | None] = []
                for i in range(len(outcomes)):
                    out.append(exc if culprit is None or culprit == i else _aborted())
                return out
            return [next(results) for _ in outcomes]
        return [o if isinstance(o, QpcError) else _aborted() for o in outcomes]

    async def fetch(
        self, req: service_pb2.FetchRequest, ctx: CallContext
    ) -> service_pb2.FetchResponse:
        user = self._guard.check(ctx)
        _mine(user, req.identity)
        limit = min(req.limit or 64, MAX_FETCH)
        wait = min(req.wait_ms / 1000.0, self._max_wait, max(ctx.time_remaining() - 1.0, 0.0))
        res = await self._fetch(ctx, user, req.after_seq, limit)
        if not res.messages and wait > 0 and not self._draining:
            with trio.move_on_after(wait):
                for _ in range(1000):  # each round waits for a wakeup; bounded anyway
                    # Park before re-reading, so a commit in between still wakes us.
                    with self.waiters.parked(user) as ev:
                        res = await self._fetch(ctx, user, req.after_seq, limit)
                        if res.messages or self._draining:
                            break
                        await ev.wait()
        return _answer(res)

    async def _fetch(
        self, ctx: CallContext, user: bytes, after_seq: int, limit: int
    ) -> FetchResult:
        """Read what the answer has room for in the node's send budget, and no more.

        The bytes are reserved *before* the store reads them: the answer is
        materialized (store row, protobuf, serialized frame) before the server
        can budget the frame, so budgeting only the frame let every call in
        flight hold several copies of a 5 MiB message at once. Most answers are
        a few chat messages: the first read asks for FIRST_READ_BYTES only, and
        only a page cut short by size (a backlog, a large message) is read again
        with room for a whole frame -- so a busy node's small fetches do not each
        claim a frame of the budget for the length of a store read. A short grant
        means fewer messages (the client pages on with ``after_seq``); a grant too
        short for the first message is a retriable RESOURCE_EXHAUSTED.
        """
        res = await self._read(ctx, user, after_seq, limit, FIRST_READ_BYTES)
        if res.more and len(res.messages) < limit:  # cut by size, not by count
            frame = ctx.answer.frame_cap + ANSWER_OVERHEAD  # the header counts as overhead
            res = await self._read(ctx, user, after_seq, limit, frame)
            if not res.messages and res.more:
                raise AnswerOverBudget(
                    f"node is holding too many response bytes; retry later "
                    f"(message after seq {after_seq} does not fit what is free)"
                )
        return res

    async def _read(
        self, ctx: CallContext, user: bytes, after_seq: int, limit: int, want: int
    ) -> FetchResult:
        granted = ctx.answer.reserve(want)
        try:
            res = await self._store.fetch(
                user,
                now_ms=self._wall_ms(),
                after_seq=after_seq,
                limit=limit,
                max_bytes=max(granted - ANSWER_OVERHEAD, 0),
                overhead=MESSAGE_OVERHEAD,
                strict=True,
            )
        except BaseException:
            ctx.answer.shrink(0)
            raise
        # Keep what the answer needs (nothing while a long-poll is parked).
        ctx.answer.shrink(_answer_bound(res))
        return res

    async def ack(self, req: service_pb2.AckRequest, ctx: CallContext) -> service_pb2.AckResponse:
        user = self._guard.check(ctx)
        _mine(user, req.identity)
        deleted = await self._store.ack(user, up_to_seq=req.up_to_seq)
        return service_pb2.AckResponse(deleted=deleted)

    def statistics(self) -> DeliveryStatistics:
        return DeliveryStatistics(parked_fetches=len(self.waiters), wakeups=self.waiters.wakeups)


def _answer_bound(res: FetchResult) -> int:
    """Upper bound of ``res`` as a framed answer (what its reservation must cover)."""
    if not res.messages:
        return 0
    return ANSWER_OVERHEAD + sum(
        MESSAGE_OVERHEAD + len(m.envelope.ciphertext) for m in res.messages
    )


def _answer(res: FetchResult) -> service_pb2.FetchResponse:
    out = service_pb2.FetchResponse(head_seq=res.last_seq)
    for m in res.messages:  # added in place: no intermediate list of messages
        pb = out.messages.add(seq=m.seq)
        env = pb.envelope
        env.msg_id = m.envelope.msg_id
        env.recipient = m.envelope.recipient
        env.expiry_ms = m.envelope.expiry_ms
        env.hop_limit = m.envelope.hop_limit
        env.ciphertext = m.envelope.ciphertext
    return out


class DeliveryStatistics(msgspec.Struct, frozen=True):
    parked_fetches: int  # recipients with a long-poll fetch parked right now
    wakeups: int  # parked fetches woken by new mail
