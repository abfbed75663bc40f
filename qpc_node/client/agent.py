"""A user's agent: MLS identity + local state + an authenticated session on its node.

Flow of a send: encrypt with MLS, wrap in ``Sealed``, pad to 256-byte buckets,
put one Envelope per recipient in the durable outbox, then flush the outbox
with a batch Enqueue (idempotent on msg_id, so a retry never duplicates).
Flow of a receive: Fetch after the local cursor (long-poll), process each
message with MLS, store the text, advance the cursor, then Ack. A message we
cannot process *yet* (its commit or Welcome has not arrived) is kept in
client.db and retried after later messages, never acked away; one that can
never be processed is counted and reported.

Every MLS call (and the fsync of its state) runs on a worker thread, one at a
time per identity: in ``qpc`` the node and the REPL share a process, and a burst
of key-package generation must not stall the node's QUIC timers.

Group changes have one committer per group, its creator (documented in
docs/client.md): others ask it (a LeaveRequest inside MLS) rather than commit
themselves, so two members never race commits for the same epoch.

A commit becomes our group state only once the node stored its whole fan-out
(commit to every member, the Welcome of an invite: one all-or-nothing Enqueue).
Until then MLS keeps it pending and client.db records which outbox messages
carry it; a permanent refusal clears it (the group stays on the epoch every
other member has: no fork), a retriable one keeps it queued, across restarts,
and it is merged when the node finally takes it. What must be encrypted in the
new epoch (the GroupInfo that follows a Welcome) is encrypted after the merge.
"""

from __future__ import annotations

import enum
import functools
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import trio
from google.protobuf.message import DecodeError

from qpc_node import crypto
from qpc_node.client.fingerprint import short_code
from qpc_node.client.mlsheader import InvalidMlsHeader, parse_header
from qpc_node.client.state import AsyncClientState, Conversation, Outgoing, Received
from qpc_node.errors import LocalProtocolError, QpcError, RemoteProtocolError, StatusCode
from qpc_node.mesh.routing import sign_binding
from qpc_node.ops.log import get_logger
from qpc_node.ops.metrics import Sample
from qpc_node.rpc.client import ClientStatistics, RpcClient
from qpc_node.rpc.errors import RpcError
from qpc_node.service.auth import auth_message
from qpc_node.service.stats import STATS_METHOD, samples_from_proto
from qpc_node.wire.envelope import DEFAULT_HOP_LIMIT, Envelope, pad, unpad
from qpc_node.wire.gen.qpc.v1 import client_pb2, ops_pb2, service_pb2

log = get_logger("qpc.client")

P = ParamSpec("P")
T = TypeVar("T")

RETENTION_MS = 7 * 24 * 3600 * 1000
KP_TARGET = 16
HOME_TTL_MS = 2 * 24 * 3600 * 1000  # a home binding's lifetime; re-signed at every login
KP_LOW_WATER = 6
KP_ROTATE_MS = 12 * 3600 * 1000  # packages live 24 h on the node: refresh at half-life
OUTBOX_BACKOFF_MS = (500, 60_000)
FLUSH_ROUNDS = 16
"""Enqueue calls one flush makes at most (64 messages each)."""
MAX_HELD = 1000
"""Messages kept for a later retry at most; beyond, the oldest is given up (reported)."""
HELD_PASSES = 8
"""Rounds over the held messages per retry: a held commit can unblock another."""

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


class AgentError(QpcError):
    code = StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True, slots=True)
class Incoming:
    seq: int
    conversation: str
    sender: str  # fingerprint hex
    text: str


class Sent(enum.Enum):
    """What became of one outbox message in a flush."""

    DELIVERED = "delivered"  # the node stored it (or already held it)
    RETRY = "retry"  # still queued, with backoff
    DROPPED = "dropped"  # refused for good (or expired): the user was warned


class _Later(enum.Enum):
    HOLD = "hold"


HOLD = _Later.HOLD
"""``_handle``'s answer for a message that cannot be processed yet: keep it."""


