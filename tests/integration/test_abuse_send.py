"""Issue 11.1: responses a peer never reads must not pin memory or call slots.

Attack (against a real ``qpc node`` process): clients from six source IPs
authenticate, each stores one ~5 MiB message to itself, then sends Fetch calls
on its connection and never reads a byte of the answers (no flow-control credit,
but the connection stays alive: acks and pings flow). Before the fix each call
held its ~5 MiB response (twice: the Response and its frame) until the
connection died -- node RSS grew by ~10 MiB per call and the calls stayed
active past every deadline. Now the node-wide send budget (and its per-IP
share) refuses what does not fit with RESOURCE_EXHAUSTED, what fits is reset
after ``send_timeout_s``, and all of it is released.

Meanwhile a legitimate user (its own IP) keeps doing store/fetch/ack round
trips: all must succeed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from abuse_rpc import (
    MIB,
    RoundTrips,
    RssPeak,
    node_stats,
    request_frame,
    round_trip,
    round_trips_until,
    rss_mib,
    store_to_self,
    unread_calls,
    user,
)
from google.protobuf.wrappers_pb2 import BytesValue
from node_harness import start_node_process

from qpc_node.quic import ALPN_FEDERATION, ClientTLS, Connection, ServerTLS, open_endpoint
from qpc_node.quic.testing import PkiFixture, make_test_pki
from qpc_node.rpc import CallContext, MethodTable, RpcServer, ServerConfig
from qpc_node.rpc.quic import QuicRpcHandler
from qpc_node.wire.gen.qpc.v1 import service_pb2

pytestmark = pytest.mark.timeout(90)

ATTACKER_IPS = tuple(f"127.0.0.{i}" for i in range(2, 8))  # six sources
CALLS_PER_ATTACKER = 4
MESSAGE = 5 * MIB - 4096
SEND_TIMEOUT_S = 3.0
ENV = {
    "QPC_LIMITS_RATE_PER_SECOND": "100000",
    "QPC_LIMITS_RATE_BURST": "100000",
    "QPC_LIMITS_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
}
#: Stated bound while under attack (sampled every 5 ms): the issue's target, peak
#: RSS <= 2x idle. A Fetch reserves its answer in the send budget (24 MiB node-wide)
#: before the store reads it, and the frame is built without re-copying the
#: payload, so what the attack can materialize is the budget, not calls x ~4 copies.
#: Measured +23..+38 MiB over a 56 MiB baseline; before +101..+114 MiB (and before
#: the send budget +304 MiB, which stayed).
RSS_PEAK_FACTOR = 2.0
#: "Near baseline" once the attackers are gone.
RSS_RETURN_MIB = 24
REFUSED = "qpc_rpc_budget_refusals_total{budget=send}"
TIMEOUTS = "qpc_rpc_send_timeouts_total"


async def test_unread_responses_are_refused_reset_and_released(tmp_path: Path) -> None:
    proc, info = await start_node_process(tmp_path / "node", ENV, tmp_path / "node.log")
    pid = proc.pid
    try:
        async with user(tmp_path, info.host, info.port, info.cert_fingerprint,
                        source="127.0.0.1") as legit:  # fmt: skip
            calm = RoundTrips()
            for _ in range(20):
                await round_trip(legit, calm)
            baseline = rss_mib(pid)

            under_attack = RoundTrips()
            done = trio.Event()
            rss = RssPeak(pid)
            async with trio.open_nursery() as nursery, AsyncExitStack() as attackers_leave:
                nursery.start_soon(rss.sample_until, done)
                nursery.start_soon(round_trips_until, legit, under_attack, done, 2000)
                attackers = []
                for ip in ATTACKER_IPS:
                    a = await attackers_leave.enter_async_context(
                        user(tmp_path, info.host, info.port, info.cert_fingerprint, source=ip)
                    )
                    await store_to_self(a, MESSAGE)
                    attackers.append(a)
                fetch = service_pb2.FetchRequest(limit=1).SerializeToString()
                unread = [
                    await unread_calls(a, "qpc.v1.Delivery/Fetch", fetch, CALLS_PER_ATTACKER)
                    for a in attackers
                ]
                # Until every unread call has ended (refused or reset), sampling RSS;
                # bounded: the send timeout plus scheduling slack.
                with trio.move_on_after(SEND_TIMEOUT_S + 20):
                    while True:
                        st = await node_stats(legit)
                        ended = st.get(REFUSED, 0) + st.get(TIMEOUTS, 0)
                        # A refused call is counted before its slot is released: wait
                        # for both (what is left: this Stats call + one legit call).
                        if (
                            ended >= len(ATTACKER_IPS) * CALLS_PER_ATTACKER
                            and st["qpc_rpc_active_calls"] <= 2
                        ):
                            break
                        await trio.sleep(0.1)
                # Active calls: the Stats call, and the legitimate user's -- whose
                # previous call may still be closing on the node while its next one
                # runs (seen under load). Read until that settles (bounded, 2 s: the
                # unread calls stayed active for 70 s before the fix).
                for _ in range(40):
                    during = await node_stats(legit)
                    if during["qpc_rpc_active_calls"] <= 2:
                        break
                    await trio.sleep(0.05)
                attacker_rss = rss_mib(pid)
                done.set()
                await attackers_leave.aclose()  # the attackers go away
            del unread
            peak = rss.peak

            # Memory goes back once the peers are gone (bounded poll).
            after = rss_mib(pid)
            with trio.move_on_after(15):
                while after > baseline + RSS_RETURN_MIB:
                    await trio.sleep(0.2)
                    after = rss_mib(pid)
            final = await node_stats(legit)
    finally:
        proc.terminate()
        await proc.wait()

    print(
        f"\nsend abuse: baseline={baseline:.0f} MiB peak={peak:.0f} MiB "
        f"with attackers idle={attacker_rss:.0f} MiB after={after:.0f} MiB; "
        f"legit calm n={calm.ok} median={calm.median_ms:.1f} ms, "
        f"under attack n={under_attack.ok} failed={len(under_attack.failed)} "
        f"median={under_attack.median_ms:.1f} ms; "
        f"send refusals={during.get('qpc_rpc_budget_refusals_total{budget=send}')} "
        f"send timeouts={during.get('qpc_rpc_send_timeouts_total')} "
        f"active calls={during['qpc_rpc_active_calls']}"
    )
    assert peak <= RSS_PEAK_FACTOR * baseline, f"RSS {baseline:.0f} -> {peak:.0f} MiB"
    assert under_attack.ok >= 10 and under_attack.success >= 0.99, under_attack.failed[:3]
    # Every unread call ended while its attacker was still connected: what is left
    # is the Stats call itself and at most one call of the legitimate user.
    assert during["qpc_rpc_active_calls"] <= 2
    total = len(ATTACKER_IPS) * CALLS_PER_ATTACKER
    refused = during["qpc_rpc_budget_refusals_total{budget=send}"]
    timeouts = during["qpc_rpc_send_timeouts_total"]
    assert refused > 0 and timeouts > 0 and refused + timeouts >= total
    assert during["qpc_rpc_send_queued_bytes"] < 64 * 1024  # the legitimate user's, if any
    assert final["qpc_rpc_send_queued_bytes"] == 0
    assert after <= baseline + RSS_RETURN_MIB, f"RSS after {after:.0f} MiB, base {baseline:.0f}"


# -- the same mechanics in-process, over real QUIC on loopback (fast, exact counts) --


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_test_pki()


@asynccontextmanager
async def big_answer_server(pki: PkiFixture, send_timeout: float) -> AsyncIterator[
    tuple[RpcServer, Connection]
]:  # fmt: skip
    """An RpcServer whose ``t.big`` answers 1 MiB, and a client connection to it."""

    async def big(req: BytesValue, ctx: CallContext) -> BytesValue:
        return BytesValue(value=b"x" * MIB)

    methods = MethodTable()
    methods.register("t.big", BytesValue, BytesValue, big)
    config = ServerConfig(
        max_frame_size=2 * MIB,
        send_timeout=send_timeout,
        send_budget=4 * MIB,
        send_budget_per_ip=3 * MIB,  # two 1 MiB answers per IP
    )
    server = RpcServer(methods, config)
    tls = ServerTLS(pki.server, federation_ca=pki.ca.certificate_pem)
    async with (
        open_endpoint("127.0.0.1", 0, server_tls=tls) as sep,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(sep.serve, QuicRpcHandler(server))
        async with open_endpoint("127.0.0.1", 0) as cep:
            ctls = ClientTLS(ALPN_FEDERATION, ca=pki.ca.certificate_pem, credentials=pki.client)
            conn = await cep.connect(sep.local_address[0], sep.local_address[1], ctls)
            yield server, conn
        nursery.cancel_scope.cancel()


async def until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll ``predicate`` (server counters have no event to wait on), bounded."""
    with trio.fail_after(limit):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


