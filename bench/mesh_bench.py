"""The mesh: throughput and latency through 0, 1 and 2 federation hops; discovery;
``kill -9`` detection. One run, on loopback (and in network namespaces for mDNS).

Three ``qpc node`` processes on 127.0.0.1 in a line A - B - C (``mesh.static_peers``
only, mDNS off; A and C do not peer). The senders are homed on A for every path;
each path has its own receivers, homed on A (one node: the existing path), on B
(1 federation hop) or on C (2 hops). Same clients, message count, size and batch
for the three paths; paths interleave round by round (the machine is shared) and
the best round of each is shown. Envelopes carry 1 KiB of padded bytes (the nodes
never see the difference from MLS ciphertext; MLS would only load this process).
A refused or deferred envelope (a relay's queue is full) is sent again after a
short pause, so every path delivers the same messages.

Discovery: real mDNS between two discovery processes (the node's own zeroconf
code, ``python -m qpc_node.mesh.discovery``) in two namespaces on one bridge,
``--discovery-rounds`` fresh starts: median time from process launch and from
"zeroconf ready" to the first sight of the other. Needs root and iproute2;
otherwise "discovery: skipped (reason)". Detection: ``kill -9`` of C, time until
B's peer table (``Node/Mesh`` RPC) no longer shows it up.

Targets: 2-hop msgs/s >= 0.5x one node; discovery <= 1.5 s median; detection <= 15 s.
Last line: ``mesh 2hop ratio=<2-hop msgs/s / one-node msgs/s>``.
Run: .venv/bin/python bench/mesh_bench.py [--pairs 2 --messages 1000 --batch 32 --rounds 3]
     (--smoke: tiny counts, for the test that checks the bench runs).
QPC_BENCH_PROFILE=DIR writes a cProfile of each node process to DIR/node-{a,b,c}.prof.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from qpc_node.crypto import Identity
from qpc_node.demo import free_udp_port, node_id_of_dir
from qpc_node.errors import StatusCode
from qpc_node.mesh.signed import sign_binding
from qpc_node.quic import ALPN_CLIENT, ClientTLS, Endpoint, open_endpoint
from qpc_node.rpc import RpcClient
from qpc_node.service.auth import auth_message
from qpc_node.service.stats import STATS_METHOD
from qpc_node.wire.envelope import Envelope, pad, unpad
from qpc_node.wire.gen.qpc.v1 import ops_pb2, service_pb2

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATHS = ("one node", "1 hop", "2 hops")
CONVERGE_S = 60.0
DETECT_BOUND_S = 30.0


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK


def wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class NodeProc:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    pin: str
    node_id: bytes


def start_nodes(tmp: Path) -> list[NodeProc]:
    """A - B - C as ``qpc node`` processes (ports and node ids known before start)."""
    names = ("a", "b", "c")
    ids = {n: node_id_of_dir(tmp / n) for n in names}
    ports = {n: free_udp_port() for n in names}
    peers = {"a": ["b"], "b": ["a", "c"], "c": ["b"]}
    prof = os.environ.get("QPC_BENCH_PROFILE")
    out = []
    for n in names:
        env = dict(
            os.environ,
            QPC_LIMITS_RATE_PER_SECOND="1000000",
            QPC_LIMITS_RATE_BURST="1000000",
            QPC_METRICS_LISTEN="",
            QPC_LOG="error",
            QPC_MESH_MDNS="0",
            QPC_MESH_STATIC_PEERS=",".join(
                f"127.0.0.1:{ports[p]}#{ids[p].hex()}" for p in peers[n]
            ),
        )
        prefix = ["-m", "cProfile", "-o", f"{prof}/node-{n}.prof"] if prof else []
        argv = [sys.executable, *prefix, "-m", "qpc_node.cli", "node"]
        argv += ["--listen", f"127.0.0.1:{ports[n]}", "--data", str(tmp / n)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # "qpc node listening on HOST:PORT pin=FPR"
        if not line:
            raise SystemExit(f"node {n} exited before announcing its address")
        pin = line.rsplit(" ", 1)[1].strip().removeprefix("pin=")
        out.append(NodeProc(n.upper(), proc, ports[n], pin, ids[n]))
    return out


def stop_nodes(nodes: list[NodeProc]) -> None:
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    for n in nodes:
        try:
            n.proc.wait(30)
        except subprocess.TimeoutExpired:
            n.proc.kill()
            n.proc.wait(10)


@dataclass
class User:
    ident: Identity
    rpc: RpcClient
    home: NodeProc

    @property
    def me(self) -> bytes:
        return bytes.fromhex(self.ident.fingerprint)


async def login(ep: Endpoint, node: NodeProc, ident: Identity) -> User:
    """Auth/Challenge + Prove with a signed home binding, as the client agent does."""
    conn = await ep.connect("127.0.0.1", node.port, ClientTLS(ALPN_CLIENT, pin=node.pin))
    rpc = RpcClient(conn.open_stream)
    ch = await rpc.call(
        "qpc.v1.Auth/Challenge",
        service_pb2.AuthChallengeRequest(),
        service_pb2.AuthChallengeResponse,
    )
    prove = service_pb2.AuthProveRequest(
        public_key=ident.public_key,
        signature=ident.sign(auth_message(ch.nonce, bytes.fromhex(node.pin))),
    )
    now = wall_ms()
    prove.home.CopyFrom(
        sign_binding(
            ident.public_key, ident.sign, bytes(ch.node_id), now, now + 3_600_000
        ).to_proto()
    )
    await rpc.call("qpc.v1.Auth/Prove", prove, service_pb2.AuthProveResponse)
    return User(ident, rpc, node)


async def enqueue(rpc: RpcClient, envs: list[Envelope]) -> int:
    """Enqueue until every envelope is taken (a deferred one is sent again after a
    pause; the path's figure includes that wait). Returns how many were resent."""
    resent = 0
    pause = 0.01
    while envs:
        resp = await rpc.call(
            "qpc.v1.Delivery/Enqueue",
            service_pb2.EnqueueRequest(envelopes=[e.to_proto() for e in envs]),
            service_pb2.EnqueueResponse,
        )
        left = [e for e, r in zip(envs, resp.results, strict=True) if r.status != StatusCode.OK]
        if left:
            resent += len(left)
            await trio.sleep(pause)
            pause = min(pause * 2, 0.5)
        envs = left
    return resent


async def store_work(u: User) -> tuple[float, float]:
    """(seconds busy, operations) of the store worker of ``u``'s node so far."""
    resp = await u.rpc.call(STATS_METHOD, ops_pb2.StatsRequest(), ops_pb2.StatsResponse)
    got = {s.name: s.value for s in resp.samples if s.name.startswith("qpc_store_op_seconds")}
    return got.get("qpc_store_op_seconds_sum", 0.0), got.get("qpc_store_op_seconds_count", 0.0)


async def mesh_view(u: User) -> ops_pb2.MeshResponse:
    return await u.rpc.call("qpc.v1.Node/Mesh", ops_pb2.MeshRequest(), ops_pb2.MeshResponse)


@dataclass
class Result:
    path: str
    delivered: int
    seconds: float
    latencies: list[float]
    nodes_cpu: float
    resent: int
    store_busy: tuple[float, ...] = ()
    """Per node A, B, C: seconds its store worker (SQLite + fsync) was busy."""
    store_ops: tuple[int, ...] = ()

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds


async def one_path(
    path: str,
    senders: list[User],
    receivers: list[User],
    messages: int,
    batch: int,
    nodes: list[NodeProc],
    watchers: list[User],
) -> Result:
    latencies: list[float] = []
    delivered = 0
    resent = 0

    async def sender(u: User, to: bytes) -> None:
        nonlocal resent
        for start in range(0, messages, batch):
            envs = [
                Envelope(
                    os.urandom(16),
                    to,
                    wall_ms() + 3_600_000,
                    8,
                    pad(time.perf_counter().hex().encode().ljust(1024, b".")),
                )
                for _ in range(min(batch, messages - start))
            ]
            resent += await enqueue(u.rpc, envs)

    async def receiver(u: User) -> None:
        nonlocal delivered
        after, got = 0, 0
        while got < messages:
            resp = await u.rpc.call(
                "qpc.v1.Delivery/Fetch",
                service_pb2.FetchRequest(after_seq=after, limit=256, wait_ms=2000),
                service_pb2.FetchResponse,
                timeout=10,
            )
            now = time.perf_counter()
            for m in resp.messages:
                body = unpad(m.envelope.ciphertext)
                latencies.append(now - float.fromhex(body.rstrip(b".").decode()))
                after = m.seq
                got += 1
            if resp.messages:
                await u.rpc.call(
                    "qpc.v1.Delivery/Ack",
                    service_pb2.AckRequest(up_to_seq=after),
                    service_pb2.AckResponse,
                )
        delivered += got

    cpu0 = sum(proc_cpu_s(n.proc.pid) for n in nodes)
    st0 = [await store_work(w) for w in watchers]
    t0 = time.perf_counter()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for s, r in zip(senders, receivers, strict=True):
                nursery.start_soon(sender, s, r.me)
                nursery.start_soon(receiver, r)
    seconds = time.perf_counter() - t0
    cpu = sum(proc_cpu_s(n.proc.pid) for n in nodes) - cpu0
    st = [await store_work(w) for w in watchers]
    return Result(
        path,
        delivered,
        seconds,
        latencies,
        cpu,
        resent,
        tuple(b[0] - a[0] for a, b in zip(st0, st, strict=True)),
        tuple(int(b[1] - a[1]) for a, b in zip(st0, st, strict=True)),
    )


async def throughput_and_detection(
    tmp: Path, pairs: int, messages: int, batch: int, rounds: int, detect: bool
) -> tuple[dict[str, Result], list[float], float | None]:
    nodes = start_nodes(tmp / "nodes")
    a, _, c = nodes
    try:
        async with open_endpoint("127.0.0.1", 0) as ep:

            def ident(name: str) -> Identity:
                return Identity.create(str(tmp / "users" / name), b"k" * 32, durable=False)

            (tmp / "users").mkdir(parents=True, exist_ok=True)
            senders = [await login(ep, a, ident(f"s{i}")) for i in range(pairs)]
            receivers = {
                path: [await login(ep, home, ident(f"r{k}-{i}")) for i in range(pairs)]
                for k, (path, home) in enumerate(zip(PATHS, nodes, strict=True))
            }
            users = senders + [r for rs in receivers.values() for r in rs]
            # Each receiver writes to its sender once: its home then counts the sender
            # as a contact, not a stranger held to a share of the mailbox.
            for rs in receivers.values():
                for s, r in zip(senders, rs, strict=True):
                    hello = Envelope(os.urandom(16), s.me, wall_ms() + 3_600_000, 8, pad(b"hi"))
                    await enqueue(r.rpc, [hello])

            # Routes and every user's home binding known on every node.
            watchers = [senders[0], receivers["1 hop"][0], receivers["2 hops"][0]]  # A, B, C
            t0 = time.perf_counter()
            with trio.fail_after(CONVERGE_S):
                while True:
                    views = [await mesh_view(w) for w in watchers]
                    routes = {bytes(r.destination): r.hops for r in views[0].routes}
                    if routes.get(c.node_id) == 2 and all(v.bindings >= len(users) for v in views):
                        break
                    await trio.sleep(0.05)
            print(
                f"mesh converged (links, 2-hop route, {len(users)} bindings) in {time.perf_counter() - t0:.2f} s"
            )

            rows: dict[str, list[Result]] = {}
            for _ in range(rounds):
                for path in PATHS:
                    res = await one_path(
                        path, senders, receivers[path], messages, batch, nodes, watchers
                    )
                    rows.setdefault(path, []).append(res)
            best = {p: max(rs, key=lambda r: r.rate) for p, rs in rows.items()}
            per_round = [
                two.rate / one.rate
                for one, two in zip(rows["one node"], rows["2 hops"], strict=True)
            ]

            detected: float | None = None
            if detect:
                watcher = receivers["1 hop"][0]  # homed on B, C's neighbour
                c.proc.kill()  # SIGKILL: no goodbye, no CONNECTION_CLOSE
                t_kill = time.perf_counter()
                c.proc.wait(10)
                with trio.move_on_after(DETECT_BOUND_S):
                    while True:
                        view = await mesh_view(watcher)
                        state = {bytes(p.node_id): p.state for p in view.peers}
                        if state.get(c.node_id) != "up":
                            detected = time.perf_counter() - t_kill
                            break
                        await trio.sleep(0.05)
            ep.abort()
        return best, per_round, detected
    finally:
        stop_nodes(nodes)


def discovery(rounds: int) -> tuple[list[float], list[float]] | str:
    """Median inputs: seconds from launch / from ready to the first sight of the other."""
    sys.path.insert(0, str(REPO / "tests" / "mesh"))
    from netns_kit import Netns, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return reason
    from disc_proc import DiscProc

    launch: list[float] = []
    ready: list[float] = []
    with Netns() as net:
        hosts = [net.host(f"d{i}") for i in range(2)]
        for h in hosts:
            net.connect(h, "br0", ipv4=True)
        for r in range(rounds):
            procs = [
                DiscProc(h, 100 + 2 * r + i, extra=["--seconds", "30"]) for i, h in enumerate(hosts)
            ]
            for p, other in ((procs[0], procs[1]), (procs[1], procs[0])):
                if not p.wait_for(lambda _e, p=p, o=other: o.node in p.seen(), 30):
                    return f"round {r}: no peer_seen within 30 s: {p.stderr()}"
                t = p.seen()[other.node]["t"]
                launch.append(t - p.launched)
                ready.append(t - p.of("ready")[0]["t"])
            for p in procs:
                p.terminate()
            for p in procs:
                p.proc.wait(20)
    return launch, ready


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2, help="sender/receiver pairs per path")
    ap.add_argument("--messages", type=int, default=1000, help="per pair and round")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three paths")
    ap.add_argument("--discovery-rounds", type=int, default=5)
    ap.add_argument("--no-detect", action="store_true", help="skip the kill -9 detection")
    ap.add_argument("--smoke", action="store_true", help="tiny counts: checks the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.pairs, args.messages, args.batch, args.rounds, args.discovery_rounds = 1, 20, 8, 1, 1
    with open("/proc/loadavg") as f:
        print(f"load before: {f.read().strip()}")
    with tempfile.TemporaryDirectory(prefix="qpc-meshbench-") as d:
        best, per_round, detected = trio.run(
            throughput_and_detection,
            Path(d),
            args.pairs,
            args.messages,
            args.batch,
            args.rounds,
            not args.no_detect,
        )
    try:
        disc = (
            discovery(args.discovery_rounds)
            if args.discovery_rounds > 0
            else "--discovery-rounds 0"
        )
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        disc = f"failed: {exc}"  # the throughput figures still print

    one = best["one node"].rate
    print(
        f"{'path':<10} {'msgs/s':>9} {'x one':>6} {'p50 ms':>8} {'p99 ms':>8} {'nodes CPU ms/msg':>17} {'resent':>7}"
    )
    for path in PATHS:
        r = best[path]
        print(
            f"{path:<10} {r.rate:>9.0f} {r.rate / one:>6.2f} {pct(r.latencies, 50) * 1e3:>8.1f} "
            f"{pct(r.latencies, 99) * 1e3:>8.1f} {r.nodes_cpu / r.delivered * 1e3:>17.3f} {r.resent:>7}"
        )
    print("store worker busy (SQLite + fsync) per node, share of the path's wall time:")
    for path in PATHS:
        r = best[path]
        busy = "  ".join(
            f"{n} {b / r.seconds:4.0%} ({ops} ops)"
            for n, b, ops in zip("ABC", r.store_busy, r.store_ops, strict=True)
        )
        print(f"  {path:<10} {busy}")
    print("2-hop / one-node msgs/s per round: " + " ".join(f"{x:.2f}" for x in per_round))
    print(
        f"{args.pairs} pairs x {args.messages} msgs of 1 KiB, batch {args.batch}, best of {args.rounds} rounds"
    )
    if isinstance(disc, str):
        print(f"discovery: skipped ({disc})")
    else:
        launch, ready = disc
        ok = "ok" if statistics.median(launch) <= 1.5 else "MISSED"
        print(
            f"discovery: median {statistics.median(launch):.3f} s from launch "
            f"(max {max(launch):.3f}), {statistics.median(ready):.3f} s from zeroconf ready, "
            f"{len(launch)} sightings; target <= 1.5 s from launch: {ok}"
        )
    if args.no_detect:
        print("detection: skipped (--no-detect)")
    elif detected is None:
        print(
            f"detection: MISSED (C still up in B's peer table {DETECT_BOUND_S:.0f} s after kill -9)"
        )
    else:
        print(
            f"detection: {detected:.2f} s from kill -9 to 'not up' in B's peer table; target <= 15 s: {'ok' if detected <= 15 else 'MISSED'}"
        )
    with open("/proc/loadavg") as f:
        print(f"load after: {f.read().strip()}")
    ratio = best["2 hops"].rate / one
    print(f"mesh 2hop ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
