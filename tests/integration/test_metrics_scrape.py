"""Issue 6 must-show: /metrics scraped during a real scenario shows the calls made;
/readyz follows the node; bad HTTP gets 400 and the server keeps serving;
/stats numbers come over the authenticated Stats RPC.

The test wires the metrics itself (NodeMetrics on the running node, observer on
its RpcServer, HTTP on 127.0.0.1:0), so it does not depend on how node.py
starts them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from node_harness import running_node, texts, users
from prometheus_client.parser import text_string_to_metric_families

from qpc_node.ops.clock import ManualWallClock
from qpc_node.ops.http import HttpServer, serve_metrics
from qpc_node.ops.metrics import format_stats
from qpc_node.service.stats import STATS_METHOD, samples_from_proto
from qpc_node.wire.gen.qpc.v1 import ops_pb2
from tests.integration.fed_nodes import free_port, identity, mesh_node, until
from tests.integration.test_mesh_dm import homed, user

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def http(port: int, request: bytes) -> tuple[int, bytes]:
    """One request over real loopback TCP; the server closes after answering."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        got = bytearray()
        with trio.fail_after(10):
            for _ in range(10_000):  # bounded; ends at the server's close
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                got += chunk
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def scrape(port: int) -> Samples:
    status, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def calls(samples: Samples, method: str, status: str = "OK") -> float:
    return samples.get(("qpc_rpc_calls_total", (("method", method), ("status", status))), 0.0)


async def test_scrape_during_a_scenario(tmp_path: Path, wall: ManualWallClock) -> None:
    async with trio.open_nursery() as outer:
        async with running_node(tmp_path, wall) as (node, info):
            # The node's own metrics; served here from an outer nursery so the
            # endpoint outlives the node and can report it not ready afterwards.
            metrics = node.metrics
            server: HttpServer = await outer.start(serve_metrics, "127.0.0.1:0", metrics)
            port = server.port

            before = await scrape(port)
            assert before[("qpc_node_ready", ())] == 1
            async with users(tmp_path, info, wall, "a", "b") as (a, b):
                for n in range(3):
                    await a.dm(b.ident.fingerprint, f"hello {n}")
                assert len(await texts(b, 3)) == 3

                after = await scrape(port)
                assert calls(after, "qpc.v1.Auth/Prove") >= 2
                assert calls(after, "qpc.v1.Delivery/Enqueue") >= 3
                assert calls(after, "qpc.v1.Delivery/Fetch") >= 1
                assert calls(before, "qpc.v1.Delivery/Enqueue") == 0
                enq = (("method", "qpc.v1.Delivery/Enqueue"),)
                assert after[("qpc_rpc_call_seconds_count", enq)] >= 3
                assert after[("qpc_rpc_call_seconds_sum", enq)] > 0
                assert after[("qpc_store_enqueued_total", ())] >= 3
                assert after[("qpc_store_op_seconds_count", ())] > 0
                assert ("qpc_mailbox_messages", ()) in after  # totals over all mailboxes
                assert after[("qpc_rpc_responses_total", (("status", "OK"),))] > 0
                assert after[("process_resident_memory_bytes", ())] > 0
                ok = (("result", "ok"), ("role", "server"))
                assert after[("qpc_quic_handshakes_total", ok)] >= 2  # the two users

                # Bad HTTP: 400 (or 405/404), and the next scrape still works.
                assert (await http(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n"))[0] == 400
                assert (await http(port, b"GET /metrics HTTP/9.9\r\n\r\n"))[0] == 505
                assert (await http(port, b"DELETE /metrics HTTP/1.1\r\n\r\n"))[0] == 405
                assert (await http(port, b"GET /admin HTTP/1.1\r\n\r\n"))[0] == 404
                big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
                assert (await http(port, big))[0] == 431
                assert (await http(port, b"GET /readyz HTTP/1.1\r\n\r\n"))[0] == 200
                assert calls(await scrape(port), "qpc.v1.Delivery/Enqueue") >= 3
                assert server.statistics().bad_requests == 4

                # /stats: the same numbers over the authenticated Stats RPC.
                resp = await a._rpc.call(
                    STATS_METHOD, ops_pb2.StatsRequest(), ops_pb2.StatsResponse
                )
                got = samples_from_proto(resp)
                text = format_stats(got)
                assert "rpc_calls_total{method=qpc.v1.Delivery/Enqueue,status=OK}" in text
                wire = resp.SerializeToString()
                for me in (a.me, b.me):  # no identity in any form
                    assert me not in wire and me.hex().encode() not in wire
                    assert me[:4].hex() not in text

        # The node has stopped (drained, store closed): not ready, but the process lives.
        assert (await http(port, b"GET /readyz HTTP/1.1\r\n\r\n"))[0] == 503
        assert (await http(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
        final = await scrape(port)
        assert final[("qpc_node_ready", ())] == 0
        outer.cancel_scope.cancel()


async def test_node_serves_its_own_metrics_endpoint(tmp_path: Path, wall: ManualWallClock) -> None:
    async with running_node(tmp_path, wall, metrics={"listen": "127.0.0.1:0"}) as (node, _):
        assert node.metrics_http is not None
        port = node.metrics_http.port
        assert (await http(port, b"GET /readyz HTTP/1.1\r\n\r\n"))[0] == 200
        assert (await http(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
        assert (await scrape(port))[("qpc_node_ready", ())] == 1


async def test_mesh_counters_on_a_scrape_of_a_relaying_node(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """A - B on loopback (static peers); a DM from a user on A to a user on B: A's
    /metrics shows the link, the peer, routes, bindings, announcements and the relay."""
    ids = {n: identity(tmp_path, n)[1] for n in "ab"}
    ports = {n: free_port() for n in "ab"}
    with trio.fail_after(100):
        async with (
            mesh_node(tmp_path, "b", ports["b"], [(ports["a"], ids["a"])]) as (b_node, b_info),
            mesh_node(tmp_path, "a", ports["a"], [(ports["b"], ids["b"])]) as (a_node, a_info),
            trio.open_nursery() as nursery,
            user(tmp_path, "x", a_info, wall) as x,
            user(tmp_path, "y", b_info, wall) as y,
        ):
            server: HttpServer = await nursery.start(serve_metrics, "127.0.0.1:0", a_node.metrics)
            await homed(a_node, y, b_node)
            await x.dm(y.ident.fingerprint, "over the mesh")
            assert [m.text for m in await texts(y, 1, wait=20)] == ["over the mesh"]

            async def relayed() -> bool:
                return (await scrape(server.port)).get(("qpc_relay_envelopes_out_total", ()), 0) > 0

            await until(relayed, within=10)
            got = await scrape(server.port)
            assert got[("qpc_mesh_links_up", ())] == 1
            assert got[("qpc_mesh_link_events_total", (("event", "up"),))] >= 1
            assert got[("qpc_mesh_peers", (("state", "up"),))] == 1
            assert got[("qpc_mesh_routes", ())] >= 1  # B
            assert got[("qpc_mesh_bindings", ())] >= 2  # x and y
            assert got[("qpc_mesh_updates_sent_total", ())] >= 1
            assert got[("qpc_mesh_updates_received_total", (("result", "applied"),))] >= 1
            accepted = (("outcome", "accepted"),)
            assert got[("qpc_mesh_route_announcements_total", accepted)] >= 1
            assert got[("qpc_mesh_binding_announcements_total", accepted)] >= 2
            assert got[("qpc_relay_custody_queued", ())] == 0  # B took it
            assert got[("qpc_federation_limit_hits_total", (("neighbour", "other"),))] == 0
            nursery.cancel_scope.cancel()
