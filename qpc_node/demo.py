"""``qpc demo``: a mesh of three nodes and three users in one process, on loopback.

Three real :class:`~qpc_node.node.Node` objects (QUIC, SQLite, federation over
mutual TLS) listen on 127.0.0.1 with ephemeral ports and are configured as an
operator would: ``mesh.static_peers`` only, mDNS off, in a line A - B - C (A and
C do not peer, so what goes from A to C is relayed by B). Three user agents (the
REPL's client: MLS, client state, outbox) are homed one per node. Each step is
printed as it finishes, with its duration; every wait is bounded, and a step
that does not finish in its bound fails the demo (:class:`DemoFailed`, exit 1).

The loopback-line pieces (:func:`free_udp_port`, :func:`loopback_node_config`,
:func:`open_line`) are also what the in-process mesh tests build their nodes with.
"""

from __future__ import annotations

import math
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

import msgspec
import trio

from qpc_node.client.agent import Agent
from qpc_node.client.agent_types import AgentError
from qpc_node.client.connect import open_agent
from qpc_node.client.fingerprint import short_code
from qpc_node.errors import ConfigError, QpcError
from qpc_node.federation.core import Federation
from qpc_node.mesh.nodeid import node_id_of_credentials
from qpc_node.mesh.service import MeshService
from qpc_node.node import KEYS_SUBDIR, Node, NodeInfo
from qpc_node.ops.config import Config, load_config
from qpc_node.quic.tls import load_or_create_node_credentials

STEP_BOUND_S = 30.0
"""Default bound of one step: generous for a loaded machine, short enough to fail
clearly instead of hanging (``--step-timeout`` changes it)."""
GROUP = "demo-team"


class DemoFailed(QpcError):
    """A step did not finish within its bound, or ended in an unexpected state."""


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port the kernel just handed out and released: static peers need each
    node's port before the nodes start (a node's config names its peers')."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_id_of_dir(node_data: Path) -> bytes:
    """The mesh id of the node whose data dir is ``node_data`` (its key is made on
    first use, as the node itself would): what peers pin after '#'."""
    return node_id_of_credentials(load_or_create_node_credentials(node_data / KEYS_SUBDIR))


