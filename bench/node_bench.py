"""End-to-end through one node on loopback: N senders -> node -> N receivers.

Each sender MLS-encrypts 1 KiB messages for its receiver (a pairwise group),
pads and enqueues them in batches; each receiver long-polls (fetch with wait),
decrypts and acks. The node runs as its own process so its CPU time
(/proc/PID/stat) and peak RSS (VmHWM) are its alone.

Reference in the same run: the identical pipeline with the MLS step left out
(padded random bytes), so the ratio shows what end-to-end encryption costs.

Prints delivered messages/s, p50/p99 end-to-end latency, node CPU ms per
message and node peak RSS, then `node delivered msgs/s ratio=<mls/plain>`.

Flash (issue 15): the node's ``/proc/PID/io`` counters around every round.
``write_bytes`` is what the kernel accounted to the block device for the node's
process (4 KiB pages dirtied in the page cache: WAL frames, the checkpoints' copies
into node.db; ext4's own journal is not in it), ``wchar`` what the node handed to
write(). Both per delivered message (enqueue -> fetch -> ack), over all rounds, so
the WAL checkpoints that fall inside the rounds are in the figure; the WAL left
unchecked at the end is checkpointed by the bench (PASSIVE, from its own process,
counted the same way). ``payload_ratio`` is that over the stored ciphertext (the
padded MLS message, what the node must keep until acked); the 1 KiB plaintext ratio
is printed beside it.

Per 1,000 messages (``--strace``, on by default when strace exists): one extra
round of the plain pipeline with ``strace -f -c`` attached to every node thread
(slows the node: not in the timed figures): syscalls, datagrams sent (sendmsg /
sendto / sendmmsg calls) and the rest by name.

Last lines: `node msgs_per_s=<mls> cpu_ms_per_msg=<mls>` and
`flash bytes_per_msg=<write_bytes> payload_ratio=<x>`.
Run: .venv/bin/python bench/node_bench.py [--pairs 4 --messages 1500 --batch 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from qpc_node.crypto import Group, Identity
from qpc_node.quic import ALPN_CLIENT, ClientTLS, Endpoint, open_endpoint
from qpc_node.rpc import RpcClient
from qpc_node.service.auth import auth_message
from qpc_node.wire.envelope import Envelope, pad, unpad
from qpc_node.wire.gen.qpc.v1 import ops_pb2, service_pb2

CLK_TCK = os.sysconf("SC_CLK_TCK")
STATS_SHOWN = ("datagrams", "udp_tx_calls", "udp_rx_calls", "store_transactions")


def node_cpu_s(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK  # utime + stime


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds per thread of the node (the main thread's id is the pid)."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = node_cpu_s(pid, int(task.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def node_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def proc_io(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/io: rchar, wchar, syscr, syscw, read_bytes, write_bytes, ..."""
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def io_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def checkpoint(db: Path) -> dict[str, int]:
    """Fold what the node left in its WAL into node.db; the bench's own I/O for it."""
    before = proc_io()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()
    return io_delta(proc_io(), before)


