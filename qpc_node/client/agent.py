"""A user's agent: MLS identity + local state + an authenticated session on its node.

Flow of a send: encrypt with MLS, wrap in ``Sealed``, pad to 256-byte buckets,
put one Envelope per recipient in the durable outbox, then flush the outbox
with a batch Enqueue (idempotent on msg_id, so a retry never duplicates).
Flow of a receive: Fetch after the local cursor (long-poll), process each
message with MLS, store the text, advance the cursor, then Ack.

Group changes have one committer per group, its creator (documented in
docs/client.md): others ask it (a LeaveRequest inside MLS) rather than commit
themselves, so two members never race commits for the same epoch.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from google.protobuf.message import DecodeError

from qpc_node import crypto
from qpc_node.client.fingerprint import short_code
from qpc_node.client.state import AsyncClientState, Conversation, Received
from qpc_node.errors import LocalProtocolError, QpcError, RemoteProtocolError, StatusCode
from qpc_node.ops.log import get_logger
from qpc_node.ops.metrics import Sample
from qpc_node.rpc.client import ClientStatistics, RpcClient
from qpc_node.rpc.errors import RpcError
from qpc_node.service.auth import auth_message
from qpc_node.service.stats import STATS_METHOD, samples_from_proto
from qpc_node.wire.envelope import DEFAULT_HOP_LIMIT, Envelope, pad, unpad
from qpc_node.wire.gen.qpc.v1 import client_pb2, ops_pb2, service_pb2

log = get_logger("qpc.client")

RETENTION_MS = 7 * 24 * 3600 * 1000
KP_TARGET = 16
KP_LOW_WATER = 6
KP_ROTATE_MS = 12 * 3600 * 1000  # packages live 24 h on the node: refresh at half-life
OUTBOX_BACKOFF_MS = (500, 60_000)


class AgentError(QpcError):
    code = StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True, slots=True)
class Incoming:
    seq: int
    conversation: str
    sender: str  # fingerprint hex
    text: str


@dataclass(slots=True)
class AgentStatistics:
    sent: int = 0
    received: int = 0
    undecryptable: int = 0
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
    ) -> None:
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

    async def unshown(self) -> list[Received]:
        """Stored texts not yet shown to the user (marks them shown)."""
        return await self._state.call(self._st.unshown)

    def rpc_statistics(self) -> ClientStatistics:
        return self._rpc.statistics()

    async def node_stats(self) -> list[Sample]:
        """The node's aggregate numbers (what /metrics shows), for /stats."""
        resp = await self._rpc.call(STATS_METHOD, ops_pb2.StatsRequest(), ops_pb2.StatsResponse)
        return samples_from_proto(resp)

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
        resp = await rpc.call(
            "qpc.v1.Auth/Prove",
            service_pb2.AuthProveRequest(public_key=self.ident.public_key, signature=sig),
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
            return conv, self.ident.group(conv.group_id)
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
        g = self.ident.create_group()
        name = await self._free_name(short_code(peer.hex()))
        conv = Conversation(name, bytes(g.group_id), True, peer, self.me)
        await self._state.call(self._st.add_conversation, conv, self._wall_ms())
        await self._invite(conv, g, peer, kp)
        return conv

    async def group_create(self, name: str) -> None:
        if await self._state.call(self._st.conversation, name) is not None:
            raise AgentError(f"a conversation named {name!r} exists")
        g = self.ident.create_group()
        conv = Conversation(name, bytes(g.group_id), False, None, self.me)
        await self._state.call(self._st.add_conversation, conv, self._wall_ms())

    async def group_invite(self, name: str, peer_hex: str) -> None:
        conv, g = await self._conversation(name)
        self._must_commit(conv)
        peer = bytes.fromhex(peer_hex)
        if peer_hex in g.members():
            raise AgentError(f"{short_code(peer_hex)} is already in {name!r}")
        await self._note_contact(peer)
        kp = await self._fetch_key_package(peer)
        await self._invite(conv, g, peer, kp)

    async def _invite(self, conv: Conversation, g: crypto.Group, peer: bytes, kp: bytes) -> None:
        before = self._others(g)
        commit, welcome = g.add([kp])
        envs = self._to_each(before, conv.group_id, commit)
        envs.append(self._envelope(peer, client_pb2.Sealed.WELCOME, conv.group_id, welcome))
        info = client_pb2.AppMessage(
            info=client_pb2.GroupInfo(
                name=conv.name if not conv.direct else "", direct=conv.direct, committer=self.me
            )
        )
        envs += self._app_envelopes(conv, g, info)
        await self._submit(envs)

    async def group_send(self, name: str, text: str) -> None:
        conv, _ = await self._conversation(name)
        await self._send_text(conv, text)

    async def group_members(self, name: str) -> list[str]:
        _, g = await self._conversation(name)
        return list(g.members())

    async def group_remove(self, name: str, peer_hex: str) -> None:
        conv, g = await self._conversation(name)
        self._must_commit(conv)
        if peer_hex not in g.members():
            raise AgentError(f"{short_code(peer_hex)} is not in {name!r}")
        await self._commit_removal(conv, g, peer_hex)

    async def group_leave(self, name: str) -> None:
        conv, g = await self._conversation(name)
        if conv.committer == self.me:
            raise AgentError(
                f"you commit changes for {name!r}: remove the others first (one committer per group)"
            )
        await self._submit(
            self._app_envelopes(conv, g, client_pb2.AppMessage(leave=client_pb2.LeaveRequest()))
        )
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

    def _warn(self, msg: str) -> None:
        self.stats.warnings.append(msg)
        log.warning("contact key warning")
        self.on_warning(msg)

    # -- sending ---------------------------------------------------------------
    async def _send_text(self, conv: Conversation, text: str) -> None:
        g = self.ident.group(conv.group_id)
        msg = client_pb2.AppMessage(text=text, sent_ms=self._wall_ms())
        envs = self._app_envelopes(conv, g, msg)
        if not envs:
            raise AgentError(f"{conv.name!r} has no other members yet")
        await self._submit(envs)
        self.stats.sent += 1

    def _others(self, g: crypto.Group) -> list[bytes]:
        """Every member but us: who gets a copy of what we send to the group."""
        return [bytes.fromhex(m) for m in g.members() if m != self.ident.fingerprint]

    def _to_each(self, recipients: list[bytes], gid: bytes, mls_message: bytes) -> list[Envelope]:
        return [
            self._envelope(m, client_pb2.Sealed.MLS_MESSAGE, gid, mls_message) for m in recipients
        ]

    async def _commit_removal(self, conv: Conversation, g: crypto.Group, member: str) -> None:
        """Remove ``member`` and tell everyone who was in the group, the removed one too."""
        recipients = self._others(g)
        await self._submit(self._to_each(recipients, conv.group_id, g.remove([member])))

    def _app_envelopes(
        self, conv: Conversation, g: crypto.Group, msg: client_pb2.AppMessage
    ) -> list[Envelope]:
        return self._to_each(self._others(g), conv.group_id, g.encrypt(msg.SerializeToString()))

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

    async def _submit(self, envs: list[Envelope]) -> None:
        batch = [(e.msg_id, e.encode()) for e in envs]
        await self._state.call(self._st.outbox_add_many, batch, self._wall_ms())
        await self.flush_outbox()

    async def flush_outbox(self) -> int:
        """Send what the outbox holds that is due; return how many are still queued.

        Retriable failures stay queued with backoff and jitter; a message the node
        refuses for good (unknown recipient, bad input) is dropped with a warning.
        """
        async with self._send_lock:
            due = await self._state.call(self._st.outbox_due, self._wall_ms())
            if due:
                try:
                    await self._rpc.call(
                        "qpc.v1.Delivery/Enqueue",
                        service_pb2.EnqueueRequest(
                            envelopes=[Envelope.decode(o.envelope).to_proto() for o in due]
                        ),
                        service_pb2.EnqueueResponse,
                    )
                except RpcError as exc:
                    if exc.code.retriable:
                        for o in due:
                            await self._state.call(
                                self._st.outbox_retry_at, o.msg_id, self._backoff(o.attempts)
                            )
                    else:
                        await self._state.call(self._st.outbox_done, [o.msg_id for o in due])
                    raise
                await self._state.call(self._st.outbox_done, [o.msg_id for o in due])
            return await self._state.call(self._st.outbox_len)

    def _backoff(self, attempts: int) -> int:
        lo, hi = OUTBOX_BACKOFF_MS
        cap = min(hi, lo * (2**attempts))
        return self._wall_ms() + int(self._rng.uniform(0, cap))

    # -- receiving ---------------------------------------------------------------
    async def receive(self, wait: float = 0.0) -> list[Incoming]:
        """Fetch, process, store and ack what arrived; long-poll up to ``wait`` seconds."""
        async with self._recv_lock:
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
                got = await self._handle(m.seq, bytes(m.envelope.ciphertext))
                if got is None:
                    await self._state.call(self._st.advance_cursor, m.seq)
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
            self.stats.received += len(out)
            return out

    async def _handle(self, seq: int, padded: bytes) -> Incoming | None:
        """Process one delivered payload; None when it carries no text for the user."""
        try:
            sealed = client_pb2.Sealed.FromString(unpad(padded))
            if sealed.kind == client_pb2.Sealed.WELCOME:
                await self._joined(self.ident.join(sealed.data))
                return None
            if sealed.kind != client_pb2.Sealed.MLS_MESSAGE:
                raise RemoteProtocolError(f"unknown sealed kind {sealed.kind}")
            g = self.ident.group(sealed.group_id)
            ev = g.process(sealed.data)
        except (crypto.MlsError, RemoteProtocolError, DecodeError) as exc:
            self.stats.undecryptable += 1
            log.info("dropped undecryptable message", extra={"seq": seq, "err": type(exc).__name__})
            return None
        conv = await self._state.call(self._st.conversation_by_group, bytes(sealed.group_id))
        if ev.kind != "application" or conv is None:
            if ev.kind == "commit" and conv is not None and not g.is_active:
                self._warn(f"you were removed from {conv.name!r}")
                await self._state.call(self._st.drop_conversation, conv.name)
            return None
        return await self._application(conv, g, ev)

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
            self.stats.undecryptable += 1
            return None
        sender = bytes.fromhex(ev.sender)
        which = app.WhichOneof("body")
        if which == "text":
            return Incoming(0, conv.name, ev.sender, app.text)
        if which == "info" and not conv.committer:
            await self._describe(conv, sender, app.info)
        elif which == "leave" and conv.committer == self.me and ev.sender in g.members():
            await self._commit_removal(conv, g, ev.sender)
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
