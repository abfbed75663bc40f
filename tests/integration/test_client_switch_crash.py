"""A client crash in the middle of a branch switch recovers (issue 14, docs/groups.md).

A partition: the first committer (a) removes d while the second (b), not hearing from
it, removes c on the same epoch; both send texts on their branch. The ordering key fixes
which commit wins; the committer whose commit loses reads its mail first and its process
dies at one step of the switch: right after the rollback to the fork epoch, right after
merging the winning commit, before re-sending its texts of the losing branch, after
encrypting one of them, or after they were queued (before it asks to remove its member
of the losing branch again).

"Dies" is faithful to a kill: at that step the real MLS identity stops answering (every
later call raises, so nothing else is written), the agent is dropped without a clean
shutdown, and client.db and the MLS store are opened again from disk. After the restart
every survivor is on the winner's authenticator, each text of the losing branch was
re-sent once and is shown once everywhere, and nothing is shown twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from node_harness import flush_inbox, running_node

from qpc_node import crypto
from qpc_node.client.agent import Agent
from qpc_node.client.branches import CT_COMMIT, content_type
from qpc_node.client.connect import open_agent
from qpc_node.groups.core import GroupConfig
from qpc_node.node import NodeInfo
from qpc_node.ops.clock import ManualWallClock
from qpc_node.wire.envelope import unpad
from qpc_node.wire.gen.qpc.v1 import client_pb2, service_pb2

QUIET_MS = 2_000
FAST = {"rate_per_second": "100000", "rate_burst": "100000"}
"""Every agent dials from 127.0.0.1: the per-IP limit is not what is tested here."""


class Crashed(BaseException):
    """The process died here (a BaseException: no ``except Exception`` swallows it)."""


class Fault:
    """Where to die: at the first call of ``method`` for which ``when(result)`` holds
    (``after``: once the real call returned, so its effect is on disk)."""

    def __init__(
        self, method: str, *, after: bool, when: Callable[[Fault, Any], bool] = lambda _f, _r: True
    ) -> None:
        self.method = method
        self.after = after
        self.when = when
        self.fired = False
        self.rollbacks = 0


class _Dying:
    """Forwards to a real MLS object until the fault fires; dead after that."""

    def __init__(self, real: Any, fault: Fault) -> None:
        self._real = real
        self._fault = fault

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        fault = self._fault
        if fault.fired:
            raise Crashed(name)
        if not callable(attr):
            if name == fault.method and not fault.after and fault.when(fault, None):
                fault.fired = True
                raise Crashed(name)
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if fault.fired:
                raise Crashed(name)
            if name == fault.method and not fault.after and fault.when(fault, None):
                fault.fired = True
                raise Crashed(name)
            result = attr(*args, **kwargs)
            if name == "rollback":
                fault.rollbacks += 1
            if isinstance(result, crypto.Group):
                result = _Dying(result, fault)
            elif isinstance(result, tuple) and result and isinstance(result[0], crypto.Group):
                result = (_Dying(result[0], fault), *result[1:])
            if name == fault.method and fault.after and fault.when(fault, result):
                fault.fired = True
                raise Crashed(name)
            return result

        return call


def arm(agent: Agent, fault: Fault) -> None:
    """Every part of the agent uses the dying identity from now on."""
    dying: Any = _Dying(agent.ident, fault)
    agent.ident = dying
    for part in (agent._outbox, agent._inbox, agent._groups, agent._branches, agent._channels):
        part._ident = dying


def fault_at(step: str, loser: Agent) -> Fault:
    def switched(_f: Fault, _r: Any) -> bool:
        return loser._branches.stats.switches > 0

    def merged_after_rollback(f: Fault, ev: Any) -> bool:
        return f.rollbacks > 0 and ev.kind == "commit"

    return {
        "after_rollback": lambda: Fault("rollback", after=True),
        "after_merge": lambda: Fault("process", after=True, when=merged_after_rollback),
        "before_resend": lambda: Fault("encrypt", after=False, when=switched),
        "after_resend_encrypt": lambda: Fault("encrypt", after=True, when=switched),
        # The resends queued (and flushed), the winning commit not acknowledged yet, our
        # member of the losing branch not yet asked to be removed again.
        "after_resend": lambda: Fault("propose_remove", after=False, when=switched),
    }[step]()


async def settle(wall: ManualWallClock, *agents: Agent, rounds: int = 5) -> None:
    for _ in range(rounds):
        for a in agents:
            await flush_inbox(a)
        wall.advance(QUIET_MS)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _open(tmp: Path, name: str, info: NodeInfo, wall: ManualWallClock) -> Any:
    return open_agent(tmp / name, info.host, info.port, pin=info.cert_fingerprint, wall_ms=wall)


async def group_of_four(wall: ManualWallClock, agents: dict[str, Agent]) -> bytes:
    """a creates the group and invites b, c, d: a and b are its first two committers."""
    a = agents["a"]
    await a.group_create("team")
    for n in "bcd":
        assert await a.group_invite("team", agents[n].ident.fingerprint) == "invited"
    await settle(wall, *agents.values())
    committers = (await a.group_info("team")).committers
    assert committers[:2] == (a.ident.fingerprint, agents["b"].ident.fingerprint)
    conv = a._st.conversation("team")
    assert conv is not None
    return conv.group_id


async def partition(wall: ManualWallClock, agents: dict[str, Agent]) -> None:
    """Nobody reads: a removes d and sends two texts; c sends one; b asks to remove c and
    commits it itself once a has been silent for the committer timeout (both commits are
    on epoch n), then sends two texts; d sends one."""
    a, b, c, d = (agents[n] for n in "abcd")
    await a.group_remove("team", d.ident.fingerprint)
    for k in (1, 2):
        await a.group_send("team", f"a on x {k}")
    await c.group_send("team", "c before the fork")
    assert await b.group_remove("team", c.ident.fingerprint) == "requested"
    wall.advance(GroupConfig().committer_timeout_ms + QUIET_MS)
    await b._groups.timers()
    for k in (1, 2):
        await b.group_send("team", f"b on y {k}")
    await d.group_send("team", "d before the fork")


async def crash_while_reading(loser: Agent, step: str) -> None:
    fault = fault_at(step, loser)
    arm(loser, fault)
    with pytest.raises(Crashed):
        for _ in range(5):
            await loser._inbox.receive(0)
    assert fault.fired, step


async def check_converged(
    agents: dict[str, Agent], gid: bytes, survivors: str, step: str
) -> dict[str, list[str]]:
    """One authenticator, the survivors and nobody else in the group, nothing
    undecryptable; returns what each survivor stored to show (every text shown, before
    the crash or after: ``unshown`` lists them all, the test never marks any)."""
    auths = {agents[n].ident.group(gid).epoch_authenticator() for n in survivors}
    assert len(auths) == 1, step
    names = {x.ident.fingerprint: n for n, x in agents.items()}
    for n in survivors:
        members = {names.get(m, m) for m in agents[n].ident.group(gid).members()}
        assert members == set(survivors), (step, n, members)
        assert agents[n].stats.undecryptable == 0, (step, n, agents[n].stats.warnings)
    return {n: [m.text for m in await agents[n].unshown()] for n in survivors}


def check_once(shown: dict[str, list[str]], sender: str, texts: list[str], step: str) -> None:
    for n, got in shown.items():
        for text in texts:
            assert got.count(text) == (0 if n == sender else 1), (step, n, text, got)


class Host:
    """Each agent in a task of its own, so any one of them can stop (or die) and come
    back while the others stay up (nested contexts could only stop the last opened)."""

    def __init__(self, nursery: trio.Nursery, tmp: Path, info: NodeInfo, wall: ManualWallClock):
        self._nursery = nursery
        self._tmp, self._info, self._wall = tmp, info, wall
        self._stop: dict[str, tuple[trio.Event, trio.Event]] = {}

    async def open(self, name: str) -> Agent:
        agent: Agent = await self._nursery.start(self._run, name)
        return agent

    async def _run(self, name: str, task_status: trio.TaskStatus[Agent]) -> None:
        stop, stopped = self._stop[name] = (trio.Event(), trio.Event())
        try:
            async with _open(self._tmp, name, self._info, self._wall) as agent:
                task_status.started(agent)
                await stop.wait()
        finally:
            stopped.set()

    async def close(self, name: str) -> None:
        stop, stopped = self._stop.pop(name)
        stop.set()
        await stopped.wait()


STEPS = [
    "after_rollback",
    "after_merge",
    "before_resend",
    "after_resend_encrypt",
    "after_resend",
]


@pytest.mark.parametrize("step", ["none", *STEPS])
async def test_a_crash_in_the_middle_of_a_switch_recovers(
    tmp_path: Path, wall: ManualWallClock, step: str
) -> None:
    async with (
        running_node(tmp_path, wall, limits=FAST) as (_, info),
        trio.open_nursery() as nursery,
    ):
        host = Host(nursery, tmp_path, info, wall)
        agents = {n: await host.open(n) for n in "abcd"}
        gid = await group_of_four(wall, agents)
        await partition(wall, agents)
        # Which commit wins is fixed by the ordering key: the other committer switches.
        # Each committer's resolver knows the key of its own commit (and not the other).
        commits = await commits_in_mailbox(agents["c"])
        keys = {}
        for n in "ab":
            r = agents[n]._branches.resolver(gid)
            assert r is not None
            (keys[n],) = [k for c in commits if (k := r.key_of(_digest(c))) is not None]
        loser, winner = ("a", "b") if keys["a"] > keys["b"] else ("b", "a")
        # Heal: the loser reads first and dies at ``step`` of its switch.
        if step != "none":
            await crash_while_reading(agents[loser], step)
            await host.close(loser)  # the process is gone; its files stay
            agents[loser] = await host.open(loser)
        await settle(wall, *agents.values(), rounds=10)
        shown = await check_converged(agents, gid, "ab", step)
        for n in "ab":  # sent on a branch: the loser's were resent once, shown once
            check_once(shown, n, [f"{n} on {'x' if n == 'a' else 'y'} {k}" for k in (1, 2)], step)
        check_once(shown, "c", ["c before the fork"], step)
        check_once(shown, "d", ["d before the fork"], step)
        lost = agents[loser]
        assert lost._branches.stats.switches == (step in ("none", "after_rollback", "after_merge"))
        if step in ("after_rollback", "after_merge"):
            assert lost._branches.stats.rolled_back == 1  # back on its tip, then switched
        assert lost._st.branch_resends() == []
        # One more restart of both shows nothing again.
        for n in (winner, loser):
            await host.close(n)
            agents[n] = await host.open(n)
        await settle(wall, agents["a"], agents["b"], rounds=2)
        for n in "ab":
            assert await agents[n].unshown() == [], (step, n)
        nursery.cancel_scope.cancel()


async def commits_in_mailbox(agent: Agent) -> list[bytes]:
    """The MLS commits waiting in ``agent``'s mailbox, in order (nothing acked)."""
    resp = await agent._rpc.call(
        "qpc.v1.Delivery/Fetch",
        service_pb2.FetchRequest(after_seq=agent._st.cursor(agent.node), limit=256),
        service_pb2.FetchResponse,
    )
    out = []
    for m in resp.messages:
        sealed = client_pb2.Sealed.FromString(unpad(bytes(m.envelope.ciphertext)))
        if sealed.kind == client_pb2.Sealed.MLS_MESSAGE and content_type(sealed.data) == CT_COMMIT:
            out.append(bytes(sealed.data))
    return out


