"""Executes REPL commands against an Agent; script mode and interactive mode.

Script mode (``qpc repl --script FILE``) runs lines in order and stops with a
non-zero status at the first failing command, so scripts and tests can rely
on it. Interactive mode runs prompt_toolkit in its own thread (it blocks) and
prints arriving messages above the prompt.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable

import trio

from qpc_node.client.agent import Agent, DmReport, GroupView
from qpc_node.client.channels import parse_secret, secret_qr, secret_text
from qpc_node.client.fingerprint import grouped, qr_terminal, short_code
from qpc_node.client.outbox import Sent
from qpc_node.client.reconnect import Notice
from qpc_node.client.session import Session, Target, parse_address
from qpc_node.errors import LocalProtocolError, QpcError
from qpc_node.ops.metrics import format_stats
from qpc_node.quic import ALPN_CLIENT, ClientTLS
from qpc_node.repl import commands as c
from qpc_node.repl.commands import USAGE, UsageError, parse
from qpc_node.wire.gen.qpc.v1 import ops_pb2

Out = Callable[[str], None]
RECEIVE_POLL = 20.0
COMMAND_WAIT = 10.0
"""How long a command typed while the session reconnects waits for it before failing.

Long enough to ride out a node restart, short enough that the prompt never
seems hung; a command that gives up has sent and queued nothing."""


def safety_number(a: str, b: str) -> str:
    """60 digits both sides compute alike (order-independent), read in 12 groups of 5."""
    digest = hashlib.sha256(
        b"qpc-safety-v1" + b"".join(sorted((bytes.fromhex(a), bytes.fromhex(b))))
    ).digest()
    digits = str(int.from_bytes(digest, "big")).zfill(78)[:60]
    return " ".join(digits[i : i + 5] for i in range(0, 60, 5))


def describe_group(v: GroupView, me: str) -> list[str]:
    """``/group info``: epoch, committer list, pending requests, forward-secrecy exposure."""
    st = v.statistics

    def who(f: str) -> str:
        return short_code(f) + (" (you)" if f == me else "")

    lines = [
        f"{v.name}: epoch {v.epoch}, {v.members} members",
        "  committers: " + ", ".join(who(f) for f in v.committers),
    ]
    if v.authenticator:
        # Compare across members: equal on every member that is on the same branch.
        lines.append(f"  authenticator: {v.authenticator[:8].hex()}")
    for i in v.mine:
        target = f" {short_code(i.target)}" if i.target else ""
        state = f"proposed at epoch {i.epoch}" if i.epoch >= 0 else "waiting"
        lines.append(f"  your request: {i.kind.value}{target} ({state}, attempt {i.attempts})")
    for sender, n in v.others:
        target = f" {short_code(n.target)}" if n.target else ""
        lines.append(f"  request by {who(sender)}: {n.kind.value}{target}")
    if not v.mine and not v.others:
        lines.append("  no pending requests")
    hours = st.fs_exposure_ms / 3_600_000
    lines.append(
        f"  past epochs kept: {st.past_epochs_kept} (forward-secrecy exposure {hours:.1f} h)"
    )
    return lines


HELP = "\n".join(
    f"  {USAGE[k]}"
    for k in (
        "whoami",
        "dm",
        "group create",
        "group invite",
        "group send",
        "group members",
        "group info",
        "group update",
        "group leave",
        "group remove",
        "inbox",
        "verify",
        "contact add",
        "contact remove",
        "contacts",
        "channel create",
        "channel join",
        "channel list",
        "channel leave",
        "mesh",
        "mesh server",
        "mesh auto",
        "mesh broadcast",
        "stats",
        "help",
        "quit",
    )
)


class Quit(Exception):
    """Raised by /quit to end the session."""


# Commands that work without the node; every other one needs the session up.
_LOCAL = (
    c.Help,
    c.WhoAmI,
    c.GroupCreate,
    c.GroupMembers,
    c.Verify,
    c.Quit,
    c.ContactAdd,
    c.ContactRemove,
    c.Contacts,
    c.ChannelCreate,
    c.ChannelJoin,
    c.ChannelList,
    c.ChannelLeave,
)
PROBE_TIMEOUT = 3.0
"""/mesh auto: how long one node may take to answer a handshake to count as reachable."""
MAX_PROBED = 16


class Repl:
    def __init__(
        self,
        agent: Agent,
        out: Out,
        session: Session | None = None,
        *,
        command_wait: float = COMMAND_WAIT,
    ) -> None:
        self.agent = agent
        self.out = out
        self.session = session
        self.command_wait = command_wait
        agent.on_warning = lambda msg: out(f"!! {msg}")
        self.names: list[str] = []
        """Contact names, for tab completion (refreshed after each command)."""
        self.channel_names: list[str] = []
        """Joined channels' names, for tab completion (refreshed likewise)."""
        if session is not None:
            session.on_notice = self._notice
            if session.started_elsewhere is not None:
                self._notice(session.started_elsewhere)

    def _notice(self, notice: Notice) -> None:
        self.out(f"{'!!' if notice.kind == 'refused' else '--'} {notice.text}")

    @property
    def connected(self) -> bool:
        return self.session is None or self.session.connected

    async def wait_connected(self, timeout: float = math.inf) -> None:  # noqa: ASYNC109 -- a bound on waiting
        """Until the session is up; NotConnected after ``timeout`` or once refused for good."""
        if self.session is not None:
            await self.session.wait_up(timeout)

    async def show_unshown(self) -> int:
        got = await self.agent.unshown()
        for r in got:
            self.out(f"[{r.conv}] {short_code(r.sender.hex())}: {r.text}")
        return len(got)

    async def execute(self, cmd: c.Command) -> None:
        a = self.agent
        if not isinstance(cmd, _LOCAL):
            await self.wait_connected(self.command_wait)
        match cmd:
            case c.Help(topic=topic):
                self.out(USAGE.get(topic, HELP) if topic else "commands:\n" + HELP)
            case c.WhoAmI():
                fpr = a.ident.fingerprint
                self.out(f"fingerprint: {grouped(fpr)}\nshort code:  {short_code(fpr)}")
                self.out(qr_terminal(fpr).rstrip("\n"))
            case c.Dm(peer=peer, text=text):
                r = await a.dm_report(await a.resolve_peer(peer), text)
                self.out(f"sent to [{r.conversation}] {describe_route(r)}")
            case c.GroupCreate(name=name):
                await a.group_create(name)
                self.out(f"created group {name}")
            case c.GroupInvite(name=name, peer=peer):
                peer = await a.resolve_peer(peer)
                if await a.group_invite(name, peer) == "invited":
                    self.out(f"invited {short_code(peer)} to {name}")
                else:
                    self.out(
                        f"requested adding {short_code(peer)} to {name} (the committer applies it)"
                    )
            case c.GroupSend(name=name, text=text):
                await a.group_send(name, text)
                self.out(f"sent to [{name}]")
            case c.GroupMembers(name=name):
                for m in await a.group_members(name):
                    me = " (you)" if m == a.ident.fingerprint else ""
                    self.out(f"  {short_code(m)}  {m}{me}")
            case c.GroupLeave(name=name):
                await a.group_leave(name)
                self.out(f"left {name}")
            case c.GroupRemove(name=name, peer=peer):
                peer = await a.resolve_peer(peer)
                done = await a.group_remove(name, peer)
                if done == "removed":
                    self.out(f"removed {short_code(peer)} from {name}")
                elif done == "left":
                    self.out(f"left {name}")
                else:
                    self.out(
                        f"requested removing {short_code(peer)} from {name} (the committer applies it)"
                    )
            case c.GroupInfo(name=name):
                for line in describe_group(await a.group_info(name), a.ident.fingerprint):
                    self.out(line)
            case c.GroupUpdate(name=name):
                await a.group_update(name)
                self.out(f"key update requested in {name}")
            case c.Inbox(wait=wait):
                await self._inbox(wait)
            case c.Verify(peer=peer):
                peer = await a.resolve_peer(peer)
                self.out(
                    f"safety number with {short_code(peer)}:\n  {safety_number(a.ident.fingerprint, peer)}"
                )
                self.out("compare it with your contact over another channel (in person, phone).")
            case c.Stats():
                self._stats()
                self.out(format_stats(await a.node_stats()))
            case c.MeshView(what=what):
                here = self.session.server if self.session is not None else None
                self.out(format_mesh(await a.refresh_nodes(here), what))
            case c.MeshServer(target=target):
                await self._move(await self._node_target(target))
            case c.MeshAuto():
                await self._auto()
            case c.ContactAdd(name=name, peer=peer):
                fpr = await a.contact_add(name, peer)
                self.out(f"{name} = {short_code(fpr)}  {fpr}")
            case c.ContactRemove(name=name):
                fpr = await a.contact_remove(name)
                self.out(f"forgot the name {name} ({short_code(fpr)})")
            case c.Contacts():
                people = await a.contacts()
                if not people:
                    self.out("no contacts yet: /contact add NAME FINGERPRINT")
                for p in people:
                    v = "  verified" if p.verified else ""
                    self.out(
                        f"  {p.name or '-':<16} {short_code(p.fingerprint.hex())}  {p.fingerprint.hex()}{v}"
                    )
            case c.ChannelCreate(name=name):
                secret = await a.channel_create(name)
                self.out(
                    f"created channel #{name}; whoever holds this secret can read and post:\n"
                    f"  {secret}\nothers join with: /channel join {name} {secret}"
                )
                self.out(secret_qr(parse_secret(secret)).rstrip("\n"))
            case c.ChannelJoin(name=name, secret=secret):
                await a.channel_join(name, secret_text(secret))
                self.out(f"joined channel #{name}")
            case c.ChannelList():
                joined = await a.channel_list()
                if not joined:
                    self.out("no channels yet: /channel create NAME or /channel join NAME SECRET")
                for name, cid in joined:
                    self.out(f"  #{name:<20} id {cid.hex()[:16]}")
            case c.ChannelLeave(name=name):
                await a.channel_leave(name)
                self.out(f"left channel #{name} (its secret is forgotten here)")
            case c.Broadcast(channel=name, text=text):
                sent = await a.broadcast(name, text)
                held = " (the node already held it)" if sent.duplicate else ""
                self.out(f"broadcast to [#{name}]{held}")
            case c.MeshTrust(fingerprint=fpr):
                self.out(format_trust(await a.mesh_trust(fpr)))
            case c.Quit():
                raise Quit
        await self.refresh_names()

    async def refresh_names(self) -> None:
        self.names = sorted(p.name for p in await self.agent.contacts() if p.name)
        self.channel_names = [name for name, _ in await self.agent.channel_list()]

    # -- choosing a node -------------------------------------------------------------
    def _need_session(self) -> Session:
        if self.session is None:
            raise QpcError("this REPL has no session that can move (it runs inside the node)")
        return self.session

    async def _node_target(self, text: str) -> Target:
        """``/mesh server``'s argument: an address from our node's peer list, or a node
        fingerprint / unique prefix of a node we know (peer list or remembered)."""
        session = self._need_session()
        resp = await self.agent.refresh_nodes(session.server)
        known = await self.agent.known_nodes()
        if ":" in text and not _is_hex(text.replace(":", "")):
            host, port = parse_address(text)
            for p in resp.peers:
                if p.address and parse_address(p.address) == (host, port):
                    return Target(host, port, ClientTLS(ALPN_CLIENT, node_id=bytes(p.node_id)))
            raise QpcError(
                f"{text} is not in this node's peer list (/mesh peers): "
                "give a node fingerprint, or use qpc repl --server with --pin"
            )
        want = text.lower().replace(":", "").replace("-", "")
        if len(want) < 4 or not _is_hex(want):
            raise QpcError(f"not a node address or fingerprint: {text!r}")
        ids = {n.node_id: n for n in known if n.node_id.hex().startswith(want)}
        if not ids:
            raise QpcError(f"no known node {text!r} (see /mesh peers)")
        if len(ids) > 1:
            listed = ", ".join(sorted(i.hex()[:16] for i in ids))
            raise QpcError(f"{text!r} matches {len(ids)} nodes: {listed}; give more digits")
        (node,) = ids.values()
        host, port = parse_address(node.addresses[0])
        return Target(host, port, ClientTLS(ALPN_CLIENT, node_id=node.node_id), node.node_id)

    async def _move(self, target: Target) -> None:
        session = self._need_session()
        old = session.server
        if old is not None and target.node_id is not None and old.node_id == target.node_id:
            self.out(f"already on node {old.short}")
            return
        new = await session.move_to(target)
        self.out(
            f"now on node {new.short} at {new.address}"
            + (f" (was {old.short}); home moved there" if old is not None else "")
        )

    async def _auto(self) -> None:
        """Probe every node our node knows (and our own) and move to the fastest."""
        session = self._need_session()
        resp = await self.agent.refresh_nodes(session.server)
        here = session.server
        targets = [session.target]
        for p in list(resp.peers)[:MAX_PROBED]:
            if p.address and (here is None or bytes(p.node_id) != here.node_id):
                try:
                    host, port = parse_address(p.address)
                except LocalProtocolError:
                    continue
                nid = bytes(p.node_id)
                targets.append(Target(host, port, ClientTLS(ALPN_CLIENT, node_id=nid), nid))
        rtts: list[float | None] = [None] * len(targets)

        async def probe(i: int) -> None:
            rtts[i] = await session.probe(targets[i], PROBE_TIMEOUT)

        async with trio.open_nursery() as nursery:
            for i in range(len(targets)):
                nursery.start_soon(probe, i)
        reachable = [(r, i) for i, r in enumerate(rtts) if r is not None]
        for r, i in reachable:
            measured = targets[i].node_id or (here.node_id if here is not None and i == 0 else None)
            if measured is not None:
                await self.agent.remember_rtt(measured, targets[i].address, r * 1000)
        if not reachable:
            raise QpcError("no node answered (not even ours)")
        best_rtt, best = min(reachable)
        if best == 0:
            self.out(
                f"staying on node {here.short if here else '?'} (fastest: {best_rtt * 1000:.1f} ms)"
            )
            return
        self.out(f"fastest: {targets[best].address} ({best_rtt * 1000:.1f} ms)")
        await self._move(targets[best])

    async def _inbox(self, wait: float) -> None:
        deadline = trio.current_time() + wait
        await self.agent.receive(0)
        shown = await self.show_unshown()
        while not shown and trio.current_time() < deadline:
            await self.agent.receive(min(deadline - trio.current_time(), RECEIVE_POLL))
            shown = await self.show_unshown()
        if not shown:
            self.out("(no new messages)")

    def _stats(self) -> None:
        s = self.agent.stats
        r = self.agent.rpc_statistics()
        self.out(
            f"sent={s.sent} received={s.received} undecryptable={s.undecryptable} "
            f"held={s.held} send_retries={s.send_retries} send_dropped={s.send_dropped} "
            f"duplicates={s.duplicates} gaps={len(s.gaps)} channel_forged={s.channel_forged} "
            f"channel_tampered={s.channel_tampered} rpc_calls={r.calls} "
            f"rpc_retries={r.retries} "
            f"rpc_failures={dict(r.failures)}"
            + (f" connection_losses={self.session.outages}" if self.session is not None else "")
        )

    async def run_line(self, line: str) -> None:
        """Parse and run one line; raises UsageError/QpcError on failure, Quit on /quit."""
        cmd = parse(line)
        if cmd is not None:
            await self.execute(cmd)

    async def run_script(self, lines: Iterable[str], err: Out) -> int:
        for n, line in enumerate(lines, 1):
            try:
                await self.run_line(line)
            except Quit:
                return 0
            except UsageError as exc:
                err(f"line {n}: error: {exc}\nusage: {exc.usage}")
                return 2
            except QpcError as exc:
                err(f"line {n}: error: {exc}")
                return 1
        return 0