def strace_counts(path: Path) -> dict[str, int]:
    """Calls per syscall from an ``strace -c`` summary."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


def start_node(data: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    env = dict(
        os.environ,
        QPC_LIMITS_RATE_PER_SECOND="1000000",
        QPC_LIMITS_RATE_BURST="1000000",
        QPC_METRICS_LISTEN="",
        QPC_LOG="warning",
    )
    # Another source tree for the node (A/B of a change; the wire is the same):
    # QPC_BENCH_NODE_SRC=DIR with DIR/qpc_node (e.g. `git archive REV qpc_node`).
    src = os.environ.get("QPC_BENCH_NODE_SRC")
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    prof = os.environ.get("QPC_BENCH_PROFILE")  # write a cProfile of the node there
    prefix = ["-m", "cProfile", "-o", prof] if prof else []
    argv = [sys.executable, *prefix, "-m", "qpc_node.cli", "node", "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [*argv, "--data", str(data)], stdout=subprocess.PIPE, env=env, cwd=src or None
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    addr, pin = line.rsplit(" ", 2)[1:]
    return proc, int(addr.rsplit(":", 1)[1]), pin.strip().removeprefix("pin=")


async def session(ep: Endpoint, port: int, pin: str, ident: Identity) -> RpcClient:
    conn = await ep.connect("127.0.0.1", port, ClientTLS(ALPN_CLIENT, pin=pin))
    rpc = RpcClient(conn.open_stream)
    ch = await rpc.call(
        "qpc.v1.Auth/Challenge",
        service_pb2.AuthChallengeRequest(),
        service_pb2.AuthChallengeResponse,
    )
    sig = ident.sign(auth_message(ch.nonce, bytes.fromhex(pin)))
    await rpc.call(
        "qpc.v1.Auth/Prove",
        service_pb2.AuthProveRequest(public_key=ident.public_key, signature=sig),
        service_pb2.AuthProveResponse,
    )
    return rpc


async def counters(rpc: RpcClient) -> dict[str, float]:
    """The node's own counters (Node/Stats: what /metrics exports), summed over labels."""
    resp = await rpc.call("qpc.v1.Node/Stats", ops_pb2.StatsRequest(), ops_pb2.StatsResponse)
    out: dict[str, float] = {}
    for s in resp.samples:
        out[s.name] = out.get(s.name, 0.0) + s.value
    return out


@dataclass
class Result:
    delivered: int
    seconds: float
    latencies: list[float]
    node_cpu: float
    io: dict[str, int]
    ciphertext_bytes: int
    stats: dict[str, float]
    main_thread_cpu: float  # the Trio thread (QUIC, RPC, services)
    other_threads_cpu: float  # the store worker, MLS workers, ...


