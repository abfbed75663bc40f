"""The rpc bench's load in one process: CPU per call, and Python calls per call.

    .venv/bin/python bench/rpc_inproc.py [--calls 8000] [--tree DIR] [--count]

An ``RpcServer`` and an ``RpcClient`` on two ``open_endpoint``\\ s over loopback
(mTLS, ``qpc-fed/1``), 64 workers calling a 1 KiB echo, as ``bench/rpc_bench.py``
runs them in two processes. Prints the process CPU per call (client and node
together) and calls/s. On a shared machine CPU time moves with the load (caches,
frequency), so before/after pairs are run alternately; ``--count`` instead runs
the load under cProfile and prints Python function calls per RPC and a few
counters (cancel scopes, aioquic's per-stream work, packets), which do not move
with the load. ``--tree DIR`` runs another source tree's ``qpc_node`` (a
``git worktree add --detach`` of the base, with the built ``_core`` copied in).
Figures: docs/performance.md, "RPC and QUIC".
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 200


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=8000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--count", action="store_true", help="Python calls per RPC (cProfile)")
    a = p.parse_args()
    # The tree's own rpc_bench (it puts its tree first on sys.path for qpc_node).
    sys.path[:0] = [a.tree, str(Path(a.tree) / "bench")]

    import rpc_bench as rb
    import trio
    from google.protobuf.wrappers_pb2 import BytesValue

    import qpc_node
    from qpc_node.quic import ClientTLS, ServerTLS, open_endpoint
    from qpc_node.rpc import NO_RETRY, CallContext, MethodTable, RpcClient, RpcServer, ServerConfig
    from qpc_node.rpc.quic import QuicRpcHandler

    if not qpc_node.__file__ or not qpc_node.__file__.startswith(a.tree):
        raise SystemExit(f"qpc_node came from {qpc_node.__file__}, not {a.tree}")
    profile = cProfile.Profile() if a.count else None

    async def echo(req: BytesValue, ctx: CallContext) -> BytesValue:
        return BytesValue(value=b"r" * len(req.value))

    async def run() -> None:
        with tempfile.TemporaryDirectory(prefix="qpc-rpc-inproc-") as tmp:
            d = Path(tmp)
            rb.write_pki(d)
            methods = MethodTable()
            methods.register(rb.ECHO, BytesValue, BytesValue, echo)
            server = RpcServer(methods, ServerConfig(max_concurrent_calls=128))
            ca = (d / "ca.pem").read_bytes()
            tls = ServerTLS(rb.creds(d, "server"), federation_ca=ca)
            ctls = ClientTLS(
                rb.ALPN, ca=ca, credentials=rb.creds(d, "client"), server_name="localhost"
            )
            async with (
                open_endpoint("127.0.0.1", 0, server_tls=tls) as sep,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(sep.serve, QuicRpcHandler(server))
                async with open_endpoint("127.0.0.1", 0) as cep:
                    conn = await cep.connect("127.0.0.1", sep.local_address[1], ctls)
                    client = RpcClient(conn.open_stream, retry_policy=NO_RETRY)
                    req = BytesValue(value=b"q" * rb.REQ_SIZE)
                    for _ in range(WARMUP):
                        await client.call(rb.ECHO, req, BytesValue)
                    left = a.calls

                    async def worker() -> None:
                        nonlocal left
                        while left > 0:
                            left -= 1
                            reply = await client.call(rb.ECHO, req, BytesValue)
                            assert len(reply.value) == rb.REQ_SIZE

                    cpu0, t0 = time.process_time(), time.perf_counter()
                    if profile is not None:
                        profile.enable()
                    async with trio.open_nursery() as workers:
                        for _ in range(a.concurrency):
                            workers.start_soon(worker)
                    if profile is not None:
                        profile.disable()
                    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
                    await conn.aclose()
                nursery.cancel_scope.cancel()
        print(
            f"rpc in-process: {a.calls} calls, {a.concurrency} in flight, tree {a.tree}, "
            f"load {os.getloadavg()[0]:.2f}"
        )
        print(f"cpu_us_per_call={cpu / a.calls * 1e6:.0f} calls_per_s={a.calls / wall:.0f}")

    trio.run(run)
    if profile is not None:
        stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]

        def calls(name: str, where: str = "") -> float:
            n = sum(v[1] for (f, _, fn), v in stats.items() if fn == name and where in f)
            return float(n) / a.calls

        total = sum(v[1] for v in stats.values()) / a.calls
        print(
            f"per RPC: python calls {total:.0f}, cancel scopes {calls('__enter__', 'trio/_core'):.2f},"
            f" stream is_finished {calls('is_finished'):.1f},"
            f" stream-limit hook {calls('_skip_stream_limits'):.1f},"
            f" datagrams_to_send {calls('datagrams_to_send', 'aioquic'):.2f},"
            f" packets started {calls('start_packet'):.2f}"
        )


if __name__ == "__main__":
    main()
