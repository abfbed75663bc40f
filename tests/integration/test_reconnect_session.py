"""The agent's session against in-process nodes stopped and started on one port.

What the pty test cannot pin down deterministically: a node with another
certificate on the old address is refused for good; a command typed while
there is no node fails within its bound having sent and queued nothing; what
the outbox held during the outage is sent once the connection is back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from node_harness import running_node, texts, users

from qpc_node.client.connect import open_session
from qpc_node.client.reconnect import Notice, Phase
from qpc_node.client.session import NotConnected
from qpc_node.node import NodeInfo
from qpc_node.ops.clock import ManualWallClock
from qpc_node.repl.runner import Repl
from qpc_node.rpc import RpcError

pytestmark = pytest.mark.timeout(120)


class Node:
    """An in-process node that the test stops and starts again on the same port."""

    def __init__(self, nursery: trio.Nursery, wall: ManualWallClock) -> None:
        self._nursery = nursery
        self._wall = wall
        self._stop = trio.Event()
        self._stopped = trio.Event()

    async def start(self, tmp: Path, port: int = 0) -> NodeInfo:
        self._stop, self._stopped = trio.Event(), trio.Event()
        info: NodeInfo = await self._nursery.start(self._run, tmp, port)
        return info

    async def _run(self, tmp: Path, port: int, *, task_status: trio.TaskStatus[NodeInfo]) -> None:
        listen = {"listen": f"127.0.0.1:{port}"}
        try:
            async with running_node(tmp, self._wall, node=listen) as (_, info):
                task_status.started(info)
                await self._stop.wait()
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        self._stop.set()
        await self._stopped.wait()


class Notices:
    """What the session told the user, with a wait for the next kind (bounded)."""

    def __init__(self) -> None:
        self.seen: list[Notice] = []
        self._event = trio.Event()

    def __call__(self, notice: Notice) -> None:
        self.seen.append(notice)
        self._event.set()
        self._event = trio.Event()

    @property
    def kinds(self) -> list[str]:
        return [n.kind for n in self.seen]

    async def wait(self, kind: str, timeout: float = 30.0) -> Notice:  # noqa: ASYNC109 -- a bound
        with trio.fail_after(timeout):
            while kind not in self.kinds:
                await self._event.wait()
        return next(n for n in self.seen if n.kind == kind)


@asynccontextmanager
async def node_and_alice(
    tmp: Path, wall: ManualWallClock
) -> AsyncIterator[tuple[Node, NodeInfo, Repl, Notices]]:
    async with trio.open_nursery() as nursery:
        node = Node(nursery, wall)
        info = await node.start(tmp)
        notices = Notices()
        async with open_session(
            tmp / "alice", info.host, info.port, pin=info.cert_fingerprint, wall_ms=wall
        ) as (agent, session):
            repl = Repl(agent, lambda _line: None, session, command_wait=1.0)
            session.on_notice = notices
            yield node, info, repl, notices
        nursery.cancel_scope.cancel()


async def test_changed_node_certificate_is_refused_for_good(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with node_and_alice(tmp_path, wall) as (node, info, repl, notices):
        await node.stop()
        # Another node (its own keys, so another certificate) takes over the address.
        impostor = await node.start(tmp_path / "impostor", info.port)
        assert impostor.cert_fingerprint != info.cert_fingerprint
        refused = await notices.wait("refused")
        assert notices.kinds == ["lost", "refused"]
        assert "does not match the pinned fingerprint" in refused.text
        assert repl.session is not None and repl.session.phase is Phase.REFUSED
        with pytest.raises(NotConnected, match="not reconnecting"):
            await repl.wait_connected()
        with pytest.raises(NotConnected, match="pinned fingerprint"):
            await repl.run_line("/inbox")
        # The original node coming back does not change that: the refusal is final.
        await node.stop()
        await node.start(tmp_path, info.port)
        with pytest.raises(NotConnected):
            await repl.wait_connected(1.0)
        assert notices.kinds == ["lost", "refused"]


async def test_command_while_down_fails_in_bound_and_queues_nothing(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with node_and_alice(tmp_path, wall) as (node, info, repl, notices):
        async with users(tmp_path, info, wall, "bob") as (bob,):
            pass  # homes bob and uploads his KeyPackages
        await node.stop()
        await notices.wait("lost")
        t0 = trio.current_time()
        with pytest.raises(NotConnected, match="not connected to the node: reconnecting"):
            await repl.run_line(f"/dm {bob.ident.fingerprint} never sent")
        assert trio.current_time() - t0 < 5.0  # command_wait=1 s, not a hang
        assert await repl.agent.flush_outbox() == 0
        # Local commands still work.
        await repl.run_line("/whoami")
        await node.start(tmp_path, info.port)
        await repl.wait_connected(30)
        assert notices.kinds == ["lost", "restored"]


async def test_outbox_filled_during_outage_is_sent_after_reconnect(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with node_and_alice(tmp_path, wall) as (node, info, repl, notices):
        alice = repl.agent
        async with users(tmp_path, info, wall, "bob") as (bob,):
            await alice.dm(bob.ident.fingerprint, "before")
            assert [m.text for m in await texts(bob, 1)] == ["before"]
        bob_fpr = bob.ident.fingerprint
        await node.stop()
        await notices.wait("lost")
        # The agent (not the REPL, which would wait first) encrypts and queues;
        # the flush fails because there is no connection, so it stays queued.
        with pytest.raises(RpcError, match="not connected"):
            await alice.dm(bob_fpr, "queued while down")
        assert await alice.unshown() == []
        await node.start(tmp_path, info.port)
        await notices.wait("restored")
        # The failed flush gave the message a backoff time on the (manual, so
        # unmoving) wall clock: only the session's after-reconnect step, which
        # makes the whole outbox due and flushes it, can send it now.
        async with users(tmp_path, info, wall, "bob") as (bob,):
            got = await texts(bob, 1, wait=15.0)
            assert [m.text for m in got] == ["queued while down"]
            assert await texts(bob, 1, wait=1.0) == []  # and only once
        assert await alice._state.call(alice._st.outbox_len) == 0
        assert notices.kinds == ["lost", "restored"]
