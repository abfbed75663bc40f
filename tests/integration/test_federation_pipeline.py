"""Relay batches in flight: a drainer keeps up to ``relay_window`` batches toward one
next hop outstanding, and custody stays exact when the link drops under them.

A - C on loopback (USER_C homed on C, A relays to it directly). C's RelayEnqueue
handler is held at a gate (the real handler runs, before or after it commits, as
each test needs), so batches pile up in flight at A.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from qpc_node.federation.core import FederationLimits
from qpc_node.federation.routes import StaticRoutes
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2
from tests.integration.fed_nodes import (
    USER_A,
    USER_C,
    FedNode,
    envelope,
    fed_node,
    free_port,
    identity,
    mailbox,
    peer,
    until,
    wrote_to,
)

WINDOW = 3
LIMITS = FederationLimits(relay_batch=4, relay_window=WINDOW)
N = 40  # 10 batches of 4: more than the window holds


class Gate:
    """Holds C's RelayEnqueue handler: counts the calls inside at once and lets them
    go when opened. ``commit_first``: the real handler runs (and commits) before the
    hold, so a call cut off at the gate is one whose answer is lost."""

    def __init__(self, c: FedNode, *, commit_first: bool) -> None:
        self.inside = 0
        self.most = 0
        self.open = trio.Event()
        self._real = c.fed.take_custody
        self._commit_first = commit_first
        c.fed.take_custody = self._held  # type: ignore[method-assign]

    async def _held(
        self,
        envelopes: Sequence[envelope_pb2.Envelope],
        *,
        from_node: bytes,
        origins: Sequence[bytes] = (),
        **more: Sequence[Any],
    ) -> list[federation_pb2.RelayResult]:
        res = None
        if self._commit_first:
            res = await self._real(envelopes, from_node=from_node, origins=origins, **more)
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            await self.open.wait()
        finally:
            self.inside -= 1
        if res is None:
            res = await self._real(envelopes, from_node=from_node, origins=origins, **more)
        return res


async def test_drainer_keeps_a_window_of_batches_in_flight(tmp_path: Path) -> None:
    _, a_id = identity(tmp_path, "a")
    _, c_id = identity(tmp_path, "c")
    msgs = [os.urandom(16) for _ in range(N)]
    with trio.fail_after(60):
        async with fed_node(tmp_path, "c", routes=StaticRoutes(c_id, {USER_C: c_id})) as c:
            await wrote_to(c, USER_C, USER_A)  # N from USER_A: more than a stranger's share
            gate = Gate(c, commit_first=False)
            async with fed_node(
                tmp_path,
                "a",
                routes=StaticRoutes(a_id, {USER_C: c_id}),
                peers=(peer(c.info.port, c_id),),
                limits=LIMITS,
            ) as a:
                await a.fed.wait_link(c_id)
                res = await a.fed.submit([envelope(m, USER_C) for m in msgs], origin=USER_A)
                assert {r.status for r in res} == {federation_pb2.RELAY_QUEUED}
                # Stop-and-wait would hold here with one call at C's gate.
                await until(lambda: gate.inside == WINDOW)
                assert a.fed.custody.batches_in_flight(c_id) == WINDOW
                gate.open.set()
                # C's signed delivery receipts may purge rows (queued reaches 0) before
                # the last batch's answer settles it: wait for both.
                await until(
                    lambda: (
                        a.fed.statistics().queued == 0
                        and a.fed.custody.batches_in_flight(c_id) == 0
                    )
                )
            got = await mailbox(c, USER_C)
    assert gate.most == WINDOW  # never more than the window
    ids = [e.msg_id for e in got]
    assert len(ids) == N and set(ids) == set(msgs)


async def test_link_lost_with_batches_in_flight_loses_nothing_stores_nothing_twice(
    tmp_path: Path,
) -> None:
    """C commits each batch and dies before answering any: A must keep every row no
    answer acknowledged (C's signed delivery receipts, which may overtake the lost
    answers, purge the ones they name -- that is an acknowledgement too), send them
    again to the restarted C, and C must answer the ones it holds as duplicates: each
    message once in C's mailbox, A's custody empty and its count at zero."""
    _, a_id = identity(tmp_path, "a")
    _, c_id = identity(tmp_path, "c")
    pc = free_port()
    msgs = [os.urandom(16) for _ in range(N)]

    def c_node() -> object:
        return fed_node(tmp_path, "c", port=pc, routes=StaticRoutes(c_id, {USER_C: c_id}))

    with trio.fail_after(90):
        async with fed_node(
            tmp_path,
            "a",
            routes=StaticRoutes(a_id, {USER_C: c_id}),
            peers=(peer(pc, c_id),),
            limits=LIMITS,
        ) as a:
            async with c_node() as c:  # type: ignore[attr-defined]
                await wrote_to(c, USER_C, USER_A)
                gate = Gate(c, commit_first=True)
                await a.fed.wait_link(c_id)
                await a.fed.submit([envelope(m, USER_C) for m in msgs], origin=USER_A)
                await until(lambda: gate.inside == WINDOW)
                assert a.fed.custody.batches_in_flight(c_id) == WINDOW
                stored = len(await mailbox(c, USER_C))
                assert stored == WINDOW * LIMITS.relay_batch  # committed, never answered
                st = a.fed.statistics()  # A holds every one no receipt purged
                assert st.queued == N - st.storefwd.receipts_applied
            # C is gone with three answers lost; A's calls fail, its rows stay.
            await until(lambda: a.fed.custody.batches_in_flight(c_id) == 0)
            st = a.fed.statistics()
            assert st.queued == N - st.storefwd.receipts_applied
            async with c_node() as c:  # type: ignore[attr-defined]
                await until(lambda: a.fed.statistics().queued == 0, within=30)
                got = await mailbox(c, USER_C)
                (from_a,) = (n for n in c.fed.statistics().neighbours if n.node_id == a_id)
            a_stats = a.fed.statistics()
    ids = [e.msg_id for e in got]
    assert len(ids) == N and set(ids) == set(msgs)  # every one, none twice
    assert a_stats.queued == 0 and a_stats.send_failures >= WINDOW
    # The restarted C stored only what its first life had not: the rest were purged at
    # A by C's receipts or answered as duplicates.
    assert from_a.relay_in.get("RELAY_STORED_LOCAL") == N - stored
    dup = from_a.relay_in.get("RELAY_DUPLICATE", 0)
    assert dup + a_stats.storefwd.receipts_applied >= stored