async def test_a_resend_is_shown_once_also_after_the_receiver_restarted(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """The receiver showed a text, restarted, then gets the sender's resend of it (same
    app id, a new ciphertext): it is not shown again."""
    async with running_node(tmp_path, wall, limits=FAST) as (_, info), AsyncExitStack() as stack:
        rstack = AsyncExitStack()
        stack.push_async_exit(rstack)
        s = await stack.enter_async_context(_open(tmp_path, "s", info, wall))
        r = await rstack.enter_async_context(_open(tmp_path, "r", info, wall))
        await s.group_create("team")
        assert await s.group_invite("team", r.ident.fingerprint) == "invited"
        await settle(wall, s, r)
        conv = s._st.conversation("team")
        assert conv is not None
        body = client_pb2.AppMessage(text="once", app_id=b"\x07" * 16, sent_ms=wall())
        g = s.ident.group(conv.group_id)
        await s._groups._send_app(conv, g, body, None)
        assert [m.text for m in await flush_inbox(r)] == ["once"]
        await rstack.aclose()
        r = await stack.enter_async_context(_open(tmp_path, "r", info, wall))
        await s._groups._send_app(conv, g, body, None)  # the resend after a switch
        assert await flush_inbox(r) == []
        await s._groups._send_app(
            conv, g, client_pb2.AppMessage(text="new", app_id=b"\x08" * 16), None
        )
        assert [m.text for m in await flush_inbox(r)] == ["new"]


@pytest.mark.parametrize("corruption", ["garbage", "tampered"])
async def test_a_bad_branch_record_is_dropped_not_a_crash(
    tmp_path: Path, wall: ManualWallClock, corruption: str
) -> None:
    """A record that does not decode (sealed garbage) or does not open (bytes changed on
    disk): typed, dropped and counted at start; the group goes on with a fresh resolver."""
    async with running_node(tmp_path, wall, limits=FAST) as (_, info), AsyncExitStack() as stack:
        rstack = AsyncExitStack()
        stack.push_async_exit(rstack)
        s = await stack.enter_async_context(_open(tmp_path, "s", info, wall))
        r = await rstack.enter_async_context(_open(tmp_path, "r", info, wall))
        await s.group_create("team")
        assert await s.group_invite("team", r.ident.fingerprint) == "invited"
        await settle(wall, s, r)
        conv = r._st.conversation("team")
        assert conv is not None
        gid = conv.group_id
        assert r._st.branch_record(gid) is not None
        if corruption == "garbage":
            sealed = r._st._seal(b'{"v": 1, "resolver": "{}"}', b"branches" + gid)
            r._st._conn.execute("UPDATE group_branches SET state = ?", (sealed,))
        else:
            r._st._conn.execute("UPDATE group_branches SET state = x'0011223344556677889900'")
        await rstack.aclose()
        r = await stack.enter_async_context(_open(tmp_path, "r", info, wall))
        await settle(wall, s, r)
        assert r._branches.stats.dropped_records == 1
        await s.group_send("team", "still works")
        await flush_inbox(r)
        got = [m.text for m in await r.unshown()]
        assert got.count("still works") == 1
        await r.group_send("team", "and back")
        assert "and back" in [m.text for m in await flush_inbox(s)]


async def _cut_mailbox(agent: Agent) -> None:
    """Everything now in ``agent``'s mailbox is lost to it (the relay holding its copies
    of one side of the partition died): acked and skipped, never read."""
    resp = await agent._rpc.call(
        "qpc.v1.Delivery/Fetch",
        service_pb2.FetchRequest(after_seq=agent._st.cursor(agent.node), limit=256),
        service_pb2.FetchResponse,
    )
    assert resp.messages
    last = resp.messages[-1].seq
    await agent._rpc.call(
        "qpc.v1.Delivery/Ack", service_pb2.AckRequest(up_to_seq=last), service_pb2.AckResponse
    )
    agent._st.advance_cursor(last, node=agent.node)


@pytest.mark.parametrize("restart", ["crash_before_resend", "after_follow_ups"])
async def test_a_restart_after_a_switch_still_adds_again_and_sends_owed_texts(
    tmp_path: Path, wall: ManualWallClock, restart: str
) -> None:
    """Both sides of a partition add a member on the same epoch (a adds e, b adds f) and
    each committer sends a text to its new member. The losing committer restarts after
    its switch: it died before re-sending its text (``crash_before_resend``), or it
    stopped cleanly once it had re-sent the text and asked to add its member again, but
    before the commit adding that member arrived (``after_follow_ups``). Its joiner never
    got its copies of the losing branch. After the restart the loser still asks to add
    its joiner again (the members our commits added, and the re-adds a switch decided,
    are in client.db) and, once that commit arrives, sends the joiner the text it was owed
    (owed texts are in client.db): everyone ends in one group and the joiner shows the
    text once."""
    async with (
        running_node(tmp_path, wall, limits=FAST) as (_, info),
        trio.open_nursery() as nursery,
    ):
        host = Host(nursery, tmp_path, info, wall)
        agents = {n: await host.open(n) for n in "abcdef"}
        a, b, e, f = (agents[n] for n in "abef")
        gid = await group_of_four(wall, agents)
        assert await a.group_invite("team", e.ident.fingerprint) == "invited"
        assert await b.group_invite("team", f.ident.fingerprint) == "requested"
        wall.advance(GroupConfig().committer_timeout_ms + QUIET_MS)
        await b._groups.timers()
        assert a.ident.group(gid).epoch == b.ident.group(gid).epoch
        await a.group_send("team", "a to e on x")
        await b.group_send("team", "b to f on y")
        commits = await commits_in_mailbox(agents["c"])
        keys = {}
        for n in "ab":
            r = agents[n]._branches.resolver(gid)
            assert r is not None
            (keys[n],) = [k for c in commits if (k := r.key_of(_digest(c))) is not None]
        loser = "a" if keys["a"] > keys["b"] else "b"
        joiner, text = ("e", "a to e on x") if loser == "a" else ("f", "b to f on y")
        await _cut_mailbox(agents[joiner])
        if restart == "crash_before_resend":
            await crash_while_reading(agents[loser], "before_resend")
        else:
            await flush_inbox(agents[loser])
            assert agents[loser]._branches.stats.switches == 1
            assert agents[loser]._st.branch_resends() == []  # re-sent before the restart
        await host.close(loser)
        agents[loser] = await host.open(loser)

        shown = {n: [m.text for m in await x.unshown()] for n, x in agents.items()}
        for _ in range(12):
            for n, x in agents.items():
                shown[n] += [m.text for m in await flush_inbox(x)]
            wall.advance(QUIET_MS)
        everyone = {x.ident.fingerprint for x in agents.values()}
        auths = set()
        for n, x in agents.items():
            g = x.ident.group(gid)
            assert set(g.members()) == everyone, (restart, n, len(g.members()))
            auths.add(g.epoch_authenticator())
            assert x.stats.undecryptable == 0, (n, x.stats.warnings)
        assert len(auths) == 1
        assert shown[joiner].count(text) == 1, (restart, shown[joiner])
        for n in "abcd":
            assert shown[n].count(text) == (0 if n == loser else 1), (restart, n, shown[n])
        assert agents[loser]._st.branch_resends() == []
        nursery.cancel_scope.cancel()
