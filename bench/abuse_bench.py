"""Abuse bench (issue 11): a real ``qpc node`` process per attack, on loopback.

For each attack the legitimate user does its round trips first without the
attack, then while it runs (same node, same run): success rate and median
latency of both, and the node's RSS when idle (after the calm phase) and at its
peak under attack (sampled from /proc every 10 ms). The attackers and the
legitimate users are those of the abuse tests (``tests/integration/abuse_rpc.py``,
imported, not copied).

Attacks: unread Fetch responses (issue 11.1), a burst and stream of
undecryptable Initials and a steady ClientHello flood (11.2), slow buffered
requests (11.3), a stranger flooding a user's mailbox (11.4), kill -9 and a
restart on the same port (11.5). The call-rate limiter is lifted (every party
shares 127/8): this measures the node's resource bounds, not its rate limit.

Targets: legitimate success >= 0.99 under every attack, peak RSS <= 2x idle.
Last line: ``abuse legit_success=<worst 0..1> peak_rss_mib=<max>``.
Run: ``.venv/bin/python bench/abuse_bench.py`` (bounded: about 2 minutes).
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from abuse_rpc import (
    MIB,
    RssPeak,
    User,
    bind_sources,
    blast,
    client_hellos,
    enqueue_statuses,
    envelope_to,
    garbage_initial,
    health_round_trip,
    request_frame,
    round_trip,
    rss_mib,
    store_to_self,
    unread_calls,
    user,
)
from abuse_rpc import RoundTrips as _Trips
from node_harness import start_node_process

from qpc_node.errors import QpcError
from qpc_node.node import NodeInfo
from qpc_node.quic import ConnectionClosed, QuicStream, open_endpoint
from qpc_node.rpc.errors import RpcError
from qpc_node.wire.gen.qpc.v1 import service_pb2

ENV = {"QPC_LIMITS_RATE_PER_SECOND": "100000", "QPC_LIMITS_RATE_BURST": "100000"}
CALM_OPS = 15
OP_TIMEOUT_S = 10.0  # a legitimate operation slower than this counts as failed
ATTACKER_IPS = [f"127.0.0.{i}" for i in range(2, 8)]
UDP_SOURCES = [f"127.0.1.{i}" for i in range(1, 21)]


@dataclass(slots=True)
class Ops:
    """A legitimate user's operations: successes with their latency, failures."""

    seconds: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def success(self) -> float:
        n = len(self.seconds) + self.failed
        return len(self.seconds) / n if n else 0.0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000 if self.seconds else float("nan")

    async def time(self, op: Callable[[], Awaitable[object]]) -> None:
        start = trio.current_time()
        try:
            with trio.fail_after(OP_TIMEOUT_S):
                await op()
        except (
            QpcError,
            RpcError,
            ConnectionClosed,
            AssertionError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            OSError,
        ):
            self.failed += 1
            return
        self.seconds.append(trio.current_time() - start)


@dataclass(slots=True)
class Row:
    attack: str
    calm: Ops
    attacked: Ops
    idle_mib: float
    peak_mib: float
    note: str = ""


async def rpc_op(u: User) -> None:
    """Store a small message to self, fetch it, ack it (abuse_rpc.round_trip)."""
    trips = _Trips()
    await round_trip(u, trips)
    if trips.failed:
        raise AssertionError(trips.failed[0])


async def legit_until(op: Callable[[], Awaitable[object]], out: Ops, done: trio.Event) -> None:
    for _ in range(2000):  # bounded; paced below any limit
        if done.is_set():
            return
        await out.time(op)
        await trio.sleep(0.02)


# -- the attacks ----------------------------------------------------------------


async def unread_responses(tmp: Path, info: NodeInfo, u: User, stop: trio.Event) -> str:
    """Six IPs store a ~5 MiB message each and send 4 Fetch calls they never read."""
    async with AsyncExitStack() as leave:
        streams: list[QuicStream] = []
        for ip in ATTACKER_IPS:
            a = await leave.enter_async_context(
                user(tmp, info.host, info.port, info.cert_fingerprint, source=ip)
            )
            await store_to_self(a, 5 * MIB - 4096)
            fetch = service_pb2.FetchRequest(limit=1).SerializeToString()
            streams += await unread_calls(a, "qpc.v1.Delivery/Fetch", fetch, 4)
        await trio.sleep(6.0)  # past the send timeout (3 s here): refused or reset
        stop.set()
    return f"{len(streams)} unread Fetch calls of 5 MiB"


async def undecryptable_initials(tmp: Path, info: NodeInfo, u: User, stop: trio.Event) -> str:
    socks = await bind_sources(UDP_SOURCES)
    try:
        await blast(socks, info.port, [garbage_initial() for _ in range(1100)], None)
        for _ in range(30):  # then 1,000/s for 3 s
            await blast(socks, info.port, [garbage_initial() for _ in range(100)], 1000)
    finally:
        for s in socks:
            s.close()
    stop.set()
    return "1,100 at once + 1,000/s x 3 s, 20 sources"


