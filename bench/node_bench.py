"""End-to-end through one node on loopback: N senders -> node -> N receivers.

Each sender MLS-encrypts 1 KiB messages for its receiver (a pairwise group),
pads and enqueues them in batches; each receiver long-polls (fetch with wait),
decrypts and acks. The node runs as its own process so its CPU time
(/proc/PID/stat) and peak RSS (VmHWM) are its alone.

Reference in the same run: the identical pipeline with the MLS step left out
(padded random bytes), so the ratio shows what end-to-end encryption costs.

Prints delivered messages/s, p50/p99 end-to-end latency, node CPU ms per
message and node peak RSS, then `node delivered msgs/s ratio=<mls/plain>`.
Run: .venv/bin/python bench/node_bench.py [--pairs 4 --messages 2000 --batch 32]
"""

from __future__ import annotations

import argparse
import os
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
from qpc_node.wire.gen.qpc.v1 import service_pb2

CLK_TCK = os.sysconf("SC_CLK_TCK")


def node_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK  # utime + stime


def node_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_node(data: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    env = dict(
        os.environ,
        QPC_LIMITS_RATE_PER_SECOND="1000000",
        QPC_LIMITS_RATE_BURST="1000000",
        QPC_METRICS_LISTEN="",
        QPC_LOG="warning",
    )
    prof = os.environ.get("QPC_BENCH_PROFILE")  # write a cProfile of the node there
    prefix = ["-m", "cProfile", "-o", prof] if prof else []
    argv = [sys.executable, *prefix, "-m", "qpc_node.cli", "node", "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen([*argv, "--data", str(data)], stdout=subprocess.PIPE, env=env)
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


@dataclass
class Result:
    delivered: int
    seconds: float
    latencies: list[float]
    node_cpu: float


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
            nonlocal delivered
            after, got = 0, 0
            while got < messages:
                resp = await rpc.call(
                    "qpc.v1.Delivery/Fetch",
                    service_pb2.FetchRequest(after_seq=after, limit=256, wait_ms=2000),
                    service_pb2.FetchResponse,
                    timeout=10,
                )
                for m in resp.messages:
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

        cpu0, t0 = node_cpu_s(node_pid), time.perf_counter()
        with trio.fail_after(600):
            async with trio.open_nursery() as n:
                for srpc, rrpc, gs, gr, to in setups:
                    n.start_soon(sender, srpc, gs, to)
                    n.start_soon(receiver, rrpc, gr)
        seconds = time.perf_counter() - t0
        ep.abort()
    return Result(delivered, seconds, latencies, node_cpu_s(node_pid) - cpu0)


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--messages", type=int, default=1500, help="per pair")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qpc-nodebench-") as d:
        tmp = Path(d)
        proc, port, pin = start_node(tmp / "node")
        try:
            rows = {}
            for k, mls in enumerate((False, True, False, True)):  # interleaved: shared machine
                res = trio.run(
                    run, args.pairs, args.messages, args.batch, mls, tmp, port, pin, proc.pid, k
                )
                rows.setdefault(mls, []).append(res)
            hwm = node_hwm_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{'pipeline':<10} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'node CPU ms/msg':>16}")
    best = {}
    for mls, results in rows.items():
        r = max(results, key=lambda x: x.delivered / x.seconds)
        best[mls] = r.delivered / r.seconds
        name = "mls" if mls else "plain(ref)"
        print(
            f"{name:<10} {best[mls]:>9.0f} {pct(r.latencies, 50) * 1e3:>8.1f} "
            f"{pct(r.latencies, 99) * 1e3:>8.1f} {r.node_cpu / r.delivered * 1e3:>16.3f}"
        )
    print(
        f"node peak RSS {hwm:.1f} MiB; {args.pairs} pairs x {args.messages} msgs, batch {args.batch}"
    )
    print(f"node delivered msgs/s ratio={best[True] / best[False]:.2f}")


if __name__ == "__main__":
    main()
