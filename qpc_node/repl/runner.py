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

from qpc_node.client.agent import Agent
from qpc_node.client.fingerprint import grouped, qr_terminal, short_code
from qpc_node.client.reconnect import Notice
from qpc_node.client.session import Session
from qpc_node.errors import QpcError
from qpc_node.ops.metrics import format_stats
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


HELP = "\n".join(
    f"  {USAGE[k]}"
    for k in (
        "whoami",
        "dm",
        "group create",
        "group invite",
        "group send",
        "group members",
        "group leave",
        "group remove",
        "inbox",
        "verify",
        "stats",
        "help",
        "quit",
    )
)


class Quit(Exception):
    """Raised by /quit to end the session."""


# Commands that work without the node; every other one needs the session up.
_LOCAL = (c.Help, c.WhoAmI, c.GroupCreate, c.GroupMembers, c.Verify, c.Quit)


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
        if session is not None:
            session.on_notice = self._notice

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
                conv = await a.dm(peer, text)
                self.out(f"sent to [{conv}]")
            case c.GroupCreate(name=name):
                await a.group_create(name)
                self.out(f"created group {name}")
            case c.GroupInvite(name=name, peer=peer):
                await a.group_invite(name, peer)
                self.out(f"invited {short_code(peer)} to {name}")
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
                await a.group_remove(name, peer)
                self.out(f"removed {short_code(peer)} from {name}")
            case c.Inbox(wait=wait):
                await self._inbox(wait)
            case c.Verify(peer=peer):
                self.out(
                    f"safety number with {short_code(peer)}:\n  {safety_number(a.ident.fingerprint, peer)}"
                )
                self.out("compare it with your contact over another channel (in person, phone).")
            case c.Stats():
                self._stats()
                self.out(format_stats(await a.node_stats()))
            case c.MeshView(what=what):
                self.out(format_mesh(await a.mesh_status(), what))
            case c.MeshTrust(fingerprint=fpr):
                self.out(format_trust(await a.mesh_trust(fpr)))
            case c.Quit():
                raise Quit

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
            f"gaps={len(s.gaps)} rpc_calls={r.calls} rpc_retries={r.retries} "
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


def format_mesh(resp: ops_pb2.MeshResponse, what: str) -> str:
    """``/mesh peers`` / ``/mesh routes``: one line per neighbour or destination."""
    if not resp.on_mesh:
        return "this node is not on a mesh (mesh.static_peers / mesh.mdns are off)"
    me = bytes(resp.node_id).hex()
    head = f"node {me[:16]}  ({resp.bindings} users homed mesh-wide)"
    if what == "peers":
        if not resp.peers:
            return head + "\n  no peers"
        lines = [
            f"  {bytes(p.node_id).hex()[:16]}  {p.address or '-':<28} {p.state:<10} "
            + (f"rtt {p.srtt_ms:.1f} ms" if p.srtt_ms else "rtt -")
            + (f"  failures {p.failures}" if p.failures else "")
            + f"  [{','.join(p.sources)}]"
            for p in resp.peers
        ]
        return "\n".join([head, *lines])
    if not resp.routes:
        return head + "\n  no routes"
    lines = [
        f"  {bytes(r.destination).hex()[:16]}  via {bytes(r.next_hop).hex()[:16]}  "
        f"{r.hops} hop{'s' if r.hops != 1 else ''}  seq {r.seq}"
        for r in resp.routes
    ]
    return "\n".join([head, *lines])