async def client_hello_flood(tmp: Path, info: NodeInfo, u: User, stop: trio.Event) -> str:
    hellos = client_hellos(400 * 6)
    socks = await bind_sources(UDP_SOURCES)
    try:
        await blast(socks, info.port, hellos, 400)
    finally:
        for s in socks:
            s.close()
    stop.set()
    return "400 ClientHellos/s x 6 s, 20 sources"


async def slow_requests(tmp: Path, info: NodeInfo, u: User, stop: trio.Event) -> str:
    """Six IPs x 6 calls announce a 5 MiB Enqueue, send 3 MiB and stall."""
    sent: list[int] = []

    async def stalled(a: User, frame: bytes) -> None:
        stream = await a.conn.open_stream()
        with contextlib.suppress(trio.BrokenResourceError):  # STOP_SENDING: refused
            await stream.send_all(frame[: 3 * MIB])
            sent.append(1)
        await trio.sleep_forever()

    async with AsyncExitStack() as leave:
        attackers = [
            await leave.enter_async_context(
                user(tmp, info.host, info.port, info.cert_fingerprint, source=ip)
            )
            for ip in ATTACKER_IPS
        ]
        async with trio.open_nursery() as nursery:
            for a in attackers:
                frame = request_frame(
                    "qpc.v1.Delivery/Enqueue",
                    envelope_to(a.me, 5 * MIB - 4096).SerializeToString(),
                    1,
                )
                for _ in range(6):
                    nursery.start_soon(stalled, a, frame)
            await trio.sleep(8.0)  # within the 10 s read timeout
            stop.set()
            nursery.cancel_scope.cancel()
        with contextlib.suppress(trio.BrokenResourceError):
            await leave.aclose()
    return f"36 stalled 5 MiB requests, {len(sent)} got 3 MiB in"


Attack = Callable[[Path, NodeInfo, User, trio.Event], Awaitable[str]]


async def scenario(name: str, attack: Attack, env: dict[str, str], base: Path) -> Row:
    tmp = base / name
    tmp.mkdir()
    proc, info = await start_node_process(tmp / "node", {**ENV, **env}, tmp / "node.log")
    pin = info.cert_fingerprint
    try:
        async with (
            user(tmp, info.host, info.port, pin, source="127.0.0.1") as u,
            open_endpoint("127.0.0.1", 0) as ep,
        ):
            if attack in (undecryptable_initials, client_hello_flood):

                async def op() -> None:  # a user who connects anew each time
                    await health_round_trip(ep, info.host, info.port, pin)
            else:

                async def op() -> None:
                    await rpc_op(u)

            calm = Ops()
            for _ in range(CALM_OPS):
                await calm.time(op)
            idle = rss_mib(proc.pid)
            attacked = Ops()
            stop, sampled = trio.Event(), trio.Event()
            rss = RssPeak(proc.pid, interval=0.01)
            note = ""
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rss.sample_until, sampled)
                nursery.start_soon(legit_until, op, attacked, stop)
                note = await attack(tmp, info, u, stop)
                stop.set()
                sampled.set()
            peak = max(rss.peak, rss_mib(proc.pid))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    return Row(name, calm, attacked, idle, peak, note)


async def stranger_flood(base: Path) -> Row:
    """Two stranger keys send 256-envelope batches to a victim (offline, never
    fetching) while the victim's contact keeps writing to it, one message at a time."""
    tmp = base / "stranger_flood"
    tmp.mkdir()
    env = {**ENV, "QPC_LIMITS_MAILBOX_MAX_MESSAGES": "2000"}
    proc, info = await start_node_process(tmp / "node", env, tmp / "node.log")
    pin = info.cert_fingerprint
    refused = stored = 0
    try:
        async with AsyncExitStack() as stack:
            victim, contact, *strangers = [
                await stack.enter_async_context(user(tmp, info.host, info.port, pin, source=ip))
                for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
            ]
            # The victim writes to its contact once: from then on it accepts the contact.
            assert await enqueue_statuses(victim, contact.me, 1) == [0]

            async def op() -> None:
                assert await enqueue_statuses(contact, victim.me, 1) == [0]

            calm = Ops()
            for _ in range(CALM_OPS):
                await calm.time(op)
            idle = rss_mib(proc.pid)
            attacked = Ops()
            stop, sampled = trio.Event(), trio.Event()
            rss = RssPeak(proc.pid, interval=0.01)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rss.sample_until, sampled)
                nursery.start_soon(legit_until, op, attacked, stop)
                for batch in range(60):  # 15,360 envelopes, well past the mailbox quota
                    got = await enqueue_statuses(strangers[batch % 2], victim.me, 256)
                    stored += got.count(0)
                    refused += len(got) - got.count(0)
                stop.set()
                sampled.set()
            peak = max(rss.peak, rss_mib(proc.pid))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    note = f"{stored + refused} stranger envelopes, {stored} stored, {refused} refused"
    return Row("stranger_flood", calm, attacked, idle, peak, note)