async def test_unread_answers_are_refused_beyond_the_share_and_reset_after_the_timeout(
    pki: PkiFixture,
) -> None:
    async with big_answer_server(pki, send_timeout=0.5) as (server, conn):
        body = BytesValue(value=b"q").SerializeToString()
        for i in range(6):
            stream = await conn.open_stream()
            await stream.send_all(request_frame("t.big", body, i + 1))  # never read

        def settled() -> bool:
            s = server.statistics()
            return s.send_timeouts + s.send_budget_refusals == 6 and s.active_calls == 0

        await until(settled)
        s = server.statistics()
        assert (s.send_timeouts, s.send_budget_refusals) == (2, 4)
        assert s.send_queued_bytes == 0 and s.peak_send_queued_bytes <= 3 * MIB
        assert s.statuses["RESOURCE_EXHAUSTED"] == 4


async def test_connection_close_releases_what_was_queued(pki: PkiFixture) -> None:
    async with big_answer_server(pki, send_timeout=60.0) as (server, conn):
        body = BytesValue(value=b"q").SerializeToString()
        for i in range(2):
            stream = await conn.open_stream()
            await stream.send_all(request_frame("t.big", body, i + 1))  # never read
        await until(lambda: server.statistics().send_queued_bytes > 2 * MIB)
        await conn.aclose()  # long before the 60 s send timeout
        await until(
            lambda: (
                server.statistics().send_queued_bytes == 0 and server.statistics().active_calls == 0
            )
        )
        assert server.statistics().send_timeouts == 0
