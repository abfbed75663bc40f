"""Issue 14, Stage B with real nodes: one group over a mesh that splits and heals.

Five ``qpc node`` processes in network namespaces: island 1 = A, B, C on br0, island
2 = D, E on br1, and one cable C - br2 - D between them. Three users per node, each a
client driver process (``tests.mesh.group_driver``: the real Agent, reading its mail
and running its group timers in the background like the REPL; 15 REPL ptys are too
heavy for this 2-core machine). One group holds all 15, with committers on both
islands. The cable is pulled (``ip link set down``); on each island a member removes
someone of the other island, another asks for a self-update, and people chat; island
1's first committer commits at once, island 2's next committer takes over after the
committer timeout: two commits on the same epoch. The cable is plugged back in.

Asserted (bounded waits): every current member ends on the same branch tag and epoch
authenticator, both removed users are absent on both sides, and every text sent
during the cut is shown exactly once on every current member other than its sender.
Figures (time to converge after the heal, branch switches, read-only decryptions)
are printed with the load.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from mesh_procs import Driver, NodeProc, driver, loadavg
from netns_kit import Host, Netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

LOCAL = "127.0.0.1:4201"
GROUP_DRIVER = "tests.mesh.group_driver"
CONVERGE_S = 120.0
SETTLE_S = 240.0
USERS_PER_NODE = 3
GROUP = "team"


def islands(net: Netns) -> list[Host]:
    a, b, c, d, e = (net.host(n) for n in "abcde")
    for h in (a, b, c):
        net.connect(h, "br0")
    for h in (d, e):
        net.connect(h, "br1")
    net.connect(c, "br2")  # c: mesh1
    net.connect(d, "br2")  # d: mesh1
    return [a, b, c, d, e]


async def poll(pred: Any, within: float, step: float = 0.5) -> float | None:
    t0 = trio.current_time()
    with trio.move_on_after(within):
        while True:
            if await pred():
                return trio.current_time() - t0
            await trio.sleep(step)
    return None


async def states(users: Sequence[Driver]) -> list[dict[str, Any]]:
    return [await u.ask({"op": "state", "name": GROUP}) for u in users]


def summary(users: dict[str, Driver], st: Sequence[dict[str, Any]]) -> str:
    """One line per user: where it is and what it saw (for a failure message)."""
    out = []
    for name, s in zip(users, st, strict=True):
        if s.get("gone"):
            out.append(f"{name}: out of the group")
            continue
        out.append(
            f"{name}: epoch {s['epoch']} auth {s['auth']} tag {s['tag'][:8]}"
            f" members {len(s['members'])} switches {s['switches']} held {s['held']}"
            f" undecryptable {s['undecryptable']} oow {s['out_of_window']}"
            f" warnings {s['warnings']}"
        )
    return "\n".join(out)


def logs(nodes: Sequence[NodeProc]) -> str:
    return "\n".join(f"--- {n.host.name}\n{n.stderr()[-1500:]}" for n in nodes)


async def test_group_forks_on_a_cut_mesh_and_converges_after_heal(
    net: Netns, tmp_path: Path
) -> None:
    hosts = islands(net)
    nodes: list[NodeProc] = []
    for h in hosts:
        ifaces = "mesh0,mesh1" if h.name in ("c", "d") else "mesh0"
        nodes.append(NodeProc(h, tmp_path / f"n{h.name}", ifaces, {}, ready=False, log="info"))
    for n in nodes:
        n.wait_ready()
    async with AsyncExitStack() as stack:
        users: dict[str, Driver] = {}
        for h, n in zip(hosts, nodes, strict=True):
            for i in range(1, USERS_PER_NODE + 1):
                name = f"{h.name}{i}"
                users[name] = await stack.enter_async_context(
                    driver(h, n, tmp_path / f"u{name}", server=LOCAL, module=GROUP_DRIVER)
                )
        everyone = list(users.values())

        async def meshed() -> bool:
            v = await users["a1"].ask({"op": "mesh"})
            w = await users["e1"].ask({"op": "mesh"})
            return (
                v["bindings"] >= len(users)
                and w["bindings"] >= len(users)
                and all(n.node_id in v["routes"] for n in nodes[1:])
            )

        assert await poll(meshed, CONVERGE_S) is not None, logs(nodes)

        # The group: a1 creates it and invites d1 first, so the committer list (the
        # first members, Stage A) reaches island 2.
        a1 = users["a1"]
        assert (await a1.ask({"op": "create", "name": GROUP})) == {"ok": True}
        order = ["d1"] + [n for n in users if n not in ("a1", "d1")]
        for name in order:
            got = await a1.ask({"op": "invite", "name": GROUP, "peer": users[name].me})
            assert got == {"ok": "invited"}, (name, got)

        async def one_group(members: Sequence[Driver]) -> bool:
            st = await states(members)
            return (
                all("gone" not in s for s in st)
                and len({(s["tag"], s["auth"]) for s in st}) == 1
                and len(st[0]["members"]) == len(members)
            )

        assert await poll(lambda: one_group(everyone), SETTLE_S) is not None, await states(everyone)
        base = (await a1.ask({"op": "state", "name": GROUP}))["epoch"]
        committers = (await a1.ask({"op": "state", "name": GROUP}))["committers"]
        by_fpr = {u.me: n for n, u in users.items()}
        assert by_fpr[committers[0]] == "a1" and by_fpr[committers[1]] == "d1", committers

        # Cut the cable between the islands.
        cable = hosts[2].link("mesh1")
        net.set_link(cable, False)
        t_cut = time.monotonic()
        island1 = [u for n, u in users.items() if n[0] in "abc"]
        island2 = [u for n, u in users.items() if n[0] in "de"]

        async def no_route() -> bool:
            v = await a1.ask({"op": "mesh"})
            return nodes[3].node_id not in v["routes"]

        assert await poll(no_route, 60) is not None, "island 1 still routes to D"
        texts: list[tuple[str, str]] = []

        async def say(name: str, text: str) -> None:
            assert (await users[name].ask({"op": "say", "name": GROUP, "text": text})) == {
                "ok": True
            }
            texts.append((users[name].me, text))

        # Island 1: the first committer removes e3 at once; b1 asks for an update.
        got = await a1.ask({"op": "remove", "name": GROUP, "peer": users["e3"].me})
        assert got == {"ok": "removed"}, got
        assert "error" not in await users["b1"].ask({"op": "update", "name": GROUP})
        # Island 2: e1 asks to remove b3; d1 (second committer) takes over after the
        # committer timeout, since a1 is out of reach. d2 asks for an update.
        got = await users["e1"].ask({"op": "remove", "name": GROUP, "peer": users["b3"].me})
        assert got == {"ok": "requested"}, got
        assert "error" not in await users["d2"].ask({"op": "update", "name": GROUP})
        for name in ("a2", "b2", "c1", "d3", "e1"):
            await say(name, f"cut-{name}")

        async def moved(side: Sequence[Driver], member: Driver) -> bool:
            """Every member of ``side`` (but ``member``) took its side's commits: one
            epoch or more (a committer may cover both requests in one commit)."""
            st = await states([u for u in side if u is not member])
            return all("gone" not in s and s["epoch"] >= base + 1 for s in st) and (
                len({s["tag"] for s in st}) == 1
            )

        assert await poll(lambda: moved(island1, users["e3"]), 90) is not None, await states(
            island1
        )
        assert await poll(lambda: moved(island2, users["e3"]), 120) is not None, await states(
            island2
        )
        split = {(s["tag"]) for s in await states([a1, users["d1"]])}
        assert len(split) == 2, "both islands should be on their own branch"
        for name in ("a3", "e2"):
            await say(name, f"late-{name}")
        t_heal0 = time.monotonic()

        # Heal.
        net.set_link(cable, True)
        t_heal = time.monotonic()
        survivors = [u for n, u in users.items() if n not in ("e3", "b3")]

        async def converged() -> bool:
            st = await states(survivors)
            if any("gone" in s for s in st):
                return False
            if len({(s["tag"], s["auth"]) for s in st}) != 1:
                return False
            members = set(st[0]["members"])
            return users["e3"].me not in members and users["b3"].me not in members

        took = await poll(converged, SETTLE_S, 1.0)
        final = await states(survivors)
        assert took is not None, summary(users, await states(list(users.values())))
        assert len(final[0]["members"]) == len(survivors)

        async def all_shown() -> bool:
            for u in survivors:
                shown = [tuple(x) for x in (await u.ask({"op": "shown"}))["texts"]]
                if any(shown.count(t) < 1 for t in texts if t[0] != u.me):
                    return False
            return True

        await poll(all_shown, 120, 1.0)
        failures = []
        for name, u in users.items():
            if u not in survivors:
                continue
            shown = [tuple(x) for x in (await u.ask({"op": "shown"}))["texts"]]
            for t in texts:
                want = 0 if t[0] == u.me else 1
                if shown.count(t) != want:
                    failures.append(f"{name}: {t[1]!r} shown {shown.count(t)} times")
        removed = [await users[n].ask({"op": "state", "name": GROUP}) for n in ("e3", "b3")]
        print(
            f"groups netns: converged {took:.1f} s after the heal (cut {t_heal0 - t_cut:.0f} s),"
            f" switches={sum(s['switches'] for s in final)},"
            f" readonly={sum(s['readonly'] for s in final)},"
            f" undecryptable={sum(s['undecryptable'] for s in final)},"
            f" epoch={final[0]['epoch']} auth={final[0]['auth']}; load {loadavg()}"
        )
        assert not failures, failures
        assert all(r.get("gone") for r in removed), removed
        assert t_heal >= t_heal0