async def restart_scenario(base: Path) -> Row:
    """kill -9 and a restart on the same port: the user's next call on its old
    connection; it reconnects (new connection, new session) when told the old one
    is gone. Under attack: the rounds right after each of three restarts."""
    tmp = base / "restart"
    tmp.mkdir()
    data, log = tmp / "node", tmp / "node.log"
    proc, info = await start_node_process(data, ENV, log)
    pin = info.cert_fingerprint
    calm, attacked = Ops(), Ops()
    peak = idle = 0.0
    first_ok: list[float] = []
    try:
        async with AsyncExitStack() as stack:
            u = await stack.enter_async_context(
                user(tmp, info.host, info.port, pin, source="127.0.0.1")
            )
            for _ in range(CALM_OPS):
                await calm.time(partial(rpc_op, u))
            idle = rss_mib(proc.pid)
            for _ in range(3):
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                proc, _ = await start_node_process(data, ENV, log, listen=f"127.0.0.1:{info.port}")
                # The next call goes out on the old connection; the new process answers
                # with a stateless reset, the client reconnects (new session) and
                # repeats the call -- one operation, timed from its start.
                start = trio.current_time()
                with trio.move_on_after(OP_TIMEOUT_S):
                    with contextlib.suppress(AssertionError, ConnectionClosed, RpcError):
                        await rpc_op(u)
                    await u.conn.closed.wait()
                if u.conn.closed.is_set():
                    u = await stack.enter_async_context(
                        user(tmp, info.host, info.port, pin, source="127.0.0.1")
                    )
                    await attacked.time(partial(rpc_op, u))
                else:
                    attacked.failed += 1  # the client waited out the old connection
                if attacked.seconds:
                    first_ok.append(trio.current_time() - start)
                    attacked.seconds[-1] = first_ok[-1]  # the whole operation
                for _ in range(5):
                    await attacked.time(partial(rpc_op, u))
                peak = max(peak, rss_mib(proc.pid))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    note = "first OK after restart " + "/".join(f"{s * 1000:.0f}" for s in first_ok) + " ms"
    return Row("restart_reset", calm, attacked, idle, max(peak, idle), note)


async def main() -> None:
    rows: list[Row] = []
    t0 = trio.current_time()
    with tempfile.TemporaryDirectory(prefix="qpc-abuse-") as d:
        base = Path(d)
        with trio.fail_after(170):
            rows.append(
                await scenario(
                    "unread_responses", unread_responses, {"QPC_LIMITS_SEND_TIMEOUT_S": "3"}, base
                )
            )
            rows.append(await scenario("undecryptable_initials", undecryptable_initials, {}, base))
            rows.append(await scenario("client_hello_flood", client_hello_flood, {}, base))
            rows.append(await scenario("slow_requests", slow_requests, {}, base))
            rows.append(await stranger_flood(base))
            rows.append(await restart_scenario(base))
    print(f"({len(rows)} attacks in {trio.current_time() - t0:.0f} s)", file=sys.stderr)
    print(
        f"{'attack':<24}{'calm ok':>9}{'calm ms':>9}{'attack ok':>11}{'attack ms':>11}"
        f"{'n':>6}{'idle MiB':>10}{'peak MiB':>10}{'x idle':>8}  note"
    )
    for r in rows:
        n = len(r.attacked.seconds) + r.attacked.failed
        print(
            f"{r.attack:<24}{r.calm.success:>9.3f}{r.calm.median_ms:>9.1f}"
            f"{r.attacked.success:>11.3f}{r.attacked.median_ms:>11.1f}{n:>6}"
            f"{r.idle_mib:>10.0f}{r.peak_mib:>10.0f}{r.peak_mib / r.idle_mib:>8.2f}  {r.note}"
        )
    worst = min(r.attacked.success for r in rows)
    peak = max(r.peak_mib for r in rows)
    met = [
        f"legit>=0.99: {'met' if worst >= 0.99 else 'MISSED'}",
        "peak<=2x idle: "
        + ("met" if all(r.peak_mib <= 2 * r.idle_mib for r in rows) else "MISSED"),
    ]
    print("targets: " + ", ".join(met))
    print(f"abuse legit_success={worst:.3f} peak_rss_mib={peak:.0f}")


if __name__ == "__main__":
    trio.run(main)
