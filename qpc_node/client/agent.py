"""A user's agent: MLS identity + local state + an authenticated session on its node.

``Agent`` is the facade the REPL, ``qpc`` and the tests use. It owns the session
(authentication), the user's conversations and groups, and wires the parts that
do the rest, each in its own module:

- :mod:`.outbox`: the send path. Envelopes go to the durable outbox, then out in
  a batch Enqueue, each message with its own fate; a commit's fan-out goes
  all-or-nothing and the commit is merged only once the node stored it.
- :mod:`.inbox`: the receive path. Fetch, process with MLS, store, ack; what
  cannot be processed *yet* is held in client.db and retried.
- :mod:`.keypackages`: keeps the node's pool of our KeyPackages topped up.
- :mod:`.mls_worker`: runs every MLS call on a worker thread, one at a time, so
  the node sharing the process (``qpc``) keeps its timers.

Group changes (docs/groups.md): any member asks for them as MLS proposals with an
intent id (:mod:`.groups` drives the sans-IO core in qpc_node/groups/core.py); the
first member of the group's committer list commits them, the next one takes over
when it stays silent, so two members rarely race commits for the same epoch. The
inbox hands proposals, commits and group-control messages back here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec

from qpc_node import crypto
from qpc_node.client.agent_types import AgentContext, AgentError, AgentStatistics, Incoming
from qpc_node.client.branches import Branches
from qpc_node.client.channels import BroadcastReport, Channels, parse_secret, secret_text
from qpc_node.client.contacts import Known
from qpc_node.client.contacts import resolve as resolve_peer
from qpc_node.client.fingerprint import short_code
from qpc_node.client.groups import GroupDriver, GroupView
from qpc_node.client.inbox import Inbox, Later
from qpc_node.client.keypackages import KP_LOW_WATER, KP_ROTATE_MS, KP_TARGET, top_up_key_packages
from qpc_node.client.mls_worker import MlsWorker
from qpc_node.client.outbox import Outbox, Sent
from qpc_node.client.session import ServerId, dial_order
from qpc_node.client.state import (
    AsyncClientState,
    ClientStateError,
    Contact,
    Conversation,
    KnownNode,
    Received,
)
from qpc_node.errors import LocalProtocolError, RemoteProtocolError, StatusCode
from qpc_node.groups.core import GroupConfig, IntentKind, topped_up
from qpc_node.mesh.routing import sign_binding
from qpc_node.ops.log import get_logger
from qpc_node.ops.metrics import Sample
from qpc_node.rpc.client import ClientStatistics, RpcClient
from qpc_node.rpc.errors import RpcError
from qpc_node.service.auth import auth_message
from qpc_node.service.stats import STATS_METHOD, samples_from_proto
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import client_pb2, ops_pb2, service_pb2

__all__ = [
    "KP_LOW_WATER",
    "KP_ROTATE_MS",
    "KP_TARGET",
    "Agent",
    "AgentError",
    "AgentStatistics",
    "DmReport",
    "GroupView",
    "Incoming",
    "Sent",
]
"""The agent's public names; the KeyPackage constants stay importable from here."""

log = get_logger("qpc.client")


class DmReport(msgspec.Struct, frozen=True):
    """What became of a DM: for ``/mesh dm`` (sent / relayed via N hops / queued)."""

    conversation: str
    fate: Sent
    hops: int
    """Node-to-node hops to the recipient's home (0: stored on our node, or unknown)."""
    detail: str
    """The node's reason when it is queued."""
    stored_here: bool = True
    """Delivered into a mailbox on our node (else taken into its custody for relay)."""
    held: bool = False
    """Taken, but no route to the recipient's home yet: held on our node (storefwd)."""