def format_trust(resp: ops_pb2.MeshTrustResponse) -> str:
    """``/mesh trust`` / ``qpc trust``: which node id is trusted now, and what follows."""
    nid = bytes(resp.node_id).hex()
    what = "changed key accepted" if resp.was_refused else "trusted"
    where = f"; redialling {resp.address}" if resp.address else ""
    return f"node {nid} {what}{where}"


def describe_route(r: DmReport) -> str:
    """What ``/dm`` and ``/mesh dm`` say became of a message."""
    if r.fate is Sent.DELIVERED:
        if r.held:
            return "(held on this node until a route appears)"
        if r.hops:
            return f"(relayed via {r.hops} hop{'s' if r.hops != 1 else ''})"
        # A node that predates EnqueueResult.hops says neither: it took it for relay.
        return "(stored on this node)" if r.stored_here else "(accepted for relay)"
    if r.fate is Sent.RETRY:
        return f"(queued: {r.detail or 'the node could not take it yet'}; retrying)"
    return "(not delivered)"


def _is_hex(s: str) -> bool:
    return bool(s) and all(ch in "0123456789abcdefABCDEF" for ch in s)


def _hops(n: int) -> str:
    return f"{n} hop{'s' if n != 1 else ''}"


def _shown(text: str, limit: int = 200) -> str:
    """A string a node sent, safe to print: control characters (terminal escapes) become
    '?', and it is cut at ``limit`` characters."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


def format_discovery(d: ops_pb2.MeshDiscovery) -> str:
    """The ``mDNS:`` line of ``/mesh peers``: listening, or why not (and that it retries)."""
    on = ",".join(_shown(i, 32) for i in d.interfaces) or "all interfaces"
    if d.running:
        own = "announced" if d.announced else "not announced yet"
        return f"  mDNS: on {on}, {d.peers} node{'s' if d.peers != 1 else ''} seen, {own}"
    if d.start_failures:
        why = _shown(d.last_error) or "unknown error"
        tries = f"{d.start_failures} failed start{'s' if d.start_failures != 1 else ''}"
        return f"  mDNS: not running on {on}: {why} ({tries}; retrying)"
    return f"  mDNS: starting on {on}"


def format_mesh(resp: ops_pb2.MeshResponse, what: str) -> str:
    """``/mesh peers`` / ``/mesh routes``: one line per neighbour or destination."""
    if not resp.on_mesh:
        return "this node is not on a mesh (mesh.static_peers / mesh.mdns are off)"
    me = bytes(resp.node_id).hex()
    head = f"node {me[:16]}  ({resp.bindings} users homed mesh-wide)"
    if what == "peers":
        if resp.HasField("discovery"):
            head += "\n" + format_discovery(resp.discovery)
        if not resp.peers:
            return head + "\n  no peers"
        lines = [
            f"  {bytes(p.node_id).hex()[:16]}  {_shown(p.address, 64) or '-':<28} "
            + f"{_shown(p.state, 16):<10} "
            + (f"rtt {p.srtt_ms:.1f} ms" if p.srtt_ms else "rtt -")
            + (f"  {_hops(p.hops)}" if p.hops else "")
            + f"  {p.users} user{'s' if p.users != 1 else ''}"
            + (f"  failures {p.failures}" if p.failures else "")
            + f"  [{','.join(_shown(x, 16) for x in p.sources)}]"
            for p in resp.peers
        ]
        return "\n".join([head, *lines])
    if not resp.routes:
        return head + "\n  no routes"
    lines = [
        f"  {bytes(r.destination).hex()[:16]}  via {bytes(r.next_hop).hex()[:16]}  "
        f"{_hops(r.hops)}  {r.users} user{'s' if r.users != 1 else ''}  seq {r.seq}"
        for r in resp.routes
    ]
    return "\n".join([head, *lines])
