"""Longest Trio event-loop stall while an agent works, with the node in the same process.

In ``qpc`` the node and the REPL share one Trio loop: an MLS call made on the Trio
thread (KeyPackage generation, a commit, their fsyncs) stalls the node's QUIC
timers and every other task for as long as it runs. This bench runs a real node
in-process (QUIC on loopback, SQLite, durable MLS state), 20 members and one
inviter, and a probe task that sleeps 1 ms in a loop and records how late it
wakes. Two phases are measured for the inviter:

- ``keypackages``: a KeyPackage top-up after the half-life rotation (17 packages),
- ``invite20``: ``/group create`` + ``/group invite`` of 20 members, one by one.

Each phase runs twice: ``inline`` (MLS on the Trio thread, the agent before issue
10: ``Agent(mls_in_thread=False)``) and ``threaded`` (the default: a worker thread
per identity). Prints the longest stall and the 99th percentile of the probe's
lateness per phase and mode, and ``stall ratio=<threaded/inline>`` per phase.

Run: .venv/bin/python bench/agent_stall_bench.py [--members 20] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from qpc_node.client.agent import KP_ROTATE_MS, Agent
from qpc_node.client.identity_store import UserIdentity, open_user
from qpc_node.client.state import AsyncClientState, ClientState
from qpc_node.node import Node, NodeInfo
from qpc_node.ops.clock import ManualWallClock, system_wall_ms
from qpc_node.ops.config import load_config
from qpc_node.quic import ALPN_CLIENT, ClientTLS, open_endpoint
from qpc_node.rpc import RpcClient

PROBE_S = 0.001


@asynccontextmanager
async def in_process_node(tmp: Path, wall: ManualWallClock) -> AsyncIterator[NodeInfo]:
    cfg = load_config(
        env={},
        overrides={
            "node": {"listen": "127.0.0.1:0", "data_dir": str(tmp / "node")},
            "metrics": {"listen": ""},
            "limits": {"rate_per_second": "1000000", "rate_burst": "1000000"},
        },
    )
    node = Node(cfg, default_data=tmp / "node", wall_ms=wall)
    async with trio.open_nursery() as nursery:
        info: NodeInfo = await nursery.start(node.run)
        yield info
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def agent(
    data: Path, info: NodeInfo, wall: ManualWallClock, *, mls_in_thread: bool
) -> AsyncIterator[Agent]:
    """What ``client.connect.open_agent`` does, with the MLS mode selectable."""

    def prepare() -> UserIdentity:
        data.mkdir(parents=True, exist_ok=True)
        return open_user(data, None)

    user = await trio.to_thread.run_sync(prepare)
    state = ClientState(data, user.secret)
    try:
        async with open_endpoint("127.0.0.1", 0) as ep:
            conn = await ep.connect(
                info.host, info.port, ClientTLS(ALPN_CLIENT, pin=info.cert_fingerprint)
            )
            a = Agent(
                user.ident,
                AsyncClientState(state),
                RpcClient(conn.open_stream),
                node_cert_fingerprint=bytes.fromhex(info.cert_fingerprint),
                wall_ms=wall,
                mls_in_thread=mls_in_thread,
            )
            await a.authenticate()
            await a.top_up_key_packages()
            try:
                yield a
            finally:
                await conn.aclose()
    finally:
        state.close()


async def probed(work: Callable[[], Awaitable[None]]) -> tuple[float, float, float]:
    """Run ``work`` beside a 1 ms sleeper; (longest stall s, p99 stall s, work s)."""
    late: list[float] = []
    done = trio.Event()

    async def probe() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await trio.sleep(PROBE_S)
            late.append(max(0.0, time.perf_counter() - t0 - PROBE_S))

    async with trio.open_nursery() as n:
        n.start_soon(probe)
        await trio.sleep(0.01)  # the probe is running
        t0 = time.perf_counter()
        await work()
        took = time.perf_counter() - t0
        done.set()
    late.sort()
    p99 = late[min(len(late) - 1, int(len(late) * 0.99))] if late else 0.0
    return (max(late, default=0.0), p99, took)


async def one_mode(members: int, mls_in_thread: bool) -> dict[str, tuple[float, float, float]]:
    with tempfile.TemporaryDirectory(prefix="qpc-stall-") as d:
        tmp = Path(d)
        wall = ManualWallClock(system_wall_ms())
        async with in_process_node(tmp, wall) as info, AsyncExitStack() as stack:
            peers = [
                await stack.enter_async_context(
                    agent(tmp / f"m{i}", info, wall, mls_in_thread=True)
                )
                for i in range(members)
            ]
            inviter = await stack.enter_async_context(
                agent(tmp / "inviter", info, wall, mls_in_thread=mls_in_thread)
            )
            wall.advance(KP_ROTATE_MS + 1)

            async def keypackages() -> None:
                await inviter.top_up_key_packages()

            async def invite() -> None:
                await inviter.group_create("bench")
                for p in peers:
                    await inviter.group_invite("bench", p.ident.fingerprint)

            out = {"keypackages": await probed(keypackages), "invite20": await probed(invite)}
            assert len(await inviter.group_members("bench")) == members + 1
            return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1, help="repeat and keep the median")
    args = ap.parse_args()
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _ in range(args.rounds):
        for mode, threaded in (("inline", False), ("threaded", True)):
            got = trio.run(one_mode, args.members, threaded)
            for phase, fig in got.items():
                rows.setdefault((phase, mode), []).append(fig)
    print(f"{'phase':<12} {'mode':<9} {'max stall ms':>13} {'p99 stall ms':>13} {'work s':>8}")
    med: dict[tuple[str, str], tuple[float, float, float]] = {}
    for (phase, mode), figs in sorted(rows.items()):
        m = (
            statistics.median(f[0] for f in figs),
            statistics.median(f[1] for f in figs),
            statistics.median(f[2] for f in figs),
        )
        med[(phase, mode)] = m
        print(f"{phase:<12} {mode:<9} {m[0] * 1e3:>13.1f} {m[1] * 1e3:>13.1f} {m[2]:>8.2f}")
    for phase in ("keypackages", "invite20"):
        ratio = med[(phase, "threaded")][0] / max(med[(phase, "inline")][0], 1e-9)
        print(f"{phase} max stall ratio={ratio:.3f} (threaded/inline)")


if __name__ == "__main__":
    main()