HOME_TTL_MS = 2 * 24 * 3600 * 1000  # a home binding's lifetime; re-signed at every login


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
        group_config: GroupConfig | None = None,
    ) -> None:
        """``mls_in_thread``: see :class:`MlsWorker` (False only for the stall bench);
        ``group_config``: timings of the group protocol (committer failover, ...)."""
        self.ident = ident
        self.me = bytes.fromhex(ident.fingerprint)
        self._state = state
        self._st = state.sync
        self._rpc = rpc
        self._node_fpr = node_cert_fingerprint
        self._wall_ms = wall_ms
        self.stats = AgentStatistics()
        self.on_warning: Callable[[str], None] = lambda _m: None
        self._mls = MlsWorker(in_thread=mls_in_thread)
        self.node: bytes = b""
        self._home_seq = 0
        """The node we are logged in on: its mesh id (or its certificate fingerprint
        when it has no Ed25519 key); b"" until the first login that names it."""
        self._ctx = AgentContext(
            ident, state, rpc, self._mls, wall_ms, self.stats, self._warn, lambda: self.node
        )
        config = group_config or GroupConfig()
        self._branches = Branches(self._ctx, retain_ms=config.max_expiry_ms)
        self._mls.before_first_call(self._branches.restore)
        self._outbox = Outbox(
            self._ctx,
            rng=rng or random.Random(),
            merged=self._merged,
            welcome_lost=lambda gid, who: self._groups.welcome_lost(gid, who),
            merge=self._branches.merge_own,
            sent_text=self._branches.note_text,
        )
        self._groups = GroupDriver(
            self._ctx, self._outbox, self._fetch_key_package, config, self._branches
        )
        self._inbox = Inbox(
            self._ctx,
            control=self._group_control,
            events=self._groups.on_event,
            future=self._groups.on_future,
            branches=self._branches,
            offer=self._groups.on_offer,
        )
        self._channels = Channels(self._ctx)

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

    async def mesh_trust(self, fingerprint: str) -> ops_pb2.MeshTrustResponse:
        """Accept a node's (changed) federation key: /mesh trust, ``qpc trust``. The
        node answers only over loopback (the operator on its own machine)."""
        return await self._rpc.call(
            "qpc.v1.Node/MeshTrust",
            ops_pb2.MeshTrustRequest(fingerprint=fingerprint),
            ops_pb2.MeshTrustResponse,
        )

    # -- session ---------------------------------------------------------------
    async def authenticate(
        self, rpc: RpcClient | None = None, server: ServerId | None = None
    ) -> None:
        """Prove our identity to the node; ``rpc``: over a new connection (reconnect);
        ``server``: who that connection reached (another node after a move: the proof
        is bound to its certificate, and its mailbox has its own cursor)."""
        rpc = rpc or self._rpc
        cert_fpr = server.cert_fingerprint if server is not None else self._node_fpr
        ch = await rpc.call(
            "qpc.v1.Auth/Challenge",
            service_pb2.AuthChallengeRequest(),
            service_pb2.AuthChallengeResponse,
        )
        sig = self.ident.sign(auth_message(ch.nonce, cert_fpr))
        prove = service_pb2.AuthProveRequest(public_key=self.ident.public_key, signature=sig)
        if len(ch.node_id) == 32:  # a mesh node: home us there (the node spreads it)
            # seq = now, and above the last one we signed: a later login (here or on
            # another node, even within the same millisecond) always outranks it.
            now = self._wall_ms()
            self._home_seq = max(now, self._home_seq + 1)
            prove.home.CopyFrom(
                sign_binding(
                    self.ident.public_key,
                    self.ident.sign,
                    ch.node_id,
                    self._home_seq,
                    now + HOME_TTL_MS,
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
        if server is not None:
            self._node_fpr = server.cert_fingerprint
            if server.key != self.node:
                await self._state.call(self._st.claim_cursor, server.key)
                self.node = server.key

    # -- the nodes we know (for /mesh auto and failover) -------------------------
    async def refresh_nodes(self, here: ServerId | None = None) -> ops_pb2.MeshResponse:
        """Ask our node for its peers and remember them (node id, address, RTT), so we
        can move to one of them, and fail over when our node is already dead."""
        resp = await self.mesh_status()
        now = self._wall_ms()
        if here is not None and here.node_id is not None and here.address:
            await self._state.call(self._st.remember_node, here.node_id, [here.address], None, now)
        for p in resp.peers:
            nid = bytes(p.node_id)
            addresses = dial_order(list(p.addresses) or [p.address])
            if len(nid) == 32 and addresses:
                rtt = p.srtt_ms if p.srtt_ms > 0 else None
                await self._state.call(self._st.remember_node, nid, addresses, rtt, now)
        return resp

    async def remember_rtt(self, node_id: bytes, address: str, rtt_ms: float) -> None:
        """A handshake time we measured ourselves (``/mesh auto``)."""
        await self._state.call(self._st.remember_node, node_id, [address], rtt_ms, self._wall_ms())

    async def known_nodes(self) -> list[KnownNode]:
        return await self._state.call(self._st.nodes)

    async def node_result(self, node_id: bytes, *, ok: bool) -> None:
        await self._state.call(self._st.node_result, node_id, ok=ok)

    # -- contacts ----------------------------------------------------------------
    async def contacts(self) -> list[Contact]:
        return await self._state.call(self._st.contacts)

    async def resolve_peer(self, token: str) -> str:
        """A fingerprint, a contact name or a unique short code of a known user -> the
        fingerprint (typed errors: UnknownPeer, AmbiguousPeer listing the matches)."""
        known = [Known(c.fingerprint.hex(), c.name) for c in await self.contacts()]
        return resolve_peer(token, known)

    async def contact_add(self, name: str, token: str) -> str:
        fpr = await self.resolve_peer(token)
        if fpr == self.ident.fingerprint:
            raise AgentError("that is your own fingerprint")
        peer = bytes.fromhex(fpr)
        await self._note_contact(peer)
        try:
            await self._state.call(self._st.name_contact, name, peer, self._wall_ms())
        except ClientStateError as exc:
            raise AgentError(str(exc)) from None
        return fpr

    async def contact_remove(self, name: str) -> str:
        fpr = await self._state.call(self._st.unname_contact, name)
        if fpr is None:
            raise AgentError(f"no contact named {name!r}")
        return fpr.hex()

    async def top_up_key_packages(self) -> int:
        """Keep the node's pool of our KeyPackages between low water and target.

        Also refreshes the pool at half its 24 h lifetime and keeps one
        last-resort package there, so we stay invitable while offline.
        """
        return await top_up_key_packages(self._ctx)

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
        return (await self.dm_report(peer_hex, text)).conversation

    async def dm_report(self, peer_hex: str, text: str) -> DmReport:
        """``dm``, and what the node said of it: stored, relayed toward a home N hops
        away, or queued (no route yet; the outbox retries)."""
        peer = bytes.fromhex(peer_hex)
        if peer == self.me:
            raise LocalProtocolError("cannot DM yourself")
        conv = await self._state.call(self._st.direct_with, peer)
        if conv is None:
            conv = await self._start_direct(peer)
        fates = await self._send_text(conv, text)
        (msg_id, fate), *_ = fates.items()
        route = self._outbox.routes.get(msg_id)
        return DmReport(
            conv.name,
            fate,
            route.hops if route is not None else 0,
            route.detail if route is not None else "",
            route is None or route.stored_here,
            route is not None and route.held,
        )

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

    async def group_invite(self, name: str, peer_hex: str) -> str:
        """Add ``peer``: "invited" when we commit it (the first committer), else
        "requested" (a proposal the committer applies; re-proposed until it does)."""
        conv, g = await self._conversation(name)
        peer = bytes.fromhex(peer_hex)
        if peer_hex in await self._mls(g.members):
            raise AgentError(f"{short_code(peer_hex)} is already in {name!r}")
        await self._note_contact(peer)
        if not await self._is_first_committer(conv, g):
            await self._groups.request(conv, g, IntentKind.ADD, peer_hex)
            return "requested"
        kp = await self._fetch_key_package(peer)
        await self._invite(conv, g, peer, kp)
        return "invited"

    async def _is_first_committer(self, conv: Conversation, g: crypto.Group) -> bool:
        core = await self._groups.core(conv, g)
        return core.committers[:1] == (self.ident.fingerprint,)

    async def _committers_update(self, conv: Conversation, g: crypto.Group) -> list[str] | None:
        """The committer list our commit should write (None: the stored one is fine)."""
        core = await self._groups.core(conv, g)
        want = topped_up(core.stored_committers, core.members, core.config.max_committers)
        return None if want == core.stored_committers else list(want)

    async def _invite(self, conv: Conversation, g: crypto.Group, peer: bytes, kp: bytes) -> None:
        before = await self._outbox.others(g)
        committers = await self._committers_update(conv, g)
        with self._no_pending_commit(conv):
            commit, welcome = await self._mls(g.add, [kp], committers)
        tag = await self._mls(self._branches.own_commit, conv.group_id, g, commit, self._wall_ms())
        envs = self._outbox.to_each(before, conv.group_id, commit, branch=tag)
        # Encrypted in the new epoch (the joiner has no other), so after the merge,
        # like the Welcome (the outbox sends both once the node stored the commit).
        info = client_pb2.AppMessage(
            info=client_pb2.GroupInfo(
                name=conv.name if not conv.direct else "", direct=conv.direct, committer=self.me
            )
        )
        await self._outbox.send_commit(
            conv, envs, followup=info, welcome=welcome, roster=[*before, self.me]
        )
        await self._groups.timers()

    async def group_send(self, name: str, text: str) -> None:
        conv, _ = await self._conversation(name)
        await self._send_text(conv, text)

    async def group_members(self, name: str) -> list[str]:
        _, g = await self._conversation(name)
        return list(await self._mls(g.members))

    async def group_remove(self, name: str, peer_hex: str) -> str:
        """Remove ``peer``: "removed" when we commit it, else "requested"."""
        conv, g = await self._conversation(name)
        if peer_hex not in await self._mls(g.members):
            raise AgentError(f"{short_code(peer_hex)} is not in {name!r}")
        if peer_hex == self.ident.fingerprint:
            await self.group_leave(name)
            return "left"
        if not await self._is_first_committer(conv, g):
            await self._groups.request(conv, g, IntentKind.REMOVE, peer_hex)
            return "requested"
        await self._commit_removal(conv, g, peer_hex)
        return "removed"

    async def group_leave(self, name: str) -> None:
        """Leave: a proposal to remove us (the first committer hands its role over
        first), plus a LeaveRequest for committers that predate proposals."""
        conv, g = await self._conversation(name)
        if len(await self._mls(g.members)) > 1:
            iid = await self._groups.request(conv, g, IntentKind.LEAVE)
            core = await self._groups.core(conv, g)
            if any(i.intent_id == iid and i.epoch < 0 for i in core.intents()):
                raise AgentError(
                    f"you commit changes for {name!r}: handing that over is still waiting"
                    " for the node; /group leave again once it is delivered"
                )
            with self._no_pending_commit(conv):
                envs = await self._outbox.app_envelopes(
                    conv, g, client_pb2.AppMessage(leave=client_pb2.LeaveRequest())
                )
            await self._outbox.submit(envs)
        await self._state.call(self._st.drop_conversation, name)
        self._groups.forget(conv.group_id)

    async def group_info(self, name: str) -> GroupView:
        """Epoch, committer list, pending requests, forward-secrecy exposure."""
        conv, g = await self._conversation(name)
        return await self._groups.view(conv, g)

    async def group_update(self, name: str) -> None:
        """Refresh our leaf keys (post-compromise security): a proposal, or our commit."""
        conv, g = await self._conversation(name)
        await self._groups.request(conv, g, IntentKind.UPDATE)

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
    async def _send_text(self, conv: Conversation, text: str) -> dict[bytes, Sent]:
        g = await self._mls(self.ident.group, conv.group_id)
        msg = client_pb2.AppMessage(text=text, sent_ms=self._wall_ms())
        with self._no_pending_commit(conv):
            envs = await self._outbox.app_envelopes(conv, g, msg)
        if not envs:
            raise AgentError(f"{conv.name!r} has no other members yet")
        fates = await self._outbox.submit(envs)
        self.stats.sent += 1
        return {e.msg_id: fates.get(e.msg_id, Sent.RETRY) for e in envs}

    async def _commit_removal(self, conv: Conversation, g: crypto.Group, member: str) -> None:
        """Remove ``member`` and tell everyone who was in the group, the removed one too."""
        recipients = await self._outbox.others(g)
        committers = await self._committers_update(conv, g)
        if committers is not None and member in committers:
            committers = [c for c in committers if c != member]
        with self._no_pending_commit(conv):
            commit = await self._mls(g.remove, [member], committers)
        tag = await self._mls(self._branches.own_commit, conv.group_id, g, commit, self._wall_ms())
        await self._outbox.send_commit(
            conv, self._outbox.to_each(recipients, conv.group_id, commit, branch=tag), None
        )
        await self._groups.timers()

    async def _merged(self, group_id: bytes, ev: crypto.Event | None) -> None:
        await self._groups.merged(group_id, ev)

    @contextmanager
    def _no_pending_commit(self, conv: Conversation) -> Iterator[None]:
        try:
            yield
        except crypto.PendingCommit:
            raise AgentError(
                f"a change to {conv.name!r} is still waiting for the node to take it;"
                " it applies once delivered (the outbox retries it): try again then"
            ) from None

    # -- the outbox (kept on the facade: tests drive the send path through these) --
    def _envelope(
        self, recipient: bytes, kind: client_pb2.Sealed.Kind, gid: bytes, data: bytes
    ) -> Envelope:
        return self._outbox.envelope(recipient, kind, gid, data)

    async def _submit(self, envs: list[Envelope]) -> dict[bytes, Sent]:
        """Queue ``envs`` durably, then flush: what became of each of them."""
        return await self._outbox.submit(envs)

    async def flush_outbox(self) -> int:
        """Send what the outbox holds that is due; return how many are still queued.

        Each message has its own fate (see :class:`Outbox`): delivered, retried with
        backoff and jitter, or dropped with a warning when the node refuses it for
        good. A failure of the whole call re-raises after scheduling the retries.
        """
        return await self._outbox.flush_outbox()

    # -- receiving -------------------------------------------------------------
    async def receive(self, wait: float = 0.0) -> list[Incoming]:
        """Fetch, process, store and ack what arrived; long-poll up to ``wait`` seconds
        (see :class:`Inbox`: what cannot be processed yet is held and retried).

        With channels joined, the messages of those channels too: the mailbox is read
        without waiting, then the long-poll is a Channel/Fetch, which the node also
        answers when mail for us arrives (read right after). One call waits for both.
        """
        try:
            return await self._receive(wait)
        finally:
            await self._groups.timers()

    async def _receive(self, wait: float) -> list[Incoming]:
        if self._channels.unsupported or not await self._channels.joined():
            return await self._inbox.receive(wait)
        out = await self._inbox.receive(0)
        got = await self._channels.receive(0 if out else wait)
        if wait > 0 and not out and not got and not self._channels.unsupported:
            out = await self._inbox.receive(0)  # woken by mail (or the wait ended)
        elif self._channels.unsupported and not out:
            out = await self._inbox.receive(wait)
        return out + got

    # -- broadcast channels ------------------------------------------------------
    async def channel_create(self, name: str) -> str:
        """Create and join a channel; its secret as text (share it out of band)."""
        try:
            return secret_text(await self._channels.create(name))
        except ClientStateError as exc:
            raise AgentError(str(exc)) from None

    async def channel_join(self, name: str, secret: str) -> None:
        try:
            await self._channels.join(name, parse_secret(secret))
        except ClientStateError as exc:
            raise AgentError(str(exc)) from None

    async def channel_leave(self, name: str) -> None:
        await self._channels.leave(name)

    async def channel_list(self) -> list[tuple[str, bytes]]:
        """(name, channel id) of each joined channel."""
        return [(n, cid) for n, cid, _ in await self._channels.joined()]

    async def broadcast(self, name: str, text: str) -> BroadcastReport:
        """Seal ``text`` for channel ``name`` and publish it through our node."""
        return await self._channels.broadcast(name, text)

    async def _handle(self, seq: int, padded: bytes) -> Incoming | Later | None:
        """Process one delivered payload: the path ``receive`` runs for each (fuzzed)."""
        return await self._inbox.handle(seq, padded)

    async def _group_control(
        self, conv: Conversation, g: crypto.Group, sender_hex: str, app: client_pb2.AppMessage
    ) -> None:
        """What a received GroupInfo, LeaveRequest, GroupIntent or CommitPull does."""
        sender = bytes.fromhex(sender_hex)
        which = app.WhichOneof("body")
        if which == "info" and not conv.committer:
            await self._describe(conv, sender, app.info)
        elif which in ("intent", "pull", "catch_up"):
            await self._groups.on_app(conv, g, sender_hex, app)
        elif (
            which == "leave"
            and await self._is_first_committer(conv, g)
            and sender_hex in await self._mls(g.members)
        ):
            # Our own removal request (a proposal we commit, re-proposed until it
            # is applied): the leaver's own proposal may be lost with its epoch, and
            # it no longer follows the group to propose it again.
            try:
                await self._groups.request(conv, g, IntentKind.REMOVE, sender_hex)
            except AgentError as exc:  # already requested (or no longer a member)
                log.info("leave request", extra={"err": str(exc)})
            await self._groups.commit_now(conv, g)

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
