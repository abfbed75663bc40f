"""Issue 11 item 2: handshake floods against a real node process.

The attacker sends from 20 loopback source addresses (127.0.1.1-20; Linux
routes all of 127/8 to lo, so no raw sockets are needed) and never reads a
reply, as a spoofer could not. Meanwhile a legitimate user connects and makes
a Health round trip, again and again: every round trip must succeed, and
their median latency stays within a bound *relative to* unattacked round
trips measured in the same test. Node RSS is sampled from /proc and the
node's own metrics (authenticated Stats RPC) must show the refusals.

Before the fix, both floods filled the 1,024 connection slots (each held for
the 22.5 s idle timeout) and the user's connect failed after its 10 s
handshake timeout.
"""

from __future__ import annotations

import signal
import statistics
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from abuse_rpc import bind_sources, blast, client_hellos, garbage_initial, health_round_trip
from node_harness import node_stats, start_node_process

from qpc_node.ops.clock import ManualWallClock
from qpc_node.quic import open_endpoint

pytestmark = pytest.mark.timeout(90)

SOURCES = [f"127.0.1.{i}" for i in range(1, 21)]  # loopback: no spoofing needed
BURST = 1100  # what filled all 1,024 slots in the report
HELLO_RATE, HELLO_SECONDS = 400, 7  # the report's steady ClientHello rate; past the 5 s deadline
ROUND_TRIPS = 8  # at least; more while the attack lasts
PAUSE = 0.1  # between the user's round trips
#: An attacked round trip may take this many unattacked ones (plus the Retry RTT).
SLOWDOWN = 10


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def under_attack(
    tmp: Path,
    wall: ManualWallClock,
    attack: Callable[[list[trio.socket.SocketType], int, trio.Event], Awaitable[None]],
) -> tuple[list[float], list[float], int, int, dict[str, float]]:
    """Baseline round trips, then round trips while ``attack`` runs; RSS idle/peak."""
    proc, info = await start_node_process(tmp / "node", log_file=tmp / "node.log")
    try:
        async with open_endpoint("127.0.0.1", 0) as ep:
            baseline = [
                await health_round_trip(ep, info.host, info.port, info.cert_fingerprint)
                for _ in range(ROUND_TRIPS)
            ]
            idle_rss = rss_kib(proc.pid)
            peak_rss = idle_rss
            socks = await bind_sources(SOURCES)
            attacked: list[float] = []
            underway, over = trio.Event(), trio.Event()

            async def attacker() -> None:
                await attack(socks, info.port, underway)
                over.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attacker)
                await underway.wait()
                while not over.is_set() or len(attacked) < ROUND_TRIPS:  # each one must succeed
                    attacked.append(
                        await health_round_trip(ep, info.host, info.port, info.cert_fingerprint)
                    )
                    peak_rss = max(peak_rss, rss_kib(proc.pid))
                    await trio.sleep(PAUSE)
            for s in socks:
                s.close()
        stats = await node_stats(tmp, info, wall)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    return baseline, attacked, idle_rss, peak_rss, stats


def stats_line(stats: dict[str, float]) -> str:
    keys = ("retries", "undecryptable", "half_open", "refusals", "handshakes_total")
    return " ".join(f"{k}={v:g}" for k, v in sorted(stats.items()) if any(w in k for w in keys))


def check_round_trips(baseline: list[float], attacked: list[float]) -> None:
    assert len(attacked) >= ROUND_TRIPS  # each one succeeded (a failure raises)
    base, hit = statistics.median(baseline), statistics.median(attacked)
    print(
        f"round trips: {len(baseline)} unattacked, median {base * 1000:.1f} ms; "
        f"{len(attacked)} attacked (all OK), median {hit * 1000:.1f} ms"
    )
    assert hit <= SLOWDOWN * base, f"median round trip {hit:.3f}s under attack vs {base:.3f}s"


async def test_undecryptable_initial_flood(tmp_path: Path, wall: ManualWallClock) -> None:
    async def attack(socks: list[trio.socket.SocketType], port: int, underway: trio.Event) -> None:
        await blast(socks, port, [garbage_initial() for _ in range(BURST)], None)
        underway.set()
        for _ in range(30):  # and keep it up for 3 s: 1,000 more per second
            await blast(socks, port, [garbage_initial() for _ in range(100)], 1000)

    baseline, attacked, idle, peak, stats = await under_attack(tmp_path, wall, attack)
    print(f"node RSS: {idle} KiB idle, {peak} KiB peak; {stats_line(stats)}")
    check_round_trips(baseline, attacked)
    assert peak <= 2 * idle, f"RSS {idle} KiB idle, {peak} KiB under attack"
    assert stats["qpc_quic_dropped_datagrams_total,reason=undecryptable_initial"] >= BURST
    assert stats["qpc_quic_handshakes_total,result=failed,role=server"] == 0


async def test_client_hello_flood(tmp_path: Path, wall: ManualWallClock) -> None:
    hellos = client_hellos(HELLO_RATE * HELLO_SECONDS)  # made up front: ~1 ms each

    async def attack(socks: list[trio.socket.SocketType], port: int, underway: trio.Event) -> None:
        await blast(socks, port, hellos[:HELLO_RATE], HELLO_RATE)  # the first second
        underway.set()
        await blast(socks, port, hellos[HELLO_RATE:], HELLO_RATE)

    baseline, attacked, idle, peak, stats = await under_attack(tmp_path, wall, attack)
    print(f"node RSS: {idle} KiB idle, {peak} KiB peak; {stats_line(stats)}")
    check_round_trips(baseline, attacked)
    assert peak <= 2 * idle, f"RSS {idle} KiB idle, {peak} KiB under attack"
    # Beyond the Retry threshold a ClientHello costs one Retry and no state;
    # those admitted before it were dropped at the half-open deadline.
    assert stats["qpc_quic_retries_sent_total"] >= len(hellos) / 2
    assert stats["qpc_quic_half_open_timeouts_total"] > 0
