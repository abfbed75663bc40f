"""When the mesh breaks, with real ``qpc node`` processes in network namespaces.

Line A - br0 - B - br1 - C (A and C share no link), real mDNS, real federation
links; C's cable is pulled with ``ip link set down`` and plugged back in:

- DMs typed by a user in an interactive REPL on A (``/mesh dm``) to a user on C, and
  envelopes with a short sender-set expiry from a client driver on A, sent while C
  is cut off (some before B noticed, some after A lost its route): once the link is
  back everything not expired arrives within seconds, exactly once, in order per
  sender; what expired during the cut never arrives;
- the same for channel messages (``/channel create|join``, ``/mesh broadcast`` in the
  REPL, and a client publishing with long and short expiries);
- 300 channel messages published during the cut, more than Plumtree re-announces to a
  neighbour that comes back: the rest must come by inventory sync;
- B, holding envelopes for C (in its custody queue, or moved to its store-and-forward
  table), is killed and restarted on the same data directory: none is lost;
- a laptop-like node L (``mesh.carrier = true``) linked to island 1 (A) takes a copy
  of what A holds for C, walks to island 2 (C) and delivers it there; back on island
  1 A holds none of them any more, and nothing arrives twice.

Who held what is read from the nodes' metrics (``qpc_relay_custody_queued``,
``qpc_storefwd_held``); each test prints the counters of every node with its figures.

Users and drivers reach their own node over loopback (127.0.0.1): pulling a node's
mesh cable must not cut its local clients. Every wait is bounded; the namespaces and
processes go with the ``net`` fixture even on failure. Times are printed with the
load; the one bound asserted is the issue's "within seconds of the heal" (HEAL_S).
"""

from __future__ import annotations

import inspect
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from mesh_procs import Driver, MeshUser, NodeProc, driver, loadavg, scrape
from netns_kit import Host, Netns

from qpc_node.client.channels import new_secret, secret_text
from qpc_node.client.fingerprint import short_code

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

LOCAL = "127.0.0.1:4201"  # users and drivers talk to their own node over loopback
METRICS = "127.0.0.1:9201"  # each node's metrics, inside its own namespace
PARTITION_DRIVER = "tests.mesh.partition_driver"
CONVERGE_S = 90.0  # discovery + links + routes + bindings on a loaded 2-core machine
DETECT_S = 45.0  # bound for A to lose its route to C after C's cable is pulled
HEAL_S = 20.0  # the "within seconds of the heal", on a loaded machine
WAIT_S = 120.0  # how long we keep measuring before calling something lost
LATE_S = 3.0  # window for a late duplicate or a late expired message to show
SHORT_TTL_MS = 8_000  # expires while C is cut off
LONG_TTL_MS = 3_600_000
HELD_METRICS = (
    # what a node holds for others: custody toward a next hop (today's relay) and
    # held envelopes without a route (store-and-forward)
    "qpc_relay_custody_queued",
    "qpc_storefwd_held",
)


# --- topology and processes -----------------------------------------------------------


def line(net: Netns) -> tuple[Host, Host, Host]:
    """A - br0 - B - br1 - C: A and C are not neighbours."""
    a, b, c = net.host("a"), net.host("b"), net.host("c")
    net.connect(a, "br0")
    net.connect(b, "br0")
    net.connect(b, "br1")
    net.connect(c, "br1")
    return a, b, c


def start(
    host: Host,
    data: Path,
    interfaces: str,
    *,
    config: Path | None = None,
    ready: bool = False,
    env: dict[str, str] | None = None,
) -> NodeProc:
    """A node with JSON logs and metrics on loopback in its namespace."""
    return NodeProc(
        host,
        data,
        interfaces,
        {"QPC_METRICS_LISTEN": METRICS, **(env or {})},
        ready=ready,
        log="info",
        args=("--config", str(config)) if config is not None else (),
    )


async def held(node: NodeProc) -> int:
    """Envelopes ``node`` holds for others (custody + held), from its metrics."""
    m = await trio.to_thread.run_sync(scrape, node.host, METRICS)
    return int(sum(m.get(name, 0.0) for name in HELD_METRICS))


WATCHED = ("qpc_storefwd_", "qpc_relay_custody", "qpc_gossip_", "qpc_sync_", "qpc_channel")


