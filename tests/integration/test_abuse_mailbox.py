"""Issue 11 item 4: a stranger floods a user's mailbox on a real node process (``qpc
node``) while one of the user's contacts keeps writing to the user.

Before mailbox fairness the flood filled the whole quota and the contact's messages
were refused until the user fetched and acked. Now a sender the user has not accepted
(never sent to) shares a bounded pool (10 % of the quota), a tenth of it per sender:
every contact message must be accepted and arrive, each flood envelope past the
stranger's share gets its own RESOURCE_EXHAUSTED status, and the node's metrics count
those refusals. Two attackers: one fresh key, and a Sybil with more keys than shares.
"""

from __future__ import annotations

import os
import signal
import statistics
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from node_harness import start_node_process, texts, users

from qpc_node.client.agent import Agent
from qpc_node.errors import StatusCode
from qpc_node.node import NodeInfo
from qpc_node.ops.clock import ManualWallClock
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2

pytestmark = pytest.mark.timeout(300)

QUOTA = 2_000  # mailbox quota of this node (default 10,000: same split, smaller test)
POOL = QUOTA // 10  # all strangers together
SHARE = POOL // 10  # each stranger
BATCH = 256  # envelopes per Enqueue call (the node's maximum)
CONTACT_TEXTS = 30
ENV = {
    "QPC_LIMITS_MAILBOX_MAX_MESSAGES": str(QUOTA),
    # All parties share 127.0.0.1: lift the per-IP call rate so this test is about the
    # mailbox, not the rate limiter (which counts calls: 50/s x 256 envelopes per call
    # would still let one key fill a default mailbox in under a second).
    "QPC_LIMITS_RATE_PER_SECOND": "100000",
    "QPC_LIMITS_RATE_BURST": "100000",
}


@asynccontextmanager
async def node_process(tmp: Path) -> AsyncIterator[NodeInfo]:
    proc, info = await start_node_process(tmp / "node", ENV, log_file=tmp / "node.log")
    try:
        yield info
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await proc.wait()
        proc.kill()
        await proc.wait()


@dataclass
class Flood:
    statuses: Counter[StatusCode] = field(default_factory=Counter)
    details: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    seconds: float = 0.0
    walled: trio.Event = field(default_factory=trio.Event)  # first refusal seen
    outlasted_contact: bool = False  # still flooding after the contact's last text


MAX_BATCHES = 400  # bound on the flood: ~100,000 envelopes


async def flood(
    attackers: list[Agent], victim: bytes, wall: ManualWallClock, out: Flood, stop: trio.Event
) -> None:
    """The attacker keys take turns sending full batches of junk to ``victim`` until
    one round after ``stop`` (the contact is done), or MAX_BATCHES."""
    start = trio.current_time()
    for batch in range(MAX_BATCHES):
        if stop.is_set() and batch % len(attackers) == 0:
            if out.outlasted_contact:
                break
            out.outlasted_contact = True  # one more full round after the contact's last
        agent = attackers[batch % len(attackers)]
        envs = [
            Envelope(os.urandom(16), victim, wall() + 86_400_000, 4, os.urandom(256)).to_proto()
            for _ in range(BATCH)
        ]
        resp = await agent._rpc.call(
            "qpc.v1.Delivery/Enqueue",
            service_pb2.EnqueueRequest(envelopes=envs),
            service_pb2.EnqueueResponse,
            retries=0,
        )
        assert len(resp.results) == BATCH
        for r in resp.results:
            code = StatusCode(r.status)
            out.statuses[code] += 1
            if code != StatusCode.OK:
                out.details[r.detail.split(" quota exceeded")[0]] += 1
        out.sent += BATCH
        if out.statuses[StatusCode.RESOURCE_EXHAUSTED]:
            out.walled.set()
    out.seconds = trio.current_time() - start
    out.walled.set()  # never leave the contact waiting