async def run(
    pairs: int,
    messages: int,
    batch: int,
    mls: bool,
    tmp: Path,
    port: int,
    pin: str,
    node_pid: int,
    round_no: int,
) -> Result:
    latencies: list[float] = []
    delivered = 0
    stored = 0
    async with open_endpoint("127.0.0.1", 0) as ep:
        setups: list[tuple[RpcClient, RpcClient, Group, Group, bytes]] = []
        for i in range(pairs):
            s = Identity.create(str(tmp / f"{round_no}-s{i}"), b"k" * 32, durable=False)
            r = Identity.create(str(tmp / f"{round_no}-r{i}"), b"k" * 32, durable=False)
            srpc = await session(ep, port, pin, s)
            rrpc = await session(ep, port, pin, r)
            gs = s.create_group()
            _, welcome = gs.add([r.key_package()])
            gs.merge_pending_commit()
            gr = r.join(welcome)
            # r writes to s once: its node then counts s as r's contact, not a stranger
            # held to a bounded share of r's mailbox (docs/threat-model.md).
            hello = Envelope(
                os.urandom(16),
                bytes.fromhex(s.fingerprint),
                int(time.time() * 1000) + 3_600_000,
                4,
                pad(b"hi"),
            )
            await rrpc.call(
                "qpc.v1.Delivery/Enqueue",
                service_pb2.EnqueueRequest(envelopes=[hello.to_proto()]),
                service_pb2.EnqueueResponse,
            )
            setups.append((srpc, rrpc, gs, gr, bytes.fromhex(r.fingerprint)))

        async def sender(rpc: RpcClient, g: Group, to: bytes) -> None:
            for start in range(0, messages, batch):
                envs = []
                for _ in range(min(batch, messages - start)):
                    body = time.perf_counter().hex().encode().ljust(1024, b".")
                    data = g.encrypt(body) if mls else body
                    envs.append(
                        Envelope(
                            os.urandom(16), to, int(time.time() * 1000) + 3_600_000, 4, pad(data)
                        ).to_proto()
                    )
                await rpc.call(
                    "qpc.v1.Delivery/Enqueue",
                    service_pb2.EnqueueRequest(envelopes=envs),
                    service_pb2.EnqueueResponse,
                )

        async def receiver(rpc: RpcClient, g: Group) -> None:
            nonlocal delivered, stored
            after, got = 0, 0
            while got < messages:
                resp = await rpc.call(
                    "qpc.v1.Delivery/Fetch",
                    service_pb2.FetchRequest(after_seq=after, limit=256, wait_ms=2000),
                    service_pb2.FetchResponse,
                    timeout=10,
                )
                for m in resp.messages:
                    stored += len(m.envelope.ciphertext)
                    data = unpad(m.envelope.ciphertext)
                    body = g.process(data).data if mls else data
                    latencies.append(
                        time.perf_counter() - float.fromhex(body.rstrip(b".").decode())
                    )
                    after = m.seq
                    got += 1
                if resp.messages:
                    await rpc.call(
                        "qpc.v1.Delivery/Ack",
                        service_pb2.AckRequest(up_to_seq=after),
                        service_pb2.AckResponse,
                    )
            delivered += got

        stats0 = await counters(setups[0][0])
        io0 = proc_io(node_pid)
        threads0 = thread_cpu_s(node_pid)
        cpu0, t0 = node_cpu_s(node_pid), time.perf_counter()
        with trio.fail_after(600):
            async with trio.open_nursery() as n:
                for srpc, rrpc, gs, gr, to in setups:
                    n.start_soon(sender, srpc, gs, to)
                    n.start_soon(receiver, rrpc, gr)
        seconds = time.perf_counter() - t0
        cpu = node_cpu_s(node_pid) - cpu0
        io = io_delta(proc_io(node_pid), io0)
        threads = {t: c - threads0.get(t, 0.0) for t, c in thread_cpu_s(node_pid).items()}
        main_cpu = threads.pop(node_pid, 0.0)
        stats1 = await counters(setups[0][0])
        stats = {k: v - stats0.get(k, 0.0) for k, v in stats1.items()}
        ep.abort()
    return Result(
        delivered, seconds, latencies, cpu, io, stored, stats, main_cpu, sum(threads.values())
    )


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)