async def counters(nodes: Sequence[NodeProc]) -> str:
    """The store-and-forward, custody, gossip, sync and channel figures of each node
    that are not zero (printed with the results, to tell who held and who dropped)."""
    parts = []
    for n in nodes:
        if n.proc.poll() is not None:
            continue
        m = await trio.to_thread.run_sync(lambda n=n: scrape(n.host, METRICS, labels=True))
        nz = {k: int(v) for k, v in sorted(m.items()) if k.startswith(WATCHED) and v}
        parts.append(f"{n.host.name} {nz}")
    return "; ".join(parts)


async def route_back(drv: Driver, dest: NodeProc, out: Figures, t0: float) -> None:
    """Records when the driver's node routes to ``dest`` again (bounded by WAIT_S)."""
    waited = await poll(_has_route(drv, dest), WAIT_S, 0.2)
    out.route_back = trio.current_time() - t0 if waited is not None else -1.0


def _has_route(drv: Driver, dest: NodeProc) -> Callable[[], Awaitable[bool]]:
    async def has() -> bool:
        return dest.node_id in (await drv.ask({"op": "mesh"}))["routes"]

    return has


async def concurrently(**waits: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    """Run each wait at once (each bounded itself); their results by name."""
    out: dict[str, Any] = {}

    async def one(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        out[name] = await fn()

    async with trio.open_nursery() as nursery:
        for name, fn in waits.items():
            nursery.start_soon(one, name, fn)
    return out


async def poll(
    pred: Callable[[], Awaitable[bool] | bool], within: float, step: float = 0.2
) -> float | None:
    """Seconds until ``pred()`` holds; None if not within ``within`` (bounded)."""
    t0 = trio.current_time()
    with trio.move_on_after(within):
        while True:
            got = pred()
            if inspect.isawaitable(got):
                got = await got
            if got:
                return trio.current_time() - t0
            await trio.sleep(step)
    return None


def ready(*nodes: NodeProc) -> None:
    for n in nodes:
        n.wait_ready()


@asynccontextmanager
async def client(
    host: Host, node: NodeProc, data: Path, *, receive: bool = False
) -> AsyncIterator[Driver]:
    async with driver(
        host, node, data, server=LOCAL, receive=receive, module=PARTITION_DRIVER
    ) as d:
        yield d


async def user(
    stack: AsyncExitStack, name: str, host: Host, node: NodeProc, data: Path
) -> MeshUser:
    u = await MeshUser.open(name, host, node, data, server=LOCAL)
    stack.push_async_callback(u.aclose)
    return u


# --- waiting on the mesh ----------------------------------------------------------------


async def until_view(
    drv: Driver, ok: Any, what: str, within: float, nodes: Sequence[NodeProc] = ()
) -> dict[str, Any]:
    """Poll the driver's node's mesh view until ``ok(view)``; fail saying ``what``."""
    deadline = trio.current_time() + within
    while True:
        view = await drv.ask({"op": "mesh"})
        if ok(view):
            return view
        if trio.current_time() > deadline:
            logs = "\n".join(f"--- {n.host.name}\n{n.stderr()[-1500:]}" for n in nodes)
            raise AssertionError(f"{what} not within {within:.0f} s: {view}\n{logs}")
        await trio.sleep(0.3)


async def converged(
    sender: Driver,
    receiver: Driver,
    dest: NodeProc,
    hops: int,
    users: int,
    nodes: Sequence[NodeProc],
) -> None:
    """The sender's node routes to ``dest`` in ``hops`` and both know ``users`` homes."""
    await until_view(
        sender,
        lambda v: v["routes"].get(dest.node_id) == hops and v["bindings"] >= users,
        f"a {hops}-hop route to {dest.host.name} and {users} homes",
        CONVERGE_S,
        nodes,
    )
    await until_view(
        receiver, lambda v: v["bindings"] >= users, f"{users} homes", CONVERGE_S, nodes
    )


async def until_no_route(drv: Driver, dest: NodeProc, nodes: Sequence[NodeProc]) -> float:
    """Until the driver's node has no route to ``dest``; seconds it took."""
    t0 = trio.current_time()
    await until_view(
        drv, lambda v: dest.node_id not in v["routes"], f"no route to {dest.host.name}",
        DETECT_S, nodes,
    )  # fmt: skip
    return trio.current_time() - t0


async def until_wall(ms: int) -> None:
    """Until the wall clock (what expiries are measured against) is past ``ms``."""
    waited = await poll(
        lambda: time.time() * 1000 > ms, max(0.0, ms / 1000 - time.time()) + 10, 0.1
    )
    assert waited is not None


async def received(drv: Driver) -> list[str]:
    ids: list[str] = (await drv.ask({"op": "received"}))["ids"]
    return ids


async def until_received(drv: Driver, want: set[str], within: float) -> float | None:
    """Seconds until ``drv`` fetched every id of ``want``; None if not within ``within``."""

    async def all_there() -> bool:
        return want <= set(await received(drv))

    return await poll(all_there, within, 0.1)


async def nothing_more(drv: Driver, count: int) -> None:
    """A late duplicate or a late expired envelope gets a bounded window to show."""

    async def more() -> bool:
        return len(await received(drv)) > count

    await poll(more, LATE_S)


def check_transport(
    got: list[str], expected: list[str], expired: list[str], tags: dict[str, str] | None = None
) -> None:
    """Every expected id exactly once, in the order sent; no expired one; nothing else.
    ``tags`` names ids in the failure message (the driver's tag of each)."""
    tags = tags or {}
    counts = Counter(got)
    twice = {m: c for m, c in counts.items() if c > 1}
    assert not twice, f"{len(twice)} delivered more than once: {list(twice.items())[:5]}"
    late = [m for m in expired if m in counts]
    assert not late, f"{len(late)} of {len(expired)} delivered after their expiry"
    missing = [m for m in expected if m not in counts]
    assert not missing, f"{len(missing)} of {len(expected)} never delivered"
    extra = set(counts) - set(expected)
    assert not extra, f"{len(extra)} delivered that were never sent"
    assert got == expected, (
        f"out of order: sent {[tags.get(m, m[:8]) for m in expected]}, "
        f"got {[tags.get(m, m[:8]) for m in got]}"
    )


def failures(*checks: Callable[[], None]) -> list[str]:
    """Run every check; what each that failed said (so one run reports them all)."""
    out = []
    for check in checks:
        try:
            check()
        except AssertionError as exc:
            out.append(str(exc))
    return out


# --- what users see ---------------------------------------------------------------------

_SENT = re.compile(r"sent to \[[^\]\n]*\] \(([^\n]*)\)")


async def mesh_dm(sender: MeshUser, to: MeshUser, text: str, timeout: float = 60) -> str:  # noqa: ASYNC109 -- a bound
    """``/mesh dm``; what the REPL said became of it (inside the parentheses)."""
    mark = sender.mark()
    sender.pty.type(f"/mesh dm {to.fpr} {text}")

    def said() -> str | None:
        m = _SENT.search(sender.pty.text[mark:])
        return m.group(1) if m else None

    await sender.pty.wait_until(lambda: said() is not None, f"/mesh dm {text!r} answered", timeout)
    out = said()
    assert out is not None
    return out


def shown(sender: MeshUser, text: str) -> str:
    """How a receiving REPL shows a message from ``sender``: ``... CODE: TEXT``."""
    return from_(sender.fpr, text)


def from_(fpr: str, text: str) -> str:
    """How a receiving REPL shows a message from the user ``fpr``."""
    return f"{short_code(fpr)}: {text}"


async def until_shown(receiver: MeshUser, lines: Sequence[str], within: float) -> float | None:
    """Seconds until every line shows in ``receiver``'s REPL; None if not within."""
    return await poll(lambda: all(receiver.pty.count(x) for x in lines), within, 0.1)


def check_shown(receiver: MeshUser, lines: Sequence[str], never: Sequence[str] = ()) -> None:
    """Each line shown exactly once and in order; none of ``never``."""
    text = receiver.since(0)
    for x in lines:
        assert text.count(x) == 1, f"{x!r} shown {text.count(x)} times:\n{text[-3000:]}"
    for x in never:
        assert x not in text, f"{x!r} shown:\n{text[-3000:]}"
    where = [text.find(x) for x in lines]
    assert where == sorted(where), f"out of order: {lines}\n{text[-3000:]}"


_SECRET = re.compile(r"qpcch:[a-z2-7]{52}")


async def channel_pair(owner: MeshUser, member: MeshUser, name: str) -> str:
    """``owner`` creates channel ``name`` (``created channel #NAME`` and the secret) and
    ``member`` joins it with that secret; returns the secret."""
    mark = owner.mark()
    owner.pty.type(f"/channel create {name}")
    await owner.pty.wait_until(
        lambda: _SECRET.search(owner.pty.text[mark:]) is not None, "the channel secret", 60
    )
    m = _SECRET.search(owner.pty.text[mark:])
    assert m is not None
    await member.ask(f"/channel join {name} {m.group(0)}", f"joined channel #{name}", timeout=60)
    return m.group(0)


async def broadcast(sender: MeshUser, name: str, text: str) -> str:
    """``/mesh broadcast``; what the REPL answered (``broadcast to [#NAME]...``)."""
    mark = sender.mark()
    sender.pty.type(f"/mesh broadcast {name} {text}")
    answer = re.compile(rf"broadcast to \[#{re.escape(name)}\][^\n]*")

    def said() -> str | None:
        m = answer.search(sender.pty.text[mark:])
        return m.group(0).strip() if m else None

    await sender.pty.wait_until(lambda: said() is not None, f"/mesh broadcast {text!r}", 60)
    out = said()
    assert out is not None
    return out


@dataclass
class Figures:
    detect: float = 0.0  # cut -> A has no route to C
    cut: float = 0.0  # how long C was cut off
    heal: float = 0.0  # link up -> the last message arrived
    route_back: float = 0.0  # link up -> A routes to C again (-1: not within WAIT_S)


def report(name: str, f: Figures, extra: str = "", figures: str = "") -> None:
    print(
        f"\n{name}: route gone at A {f.detect:.1f} s after the cut; cut lasted {f.cut:.1f} s; "
        f"A routed to C again {f.route_back:.1f} s after the heal; everything arrived "
        f"{f.heal:.1f} s after the heal (bound {HEAL_S:.0f} s){extra}; load {loadavg()}"
        + (f"\n  counters: {figures}" if figures else "")
    )


# --- (a) line A - B - C, C cut off: DMs ------------------------------------------------


async def test_line_cut_dms_arrive_once_in_order_after_heal_expired_never(
    net: Netns, tmp_path: Path
) -> None:
    ha, hb, hc = line(net)
    a = start(ha, tmp_path / "na", "mesh0")
    b = start(hb, tmp_path / "nb", "mesh0,mesh1")
    c = start(hc, tmp_path / "nc", "mesh0")
    ready(a, b, c)
    nodes = (a, b, c)
    f = Figures()
    async with AsyncExitStack() as stack:
        xc = await stack.enter_async_context(client(hc, c, tmp_path / "xc", receive=True))
        xa = await stack.enter_async_context(client(ha, a, tmp_path / "xa"))
        ua = await user(stack, "ua", ha, a, tmp_path / "ua")
        uc = await user(stack, "uc", hc, c, tmp_path / "uc")
        await converged(xa, xc, c, hops=2, users=4, nodes=nodes)
        # first contact while the line is whole: ua fetches uc's KeyPackage from C
        first = await mesh_dm(ua, uc, "hello-before-the-cut")
        hello = await until_shown(uc, [shown(ua, "hello-before-the-cut")], 60)
        assert hello is not None, (
            f"a DM on the whole line (A said {first}) not shown at C:\n{uc.since(0)[-1500:]}\n"
            + "\n".join(f"--- {n.host.name}\n{n.stderr()[-2500:]}" for n in nodes)
        )

        cable = hc.link("mesh0")
        net.set_link(cable, False)
        t_cut = trio.current_time()
        dms: list[str] = []
        said: list[str] = []
        long_ids: list[str] = []
        short_ids: list[str] = []
        short_expiry = 0
        tags: dict[str, str] = {}

        async def batch(tag: str) -> None:
            nonlocal short_expiry
            for i in range(3):
                dms.append(f"{tag}-dm-{i}")
                said.append(await mesh_dm(ua, uc, dms[-1]))
            # long and short expiries interleaved, one sender: order is per sender
            for i in range(3):
                lr = await xa.ask({"op": "send_ttl", "to": xc.me, "n": 1, "ttl_ms": LONG_TTL_MS, "tag": f"{tag}l{i}"})  # fmt: skip
                sr = await xa.ask({"op": "send_ttl", "to": xc.me, "n": 1, "ttl_ms": SHORT_TTL_MS, "tag": f"{tag}s{i}"})  # fmt: skip
                long_ids.extend(lr["ids"])
                short_ids.extend(sr["ids"])
                tags.update({lr["ids"][0]: f"{tag}l{i}", sr["ids"][0]: f"{tag}s{i}"})
                short_expiry = max(short_expiry, sr["expiry_ms"])

        await batch("early")  # A still routes to C via B: B gets them
        f.detect = await until_no_route(xa, c, nodes)
        await batch("late")  # A knows no route to C any more
        await until_wall(short_expiry + 1000)  # the cut outlasts every short expiry
        net.set_link(cable, True)
        t_heal = trio.current_time()
        f.cut = t_heal - t_cut

        r = await concurrently(
            dms=lambda: until_shown(uc, [shown(ua, x) for x in dms], WAIT_S),
            env=lambda: until_received(xc, set(long_ids), WAIT_S),
            route=lambda: route_back(xa, c, f, t_heal),
        )
        got_dms, got_env = r["dms"], r["env"]
        f.heal = max(got_dms or WAIT_S, got_env or WAIT_S)
        count = len(await received(xc))
        await nothing_more(xc, count)
        got_ids = await received(xc)
        report(
            "partition line DMs",
            f,
            f"; {len(dms)} /mesh dm (shown after {got_dms} s) + {len(long_ids)} envelopes "
            f"(after {got_env} s), {len(short_ids)} with a {SHORT_TTL_MS / 1000:.0f} s expiry; "
            f"A said {sorted(set(said))}",
            await counters(nodes),
        )
        logs = "\n".join(f"--- {n.host.name}\n{n.stderr()[-2500:]}" for n in nodes)
        assert got_dms is not None, (
            f"DMs typed during the cut not all shown {WAIT_S:.0f} s after the heal; A said "
            f"{said}\n{uc.since(0)[-2000:]}\n{logs}"
        )
        assert got_env is not None, (
            f"envelopes sent during the cut: {len(set(long_ids) & set(await received(xc)))} "
            f"of {len(long_ids)} arrived {WAIT_S:.0f} s after the heal\n{logs}"
        )
        problems = failures(
            lambda: check_shown(uc, [shown(ua, x) for x in ["hello-before-the-cut", *dms]]),
            lambda: check_transport(got_ids, long_ids, short_ids, tags),
        )
        assert not problems, "\n".join(problems)
        assert f.heal <= HEAL_S, f"arrived {f.heal:.1f} s after the heal (bound {HEAL_S} s)"


# --- (a) line A - B - C, C cut off: channel messages ------------------------------------


async def test_line_cut_channel_messages_arrive_once_in_order_after_heal(
    net: Netns, tmp_path: Path
) -> None:
    ha, hb, hc = line(net)
    a = start(ha, tmp_path / "na", "mesh0")
    b = start(hb, tmp_path / "nb", "mesh0,mesh1")
    c = start(hc, tmp_path / "nc", "mesh0")
    ready(a, b, c)
    nodes = (a, b, c)
    f = Figures()
    async with AsyncExitStack() as stack:
        xc = await stack.enter_async_context(client(hc, c, tmp_path / "xc"))
        xa = await stack.enter_async_context(client(ha, a, tmp_path / "xa"))
        ua = await user(stack, "ua", ha, a, tmp_path / "ua")
        uc = await user(stack, "uc", hc, c, tmp_path / "uc")
        await converged(xa, xc, c, hops=2, users=4, nodes=nodes)
        secret = await channel_pair(ua, uc, "news")
        await broadcast(ua, "news", "warm-up")
        assert await until_shown(uc, [shown(ua, "warm-up")], 60) is not None, uc.since(0)[-2000:]

        cable = hc.link("mesh0")
        net.set_link(cable, False)
        t_cut = trio.current_time()
        texts: list[str] = []  # ua's, typed in the REPL
        said: list[str] = []
        kept: list[str] = []  # xa's with a long expiry
        gone: list[str] = []  # xa's that expire during the cut
        statuses: set[int] = set()
        short_expiry = 0

        async def batch(tag: str) -> None:
            nonlocal short_expiry
            for i in range(3):
                texts.append(f"{tag}-ch-{i}")
                said.append(await broadcast(ua, "news", texts[-1]))
                for body, ttl, into in (
                    (f"{tag}-xl-{i}", LONG_TTL_MS, kept),
                    (f"{tag}-xs-{i}", SHORT_TTL_MS, gone),
                ):
                    r = await xa.ask(
                        {"op": "channel_publish", "secret": secret, "body": body, "ttl_ms": ttl}
                    )
                    statuses.add(r["status"])
                    into.append(body)
                    if ttl == SHORT_TTL_MS:
                        short_expiry = max(short_expiry, r["expiry_ms"])

        await batch("early")
        f.detect = await until_no_route(xa, c, nodes)
        await batch("late")
        await until_wall(short_expiry + 1000)  # the cut outlasts every short expiry
        net.set_link(cable, True)
        t_heal = trio.current_time()
        f.cut = t_heal - t_cut
        want = [shown(ua, x) for x in texts] + [from_(xa.me, x) for x in kept]

        r = await concurrently(
            got=lambda: until_shown(uc, want, WAIT_S),
            route=lambda: route_back(xa, c, f, t_heal),
        )
        got = r["got"]
        f.heal = got or WAIT_S
        report(
            "partition line channel",
            f,
            f"; {len(texts)} channel messages from the REPL and {len(kept)} from a client, "
            f"{len(gone)} with a {SHORT_TTL_MS / 1000:.0f} s expiry; A said "
            f"{sorted(set(said))}, publish statuses {sorted(statuses)}",
            await counters(nodes),
        )
        logs = "\n".join(f"--- {n.host.name}\n{n.stderr()[-2500:]}" for n in nodes)
        assert got is not None, (
            f"channel messages sent during the cut not all shown {WAIT_S:.0f} s after the "
            f"heal; A said {said}\n{uc.since(0)[-2000:]}\n{logs}"
        )
        # a late duplicate or a late expired one gets a bounded window to show
        await poll(
            lambda: (
                any(uc.pty.count(x) > 1 for x in want)
                or any(uc.pty.count(from_(xa.me, x)) for x in gone)
            ),
            LATE_S,
        )
        problems = failures(
            lambda: check_shown(uc, [shown(ua, x) for x in ["warm-up", *texts]]),
            lambda: check_shown(
                uc, [from_(xa.me, x) for x in kept], never=[from_(xa.me, x) for x in gone]
            ),
        )
        assert not problems, "\n".join(problems)
        assert f.heal <= HEAL_S, f"arrived {f.heal:.1f} s after the heal (bound {HEAL_S} s)"


# --- (a) more channel messages during the cut than a re-link announces -------------------

N_BURST = 300  # more than Plumtree re-announces to a neighbour that comes back (256)


async def test_line_cut_channel_burst_all_arrive_after_heal(net: Netns, tmp_path: Path) -> None:
    """What a returning neighbour is not re-announced must come by inventory sync."""
    ha, hb, hc = line(net)
    fast = {"QPC_CHANNELS_PUBLISH_RATE": "1000"}  # the client publishes N_BURST at once
    a = start(ha, tmp_path / "na", "mesh0", env=fast)
    b = start(hb, tmp_path / "nb", "mesh0,mesh1")
    c = start(hc, tmp_path / "nc", "mesh0")
    ready(a, b, c)
    nodes = (a, b, c)
    f = Figures()
    async with AsyncExitStack() as stack:
        xc = await stack.enter_async_context(client(hc, c, tmp_path / "xc"))
        xa = await stack.enter_async_context(client(ha, a, tmp_path / "xa"))
        await converged(xa, xc, c, hops=2, users=2, nodes=nodes)
        secret = secret_text(new_secret())  # a channel only clients of the test know
        warm = await xa.ask({"op": "channel_burst", "secret": secret, "n": 1, "ttl_ms": LONG_TTL_MS, "tag": "w"})  # fmt: skip

        async def c_has(ids: list[str]) -> bool:
            return set(ids) <= set((await xc.ask({"op": "channel_ids", "secret": secret}))["ids"])

        assert await poll(lambda: c_has(warm["ids"]), 60) is not None, "warm-up not at C"

        cable = hc.link("mesh0")
        net.set_link(cable, False)
        t_cut = trio.current_time()
        f.detect = await until_no_route(xa, c, nodes)
        sent = await xa.ask({"op": "channel_burst", "secret": secret, "n": N_BURST, "ttl_ms": LONG_TTL_MS, "tag": "m"})  # fmt: skip
        ids: list[str] = sent["ids"]

        async def b_has_all() -> bool:
            m = await trio.to_thread.run_sync(scrape, b.host, METRICS)
            return m.get("qpc_channel_messages_total", 0) >= N_BURST + 1

        await poll(b_has_all, 60)  # B got them from A before C comes back
        net.set_link(cable, True)
        t_heal = trio.current_time()
        f.cut = t_heal - t_cut
        r = await concurrently(
            got=lambda: poll(lambda: c_has(ids), WAIT_S, 0.5),
            route=lambda: route_back(xa, c, f, t_heal),
        )
        f.heal = r["got"] or WAIT_S
        at_c = (await xc.ask({"op": "channel_ids", "secret": secret}))["ids"]
        report(
            "partition line channel burst",
            f,
            f"; {len(set(ids) & set(at_c))} of {N_BURST} at C (statuses {sent['statuses']})",
            await counters(nodes),
        )
        missing = [i for i, m in enumerate(ids) if m not in set(at_c)]
        assert r["got"] is not None, (
            f"{len(missing)} of {N_BURST} published during the cut never reached C within "
            f"{WAIT_S:.0f} s of the heal (indexes {missing[:10]}...{missing[-3:]})"
        )
        assert len(at_c) == len(set(at_c)), "C's channel store holds a message twice"
        assert f.heal <= HEAL_S, f"arrived {f.heal:.1f} s after the heal (bound {HEAL_S} s)"


# --- (b) B restarted while it holds envelopes for C ---------------------------------------

N_HELD = 40


# custody: B holds them in its custody queue toward C (the relay's own table);
# held: B gives up on C as next hop after 1 s (storefwd.reroute_after_s) and, with no
# other route, moves them to its store-and-forward table
HOLD_KINDS = {"custody": "qpc_relay_custody_queued", "held": "qpc_storefwd_held"}


@pytest.mark.parametrize("kind", sorted(HOLD_KINDS))
async def test_relay_restarted_while_holding_loses_nothing(
    net: Netns, tmp_path: Path, kind: str
) -> None:
    ha, hb, hc = line(net)
    b_env = {"QPC_STOREFWD_REROUTE_AFTER_S": "1"} if kind == "held" else {}
    a = start(ha, tmp_path / "na", "mesh0")
    b = start(hb, tmp_path / "nb", "mesh0,mesh1", env=b_env)
    c = start(hc, tmp_path / "nc", "mesh0")
    ready(a, b, c)
    nodes = [a, b, c]
    f = Figures()
    async with AsyncExitStack() as stack:
        xc = await stack.enter_async_context(client(hc, c, tmp_path / "xc", receive=True))
        xa = await stack.enter_async_context(client(ha, a, tmp_path / "xa"))
        await converged(xa, xc, c, hops=2, users=2, nodes=nodes)

        cable = hc.link("mesh0")
        net.set_link(cable, False)
        t_cut = trio.current_time()
        # A still routes to C via B: B takes them and has nowhere to send them
        sent = await xa.ask(
            {"op": "send_ttl", "to": xc.me, "n": N_HELD, "ttl_ms": LONG_TTL_MS, "tag": "h"}
        )
        ids: list[str] = sent["ids"]

        async def holding() -> tuple[int, int, int]:
            m = await trio.to_thread.run_sync(scrape, nodes[1].host, METRICS)
            return await held(a), await held(nodes[1]), int(m.get(HOLD_KINDS[kind], 0))

        async def b_holds_all() -> bool:
            return await holding() == (0, N_HELD, N_HELD)

        await poll(b_holds_all, 30, 0.3)
        a_b = await holding()
        assert a_b == (0, N_HELD, N_HELD), (
            f"B should hold all {N_HELD} as {kind} (A none) before the restart; A, B, B as "
            f"{kind} hold {a_b}; A said {sorted(set(sent['fates']))}\n"
            f"{nodes[1].stderr()[-2000:]}"
        )
        nodes[1].kill9()
        nodes[1] = await trio.to_thread.run_sync(
            lambda: start(hb, tmp_path / "nb", "mesh0,mesh1", ready=True, env=b_env)
        )

        async def b_holds_after() -> bool:
            return (await holding())[1:] == (N_HELD, N_HELD)

        await poll(b_holds_after, 30, 0.3)
        after = await holding()
        assert after[1:] == (N_HELD, N_HELD), (
            f"B holds {after[1]} of {N_HELD} ({after[2]} as {kind}) after its restart"
        )
        await until_no_route(xa, c, nodes)
        f.detect = trio.current_time() - t_cut  # the restart is part of it here
        net.set_link(cable, True)
        t_heal = trio.current_time()
        f.cut = t_heal - t_cut
        r = await concurrently(
            got=lambda: until_received(xc, set(ids), WAIT_S),
            route=lambda: route_back(xa, c, f, t_heal),
        )
        got = r["got"]
        f.heal = got or WAIT_S
        await nothing_more(xc, len(await received(xc)))
        report(
            "partition relay restart",
            f,
            f"; B held {N_HELD} ({kind}) across kill -9 + restart",
            await counters(nodes),
        )
        logs = "\n".join(f"--- {n.host.name}\n{n.stderr()[-2500:]}" for n in nodes)
        assert got is not None, (
            f"{len(set(ids) & set(await received(xc)))} of {N_HELD} arrived {WAIT_S:.0f} s "
            f"after the heal\n{logs}"
        )
        check_transport(await received(xc), ids, [])
        assert f.heal <= HEAL_S, f"arrived {f.heal:.1f} s after the heal (bound {HEAL_S} s)"


# --- (c) a laptop carries messages from island 1 to island 2 ------------------------------

N_CARRIED = 10
SPRAY_DELAY_S = "2"


async def test_laptop_carries_held_messages_between_islands(net: Netns, tmp_path: Path) -> None:
    # island 1: A on br1; island 2: C on br2; laptop L has a cable into each
    ha, hl, hc = net.host("a"), net.host("l"), net.host("c")
    net.connect(ha, "br1")
    to_1 = net.connect(hl, "br1")  # L's mesh0
    to_2 = net.connect(hl, "br2")  # L's mesh1
    net.connect(hc, "br2")
    laptop_toml = tmp_path / "laptop.toml"
    laptop_toml.write_text("[mesh]\ncarrier = true\n")
    # A sprays copies of what it holds to carriers after SPRAY_DELAY_S, not minutes
    a = start(ha, tmp_path / "na", "mesh0", env={"QPC_STOREFWD_SPRAY_DELAY_S": SPRAY_DELAY_S})
    laptop = start(hl, tmp_path / "nl", "mesh0,mesh1", config=laptop_toml)
    c = start(hc, tmp_path / "nc", "mesh0")
    ready(a, laptop, c)
    nodes = (a, laptop, c)
    async with AsyncExitStack() as stack:
        xc = await stack.enter_async_context(client(hc, c, tmp_path / "xc", receive=True))
        xa = await stack.enter_async_context(client(ha, a, tmp_path / "xa"))
        # all three met once (L on both islands): A knows xc's home is C
        await converged(xa, xc, c, hops=2, users=2, nodes=nodes)
        net.set_link(to_2, False)  # the laptop leaves island 2
        await until_no_route(xa, c, nodes)
        sent = await xa.ask(
            {"op": "send_ttl", "to": xc.me, "n": N_CARRIED, "ttl_ms": LONG_TTL_MS, "tag": "c"}
        )
        ids: list[str] = sent["ids"]
        # A holds them; a copy goes to the carrier on its island

        async def laptop_holds() -> bool:
            return await held(laptop) >= N_CARRIED

        await poll(laptop_holds, WAIT_S, 0.5)
        carried = await held(laptop)
        assert carried >= N_CARRIED, (
            f"the laptop (mesh.carrier) holds {carried} of {N_CARRIED} held at A "
            f"(A holds {await held(a)}; A said {sorted(set(sent['fates']))})\n"
            f"{laptop.stderr()[-2000:]}\n{a.stderr()[-2000:]}"
        )
        net.set_link(to_1, False)  # the laptop walks away from island 1 ...
        net.set_link(to_2, True)  # ... and into island 2
        t_arrive = trio.current_time()
        got = await until_received(xc, set(ids), WAIT_S)
        took = trio.current_time() - t_arrive
        await nothing_more(xc, len(await received(xc)))
        logs = "\n".join(f"--- {n.host.name}\n{n.stderr()[-2500:]}" for n in nodes)
        view = await xa.ask({"op": "mesh"})
        print(
            f"\npartition laptop: {N_CARRIED} held at A, carried by L, delivered on island 2 "
            f"{took if got is not None else -1:.1f} s after L's link there came up; "
            f"load {loadavg()}\n  counters: {await counters(nodes)}"
        )
        assert got is not None, (
            f"{len(set(ids) & set(await received(xc)))} of {N_CARRIED} arrived on island 2 "
            f"{WAIT_S:.0f} s after the laptop got there\n{logs}"
        )
        check_transport(await received(xc), ids, [])
        assert c.node_id not in view["routes"], view  # A never reached C itself
        assert took <= HEAL_S, f"arrived {took:.1f} s after the laptop arrived (bound {HEAL_S} s)"

        # The laptop walks back to island 1 with C's receipts: A's copies are purged
        # (they would otherwise wait there, or go out again, until they expire).
        net.set_link(to_2, False)
        net.set_link(to_1, True)

        async def a_purged() -> bool:
            return await held(a) == 0

        purged = await poll(a_purged, WAIT_S, 0.5)
        # Then both islands meet through the laptop: nothing arrives twice.
        net.set_link(to_2, True)
        await poll(_has_route(xa, c), WAIT_S)
        await nothing_more(xc, len(await received(xc)))
        print(
            f"partition laptop: back on island 1, A holds none of them after {purged} s; "
            f"counters: {await counters(nodes)}"
        )
        assert purged is not None, (
            f"A still holds {await held(a)} of the {N_CARRIED} delivered on island 2 "
            f"{WAIT_S:.0f} s after the laptop came back with the receipts"
        )
        check_transport(await received(xc), ids, [])
