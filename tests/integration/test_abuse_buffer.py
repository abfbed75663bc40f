"""Issue 11.3: request bytes a node buffers are capped node-wide and per IP.

Attack (against a real ``qpc node`` process): clients from six source IPs
authenticate and open Enqueue calls that announce a ~5 MiB request frame, send
3 MiB of it and stall (a slow sender: each call may take ``read_timeout`` to
finish its frame). Before the fix every such call buffered what it had sent
-- 6 IPs x 6 calls x 3 MiB -- and ``qpc_rpc_buffered_bytes`` only reported it.
Now each frame is budgeted when its length prefix arrives (node-wide 24 MiB,
8 MiB per IP): what does not fit is refused with RESOURCE_EXHAUSTED at once and
its stream is stopped, so the peer cannot push the rest.

Meanwhile a legitimate user (its own IP) keeps doing store/fetch/ack round
trips: its frames are small and always fit.
"""

from __future__ import annotations

import contextlib
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from abuse_rpc import (
    MIB,
    RoundTrips,
    RssPeak,
    User,
    envelope_to,
    node_stats,
    request_frame,
    round_trip,
    round_trips_until,
    rss_mib,
    user,
)
from node_harness import start_node_process

from qpc_node.quic import QuicStream

pytestmark = pytest.mark.timeout(90)

ATTACKER_IPS = tuple(f"127.0.0.{i}" for i in range(2, 8))  # six sources
CALLS_PER_ATTACKER = 6
ANNOUNCED = 5 * MIB - 4096  # ciphertext of the announced Enqueue
SENT = 3 * MIB  # what each call delivers of its frame before stalling
HOLD_S = 9.0  # at most this long, the stalled calls are held (read_timeout is 10 s)
ENV = {"QPC_LIMITS_RATE_PER_SECOND": "100000", "QPC_LIMITS_RATE_BURST": "100000"}
BUDGET = 24 * MIB  # limits.rpc_buffer_bytes default
#: Stated bound while under attack: what the budget admits (four 5 MiB frames,
#: 3 MiB of each sent) plus the QUIC receive windows (1 MiB per connection) and
#: slack. Before the fix: +130 MiB.
RSS_GROWTH_BOUND_MIB = 48
RSS_RETURN_MIB = 24
REFUSED = "qpc_rpc_budget_refusals_total{budget=request}"


async def stalled_call(u: User, frame: bytes, refused: list[int], sent: list[int]) -> None:
    """Send ``SENT`` bytes of ``frame`` and stall; note a node that stops us."""
    stream: QuicStream = await u.conn.open_stream()
    try:
        await stream.send_all(frame[:SENT])
    except trio.BrokenResourceError:  # STOP_SENDING: the node refused the frame
        refused.append(1)
        return
    sent.append(1)
    await trio.sleep_forever()


async def test_buffered_request_bytes_are_capped(tmp_path: Path) -> None:
    proc, info = await start_node_process(tmp_path / "node", ENV, tmp_path / "node.log")
    pid = proc.pid
    pin = info.cert_fingerprint
    try:
        async with user(tmp_path, info.host, info.port, pin, source="127.0.0.1") as legit:
            calm = RoundTrips()
            for _ in range(20):
                await round_trip(legit, calm)
            baseline = rss_mib(pid)

            under_attack = RoundTrips()
            done = trio.Event()
            rss = RssPeak(pid)
            stopped: list[int] = []
            sent: list[int] = []
            max_buffered = 0.0
            async with AsyncExitStack() as attackers_leave:
                attackers = [
                    await attackers_leave.enter_async_context(
                        user(tmp_path, info.host, info.port, pin, source=ip)
                    )
                    for ip in ATTACKER_IPS
                ]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(rss.sample_until, done)
                    nursery.start_soon(round_trips_until, legit, under_attack, done, 2000)
                    for a in attackers:
                        body = envelope_to(a.me, ANNOUNCED).SerializeToString()
                        frame = request_frame("qpc.v1.Delivery/Enqueue", body, 1)
                        for _ in range(CALLS_PER_ATTACKER):
                            nursery.start_soon(stalled_call, a, frame, stopped, sent)
                    total = len(ATTACKER_IPS) * CALLS_PER_ATTACKER
                    with trio.move_on_after(HOLD_S):
                        # Until every call was refused or has sent all it will, and
                        # held a moment; sampling the node's own view meanwhile.
                        settled = 0
                        while settled < 5:
                            st = await node_stats(legit)
                            max_buffered = max(max_buffered, st["qpc_rpc_buffered_bytes"])
                            settled = settled + 1 if len(stopped) + len(sent) == total else 0
                            await trio.sleep(0.1)
                    during = await node_stats(legit)
                    done.set()
                    nursery.cancel_scope.cancel()
                with contextlib.suppress(trio.BrokenResourceError):
                    await attackers_leave.aclose()  # the attackers go away
            peak = rss.peak

            after = rss_mib(pid)
            with trio.move_on_after(15):
                while after > baseline + RSS_RETURN_MIB:
                    await trio.sleep(0.2)
                    after = rss_mib(pid)
            # The reservations go when the node has processed the attackers' closes
            # (asynchronous to our aclose): poll, bounded, then assert below.
            final = await node_stats(legit)
            with trio.move_on_after(15):
                while final["qpc_rpc_buffered_bytes"] > 64 * 1024:
                    await trio.sleep(0.2)
                    final = await node_stats(legit)
    finally:
        proc.terminate()
        await proc.wait()

    print(
        f"\nbuffer abuse: baseline={baseline:.0f} MiB peak={peak:.0f} MiB after={after:.0f} MiB; "
        f"legit calm n={calm.ok} median={calm.median_ms:.1f} ms, "
        f"under attack n={under_attack.ok} failed={len(under_attack.failed)} "
        f"median={under_attack.median_ms:.1f} ms; "
        f"max qpc_rpc_buffered_bytes={max_buffered / MIB:.1f} MiB "
        f"request refusals={during.get(REFUSED)} streams stopped={len(stopped)} "
        f"fully sent={len(sent)}"
    )
    assert peak - baseline <= RSS_GROWTH_BOUND_MIB, f"RSS {baseline:.0f} -> {peak:.0f} MiB"
    assert under_attack.ok >= 10 and under_attack.success >= 0.99, under_attack.failed[:3]
    assert max_buffered <= BUDGET + 64 * 1024  # + the legitimate user's small frames
    # Every IP gets at most one 5 MiB frame of its 8 MiB share, and only four fit
    # the node's 24 MiB: the rest is refused (and told to stop sending).
    assert during[REFUSED] >= total - 4
    assert final["qpc_rpc_buffered_bytes"] <= 64 * 1024
    assert after <= baseline + RSS_RETURN_MIB, f"RSS after {after:.0f} MiB, base {baseline:.0f}"