def traced_round(
    args: argparse.Namespace, tmp: Path, port: int, pin: str, pid: int
) -> tuple[dict[str, int], int]:
    """One plain round with strace counting every node thread's syscalls."""
    out = tmp / "strace.txt"
    tracer = subprocess.Popen(
        ["strace", "-f", "-c", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert tracer.stderr is not None
    tracer.stderr.readline()  # "strace: Process N attached": tracing from here on
    try:
        res = trio.run(run, args.pairs, args.messages, args.batch, False, tmp, port, pin, pid, 99)
    finally:
        tracer.send_signal(signal.SIGINT)  # detach and write the summary
        tracer.wait(60)
    return strace_counts(out), res.delivered


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--messages", type=int, default=1500, help="per pair")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="per pipeline, interleaved")
    ap.add_argument("--no-strace", action="store_true", help="skip the syscall round")
    args = ap.parse_args()
    traced: tuple[dict[str, int], int] | None = None
    with tempfile.TemporaryDirectory(prefix="qpc-nodebench-") as d:
        tmp = Path(d)
        proc, port, pin = start_node(tmp / "node")
        try:
            rows: dict[bool, list[Result]] = {}
            for k in range(2 * args.rounds):  # interleaved: shared machine
                mls = k % 2 == 1
                res = trio.run(
                    run, args.pairs, args.messages, args.batch, mls, tmp, port, pin, proc.pid, k
                )
                rows.setdefault(mls, []).append(res)
            hwm = node_hwm_mib(proc.pid)
            tail = checkpoint(tmp / "node" / "node.db")  # what the rounds left in the WAL
            if not args.no_strace and shutil.which("strace"):
                traced = traced_round(args, tmp, port, pin, proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    print(f"node source: {os.environ.get('QPC_BENCH_NODE_SRC') or 'this tree'}")
    print(
        f"{'pipeline':<10} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'node CPU ms/msg':>16}"
        f" {'trio thread':>11} {'others':>7}"
    )
    best: dict[bool, Result] = {}
    for mls, results in rows.items():
        r = max(results, key=lambda x: x.delivered / x.seconds)
        best[mls] = r
        name = "mls" if mls else "plain(ref)"
        print(
            f"{name:<10} {r.delivered / r.seconds:>9.0f} {pct(r.latencies, 50) * 1e3:>8.1f} "
            f"{pct(r.latencies, 99) * 1e3:>8.1f} {r.node_cpu / r.delivered * 1e3:>16.3f}"
            f" {r.main_thread_cpu / r.delivered * 1e3:>11.3f}"
            f" {r.other_threads_cpu / r.delivered * 1e3:>7.3f}"
            f"   (rounds msgs/s: "
            + " ".join(f"{x.delivered / x.seconds:.0f}" for x in results)
            + ")"
        )
    print(
        f"node peak RSS {hwm:.1f} MiB; {args.pairs} pairs x {args.messages} msgs, batch {args.batch}"
    )
    everything = [r for results in rows.values() for r in results]
    delivered = sum(r.delivered for r in everything)
    stored = sum(r.ciphertext_bytes for r in everything)
    written = sum(r.io["write_bytes"] for r in everything) + tail["write_bytes"]
    wchar = sum(r.io["wchar"] for r in everything) + tail["wchar"]
    per_msg = written / delivered
    ct = stored / delivered
    print(
        f"flash over {delivered} delivered msgs (enqueue -> fetch -> ack, WAL checkpointed):"
        f" write_bytes {per_msg:,.0f} B/msg, wchar {wchar / delivered:,.0f} B/msg;"
        f" stored ciphertext {ct:,.0f} B/msg (1 KiB plaintext: write_bytes"
        f" {per_msg / 1024:.2f} x)"
    )
    totals: dict[str, float] = {}
    for r in everything:
        for k, v in r.stats.items():
            totals[k] = totals.get(k, 0.0) + v
    shown = [k for k in sorted(totals) if any(w in k for w in STATS_SHOWN) and totals[k] > 0]
    print(
        f"per 1,000 msgs (node counters, all {len(everything)} rounds): "
        + ", ".join(f"{k} {totals[k] * 1000 / delivered:,.0f}" for k in shown)
        + f"; syscalls read {sum(r.io['syscr'] for r in everything) * 1000 / delivered:,.0f}"
        f" write {sum(r.io['syscw'] for r in everything) * 1000 / delivered:,.0f} (/proc/PID/io)"
    )
    if traced is not None:
        calls, n = traced
        per_k = 1000 / n
        sends = sum(calls.get(c, 0) for c in ("sendmsg", "sendto", "sendmmsg"))
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
        print(
            f"per 1,000 msgs (plain round under strace -f -c, {n} msgs): syscalls"
            f" {sum(calls.values()) * per_k:,.0f}, datagrams sent (send calls)"
            f" {sends * per_k:,.0f}; " + ", ".join(f"{name} {c * per_k:,.0f}" for name, c in top)
        )
    print(
        f"node delivered msgs/s ratio={best[True].delivered / best[True].seconds / (best[False].delivered / best[False].seconds):.2f}"
    )
    m = best[True]
    print(
        f"node msgs_per_s={m.delivered / m.seconds:.0f}"
        f" cpu_ms_per_msg={m.node_cpu / m.delivered * 1e3:.3f}"
    )
    print(f"flash bytes_per_msg={per_msg:.0f} payload_ratio={per_msg / ct:.2f}")


if __name__ == "__main__":
    main()
