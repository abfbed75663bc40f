"""A line A - B - C of real ``qpc node`` processes on two bridges (A and C share no
link), users' clients as driver processes inside the namespaces:

- a DM sent with ``hop_limit 1`` from A's user to C's user (2 hops away) is refused to
  the sender, typed (FAILED_PRECONDITION, RELAY_HOP_LIMIT_EXCEEDED in the detail): A
  knows the distance and takes no custody of it; one with ``hop_limit 2`` sent right
  after it arrives;
- B is ``kill -9``'d mid-way through 1,000 DMs from A's user to C's user and restarted
  on the same data directory: in the end every one of them arrived exactly once at C's
  user, who fetches and acks as it goes (hop-by-hop custody in SQLite at each node).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from mesh_procs import Driver, NodeProc, driver, loadavg
from netns_kit import Host, Netns

from tests.integration.fed_nodes import until
from tests.integration.relay_kill9 import assert_exactly_once, kill_mid_way

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

N = 1000
CONVERGE_S = 90


def line(net: Netns) -> list[Host]:
    a, b, c = net.host("a"), net.host("b"), net.host("c")
    net.connect(a, "br0")
    net.connect(b, "br0")
    net.connect(b, "br1")
    net.connect(c, "br1")
    return [a, b, c]


def start_b(host: Host, data: Path) -> NodeProc:
    return NodeProc(host, data, "mesh0,mesh1", log="info")


async def converged(sender: Driver, receiver: Driver, c: NodeProc) -> None:
    """The sender's node has a 2-hop route to C and both users' homes (and the
    receiver's node knows both homes too)."""
    deadline = trio.current_time() + CONVERGE_S
    while True:
        s, r = await sender.ask({"op": "mesh"}), await receiver.ask({"op": "mesh"})
        if s["routes"].get(c.node_id) == 2 and s["bindings"] >= 2 and r["bindings"] >= 2:
            return
        assert trio.current_time() < deadline, (s, r)
        await trio.sleep(0.3)


async def test_hop_limit_one_stops_at_b_with_a_typed_status(net: Netns, tmp_path: Path) -> None:
    ha, hb, hc = line(net)
    a = NodeProc(ha, tmp_path / "na", "mesh0", ready=False, log="info")
    _b = start_b(hb, tmp_path / "nb")  # relays the hop_limit 2 one
    c = NodeProc(hc, tmp_path / "nc", "mesh0", ready=False)
    a.wait_ready()
    c.wait_ready()
    async with (
        driver(hc, c, tmp_path / "uc", receive=True) as rc,
        driver(ha, a, tmp_path / "ua") as sa,
    ):
        await converged(sa, rc, c)
        stop = await sa.ask({"op": "enqueue", "to": rc.me, "hop_limit": 1})
        go = await sa.ask({"op": "enqueue", "to": rc.me, "hop_limit": 2})
        # A knows C's home is 2 hops away: the sender gets the typed, final refusal in
        # its EnqueueResult (FAILED_PRECONDITION = 9), A never takes custody of it.
        assert stop["status"] == 9, stop
        assert "RELAY_HOP_LIMIT_EXCEEDED" in stop["detail"], stop
        assert "hop_limit 1 < 2 hops" in stop["detail"], stop
        assert go["status"] == 0, go

        async def got_go() -> bool:
            return bool((await rc.ask({"op": "received"}))["ids"])

        await until(got_go, within=60, step=0.2)
        got = (await rc.ask({"op": "received"}))["ids"]
        assert got == [go["id"]], got  # the hop_limit 2 one only
        assert not a.log_events("federation: next hop refused envelopes")  # never relayed
    print(f"\nhop_limit 1 refused to the sender as RELAY_HOP_LIMIT_EXCEEDED; load {loadavg()}")


async def test_relay_kill9_mid_way_through_1000_dms(net: Netns, tmp_path: Path) -> None:
    ha, hb, hc = line(net)
    a = NodeProc(ha, tmp_path / "na", "mesh0", ready=False)
    b = start_b(hb, tmp_path / "nb")
    c = NodeProc(hc, tmp_path / "nc", "mesh0", ready=False)
    a.wait_ready()
    c.wait_ready()
    nodes = {"b": b}
    times: dict[str, float] = {}
    async with (
        driver(hc, c, tmp_path / "uc", receive=True) as rc,
        driver(ha, a, tmp_path / "ua") as sa,
    ):
        await converged(sa, rc, c)
        # c writes to a first: from then on a is a contact of c, not a stranger whose
        # 1,000 messages would exceed a stranger's share of c's mailbox
        await rc.ask({"op": "send", "to": sa.me, "n": 1})

        async def delivered() -> int:
            return len((await rc.ask({"op": "received"}))["ids"])

        async def kill() -> None:
            times["kill"] = nodes["b"].kill9()

        async def restart() -> None:
            nodes["b"] = await trio.to_thread.run_sync(start_b, hb, tmp_path / "nb")
            times["restarted"] = time.time()

        sent: dict[str, object] = {}

        async def send() -> None:
            sent.update(await sa.ask({"op": "send", "to": rc.me, "n": N}))

        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            run = await kill_mid_way(N, delivered, kill, restart, within=120)
        times["all"] = time.time()
        took = time.monotonic() - t0

        # A late duplicate would come from a hop resending what it had handed on
        # (an acknowledgement lost in the kill): give one a bounded window to show.
        async def more() -> bool:
            return await delivered() > N

        with pytest.raises(trio.TooSlowError):
            await until(more, within=3, step=0.2)
        got = [bytes.fromhex(x) for x in (await rc.ask({"op": "received"}))["ids"]]
        ids = sent["ids"]
        assert isinstance(ids, list)
        assert_exactly_once(got, [bytes.fromhex(x) for x in ids])

    print(
        f"\nrelay kill -9 in netns: B restarted {times['restarted'] - times['kill']:.1f} s "
        f"after the kill, all {N} delivered {times['all'] - times['kill']:.1f} s after it"
    )
    print(
        f"relay kill -9 in netns: {run.at_kill}/{N} delivered at the kill, {len(got)}/{N} "
        f"after restart, each exactly once; {took:.1f} s for the {N}; "
        f"taken by A at once {sent['taken_at_once']}; load {loadavg()}"
    )