def loopback_node_config(
    node_data: Path, port: int, peers: Sequence[tuple[int, bytes]], **sections: dict[str, str]
) -> Config:
    """A node on 127.0.0.1:``port`` whose only mesh config is ``peers`` (port, node id)
    as static peers; mDNS off, no metrics listener; the environment is not read."""
    overrides: dict[str, dict[str, str]] = {
        "node": {"listen": f"127.0.0.1:{port}", "data_dir": str(node_data), "drain_grace_s": "0.2"},
        "metrics": {"listen": ""},
        "mesh": {
            "mdns": "false",
            "static_peers": ",".join(f"127.0.0.1:{p}#{nid.hex()}" for p, nid in peers),
        },
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(env={}, overrides=overrides)


class LineNode(msgspec.Struct, frozen=True):
    name: str
    node: Node
    info: NodeInfo
    node_id: bytes

    @property
    def mesh(self) -> MeshService:
        if self.node.mesh is None:
            raise DemoFailed(f"node {self.name} is not on the mesh")
        return self.node.mesh

    @property
    def federation(self) -> Federation:
        if self.node.federation is None:
            raise DemoFailed(f"node {self.name} has no federation")
        return self.node.federation


@asynccontextmanager
async def _run_node(name: str, cfg: Config, data: Path, nid: bytes) -> AsyncIterator[LineNode]:
    node = Node(cfg, default_data=data)
    async with trio.open_nursery() as nursery:
        info: NodeInfo = await nursery.start(node.run)
        yield LineNode(name, node, info, nid)
        nursery.cancel_scope.cancel()


def line_node_dir(base: Path, name: str) -> Path:
    return base / name / "node"


@asynccontextmanager
async def open_line(
    base: Path, names: tuple[str, str, str] = ("a", "b", "c")
) -> AsyncIterator[tuple[LineNode, LineNode, LineNode]]:
    """Three nodes A - B - C under ``base``: A and C list only B, B lists both.

    Yields once the three serve; links and routes converge afterwards (the caller
    waits for what it needs, bounded)."""
    a, b, c = names
    ids = {n: node_id_of_dir(line_node_dir(base, n)) for n in names}
    ports = {n: free_udp_port() for n in names}
    peers = {a: [b], b: [a, c], c: [b]}
    async with AsyncExitStack() as stack:
        started = {}
        for n in (b, a, c):
            cfg = loopback_node_config(
                line_node_dir(base, n), ports[n], [(ports[p], ids[p]) for p in peers[n]]
            )
            started[n] = await stack.enter_async_context(
                _run_node(n.upper(), cfg, line_node_dir(base, n), ids[n])
            )
        yield started[a], started[b], started[c]


async def until(predicate: Callable[[], object], within: float, step: float = 0.02) -> bool:
    """Poll ``predicate`` (sync, or returning an awaitable) until it is true; False
    after ``within`` seconds (``math.inf``: the caller's deadline bounds it)."""
    with trio.move_on_after(within):
        while True:
            got = predicate()
            if isinstance(got, Awaitable):
                got = await got
            if got:
                return True
            await trio.sleep(step)
    return False


# ---------------------------------------------------------------------- the demo


def _short(nid: bytes) -> str:
    return nid.hex()[:16]


class _Steps:
    """Runs the demo's steps: each timed, printed when it finishes, and bounded.

    The bound is the deadline of one cancel scope around the whole demo, moved at
    each step: a step may open nodes and agents (nurseries that outlive it), which
    a cancel scope of its own could not enclose.
    """

    def __init__(self, out: Callable[[str], None], bound: float, scope: trio.CancelScope) -> None:
        self._out = out
        self.bound = bound
        self._scope = scope
        self._t0 = trio.current_time()
        self.done = 0
        self.current = ""
        self.waiting = ""

    async def run(self, title: str, body: Callable[[], Awaitable[list[str]]]) -> None:
        self.current, self.waiting = title, ""
        t = trio.current_time()
        self._scope.deadline = t + self.bound
        try:
            lines = await body()
        except DemoFailed as exc:
            raise DemoFailed(f"step {self.done + 1} ({title}): {exc.message}") from None
        self._scope.deadline = math.inf
        self.done += 1
        now = trio.current_time()
        self._out(
            f"[{now - self._t0:6.2f} s] step {self.done}: {title} ({(now - t) * 1000:.0f} ms)"
        )
        for line in lines:
            self._out(f"      {line}")

    def timed_out(self) -> DemoFailed:
        what = f": still waiting for {self.waiting}" if self.waiting else ""
        return DemoFailed(
            f"step {self.done + 1} ({self.current}) did not finish within {self.bound:g} s{what}"
        )

    async def wait(self, what: str, predicate: Callable[[], object]) -> None:
        """Poll until ``predicate`` holds; the step's deadline bounds it."""
        self.waiting = what
        await until(predicate, math.inf)
        self.waiting = ""


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError (a node could not bind its port), alone or in nested groups."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            if (found := _os_error(e)) is not None:
                return found
    return None


def _relay_counts(n: LineNode) -> dict[bytes, tuple[int, int]]:
    """Per neighbour: (envelopes it handed us, envelopes it took custody of from us)."""
    return {
        s.node_id: (sum(s.relay_in.values()), s.relayed_out)
        for s in n.federation.statistics().neighbours
    }


async def _texts(steps: _Steps, agent: Agent, want: str) -> str:
    """Receive until a text equal to ``want`` arrives (the step's deadline bounds
    it): the name of its conversation."""
    steps.waiting = f"{short_code(agent.me.hex())} to receive {want!r}"
    while True:
        for m in await agent.receive(wait=1.0):
            if m.text == want:
                steps.waiting = ""
                return m.conversation


async def run_demo(
    base: Path, out: Callable[[str], None], step_bound: float = STEP_BOUND_S
) -> None:
    """The demo, with its data under ``base``. Raises :class:`DemoFailed` if a step
    does not finish within ``step_bound`` seconds."""
    with trio.CancelScope() as scope:
        steps = _Steps(out, step_bound, scope)
        await _demo(base, out, steps)
    if scope.cancelled_caught:
        raise steps.timed_out()


async def _demo(base: Path, out: Callable[[str], None], steps: _Steps) -> None:
    out(
        f"qpc demo: 3 nodes (A - B - C, static peers, mDNS off) and 3 users on loopback; data {base}"
    )
    async with AsyncExitStack() as stack:
        nodes: list[LineNode] = []

        async def nodes_up() -> list[str]:
            try:
                nodes.extend(await stack.enter_async_context(open_line(base)))
            except (OSError, BaseExceptionGroup) as exc:
                err = _os_error(exc)
                if err is None:
                    raise
                raise DemoFailed(
                    f"could not listen on 127.0.0.1 ({err.strerror}): another program took a "
                    "port between the demo picking it and a node binding it; run the demo again"
                ) from exc
            return [
                f"node {n.name}  127.0.0.1:{n.info.port}  mesh id {_short(n.node_id)}"
                for n in nodes
            ]

        await steps.run("nodes up", nodes_up)
        a_n, b_n, c_n = nodes
        names = {n.node_id: n.name for n in nodes}

        async def links_up() -> list[str]:
            want = {a_n: {b_n.node_id}, b_n: {a_n.node_id, c_n.node_id}, c_n: {b_n.node_id}}

            def linked() -> bool:
                return all(set(n.mesh.peers.up()) == w for n, w in want.items())

            await steps.wait("federation links A-B and B-C up", linked)
            lines = []
            for n in nodes:
                for p in n.mesh.peers.peers():
                    rtt = f"  rtt {p.srtt * 1000:.1f} ms" if p.srtt else ""
                    lines.append(
                        f"{n.name} peer {names.get(p.node, _short(p.node))}  {p.state.value}{rtt}"
                    )
            return lines

        await steps.run("federation links up (mutual TLS, qpc-fed/1)", links_up)

        async def routes() -> list[str]:
            def converged() -> bool:
                now = a_n.mesh.wall_ms()
                got = {r.destination: (r.next_hop, r.hops) for r in a_n.mesh.router.routes(now)}
                now_c = c_n.mesh.wall_ms()
                back = {r.destination: (r.next_hop, r.hops) for r in c_n.mesh.router.routes(now_c)}
                return got.get(c_n.node_id) == (b_n.node_id, 2) and back.get(a_n.node_id) == (
                    b_n.node_id,
                    2,
                )

            await steps.wait("route A -> C via B (2 hops)", converged)
            lines = []
            for n in (a_n, c_n):
                for r in n.mesh.router.routes(n.mesh.wall_ms()):
                    lines.append(
                        f"{n.name} route to {names[r.destination]} via {names[r.next_hop]}, "
                        f"{r.hops} hop{'s' if r.hops != 1 else ''}, seq {r.seq}"
                    )
            return lines

        await steps.run("routes converged", routes)

        users: list[Agent] = []

        async def users_in() -> list[str]:
            for name, n in zip("abc", nodes, strict=True):
                users.append(
                    await stack.enter_async_context(
                        open_agent(
                            base / "users" / name,
                            n.info.host,
                            n.info.port,
                            pin=n.info.cert_fingerprint,
                        )
                    )
                )
            return [
                f"user {name} ({short_code(u.me.hex())}) homed on {n.name}"
                for name, u, n in zip("abc", users, nodes, strict=True)
            ]

        await steps.run("users logged in (one per node)", users_in)
        ua, ub, uc = users
        homes = {ua.me: a_n, ub.me: b_n, uc.me: c_n}

        async def bindings() -> list[str]:
            def spread() -> bool:
                for n in nodes:
                    for user, home in homes.items():
                        b = n.mesh.router.binding(user)
                        if b is None or b.node != home.node_id:
                            return False
                return True

            await steps.wait("every node knows every user's home", spread)
            return [
                f"{n.name} knows {n.mesh.router.statistics().bindings} home bindings" for n in nodes
            ]

        await steps.run("home bindings spread to every node", bindings)

        async def dm() -> list[str]:
            before = {n.name: _relay_counts(n) for n in nodes}
            await ua.dm(uc.me.hex(), "hello c, from a")
            await _texts(steps, uc, "hello c, from a")
            after = {n.name: _relay_counts(n) for n in nodes}

            def handed(frm: LineNode, to: LineNode) -> int:
                """Envelopes ``to`` took from ``frm`` during the DM."""
                return (
                    after[to.name].get(frm.node_id, (0, 0))[0]
                    - before[to.name].get(frm.node_id, (0, 0))[0]
                )

            a_to_b, b_to_c = handed(a_n, b_n), handed(b_n, c_n)
            if a_to_b <= 0 or b_to_c <= 0:
                raise DemoFailed(f"the DM was not relayed A -> B -> C ({a_to_b}, {b_to_c})")
            if a_n.federation.link_up(c_n.node_id):
                raise DemoFailed("A has a direct link to C: the DM was not really relayed")
            return [
                "path: a -> A -> B -> C -> c (2 federation hops; A has no link to C)",
                f"B took {a_to_b} envelopes from A and C took {b_to_c} from B "
                "(the KeyPackage came from C through B; then the Welcome, group info and text)",
            ]

        await steps.run("DM a -> c relayed via B", dm)

        async def reply() -> list[str]:
            await uc.dm(ua.me.hex(), "hi a, c here")
            conv = await _texts(steps, ua, "hi a, c here")
            return [f"a read c's reply in conversation {conv!r} (path c -> C -> B -> A -> a)"]

        await steps.run("reply c -> a", reply)

        async def group() -> list[str]:
            await ua.group_create(GROUP)
            await ua.group_invite(GROUP, ub.me.hex())
            await ua.group_invite(GROUP, uc.me.hex())

            async def joined(u: Agent) -> bool:
                await u.receive(wait=0.5)
                try:
                    return len(await u.group_members(GROUP)) == 3
                except AgentError:
                    return False

            for u in (ub, uc):
                await steps.wait(
                    f"{short_code(u.me.hex())} joined {GROUP!r} (Welcome across nodes)",
                    partial(joined, u),
                )
            return [f"a created {GROUP!r} (MLS) and added b (on B) and c (on C); both joined"]

        await steps.run("group across three nodes", group)

        async def group_msg() -> list[str]:
            text = "hello team, from c"
            await uc.group_send(GROUP, text)
            for u in (ua, ub):
                await _texts(steps, u, text)
            return ["c -> C -> B: b read it; C -> B -> A: a read it"]

        await steps.run("group message from c read by a and b", group_msg)
    out(f"qpc demo: all {steps.done} steps passed")


@contextmanager
def _data_dir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise ConfigError(f"--data {keep}: must be empty or not exist (the demo starts fresh)")
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    tmp = Path(tempfile.mkdtemp(prefix="qpc-demo-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def main(
    keep: Path | None, out: Callable[[str], None], step_bound: float = STEP_BOUND_S
) -> int:
    """``qpc demo``: 0 when every step passed, 1 when one failed (said why on ``out``)."""
    with _data_dir(keep) as base:
        try:
            await run_demo(base, out, step_bound)
        except DemoFailed as exc:
            out(f"qpc demo: FAILED: {exc}")
            return 1
    return 0