@dataclass(slots=True)
class AgentStatistics:
    sent: int = 0
    received: int = 0
    undecryptable: int = 0
    """Delivered messages that can never be processed (bad encoding, signature, an
    epoch we left): counted, reported with a warning, then discarded."""
    held: int = 0
    """Messages kept in client.db right now because they cannot be processed yet."""
    recovered: int = 0
    """Held messages that were processed later (their commit or Welcome arrived)."""
    held_expired: int = 0
    """Held messages given up: expired, or over MAX_HELD."""
    send_retries: int = 0
    """Outbox messages scheduled again (node busy, connection lost)."""
    send_dropped: int = 0
    """Outbox messages the node refused for good (or that expired unsent)."""
    gaps: list[tuple[int, int]] = field(default_factory=list)
    """(expected, got) sequence pairs where messages went missing."""
    warnings: list[str] = field(default_factory=list)


class Agent:
    def __init__(
        self,
        ident: crypto.Identity,
        state: AsyncClientState,
        rpc: RpcClient,
        *,
        node_cert_fingerprint: bytes,
        wall_ms: Callable[[], int],
        rng: random.Random | None = None,
        mls_in_thread: bool = True,
    ) -> None:
        """``mls_in_thread=False`` runs MLS calls on the Trio thread, as before issue 10:
        only for ``bench/agent_stall_bench.py`` to measure what the worker thread saves."""
        self.ident = ident
        self.me = bytes.fromhex(ident.fingerprint)
        self._state = state
        self._st = state.sync
        self._rpc = rpc
        self._node_fpr = node_cert_fingerprint
        self._wall_ms = wall_ms
        self._rng = rng or random.Random()
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self.stats = AgentStatistics()
        self.on_warning: Callable[[str], None] = lambda _m: None
        # One worker at a time for this identity's MLS calls: they share one state
        # file and their order matters (a commit before the message that follows it).
        self._mls_limiter = trio.CapacityLimiter(1)
        self._mls_in_thread = mls_in_thread
        self._held_loaded = False
        self._orphans_checked = False
        self._commit_refusals: dict[bytes, str] = {}

    async def _mls(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run one MLS call off the Trio thread (the Rust core releases the GIL)."""
        call = functools.partial(fn, *args, **kwargs)
        if not self._mls_in_thread:
            return call()
        return await trio.to_thread.run_sync(call, limiter=self._mls_limiter)

    async def unshown(self) -> list[Received]:
        """Stored texts not yet shown to the user (marks them shown)."""
        return await self._state.call(self._st.unshown)

    def rpc_statistics(self) -> ClientStatistics:
        return self._rpc.statistics()

    async def node_stats(self) -> list[Sample]:
        """The node's aggregate numbers (what /metrics shows), for /stats."""
        resp = await self._rpc.call(STATS_METHOD, ops_pb2.StatsRequest(), ops_pb2.StatsResponse)
        return samples_from_proto(resp)

    async def mesh_status(self) -> ops_pb2.MeshResponse:
        """The node's neighbours and routes, for /mesh peers and /mesh routes."""
        return await self._rpc.call("qpc.v1.Node/Mesh", ops_pb2.MeshRequest(), ops_pb2.MeshResponse)

    # -- session ---------------------------------------------------------------
    async def authenticate(self, rpc: RpcClient | None = None) -> None:
        """Prove our identity to the node; ``rpc``: over a new connection (reconnect)."""
        rpc = rpc or self._rpc
        ch = await rpc.call(
            "qpc.v1.Auth/Challenge",
            service_pb2.AuthChallengeRequest(),
            service_pb2.AuthChallengeResponse,
        )
        sig = self.ident.sign(auth_message(ch.nonce, self._node_fpr))
        prove = service_pb2.AuthProveRequest(public_key=self.ident.public_key, signature=sig)
        if len(ch.node_id) == 32:  # a mesh node: home us there (the node spreads it)
            now = self._wall_ms()
            prove.home.CopyFrom(
                sign_binding(
                    self.ident.public_key, self.ident.sign, ch.node_id, now, now + HOME_TTL_MS
                ).to_proto()
            )
        resp = await rpc.call(
            "qpc.v1.Auth/Prove",
            prove,
            service_pb2.AuthProveResponse,
            retries=0,
        )
        if resp.fingerprint != self.me:
            raise RemoteProtocolError("node confirmed a different identity")

    async def top_up_key_packages(self) -> int:
        """Keep the node's pool of our KeyPackages between low water and target.

        Also refreshes the pool at half its 24 h lifetime and keeps one
        last-resort package there, so we stay invitable while offline.
        """
        now = self._wall_ms()
        count = await self._rpc.call(
            "qpc.v1.Directory/Count",
            service_pb2.CountKeyPackagesRequest(),
            service_pb2.CountKeyPackagesResponse,
        )
        last = await self._state.call(self._st.get_meta, "kp_uploaded_ms")
        stale = last is None or now - int.from_bytes(last, "big") > KP_ROTATE_MS
        n = KP_TARGET if stale else (KP_TARGET - count.available)
        if not stale and count.available >= KP_LOW_WATER:
            return 0

        def make() -> list[service_pb2.KeyPackageUpload]:
            pkgs = [
                service_pb2.KeyPackageUpload(key_package=self.ident.key_package())
                for _ in range(max(n, 0))
            ]
            if stale:
                pkgs.append(
                    service_pb2.KeyPackageUpload(
                        key_package=self.ident.key_package(last_resort=True), last_resort=True
                    )
                )
            return pkgs

        pkgs = await self._mls(make)
        if not pkgs:
            return 0
        resp = await self._rpc.call(
            "qpc.v1.Directory/Upload",
            service_pb2.UploadKeyPackagesRequest(packages=pkgs),
            service_pb2.UploadKeyPackagesResponse,
        )
        await self._state.call(self._st.set_meta, "kp_uploaded_ms", now.to_bytes(8, "big"))
        return int(resp.stored)

    # -- conversations -----------------------------------------------------------
    async def _fetch_key_package(self, peer: bytes) -> bytes:
        try:
            resp = await self._rpc.call(
                "qpc.v1.Directory/Fetch",
                service_pb2.FetchKeyPackageRequest(identity=peer),
                service_pb2.FetchKeyPackageResponse,
            )
        except RpcError as exc:
            if exc.code == StatusCode.NOT_FOUND:
                raise AgentError(
                    f"{short_code(peer.hex())} has no KeyPackage on this node"
                ) from None
            raise
        info = crypto.inspect_key_package(resp.key_package)
        if info.fingerprint != peer.hex():
            raise RemoteProtocolError("node returned a KeyPackage of someone else")
        return bytes(resp.key_package)

    async def _conversation(self, name: str) -> tuple[Conversation, crypto.Group]:
        conv = await self._state.call(self._st.conversation, name)
        if conv is None:
            raise AgentError(f"no conversation named {name!r}")
        try:
            return conv, await self._mls(self.ident.group, conv.group_id)
        except crypto.MlsError as exc:
            raise AgentError(f"conversation {name!r}: {exc}") from None

    async def dm(self, peer_hex: str, text: str) -> str:
        """Send ``text`` to ``peer`` over our pairwise group, creating it on first use."""
        peer = bytes.fromhex(peer_hex)
        if peer == self.me:
            raise LocalProtocolError("cannot DM yourself")
        conv = await self._state.call(self._st.direct_with, peer)
        if conv is None:
            conv = await self._start_direct(peer)
        await self._send_text(conv, text)
        return conv.name

    async def _start_direct(self, peer: bytes) -> Conversation:
        await self._note_contact(peer)
        kp = await self._fetch_key_package(peer)
        g = await self._mls(self.ident.create_group)
        name = await self._free_name(short_code(peer.hex()))
        conv = Conversation(name, bytes(g.group_id), True, peer, self.me)
        await self._state.call(self._st.add_conversation, conv, self._wall_ms())
        await self._invite(conv, g, peer, kp)
        return conv

    async def group_create(self, name: str) -> None:
        if await self._state.call(self._st.conversation, name) is not None:
            raise AgentError(f"a conversation named {name!r} exists")
        g = await self._mls(self.ident.create_group)
        conv = Conversation(name, bytes(g.group_id), False, None, self.me)
        await self._state.call(self._st.add_conversation, conv, self._wall_ms())

    async def group_invite(self, name: str, peer_hex: str) -> None:
        conv, g = await self._conversation(name)
        self._must_commit(conv)
        peer = bytes.fromhex(peer_hex)
        if peer_hex in await self._mls(g.members):
            raise AgentError(f"{short_code(peer_hex)} is already in {name!r}")
        await self._note_contact(peer)
        kp = await self._fetch_key_package(peer)
        await self._invite(conv, g, peer, kp)

    async def _invite(self, conv: Conversation, g: crypto.Group, peer: bytes, kp: bytes) -> None:
        before = await self._others(g)
        with self._no_pending_commit(conv):
            commit, welcome = await self._mls(g.add, [kp])
        envs = self._to_each(before, conv.group_id, commit)
        envs.append(self._envelope(peer, client_pb2.Sealed.WELCOME, conv.group_id, welcome))
        # Encrypted in the new epoch (the joiner has no other), so after the merge.
        info = client_pb2.AppMessage(
            info=client_pb2.GroupInfo(
                name=conv.name if not conv.direct else "", direct=conv.direct, committer=self.me
            )
        )
        await self._send_commit(conv, envs, followup=info)

    async def group_send(self, name: str, text: str) -> None:
        conv, _ = await self._conversation(name)
        await self._send_text(conv, text)

    async def group_members(self, name: str) -> list[str]:
        _, g = await self._conversation(name)
        return list(await self._mls(g.members))

    async def group_remove(self, name: str, peer_hex: str) -> None:
        conv, g = await self._conversation(name)
        self._must_commit(conv)
        if peer_hex not in await self._mls(g.members):
            raise AgentError(f"{short_code(peer_hex)} is not in {name!r}")
        await self._commit_removal(conv, g, peer_hex)

    async def group_leave(self, name: str) -> None:
        conv, g = await self._conversation(name)
        if conv.committer == self.me:
            raise AgentError(
                f"you commit changes for {name!r}: remove the others first (one committer per group)"
            )
        with self._no_pending_commit(conv):
            envs = await self._app_envelopes(
                conv, g, client_pb2.AppMessage(leave=client_pb2.LeaveRequest())
            )
        await self._submit(envs)
        await self._state.call(self._st.drop_conversation, name)

    def _must_commit(self, conv: Conversation) -> None:
        if conv.committer != self.me:
            raise AgentError(
                f"only the group's committer ({short_code(conv.committer.hex())}) changes members"
            )

    async def _free_name(self, base: str) -> str:
        name = base
        for i in range(2, 100):
            if await self._state.call(self._st.conversation, name) is None:
                return name
            name = f"{base}~{i}"
        raise AgentError("too many conversations with the same name")

    async def _note_contact(self, peer: bytes) -> None:
        clash = await self._state.call(self._st.short_code_clash, peer)
        if clash is not None:
            self._warn(
                f"WARNING: {peer.hex()} shares the short code {short_code(peer.hex())} with known "
                f"contact {clash.hex()}: a different key. Verify with /verify before trusting it."
            )
        await self._state.call(self._st.see_contact, peer, self._wall_ms())

    def _warn(self, msg: str, event: str = "contact key warning") -> None:
        self.stats.warnings.append(msg)
        log.warning(event)
        self.on_warning(msg)

    # -- sending ---------------------------------------------------------------
    async def _send_text(self, conv: Conversation, text: str) -> None:
        g = await self._mls(self.ident.group, conv.group_id)
        msg = client_pb2.AppMessage(text=text, sent_ms=self._wall_ms())
        with self._no_pending_commit(conv):
            envs = await self._app_envelopes(conv, g, msg)
        if not envs:
            raise AgentError(f"{conv.name!r} has no other members yet")
        await self._submit(envs)
        self.stats.sent += 1

    async def _others(self, g: crypto.Group) -> list[bytes]:
        """Every member but us: who gets a copy of what we send to the group."""
        members = await self._mls(g.members)
        return [bytes.fromhex(m) for m in members if m != self.ident.fingerprint]

    def _to_each(self, recipients: list[bytes], gid: bytes, mls_message: bytes) -> list[Envelope]:
        return [
            self._envelope(m, client_pb2.Sealed.MLS_MESSAGE, gid, mls_message) for m in recipients
        ]

    async def _commit_removal(self, conv: Conversation, g: crypto.Group, member: str) -> None:
        """Remove ``member`` and tell everyone who was in the group, the removed one too."""
        recipients = await self._others(g)
        with self._no_pending_commit(conv):
            commit = await self._mls(g.remove, [member])
        await self._send_commit(conv, self._to_each(recipients, conv.group_id, commit), None)

    @contextmanager
    def _no_pending_commit(self, conv: Conversation) -> Iterator[None]:
        try:
            yield
        except crypto.PendingCommit:
            raise AgentError(
                f"a change to {conv.name!r} is still waiting for the node to take it;"
                " it applies once delivered (the outbox retries it): try again then"
            ) from None

    async def _send_commit(
        self, conv: Conversation, envs: list[Envelope], followup: client_pb2.AppMessage | None
    ) -> None:
        """Send a commit's fan-out all-or-nothing; merge it only once the node stored it.

        Raises AgentError when the node refused it for good (the commit was cleared:
        the group is as before for everyone); warns when it is queued for a retry.
        """
        commit_id = os.urandom(16)
        await self._state.call(
            self._st.commit_begin,
            commit_id,
            conv.group_id,
            None if followup is None else followup.SerializeToString(),
            [(e.msg_id, e.encode()) for e in envs],
            self._wall_ms(),
        )
        fates = await self._flush({e.msg_id for e in envs})
        got = {fates.get(e.msg_id) for e in envs}
        if got == {Sent.DELIVERED}:
            return
        if Sent.DROPPED in got:
            why = self._commit_refusals.pop(commit_id, "refused by the node")
            raise AgentError(f"the change to {conv.name!r} was not made: {why}")
        self._warn(
            f"the change to {conv.name!r} is queued: the node could not take it yet;"
            " it applies once delivered",
            "commit queued",
        )

    async def _app_envelopes(
        self, conv: Conversation, g: crypto.Group, msg: client_pb2.AppMessage
    ) -> list[Envelope]:
        others = await self._others(g)
        ct = await self._mls(g.encrypt, msg.SerializeToString())
        return self._to_each(others, conv.group_id, ct)

    def _envelope(
        self, recipient: bytes, kind: client_pb2.Sealed.Kind, gid: bytes, data: bytes
    ) -> Envelope:
        sealed = client_pb2.Sealed(kind=kind, group_id=gid, data=data).SerializeToString()
        return Envelope(
            msg_id=os.urandom(16),
            recipient=recipient,
            expiry_ms=self._wall_ms() + RETENTION_MS,
            hop_limit=DEFAULT_HOP_LIMIT,
            ciphertext=pad(sealed),
        )

    async def _submit(self, envs: list[Envelope]) -> dict[bytes, Sent]:
        """Queue ``envs`` durably, then flush: what became of each of them."""
        batch = [(e.msg_id, e.encode()) for e in envs]
        await self._state.call(self._st.outbox_add_many, batch, self._wall_ms())
        return await self._flush({e.msg_id for e in envs})

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
        async with self._send_lock:
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
                if own and own <= fates.keys():
                    break
                if not own and Sent.RETRY in got.values():
                    break  # what is left waits for its backoff
        return fates

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
            resp = await self._rpc.call(
                "qpc.v1.Delivery/Enqueue",
                service_pb2.EnqueueRequest(envelopes=[e.to_proto() for e in envs], atomic=True),
                service_pb2.EnqueueResponse,
            )
            results = list(resp.results)
            if [bytes(r.msg_id) for r in results] != [o.msg_id for o in msgs]:
                raise RemoteProtocolError("Enqueue answered results that do not match the batch")
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
        self.stats.send_dropped += 1
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
                for gid in self.ident.groups():
                    g = self.ident.group(gid)
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
            g = await self._mls(self.ident.group, rec.group_id)
        except crypto.UnknownGroup:
            await self._state.call(self._st.commit_finished, commit_id, [], self._wall_ms())
            return set()
        if rec.cancelled:
            await self._mls(g.clear_pending_commit)
            await self._state.call(self._st.commit_finished, commit_id, [], self._wall_ms())
            return set()
        if await self._mls(g.has_pending_commit):  # else: merged before a crash
            await self._mls(g.merge_pending_commit)
        envs: list[Envelope] = []
        conv = await self._state.call(self._st.conversation_by_group, rec.group_id)
        if rec.followup is not None and conv is not None:
            envs = await self._app_envelopes(
                conv, g, client_pb2.AppMessage.FromString(rec.followup)
            )
        await self._state.call(
            self._st.commit_finished,
            commit_id,
            [(e.msg_id, e.encode()) for e in envs],
            self._wall_ms(),
        )
        return {e.msg_id for e in envs}

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
            resp = await self._rpc.call(
                "qpc.v1.Delivery/Enqueue",
                service_pb2.EnqueueRequest(envelopes=[envs[o.msg_id].to_proto() for o in live]),
                service_pb2.EnqueueResponse,
            )
            results = list(resp.results)
            if [bytes(r.msg_id) for r in results] != [o.msg_id for o in live]:
                raise RemoteProtocolError("Enqueue answered results that do not match the batch")
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
            elif code.retriable:
                again.append(o)
                fates[o.msg_id] = Sent.RETRY
            else:
                await self._drop(o, envs[o.msg_id], r.detail or code.name)
                fates[o.msg_id] = Sent.DROPPED
        if done:
            await self._state.call(self._st.outbox_done, done)
        if again:
            await self._retry(again)
        return fates

    async def _retry(self, msgs: list[Outgoing]) -> None:
        self.stats.send_retries += len(msgs)
        await self._state.call(
            self._st.outbox_retry_many, [(o.msg_id, self._backoff(o.attempts)) for o in msgs]
        )

    async def _drop(self, o: Outgoing, env: Envelope, why: str) -> None:
        await self._state.call(self._st.outbox_done, [o.msg_id])
        self.stats.send_dropped += 1
        self._warn(
            f"a message to {short_code(env.recipient.hex())} was not delivered: {why}",
            "outbox message dropped",
        )

    def _backoff(self, attempts: int) -> int:
        lo, hi = OUTBOX_BACKOFF_MS
        cap = min(hi, lo * (2**attempts))
        return self._wall_ms() + int(self._rng.uniform(0, cap))

    # -- receiving ---------------------------------------------------------------
    async def receive(self, wait: float = 0.0) -> list[Incoming]:
        """Fetch, process, store and ack what arrived; long-poll up to ``wait`` seconds.

        A message that cannot be processed yet is held in client.db (the cursor and
        the ack move past it: the node no longer needs to keep it) and retried after
        each message that may unblock it and on every later receive.
        """
        async with self._recv_lock:
            if not self._held_loaded:
                self.stats.held = await self._state.call(self._st.held_count)
                self._held_loaded = True
            cursor = await self._state.call(self._st.cursor)
            resp = await self._rpc.call(
                "qpc.v1.Delivery/Fetch",
                service_pb2.FetchRequest(after_seq=cursor, limit=128, wait_ms=int(wait * 1000)),
                service_pb2.FetchResponse,
                timeout=wait + 15.0,
            )
            out: list[Incoming] = []
            for m in resp.messages:
                if cursor and m.seq != cursor + 1:
                    self.stats.gaps.append((cursor + 1, m.seq))
                    log.warning("mailbox gap", extra={"expected": cursor + 1, "got": m.seq})
                payload = bytes(m.envelope.ciphertext)
                got = await self._handle(m.seq, payload)
                if got is HOLD:
                    await self._hold(m.seq, payload, m.envelope.expiry_ms)
                elif got is None:
                    await self._state.call(self._st.advance_cursor, m.seq)
                    if self.stats.held:
                        # A commit or Welcome may be what a held message waited for.
                        out += await self._retry_held()
                else:
                    await self._state.call(
                        self._st.store_received,
                        m.seq,
                        got.conversation,
                        bytes.fromhex(got.sender),
                        got.text,
                        self._wall_ms(),
                        cursor=m.seq,
                    )
                    out.append(got)
                cursor = m.seq
            if resp.messages:
                await self._rpc.call(
                    "qpc.v1.Delivery/Ack",
                    service_pb2.AckRequest(up_to_seq=cursor),
                    service_pb2.AckResponse,
                )
            if self.stats.held:
                out += await self._retry_held()
            self.stats.received += len(out)
            return out

    async def _hold(self, seq: int, payload: bytes, expiry_ms: int) -> None:
        await self._state.call(self._st.hold, seq, payload, expiry_ms, cursor=seq)
        self.stats.held += 1
        log.info("holding a message for later", extra={"seq": seq})
        if self.stats.held > MAX_HELD:
            oldest = (await self._state.call(self._st.held))[0]
            await self._give_up(oldest.seq, "too many messages waiting for their commit")

    async def _give_up(self, seq: int, why: str) -> None:
        await self._state.call(self._st.held_done, seq)
        self.stats.held -= 1
        self.stats.held_expired += 1
        self._warn(f"a message (mailbox seq {seq}) could not be read: {why}", "held message lost")

    async def _retry_held(self) -> list[Incoming]:
        """Process held messages that have become processable, oldest first."""
        out: list[Incoming] = []
        for _ in range(HELD_PASSES):
            progress = False
            for h in await self._state.call(self._st.held):
                if h.expiry_ms <= self._wall_ms():
                    await self._give_up(h.seq, "its commit never arrived before it expired")
                    continue
                got = await self._handle(h.seq, h.payload)
                if got is HOLD:
                    await self._state.call(self._st.held_tried, h.seq)
                    continue
                progress = True
                self.stats.held -= 1
                if got is None:
                    await self._state.call(self._st.held_done, h.seq)
                    continue
                self.stats.recovered += 1
                await self._state.call(
                    self._st.store_held_received,
                    h.seq,
                    got.conversation,
                    bytes.fromhex(got.sender),
                    got.text,
                    self._wall_ms(),
                )
                out.append(got)
            if not progress:
                break
        return out

    async def _handle(self, seq: int, padded: bytes) -> Incoming | _Later | None:
        """Process one delivered payload.

        Returns the text for the user, None when it carries none (or can never be
        processed: counted and reported), or HOLD when it cannot be processed *yet*
        (its group's Welcome or the commit to its epoch has not arrived).
        """
        try:
            sealed = client_pb2.Sealed.FromString(unpad(padded))
            if sealed.kind == client_pb2.Sealed.WELCOME:
                await self._joined(await self._mls(self.ident.join, sealed.data))
                return None
            if sealed.kind != client_pb2.Sealed.MLS_MESSAGE:
                raise RemoteProtocolError(f"unknown sealed kind {sealed.kind}")
            try:
                g = await self._mls(self.ident.group, sealed.group_id)
            except crypto.UnknownGroup:
                return HOLD  # its Welcome may still be on the way
            try:
                ev = await self._mls(g.process, sealed.data)
            except crypto.WrongEpoch:
                if await self._from_future(g, sealed.data):
                    return HOLD
                raise
        except (crypto.MlsError, RemoteProtocolError, DecodeError) as exc:
            self._unreadable(seq, type(exc).__name__)
            return None
        conv = await self._state.call(self._st.conversation_by_group, bytes(sealed.group_id))
        if ev.kind != "application" or conv is None:
            if ev.kind == "commit" and conv is not None and not await self._mls(_active, g):
                self._warn(f"you were removed from {conv.name!r}")
                await self._state.call(self._st.drop_conversation, conv.name)
            return None
        return await self._application(conv, g, ev)

    async def _from_future(self, g: crypto.Group, message: bytes) -> bool:
        """True when ``message`` is from an epoch this (active) group has not reached."""
        try:
            header = parse_header(message)
        except InvalidMlsHeader:
            return False

        def ahead() -> bool:
            return g.is_active and header.epoch > g.epoch

        return await self._mls(ahead)

    def _unreadable(self, seq: int, why: str) -> None:
        self.stats.undecryptable += 1
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
        sender = bytes.fromhex(ev.sender)
        which = app.WhichOneof("body")
        if which == "text":
            return Incoming(0, conv.name, ev.sender, app.text)
        if which == "info" and not conv.committer:
            await self._describe(conv, sender, app.info)
        elif (
            which == "leave"
            and conv.committer == self.me
            and ev.sender in await self._mls(g.members)
        ):
            try:
                await self._commit_removal(conv, g, ev.sender)
            except AgentError as exc:  # refused or blocked: the member asks again
                self._warn(
                    f"{short_code(ev.sender)} asked to leave {conv.name!r}: {exc}",
                    "leave request not applied",
                )
        return None

    async def _describe(
        self, conv: Conversation, sender: bytes, info: client_pb2.GroupInfo
    ) -> None:
        # Only the member who sent the Welcome's follow-up names the group; it is
        # authenticated by MLS (ev.sender), not by anything a node could forge.
        if bytes(info.committer) != sender:
            return
        await self._note_contact(sender)
        base = short_code(sender.hex()) if info.direct else (info.name or conv.name)
        name = await self._free_name(base)
        await self._state.call(
            self._st.describe_conversation,
            conv.group_id,
            name=name,
            direct=info.direct,
            peer=sender if info.direct else None,
            committer=sender,
        )


def _status(value: int) -> StatusCode:
    """A wire status as our enum; a number we do not know counts as UNKNOWN (permanent)."""
    try:
        return StatusCode(value)
    except ValueError:
        return StatusCode.UNKNOWN


def _active(g: crypto.Group) -> bool:
    return g.is_active