async def metric(agent: Agent, name: str) -> dict[str, float]:
    return {
        dict(s.labels).get("reason", ""): s.value
        for s in await agent.node_stats()
        if s.name == name
    }


@pytest.mark.parametrize("keys", [1, 12], ids=["one_fresh_key", "sybil_12_keys"])
async def test_contacts_get_through_a_stranger_flood(
    tmp_path: Path, wall: ManualWallClock, keys: int
) -> None:
    attacker_names = [f"x{i}" for i in range(keys)]
    async with (
        node_process(tmp_path) as info,
        users(tmp_path, info, wall, "victim", "contact", *attacker_names) as agents,
    ):
        victim, contact, attackers = agents[0], agents[1], agents[2:]
        # The contact writes first; the victim answers: from now on the victim's node
        # knows the victim accepts the contact (it saw the victim send to it).
        await contact.dm(victim.ident.fingerprint, "hi, it's me")
        assert [m.text for m in await texts(victim, 1)] == ["hi, it's me"]
        await victim.dm(contact.ident.fingerprint, "hello you")
        assert [m.text for m in await texts(contact, 1)] == ["hello you"]
        # The contact's send latency without an attack, for comparison.
        quiet: list[float] = []
        for i in range(10):
            t0 = trio.current_time()
            await contact.dm(victim.ident.fingerprint, f"quiet {i}")
            quiet.append(trio.current_time() - t0)
        assert len(await texts(victim, 10)) == 10

        # The victim is offline from here on (the worst case: nothing is fetched or
        # acked). The flood runs; once it has hit its wall the contact writes, while
        # the flood goes on.
        result = Flood()
        stop = trio.Event()
        latencies: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, attackers, victim.me, wall, result, stop)
            await result.walled.wait()
            for i in range(CONTACT_TEXTS):
                t0 = trio.current_time()
                await contact.dm(victim.ident.fingerprint, f"still there? {i}")
                latencies.append(trio.current_time() - t0)
            stop.set()

        got = await texts(victim, CONTACT_TEXTS, wait=60.0)
        texts_got = [m.text for m in got if m.sender == contact.ident.fingerprint]
        ok = result.statuses[StatusCode.OK]
        refused = result.statuses[StatusCode.RESOURCE_EXHAUSTED]
        stranger_refusals = await metric(victim, "qpc_mailbox_refusals_total")
        print(
            f"\nflood keys={keys} sent={result.sent} in {result.seconds:.2f}s"
            f" ({result.sent / max(result.seconds, 1e-9):.0f} envelopes/s) stored={ok}"
            f" refused={refused} contact={len(texts_got)}/{CONTACT_TEXTS}"
            f" contact_send_median={statistics.median(latencies) * 1000:.1f}ms"
            f" (no attack: {statistics.median(quiet) * 1000:.1f}ms)"
            f" metrics={stranger_refusals} details={dict(result.details)}"
        )

        assert result.outlasted_contact, "the flood ended before the contact was done"
        # Every contact message was accepted and arrived, in order.
        assert texts_got == [f"still there? {i}" for i in range(CONTACT_TEXTS)]
        # The strangers got their bounded room and not one envelope more; every other
        # envelope of theirs was refused on its own with a typed status.
        assert ok == min(keys * SHARE, POOL)
        assert refused == result.sent - ok > 0
        assert set(result.statuses) == {StatusCode.OK, StatusCode.RESOURCE_EXHAUSTED}
        assert all("has not accepted" in d for d in result.details)
        # The node counts those refusals, by reason.
        share_used = stranger_refusals.get("stranger_share_used", 0)
        pool_full = stranger_refusals.get("stranger_pool_full", 0)
        assert share_used + pool_full == refused
        assert stranger_refusals.get("mailbox_full", 0) == 0
        if keys * SHARE > POOL:
            assert pool_full > 0  # the Sybil keys found the pool full, not the mailbox
